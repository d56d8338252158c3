"""The linear model: logistic regression by SGD on the hashed features.

scikit-learn's ``SGDClassifier(loss="log_loss")`` learns from the CSR form of a :class:`FeatureBatch`, with
optional per-row weights; the retraining worker refits it on every current label and bags the fits
(``models.learning``). Serving never runs scikit-learn: :meth:`LinearModel.export_onnx` writes a small graph built directly
from ``coef_``/``intercept_`` (gather the weights of the ids, multiply by the values, scatter-add them into the
rows, add the bias, sigmoid) that takes the same inputs as the neural model's graph. The whole state saves to one ``.npz``
(the worker keeps its base model and each linear version's state that way).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.linear_model import SGDClassifier

from models.base import read_state, write_onnx, write_state
from models.features import FeatureBatch, FeatureConfig

__all__ = ["LinearConfig", "LinearModel", "build_onnx_inputs"]

OPSET = 18


@dataclass(slots=True)
class LinearConfig:
    """SGD hyperparameters; defaults chosen by 5-fold blocked cross-validation inside the P1 training period.

    Out-of-fold (1-AUC)%: alpha 3e-5 0.127, 1e-5 0.121, 1e-6 0.101, 3e-7 0.078 (chosen), 1e-7 0.093; averaging,
    balanced class weights and 10-50 epochs changed it by less than the fold noise (~0.01).
    """

    alpha: float = 3e-7
    epochs: int = 20
    average: bool = False
    class_weight: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _as_labels(y: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(y, dtype=np.int64).reshape(-1)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError("labels must be 0 (ham) or 1 (spam)")
    return arr


def build_onnx_inputs() -> list[onnx.ValueInfoProto]:
    """The four inputs shared by both learned models' graphs."""
    return [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("vals", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("seg", TensorProto.INT64, ["N"]),
        helper.make_tensor_value_info("rows", TensorProto.INT64, [1]),
    ]


def finish_onnx_model(
    nodes: list[onnx.NodeProto], name: str, initializers: list[onnx.TensorProto], props: dict[str, str]
) -> onnx.ModelProto:
    """Wrap a learned model's nodes in the graph every served model shares: the four inputs of
    :func:`build_onnx_inputs`, ``prob`` and ``logit`` per row out, Flywheel's metadata, checked."""
    graph = helper.make_graph(
        nodes,
        name,
        build_onnx_inputs(),
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["rows"]),
            helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["rows"]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="flywheel")
    model.ir_version = 9
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


