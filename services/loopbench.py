"""``flywheel bench loop``: the feedback loop measured end to end on the real broker, API and worker.

The bench starts its own API and worker processes (a fresh state dir under ``<state_dir>/bench-loop``, its own
topic prefix and ports) on the settings' broker, which it starts when Flywheel manages it, and stops what it
started. Three figures:

* ``flag_to_serving_median_s``: from ``POST /feedback`` to the first ``/classify`` answer served by a model
  version whose lineage includes that flag (the incremental model was updated, gated, promoted, reloaded);
  sequential flags, median.
* ``ingest_events_per_s``: a burst of valid flags produced up front, then the worker's durable processing
  rate (records applied to the label store per second, from its first to its last record).
* ``neural_cycle_s``: from the start of the PyTorch retrain (triggered by the label count) through training
  on the consensus set plus the corpus's earlier period, the gate and the promotion, until the API serves it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.settings import REPO_ROOT
from services.daemon import free_port, wait_until

if TYPE_CHECKING:
    from services.settings import Settings

log = structlog.get_logger(__name__)

BENCH_KEYS = {**{f"k-bench-{i}": f"bench{i}" for i in range(64)}, "dev-admin-key": "admin"}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Proc:
    def __init__(self, settings: Settings, argv: list[str], logfile: Path) -> None:
        from services.api.app import settings_env

        self.argv, self.logfile = argv, logfile
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=self.env, stdout=self.logfile.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _counters(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return dict(conn.execute("SELECT name, value FROM counters").fetchall())
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return {}


def run_loop_bench(
    settings: Settings,
    json_path: Path | None,
    *,
    flags: int = 15,
    ingest_events: int = 12_000,
    neural: bool = True,
) -> dict[str, Any]:
    """Run the three measurements; write and return the JSON result."""
    import httpx

    from models.corpus import load_corpus, split_p1
    from models.registry import Registry
    from services.worker import corpus_sets, is_holdout
    from streams import broker
    from streams.events import FeedbackEvent, encode, message_id_for
    from streams.topics import EventProducer, Topics, topic_specs

    root = settings.state_dir / "bench-loop" / time.strftime("%Y%m%dT%H%M%S")
    s = settings.model_copy(update={
        "state_dir": root, "registry_dir": None, "rules_path": None,
        "downloads_dir": settings.downloads, "topic_prefix": f"bench{uuid.uuid4().hex[:6]}",
        "api_port": free_port(), "spamd_port": free_port(), "worker_port": free_port(), "api_keys": BENCH_KEYS,
        "linear_publish_s": min(settings.linear_publish_s, 1.0), "model_poll_s": min(settings.model_poll_s, 0.5),
        "neural_retrain_every": 10**9,
    })
    started_broker = False
    if s.manages_kafka and not broker.answers_metadata(s.bootstrap_servers, 2.0):
        broker.start(s)
        started_broker = True
    broker.ensure_topics(s, topic_specs(s))
    topics = Topics.from_settings(s)
    corpus = load_corpus(s.downloads, s.corpus_dir)
    evals, train = corpus_sets(s)
    in_eval = {mid for mid, _, _ in evals}
    _, test = split_p1(corpus)
    pool = [m for m in test if message_id_for(m.raw) not in in_eval and not is_holdout(message_id_for(m.raw))]
    result: dict[str, Any] = {"settings": {"feedback_partitions": s.feedback_partitions,
                                           "linear_publish_every": s.linear_publish_every,
                                           "linear_publish_s": s.linear_publish_s, "cpus": os.cpu_count()}}
    db = root / "worker" / "labels.db"
    reg = Registry(s.registry)

    def run_worker(retrain_every: int) -> _Proc:
        ws = s.model_copy(update={"neural_retrain_every": retrain_every})
        p = _Proc(ws, [sys.executable, "-m", "services.worker"], root / "worker.log")
        p.start()
        return p

    worker = run_worker(10**9)
    api = _Proc(s, [sys.executable, "-m", "services.api"], root / "api.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{s.api_port}", timeout=30.0)
    try:
        _say("==> starting worker and API")
        wait_until(lambda: reg.champion() is not None, 300, "the worker's bootstrap champion", 0.5)
        api.start()
        wait_until(lambda: _ok(http, "/readyz"), 300, "the API", 0.5)

        # 1. flag to serving -------------------------------------------------------------------------
        _say(f"==> flag to serving ({flags} flags, one at a time)")
        lat: list[float] = []
        not_served = 0
        for i, m in enumerate(pool[:flags]):
            r = http.post("/classify", content=m.raw, headers={"content-type": "message/rfc822"})
            mid = r.json()["message_id"]
            learned_before = _learned(reg)
            t0 = time.monotonic()
            fr = http.post("/feedback", json={"label": "spam" if m.is_spam else "ham", "message_id": mid},
                           headers={"X-API-Key": f"k-bench-{i % 64}"})
            fr.raise_for_status()

            def served() -> bool:
                v = http.post("/classify", content=m.raw, headers={"content-type": "message/rfc822"}).json()["model"]["version"]
                return _learned(reg, v) > learned_before

            try:
                wait_until(served, 30, "the flag to be served", 0.02)
            except TimeoutError:  # the gate rejected every candidate with this flag: report it, go on
                not_served += 1
                continue
            lat.append(time.monotonic() - t0)
        result["flag_to_serving_s"] = [round(x, 3) for x in lat]
        result["flag_to_serving_not_served"] = not_served
        result["flag_to_serving_median_s"] = round(statistics.median(lat), 3) if lat else None
        _say(f"    median {result['flag_to_serving_median_s']} s")

        # 2. ingestion -------------------------------------------------------------------------------
        _say(f"==> ingestion ({ingest_events} flags produced up front)")
        # Every later-period message (the gate keeps its held-out share): ~6,000 training examples with the
        # corpus's earlier period for the neural cycle below.
        msgs = [m for m in test if m not in pool[:flags]]
        items: list[tuple[str, bytes]] = []
        i = 0
        while len(items) < ingest_events:
            m = msgs[i % len(msgs)]
            ev = FeedbackEvent.create(label="spam" if m.is_spam else "ham", reporter=f"ingest{i // len(msgs)}",
                                      raw=m.raw)
            items.append((ev.message_id, encode(ev)))
            i += 1
        worker.stop()  # produce the burst while the worker is stopped: it then drains a full backlog
        base = _counters(db).get("events", 0)
        producer = EventProducer(s, timeout_s=30.0)
        try:
            for lo in range(0, len(items), 2000):
                producer.send_many(topics.feedback, items[lo : lo + 2000])
        finally:
            producer.close()
        # The neural retrain triggers once these labels are in (one cycle, measured below).
        distinct = len({k for k, _ in items})
        worker = run_worker(retrain_every=max(1, int(0.85 * distinct)))
        wait_until(lambda: _counters(db).get("events", 0) > base, 300, "the worker to start consuming", 0.01)
        t_first = time.monotonic()
        first_count = _counters(db).get("events", 0)
        wait_until(lambda: _counters(db).get("events", 0) >= base + ingest_events, 600, "the burst to be ingested", 0.02)
        t_last = time.monotonic()
        done = base + ingest_events - first_count
        result["ingest_events"] = ingest_events
        result["ingest_events_per_s"] = round(done / max(1e-9, t_last - t_first), 1)
        _say(f"    {result['ingest_events_per_s']} events/s")

        # 3. neural cycle ----------------------------------------------------------------------------
        if neural:
            _say("==> neural cycle (train, gate, promote, reload)")

            def neural_decision() -> dict[str, Any] | None:
                for d in reversed(reg.decisions()):
                    if d.get("kind") == "neural":
                        return d
                return None

            d = wait_until(neural_decision, 900, "the neural challenger's gate decision", 0.2)
            info = reg.get(d["challenger"])
            t_start = float(info.lineage.get("started_at_epoch", 0.0))
            result["neural_decision"] = d["decision"]
            result["neural_reason"] = d["reason"]
            result["neural_train_examples"] = sum(info.lineage.get("counts", {}).values())
            result["neural_training_s"] = info.lineage.get("training_s")
            if d["decision"] == "promoted":
                probe = pool[0].raw

                def api_serves() -> bool:
                    r = http.post("/classify", content=probe, headers={"content-type": "message/rfc822"})
                    return r.json()["model"]["version"] == d["challenger"]

                try:
                    wait_until(api_serves, 60, "the API to serve the neural version", 0.02)
                    result["neural_cycle_s"] = round(time.time() - t_start, 2)
                except TimeoutError:
                    # A faster linear candidate may already have replaced it: count until its promotion.
                    result["neural_cycle_s"] = None
            else:
                result["neural_cycle_s"] = None
            _say(f"    neural: {result['neural_decision']} ({result['neural_reason']}), cycle {result['neural_cycle_s']} s")
    finally:
        http.close()
        api.stop()
        worker.stop()
        if started_broker:
            broker.stop(s)
    result["targets"] = {"flag_to_serving_median_s": 5.0, "neural_cycle_s": 60.0, "ingest_events_per_s": 2000.0}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


def _ok(http: Any, path: str) -> bool:
    try:
        return http.get(path).status_code == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _learned(reg: Any, version: str | None = None) -> int:
    """How many labels the given (default: champion) version's lineage covers (learn-log sequence)."""
    v = version or reg.champion()
    if v is None:
        return -1
    try:
        return int(reg.get(v).lineage.get("learn_log_seq", -1))
    except Exception:  # noqa: BLE001 - a version being pruned
        return -1
