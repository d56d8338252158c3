"""The PyTorch family beyond the shared checks (tests/models/test_families.py): it ranks real mail it never
saw, a different seed gives a different model, it refuses bad labels, and its ONNX graph agrees with torch on a
whole test period."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.features import FeatureBatch, FeatureConfig
from models.neural import NeuralConfig, NeuralModel
from models.runtime import OnnxModel


@pytest.fixture(scope="module")
def p1_sample(p1_split, featurize_corpus) -> tuple[FeatureBatch, np.ndarray, FeatureBatch, np.ndarray, FeatureConfig]:
    train, test = p1_split
    cfg = FeatureConfig()
    xtr, ytr = featurize_corpus([m for m in train if m.index % 3 == 0], cfg)
    xte, yte = featurize_corpus([m for m in test if m.index % 10 == 0], cfg)
    return xtr, ytr, xte, yte, cfg


@pytest.mark.unit
def test_ranks_a_later_period_it_never_saw(p1_sample) -> None:
    xtr, ytr, xte, yte, cfg = p1_sample
    p = NeuralModel(cfg, NeuralConfig(epochs=3), seed=0).fit(xtr, ytr).predict_proba(xte)
    assert p.dtype == np.float32 and p.shape == (xte.rows,)
    assert roc_auc_score(yte, p) > 0.95  # a later period, a third of the training data, three epochs


@pytest.mark.unit
def test_another_seed_another_model(p1_sample) -> None:
    xtr, ytr, xte, _, cfg = p1_sample
    small = xtr.take(np.arange(0, xtr.rows, 4))
    cfg_nn = NeuralConfig(epochs=1, n_embed=1 << 12, dim=8, hidden=16)
    a = NeuralModel(cfg, cfg_nn, seed=1).fit(small, ytr[::4]).predict_proba(xte)
    c = NeuralModel(cfg, cfg_nn, seed=2).fit(small, ytr[::4]).predict_proba(xte)
    assert np.abs(a - c).max() > 1e-4


@pytest.mark.unit
def test_rejects_bad_labels(p1_sample) -> None:
    xtr, _, _, _, cfg = p1_sample
    with pytest.raises(ValueError):
        NeuralModel(cfg, NeuralConfig(epochs=1)).fit(xtr.take([0, 1]), [0, 3])
    with pytest.raises(ValueError):
        NeuralModel(cfg, NeuralConfig(epochs=1)).fit(xtr.take([0, 1]), [0])


@pytest.mark.integration
def test_onnx_parity_on_the_whole_p1_test_period(tmp_path: Path, p1_split, featurize_corpus) -> None:
    """ONNX and torch agree to 1e-5 on every message of P1's test period (the model trained on P1's train)."""
    train, test = p1_split
    cfg = FeatureConfig()
    xtr, ytr = featurize_corpus(train, cfg)
    xte, _ = featurize_corpus(test, cfg)
    model = NeuralModel(cfg, NeuralConfig(), seed=0).fit(xtr, ytr)
    served = OnnxModel(model.export_onnx(tmp_path / "neural.onnx"))
    np.testing.assert_allclose(served.predict_proba(xte), model.predict_proba(xte), atol=1e-5, rtol=0)
