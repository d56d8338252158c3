"""The retraining worker: users' flags -> consensus labels -> challengers -> gate -> promotion.

Delivery. Kafka delivers at least once; the worker makes processing idempotent. Its durable state is one
SQLite database in the state dir (``<state_dir>/worker/labels.db``): votes, labels, reporter reputations, the
messages, *and the last processed offset of every partition*, all changed in ONE transaction per batch of
records. A record whose offset is at or below the stored offset of its partition has already been applied
and is skipped, whatever faust's committed offsets say (after a restart faust may re-deliver records it
fetched before the crash; this filter makes that harmless). ``kill -9`` between two transactions loses
nothing (the records are re-delivered) and double-counts nothing (the filter). Models are derived state:
the incremental model is rebuilt on start by replaying the learn log (every label it learned, in order),
which is part of the same transactions.

Consensus. A flag is a vote (reporter, message, label); one vote per reporter per message (a repeat with the
same label is a duplicate, with the other label it replaces the vote). A reporter's weight is
``2 * (agree + 2) / (agree + disagree + 4)``: a newcomer weighs 1, a reliable reporter tends to 2, a reporter
who keeps contradicting tends to 0. Evidence: the vote agrees or disagrees with the consensus of the other
reporters already on that message (judged as the vote is applied), and with the incremental model where it is
very sure (p >= 0.99 or <= 0.01; judged moments later by the learner thread, off the ingest path, once per vote:
a watermark in the same transaction as the reputation change).
A message is labelled when the weighted margin between the two labels reaches ``consensus_min_weight``. The
batch (neural) training set recomputes every message's consensus with today's weights, so a reporter who
lost reputation also loses the labels only they carried.

The gate and the clocks live in :class:`Learner` (see its docstring); lineage in every version's meta.json.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from streams.events import EventInvalid, FeedbackEvent, RetractionEvent, decode

if TYPE_CHECKING:
    from services.settings import Settings

log = structlog.get_logger(__name__)

SURE_HIGH = 0.99
SURE_LOW = 0.01
HOLDOUT_MODULO = 10  # one labelled message in ten (by message-id hash, per class) is held out for the gate


# ----------------------------------------------------------------------------------------------- pure logic
REPUTATION_PRIOR = 2.0  # pseudo-counts of agreement and disagreement a newcomer starts with


def reporter_weight(agree: float, disagree: float) -> float:
    """Reputation of a reporter from its agreement record (smoothed by a prior of two pseudo-agreements and
    two pseudo-disagreements: in (0, 2), newcomer = 1, one early mistake costs 0.2, ten cost 0.67)."""
    k = REPUTATION_PRIOR
    return 2.0 * (agree + k) / (agree + disagree + 2.0 * k)


def consensus(votes: Iterable[tuple[str, float]], min_weight: float) -> tuple[str | None, float]:
    """(label or None, margin) of weighted votes ``(label, weight)``; margin = spam weight - ham weight."""
    margin = 0.0
    for label, w in votes:
        margin += w if label == "spam" else -w
    if margin >= min_weight:
        return "spam", margin
    if margin <= -min_weight:
        return "ham", margin
    return None, margin


def is_holdout(message_id: str) -> bool:
    """Deterministic, order-independent held-out membership: the same message is held out in every run."""
    return int(hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:8], 16) % HOLDOUT_MODULO == 0


def model_evidence(label: str, probability: float | None) -> int:
    """+1 when the vote agrees with a very sure model, -1 when it contradicts one, 0 otherwise."""
    if probability is None or math.isnan(probability):
        return 0
    if probability >= SURE_HIGH:
        return 1 if label == "spam" else -1
    if probability <= SURE_LOW:
        return 1 if label == "ham" else -1
    return 0


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC measured on ``n_pos`` spam and ``n_neg`` ham."""
    if not (n_pos and n_neg) or math.isnan(auc):
        return math.nan
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


@dataclass(frozen=True, slots=True)
class GateResult:
    promote: bool
    reason: str


def gate_rule(
    champion: dict[str, float] | None,
    challenger: dict[str, float],
    *,
    fpr_tolerance: float,
    tie_epsilon: float = 2e-4,
    descends_from_champion: bool = False,
    anchor: dict[str, float] | None = None,
) -> GateResult:
    """Promote or reject a challenger on metrics measured on the same evaluation set.

    ``fpr`` (at each model's own operating threshold) may rise by ``fpr_tolerance`` at most, and
    ``one_minus_auc`` must improve. "Improve" for tiny deltas:

    * a challenger from another lineage (a retrained model) must have a strictly lower 1-AUC;
    * one that *descends from the champion* (the incremental model after learning more labels) is promoted
      when it is not worse than the champion by more than the noise margin - the larger of ``tie_epsilon`` and
      one standard error of the champion's AUC on this set (Hanley-McNeil; near AUC 1 a single misranked
      message moves 1-AUC by about that much). Otherwise fresh flags would wait for a gain the evaluation set
      cannot resolve before serving. So that a chain of such ties cannot drift down, it must also be within
      the margin of the ``anchor`` (the best champion of this chain, re-scored on the same set).
    """
    c = challenger.get("one_minus_auc", math.nan)
    if math.isnan(c):
        return GateResult(False, "challenger has no AUC on the evaluation set (one class only?)")
    if champion is None:
        return GateResult(True, "no champion to beat")
    k = champion.get("one_minus_auc", math.nan)
    if math.isnan(k):
        return GateResult(True, "champion has no AUC on the evaluation set")
    fpr_c, fpr_k = challenger.get("fpr", math.nan), champion.get("fpr", math.nan)
    if not math.isnan(fpr_c) and not math.isnan(fpr_k) and fpr_c > fpr_k + fpr_tolerance:
        return GateResult(
            False, f"FPR at the operating threshold rises from {fpr_k:.4%} to {fpr_c:.4%} (tolerance {fpr_tolerance:.4%})"
        )
    if c < k:
        return GateResult(True, f"1-AUC improves from {k:.5f} to {c:.5f}")
    if descends_from_champion:
        se = auc_standard_error(1.0 - k, int(champion.get("n_spam", 0)), int(champion.get("n_ham", 0)))
        margin = max(tie_epsilon, 0.0 if math.isnan(se) else se)
        a = None if anchor is None else anchor.get("one_minus_auc")
        if a is not None and not math.isnan(a) and c > a + margin:
            return GateResult(False, f"1-AUC {c:.5f} drifted beyond the noise margin {margin:.5f} of the anchor's {a:.5f}")
        if c <= k + margin:
            return GateResult(True, f"incremental update, 1-AUC {c:.5f} within the noise margin {margin:.5f} of the champion's {k:.5f}")
        return GateResult(False, f"1-AUC {c:.5f} worse than the champion's {k:.5f} beyond the noise margin {margin:.5f}")
    return GateResult(False, f"1-AUC does not improve: {c:.5f} vs champion {k:.5f}")


