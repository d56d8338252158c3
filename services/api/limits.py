"""Rate limits on feedback: token buckets per reporter and per source, and a bound on new reporters per source.

A *reporter* is who a flag is attributed to (``alice``, ``mx:bob`` for a relay's user, ``spamd:carol``); a
*source* is who vouches for it: the API key's identity (for a relay, all its users together) or the spamd
client's address. A source that invents a new reporter for every flag (each one starts with full weight in the
worker's reputation) is refused once it introduced ``new_reporters`` of them within ``window_s``.

The state lives in one SQLite file under ``<state_dir>/api/`` shared by every API worker process: limits hold
exactly however the kernel spreads connections over workers (keep-alive connections stick to one worker, so
limits divided by the worker count would let a client that lands on one worker through at 1/N of its share,
and one that is spread over all of them through N times). Feedback is low-rate and already waits for a Kafka
acknowledgement, so one small transaction (WAL, ``BEGIN IMMEDIATE``) per flag costs little; callers run it off
the event loop. Replicas on other hosts keep their own file, so across hosts the limits add up.
"""

from __future__ import annotations

import fcntl
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.settings import Settings

REPORTER_MEMORY_S = 30 * 86400.0
"""A reporter a source has not used for this long is forgotten (and counts as new again)."""
_IDLE_BUCKET_S = 86400.0
"""A bucket idle this long is full for any sane rate, so its row can go."""
_PRUNE_EVERY = 1000


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a flag was refused and when to try again."""

    reason: str  # rate_limited | new_reporter_limit
    detail: str
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class Limits:
    identity_rate: float
    identity_burst: int
    source_rate: float
    source_burst: int
    new_reporters: int
    window_s: float


class FeedbackLimiter:
    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._ops = 0
        # Every API worker process opens this file at start-up. Switching a new file to WAL needs an exclusive
        # lock that SQLite does not wait for (it answers "database is locked" at once, busy timeout or not), so
        # the first-open steps are serialised across processes by a lock file.
        with self._lock, open(path.with_name(path.name + ".init-lock"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, "
                             "updated REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS reporters (source TEXT NOT NULL, reporter TEXT NOT NULL, "
                             "first_seen REAL NOT NULL, last_seen REAL NOT NULL, PRIMARY KEY (source, reporter))")
            self._db.execute("CREATE INDEX IF NOT EXISTS reporters_first ON reporters (source, first_seen)")

    @classmethod
    def from_settings(cls, path: Path, s: Settings) -> FeedbackLimiter:
        return cls(path, Limits(
            identity_rate=s.feedback_identity_rate, identity_burst=s.feedback_identity_burst,
            source_rate=s.feedback_source_rate, source_burst=s.feedback_source_burst,
            new_reporters=s.feedback_new_reporters, window_s=s.feedback_new_reporters_window_s,
        ))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def check(self, reporter: str, source: str, *, new_reporter_allowed: bool = True) -> Refusal | None:
        """Take one token from the reporter's and the source's bucket, or none of them and a ``Refusal``.

        ``new_reporter_allowed=False`` (a retraction) refuses nothing for newness and records no reporter.
        Raises ``sqlite3.Error`` when the store cannot be used (callers refuse the flag: fail closed).
        """
        lim = self.limits
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # waits (up to 10 s) for another worker's transaction
            now = time.time()
            try:
                refusal = None
                if new_reporter_allowed:
                    refusal = self._new_reporter(reporter, source, now)
                taken: list[tuple[str, float]] = []
                if refusal is None:
                    for key, rate, burst, who in (
                        ("r\x1f" + reporter, lim.identity_rate, lim.identity_burst, f"reporter {reporter!r}"),
                        ("s\x1f" + source, lim.source_rate, lim.source_burst, f"source {source!r}"),
                    ):
                        tokens = self._tokens(key, rate, burst, now)
                        if tokens < 1.0:
                            wait = math.ceil((1.0 - tokens) / rate)
                            refusal = Refusal("rate_limited", f"too many flags from {who} (at most {burst} at once, "
                                              f"{rate:g} per second); retry in {wait} s", max(1, wait))
                            break
                        taken.append((key, tokens - 1.0))
                if refusal is None:
                    self._db.executemany("INSERT OR REPLACE INTO buckets (key, tokens, updated) VALUES (?, ?, ?)",
                                         [(k, t, now) for k, t in taken])
                    if new_reporter_allowed:
                        self._db.execute(
                            "INSERT INTO reporters (source, reporter, first_seen, last_seen) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (source, reporter) DO UPDATE SET last_seen = excluded.last_seen, "
                            "first_seen = CASE WHEN reporters.last_seen < ? THEN excluded.first_seen "
                            "ELSE reporters.first_seen END",
                            (source, reporter, now, now, now - REPORTER_MEMORY_S))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._ops += 1
            if self._ops % _PRUNE_EVERY == 0:
                self._prune(now)
        return refusal

    def _tokens(self, key: str, rate: float, burst: int, now: float) -> float:
        row = self._db.execute("SELECT tokens, updated FROM buckets WHERE key = ?", (key,)).fetchone()
        if row is None:
            return float(burst)
        tokens, updated = row
        return min(float(burst), tokens + max(0.0, now - updated) * rate)

    def _new_reporter(self, reporter: str, source: str, now: float) -> Refusal | None:
        lim = self.limits
        known = self._db.execute("SELECT last_seen FROM reporters WHERE source = ? AND reporter = ?",
                                 (source, reporter)).fetchone()
        if known is not None and now - known[0] < REPORTER_MEMORY_S:
            return None
        since = now - lim.window_s
        rows = self._db.execute(
            "SELECT first_seen FROM reporters WHERE source = ? AND first_seen > ? ORDER BY first_seen LIMIT ?",
            (source, since, lim.new_reporters)).fetchall()
        if len(rows) < lim.new_reporters:
            return None
        wait = max(1, math.ceil(rows[0][0] + lim.window_s - now))
        return Refusal("new_reporter_limit", f"source {source!r} introduced {lim.new_reporters} new reporters within "
                       f"{lim.window_s:g} s; a new reporter is accepted again in {wait} s", wait)

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM buckets WHERE updated < ?", (now - _IDLE_BUCKET_S,))
        self._db.execute("DELETE FROM reporters WHERE last_seen < ?", (now - REPORTER_MEMORY_S,))
