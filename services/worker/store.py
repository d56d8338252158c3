"""The worker's durable state: votes, labels, reputations, live verdict tallies and processed offsets.

Delivery. Kafka delivers at least once; the store makes processing idempotent. Everything lives in one SQLite
database (``<state_dir>/worker/labels.db``): votes, labels, reporter reputations, the messages, the served
verdicts' live tallies *and the last processed offset of every partition*, all changed in ONE transaction per
batch of records. A record whose offset is at or below the stored offset of its partition has already been
applied and is skipped, whatever faust's committed offsets say (after a restart faust may re-deliver records
it fetched before the crash; this filter makes that harmless). ``kill -9`` between two transactions loses
nothing (the records are re-delivered) and counts nothing twice (the filter). Models are derived state: the
learner refits them from the labels here.

``data_version`` (a counter bumped in the same transactions) moves whenever what a model would learn can have
changed (a label appeared, changed or went, or reputations moved): the learner refits when it moves, and a
model's version of the data is its freshness at the gate.

The rules of belief (weights, consensus, evidence) are pure functions in :mod:`models.consensus`. Evidence is
kept per reporter, message and kind (``evidence``: at ingest, or the models' later judgement) with the step of
the reporter's record at which it was added, so it counts once per reporter and message and a retracted (or
replaced) flag takes its evidence back exactly (:func:`models.consensus.remove_from_record`). A message a
reporter supplied themselves (its bytes came in their flag, and the API never classified it) earns them nothing
until another source has seen it (classified it, or flagged it).

Raw mail is bounded (``quota_bytes``): the bytes one reporter supplied may take ``reporter_share`` of the budget,
one source ``source_share``, everything 80% of the quota (the rest of the database and its WAL fit in the other
20%). Past a share, the oldest bytes in it go, unlabelled messages first; the message keeps its votes and
labels but is no longer trained on (``labelled`` skips it). Usage per scope is kept in ``raw_usage`` in the same
transactions.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from models.consensus import (
    RECORD_DECAY,
    RELIABLE,
    consensus,
    live_weight,
    model_evidence,
    reliability,
    remove_from_record,
    reporter_weight,
    source_of,
)
from streams.events import EventInvalid, FeedbackEvent, RetractionEvent, decode
from streams.records import Record

log = structlog.get_logger(__name__)

__all__ = ["BatchResult", "LabelStore", "Labelled"]

OUTCOMES = ("tp", "fp", "tn", "fn")


@dataclass(slots=True)
class BatchResult:
    """What one applied batch changed; the caller dead-letters ``dead`` and updates metrics."""

    processed: int = 0
    skipped: int = 0  # re-delivered records already applied
    flags: int = 0
    accepted_flags: int = 0  # votes that counted (not duplicates, not dead-lettered)
    duplicates: int = 0
    retractions: int = 0
    new_labels: dict[str, int] = field(default_factory=lambda: {"spam": 0, "ham": 0})
    removed_labels: int = 0
    live: dict[tuple[str, str], float] = field(default_factory=dict)  # (served version, outcome) -> weight
    dead: list[tuple[Record, str]] = field(default_factory=list)
    touched_reporters: set[str] = field(default_factory=set)
    dropped_bytes: dict[str, int] = field(default_factory=dict)  # raw bytes dropped, by whose share was full


@dataclass(frozen=True, slots=True)
class Labelled:
    """A message with a consensus label under today's reputations, as the learner sees it.

    ``reliability`` is the best reliability among the live votes that carry the label; ``recency`` orders
    messages by first arrival (larger is newer); ``offsets`` are (topic, partition, offset) of those votes.
    """

    message_id: str
    raw: bytes
    label: str
    reliability: float
    recency: int
    offsets: tuple[tuple[str, int, int], ...]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (topic TEXT, partition INTEGER, offset INTEGER, PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS messages (
  message_id TEXT PRIMARY KEY, raw BLOB NOT NULL, topic TEXT, partition INTEGER, offset INTEGER,
  supplied_by TEXT, source TEXT, seen INTEGER NOT NULL DEFAULT 1, raw_bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS votes (
  reporter TEXT, message_id TEXT, label TEXT, event_id TEXT, topic TEXT, partition INTEGER, offset INTEGER,
  retracted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (reporter, message_id));
CREATE INDEX IF NOT EXISTS votes_event ON votes (event_id);
CREATE INDEX IF NOT EXISTS votes_message ON votes (message_id);
CREATE TABLE IF NOT EXISTS labels (message_id TEXT PRIMARY KEY, label TEXT NOT NULL, margin REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reporters (reporter TEXT PRIMARY KEY, agree REAL NOT NULL, disagree REAL NOT NULL, flags INTEGER NOT NULL,
  steps INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS evidence (reporter TEXT, message_id TEXT, kind TEXT, agree REAL NOT NULL,
  disagree REAL NOT NULL, step INTEGER NOT NULL, held INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (reporter, message_id, kind));
CREATE TABLE IF NOT EXISTS raw_usage (scope TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vote_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, reporter TEXT, message_id TEXT, label TEXT,
  served_version TEXT, served_outcome TEXT);
CREATE TABLE IF NOT EXISTS live (version TEXT, outcome TEXT, n REAL NOT NULL, PRIMARY KEY (version, outcome));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS messages_supplier_raw ON messages (supplied_by) WHERE raw_bytes > 0;
CREATE INDEX IF NOT EXISTS messages_source_raw ON messages (source) WHERE raw_bytes > 0;
CREATE INDEX IF NOT EXISTS messages_raw ON messages (raw_bytes) WHERE raw_bytes > 0;
"""
_MIGRATIONS = (  # columns added since the first schema: (table, column, definition)
    ("messages", "supplied_by", "TEXT"),
    ("messages", "source", "TEXT"),
    ("messages", "seen", "INTEGER NOT NULL DEFAULT 1"),
    ("messages", "raw_bytes", "INTEGER NOT NULL DEFAULT 0"),
    ("reporters", "steps", "INTEGER NOT NULL DEFAULT 0"),
    ("vote_log", "served_version", "TEXT"),
    ("vote_log", "served_outcome", "TEXT"),
)
RAW_BUDGET = 0.8
"""Share of ``quota_bytes`` raw mail may take; the rest of the database (votes, indexes) and its WAL fit in the
remainder."""
DROP_CHUNK = 64


