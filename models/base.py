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

from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np

from models.features import FeatureBatch, FeatureConfig

__all__ = ["Scorer", "SpamModel"]


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
