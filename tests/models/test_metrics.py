"""Ranking and operating-point metrics against hand-computed cases (models.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import metrics, recall_at_fpr, roc_auc, roc_points, windows


@pytest.mark.unit
def test_auc_by_hand() -> None:
    # pairs (spam, ham): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert roc_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx((1 + 0.5 + 2) / 4)
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


@pytest.mark.unit
def test_auc_matches_sklearn_on_random_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    s = rng.integers(0, 7, 500).astype(float)
    y = rng.random(500) < 0.3
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.unit
def test_recall_at_fpr_groups_ties() -> None:
    s = [0.9, 0.8, 0.8, 0.7, 0.1]
    y = [1, 1, 0, 1, 0]
    # FPR 0: only the 0.9 point qualifies (the 0.8 tie holds a ham): 1 of 3 spam
    assert recall_at_fpr(s, y, 0.0) == pytest.approx(1 / 3)
    assert recall_at_fpr(s, y, 0.5) == pytest.approx(1.0)  # threshold 0.7: 1 of 2 ham, all spam
    assert recall_at_fpr([1.0, 1.0, 1.0], [1, 1, 0], 0.001) == 0.0  # saturated score: no free recall
    fpr, tpr, thr = roc_points(s, y)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert thr[0] == np.inf and thr[-1] == 0.1


@pytest.mark.unit
def test_metrics_counts_and_rates() -> None:
    m = metrics([0.9, 0.2, 0.7, 0.6, 0.1], [1, 1, 0, 0, 0], [True, False, True, False, False])
    assert (m["n_spam"], m["n_ham"], m["fp"], m["fn"]) == (2, 3, 1, 1)
    assert m["fpr"] == pytest.approx(1 / 3) and m["fnr"] == pytest.approx(0.5)
    # spam 0.9 beats all three ham, spam 0.2 beats only 0.1: 4 of 6 pairs
    assert m["auc"] == pytest.approx(4 / 6) and m["one_minus_auc_pct"] == pytest.approx(100 / 3)
    assert set(m) >= {"auc", "one_minus_auc_pct", "fpr", "fnr", "recall_at_fpr_0_1pct", "recall_at_fpr_1pct",
                      "n_ham", "n_spam"}


@pytest.mark.unit
def test_windows_of_a_stream() -> None:
    y = np.array([1, 0] * 6)
    s = np.where(y == 1, 0.9, 0.1).astype(float)
    pred = s > 0.5
    pred[0] = False
    w = windows(s, y, pred, size=5)
    assert [x["start"] for x in w] == [0, 5, 10] and [x["end"] for x in w] == [4, 9, 11]
    assert w[0]["error_rate"] == pytest.approx(0.2) and w[1]["error_rate"] == 0.0
    assert w[0]["auc"] == 1.0 and w[2]["cumulative_auc"] == 1.0
