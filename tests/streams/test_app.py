"""The faust app on the real broker: the worker (ingest-only) consumes feedback, dead-letters invalid records,
and after a stop or a ``kill -9`` resumes without losing or double-counting a flag."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.local.daemon import Child, wait_until
from services.settings import REPO_ROOT, Settings
from streams.events import FeedbackEvent, encode
from streams.topics import EventProducer, Topics, topic_specs


def _env(settings: Settings) -> dict[str, str]:

    return {**os.environ, **settings.child_env(), "PYTHONUNBUFFERED": "1"}


def _counters(settings: Settings) -> dict[str, int]:
    db = settings.state_dir / "worker" / "labels.db"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT name, value FROM counters").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


class WorkerProc:
    """``python -m services.worker`` as a child process (what ``flywheel worker`` runs)."""

    def __init__(self, settings: Settings, *args: str) -> None:
        self.child = Child("worker", [sys.executable, "-m", "services.worker", *args],
                           logfile=settings.state_dir / "worker.log", cwd=REPO_ROOT)
        self.env = _env(settings)

    def start(self) -> None:
        self.child.start(self.env)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.child.stop(sig, timeout_s=30)


def _isolated(kafka: Settings, tmp_path: Path) -> Settings:
    import socket

    from streams import admin

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    s = kafka.model_copy(update={
        "state_dir": tmp_path / "state", "registry_dir": None, "rules_path": None,
        "topic_prefix": f"t{uuid.uuid4().hex[:8]}", "worker_port": port, "feedback_partitions": 3,
    })
    admin.ensure_topics(s.streams(), topic_specs(s.streams()))
    return s


def _flags(n: int, start: int = 0) -> list[FeedbackEvent]:
    return [
        FeedbackEvent.create(label="spam" if i % 2 else "ham", reporter=f"u{i % 4}",
                             raw=f"Subject: m{i}\r\nFrom: a{i}@example.com\r\n\r\nbody {i}\r\n".encode())
        for i in range(start, start + n)
    ]


@pytest.mark.integration
def test_worker_consumes_dead_letters_and_resumes_after_kill(kafka: Settings, tmp_path: Path) -> None:
    s = _isolated(kafka, tmp_path)
    topics = Topics.from_config(s.streams())
    producer = EventProducer(s.streams())
    worker = WorkerProc(s, "--ingest-only")
    try:
        first = _flags(60)
        producer.send_many(topics.feedback, [(e.message_id, encode(e)) for e in first])
        producer.send_bytes(topics.feedback, b"bad", b"{definitely not json")
        worker.start()
        wait_until(lambda: _counters(s).get("events", 0) >= 61, 90, "the first 61 records")
        assert _counters(s)["votes"] == 60 and _counters(s)["dead_letters"] == 1

        # Produce more while the worker runs, kill -9 it mid-stream, produce again, restart.
        second = _flags(400, start=60)
        items = [(e.message_id, encode(e)) for e in second]
        producer.send_many(topics.feedback, items[:200])
        wait_until(lambda: _counters(s).get("events", 0) > 61, 30, "the worker to start on the second batch")
        worker.kill(signal.SIGKILL)
        producer.send_many(topics.feedback, items[200:])
        # A re-sent duplicate (same reporter, same message): must count as a duplicate, not a vote.
        dup = FeedbackEvent.create(message_id=first[0].message_id, label=first[0].label, reporter=first[0].reporter)
        producer.send(topics.feedback, dup.message_id, dup)
        worker.start()
        wait_until(lambda: _counters(s).get("events", 0) >= 462, 90, "every record after the restart")
        time.sleep(0.5)  # let a (wrong) double count show up if there were one; the counts below are exact
        c = _counters(s)
        assert c["events"] == 462, c
        assert c["votes"] == 460 and c["duplicates"] == 1 and c["dead_letters"] == 1, c
        conn = sqlite3.connect(f"file:{s.state_dir / 'worker' / 'labels.db'}?mode=ro", uri=True)
        labels = dict(conn.execute("SELECT label, COUNT(*) FROM labels GROUP BY label").fetchall())
        conn.close()
        assert labels == {"spam": 230, "ham": 230}

        # The dead letter carries the reason.
        import orjson
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, enable_auto_commit=False, consumer_timeout_ms=5000)
        tp = TopicPartition(topics.dead_letter, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        recs = [orjson.loads(m.value) for m in consumer]
        consumer.close()
        assert len(recs) == 1 and "not JSON" in recs[0]["reason"] and recs[0]["source_topic"] == topics.feedback
    finally:
        worker.kill()
        producer.close()
