"""The PyTorch model: trains on real mail, its ONNX graph agrees with torch, serving stays torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.features import FeatureBatch, FeatureConfig
from models.neural import NeuralConfig, train_neural
from models.runtime import OnnxModel


@pytest.fixture(scope="module")
def p1_sample(p1_split, featurize_corpus) -> tuple[FeatureBatch, np.ndarray, FeatureBatch, np.ndarray, FeatureConfig]:
    train, test = p1_split
    cfg = FeatureConfig()
    xtr, ytr = featurize_corpus([m for m in train if m.index % 3 == 0], cfg)
    xte, yte = featurize_corpus([m for m in test if m.index % 10 == 0], cfg)
    return xtr, ytr, xte, yte, cfg


@pytest.mark.unit
def test_trains_and_onnx_agrees_with_torch(p1_sample, tmp_path: Path) -> None:
    xtr, ytr, xte, yte, cfg = p1_sample
    model = train_neural(xtr, ytr, NeuralConfig(epochs=3), seed=0, features=cfg)
    p = model.predict_proba(xte)
    assert p.dtype == np.float32 and p.shape == (xte.rows,)
    assert roc_auc_score(yte, p) > 0.95  # a later period, a third of the training data, three epochs
    served = OnnxModel(model.export_onnx(tmp_path / "neural.onnx"))
    assert served.kind == "neural"
    np.testing.assert_allclose(served.predict_proba(xte), p, atol=1e-5, rtol=0)
    np.testing.assert_allclose(served.predict_logit(xte), model.decision_function(xte), atol=1e-4, rtol=1e-5)
    rows = np.concatenate([served.predict_proba(xte.row(i)) for i in range(0, xte.rows, 11)])
    np.testing.assert_allclose(rows, p[::11], atol=1e-5, rtol=0)


@pytest.mark.unit
def test_same_seed_same_model_other_seed_differs(p1_sample) -> None:
    xtr, ytr, xte, _, cfg = p1_sample
    small = xtr.take(np.arange(0, xtr.rows, 4))
    cfg_nn = NeuralConfig(epochs=1, n_embed=1 << 12, dim=8, hidden=16)
    a = train_neural(small, ytr[::4], cfg_nn, seed=1, features=cfg).predict_proba(xte)
    b = train_neural(small, ytr[::4], cfg_nn, seed=1, features=cfg).predict_proba(xte)
    c = train_neural(small, ytr[::4], cfg_nn, seed=2, features=cfg).predict_proba(xte)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


@pytest.mark.unit
def test_rejects_bad_labels(p1_sample) -> None:
    xtr, _, _, _, cfg = p1_sample
    with pytest.raises(ValueError):
        train_neural(xtr.take([0, 1]), [0, 3], NeuralConfig(epochs=1), features=cfg)
    with pytest.raises(ValueError):
        train_neural(xtr.take([0, 1]), [0], NeuralConfig(epochs=1), features=cfg)


@pytest.mark.integration
def test_onnx_parity_on_the_whole_p1_test_period(tmp_path: Path, p1_split, featurize_corpus) -> None:
    """ONNX and torch agree to 1e-5 on every message of P1's test period (the model trained on P1's train)."""
    train, test = p1_split
    cfg = FeatureConfig()
    xtr, ytr = featurize_corpus(train, cfg)
    xte, _ = featurize_corpus(test, cfg)
    model = train_neural(xtr, ytr, NeuralConfig(), seed=0, features=cfg)
    served = OnnxModel(model.export_onnx(tmp_path / "neural.onnx"))
    np.testing.assert_allclose(served.predict_proba(xte), model.predict_proba(xte), atol=1e-5, rtol=0)
