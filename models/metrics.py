"""Ranking and operating-point metrics shared by evaluation, the gate and the worker's live figures.

Every figure Flywheel reports about a scorer comes from here, so ``flywheel eval``, the gate's decisions and the
Prometheus gauges mean the same thing by "1-AUC" and "recall at FPR <= x": ROC AUC with ties counted one half,
ROC points with tied scores grouped (a threshold cannot split messages of equal score, so a saturated score
cannot buy recall it would not have in service).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

WINDOW = 500

def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Probability that a random spam outscores a random ham, ties counting one half (NaN with one class)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_points(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, threshold) for "spam iff score >= threshold" at every distinct score, highest first.

    Tied scores form one point: a threshold cannot separate messages with the same score.
    The point (0, 0, +inf) is included.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    uniq, inv = np.unique(-s, return_inverse=True)  # ascending -s == descending s
    pos = np.bincount(inv, weights=y.astype(np.float64), minlength=len(uniq))
    neg = np.bincount(inv, weights=(~y).astype(np.float64), minlength=len(uniq))
    tpr = np.concatenate([[0.0], np.cumsum(pos) / n_pos])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / n_neg])
    thr = np.concatenate([[np.inf], -uniq])
    return fpr, tpr, thr


def recall_at_fpr(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray, max_fpr: float) -> float:
    """Best spam recall over ROC points (ties grouped) whose FPR is at most ``max_fpr``."""
    fpr, tpr, _ = roc_points(scores, labels)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def metrics(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray, predicted: Sequence[bool] | np.ndarray,
) -> dict[str, Any]:
    """The metric set M of the JSON output (rates as fractions; only one_minus_auc_pct in percent)."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predicted).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_spam, n_ham = int(y.sum()), int((~y).sum())
    auc = roc_auc(s, y)
    fp, fn = int((p & ~y).sum()), int((~p & y).sum())
    return {
        "auc": nan_none(auc),
        "one_minus_auc_pct": nan_none((1.0 - auc) * 100.0),
        "fpr": fp / n_ham if n_ham else None,
        "fnr": fn / n_spam if n_spam else None,
        "fp": fp,
        "fn": fn,
        "recall_at_fpr_0_1pct": recall_at_fpr(s, y, 0.001) if n_ham and n_spam else None,
        "recall_at_fpr_1pct": recall_at_fpr(s, y, 0.01) if n_ham and n_spam else None,
        "n_ham": n_ham,
        "n_spam": n_spam,
    }


def windows(
    scores: np.ndarray, labels: np.ndarray, predicted: np.ndarray, size: int = WINDOW,
) -> list[dict[str, Any]]:
    """Per window of ``size`` stream positions: error rate, the window's own AUC and the cumulative AUC."""
    out: list[dict[str, Any]] = []
    y = np.asarray(labels).astype(bool)
    for w, lo in enumerate(range(0, len(scores), size)):
        hi = min(lo + size, len(scores))
        out.append({
            "window": w, "start": lo, "end": hi - 1, "n_spam": int(y[lo:hi].sum()),
            "error_rate": float(np.mean(np.asarray(predicted[lo:hi]) != y[lo:hi])),
            "auc": nan_none(roc_auc(scores[lo:hi], y[lo:hi])),
            "cumulative_auc": nan_none(roc_auc(scores[:hi], y[:hi])),
        })
    return out


def nan_none(x: float | None) -> float | None:
    """JSON-friendly: None for NaN, infinities and None."""
    return None if x is None or not math.isfinite(x) else float(x)


__all__ = ["WINDOW", "metrics", "nan_none", "recall_at_fpr", "roc_auc", "roc_points", "windows"]
