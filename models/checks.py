"""The checks every model family passes (``tests/models/test_families.py`` runs each on each family).

A family is given as a factory ``make(seed) -> SpamModel`` (unfitted) plus a small labelled batch; each check
returns nothing and raises ``AssertionError`` with a reason. New families add themselves to the test's list and
get every check for free; a check that does not apply to a family must say so in the test, not be skipped here.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from models.base import Scorer, SpamModel
from models.features import FeatureBatch

__all__ = ["Check", "Data", "yield_checks"]

Factory = Callable[[int], SpamModel]
Data = tuple[FeatureBatch, np.ndarray, FeatureBatch, np.ndarray]  # train rows, labels, test rows, labels
Check = Callable[[Factory, Data], None]

PARITY_ATOL = 1e-5


def _logits(model: Scorer, batch: FeatureBatch) -> np.ndarray:
    return np.asarray(model.decision_function(batch), dtype=np.float64).reshape(-1)


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    from models.metrics import roc_auc

    return roc_auc(scores, y.astype(bool))


def check_implements_the_interface(make: Factory, data: Data) -> None:
    model = make(0)
    assert isinstance(model, SpamModel), f"{type(model).__name__} does not implement models.base.SpamModel"
    assert model.kind and model.features is not None


def check_learning_moves_scores_the_right_way(make: Factory, data: Data) -> None:
    """Fitted on labelled rows, spam scores above ham on rows it has not seen, far better than chance."""
    x, y, xt, yt = data
    model = make(0).fit(x, y)
    assert _auc(_logits(model, xt), yt) > 0.9, "a fitted model ranks held-out spam above ham"


def check_probability_is_the_sigmoid_of_the_logit(make: Factory, data: Data) -> None:
    x, y, xt, _ = data
    model = make(0).fit(x, y)
    p = np.asarray(model.predict_proba(xt), dtype=np.float64)
    assert p.shape == (xt.rows,) and np.all((p >= 0) & (p <= 1)), "probabilities in [0, 1], one per row"
    np.testing.assert_allclose(p, 1.0 / (1.0 + np.exp(-_logits(model, xt))), atol=1e-5)


def check_onnx_matches_the_framework(make: Factory, data: Data) -> None:
    """The served graph (onnxruntime) gives the framework's logits and probabilities, batched and one by one."""
    from models.runtime import OnnxModel

    x, y, xt, _ = data
    model = make(0).fit(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        served = OnnxModel(model.export_onnx(Path(tmp) / "model.onnx"), use_cuda=False)
        assert served.kind == model.kind
        np.testing.assert_allclose(served.predict_proba(xt), model.predict_proba(xt), atol=PARITY_ATOL)
        np.testing.assert_allclose(_logits(served, xt), _logits(model, xt), atol=1e-4, rtol=1e-5)
        one = np.concatenate([served.predict_proba(xt.row(i)) for i in range(0, xt.rows, 7)])
        np.testing.assert_allclose(one, np.asarray(model.predict_proba(xt))[::7], atol=PARITY_ATOL)


def check_same_seed_same_model(make: Factory, data: Data) -> None:
    x, y, xt, _ = data
    a, b = make(1).fit(x, y), make(1).fit(x, y)
    np.testing.assert_array_equal(_logits(a, xt), _logits(b, xt))


def check_save_load_round_trip(make: Factory, data: Data) -> None:
    x, y, xt, _ = data
    model = make(0).fit(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        restored = type(model).load(model.save(Path(tmp) / "state.npz"))
    assert restored.features == model.features and restored.kind == model.kind
    np.testing.assert_array_equal(_logits(restored, xt), _logits(model, xt))


def check_inputs_are_not_mutated(make: Factory, data: Data) -> None:
    x, y, xt, _ = data
    before = (copy.deepcopy(x), y.copy(), copy.deepcopy(xt))
    model = make(0).fit(x, y, sample_weight=np.ones(y.size))
    model.predict_proba(xt)
    for a, b in ((x, before[0]), (xt, before[2])):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.vals, b.vals) and np.array_equal(a.seg, b.seg)
    assert np.array_equal(y, before[1])


def check_sample_weights_count(make: Factory, data: Data) -> None:
    """Row weights are honoured: every row again with its label turned around, but nearly weightless, does not
    undo what the rightly labelled rows teach (unweighted, the two copies would cancel out)."""
    x, y, xt, yt = data
    both = FeatureBatch.concat([x, x])
    labels = np.concatenate([y, 1 - y])
    weights = np.concatenate([np.ones(y.size), np.full(y.size, 1e-6)])
    model = make(0).fit(both, labels, sample_weight=weights)
    assert _auc(_logits(model, xt), yt) > 0.9, "weightless wrong labels must not undo the right ones"


CHECKS: tuple[Check, ...] = (
    check_implements_the_interface,
    check_learning_moves_scores_the_right_way,
    check_probability_is_the_sigmoid_of_the_logit,
    check_onnx_matches_the_framework,
    check_same_seed_same_model,
    check_save_load_round_trip,
    check_inputs_are_not_mutated,
    check_sample_weights_count,
)


def yield_checks() -> Iterator[Check]:
    """Every check, in a stable order."""
    yield from CHECKS
