"""Fixtures shared by the models tests: the real corpus, featurized the way serving does it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from models.corpus import load_corpus, split_p1
from models.features import FeatureBatch, FeatureConfig, featurize
from models.message import parse
from models.rules import RuleEngine
from services.settings import get_settings


@pytest.fixture(scope="session")
def p1_split() -> tuple[list[Any], list[Any]]:
    """P1's training and test periods of the real corpus."""
    return split_p1(load_corpus(get_settings().downloads))


@pytest.fixture(scope="session")
def featurize_corpus() -> Callable[[Sequence[Any], FeatureConfig], tuple[FeatureBatch, np.ndarray]]:
    """Parse, score with the default rules and featurize corpus messages: (batch, 0/1 labels)."""
    engine = RuleEngine.default()

    def run(msgs: Sequence[Any], cfg: FeatureConfig) -> tuple[FeatureBatch, np.ndarray]:
        parsed = [parse(m.raw) for m in msgs]
        labels = np.array([int(m.is_spam) for m in msgs])
        return featurize(parsed, [engine.evaluate(p) for p in parsed], cfg), labels

    return run
