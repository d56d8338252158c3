"""The one model interface: what every family gives, so training, the gate, evaluation and serving never ask
which family they hold.

* :class:`Scorer` - logits and probabilities for a :class:`~models.features.FeatureBatch`. Everything that
  scores implements it: the trainable families and the served ONNX graph they export to
  (:class:`models.runtime.OnnxModel`), so the gate scores a challenger and the champion the same way.
* :class:`SpamModel` - a trainable family (:class:`models.linear.LinearModel`, :class:`models.neural.NeuralModel`):
  a Scorer that fits on labelled rows (with optional per-row weights), exports its serving graph to ONNX, and
  saves and loads its whole state.

The logit is the unit everything ranks by: probabilities saturate at 0 and 1 in floating point, logits do not.
``predict_proba`` is ``sigmoid(decision_function)`` for every family (the shared checks in :mod:`models.checks`
hold each family to that, to ONNX parity, to determinism by seed and to a save/load round trip).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import numpy as np

from models.features import FeatureBatch, FeatureConfig

if TYPE_CHECKING:
    import onnx

__all__ = ["Scorer", "SpamModel", "read_state", "write_onnx", "write_state"]


@runtime_checkable
class Scorer(Protocol):
    """Scores rows of hashed features."""

    def decision_function(self, batch: FeatureBatch) -> np.ndarray:
        """Logit per row (unsaturated: rank by this)."""
        ...

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        """Spam probability per row, ``sigmoid(decision_function(batch))``."""
        ...


@runtime_checkable
class SpamModel(Scorer, Protocol):
    """A trainable model family."""

    kind: str
    features: FeatureConfig

    def fit(self, batch: FeatureBatch, y: np.ndarray, sample_weight: np.ndarray | None = None) -> Self:
        """Learn from scratch on labelled rows (``y``: 1 spam, 0 ham), optionally weighting rows."""
        ...

    def export_onnx(self, path: Path | str) -> Path:
        """Write the serving graph (inputs ids/vals/seg/rows; outputs prob and logit per row)."""
        ...

    def save(self, path: Path | str) -> Path:
        """The whole state in one file; :meth:`load` restores a model that scores identically."""
        ...

    @classmethod
    def load(cls, path: Path | str) -> Self:
        ...


# ---------------------------------------------------------------------------------------------- one file format
def write_state(path: Path | str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """A family's whole state as one ``.npz``: its arrays plus a JSON ``meta`` entry, written atomically (a
    reader sees the old file or the new one, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = dict(arrays)  # Any: mypy matches ** against savez's allow_pickle too
    entries["meta"] = np.frombuffer(json.dumps(dict(meta)).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **entries)
    tmp.replace(path)
    return path


def read_state(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What :func:`write_state` wrote: (arrays by name, meta)."""
    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        arrays = {k: np.array(data[k]) for k in data.files if k != "meta"}
    return arrays, meta


def write_onnx(model: onnx.ModelProto, path: Path | str) -> Path:
    """Write a serving graph to ``path`` (creating its folder)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path
