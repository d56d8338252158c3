"""Every model family passes every shared check (models.checks), river-style: one test, families x checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.checks import Data, yield_checks
from models.features import FeatureConfig
from models.linear import LinearConfig, LinearModel
from models.neural import NeuralConfig, NeuralModel

FAMILIES: dict[str, Any] = {
    "linear": lambda seed: LinearModel(FeatureConfig(), LinearConfig(seed=seed, epochs=10)),
    # A small network keeps the suite quick; the architecture and its export are the ones served.
    "neural": lambda seed: NeuralModel(FeatureConfig(), NeuralConfig(epochs=2, n_embed=1 << 12, dim=8, hidden=16),
                                       seed=seed),
}
CASES = [(name, check) for name in FAMILIES for check in yield_checks()]


@pytest.fixture(scope="module")
def data(p1_split: tuple[list, list], featurize_corpus: Any) -> Data:
    """Real mail: a sixth of P1's training period to learn from, a tenth of its test period to score."""
    train, test = p1_split
    cfg = FeatureConfig()
    picked = [m for m in train if m.index % 6 == 0]
    order = np.random.default_rng(0).permutation(len(picked))
    x, y = featurize_corpus([picked[i] for i in order], cfg)
    xt, yt = featurize_corpus([m for m in test if m.index % 10 == 0], cfg)
    return x, y, xt, yt


@pytest.mark.unit
@pytest.mark.parametrize(("family", "check"), CASES, ids=[f"{n}:{c.__name__}" for n, c in CASES])
def test_family_passes_check(family: str, check: Any, data: Data) -> None:
    check(FAMILIES[family], data)
