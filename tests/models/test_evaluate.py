"""Evaluation: curve fits, protocol plumbing, and P1 end to end on real mail."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from models.evaluate import (
    fit_line,
    fit_log,
    holdout_split,
    neural_schedule,
    run_eval,
)
from models.report import SIDES, format_table


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
