"""The worker process: the faust handler that applies flags durably, the learner, the metrics page.

Ingest and learning run on different threads: a batch of records is applied to the store in one transaction on
the ingest thread (faust acknowledges it only after that), and the learner catches up in the background (a burst
of flags makes the models lag for a moment, never the consumer). ``flywheel worker`` (or
``python -m services.worker``) runs it until SIGTERM.

A store that refuses a batch (``database is locked`` while a backup or another process holds it, a full disk) is
retried with backoff for up to ``worker_store_retry_s``, loudly (``flywheel_worker_store_errors_total``, the
``flywheel_worker_store_ok`` gauge, an error line per attempt); nothing after the batch is consumed meanwhile.
Past that bound the worker exits without acknowledging the batch (``streams.app.exit_unacknowledged``) and
restarts from its committed offsets: consuming on would acknowledge flags nobody stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import structlog

from services.worker.data import CorpusData, corpus_data
from services.worker.learner import Learner
from services.worker.metrics import Backlog, WorkerMetrics
from services.worker.store import BatchResult, LabelStore
from streams.records import Record

if TYPE_CHECKING:
    import faust

    from services.settings import Settings
    from services.worker.campaign import CampaignPublisher
    from streams.events import ModelEvent

log = structlog.get_logger(__name__)

__all__ = ["StoreUnavailable", "Worker", "await_kafka", "main", "run_worker", "store_error_cause"]

STATUS_EVERY_S = 2.0
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.DatabaseError, OSError)
"""What a store may raise for reasons outside the batch (a lock held elsewhere, a full or failing disk)."""
STORE_BACKOFF_S = (0.5, 10.0)
"""First and longest wait between two attempts at a batch the store refused (doubling in between)."""


class StoreUnavailable(RuntimeError):
    """The store refused a batch for longer than ``worker_store_retry_s`` (or while the worker stops)."""


def store_error_cause(exc: BaseException) -> str:
    """A bounded label for ``flywheel_worker_store_errors_total``: locked, disk_full, io, journal (Kafka did not
    acknowledge the batch's journal entry) or other."""
    from streams.topics import BrokerUnavailable

    if isinstance(exc, BrokerUnavailable):
        return "journal"
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
        return "locked"
    if "full" in text or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
        return "disk_full"
    if isinstance(exc, OSError) or "disk i/o" in text:
        return "io"
    return "other"


class Worker:
    """The faust app's handler (see ``streams.app.BatchHandler``): applies batches, dead-letters, learns."""

    def __init__(
        self,
        settings: Settings,
        *,
        corpus: CorpusData | None = None,
        serve_metrics: bool = True,
        learn: bool = True,
    ) -> None:
        from streams.journal import JournalWriter
        from streams.topics import EventProducer, Topics

        self.settings = settings
        self.topics = Topics.from_config(settings.streams())
        self.metrics = WorkerMetrics(reporters_max=settings.reporter_metrics_max, versions_max=settings.registry_keep)
        if serve_metrics:
            self.metrics.serve(settings.worker_port, settings.worker_host)
        self.store = LabelStore(settings.state_dir / "worker" / "labels.db", min_weight=settings.consensus_min_weight,
                                quota_bytes=settings.store_quota_bytes, reporter_share=settings.store_reporter_share,
                                source_share=settings.store_source_share)
        self.metrics.store_quota.set(settings.store_quota_bytes)
        self.producer = EventProducer(settings.streams(), timeout_s=5.0, client_id="flywheel-worker")
        self.journal = JournalWriter(self.producer, self.topics.journal)
        if settings.worker_rebuild and self.store.is_empty():
            from services.worker.journal import rebuild_store

            await_kafka(settings)
            rebuild_store(settings, self.store)
        self.backlog = Backlog(settings.worker_catch_up_lag, settings.worker_catch_up_max_s, awaiting=learn)
        self.learner: Learner | None = None
        if learn:
            self.learner = Learner(settings, self.store, self.metrics, self._emit_model_event,
                                   corpus if corpus is not None else corpus_data(settings), self.journal,
                                   backlog=self.backlog)
            if self.learner.registry.champion() is None:
                self.learner.refit()  # a fresh registry: the base model becomes the first champion
            self.learner.show_champion()
            self.learner.update_quality()
            self.learner.start()
        self.campaign: CampaignPublisher | None = None
        if learn and settings.campaign_memory and self.learner is not None:
            from services.worker.campaign import CampaignPublisher

            self.campaign = CampaignPublisher(settings, self.store, self.learner, self.producer, self.metrics)
            self.campaign.start()
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        self._closing = threading.Event()  # set at shutdown: a batch still refused is given up, unacknowledged
        self._app: faust.App | None = None
        for label in self.store.label_counts():
            self.metrics.labels.labels(label=label).inc(0)
        self.metrics.count_live(self.store.live_tallies())
        self.metrics.set_reporters(self.store.reporters(), settings.consensus_min_weight)
        self.metrics.data_version.set(self.store.data_version)
        self._measure_store()
        self._status_at = 0.0
        self._published_champion: str | None = None  # on the models topic (streams.models) by this process
        self.publish_champion()  # replicas on an empty disk wait for it; ticks retry if Kafka is down now
        self.publish_status()

    def publish_status(self) -> None:
        """The worker's summary for operators (the API's operator page reads it from the shared registry)."""
        from models.registry import Registry

        self._measure_store()
        reporters = sorted(self.store.reporters(), key=lambda r: (r[1], r[0]))
        bar = self.settings.consensus_min_weight
        live = self.store.live_tallies()
        versions = sorted({v for v, _ in live})[-self.settings.registry_keep :]
        Registry(self.settings.registry).write_worker_status({
            "counters": self.store.counters(),
            "labels": self.store.label_counts(),
            "reporters": {
                "total": len(reporters),
                "distrusted": sum(w < 0.5 * bar for _, w, _ in reporters),
                "lowest": [{"reporter": r, "weight": w, "flags": n, "reliability": self.store.reporter_reliability(r)}
                           for r, w, n in reporters[:10]],
                "highest": [{"reporter": r, "weight": w, "flags": n, "reliability": self.store.reporter_reliability(r)}
                            for r, w, n in reversed(reporters[-10:])],
            },
            "live_verdicts": {v: {o: live.get((v, o), 0) for o in ("tp", "fp", "tn", "fn")} for v in versions},
        })
        self._status_at = time.monotonic()

    def _measure_store(self) -> None:
        """The store's size (raw mail kept, the file) and the free disk under it, for the quota and disk alerts."""
        import shutil

        self.metrics.store_bytes.labels(part="raw").set(self.store.raw_bytes())
        self.metrics.store_bytes.labels(part="file").set(self.store.file_bytes())
        try:
            self.metrics.disk_free.set(shutil.disk_usage(self.store.path.parent).free)
        except OSError as exc:
            log.warning("free disk not measured", error=str(exc))

    def publish_champion(self) -> bool:
        """Put the champion on the models topic, its files before the pointer, when it changed since this process
        last did (at start: always, so a replica on an empty disk finds it however the topic was compacted).

        API replicas with ``model_source=kafka`` follow the topic instead of sharing the registry directory; a
        promotion by the gate and an operator's ``flywheel models promote|rollback`` reach them the same way.
        Returns whether it published (False: nothing changed, or Kafka is down and the next tick retries)."""
        from models.registry import Registry, RegistryError
        from streams.models import champion_record, version_records
        from streams.topics import BrokerUnavailable

        if not self.settings.publish_models:
            return False
        registry = Registry(self.settings.registry)
        champion = registry.champion()
        if champion is None or champion == self._published_champion:
            return False
        ledger_path = self.settings.state_dir / "worker" / "models-published.json"
        try:
            ledger: dict[str, list[str]] = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
        except (OSError, ValueError):
            ledger = {}
        try:
            records = version_records(champion, registry.version_files(champion))
            history = registry.history()
            reason = str(history[-1].get("reason", "")) if history else ""
            # versions this worker published that its registry has pruned since: withdrawn (tombstones), so the
            # compacted topic holds what the registry holds, not every version ever promoted
            gone = [v for v in ledger if v != champion and not (registry.versions_dir / v).is_dir()]
            tombstones: list[tuple[str | bytes | None, bytes | None]] = [(k, None) for v in gone for k in ledger[v]]
            self.producer.send_many(self.topics.models, [*records, champion_record(champion, reason), *tombstones])
        except (RegistryError, OSError) as exc:
            log.error("champion not published", version=champion, error=str(exc))
            return False
        except BrokerUnavailable as exc:
            log.warning("champion not published yet (Kafka down)", version=champion, error=str(exc))
            return False
        self._published_champion = champion
        ledger = {v: keys for v, keys in ledger.items() if v not in gone}
        ledger[champion] = [k for k, _ in records]
        try:
            tmp = ledger_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(ledger))
            os.replace(tmp, ledger_path)
        except OSError as exc:
            log.warning("models ledger not saved", error=str(exc))
        log.info("champion published on the models topic", version=champion, records=len(records) + 1,
                 withdrawn=gone)
        return True

    def _emit_model_event(self, event: ModelEvent) -> None:
        from streams.topics import BrokerUnavailable

        try:
            self.producer.send(self.topics.model_events, event.version, event)
        except BrokerUnavailable:
            log.warning("model event not published (Kafka down); the registry has the decision", version=event.version)

    # -- the BatchHandler protocol --------------------------------------------------------------------
    async def on_start(self, app: faust.App) -> None:
        self._app = app

    async def handle(self, records: Sequence[Record]) -> None:
        self._update_lag()  # a backlog is known from its first batch, before the learner's next pass (see Backlog)
        fut = self._exec.submit(self.process, list(records))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            # Stopping mid-batch: faust acknowledges the batch as the agent unwinds, so it must be stored first
            # (or the process must end unacknowledged). Give up retrying, then wait for the outcome.
            self._closing.set()
            concurrent.futures.wait([fut])
            exc = fut.exception()
            if exc is not None:
                from streams.app import exit_unacknowledged

                exit_unacknowledged(records, exc)
            raise

    async def tick(self) -> None:
        if self.learner is not None:
            self.learner.wake()
        self._update_lag()
        if self.settings.publish_models:
            await asyncio.get_running_loop().run_in_executor(None, self.publish_champion)
        if time.monotonic() - self._status_at >= STATUS_EVERY_S:
            try:
                await asyncio.get_running_loop().run_in_executor(self._exec, self.publish_status)
            except STORE_ERRORS as exc:  # the status page waits for the store like everything else
                log.warning("worker status not published", error=str(exc))
                self._status_at = time.monotonic()

    # -- work (ingest thread) -------------------------------------------------------------------------
    def apply_durably(self, records: list[Record]) -> BatchResult:
        """Apply a batch, retrying while the store refuses it (see the module docstring); ``StoreUnavailable``
        past ``worker_store_retry_s`` or at shutdown. Retrying is exact: the store's offset filter skips any
        record a failed attempt did commit. The batch's journal entry is acknowledged before the store commits;
        Kafka not acknowledging it is retried the same way (an entry whose commit failed is never replayed)."""
        from services.worker.journal import apply_journaled
        from streams.topics import BrokerUnavailable

        retryable: tuple[type[BaseException], ...] = (*STORE_ERRORS, BrokerUnavailable)
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                res = apply_journaled(self.store, self.journal, records)
            except retryable as exc:
                attempt += 1
                cause = store_error_cause(exc)
                self.metrics.store_errors.labels(error=cause).inc()
                self.metrics.store_ok.set(0)
                waited = time.monotonic() - start
                first = records[0] if records else None
                where = {"partition": first.partition if first else None,
                         "first_offset": first.offset if first else None, "records": len(records)}
                left = self.settings.worker_store_retry_s - waited
                if left <= 0 or self._closing.is_set():
                    log.critical("store refused a batch; giving up", error=str(exc), cause=cause, attempts=attempt,
                                 waited_s=round(waited, 1), **where)
                    raise StoreUnavailable(f"the store refused a batch for {waited:.0f}s: {exc}") from exc
                delay = min(STORE_BACKOFF_S[1], STORE_BACKOFF_S[0] * 2 ** (attempt - 1), left)
                log.error("store refused a batch; retrying", error=str(exc), cause=cause, attempt=attempt,
                          retry_in_s=round(delay, 2), waited_s=round(waited, 1), **where)
                if self._closing.wait(delay):
                    continue  # one last attempt, then give up (above)
                continue
            if attempt:
                log.warning("store accepts batches again", attempts=attempt,
                            waited_s=round(time.monotonic() - start, 1))
            self.metrics.store_ok.set(1)
            return res

    def process(self, records: list[Record]) -> BatchResult:
        res = self.apply_durably(records)
        try:
            self._after_batch(res)
        except STORE_ERRORS as exc:  # the batch is stored; metrics that read the store catch up on the next one
            log.warning("metrics after a batch not updated", error=str(exc))
        return res

    def _after_batch(self, res: BatchResult) -> None:
        self._dead_letter(res.dead)
        m = self.metrics
        if res.skipped:
            m.events.labels(type="any", outcome="redelivered").inc(res.skipped)
        if res.accepted_flags:
            m.events.labels(type="feedback", outcome="accepted").inc(res.accepted_flags)
        if res.duplicates:
            m.events.labels(type="feedback", outcome="duplicate").inc(res.duplicates)
        if res.retractions:
            m.events.labels(type="retraction", outcome="accepted").inc(res.retractions)
        if res.dead:
            m.events.labels(type="any", outcome="dead_letter").inc(len(res.dead))
        for label, n in res.new_labels.items():
            if n:
                m.labels.labels(label=label).inc(n)
        if res.live:
            m.count_live(res.live)
        for share, n in res.dropped_bytes.items():
            m.store_dropped.labels(share=share).inc(n)
        if res.touched_reporters:
            m.set_reporters(self.store.reporters(), self.settings.consensus_min_weight)
        m.data_version.set(self.store.data_version)
        if self.learner is not None:
            self.learner.wake()

    def _dead_letter(self, dead: list[tuple[Record, str]]) -> None:
        from streams.events import dead_letter
        from streams.topics import BrokerUnavailable

        if not dead:
            return
        items = [(r.key, dead_letter(r.value, reason, r.topic, r.partition, r.offset)) for r, reason in dead]
        for attempt in range(30):
            try:
                self.producer.send_many(self.topics.dead_letter, items)
                break
            except BrokerUnavailable:
                time.sleep(min(2.0, 0.2 * (attempt + 1)))
        else:
            log.error("dead letters not delivered", count=len(items))
        for r, reason in dead:
            log.warning("dead letter", partition=r.partition, offset=r.offset, reason=reason)

    def _update_lag(self) -> None:
        app = self._app
        if app is None:
            return
        try:
            consumer = app.consumer
            offsets = self.store.last_offsets()
            lag = 0
            measured = bool(consumer.assignment())  # a lag only once partitions are assigned and their ends known
            for tp in consumer.assignment():
                hw = consumer.highwater(tp)
                if hw is None:
                    measured = False
                else:
                    lag += max(0, int(hw) - 1 - offsets.get((tp.topic, tp.partition), -1))
            self.metrics.lag.set(lag)
            if measured:
                self.backlog.update(lag)
        except Exception:  # lag is best effort
            log.debug("lag update failed", exc_info=True)

    def close(self) -> None:
        self._closing.set()
        self._exec.shutdown(wait=True)
        if self.campaign is not None:
            self.campaign.stop()
        if self.learner is not None:
            self.learner.stop()
        self.producer.close()
        self.store.close()