# ----------------------------------------------------------------------------------------------- the store
@dataclass(slots=True)
class Record:
    """One consumed Kafka record (what the faust agent hands over)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class BatchResult:
    """What one applied batch changed; the caller learns ``learned`` and dead-letters ``dead``."""

    processed: int = 0
    skipped: int = 0  # re-delivered records already applied
    flags: int = 0
    accepted_flags: int = 0  # votes that counted (not duplicates, not dead-lettered)
    duplicates: int = 0
    retractions: int = 0
    new_labels: dict[str, int] = field(default_factory=lambda: {"spam": 0, "ham": 0})
    removed_labels: int = 0
    # (seq, message_id, raw, label, topic, partition, offset): what the incremental model must learn, in order
    learned: list[tuple[int, str, bytes, str, str, int, int]] = field(default_factory=list)
    dead: list[tuple[Record, str]] = field(default_factory=list)
    touched_reporters: set[str] = field(default_factory=set)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS offsets (topic TEXT, partition INTEGER, offset INTEGER, PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS messages (
  message_id TEXT PRIMARY KEY, raw BLOB NOT NULL, holdout INTEGER NOT NULL,
  topic TEXT, partition INTEGER, offset INTEGER);
CREATE TABLE IF NOT EXISTS votes (
  reporter TEXT, message_id TEXT, label TEXT, event_id TEXT, topic TEXT, partition INTEGER, offset INTEGER,
  retracted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (reporter, message_id));
CREATE INDEX IF NOT EXISTS votes_event ON votes (event_id);
CREATE INDEX IF NOT EXISTS votes_message ON votes (message_id);
CREATE TABLE IF NOT EXISTS labels (message_id TEXT PRIMARY KEY, label TEXT NOT NULL, margin REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reporters (reporter TEXT PRIMARY KEY, agree REAL NOT NULL, disagree REAL NOT NULL, flags INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS learn_log (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT, label TEXT, topic TEXT, partition INTEGER, offset INTEGER);
CREATE TABLE IF NOT EXISTS vote_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, reporter TEXT, message_id TEXT, label TEXT);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class LabelStore:
    """Votes, labels, reputations and processed offsets in one SQLite file; one writer (the worker)."""

    def __init__(self, path: Path, *, min_weight: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.min_weight = min_weight
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes (kill -9) in WAL mode
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._offsets: dict[tuple[str, int], int] = {
            (t, p): o for t, p, o in self._db.execute("SELECT topic, partition, offset FROM offsets")
        }

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

    def last_offsets(self) -> dict[tuple[str, int], int]:
        return dict(self._offsets)

    def counter(self, name: str) -> int:
        row = self._r().execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def counters(self) -> dict[str, int]:
        return {n: int(v) for n, v in self._r().execute("SELECT name, value FROM counters")}

    def label_counts(self) -> dict[str, int]:
        out = {"spam": 0, "ham": 0}
        for label, n in self._r().execute("SELECT label, COUNT(*) FROM labels GROUP BY label"):
            out[label] = int(n)
        return out

    def labels(self) -> dict[str, str]:
        return dict(self._r().execute("SELECT message_id, label FROM labels"))

    def weights(self) -> dict[str, float]:
        return {r: reporter_weight(a, d) for r, a, d in self._r().execute("SELECT reporter, agree, disagree FROM reporters")}

    def reporter_weight(self, reporter: str) -> float:
        row = self._r().execute("SELECT agree, disagree FROM reporters WHERE reporter=?", (reporter,)).fetchone()
        return reporter_weight(row[0], row[1]) if row else 1.0

    def vote_count(self) -> int:
        return int(self._r().execute("SELECT COUNT(*) FROM votes WHERE retracted=0").fetchone()[0])

    def known_messages(self, ids: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = list(ids[i : i + 500])
            q = f"SELECT message_id FROM messages WHERE message_id IN ({','.join('?' * len(chunk))})"
            out.update(r[0] for r in self._r().execute(q, chunk))
        return out

    def learn_log(self, after_seq: int = 0) -> list[tuple[int, str, bytes, str, str, int, int]]:
        """(seq, message_id, raw, label, topic, partition, offset) learned by the incremental model, in order."""
        return list(
            self._r().execute(
                "SELECT l.seq, l.message_id, m.raw, l.label, l.topic, l.partition, l.offset FROM learn_log l "
                "JOIN messages m USING (message_id) WHERE l.seq > ? ORDER BY l.seq",
                (after_seq,),
            )
        )

    def consensus_of(self, message_ids: Sequence[str], bar: float) -> dict[str, str | None]:
        """Each message's consensus label (or None) with today's reporter weights, at weight margin ``bar``."""
        weights = self.weights()
        votes: dict[str, list[tuple[str, float]]] = {mid: [] for mid in message_ids}
        ids = list(votes)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            q = f"SELECT reporter, message_id, label FROM votes WHERE retracted=0 AND message_id IN ({','.join('?' * len(chunk))})"
            for reporter, mid, label in self._r().execute(q, chunk):
                votes[mid].append((label, weights.get(reporter, 1.0)))
        return {mid: consensus(v, bar)[0] for mid, v in votes.items()}

    def current_consensus(self, *, holdout: bool | None = None) -> list[tuple[str, bytes, str]]:
        """(message_id, raw, label) of every message whose consensus with today's weights reaches the bar."""
        weights = self.weights()
        votes: dict[str, list[tuple[str, float]]] = {}
        for reporter, mid, label in self._r().execute("SELECT reporter, message_id, label FROM votes WHERE retracted=0"):
            votes.setdefault(mid, []).append((label, weights.get(reporter, 1.0)))
        out: list[tuple[str, bytes, str]] = []
        q = "SELECT message_id, raw, holdout FROM messages ORDER BY message_id"
        for mid, raw, ho in self._r().execute(q):
            if holdout is not None and bool(ho) != holdout:
                continue
            label, _ = consensus(votes.get(mid, ()), self.min_weight)
            if label is not None:
                out.append((mid, bytes(raw), label))
        return out

    def pending_evidence(self, limit: int = 500) -> list[tuple[int, str, str, str, bytes]]:
        """Votes not yet judged against the model: (seq, reporter, message_id, label, raw), oldest first."""
        done = self.counter("evidence_seq")
        return [
            (seq, rep, mid, label, bytes(raw))
            for seq, rep, mid, label, raw in self._r().execute(
                "SELECT v.seq, v.reporter, v.message_id, v.label, m.raw FROM vote_log v JOIN messages m USING (message_id) "
                "WHERE v.seq > ? ORDER BY v.seq LIMIT ?",
                (done, limit),
            )
        ]

    def apply_model_evidence(self, upto_seq: int, evidence: Sequence[tuple[str, int]]) -> None:
        """Add the model's verdicts on votes up to ``upto_seq`` to reputations (once: the watermark is in the
        same transaction)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT value FROM counters WHERE name='evidence_seq'").fetchone()
                if row is not None and upto_seq <= int(row[0]):
                    db.execute("ROLLBACK")
                    return
                for reporter, e in evidence:
                    if e:
                        db.execute(
                            "UPDATE reporters SET agree=agree+?, disagree=disagree+? WHERE reporter=?",
                            (1.0 if e > 0 else 0.0, 1.0 if e < 0 else 0.0, reporter),
                        )
                db.execute(
                    "INSERT INTO counters VALUES ('evidence_seq', ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                    (upto_seq,),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def offset_ranges(self, message_ids: Iterable[str]) -> dict[str, list[int]]:
        """``"topic:partition" -> [first, last]`` offsets of the live votes behind ``message_ids`` (lineage)."""
        wanted = set(message_ids)
        ranges: dict[str, list[int]] = {}
        for mid, topic, part, off in self._r().execute(
            "SELECT message_id, topic, partition, offset FROM votes WHERE retracted=0"
        ):
            if mid in wanted:
                key = f"{topic}:{part}"
                r = ranges.setdefault(key, [off, off])
                r[0], r[1] = min(r[0], off), max(r[1], off)
        return dict(sorted(ranges.items()))

    # -- the one write path ----------------------------------------------------------------------------
    def apply(
        self,
        records: Sequence[Record],
        model_probability: Callable[[list[bytes]], list[float | None]] | None = None,
    ) -> BatchResult:
        """Apply a batch of records atomically (labels, reputations and offsets in one transaction)."""
        res = BatchResult()
        fresh: list[tuple[Record, Any]] = []
        with self._lock:
            high = dict(self._offsets)
            for rec in records:
                tp = (rec.topic, rec.partition)
                if rec.offset <= high.get(tp, -1):
                    res.skipped += 1
                    continue
                high[tp] = rec.offset
                try:
                    ev = decode(rec.value)
                except EventInvalid as exc:
                    res.dead.append((rec, exc.reason))
                    fresh.append((rec, None))
                    continue
                if not isinstance(ev, (FeedbackEvent, RetractionEvent)):
                    res.dead.append((rec, f"{ev.type} event on the feedback topic"))
                    fresh.append((rec, None))
                    continue
                fresh.append((rec, ev))
            if not fresh:
                return res
            # The model's opinion, batched: one scoring call for every flagged message with bytes.
            probs: dict[str, float | None] = {}
            if model_probability is not None:
                todo: dict[str, bytes] = {}
                for _, ev in fresh:
                    if isinstance(ev, FeedbackEvent) and ev.raw is not None and ev.message_id not in todo:
                        raw = ev.raw_bytes()
                        if raw is not None:
                            todo[ev.message_id] = raw
                if todo:
                    try:
                        probs = dict(zip(todo, model_probability(list(todo.values())), strict=True))
                    except Exception:  # noqa: BLE001 - reputation then just lacks model evidence
                        log.exception("model scoring for reputation failed")
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
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                res.learned.clear()
                raise
            self._offsets = high
        return res

    def _bump(self, name: str, n: int) -> None:
        if n:
            self._db.execute(
                "INSERT INTO counters VALUES (?,?) ON CONFLICT(name) DO UPDATE SET value=value+excluded.value", (name, n)
            )

    def _evidence(self, reporter: str, agree: float, disagree: float) -> None:
        self._db.execute(
            "INSERT INTO reporters VALUES (?,?,?,1) ON CONFLICT(reporter) DO UPDATE SET "
            "agree=agree+excluded.agree, disagree=disagree+excluded.disagree, flags=flags+1",
            (reporter, agree, disagree),
        )

    def _votes_on(self, message_id: str, exclude: str | None = None) -> list[tuple[str, float]]:
        rows = self._db.execute(
            "SELECT v.reporter, v.label, COALESCE(r.agree, 0), COALESCE(r.disagree, 0) FROM votes v "
            "LEFT JOIN reporters r USING (reporter) WHERE v.message_id=? AND v.retracted=0",
            (message_id,),
        ).fetchall()
        return [(label, reporter_weight(a, d)) for rep, label, a, d in rows if rep != exclude]

    def _flag(self, rec: Record, ev: FeedbackEvent, prob: float | None, res: BatchResult) -> str | None:
        db = self._db
        res.flags += 1
        known = db.execute("SELECT raw FROM messages WHERE message_id=?", (ev.message_id,)).fetchone()
        raw: bytes | None = bytes(known[0]) if known else None
        if raw is None:
            raw = ev.raw_bytes()
            if raw is None:
                return "flag without message bytes for a message the worker has never seen"
            db.execute(
                "INSERT INTO messages VALUES (?,?,?,?,?,?)",
                (ev.message_id, raw, int(is_holdout(ev.message_id)), rec.topic, rec.partition, rec.offset),
            )
        prev = db.execute(
            "SELECT label, retracted FROM votes WHERE reporter=? AND message_id=?", (ev.reporter, ev.message_id)
        ).fetchone()
        if prev is not None and prev[0] == ev.label and not prev[1]:
            res.duplicates += 1
            return None
        # Reputation evidence, judged before this vote counts.
        others, _ = consensus(self._votes_on(ev.message_id, exclude=ev.reporter), self.min_weight)
        agree = disagree = 0.0
        if others is not None:
            agree, disagree = (1.0, 0.0) if others == ev.label else (0.0, 1.0)
        m = model_evidence(ev.label, prob)
        agree += m > 0
        disagree += m < 0
        self._evidence(ev.reporter, agree, disagree)
        res.accepted_flags += 1
        res.touched_reporters.add(ev.reporter)
        db.execute(
            "INSERT INTO votes VALUES (?,?,?,?,?,?,?,0) ON CONFLICT(reporter, message_id) DO UPDATE SET "
            "label=excluded.label, event_id=excluded.event_id, topic=excluded.topic, partition=excluded.partition, "
            "offset=excluded.offset, retracted=0",
            (ev.reporter, ev.message_id, ev.label, ev.event_id, rec.topic, rec.partition, rec.offset),
        )
        if prob is None:  # the model's opinion is judged later, off the ingest path (see Learner)
            db.execute("INSERT INTO vote_log (reporter, message_id, label) VALUES (?,?,?)", (ev.reporter, ev.message_id, ev.label))
        self._relabel(ev.message_id, raw, rec, res)
        return None

    def _retract(self, ev: RetractionEvent, res: BatchResult) -> None:
        cur = self._db.execute(
            "UPDATE votes SET retracted=1 WHERE event_id=? AND reporter=? AND retracted=0", (ev.retracts, ev.reporter)
        )
        if cur.rowcount:
            res.retractions += 1
            self._relabel(ev.message_id, None, None, res)

    def _relabel(self, message_id: str, raw: bytes | None, rec: Record | None, res: BatchResult) -> None:
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
        if label == old:
            return
        res.new_labels[label] += 1
        if rec is None or raw is None:
            return
        if not is_holdout(message_id):
            cur = db.execute(
                "INSERT INTO learn_log (message_id, label, topic, partition, offset) VALUES (?,?,?,?,?)",
                (message_id, label, rec.topic, rec.partition, rec.offset),
            )
            res.learned.append((int(cur.lastrowid or 0), message_id, raw, label, rec.topic, rec.partition, rec.offset))


# ----------------------------------------------------------------------------------------------- metrics
class WorkerMetrics:
    """The worker's Prometheus series (names fixed by the team contract); one registry per worker."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("flywheel_worker_events_total", "Feedback-topic records by type and outcome.", ["type", "outcome"], registry=r)
        self.labels = Counter("flywheel_labels_total", "Labels accepted by consensus.", ["label"], registry=r)
        self.decisions = Counter("flywheel_gate_decisions_total", "Gate decisions.", ["decision", "kind"], registry=r)
        self.one_minus_auc = Gauge("flywheel_model_one_minus_auc", "1-AUC on the gate's evaluation set.", ["role", "kind"], registry=r)
        self.recall = Gauge("flywheel_model_recall_at_fpr", "Spam recall at 1% FPR on the evaluation set.", ["kind", "fpr"], registry=r)
        self.examples = Gauge("flywheel_training_examples", "Examples the latest model of each kind learned from.", ["kind"], registry=r)
        self.reporter_weight = Gauge("flywheel_reporter_weight", "Reputation weight of each reporter.", ["reporter"], registry=r)
        self.lag = Gauge("flywheel_worker_lag_records", "Records on the feedback topic not yet processed.", registry=r)
        self.rules_recall = Gauge("flywheel_rules_recall_at_fpr", "Rule-score recall at 1% FPR on the evaluation set.", ["fpr"], registry=r)
        self.rules_active = Gauge("flywheel_rules_active", "Active rules in the worker's rule set.", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)


