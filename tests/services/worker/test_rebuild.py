"""A worker on an empty disk rebuilt from the log (the feedback topic and the worker's journal), on the real broker:
the same labels, reputations, counters and live tallies as the worker that wrote the journal, whatever order its
batches took across partitions, whatever evidence its models gave, and with entries of attempts that never
committed in between."""

from __future__ import annotations

import random
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.settings import Settings
from services.worker.app import Worker
from services.worker.journal import count_evidence
from services.worker.store import LabelStore
from streams.events import FeedbackEvent, RetractionEvent, encode
from streams.journal import batch_entry, evidence_entry
from streams.records import Record
from streams.topics import EventProducer, Topics, topic_specs

pytestmark = pytest.mark.integration


def _isolated(kafka: Settings, state: Path, prefix: str) -> Settings:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return kafka.model_copy(update={
        "state_dir": state, "registry_dir": None, "rules_path": None, "topic_prefix": prefix, "worker_port": port,
        "feedback_partitions": 3, "publish_models": False,
    })


def _produce(s: Settings, rng: random.Random) -> int:
    """Flags from six reporters on 60 messages (several reporters per message, some disagreeing, some changed,
    one retraction, mail with and without served verdicts)."""
    topics = Topics.from_config(s.streams())
    items: list[tuple[str, bytes]] = []
    reporters = [f"user:r{i}" for i in range(6)]
    raws = [f"From: s{i}@example.net\r\nSubject: offer {i}\r\n\r\nbody {i} {'cheap pills' * (i % 3)}\r\n".encode()
            for i in range(60)]
    first: FeedbackEvent | None = None
    for n in range(240):
        raw = raws[rng.randrange(len(raws))]
        served = {"version": f"v{n % 3}", "is_spam": rng.random() < 0.5, "probability": 0.5} if n % 4 else None
        ev = FeedbackEvent.create(raw=raw, label=rng.choice(["spam", "ham"]), reporter=rng.choice(reporters),
                                  served=served)
        first = first or ev
        items.append((ev.message_id, encode(ev)))
    assert first is not None
    retract = RetractionEvent(retracts=first.event_id, message_id=first.message_id, reporter=first.reporter)
    items.append((first.message_id, encode(retract)))
    with EventProducer(s.streams(), timeout_s=10.0) as producer:
        producer.send_many(topics.feedback, items)
    return len(items)


def _read_all(s: Settings, n: int) -> dict[int, list[Record]]:
    from kafka import KafkaConsumer, TopicPartition

    topic = Topics.from_config(s.streams()).feedback
    consumer = KafkaConsumer(bootstrap_servers=s.bootstrap_servers.split(","), group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=5000)
    try:
        tps = [TopicPartition(topic, p) for p in range(s.feedback_partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: dict[int, list[Record]] = {p: [] for p in range(s.feedback_partitions)}
        for msg in consumer:
            out[msg.partition].append(Record(msg.topic, msg.partition, msg.offset, msg.key, msg.value))
            if sum(len(v) for v in out.values()) >= n:
                break
        return out
    finally:
        consumer.close()


def _state(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    store = LabelStore(db)
    try:
        return store.contents()
    finally:
        store.close()


def test_a_worker_on_an_empty_disk_rebuilds_the_store_the_journal_describes(kafka: Settings, tmp_path: Path) -> None:
    from streams import admin

    rng = random.Random(7)
    prefix = f"t{uuid.uuid4().hex[:8]}"
    writer = _isolated(kafka, tmp_path / "a", prefix)
    admin.ensure_topics(writer.streams(), topic_specs(writer.streams()))
    n = _produce(writer, rng)
    by_partition = _read_all(writer, n)
    assert sum(len(v) for v in by_partition.values()) == n

    # The worker that ran: batches of random sizes taking the partitions in a random interleaving, and the models'
    # evidence on the pending votes between batches (values a rebuild's models could not reproduce).
    worker = Worker(writer, serve_metrics=False, learn=False)
    try:
        queues = {p: list(v) for p, v in by_partition.items() if v}
        while queues:
            batch: list[Record] = []
            for _ in range(rng.randint(1, 3)):
                if not queues:
                    break
                p = rng.choice(sorted(queues))
                take = rng.randint(1, 25)
                batch.extend(queues[p][:take])
                queues[p] = queues[p][take:]
                if not queues[p]:
                    del queues[p]
            if rng.random() < 0.2:  # an attempt whose transaction failed after its entry was written
                worker.journal.write(batch_entry(batch[: rng.randint(1, len(batch))], worker.store.journal_prev()))
            worker.process(batch)
            pending = worker.store.pending_evidence(rng.randint(1, 40))
            if pending and rng.random() < 0.7:
                seqs = [seq for seq, *_ in pending]
                evidence = [(rep, rng.choice([1, -1, 0])) for _, rep, _, _, _ in pending]
                if rng.random() < 0.3:  # judged, journaled, not counted (killed): judged again by other models
                    other = [(q, r, -e) for q, (r, e) in zip(seqs, evidence, strict=True)]
                    worker.journal.write(evidence_entry(seqs[-1], other, worker.store.journal_prev()))
                count_evidence(worker.store, worker.journal, seqs, evidence)
    finally:
        worker.close()
    ran = _state(writer.state_dir / "worker" / "labels.db")
    assert ran["labels"] and ran["evidence"] and ran["live"] and ran["vote_log"]

    # A worker on an empty disk with the same topics: rebuilt before it does anything else.
    rebuilt_settings = _isolated(kafka, tmp_path / "b", prefix)
    rebuilt = Worker(rebuilt_settings, serve_metrics=False, learn=False)
    rebuilt.close()
    again = _state(rebuilt_settings.state_dir / "worker" / "labels.db")
    for table in ran:
        assert again[table] == ran[table], table

    # The journal's evidence is what makes it equal: the same flags applied without it give other reputations.
    plain = LabelStore(tmp_path / "plain.db")
    try:
        for p in sorted(by_partition):
            plain.apply(by_partition[p])
    finally:
        plain.close()
    assert _state(tmp_path / "plain.db")["reporters"] != ran["reporters"]
