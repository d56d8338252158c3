"""The worker's series stay bounded whatever clients invent: reporters and served versions."""

from __future__ import annotations

import pytest

from services.worker.metrics import Backlog, WorkerMetrics

pytestmark = pytest.mark.unit


def _series(m: WorkerMetrics, name: str) -> list[dict[str, str]]:
    return [s.labels for fam in m.registry.collect() for s in fam.samples if s.name == name]


def test_reporter_weights_show_only_the_extremes_and_count_every_band() -> None:
    m = WorkerMetrics(reporters_max=6)
    reporters = [(f"r{i}", 0.05 + i * 0.02, 10) for i in range(100)]  # one invented identity per flag
    m.set_reporters(reporters, bar=1.0)
    shown = {s["reporter"] for s in _series(m, "flywheel_reporter_weight")}
    assert shown == {"r0", "r1", "r2", "r97", "r98", "r99"}
    bands = {s["band"]: m.registry.get_sample_value("flywheel_reporters", {"band": s["band"]})
             for s in _series(m, "flywheel_reporters")}
    assert sum(bands.values()) == 100 and bands["distrusted"] == 23  # weights below half the bar
    m.set_reporters(reporters[:3], bar=1.0)  # gone reporters lose their series
    assert {s["reporter"] for s in _series(m, "flywheel_reporter_weight")} == {"r0", "r1", "r2"}


def test_live_verdict_series_keep_only_the_newest_versions() -> None:
    m = WorkerMetrics(versions_max=3)
    for v in range(10):
        m.count_live({(f"v{v}", "fp"): 1, (f"v{v}", "tn"): 5})
    versions = {s["version"] for s in _series(m, "flywheel_live_verdicts_total")}
    assert versions == {"v7", "v8", "v9"}
    assert m.registry.get_sample_value("flywheel_live_verdicts_total", {"version": "v9", "outcome": "tn"}) == 5
    assert m.registry.get_sample_value("flywheel_live_verdicts_total", {"version": "v9", "outcome": "fn"}) == 0


def test_the_champion_series_follows_the_champion() -> None:
    m = WorkerMetrics()
    m.set_champion("a", "linear", 100.0)
    m.set_champion("b", "neural", 200.0)
    assert [s["version"] for s in _series(m, "flywheel_champion_info")] == ["b"]
    assert m.registry.get_sample_value("flywheel_champion_promoted_timestamp_seconds") == 200.0


def test_a_backlog_holds_background_passes_back_but_lets_one_through_every_max_wait() -> None:
    now = [0.0]
    b = Backlog(threshold=100, max_wait_s=30.0, clock=lambda: now[0])
    assert not b.defer("learner")  # no lag measured yet: passes run
    b.update(5_000)
    assert b.defer("learner") and b.defer("campaign")  # a backlog: both wait
    now[0] = 29.0
    assert b.defer("learner")
    now[0] = 30.0
    assert not b.defer("learner")  # a flood that never ends still gets a pass every max_wait_s...
    assert b.defer("learner")  # ...one
    assert not b.defer("campaign")  # each task has its own clock
    b.update(100)  # at the threshold: caught up, everything runs
    assert not b.defer("learner") and not b.defer("learner") and not b.defer("campaign")
    b.update(101)
    assert b.defer("learner")  # a new backlog starts its wait afresh


def test_a_worker_awaiting_its_first_measurement_counts_as_behind() -> None:
    now = [0.0]
    b = Backlog(threshold=100, max_wait_s=30.0, awaiting=True, clock=lambda: now[0])
    assert b.lag is None and b.defer("learner")  # a restart's first refit waits for the lag
    now[0] = 30.0
    assert not b.defer("learner")  # bounded: a consumer that never gets partitions does not stop learning
    b.update(0)
    assert not b.defer("learner") and not b.defer("learner")


def test_the_backlog_says_when_it_starts_and_ends_from_the_first_measurement_on() -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        Backlog(threshold=100, max_wait_s=30.0, awaiting=True).update(5_000)  # a restart behind a burst
        quiet = Backlog(threshold=100, max_wait_s=30.0, awaiting=True)
        quiet.update(3)
        quiet.update(50)  # no change: nothing said
        quiet.update(101)
        quiet.update(0)
    assert [e["event"] for e in logs] == ["catching up on a backlog: background passes wait",
                                         "no backlog: background passes run",
                                         "catching up on a backlog: background passes wait", "backlog applied"]