# ----------------------------------------------------------------------------------------------- learning
@dataclass(slots=True)
class EvalSet:
    """Featurized evaluation messages (held-out labels + the corpus's later period), by message id."""

    ids: list[str]
    y: Any  # np.ndarray[bool]
    batch: Any  # FeatureBatch
    rule_scores: Any  # np.ndarray[float]


class Learner:
    """The models side of the worker: two learning clocks, the gate, lineage, promotion.

    * Incremental clock: every accepted (non-held-out) label is learned at once by ``LinearModel.partial_fit``;
      a candidate is published every ``linear_publish_every`` labels or ``linear_publish_s`` seconds (when new
      labels arrived), at most one at a time, from a snapshot, in a publisher thread.
    * Batch clock: every ``neural_retrain_every`` new labels the PyTorch model retrains in a background thread on
      the consensus training set (today's reputations) plus the corpus's earlier period.
    * The gate (:func:`gate_rule`) scores challenger and champion on the same :class:`EvalSet`: the held-out
      labelled messages (1 in 10 by id hash, per class never trained on) and a fixed stratified sample of the
      corpus's later period minus every flagged message. Each decision goes to the registry decisions log, the
      model-events topic and the metrics.

    The incremental model's starting point (``base``) is stored once in the worker's directory; on start the
    learner loads it and replays the learn log, so after a crash it is exactly the model it was.
    """

    def __init__(
        self,
        settings: Settings,
        store: LabelStore,
        metrics: WorkerMetrics,
        emit: Callable[[Any], None],
        *,
        corpus_eval: Sequence[tuple[str, bytes, bool]] = (),
        corpus_train: Sequence[tuple[bytes, bool]] = (),
    ) -> None:
        from models.registry import Registry
        from models.rules import RuleEngine

        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.emit = emit
        self.registry = Registry(settings.registry)
        self.rules = RuleEngine.default()
        self._rules_mtime: float | None = None
        self._eval_cache: dict[str, tuple[Any, float]] = {}
        self.refresh_rules()
        self.dir = settings.state_dir / "worker"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.corpus_eval = list(corpus_eval)
        self.corpus_train = list(corpus_train)
        self.gate_lock = threading.Lock()
        self.model_lock = threading.Lock()
        self._row_cache: dict[str, Any] = {}
        self.linear = self._base_model()
        self.base = copy.deepcopy(self.linear)  # never learns: the anchor of reputation evidence
        self.learned_seq = 0
        self.learned_digests: list[str] = []
        self.learned_rows: list[tuple[str, int, int, str]] = []  # (topic, partition, offset, label)
        self.since_publish = 0
        self.last_publish = time.monotonic()
        self.labels_at_neural = 0
        self._publishing = threading.Event()
        self._neural_busy = threading.Event()
        self._threads: list[threading.Thread] = []
        self.anchor_version: str | None = None  # best champion of the incremental chain (see gate_rule)
        self._loaded: dict[str, Any] = {}
        self._champion_cache: tuple[str, Any] | None = None
        self.replay()
        self.labels_at_neural = sum(self.store.label_counts().values())

    def bootstrap(self) -> str | None:
        """With no champion at all, gate the current incremental model (it wins by default) so the API has one."""
        if self.registry.champion() is not None:
            return None
        path = self.dir / "tmp" / "linear-bootstrap.onnx"
        with self.model_lock:

            model = copy.deepcopy(self.linear)
        model.export_onnx(path)
        lineage = {"source": "base model (corpus earlier period)", "offsets": {}, "counts": {"spam": 0, "ham": 0},
                   "learn_log_seq": self.learned_seq, "corpus_examples": len(self.corpus_train)}
        hp = {"alpha": model.config.alpha, "epochs": model.config.epochs, "seed": model.config.seed}
        return self.challenge("linear", path, model.features, model.predict_proba, lineage, hp, training_s=0.0, state=model)

    # -- features -------------------------------------------------------------------------------------
    def featurize(self, raws: Sequence[bytes], features: Any = None) -> tuple[Any, list[Any]]:
        from models.features import featurize
        from models.message import parse

        msgs = [parse(r, max_bytes=self.settings.analyse_bytes) for r in raws]
        results = [self.rules.evaluate(m) for m in msgs]
        return featurize(msgs, results, features or self.linear.features), results

    def rows(self, items: Sequence[tuple[str, bytes]], features: Any = None) -> Any:
        """Feature rows of (key, raw) pairs, cached by key: each message is parsed and hashed once per process
        (learning, the gate's evaluation set and the neural training set all reuse it)."""
        from models.features import FeatureBatch

        todo = [(k, raw) for k, raw in dict(items).items() if k not in self._row_cache]
        if todo:
            batch, _ = self.featurize([raw for _, raw in todo], features)
            for i, (k, _) in enumerate(todo):
                self._row_cache[k] = batch.row(i)
        return FeatureBatch.concat([self._row_cache[k] for k, _ in items])

    # -- the incremental model ------------------------------------------------------------------------
    def _base_model(self) -> Any:
        """The incremental model's fixed starting point: stored base, else the champion's linear state, else
        a linear model trained on the corpus's earlier period (saved as the base either way)."""
        from models.linear import LinearModel, train_linear

        base = self.dir / "linear_base.npz"
        if base.exists():
            return LinearModel.load(base)
        model = None
        champ = self.registry.champion()
        for v in ([champ] if champ else []) + [i.version for i in reversed(self.registry.list()) if i.kind == "linear"]:
            state = self.registry.root / "versions" / v / "linear_state.npz"
            if state.exists():
                model = LinearModel.load(state)
                break
        if model is None and self.corpus_train:
            import numpy as np

            batch = self.rows([(f"corpus:{i}", r) for i, (r, _) in enumerate(self.corpus_train)], LinearModel().features)
            model = train_linear(batch, np.array([int(s) for _, s in self.corpus_train]))
        if model is None:
            model = LinearModel()
        model.save(base)
        return model

    def replay(self) -> None:
        """Re-learn the learn log on top of the base (start-up after a stop or a crash)."""
        rows = self.store.learn_log()
        for i in range(0, len(rows), 1000):
            self._learn(rows[i : i + 1000])
        self.since_publish = 0
        log.info("incremental model replayed", labels=len(rows), seq=self.learned_seq)

    def _learn(self, items: Sequence[tuple[int, str, bytes, str, str, int, int]]) -> None:
        """One ``partial_fit`` over a chunk of the learn log, in log order (an SGD pass over those rows)."""
        import numpy as np

        if not items:
            return
        # A label is learned only while its votes still carry half the bar with today's weights: a flag that made
        # a label while its reporter was a newcomer is dropped once the models' evidence has shown the reporter
        # hostile (weight < 0.5 takes five sure contradictions more than agreements), while one honest mistake
        # (weight 0.8) does not silence a reporter.
        now = self.store.consensus_of([it[1] for it in items], bar=0.5 * self.settings.consensus_min_weight)
        kept = [it for it in items if now.get(it[1]) == it[3]]
        with self.model_lock:
            if kept:
                batch = self.rows([(it[1], it[2]) for it in kept])
                self.linear.partial_fit(batch, np.array([1 if it[3] == "spam" else 0 for it in kept]))
            self.learned_seq = items[-1][0]
            for _, _, raw, label, t, p, o in kept:
                self.learned_digests.append(hashlib.sha256(raw).hexdigest() + ("1" if label == "spam" else "0"))
                self.learned_rows.append((t, p, o, label))
        self.since_publish += len(kept)

    def _judge_votes(self, chunk: int = 500) -> int:
        """Reputation evidence from the model, for votes the ingest path recorded; returns how many."""
        pending = self.store.pending_evidence(chunk)
        if not pending:
            return 0
        probs = self.probability([raw for *_, raw in pending])
        evidence = [(rep, model_evidence(label, p)) for (_, rep, _, label, _), p in zip(pending, probs, strict=True)]
        self.store.apply_model_evidence(pending[-1][0], evidence)
        return len(pending)

    def step(self, chunk: int = 500) -> int:
        """Catch up with the store: judge new votes, learn new labels, run whichever clock is due."""
        judged = self._judge_votes(chunk)
        if judged == chunk:  # judge every vote before learning the labels they made
            return judged
        items = self.store.learn_log(self.learned_seq)[:chunk]
        self._learn(items)
        self.maybe_publish()
        self.maybe_retrain_neural()
        return judged + len(items)

    def start(self) -> None:
        """Run :meth:`step` in a background thread, woken by :meth:`wake` after every ingested batch.

        Learning is off the ingest path: ingestion is durable at its own rate and the model catches up in
        chunks (a burst makes the model lag for a moment, never the consumer).
        """
        self._stop = threading.Event()
        self._wake = threading.Event()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    if self.step() == 0:
                        self._wake.wait(0.5)
                        self._wake.clear()
                except Exception:  # noqa: BLE001 - keep learning alive; the store is the source of truth
                    log.exception("learner step failed")
                    self._stop.wait(1.0)

        t = threading.Thread(target=loop, name="learner", daemon=True)
        self._loop_thread = t
        t.start()

    def wake(self) -> None:
        ev = getattr(self, "_wake", None)
        if ev is not None:
            ev.set()

    def stop(self) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
            self._wake.set()
            self._loop_thread.join(10.0)

    def probability(self, raws: list[bytes]) -> list[float | None]:
        """The models' opinion for reputation evidence: sure only where the incremental model AND the base
        model (which never learned from feedback) are both sure, and then the less sure of the two.

        The incremental model alone can be talked into certainty by the very reporters it judges: a hostile
        reporter's labels make it sure of their next flags, which then earn agreement. The base model anchors
        it: a poisoner cannot move it, and drift is still followed where both models agree.
        """
        if not self.linear.fitted:
            return [None] * len(raws)
        batch, _ = self.featurize(raws)
        with self.model_lock:
            current = self.linear.predict_proba(batch)
        base = self.base.predict_proba(batch) if self.base.fitted else current
        out: list[float | None] = []
        for c, b in zip(current, base, strict=True):
            lo, hi = float(min(c, b)), float(max(c, b))
            out.append(lo if lo >= SURE_HIGH else hi if hi <= SURE_LOW else 0.5)
        return out

    # -- publishing -----------------------------------------------------------------------------------
    def maybe_publish(self, force: bool = False) -> bool:
        due = self.since_publish >= self.settings.linear_publish_every or (
            self.since_publish > 0 and time.monotonic() - self.last_publish >= self.settings.linear_publish_s
        )
        if not (due or (force and self.since_publish > 0)) or self._publishing.is_set():
            return False

        with self.model_lock:
            snapshot = copy.deepcopy(self.linear)
            seq, digests, rows = self.learned_seq, list(self.learned_digests), list(self.learned_rows)
        self.since_publish = 0
        self.last_publish = time.monotonic()
        self._publishing.set()
        t = threading.Thread(target=self._publish_linear, args=(snapshot, seq, digests, rows), name="publish-linear", daemon=True)
        self._threads.append(t)
        t.start()
        return True

    def _publish_linear(self, model: Any, seq: int, digests: list[str], rows: list[tuple[str, int, int, str]]) -> None:
        try:
            hashes = hashlib.sha256("".join(sorted(digests)).encode("ascii")).hexdigest()
            ranges: dict[str, list[int]] = {}
            counts = {"spam": 0, "ham": 0}
            for t, p, o, label in rows:
                r = ranges.setdefault(f"{t}:{p}", [o, o])
                r[0], r[1] = min(r[0], o), max(r[1], o)
                counts[label] += 1
            lineage = {
                "source": "feedback (incremental, on top of the base model)",
                "offsets": dict(sorted(ranges.items())),
                "counts": counts,
                "learn_log_seq": seq,
                "training_set_hash": hashes,
                "base": "linear_base.npz (champion's linear state or the corpus's earlier period)",
            }
            started = time.monotonic()
            path = self.dir / "tmp" / f"linear-{seq}.onnx"
            model.export_onnx(path)
            hp = {"alpha": model.config.alpha, "average": model.config.average, "seed": model.config.seed, "mode": "partial_fit"}
            self.challenge("linear", path, model.features, lambda b: model.predict_proba(b), lineage, hp,
                           training_s=time.monotonic() - started)
        except Exception:  # noqa: BLE001 - a failed publish must not stop ingestion; the next one retries
            log.exception("linear publish failed")
        finally:
            self._publishing.clear()

    # -- the neural clock -----------------------------------------------------------------------------
    def maybe_retrain_neural(self, force: bool = False) -> bool:
        total = sum(self.store.label_counts().values())
        if self._neural_busy.is_set():
            return False
        if not force and total - self.labels_at_neural < self.settings.neural_retrain_every:
            return False
        self.labels_at_neural = total
        self._neural_busy.set()
        t = threading.Thread(target=self._retrain_neural, name="retrain-neural", daemon=True)
        self._threads.append(t)
        t.start()
        return True

    def _retrain_neural(self) -> None:
        try:
            self.retrain_neural()
        except Exception:  # noqa: BLE001
            log.exception("neural retrain failed")
        finally:
            self._neural_busy.clear()

    def retrain_neural(self) -> str | None:
        """Train the PyTorch challenger on consensus labels + the corpus's earlier period; gate it."""
        import numpy as np

        t_trigger = time.monotonic()
        feedback = self.store.current_consensus(holdout=False)
        keyed = [(mid, raw) for mid, raw, _ in feedback] + [(f"corpus:{i}", r) for i, (r, _) in enumerate(self.corpus_train)]
        raws = [raw for _, raw in keyed]
        y = np.array([label == "spam" for *_, label in feedback] + [s for _, s in self.corpus_train], dtype=np.int64)
        if len(set(y.tolist())) < 2:
            log.info("neural retrain skipped: one class only")
            return None
        started = time.monotonic()
        started_wall = time.time() - (started - t_trigger)
        features = self.linear.features
        batch = self.rows(keyed)
        model, hp = self.select_neural(batch, y, features)
        path = self.dir / "tmp" / f"neural-{int(time.time() * 1000)}.onnx"
        model.export_onnx(path)
        from models.registry import training_set_hash

        lineage = {
            "source": "feedback consensus (today's reputations) + corpus earlier period",
            "offsets": self.store.offset_ranges(mid for mid, _, _ in feedback),
            "counts": {"spam": int(y.sum()), "ham": int((1 - y).sum())},
            "feedback_examples": len(feedback),
            "corpus_examples": len(self.corpus_train),
            "training_set_hash": training_set_hash(raws, [bool(v) for v in y]),
            "started_at_epoch": started_wall,
        }
        return self.challenge("neural", path, features, lambda b: model.predict_proba(b), lineage, hp,
                              training_s=time.monotonic() - started)

    NEURAL_CANDIDATES: tuple[dict[str, Any], ...] = ({}, {"epochs": 4, "dim": 16})

    def select_neural(self, batch: Any, y: Any, features: Any) -> tuple[Any, dict[str, Any]]:
        """Hyperparameters by validation: each candidate trains on 85% (stratified, seeded) and is scored on
        the other 15%; the best by validation 1-AUC is the challenger (the validation rows are its price)."""
        import numpy as np

        from models.evaluate import roc_auc
        from models.neural import NeuralConfig, train_neural

        rng = np.random.default_rng(0)
        val = np.zeros(len(y), dtype=bool)
        for c in (0, 1):
            idx = np.flatnonzero(y == c)
            val[rng.choice(idx, size=max(1, int(0.15 * idx.size)), replace=False)] = True
        tr, va = np.flatnonzero(~val), np.flatnonzero(val)
        train_b, val_b = batch.take(tr), batch.take(va)
        best: tuple[float, Any, dict[str, Any]] | None = None
        tried = []
        for overrides in self.NEURAL_CANDIDATES:
            cfg = NeuralConfig(**{**NeuralConfig().to_dict(), **overrides})
            model = train_neural(train_b, y[tr], cfg, seed=0, features=features)
            score = 1.0 - roc_auc(model.decision_function(val_b), y[va].astype(bool))
            tried.append({"config": overrides or "default", "validation_one_minus_auc": score})
            if best is None or score < best[0]:
                best = (score, model, cfg.to_dict())
        assert best is not None
        hp = {**best[2], "selected_by": "validation 1-AUC (15% stratified)", "candidates": tried,
              "train_rows": int(tr.size), "validation_rows": int(va.size)}
        return best[1], hp

    # -- evaluation and the gate -----------------------------------------------------------------------
    def refresh_rules(self) -> bool:
        """Follow the operators' rule changes (the API persists them to the rules file); True when reloaded.

        The rule scores of the evaluation set change with the rules, so its cache is dropped; feature rows
        already learned keep the rule hits they were learned with.
        """
        from models.rules import RuleEngine, RuleError

        path = self.settings.rules_file
        mtime = path.stat().st_mtime if path.exists() else None
        if mtime == self._rules_mtime:
            return False
        try:
            self.rules = RuleEngine.load(path) if mtime is not None else RuleEngine.default()
        except (OSError, RuleError) as exc:
            log.warning("rules file refused; keeping the current rules", path=str(path), error=str(exc))
            return False
        self._rules_mtime = mtime
        self._eval_cache.clear()
        self.metrics.rules_active.set(self.rules.active_count)
        return True

    def eval_set(self) -> EvalSet:
        """Held-out labels (today's consensus) + the corpus sample minus every flagged message."""
        import numpy as np

        from models.evaluate import recall_at_fpr
        from models.features import FeatureBatch

        self.refresh_rules()

        held = self.store.current_consensus(holdout=True)
        flagged = self.store.known_messages([mid for mid, _, _ in self.corpus_eval])
        items = [(mid, raw, label == "spam") for mid, raw, label in held]
        items += [(mid, raw, s) for mid, raw, s in self.corpus_eval if mid not in flagged]
        todo = [(mid, raw) for mid, raw, _ in items if mid not in self._eval_cache]
        if todo:
            batch, results = self.featurize([raw for _, raw in todo])
            for i, (mid, _) in enumerate(todo):
                self._eval_cache[mid] = (batch.row(i), float(results[i].score))
        rows = [self._eval_cache[mid] for mid, _, _ in items]
        ev = EvalSet(
            ids=[mid for mid, _, _ in items],
            y=np.array([s for *_, s in items], dtype=bool),
            batch=FeatureBatch.concat([b for b, _ in rows]),
            rule_scores=np.array([s for _, s in rows], dtype=np.float64),
        )
        if ev.y.any() and not ev.y.all():  # the rules' side of the improvement curves (x: flywheel_rules_active)
            self.metrics.rules_recall.labels(fpr="0.01").set(recall_at_fpr(ev.rule_scores, ev.y, 0.01))
        return ev

    @staticmethod
    def split_eval(ev: EvalSet) -> tuple[EvalSet, EvalSet]:
        """Halves of the evaluation set by message-id hash: one calibrates the challenger's operating point,
        the other measures both models (a threshold fitted on the data it is judged on would flatter it)."""
        import numpy as np

        side = np.array([int(hashlib.sha256(m.encode()).hexdigest()[8:10], 16) % 2 for m in ev.ids], dtype=bool)

        def part(mask: Any) -> EvalSet:
            idx = np.flatnonzero(mask)
            return EvalSet([ev.ids[i] for i in idx], ev.y[idx], ev.batch.take(idx), ev.rule_scores[idx])

        return part(side), part(~side)

    @staticmethod
    def calibrate(model: Any, calib: EvalSet, inherited: dict[str, Any] | None) -> dict[str, Any] | None:
        """The challenger's serving calibration (blend with the rule score and both thresholds at the same FPR
        budget as the champion's), fitted on the calibration half; the inherited one when that half lacks a
        class. Labels from feedback shift the class prior, so a fixed threshold would misjudge FPR."""
        import numpy as np

        from models.classifier import Calibration, fit_calibration

        budget = Calibration.from_meta(inherited).fpr_budget
        if calib.batch.rows == 0 or calib.y.all() or not calib.y.any():
            return inherited
        z = np.asarray(model.predict_logit(calib.batch), dtype=np.float64).reshape(-1)
        return fit_calibration(z, calib.rule_scores, calib.y, fpr_budget=budget).to_dict()

    @staticmethod
    def score(model: Any, ev: EvalSet, threshold_logit: float) -> dict[str, float]:
        """1-AUC (on logits: no ties from saturated probabilities), FPR at the operating point, recall@1%."""
        import numpy as np

        from models.evaluate import recall_at_fpr, roc_auc

        if ev.batch.rows == 0:
            return {"one_minus_auc": math.nan, "fpr": math.nan, "n_spam": 0, "n_ham": 0}
        z = np.asarray(model.predict_logit(ev.batch), dtype=np.float64).reshape(-1)
        auc = roc_auc(z, ev.y)
        n_ham = int((~ev.y).sum())
        fpr = float(((z >= threshold_logit) & ~ev.y).sum() / n_ham) if n_ham else math.nan
        return {
            "one_minus_auc": 1.0 - auc if not math.isnan(auc) else math.nan,
            "auc": auc,
            "fpr": fpr,
            "threshold_logit": float(threshold_logit),
            "recall_at_fpr_1pct": recall_at_fpr(z, ev.y, 0.01) if n_ham and ev.y.any() else math.nan,
            "n_spam": int(ev.y.sum()),
            "n_ham": n_ham,
        }

    def _load(self, version: str) -> Any:
        if version not in self._loaded:
            self._loaded = {version: self.registry.load(version, max_bytes=self.settings.analyse_bytes)}
        return self._loaded[version]

    def _champion(self) -> Any:
        v = self.registry.champion()
        if v is None:
            return None
        if self._champion_cache is None or self._champion_cache[0] != v:
            self._champion_cache = (v, self.registry.load(v, max_bytes=self.settings.analyse_bytes))
        return self._champion_cache[1]

    def challenge(
        self,
        kind: str,
        onnx_path: Path,
        features: Any,
        framework_proba: Callable[[Any], Any],
        lineage: dict[str, Any],
        hyperparameters: dict[str, Any],
        *,
        training_s: float,
        state: Any = None,
    ) -> str:
        """Save a challenger, gate it against the champion, promote or reject; returns the version id."""
        from models.classifier import Calibration
        from models.registry import SelfCheckVector
        from models.runtime import OnnxModel

        with self.gate_lock:
            champ = self._champion()
            ev = self.eval_set()
            calib, test = self.split_eval(ev)
            chall_model = OnnxModel(onnx_path, use_cuda=False)
            cal = self.calibrate(chall_model, calib, champ.calibration if champ is not None else None)
            chall = self.score(chall_model, test, Calibration.from_meta(cal).model_threshold_logit)
            champ_m = None
            if champ is not None:
                champ_thr = Calibration.from_meta(champ.calibration).model_threshold_logit
                champ_m = self.score(champ.model, test, champ_thr)
            anchor_m = None
            if champ is not None:
                if self.anchor_version is None:
                    self.anchor_version = champ.version
                if self.anchor_version == champ.version:
                    anchor_m = champ_m
                else:
                    try:
                        a = self._load(self.anchor_version)
                        anchor_m = self.score(a.model, test, Calibration.from_meta(a.calibration).model_threshold_logit)
                    except Exception:  # noqa: BLE001 - a pruned or unreadable anchor: the champion anchors
                        self.anchor_version, anchor_m = champ.version, champ_m
            # Self-check vectors: a few evaluation messages with the training framework's probabilities.
            sc_raws = [raw for _, raw, _ in (self.corpus_eval[:3] or [])]
            if not sc_raws:
                sc_raws = [b"Subject: self-check\r\n\r\nhello\r\n"]
            sc_batch, sc_results = self.featurize(sc_raws, features)
            expected = framework_proba(sc_batch)
            vectors = [SelfCheckVector(raw=r, rule_result=rr, expected=float(p)) for r, rr, p in zip(sc_raws, sc_results, expected, strict=True)]
            parent = champ.version if champ is not None else None
            version = self.registry.save(
                kind=kind, model_path=onnx_path, features=features, self_check=vectors,
                metrics={"gate": chall, "evaluation_set": {"n_spam": chall.get("n_spam"), "n_ham": chall.get("n_ham")}},
                lineage={**lineage, "training_s": round(training_s, 3)}, hyperparameters=hyperparameters,
                parent=parent, calibration=cal,
            )
            if state is not None and hasattr(state, "save"):
                state.save(self.registry.root / "versions" / version / "linear_state.npz")
            descends = kind == "linear" and champ is not None and champ.kind == "linear"
            result = gate_rule(
                champ_m, chall, fpr_tolerance=self.settings.gate_fpr_tolerance, descends_from_champion=descends,
                anchor=anchor_m if descends else None,
            )
            decision = "promoted" if result.promote else "rejected"
            self.registry.record_decision(
                challenger=version, decision=decision, reason=result.reason, challenger_metrics=chall,
                champion=parent, champion_metrics=champ_m,
                extra={"kind": kind, "anchor": self.anchor_version if descends else None,
                       "anchor_metrics": _finite(anchor_m) if descends and anchor_m else None},
            )
            if result.promote:
                self.registry.promote(version, result.reason)
                if anchor_m is None or not descends or chall["one_minus_auc"] < anchor_m["one_minus_auc"]:
                    self.anchor_version = version
            self.metrics.decisions.labels(decision=decision, kind=kind).inc()
            self.metrics.one_minus_auc.labels(role="challenger", kind=kind).set(chall["one_minus_auc"])
            if champ_m is not None:
                self.metrics.one_minus_auc.labels(role="champion", kind=champ.kind).set(champ_m["one_minus_auc"])
            if result.promote:
                self.metrics.one_minus_auc.labels(role="champion", kind=kind).set(chall["one_minus_auc"])
            self.metrics.recall.labels(kind=kind, fpr="0.01").set(chall.get("recall_at_fpr_1pct", math.nan))
            self.metrics.examples.labels(kind=kind).set(sum(lineage.get("counts", {}).values()))
            from streams.events import ModelEvent

            self.emit(ModelEvent(kind=decision, version=version, previous=parent, model_kind=kind, reason=result.reason,
                                 metrics={"challenger": _finite(chall), "champion": _finite(champ_m or {})}))
            log.info("gate decision", kind=kind, version=version, decision=decision, reason=result.reason)
            self.registry.prune(keep=self.settings.registry_keep)
            return version

    def join(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------- the process
def corpus_sets(settings: Settings, eval_cap: int = 1500) -> tuple[list[tuple[str, bytes, bool]], list[tuple[bytes, bool]]]:
    """(evaluation sample of the corpus's later period, the earlier period for training); empty without corpus.

    Later period = P1's test side (easy-ham-2, spam-2, second half of hard-ham-1); a deterministic stratified
    sample of at most ``eval_cap`` (every k-th message of each class).
    """
    from models.corpus import CorpusError, load_corpus, split_p1
    from streams.events import message_id_for

    try:
        msgs = load_corpus(settings.downloads, settings.corpus_dir)
    except (CorpusError, OSError) as exc:
        log.warning("no corpus: the gate uses held-out feedback only", error=str(exc))
        return [], []
    train, test = split_p1(msgs)
    out: list[tuple[str, bytes, bool]] = []
    for cls in (True, False):
        part = [m for m in test if m.is_spam is cls]
        share = max(1, round(eval_cap * len(part) / max(1, len(test))))
        step = max(1, len(part) // share)
        out += [(message_id_for(m.raw), m.raw, cls) for m in part[::step][:share]]
    return out, [(m.raw, m.is_spam) for m in train]


class Worker:
    """The faust app's handler: applies batches durably, learns, dead-letters, emits model events."""

    def __init__(
        self,
        settings: Settings,
        *,
        corpus: tuple[list[Any], list[Any]] | None = None,
        serve_metrics: bool = True,
        learn: bool = True,
    ) -> None:
        from streams.topics import EventProducer, Topics

        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.metrics = WorkerMetrics()
        if serve_metrics:
            self.metrics.serve(settings.worker_port)
        self.store = LabelStore(settings.state_dir / "worker" / "labels.db", min_weight=settings.consensus_min_weight)
        self.producer = EventProducer(settings, timeout_s=5.0, client_id="flywheel-worker")
        self.learner: Learner | None = None
        if learn:
            ce, ct = corpus if corpus is not None else corpus_sets(settings)
            self.learner = Learner(settings, self.store, self.metrics, self._emit_model_event, corpus_eval=ce, corpus_train=ct)
            self.learner.bootstrap()
            self.learner.start()
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        self._app: Any = None
        for label, n in self.store.label_counts().items():
            self.metrics.labels.labels(label=label).inc(0)
        self._refresh_weights(self.store.weights())

    def _emit_model_event(self, event: Any) -> None:
        from streams.topics import BrokerUnavailable

        try:
            self.producer.send(self.topics.model_events, event.version, event)
        except BrokerUnavailable:
            log.warning("model event not published (Kafka down); the registry has the decision", version=event.version)

    def _refresh_weights(self, weights: dict[str, float]) -> None:
        for reporter, w in weights.items():
            self.metrics.reporter_weight.labels(reporter=reporter).set(w)

    # -- the BatchHandler protocol --------------------------------------------------------------------
    async def on_start(self, app: Any) -> None:
        self._app = app

    async def handle(self, records: Sequence[Record]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._exec, self.process, list(records))

    async def tick(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._exec, self._tick)
        self._update_lag()

    # -- work (ingest thread) -------------------------------------------------------------------------
    def process(self, records: list[Record]) -> BatchResult:
        res = self.store.apply(records)
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
        if res.touched_reporters:
            w = self.store.weights()
            self._refresh_weights({r: w[r] for r in res.touched_reporters if r in w})
        if self.learner is not None:
            self.learner.wake()
        return res

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

    def _tick(self) -> None:
        if self.learner is not None:
            self.learner.wake()

    def _update_lag(self) -> None:
        app = self._app
        if app is None:
            return
        try:
            consumer = app.consumer
            offsets = self.store.last_offsets()
            lag = 0
            for tp in consumer.assignment():
                hw = consumer.highwater(tp)
                if hw is not None:
                    lag += max(0, int(hw) - 1 - offsets.get((tp.topic, tp.partition), -1))
            self.metrics.lag.set(lag)
        except Exception:  # noqa: BLE001 - lag is best effort
            log.debug("lag update failed", exc_info=True)

    def close(self) -> None:
        self._exec.shutdown(wait=True)
        if self.learner is not None:
            self.learner.stop()
            self.learner.join()
        self.producer.close()
        self.store.close()


def run_worker(settings: Settings, *, learn: bool = True) -> None:
    """``flywheel worker``: consume feedback until SIGTERM/SIGINT (the broker and topics must exist).

    ``learn=False`` ingests only (labels, reputations, dead letters; no models): for tests of delivery.
    """
    from streams.app import make_app, run_app

    worker = Worker(settings, learn=learn)
    app = make_app(settings, worker)
    log.info("worker starting", feedback=worker.topics.feedback, metrics_port=settings.worker_port,
             labels=worker.store.label_counts(), learn=learn)
    try:
        run_app(app, loglevel=settings.log_level)
    finally:
        worker.close()


def main() -> None:
    """``python -m services.worker`` (what the tests start and ``kill -9``)."""
    from services.logging import configure
    from services.settings import get_settings

    import sys

    s = get_settings()
    configure(s.log_level, s.log_json)
    run_worker(s, learn="--ingest-only" not in sys.argv[1:])


if __name__ == "__main__":
    main()