class LinearModel:
    """The linear family (see :class:`models.base.SpamModel`): logistic regression over hashed tokens, with an
    incremental ``partial_fit`` besides ``fit``."""

    kind = "linear"

    _STATE_ARRAYS = (
        "classes_",
        "_expanded_class_weight",
        "coef_",
        "intercept_",
        "_standard_coef",
        "_average_coef",
        "_standard_intercept",
        "_average_intercept",
    )

    def __init__(self, features: FeatureConfig | None = None, config: LinearConfig | None = None) -> None:
        self.features = features or FeatureConfig()
        self.config = config or LinearConfig()
        self.clf = SGDClassifier(
            loss="log_loss",
            penalty="l2",
            alpha=self.config.alpha,
            average=self.config.average,
            class_weight=self.config.class_weight,
            max_iter=self.config.epochs,
            tol=None,
            shuffle=True,
            random_state=self.config.seed,
        )
        self.n_seen = 0

    # --- learning ------------------------------------------------------------------------------------
    def fit(
        self, batch: FeatureBatch, y: Sequence[int] | np.ndarray, sample_weight: np.ndarray | None = None,
    ) -> LinearModel:
        """Train from scratch on a whole batch (``epochs`` passes, shuffled with ``seed``); ``sample_weight``
        weighs rows (the worker weighs users' recent flags against the base corpus)."""
        labels = _as_labels(y)
        if labels.size != batch.rows:
            raise ValueError(f"{batch.rows} rows but {labels.size} labels")
        if sample_weight is not None and np.asarray(sample_weight).shape != (labels.size,):
            raise ValueError(f"{labels.size} labels but sample_weight of shape {np.asarray(sample_weight).shape}")
        self.clf.fit(batch.to_csr(self.features.n_buckets), labels, sample_weight=sample_weight)
        self.n_seen = int(labels.size)
        return self

    def partial_fit(self, batch: FeatureBatch, y: Sequence[int] | np.ndarray) -> LinearModel:
        """One SGD pass over ``batch`` (typically one message) on top of what was learned so far."""
        labels = _as_labels(y)
        if labels.size != batch.rows:
            raise ValueError(f"{batch.rows} rows but {labels.size} labels")
        if labels.size == 0:
            return self
        self.clf.partial_fit(batch.to_csr(self.features.n_buckets), labels, classes=np.array([0, 1]))
        self.n_seen += int(labels.size)
        return self

    @property
    def fitted(self) -> bool:
        return hasattr(self.clf, "coef_")

    @classmethod
    def averaged(cls, models: Sequence[LinearModel]) -> LinearModel:
        """One linear model whose weights are the mean of ``models``' (a bagged ensemble is still one linear
        model: averaging weights averages logits). The models must share their feature configuration."""
        fitted = [m for m in models if m.fitted]
        if not fitted:
            raise ValueError("no fitted model to average")
        first = fitted[0]
        if any(m.features != first.features for m in fitted):
            raise ValueError("models with different feature configurations cannot be averaged")
        out = cls(first.features, first.config)
        clf = out.clf
        clf.classes_ = np.array(first.clf.classes_)
        clf.coef_ = np.mean([m.clf.coef_ for m in fitted], axis=0)
        clf.intercept_ = np.mean([m.clf.intercept_ for m in fitted], axis=0)
        clf.n_features_in_ = int(clf.coef_.shape[1])
        clf.t_ = float(max(getattr(m.clf, "t_", 0.0) for m in fitted))
        clf.n_iter_ = int(max(getattr(m.clf, "n_iter_", 0) for m in fitted))
        clf._loss_function_ = clf._get_loss_function(clf.loss)
        out.n_seen = max(m.n_seen for m in fitted)
        return out

    def _weights(self) -> tuple[np.ndarray, float]:
        if not self.fitted:
            return np.zeros(self.features.n_buckets, dtype=np.float64), 0.0
        return self.clf.coef_.reshape(-1), float(self.clf.intercept_[0])

    # --- scoring (the same arithmetic as the ONNX graph) -----------------------------------------------
    def decision_function(self, batch: FeatureBatch) -> np.ndarray:
        """Logit per row, float64."""
        w, b = self._weights()
        contrib = w[batch.ids] * batch.vals.astype(np.float64)
        return np.bincount(batch.seg, weights=contrib, minlength=batch.rows) + b

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        """Spam probability per row (float32), as the exported graph computes it."""
        z = self.decision_function(batch)
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)

    # --- export / persistence --------------------------------------------------------------------------
    def to_onnx(self) -> onnx.ModelProto:
        """The serving graph: inputs ids/vals/seg/rows, outputs ``prob`` and ``logit`` float32[rows]."""
        w, b = self._weights()
        inits = [
            numpy_helper.from_array(w.astype(np.float32), "W"),
            numpy_helper.from_array(np.array([b], dtype=np.float32), "b"),
        ]
        nodes = [
            # GatherElements, not Gather: onnxruntime's CPU Gather copies one 4-byte block per id (7x slower here).
            helper.make_node("GatherElements", ["W", "ids"], ["w_ids"], axis=0),
            helper.make_node("Mul", ["w_ids", "vals"], ["contrib"]),
            helper.make_node(
                "ConstantOfShape", ["rows"], ["zeros"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
            ),
            helper.make_node("ScatterElements", ["zeros", "seg", "contrib"], ["dot"], axis=0, reduction="add"),
            helper.make_node("Add", ["dot", "b"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["prob"]),
        ]
        return finish_onnx_model(
            nodes,
            "flywheel_linear",
            inits,
            {
                "kind": "linear",
                "features": json.dumps(self.features.to_dict()),
                "hyperparameters": json.dumps(self.config.to_dict()),
            },
        )

    def export_onnx(self, path: Path | str) -> Path:
        """Write the serving graph to ``path``."""
        return write_onnx(self.to_onnx(), path)

    def save(self, path: Path | str) -> Path:
        """The learner's full state (weights, averages, step count, configs) as one ``.npz``."""
        arrays = {"state" + name: np.asarray(getattr(self.clf, name))
                  for name in self._STATE_ARRAYS if hasattr(self.clf, name)}
        meta = {
            "features": self.features.to_dict(),
            "config": self.config.to_dict(),
            "n_seen": self.n_seen,
            "t_": float(getattr(self.clf, "t_", 0.0)),
            "n_iter_": int(getattr(self.clf, "n_iter_", 0)),
            "fitted": self.fitted,
        }
        return write_state(path, arrays, meta)

    @classmethod
    def load(cls, path: Path | str) -> LinearModel:
        """Restore a learner saved by :meth:`save`; ``partial_fit`` continues exactly where it stopped."""
        arrays, meta = read_state(path)
        model = cls(FeatureConfig.from_dict(meta["features"]), LinearConfig.from_dict(meta["config"]))
        model.n_seen = int(meta["n_seen"])
        if meta["fitted"]:
            clf = model.clf
            for name in cls._STATE_ARRAYS:
                if "state" + name in arrays:
                    setattr(clf, name, arrays["state" + name])
            clf.t_ = float(meta["t_"])
            clf.n_iter_ = int(meta["n_iter_"])
            clf.n_features_in_ = int(clf.coef_.shape[1])
            clf._loss_function_ = clf._get_loss_function(clf.loss)
        return model