def run_worker(settings: Settings, *, learn: bool = True) -> None:
    """``flywheel worker``: consume feedback until SIGTERM/SIGINT (the broker and topics must exist).

    ``learn=False`` ingests only (labels, reputations, dead letters; no models): for tests of delivery.
    """
    from streams.app import make_app, run_app

    worker = Worker(settings, learn=learn)
    try:
        await_kafka(settings)
        # The learner refits at most every linear_refit_s: ticking at half that (within 0.2-1 s) keeps it on time.
        app = make_app(settings.streams(), worker, tick_s=max(0.2, min(1.0, settings.linear_refit_s / 2)))
        log.info("worker starting", feedback=worker.topics.feedback, metrics_port=settings.worker_port,
                 labels=worker.store.label_counts(), learn=learn)
        run_app(app, loglevel=settings.log_level)
    finally:
        worker.close()


def await_kafka(settings: Settings, log_every_s: float = 5.0) -> None:
    """Return once the broker answers; ``SystemExit`` naming the setting after ``kafka_start_timeout_s``.

    faust exits on its first failed bootstrap, so a worker started while the broker restarts (or before it, in
    any orchestration) would die at once. Waiting a bounded time, and saying so, is what a supervisor expects;
    once running, the consumer reconnects by itself.
    """
    from streams.admin import answers_metadata

    deadline_s = settings.kafka_start_timeout_s
    start = time.monotonic()
    next_log = start
    while not answers_metadata(settings.streams(), timeout_s=2.0):
        now = time.monotonic()
        if now >= next_log:
            log.warning("waiting for kafka", bootstrap=settings.bootstrap_servers, waited_s=round(now - start, 1),
                        deadline_s=deadline_s)
            next_log = now + log_every_s
        if now - start >= deadline_s:
            raise SystemExit(f"Kafka did not answer at {settings.bootstrap_servers} within {deadline_s:g}s "
                             "(FLYWHEEL_KAFKA_START_TIMEOUT_S); the worker exits")
        time.sleep(min(1.0, start + deadline_s - now))


def main() -> None:
    """``python -m services.worker`` (what the tests start and ``kill -9``)."""
    from services.logging import configure
    from services.settings import get_settings

    s = get_settings()
    configure(s.log_level, s.log_json)
    run_worker(s, learn="--ingest-only" not in sys.argv[1:])