_PENDING = ("SELECT v.seq, v.reporter, v.message_id, v.label, {} FROM vote_log v "
            "JOIN messages m USING (message_id) WHERE v.seq > ? ")


class LabelStore:
    """Votes, labels, reputations and processed offsets in one SQLite file; one writer (the worker's ingest)."""

    def __init__(self, path: Path, *, min_weight: float = 1.0, quota_bytes: int = 1024**3,
                 reporter_share: float = 0.1, source_share: float = 0.5) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.min_weight = min_weight
        self.quota_bytes = quota_bytes
        budget = int(RAW_BUDGET * quota_bytes)
        self._limits = {"reporter": int(reporter_share * budget), "source": int(source_share * budget),
                        "total": budget}
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes (kill -9) in WAL mode
        # After a checkpoint the WAL is cut back to this: a burst of large messages must not leave it huge.
        self._db.execute(f"PRAGMA journal_size_limit={max(1 << 20, quota_bytes // 20)}")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._db.executescript(_INDEXES)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._offsets: dict[tuple[str, int], int] = {
            (t, p): o for t, p, o in self._db.execute("SELECT topic, partition, offset FROM offsets")
        }

    def _migrate(self) -> None:
        """Add the columns a store written by an earlier version lacks; count its raw mail once."""
        added = False
        for table, column, definition in _MIGRATIONS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                added = True
        if added:
            self._db.execute("UPDATE messages SET raw_bytes=length(raw) WHERE raw_bytes=0")
        if added or self._db.execute("SELECT COUNT(*) FROM raw_usage").fetchone()[0] == 0:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM raw_usage")
            self._db.execute("INSERT INTO raw_usage SELECT 'total', COALESCE(SUM(raw_bytes), 0) FROM messages")
            self._db.execute("INSERT INTO raw_usage SELECT 'r:' || supplied_by, SUM(raw_bytes) FROM messages "
                             "WHERE supplied_by IS NOT NULL GROUP BY supplied_by")
            self._db.execute("INSERT INTO raw_usage SELECT 's:' || source, SUM(raw_bytes) FROM messages "
                             "WHERE source IS NOT NULL GROUP BY source")
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._readers:
                conn.close()
            self._db.close()

    # -- reads (a connection per thread: WAL readers see the last commit, never a transaction in flight) --
    def _r(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._local.conn = conn
            self._readers.append(conn)
        return conn

    def contents(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every table's rows, sorted (raw mail as its SHA-256): what a store rebuilt from the journal must equal."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        for (table,) in self._r().execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE "
                                          "'sqlite_%' ORDER BY name").fetchall():
            rows = self._r().execute(f'SELECT * FROM "{table}"').fetchall()  # noqa: S608 - names from sqlite_master
            out[table] = sorted((tuple(hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else v for v in row)
                                 for row in rows), key=repr)
        return out

    def is_empty(self) -> bool:
        """Nothing was ever applied (a new disk): the worker may rebuild the store from the journal."""
        return not self._offsets and not self.counters()

    def last_offsets(self) -> dict[tuple[str, int], int]:
        return dict(self._offsets)

    def counter(self, name: str) -> int:
        row = self._r().execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def counters(self) -> dict[str, int]:
        return {n: int(v) for n, v in self._r().execute("SELECT name, value FROM counters")}

    @property
    def data_version(self) -> int:
        return self.counter("data_version")

    def label_counts(self) -> dict[str, int]:
        out = {"spam": 0, "ham": 0}
        for label, n in self._r().execute("SELECT label, COUNT(*) FROM labels GROUP BY label"):
            out[label] = int(n)
        return out

    def labels(self) -> dict[str, str]:
        return dict(self._r().execute("SELECT message_id, label FROM labels"))

    def weights(self) -> dict[str, float]:
        return {r: reporter_weight(a, d) for r, a, d in self._r().execute("SELECT reporter, agree, disagree FROM reporters")}

    def reporters(self) -> list[tuple[str, float, int]]:
        """(reporter, weight, flags) of every reporter."""
        return [(r, reporter_weight(a, d), int(n))
                for r, a, d, n in self._r().execute("SELECT reporter, agree, disagree, flags FROM reporters")]

    def reporter_weight(self, reporter: str) -> float:
        row = self._r().execute("SELECT agree, disagree FROM reporters WHERE reporter=?", (reporter,)).fetchone()
        return reporter_weight(row[0], row[1]) if row else 1.0

    def reporter_reliability(self, reporter: str) -> float:
        """The share of the reporter's flags expected to be right (a newcomer's prior when unknown)."""
        row = self._r().execute("SELECT agree, disagree FROM reporters WHERE reporter=?", (reporter,)).fetchone()
        return reliability(row[0], row[1]) if row else reliability(0.0, 0.0)

    def raw_bytes(self, scope: str = "total") -> int:
        """Raw mail kept: ``total``, ``r:<reporter>`` or ``s:<source>``."""
        row = self._r().execute("SELECT bytes FROM raw_usage WHERE scope=?", (scope,)).fetchone()
        return int(row[0]) if row else 0

    def file_bytes(self) -> int:
        """The database on disk: the file and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += Path(f"{self.path}{suffix}").stat().st_size
        return total

    def vote_count(self) -> int:
        return int(self._r().execute("SELECT COUNT(*) FROM votes WHERE retracted=0").fetchone()[0])

    def known_messages(self, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = list(ids[i : i + 500])
            q = f"SELECT message_id FROM messages WHERE message_id IN ({','.join('?' * len(chunk))})"  # noqa: S608 - only "?" placeholders go in; the ids are bound
            out.update(r[0] for r in self._r().execute(q, chunk))
        return out

    def newest_recency(self) -> int:
        """The arrival rank of the newest message (``Labelled.recency`` of a message that arrives next is larger)."""
        row = self._r().execute("SELECT COALESCE(MAX(rowid), 0) FROM messages").fetchone()
        return int(row[0])

    def live_tallies(self) -> dict[tuple[str, str], float]:
        """(served version, outcome) -> flags that judged a served verdict (prequential quality), each weighted by
        :func:`models.consensus.live_weight`."""
        return {(v, o): float(n) for v, o, n in self._r().execute("SELECT version, outcome, n FROM live")}

    def labelled(self) -> list[Labelled]:
        """Every message whose consensus with today's reputations reaches the bar, oldest first."""
        record = {r: (a, d) for r, a, d in self._r().execute("SELECT reporter, agree, disagree FROM reporters")}
        votes: dict[str, list[tuple[str, float, float, tuple[str, int, int]]]] = {}
        for reporter, mid, label, t, p, o in self._r().execute(
            "SELECT reporter, message_id, label, topic, partition, offset FROM votes WHERE retracted=0"
        ):
            a, d = record.get(reporter, (0.0, 0.0))
            votes.setdefault(mid, []).append((label, reporter_weight(a, d), reliability(a, d), (t, int(p), int(o))))
        out: list[Labelled] = []
        for rowid, mid, raw in self._r().execute(
                "SELECT rowid, message_id, raw FROM messages WHERE raw_bytes > 0 ORDER BY rowid"):
            vs = votes.get(mid)
            if not vs:
                continue
            label, _ = consensus(((lb, w) for lb, w, _, _ in vs), self.min_weight)
            if label is None:
                continue
            carrying = [(q, off) for lb, _, q, off in vs if lb == label]
            out.append(Labelled(mid, bytes(raw), label, max(q for q, _ in carrying), int(rowid),
                                tuple(sorted(off for _, off in carrying))))
        return out

    def pending_evidence(self, limit: int = 500) -> list[tuple[int, str, str, str, bytes]]:
        """Votes not yet judged against the models: (seq, reporter, message_id, label, raw), oldest first."""
        done = self.counter("evidence_seq")
        return [
            (seq, rep, mid, label, bytes(raw))
            for seq, rep, mid, label, raw in self._r().execute(
                _PENDING.format("m.raw") + "ORDER BY v.seq LIMIT ?",
                (done, limit),
            )
        ]

    def journal_prev(self) -> int:
        """The journal offset of the last entry whose transaction committed here (-1: none; ``streams.journal``)."""
        return self.counter("journal_position") - 1

    def _journaled(self, journal_at: int | None) -> None:
        if journal_at is not None:
            self._db.execute("INSERT INTO counters VALUES ('journal_position', ?) ON CONFLICT(name) DO UPDATE SET "
                             "value=excluded.value", (journal_at + 1,))

    def apply_model_evidence(self, upto_seq: int, evidence: Sequence[tuple[str, int]],
                             journal_at: int | None = None) -> dict[tuple[str, str], float]:
        """Add the models' verdicts on the votes :meth:`pending_evidence` returned, up to ``upto_seq`` and in its
        order, to reputations (once: the watermark is in the same transaction). A vote retracted or changed
        since, or on a message only its reporter has seen, earns nothing.

        Returns the live tallies these votes add ((served version, outcome) -> weight): a flag judges the verdict
        served for it once its reporter's record includes the flag's own judgement, weighted by
        :func:`models.consensus.live_weight` (counting at ingest would weigh every flag of a fast stream as a
        newcomer's, before the models judged any of them). ``journal_at``: the offset of this transaction's
        journal entry, kept with it."""
        live: dict[tuple[str, str], float] = {}
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT value FROM counters WHERE name='evidence_seq'").fetchone()
                done = int(row[0]) if row is not None else 0
                if upto_seq <= done:
                    db.execute("ROLLBACK")
                    return {}
                logged = db.execute(
                    _PENDING.format("m.raw_bytes, v.served_version, v.served_outcome") + "AND v.seq <= ? "
                    "ORDER BY v.seq", (done, upto_seq)).fetchall()
                moved = False
                if [r[1] for r in logged] != [r for r, _ in evidence]:  # never expected: judged out of order
                    log.error("model evidence does not match the pending votes; skipped", upto_seq=upto_seq,
                              pending=len(logged), judged=len(evidence))
                    logged, evidence = [], []
                for (_, reporter, mid, label, kept, version, outcome), (_, e) in zip(logged, evidence, strict=True):
                    stands = self._stands(reporter, mid, label)
                    if e and kept and stands:  # no bytes: nothing was judged
                        moved = self._add_evidence(reporter, mid, "model", float(e > 0), float(e < 0),
                                                   held=self._held(reporter, mid)) or moved
                    if version is not None and stands:
                        record = db.execute("SELECT agree, disagree FROM reporters WHERE reporter=?",
                                            (reporter,)).fetchone()
                        live[(version, outcome)] = live.get((version, outcome), 0.0) + live_weight(*record)
                for (version, outcome), n in live.items():
                    db.execute("INSERT INTO live VALUES (?,?,?) ON CONFLICT(version, outcome) DO UPDATE SET "
                               "n=n+excluded.n", (version, outcome, n))
                db.execute(
                    "INSERT INTO counters VALUES ('evidence_seq', ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                    (upto_seq,),
                )
                self._journaled(journal_at)
                if moved:
                    self._bump("data_version", 1)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return live

    # -- the one write path ----------------------------------------------------------------------------
    def apply(
        self,
        records: Sequence[Record],
        model_probability: Callable[[list[bytes]], list[float | None]] | None = None,
        journal_at: int | None = None,
    ) -> BatchResult:
        """Apply a batch of records atomically (labels, reputations, tallies and offsets in one transaction, with
        ``journal_at``, the offset of the batch's journal entry)."""
        res = BatchResult()
        fresh: list[tuple[Record, FeedbackEvent | RetractionEvent | None]] = []
        with self._lock:
            high = dict(self._offsets)
            for rec in records:
                tp = (rec.topic, rec.partition)
                if rec.offset <= high.get(tp, -1):
                    res.skipped += 1
                    continue
                high[tp] = rec.offset
                try:
                    decoded = decode(rec.value)
                except EventInvalid as exc:
                    res.dead.append((rec, exc.reason))
                    fresh.append((rec, None))
                    continue
                if not isinstance(decoded, FeedbackEvent | RetractionEvent):
                    res.dead.append((rec, f"{decoded.type} event on the feedback topic"))
                    fresh.append((rec, None))
                    continue
                fresh.append((rec, decoded))
            if not fresh:
                return res
            probs = self._probabilities(fresh, model_probability)
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for rec, ev in fresh:
                    res.processed += 1
                    if isinstance(ev, FeedbackEvent):
                        reason = self._flag(rec, ev, probs.get(ev.message_id), res)
                        if reason is not None:
                            res.dead.append((rec, reason))
                    elif isinstance(ev, RetractionEvent):
                        self._retract(ev, res)
                    db.execute(
                        "INSERT INTO offsets VALUES (?,?,?) ON CONFLICT(topic, partition) DO UPDATE SET offset=excluded.offset",
                        (rec.topic, rec.partition, rec.offset),
                    )
                self._bump("events", res.processed)
                self._bump("flags", res.flags)
                self._bump("votes", res.accepted_flags)
                self._bump("duplicates", res.duplicates)
                self._bump("retractions", res.retractions)
                self._bump("dead_letters", len(res.dead))
                changed = sum(res.new_labels.values()) + res.removed_labels
                self._bump("data_version", 1 if changed else 0)
                for (version, outcome), n in res.live.items():
                    db.execute("INSERT INTO live VALUES (?,?,?) ON CONFLICT(version, outcome) DO UPDATE SET n=n+excluded.n",
                               (version, outcome, n))
                self._journaled(journal_at)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._offsets = high
        return res

    @staticmethod
    def _probabilities(
        fresh: Iterable[tuple[Record, FeedbackEvent | RetractionEvent | None]],
        model_probability: Callable[[list[bytes]], list[float | None]] | None,
    ) -> dict[str, float | None]:
        """The models' opinion of every flagged message with bytes, in one scoring call (or none)."""
        if model_probability is None:
            return {}
        todo: dict[str, bytes] = {}
        for _, ev in fresh:
            if isinstance(ev, FeedbackEvent) and ev.message_id not in todo:
                raw = ev.raw_bytes()
                if raw is not None:
                    todo[ev.message_id] = raw
        if not todo:
            return {}
        try:
            return dict(zip(todo, model_probability(list(todo.values())), strict=True))
        except Exception:  # reputation then just lacks model evidence
            log.exception("model scoring for reputation failed")
            return {}

    def _bump(self, name: str, n: int) -> None:
        if n:
            self._db.execute(
                "INSERT INTO counters VALUES (?,?) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, n)
            )

    def _count_flag(self, reporter: str) -> None:
        self._db.execute(
            "INSERT INTO reporters (reporter, agree, disagree, flags, steps) VALUES (?,0,0,1,0) "
            "ON CONFLICT(reporter) DO UPDATE SET flags=flags+1", (reporter,))

    def _add_evidence(self, reporter: str, message_id: str, kind: str, agree: float, disagree: float,
                      held: bool = False) -> bool:
        """Add a flag's evidence to the reporter's record (:func:`models.consensus.add_to_record`), once per
        reporter, message and kind; True when the record moved. ``held`` evidence is kept aside, not counted,
        until :meth:`_release_held` (a message only its supplier has seen)."""
        if agree + disagree <= 0:
            return False
        db = self._db
        if db.execute("SELECT 1 FROM evidence WHERE reporter=? AND message_id=? AND kind=?",
                      (reporter, message_id, kind)).fetchone():
            return False
        if held:
            db.execute("INSERT INTO evidence VALUES (?,?,?,?,?,0,1)", (reporter, message_id, kind, agree, disagree))
            return False
        db.execute(
            "INSERT INTO reporters (reporter, agree, disagree, flags, steps) VALUES (?,?,?,0,1) "
            "ON CONFLICT(reporter) DO UPDATE SET agree=?*agree+excluded.agree, "
            "disagree=?*disagree+excluded.disagree, steps=steps+1",
            (reporter, agree, disagree, RECORD_DECAY, RECORD_DECAY),
        )
        step = db.execute("SELECT steps FROM reporters WHERE reporter=?", (reporter,)).fetchone()[0]
        db.execute("INSERT INTO evidence VALUES (?,?,?,?,?,?,0)", (reporter, message_id, kind, agree, disagree, step))
        return True

    def _release_held(self, message_id: str, res: BatchResult) -> None:
        """Another source has seen the message: its supplier's held evidence counts from now on."""
        db = self._db
        held = db.execute("SELECT reporter, kind, agree, disagree FROM evidence WHERE message_id=? AND held=1",
                          (message_id,)).fetchall()
        db.execute("DELETE FROM evidence WHERE message_id=? AND held=1", (message_id,))
        for reporter, kind, a, d in held:
            if self._add_evidence(reporter, message_id, kind, a, d):
                res.touched_reporters.add(reporter)

    def _remove_evidence(self, reporter: str, message_id: str) -> bool:
        """Take a retracted or replaced flag's evidence back (:func:`models.consensus.remove_from_record`)."""
        db = self._db
        rows = db.execute("SELECT agree, disagree, step FROM evidence WHERE reporter=? AND message_id=? AND held=0",
                          (reporter, message_id)).fetchall()
        db.execute("DELETE FROM evidence WHERE reporter=? AND message_id=? AND held=1", (reporter, message_id))
        if not rows:
            return False
        agree, disagree, steps = db.execute("SELECT agree, disagree, steps FROM reporters WHERE reporter=?",
                                            (reporter,)).fetchone()
        for a, d, step in rows:
            agree, disagree = remove_from_record(agree, disagree, a, d, int(steps) - int(step))
        db.execute("UPDATE reporters SET agree=?, disagree=? WHERE reporter=?", (agree, disagree, reporter))
        db.execute("DELETE FROM evidence WHERE reporter=? AND message_id=?", (reporter, message_id))
        return True

    def _stands(self, reporter: str, message_id: str, label: str) -> bool:
        """Whether a vote is still live with ``label`` (not retracted, not changed since)."""
        vote = self._db.execute("SELECT label, retracted FROM votes WHERE reporter=? AND message_id=?",
                                (reporter, message_id)).fetchone()
        return vote is not None and not vote[1] and vote[0] == label

    def _held(self, reporter: str, message_id: str) -> bool:
        """Whether the message is one only this reporter has seen (supplied in their own flag, never classified,
        flagged by no other source): their evidence on it waits."""
        row = self._db.execute("SELECT supplied_by, seen FROM messages WHERE message_id=?", (message_id,)).fetchone()
        return row is not None and not row[1] and row[0] == reporter

    def _store_raw(self, rec: Record, ev: FeedbackEvent, raw: bytes, res: BatchResult) -> None:
        """Keep a new message's bytes within the quota: make room in the reporter's, the source's and the total
        share (oldest unlabelled bytes first), or keep none when the message alone is larger than a share."""
        source = source_of(ev.reporter)
        size = len(raw)
        scopes = {"reporter": f"r:{ev.reporter}", "source": f"s:{source}", "total": "total"}
        if any(size > self._limits[share] for share in scopes):
            res.dropped_bytes["message"] = res.dropped_bytes.get("message", 0) + size
            raw, size = b"", 0
        else:
            for share, scope in scopes.items():
                self._make_room(share, scope, size, res)
        self._db.execute(
            "INSERT INTO messages (message_id, raw, topic, partition, offset, supplied_by, source, seen, raw_bytes) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (ev.message_id, raw, rec.topic, rec.partition, rec.offset, ev.reporter, source,
             int(ev.served is not None), size))
        if size:
            self._usage({"total": size, f"r:{ev.reporter}": size, f"s:{source}": size})

    def _usage(self, deltas: dict[str, int]) -> None:
        for scope, n in deltas.items():
            self._db.execute("INSERT INTO raw_usage VALUES (?,?) ON CONFLICT(scope) DO UPDATE SET bytes=bytes+excluded.bytes",
                             (scope, n))

    def _make_room(self, share: str, scope: str, size: int, res: BatchResult) -> None:
        db = self._db
        limit = self._limits[share]
        row = db.execute("SELECT bytes FROM raw_usage WHERE scope=?", (scope,)).fetchone()
        excess = (int(row[0]) if row else 0) + size - limit
        where = {"reporter": "supplied_by=?", "source": "source=?", "total": "raw_bytes > ?"}[share]
        arg: str | int = 0 if share == "total" else scope[2:]
        while excess > 0:
            victims = db.execute(
                f"SELECT m.rowid, m.raw_bytes, m.supplied_by, m.source FROM messages m WHERE {where} "  # noqa: S608 - fixed clauses; values bound
                "AND m.raw_bytes > 0 ORDER BY EXISTS (SELECT 1 FROM labels l WHERE l.message_id=m.message_id), "
                "m.rowid LIMIT ?", (arg, DROP_CHUNK)).fetchall()
            if not victims:
                return
            for rowid, n, supplier, source in victims:
                db.execute("UPDATE messages SET raw=x'', raw_bytes=0 WHERE rowid=?", (rowid,))
                deltas = {"total": -n}
                if supplier is not None:
                    deltas[f"r:{supplier}"] = -n
                if source is not None:
                    deltas[f"s:{source}"] = -n
                self._usage(deltas)
                res.dropped_bytes[share] = res.dropped_bytes.get(share, 0) + n
                excess -= n
                if excess <= 0:
                    return

    def _votes_on(self, message_id: str, exclude: str | None = None,
                  proven_only: bool = False) -> list[tuple[str, float]]:
        """(label, weight) of the live votes on a message; ``proven_only`` keeps reliable reporters' votes."""
        rows = self._db.execute(
            "SELECT v.reporter, v.label, COALESCE(r.agree, 0), COALESCE(r.disagree, 0) FROM votes v "
            "LEFT JOIN reporters r USING (reporter) WHERE v.message_id=? AND v.retracted=0",
            (message_id,),
        ).fetchall()
        return [(label, reporter_weight(a, d)) for rep, label, a, d in rows
                if rep != exclude and (not proven_only or reliability(a, d) >= RELIABLE)]

    def _flag(self, rec: Record, ev: FeedbackEvent, prob: float | None, res: BatchResult) -> str | None:
        db = self._db
        res.flags += 1
        known = db.execute("SELECT supplied_by, seen FROM messages WHERE message_id=?", (ev.message_id,)).fetchone()
        if known is None:
            raw = ev.raw_bytes()
            if raw is None:
                return "flag without message bytes for a message the worker has never seen"
            self._store_raw(rec, ev, raw, res)
        elif not known[1] and (ev.served is not None or source_of(known[0] or "") != source_of(ev.reporter)):
            db.execute("UPDATE messages SET seen=1 WHERE message_id=?", (ev.message_id,))  # another source saw it
            self._release_held(ev.message_id, res)
        prev = db.execute(
            "SELECT label, retracted FROM votes WHERE reporter=? AND message_id=?", (ev.reporter, ev.message_id)
        ).fetchone()
        if prev is not None and prev[0] == ev.label and not prev[1]:
            res.duplicates += 1
            return None
        if prev is not None:  # a changed (or retracted, then renewed) vote: its earlier evidence goes
            self._remove_evidence(ev.reporter, ev.message_id)
        # Reputation evidence, judged before this vote counts. Agreeing with other reporters is evidence only
        # when they are proven (reliable): otherwise a few colluding identities would vouch for each other.
        others, _ = consensus(self._votes_on(ev.message_id, exclude=ev.reporter, proven_only=True), self.min_weight)
        agree = disagree = 0.0
        if others is not None:
            agree, disagree = (1.0, 0.0) if others == ev.label else (0.0, 1.0)
        m = model_evidence(ev.label, prob)
        agree += m > 0
        disagree += m < 0
        self._count_flag(ev.reporter)
        self._add_evidence(ev.reporter, ev.message_id, "ingest", agree, disagree,
                           held=self._held(ev.reporter, ev.message_id))
        res.accepted_flags += 1
        res.touched_reporters.add(ev.reporter)
        db.execute(
            "INSERT INTO votes VALUES (?,?,?,?,?,?,?,0) ON CONFLICT(reporter, message_id) DO UPDATE SET "
            "label=excluded.label, event_id=excluded.event_id, topic=excluded.topic, partition=excluded.partition, "
            "offset=excluded.offset, retracted=0",
            (ev.reporter, ev.message_id, ev.label, ev.event_id, rec.topic, rec.partition, rec.offset),
        )
        key: tuple[str, str] | None = None
        if ev.served is not None and prev is None:
            # A free label for the verdict served earlier, weighted like a label (models.consensus.live_weight:
            # a proven reporter's only) once the flag itself is judged: now when the models' opinion came with
            # the batch, else when the learner judges it (apply_model_evidence). The served version's series
            # exist from its first flag (0 added here).
            spam = ev.label == "spam"
            outcome = ("tp" if ev.served.is_spam else "fn") if spam else ("fp" if ev.served.is_spam else "tn")
            key = (ev.served.version, outcome)
            weight = 0.0
            if prob is not None:
                record = db.execute("SELECT agree, disagree FROM reporters WHERE reporter=?", (ev.reporter,)).fetchone()
                weight = live_weight(*record)
            res.live[key] = res.live.get(key, 0.0) + weight
        if prob is None:  # the models' opinion is judged later, off the ingest path (see the learner)
            db.execute("INSERT INTO vote_log (reporter, message_id, label, served_version, served_outcome) "
                       "VALUES (?,?,?,?,?)", (ev.reporter, ev.message_id, ev.label, *(key or (None, None))))
        self._relabel(ev.message_id, res)
        return None

    def _retract(self, ev: RetractionEvent, res: BatchResult) -> None:
        cur = self._db.execute(
            "UPDATE votes SET retracted=1 WHERE event_id=? AND reporter=? AND retracted=0", (ev.retracts, ev.reporter)
        )
        if cur.rowcount:
            res.retractions += 1
            if self._remove_evidence(ev.reporter, ev.message_id):
                res.touched_reporters.add(ev.reporter)
            self._relabel(ev.message_id, res)

    def _relabel(self, message_id: str, res: BatchResult) -> None:
        db = self._db
        label, margin = consensus(self._votes_on(message_id), self.min_weight)
        row = db.execute("SELECT label FROM labels WHERE message_id=?", (message_id,)).fetchone()
        old = row[0] if row else None
        if label is None:
            if old is not None:
                db.execute("DELETE FROM labels WHERE message_id=?", (message_id,))
                res.removed_labels += 1
            return
        db.execute(
            "INSERT INTO labels VALUES (?,?,?) ON CONFLICT(message_id) DO UPDATE SET label=excluded.label, margin=excluded.margin",
            (message_id, label, margin),
        )
        if label != old:
            res.new_labels[label] += 1
