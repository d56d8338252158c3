"""Evaluation: metrics on hand-computable inputs, curve fits, protocol plumbing, and P1 end to end on real mail."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from models.evaluate import (
    SIDES,
    fit_line,
    fit_log,
    format_table,
    holdout_split,
    metrics,
    neural_schedule,
    recall_at_fpr,
    roc_auc,
    roc_points,
    run_eval,
    windows,
)


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


@pytest.mark.unit
def test_fits_recover_known_curves() -> None:
    x = np.arange(1, 30)
    f = fit_line(x, 0.25 + 0.01 * x)
    assert (f.a, f.b, f.r2) == pytest.approx((0.25, 0.01, 1.0))
    n = np.array([25, 50, 100, 200, 400, 800, 1600])
    g = fit_log(n, 0.1 + 0.12 * np.log(n))
    assert (g.a, g.b, g.r2) == pytest.approx((0.1, 0.12, 1.0))
    assert g.predict(np.e) == pytest.approx(0.22)
    noisy = fit_line(x, 0.25 + 0.01 * x + np.random.default_rng(0).normal(0, 0.05, x.size))
    assert 0.0 < noisy.r2 < 1.0
    assert "ln(n)" in g.to_dict()["formula"]


@dataclass(frozen=True)
class _Msg:
    group: str
    index: int


@pytest.mark.unit
def test_holdout_is_the_latest_fifth_of_each_group() -> None:
    msgs = [_Msg("a", i) for i in range(10)] + [_Msg("b", i) for i in range(5)]
    random.Random(0).shuffle(msgs)
    fit, hold = holdout_split(msgs)
    held = sorted((msgs[i].group, msgs[i].index) for i in hold)
    assert held == [("a", 8), ("a", 9), ("b", 4)]
    assert sorted([*fit, *hold]) == list(range(len(msgs)))


@pytest.mark.unit
def test_neural_schedule_doubles_then_steps() -> None:
    assert neural_schedule(6046, 1000) == [50, 100, 200, 400, 800, 1600, 2600, 3600, 4600, 5600]
    assert neural_schedule(40, 1000) == []


@pytest.fixture(scope="module")
def small_corpus() -> list:
    from models.corpus import ensure_corpus, load_corpus
    from services.settings import get_settings

    s = get_settings()
    ensure_corpus(s.downloads, s.corpus_dir)
    msgs = load_corpus(s.downloads, s.corpus_dir)
    rng = random.Random(11)
    out = []
    for g in sorted({m.group for m in msgs}):
        members = [m for m in msgs if m.group == g]
        out.extend(rng.sample(members, min(len(members), 90)))
    return out


@pytest.mark.integration
def test_eval_p1_on_a_real_subsample(small_corpus: list, tmp_path: Path) -> None:
    json_path = tmp_path / "p1.json"
    lines: list[str] = []
    result = run_eval("P1", downloads_dir=tmp_path, corpus_dir=None, out_dir=tmp_path / "out", json_path=json_path,
                      curves=True, seeds=2, corpus=small_corpus, sa_rules_dir=None, progress=lines.append)
    data = json.loads(json_path.read_text())
    assert data["protocol"] == "P1" and set(data["results"]) >= set(SIDES)
    for side in SIDES:
        m = data["results"][side]
        assert 0.5 < m["auc"] <= 1.0, side
        assert m["one_minus_auc_pct"] == pytest.approx(100 * (1 - m["auc"]))
        assert 0 <= m["fpr"] <= 1 and 0 <= m["fnr"] <= 1
        assert 0 <= m["recall_at_fpr_0_1pct"] <= m["recall_at_fpr_1pct"] <= 1
        assert m["n_ham"] + m["n_spam"] == data["split"]["test"]
    assert len(data["neural_seeds"]["per_seed"]) == 2 and "std" in data["neural_seeds"]["spread"]["auc"]
    assert {"with_artefacts", "without_artefacts"} <= set(data["ablation"]["linear"])
    assert data["curves"]["rules"]["fit"]["kind"] == "line" and data["curves"]["models"]["neural"]["fit"]["kind"] == "log"
    assert all(Path(f).stat().st_size > 10_000 for f in data["figures"])
    assert len(data["figures"]) == 2
    assert any("neural model" in ln for ln in lines)  # a progress line per stage
    table = format_table(result)
    assert "served" in table and "curves" in table and "1-AUC" in table
