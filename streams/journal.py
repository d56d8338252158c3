"""The worker's journal: the order in which it applied feedback records and the models' evidence on them.

The feedback topic holds every flag, but not the order in which one worker interleaved its partitions, nor the
models' opinion that turned each flag into reputation evidence (the learner judges votes off the ingest path,
with whatever models it holds at the time; another worker replaying the flags would judge them with other
models). Labels and reputations depend on both. So the worker appends to a one-partition topic, before each
transaction commits:

* a **batch** entry: the feedback records of one batch, in the order it applied them, as runs of offsets
  (``[topic, partition, first, last]``: the records themselves stay on the feedback topic);
* an **evidence** entry: the votes the learner judged (by the store's vote sequence) and the evidence each gave.

A worker on an empty disk reads the journal from its beginning and applies the same batches and the same evidence
in the same order (:class:`FeedbackReader` fetches the records by offset), so it holds the same labels,
reputations and counters as the worker that wrote it.

An entry is written before its transaction commits, and the transaction may then fail (the store refused it, the
process was killed): the next attempt writes another entry, and the records may come in another batch, the votes
be judged by other models. So each entry names the journal offset of the last entry whose transaction committed
(``prev``; the store keeps it in the same transaction, as the counter ``journal_offset``), and a rebuild applies an
entry only when a later entry names it, or when it is the last one (a transaction that never committed left
nothing behind, so nothing later can name it; the last entry's fate is unknown, and applying it is what the
worker would do next anyway). :func:`committed_entries` reads it so.

Both topics must keep their records for as long as a rebuild may be needed (:data:`JOURNAL_TOPIC_CONFIG`; the
feedback topic's retention is a setting).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from streams.events import EventInvalid
from streams.records import Record

if TYPE_CHECKING:
    from kafka import KafkaConsumer

    from streams.config import StreamsConfig
    from streams.topics import EventProducer

__all__ = [
    "JOURNAL_TOPIC_CONFIG",
    "BatchEntry",
    "EvidenceEntry",
    "FeedbackReader",
    "JournalWriter",
    "batch_entry",
    "committed_entries",
    "decode_entry",
    "evidence_entry",
    "read_journal",
]

JOURNAL_TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
"""Kept for good: the journal is small (offsets and evidence, no mail) and a rebuild starts from its beginning."""


@dataclass(frozen=True, slots=True)
class BatchEntry:
    """One applied batch: ``runs`` of ``(topic, partition, first offset, last offset)`` in the order applied;
    ``prev``: the journal offset of the last committed entry when it was written (-1: none)."""

    runs: tuple[tuple[str, int, int, int], ...]
    prev: int


@dataclass(frozen=True, slots=True)
class EvidenceEntry:
    """Votes judged by the models: ``(vote sequence, reporter, evidence)`` in sequence order, up to ``upto_seq``;
    ``prev`` as for :class:`BatchEntry`."""

    upto_seq: int
    votes: tuple[tuple[int, str, int], ...]
    prev: int


def batch_entry(records: Sequence[Record], prev: int) -> bytes:
    """The journal entry of a batch about to be applied (consecutive offsets of one partition in one run)."""
    runs: list[list[Any]] = []
    for r in records:
        last = runs[-1] if runs else None
        if last is not None and last[0] == r.topic and last[1] == r.partition and last[3] + 1 == r.offset:
            last[3] = r.offset
        else:
            runs.append([r.topic, r.partition, r.offset, r.offset])
    return orjson.dumps({"type": "batch", "runs": runs, "prev": prev})


def evidence_entry(upto_seq: int, votes: Sequence[tuple[int, str, int]], prev: int) -> bytes:
    """The journal entry of judged votes about to be counted."""
    return orjson.dumps({"type": "evidence", "upto": upto_seq, "votes": [list(v) for v in votes], "prev": prev})


def decode_entry(value: bytes) -> BatchEntry | EvidenceEntry:
    """An entry back; ``EventInvalid`` for anything else (a journal is written by the worker alone, so a bad entry
    means the topic was shared by mistake: the rebuild stops there rather than guess)."""
    try:
        data = orjson.loads(value)
        if data["type"] == "batch":
            runs = tuple((str(t), int(p), int(a), int(b)) for t, p, a, b in data["runs"])
            if any(a > b or a < 0 for _, _, a, b in runs):
                raise ValueError("an offset run ends before it starts")
            return BatchEntry(runs, int(data["prev"]))
        if data["type"] == "evidence":
            votes = tuple((int(s), str(r), int(e)) for s, r, e in data["votes"])
            return EvidenceEntry(int(data["upto"]), votes, int(data["prev"]))
        raise ValueError(f"unknown journal entry {data['type']!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EventInvalid(f"not a journal entry: {exc}") from exc


def _consumer(config: StreamsConfig, name: str) -> KafkaConsumer:
    from streams.topics import plain_consumer

    return plain_consumer(config, f"flywheel-rebuild-{name}", request_timeout_ms=10_000, fetch_max_wait_ms=100,
                          allow_auto_create_topics=False)


def read_journal(config: StreamsConfig, topic: str, poll_ms: int = 1000,
                 ) -> Iterator[tuple[int, BatchEntry | EvidenceEntry]]:
    """(offset, entry) of every entry of the journal from its beginning to its end as it stands now, in order."""
    from kafka import TopicPartition

    consumer = _consumer(config, "journal")
    try:
        if not consumer.partitions_for_topic(topic):
            return  # no journal yet: nothing was ever applied
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = int(consumer.end_offsets([tp])[tp])
        consumer.seek_to_beginning(tp)
        while consumer.position(tp) < end:
            for msg in consumer.poll(timeout_ms=poll_ms).get(tp, []):
                if msg.offset >= end:
                    break
                if msg.value is not None:
                    yield int(msg.offset), decode_entry(msg.value)
    finally:
        consumer.close()


def committed_entries(config: StreamsConfig, topic: str) -> Iterator[tuple[int, BatchEntry | EvidenceEntry]]:
    """The entries whose transactions committed, in order (two reads of the journal: the first collects the
    offsets later entries name, so memory holds offsets, not entries)."""
    named: set[int] = set()
    last = -1
    for offset, entry in read_journal(config, topic):
        named.add(entry.prev)
        last = offset
    for offset, entry in read_journal(config, topic):
        if offset in named or offset == last:
            yield offset, entry


class FeedbackReader:
    """Fetches feedback records by (topic, partition, offset) for a rebuild: one consumer per partition, each read
    forward only (a journal's runs of one partition come in increasing order, so nothing is read twice)."""

    def __init__(self, config: StreamsConfig, poll_ms: int = 1000, max_empty_polls: int = 30) -> None:
        self.config = config
        self.poll_ms = poll_ms
        self.max_empty_polls = max_empty_polls
        self._consumers: dict[tuple[str, int], KafkaConsumer] = {}
        self._buffers: dict[tuple[str, int], deque[Any]] = {}
        self._high: dict[tuple[str, int], int] = {}

    def _next(self, topic: str, partition: int) -> Any:
        from kafka import TopicPartition

        key = (topic, partition)
        buf = self._buffers.setdefault(key, deque())
        if key not in self._consumers:
            tp = TopicPartition(topic, partition)
            c = _consumer(self.config, f"{topic}-{partition}")
            c.assign([tp])
            c.seek_to_beginning(tp)
            self._consumers[key] = c
        empty = 0
        while not buf:
            for msgs in self._consumers[key].poll(timeout_ms=self.poll_ms).values():
                buf.extend(msgs)
            if not buf:
                empty += 1
                if empty >= self.max_empty_polls:
                    raise LookupError(f"{topic}[{partition}] has no more records")
        return buf.popleft()

    def fetch(self, runs: Sequence[tuple[str, int, int, int]]) -> list[Record]:
        """The records of ``runs`` in order, less those at or below an offset of their partition fetched before:
        a batch redelivered after a restart names records the store already applied, and the store skips them
        (its offset filter), so they change nothing. ``LookupError`` when a record is gone (the feedback topic's
        retention deleted it, or the journal belongs to another topic): a rebuild cannot be exact without it."""
        out: list[Record] = []
        for topic, partition, first, last in runs:
            want = max(first, self._high.get((topic, partition), -1) + 1)
            if want <= last:
                self._high[(topic, partition)] = last
            while want <= last:
                msg = self._next(topic, partition)
                if msg.offset < want:
                    continue
                if msg.offset > want:
                    raise LookupError(f"{topic}[{partition}] offset {want} is gone (retention?)")
                out.append(Record(topic, partition, msg.offset, msg.key, msg.value))
                want += 1
        return out

    def close(self) -> None:
        for c in self._consumers.values():
            c.close()
        self._consumers.clear()


class JournalWriter:
    """Appends entries to the journal, each acknowledged before the transaction it describes commits.

    Hold :attr:`lock` across the write and the commit: the worker's two writers (the ingest thread and the
    learner) must reach the journal in the order their transactions reach the store."""

    def __init__(self, producer: EventProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.lock = threading.Lock()

    def write(self, entry: bytes) -> int:
        """The entry's journal offset (the transaction records it); ``BrokerUnavailable`` when Kafka does not
        acknowledge: the caller must not commit then."""
        return self.producer.send_bytes(self.topic, None, entry)[1]
