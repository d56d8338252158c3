"""``flywheel bench loop``: the feedback loop's speed, end to end, on the real broker, API and worker.

The bench runs its own :class:`~services.bench.harness.LocalStack` (fresh state dir, own topics and ports) on the
settings' broker, which it starts when Flywheel manages it, and stops what it started. Three figures:

* ``flag_to_serving_median_s``: from ``POST /feedback`` to the first ``/classify`` answer served by a version
  trained on data that includes the flag (its lineage's ``data_version`` reached the store's once the flag was
  applied): the refit, the gate, the promotion and the API's reload. Sequential flags, median; a flag whose
  every candidate the gate rejected is counted as not served.
* ``ingest_events_per_s``: a burst of valid flags produced while the worker is stopped, then its durable
  processing rate (records applied to the label store per second, from its first to its last record).
* ``neural_cycle_s``: the PyTorch retrain that the burst triggers, from its start to the gate's decision, and
  to the API serving it when it is promoted.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.bench.harness import LocalStack, reporter_keys
from services.local.daemon import wait_until

if TYPE_CHECKING:
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = ["run_loop_bench"]

TARGETS = {"flag_to_serving_median_s": 5.0, "neural_cycle_s": 60.0, "ingest_events_per_s": 2000.0}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_version(stack: LocalStack, version: str | None) -> int:
    if version is None:
        return -1
    try:
        return int(stack.registry().get(version).lineage.get("data_version", -1))
    except Exception:  # noqa: BLE001 - a version being pruned
        return -1


def run_loop_bench(settings: Settings, json_path: Path | None, *, flags: int = 15, ingest_events: int = 12_000,
                   neural: bool = True) -> dict[str, Any]:
    """Run the three measurements; write and return the JSON result."""
    from models.corpus import load_corpus, split_p1
    from streams.events import FeedbackEvent, encode
    from streams.topics import EventProducer, Topics

    root = settings.state_dir / "bench-loop" / time.strftime("%Y%m%dT%H%M%S")
    keys = reporter_keys(64, prefix="k-bench")
    stack = LocalStack(settings, root, api_keys=keys, linear_refit_s=min(settings.linear_refit_s, 1.0),
                       neural_retrain=False)
    corpus = load_corpus(settings.downloads, settings.corpus_dir)
    _, test = split_p1(corpus)
    pool = test[::7]
    result: dict[str, Any] = {"settings": {"feedback_partitions": settings.feedback_partitions,
                                           "linear_refit_s": stack.settings.linear_refit_s}}
    try:
        _say("==> starting worker and API")
        stack.start()
        # 1. flag to serving -------------------------------------------------------------------------------
        _say(f"==> flag to serving ({flags} flags, one at a time)")
        lat: list[float] = []
        not_served = 0
        for i, m in enumerate(pool[:flags]):
            mid = stack.classify(m.raw)["message_id"]
            applied = stack.counters().get("events", 0) + 1
            t0 = time.monotonic()
            r = stack.flag("spam" if m.is_spam else "ham", f"k-bench-{i % 64}", message_id=mid)
            r.raise_for_status()

            def is_applied(applied: int = applied) -> bool:
                return stack.counters().get("events", 0) >= applied

            wait_until(is_applied, 30, "the flag to be applied", 0.01)
            needed = stack.counters().get("data_version", 0)

            def served(needed: int = needed, raw: bytes = m.raw) -> bool:
                return _data_version(stack, stack.classify(raw)["model"]["version"]) >= needed

            try:
                wait_until(served, 30, "the flag to be served", 0.02)
            except TimeoutError:  # the gate rejected every candidate with this flag: report it, go on
                not_served += 1
                continue
            lat.append(time.monotonic() - t0)
        result["flag_to_serving_s"] = [round(x, 3) for x in lat]
        result["flag_to_serving_not_served"] = not_served
        result["flag_to_serving_median_s"] = round(statistics.median(lat), 3) if lat else None
        _say(f"    median {result['flag_to_serving_median_s']} s ({not_served} of {flags} not served)")

        # 2. ingestion -------------------------------------------------------------------------------------
        _say(f"==> ingestion ({ingest_events} flags produced while the worker is stopped)")
        msgs = [m for m in test if m not in pool[:flags]]
        items: list[tuple[str, bytes]] = []
        i = 0
        while len(items) < ingest_events:
            m = msgs[i % len(msgs)]
            ev = FeedbackEvent.create(label="spam" if m.is_spam else "ham", reporter=f"ingest{i // len(msgs)}",
                                      raw=m.raw)
            items.append((ev.message_id, encode(ev)))
            i += 1
        stack.worker.stop()
        base = stack.counters().get("events", 0)
        producer = EventProducer(stack.settings.streams(), timeout_s=30.0)
        try:
            for lo in range(0, len(items), 2000):
                producer.send_many(Topics.from_config(stack.settings.streams()).feedback, items[lo : lo + 2000])
        finally:
            producer.close()
        stack.worker.extra_env.update(stack.settings.model_copy(update={"neural_retrain": neural}).child_env())
        stack.worker.start()
        wait_until(lambda: stack.counters().get("events", 0) > base, 300, "the worker to start consuming", 0.01)
        t_first = time.monotonic()
        first_count = stack.counters().get("events", 0)
        wait_until(lambda: stack.counters().get("events", 0) >= base + ingest_events, 600, "the burst", 0.02)
        t_last = time.monotonic()
        result["ingest_events"] = ingest_events
        # The rate counts from the first batch seen applied to the last: a burst the worker takes in one batch
        # (under batch_max records) has no interval to measure, so it has no rate rather than a rate of 0.
        rest = base + ingest_events - first_count
        result["ingest_events_per_s"] = round(rest / max(1e-9, t_last - t_first), 1) if rest > 0 else None
        _say(f"    {result['ingest_events_per_s']} events/s")

        # 3. neural cycle ----------------------------------------------------------------------------------
        if neural:
            _say("==> neural cycle (train, gate, and serving when promoted)")
            reg = stack.registry()

            def neural_decision() -> dict[str, Any] | None:
                return next((d for d in reversed(reg.decisions()) if d.get("kind") == "neural"), None)

            d = wait_until(neural_decision, 900, "the neural challenger's gate decision", 0.5)
            info = reg.get(d["challenger"])
            decided_at = datetime.fromisoformat(d["at"].replace("Z", "+00:00")).timestamp()
            started_at = decided_at - float(info.lineage.get("training_s", 0.0))
            result["neural_decision"] = d["decision"]
            result["neural_reason"] = d["reason"]
            result["neural_train_examples"] = info.lineage.get("counts")
            result["neural_training_s"] = info.lineage.get("training_s")
            result["neural_to_decision_s"] = round(decided_at - started_at, 2)
            result["neural_cycle_s"] = None
            if d["decision"] == "promoted":
                def api_serves() -> bool:
                    return stack.classify(pool[0].raw)["model"]["version"] == d["challenger"]

                try:
                    wait_until(api_serves, 60, "the API to serve the neural version", 0.02)
                    result["neural_cycle_s"] = round(time.time() - started_at, 2)
                except TimeoutError:  # a fresher linear refit replaced it first
                    pass
            _say(f"    neural: {d['decision']} ({d['reason']}); training {result['neural_training_s']} s, "
                 f"cycle {result['neural_cycle_s']} s")
    finally:
        stack.stop()
    result["targets"] = TARGETS
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result
