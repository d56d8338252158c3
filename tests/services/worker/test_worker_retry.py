"""The worker's ingest retries a store that refuses a batch (a full disk, a lock, a failing disk) with backoff,
counting each refusal by cause, and gives up after ``worker_store_retry_s`` by raising (the app then exits
without acknowledging; see tests/services/worker/test_store_errors.py for the real broker and lock)."""

from __future__ import annotations

import errno
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import make_settings

from services.worker.app import StoreUnavailable, Worker, store_error_cause
from services.worker.metrics import WorkerMetrics
from services.worker.store import BatchResult, LabelStore
from streams.events import FeedbackEvent, encode
from streams.journal import JournalWriter, decode_entry
from streams.records import Record

pytestmark = pytest.mark.unit


class FailingStore(LabelStore):
    """A real store whose first ``failures`` writes raise ``error`` (what SQLite raises on a full disk)."""

    def __init__(self, path: Path, error: BaseException, failures: int) -> None:
        super().__init__(path)
        self.error, self.failures, self.attempts = error, failures, 0

    def apply(self, records, model_probability=None, journal_at=None) -> BatchResult:  # type: ignore[no-untyped-def,override]
        self.attempts += 1
        if self.attempts <= self.failures:
            raise self.error
        return super().apply(records, model_probability, journal_at)


class JournalTopic:
    """The journal's topic as the producer sees it: entries appended, each acknowledged with its offset."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []

    def send_bytes(self, topic: str, key: object, value: bytes) -> tuple[int, int]:
        self.entries.append(value)
        return 0, len(self.entries) - 1


def _worker(tmp_path: Path, store: LabelStore, retry_s: float) -> Worker:
    """The ingest half of a worker: settings, metrics and the store (no Kafka, no learner)."""
    w = Worker.__new__(Worker)
    w.settings = make_settings(tmp_path, worker_store_retry_s=retry_s)
    w.metrics = WorkerMetrics()
    w.store = store
    w.journal = JournalWriter(JournalTopic(), "t.worker-journal")  # type: ignore[arg-type]
    w._closing = threading.Event()
    return w


def _records(n: int) -> list[Record]:
    evs = [FeedbackEvent.create(label="spam", reporter="u", raw=f"Subject: {i}\r\n\r\nx".encode()) for i in range(n)]
    return [Record("t.feedback", 0, i, None, encode(e)) for i, e in enumerate(evs)]


def test_a_full_disk_is_retried_counted_and_the_batch_stored_once_it_clears(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.worker.app.STORE_BACKOFF_S", (0.01, 0.05))
    store = FailingStore(tmp_path / "labels.db", sqlite3.OperationalError("database or disk is full"), failures=3)
    w = _worker(tmp_path, store, retry_s=30.0)
    res = w.apply_durably(_records(5))
    assert res.accepted_flags == 5 and store.attempts == 4 and store.vote_count() == 5
    # an entry per attempt, each naming the last committed one (none yet); the store keeps the one that committed
    entries = [decode_entry(e) for e in w.journal.producer.entries]  # type: ignore[attr-defined]
    assert len(entries) == 4 and {e.prev for e in entries} == {-1} and store.journal_prev() == 3
    assert w.metrics.registry.get_sample_value("flywheel_worker_store_errors_total", {"error": "disk_full"}) == 3
    assert w.metrics.registry.get_sample_value("flywheel_worker_store_ok") == 1
    store.close()


def test_a_store_that_stays_broken_is_given_up_after_the_bound(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.worker.app.STORE_BACKOFF_S", (0.01, 0.05))
    store = FailingStore(tmp_path / "labels.db", OSError(errno.EIO, "Input/output error"), failures=10**6)
    w = _worker(tmp_path, store, retry_s=0.3)
    with pytest.raises(StoreUnavailable, match="refused a batch"):
        w.apply_durably(_records(2))
    assert store.attempts >= 2 and store.vote_count() == 0
    assert w.metrics.registry.get_sample_value("flywheel_worker_store_errors_total", {"error": "io"}) == store.attempts
    assert w.metrics.registry.get_sample_value("flywheel_worker_store_ok") == 0
    store.close()


def test_store_error_causes_are_a_bounded_set() -> None:
    assert store_error_cause(sqlite3.OperationalError("database is locked")) == "locked"
    assert store_error_cause(sqlite3.OperationalError("database or disk is full")) == "disk_full"
    assert store_error_cause(OSError(errno.ENOSPC, "No space left on device")) == "disk_full"
    assert store_error_cause(sqlite3.OperationalError("disk I/O error")) == "io"
    assert store_error_cause(sqlite3.DatabaseError("database disk image is malformed")) == "other"
