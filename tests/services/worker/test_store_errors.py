"""Nothing acknowledged is lost: the worker's store held locked by another process while flags arrive (as a
backup, a slow disk or a second process would), on the real broker. The worker retries, says so in its metrics,
and stores every flag once the lock is gone; a store error it gives up on ends the process unacknowledged."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from services.local.daemon import wait_until
from services.settings import REPO_ROOT, Settings
from streams.events import FeedbackEvent, encode
from streams.topics import EventProducer, Topics, topic_specs

pytestmark = pytest.mark.integration

LOCK_S = 12.0


def _isolated(kafka: Settings, tmp_path: Path, **overrides: object) -> Settings:
    from streams import admin

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    s = kafka.model_copy(update={
        "state_dir": tmp_path / "state", "registry_dir": None, "rules_path": None,
        "topic_prefix": f"t{uuid.uuid4().hex[:8]}", "worker_port": port, "feedback_partitions": 2, **overrides,
    })
    admin.ensure_topics(s.streams(), topic_specs(s.streams()))
    return s


def _start(s: Settings) -> subprocess.Popen[bytes]:
    s.state_dir.mkdir(parents=True, exist_ok=True)
    out = (s.state_dir / "worker.log").open("ab")
    env = {**os.environ, **s.child_env(), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "services.worker", "--ingest-only"], cwd=REPO_ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _stored(s: Settings, event_ids: list[str]) -> int:
    db = s.state_dir / "worker" / "labels.db"
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        marks = ",".join("?" * len(event_ids))
        return int(conn.execute(f"SELECT COUNT(*) FROM votes WHERE event_id IN ({marks})",
                                event_ids).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _metric(s: Settings, name: str) -> float:
    """The sum of a worker metric's samples (0 when absent or the page does not answer)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{s.worker_port}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")


def _flags(n: int, tag: str) -> list[FeedbackEvent]:
    return [FeedbackEvent.create(label="spam" if i % 2 else "ham", reporter=f"u{i % 5}",
                                 raw=f"Subject: {tag} {i}\r\nFrom: a{i}@example.com\r\n\r\nbody {tag} {i}\r\n".encode())
            for i in range(n)]


def test_flags_sent_while_the_store_is_locked_are_all_stored_after(kafka: Settings, tmp_path: Path) -> None:
    s = _isolated(kafka, tmp_path)
    topics = Topics.from_config(s.streams())
    producer = EventProducer(s.streams())
    proc = _start(s)
    lock: sqlite3.Connection | None = None
    try:
        warm = _flags(10, "warm")
        producer.send_many(topics.feedback, [(e.message_id, encode(e)) for e in warm])
        wait_until(lambda: _stored(s, [e.event_id for e in warm]) == 10, 120, "the first 10 flags stored")

        lock = sqlite3.connect(str(s.state_dir / "worker" / "labels.db"), isolation_level=None, timeout=10)
        lock.execute("BEGIN EXCLUSIVE")  # every other writer now gets 'database is locked'
        locked_at = time.monotonic()
        flags = _flags(100, "locked")
        for i in range(0, 100, 10):  # produced over the lock's first seconds, as a stream of users would
            producer.send_many(topics.feedback, [(e.message_id, encode(e)) for e in flags[i : i + 10]])
        wait_until(lambda: _metric(s, "flywheel_worker_store_errors_total") > 0, LOCK_S, "a store error counted")
        assert _metric(s, "flywheel_worker_store_ok") == 0
        assert _stored(s, [e.event_id for e in flags]) == 0
        time.sleep(max(0.0, LOCK_S - (time.monotonic() - locked_at)))  # the lock's length is the scenario itself
        lock.execute("ROLLBACK")
        lock.close()
        lock = None

        ids = [e.event_id for e in flags]
        wait_until(lambda: _stored(s, ids) == 100, 60, "every flag sent while the store was locked")
        assert proc.poll() is None, "the worker retried in place, it did not need a restart"
        wait_until(lambda: _metric(s, "flywheel_worker_store_ok") == 1, 10, "the store reported healthy again")
        assert _metric(s, "flywheel_worker_store_errors_total") >= 1
        log = (s.state_dir / "worker.log").read_text(errors="replace")
        assert "store refused a batch; retrying" in log and "database is locked" in log
        # An ordinary stop is still a clean one (only a batch the store refused ends the worker with 70).
        proc.terminate()
        assert proc.wait(60) == 0
        assert "batch not stored" not in (s.state_dir / "worker.log").read_text(errors="replace")
    finally:
        if lock is not None:
            lock.close()
        _stop(proc)
        producer.close()


def test_a_store_refused_past_the_bound_ends_the_worker_unacknowledged(kafka: Settings, tmp_path: Path) -> None:
    """Retrying is bounded: past ``worker_store_retry_s`` the worker exits (status 70) without acknowledging
    the batch, and a restart stores it from the committed offsets."""
    from streams.app import EXIT_UNACKNOWLEDGED

    s = _isolated(kafka, tmp_path, worker_store_retry_s=3.0)
    topics = Topics.from_config(s.streams())
    producer = EventProducer(s.streams())
    proc = _start(s)
    lock: sqlite3.Connection | None = None
    try:
        warm = _flags(4, "warm")
        producer.send_many(topics.feedback, [(e.message_id, encode(e)) for e in warm])
        wait_until(lambda: _stored(s, [e.event_id for e in warm]) == 4, 120, "the first flags stored")
        lock = sqlite3.connect(str(s.state_dir / "worker" / "labels.db"), isolation_level=None, timeout=10)
        lock.execute("BEGIN EXCLUSIVE")
        flags = _flags(20, "refused")
        producer.send_many(topics.feedback, [(e.message_id, encode(e)) for e in flags])
        wait_until(lambda: proc.poll() is not None, 60, "the worker to give up and exit")
        assert proc.returncode == EXIT_UNACKNOWLEDGED
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        proc = _start(s)  # what a supervisor does
        ids = [e.event_id for e in flags]
        wait_until(lambda: _stored(s, ids) == 20, 90, "every flag of the refused batch after the restart")
        log = (s.state_dir / "worker.log").read_text(errors="replace")
        assert "store refused a batch; giving up" in log
    finally:
        if lock is not None:
            lock.close()
        _stop(proc)
        producer.close()
