"""``flywheel bench hostile`` end to end on a small slice: real corpus baseline, hostile cases in-process and over
HTTP to a real API process, /healthz polled from another process, every figure the issue asks for in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.settings import Settings


@pytest.mark.integration
def test_bench_hostile_reports_every_figure(settings: Settings, corpus: list, tmp_path: Path) -> None:
    from services.bench.api import train_quick_version
    from services.bench.hostile import run_hostile_bench

    s = settings.model_copy(update={"state_dir": tmp_path / "state", "registry_dir": None, "rules_path": None})
    sample = corpus[:: len(corpus) // 300]
    train_quick_version(s.registry, [m.raw for m in sample], [m.is_spam for m in sample], promote=True)
    out = tmp_path / "hostile.json"
    cases = ["lookalike_run", "mime_deep", "html_nesting", "encoded_unterminated"]
    result = run_hostile_bench(s, out, corpus_messages=150, sizes=[16 * 1024, s.max_message_bytes], repeats=1,
                               cases=cases)
    data = json.loads(out.read_text())
    assert data["worst_case"] in cases and data["worst_ms_case"] in cases
    for key in ("normal_ms_per_kb", "largest_decile_ms_per_kb", "worst_ms", "worst_ms_per_kb", "healthz_p99_ms"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert data["messages"] == 150 and data["healthz_samples"] > 0 and data["healthz_failed"] == 0
    rows = data["cases"]
    assert {(r["case"], r["bytes"] > 10_000_000) for r in rows} == {(c, big) for c in cases for big in (False, True)}
    assert all(r["http_status"] == 200 and r["http_ms"] > 0 for r in rows)  # the 10 MB ones too
    assert all(set(r["stages_ms"]) >= {"parse", "rules", "features_model"} for r in rows)
    ratios = data["ratios_to_targets"]
    assert set(ratios) == {"per_kb_ratio_to_largest_decile", "worst_ms", "healthz_p99_ms"}
    # the suite's own target, measured in this run: no hostile message above 3x real mail's largest decile per KB
    assert ratios["per_kb_ratio_to_largest_decile"] <= 1.0
    assert result["worst_ms_per_kb"] == data["worst_ms_per_kb"]
