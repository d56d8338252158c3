"""Every benchmark runs for real, briefly, and reports its figures with their ratios to the targets: a benchmark
that no test runs is one that silently stops working. (The figures quoted in the notes come from full runs.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DOWNLOADS

from services.settings import Settings

pytestmark = pytest.mark.integration


def test_models_bench_on_a_sample(tmp_path: Path) -> None:
    from services.bench.models import run_models_bench

    out = tmp_path / "models.json"
    r = run_models_bench(downloads_dir=DOWNLOADS, corpus_dir=None, json_path=out, limit=300)
    assert json.loads(out.read_text())["single_msgs_per_s"] == r["single_msgs_per_s"] > 0
    assert r["ratio_to_target"]["single_msgs_per_s"] > 0 and r["train_neural_s"] > 0


@pytest.mark.alone  # the swap at 60% of the capacity it measured: not with other tests' load
def test_api_bench_briefly(kafka: Settings, tmp_path: Path) -> None:
    from services.bench.api import run_api_bench

    out = tmp_path / "api.json"
    r = run_api_bench(kafka.model_copy(update={"state_dir": tmp_path}), out, duration_s=1.0)
    assert r["classify_rps"] > 0 and r["classify"]["failed"] == 0
    # Across the swap no request may fail for any reason but a full classification queue (503 with Retry-After,
    # the designed answer to overload): on this shared machine another tenant's load during the swap filled the
    # queue in 3 of about 10 runs of one afternoon (10 to 28 of 4,000 requests). How many there were is the
    # benchmark's figure (target 0, ../shared/bin/regressions); this test checks that nothing else went wrong.
    assert r["swap_ok"], r
    assert set(r["swap_failures"]) <= {"HTTP 503"}, r["swap_failures"]
    assert r["swap_failed_requests"] <= 0.02 * r["swap_requests"], r["swap_failures"]
    assert set(r["ratios_to_targets"]) == {"classify_rps", "p99_ms_at_500rps", "batch_msgs_per_s"}
    assert json.loads(out.read_text())["classify_rps"] == r["classify_rps"]


def test_loop_bench_briefly(kafka: Settings, tmp_path: Path) -> None:
    from services.bench.loop import run_loop_bench

    out = tmp_path / "loop.json"
    # more than a few of the worker's batches (batch_max 500), so the rate has an interval to measure
    r = run_loop_bench(kafka.model_copy(update={"state_dir": tmp_path}), out, flags=2, ingest_events=2000,
                       neural=False)
    assert r["ingest_events_per_s"] > 0 and r["ingest_events"] == 2000
    assert len(r["flag_to_serving_s"]) + r["flag_to_serving_not_served"] == 2
    assert json.loads(out.read_text())["targets"] == r["targets"]


def test_flywheel_bench_on_a_quarter_of_the_later_mail(kafka: Settings, tmp_path: Path) -> None:
    from services.bench.flywheel import run_flywheel_bench

    out = tmp_path / "flywheel.json"
    r = run_flywheel_bench(kafka.model_copy(update={"state_dir": tmp_path, "neural_retrain": False}), out,
                           noisy_run=False, every=4)
    assert r["after_one_minus_auc_pct"] < r["before_one_minus_auc_pct"]  # flags on new mail helped unflagged mail
    assert r["flagged"] + r["unflagged"] > 600 and r["clean"]["decisions"]["promoted"] >= 1
    for key in ("before_one_minus_auc_pct", "after_one_minus_auc_pct", "offline_one_minus_auc_pct",
                "after_recall_at_fpr_0_1pct", "offline_recall_at_fpr_0_1pct", "seconds_to_effect",
                "before_fpr_at_verdict", "after_fpr_at_verdict", "after_recall_at_verdict"):
        assert key in r
    assert all({"value", "bound", "ratio", "met"} <= set(c) for c in r["checks"].values())
    assert json.loads(out.read_text())["after_one_minus_auc_pct"] == r["after_one_minus_auc_pct"]


@pytest.mark.alone  # /healthz latency while it stalls JSON bodies
def test_abuse_bench_briefly(kafka: Settings, tmp_path: Path) -> None:
    """The API-side attacks, briefly (the worker-side ones take minutes: a 12 s lock, a 60 s flood, a gate)."""
    from services.bench.abuse import run_abuse_bench

    out = tmp_path / "abuse.json"
    r = run_abuse_bench(kafka.model_copy(update={"state_dir": tmp_path}), out,
                        attacks=["json_stall", "spamd_peer_flood", "batch_starvation"], batch_s=4.0)
    assert r["json_stall_requests"]["header_value"]["status"] == 422  # beyond the cap, answered at once
    assert r["json_stall_requests"]["subject_at_the_cap"]["status"] == 200
    assert r["checks"]["json_stall_healthz_worst_ms"]["met"], r["checks"]
    assert r["checks"]["spamd_peer_flood_verdict"]["met"], r["spamd_peer_flood_answer"]
    assert r["batch_starvation_singles"] > 0 and r["batch_starvation_batches_200"] > 0
    assert set(r["checks"]) == {"json_stall_healthz_worst_ms", "spamd_peer_flood_verdict", "batch_starvation_p99_ms"}
    assert json.loads(out.read_text())["json_stall_healthz_worst_ms"] == r["json_stall_healthz_worst_ms"]
