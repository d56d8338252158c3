"""The linear family beyond the shared checks (tests/models/test_families.py): it ranks real mail it never
saw, learns one message at a time, continues exactly after a save, refuses bad labels, and its ONNX graph agrees
with scikit-learn on a whole test period."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.features import FeatureBatch, FeatureConfig
from models.linear import LinearConfig, LinearModel
from models.runtime import OnnxModel


@pytest.fixture(scope="module")
def p1_sample(p1_split, featurize_corpus) -> tuple[FeatureBatch, np.ndarray, FeatureBatch, np.ndarray, FeatureConfig]:
    """A quarter of P1's training period and a tenth of its test period, real messages."""
    train, test = p1_split
    cfg = FeatureConfig()
    xtr, ytr = featurize_corpus([m for m in train if m.index % 4 == 0], cfg)
    xte, yte = featurize_corpus([m for m in test if m.index % 10 == 0], cfg)
    return xtr, ytr, xte, yte, cfg


@pytest.mark.unit
def test_ranks_a_later_period_it_never_saw(p1_sample) -> None:
    xtr, ytr, xte, yte, cfg = p1_sample
    p = LinearModel(cfg).fit(xtr, ytr).predict_proba(xte)
    assert p.dtype == np.float32 and p.shape == (xte.rows,)
    assert roc_auc_score(yte, p) > 0.97


@pytest.mark.unit
def test_partial_fit_moves_the_probability_the_right_way(p1_sample) -> None:
    xtr, ytr, xte, yte, cfg = p1_sample
    model = LinearModel(cfg)
    assert not model.fitted
    np.testing.assert_allclose(model.predict_proba(xte.row(0)), 0.5)
    for i in range(200):  # one message at a time, in arrival order
        model.partial_fit(xtr.row(i), ytr[i : i + 1])
    assert model.n_seen == 200
    spam = int(np.flatnonzero(yte == 1)[0])
    ham = int(np.flatnonzero(yte == 0)[0])
    for idx, label in ((spam, 1), (ham, 0)):
        row = xte.row(idx)
        before = float(model.predict_proba(row)[0])
        model.partial_fit(row, [label])
        after = float(model.predict_proba(row)[0])
        assert (after > before) if label == 1 else (after < before), (label, before, after)


@pytest.mark.unit
def test_save_load_continues_exactly(p1_sample, tmp_path: Path) -> None:
    xtr, ytr, xte, _, cfg = p1_sample
    order = np.random.default_rng(0).permutation(xtr.rows)  # the sample is grouped by class; mix it
    xtr, ytr = xtr.take(order), ytr[order]
    for average in (False, True):
        model = LinearModel(cfg, LinearConfig(average=average, epochs=3))
        model.fit(xtr.take(np.arange(300)), ytr[:300])
        for i in range(300, 320):
            model.partial_fit(xtr.row(i), ytr[i : i + 1])
        path = model.save(tmp_path / f"linear-{average}.npz")
        restored = LinearModel.load(path)
        assert restored.config == model.config and restored.features == model.features
        assert restored.n_seen == model.n_seen
        np.testing.assert_array_equal(restored.predict_proba(xte), model.predict_proba(xte))
        for i in range(320, 340):
            model.partial_fit(xtr.row(i), ytr[i : i + 1])
            restored.partial_fit(xtr.row(i), ytr[i : i + 1])
        np.testing.assert_allclose(restored.predict_proba(xte), model.predict_proba(xte), atol=1e-7)


@pytest.mark.unit
def test_a_bag_is_one_linear_model(p1_sample) -> None:
    xtr, ytr, xte, _, cfg = p1_sample
    a = LinearModel(cfg, LinearConfig(seed=1)).fit(xtr, ytr)
    b = LinearModel(cfg, LinearConfig(seed=2)).fit(xtr, ytr)
    bag = LinearModel.averaged([a, b])
    want = (a.decision_function(xte) + b.decision_function(xte)) / 2
    np.testing.assert_allclose(bag.decision_function(xte), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        LinearModel.averaged([LinearModel(cfg)])


@pytest.mark.unit
def test_rejects_bad_labels(p1_sample) -> None:
    xtr, _, _, _, cfg = p1_sample
    with pytest.raises(ValueError):
        LinearModel(cfg).fit(xtr.take([0, 1]), [0, 2])
    with pytest.raises(ValueError):
        LinearModel(cfg).partial_fit(xtr.row(0), [1, 0])
    with pytest.raises(ValueError):
        LinearModel(cfg).fit(xtr.take([0, 1]), [0, 1], sample_weight=np.ones(3))


@pytest.mark.integration
def test_onnx_parity_on_the_whole_p1_test_period(tmp_path: Path, p1_split, featurize_corpus) -> None:
    """ONNX and scikit-learn agree to 1e-5 on every message of P1's test period."""
    train, test = p1_split
    cfg = FeatureConfig()
    xtr, ytr = featurize_corpus(train, cfg)
    xte, _ = featurize_corpus(test, cfg)
    model = LinearModel(cfg).fit(xtr, ytr)
    served = OnnxModel(model.export_onnx(tmp_path / "linear.onnx"))
    np.testing.assert_allclose(served.predict_proba(xte), model.predict_proba(xte), atol=1e-5, rtol=0)
