"""Campaign memory: near-duplicate fingerprints of flagged mail, so one trusted flag catches a campaign's copies.

Spam comes in campaigns of near-identical messages (the same text with another link, name or number). A flag
moves the learned model only at its next refit and only as far as one example moves it; a fingerprint of the
flagged message catches the campaign's later copies at once, the way rspamd's fuzzy storage and Razor do.

The fingerprint is a MinHash of the message's 4-word shingles (subject and visible text, lower-cased, with links,
e-mail addresses and every token holding a digit removed: what a campaign varies from copy to copy). The fraction
of equal MinHash values of two messages estimates the Jaccard similarity of their shingle sets. This module
implements MinHash itself in numpy rather than depending on ``datasketch``: the index below stores signatures in
preallocated arrays with a hard cap and an eviction order, which ``datasketch``'s dict-based LSH does not offer,
and the hashing is a few vectorised lines.

The index is an LSH by banding: ``BANDS`` bands of ``ROWS`` values each; two messages become candidates when one
band agrees, then the full signature's agreement is the similarity (a hit at ``threshold``, 0.6 by default). At
J = 0.6 a true pair becomes a candidate with probability 1 - (1 - 0.6^4)^32 = 0.988. Each band is a sorted array
of (band hash, slot) merged lazily with a small unsorted tail, so memory is a few hundred bytes per fingerprint
(``CampaignIndex.nbytes``) instead of a Python dict entry per band.

Ham beats spam: a query returns a spam hit only when no ham fingerprint is as near (within ``threshold``): a
"not spam" flag on list mail protects its later copies from a spam fingerprint nearby.

Pure code: no HTTP, no Kafka. The API replicas and the worker build their indexes from the same records.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BANDS",
    "MAX_WORDS",
    "MIN_SHINGLES",
    "NUM_PERM",
    "ROWS",
    "SHINGLE_WORDS",
    "CampaignHit",
    "CampaignIndex",
    "fingerprint",
    "fingerprint_text",
    "jaccard",
    "normalise",
    "shingles",
]

NUM_PERM = 128
"""MinHash values per signature: the similarity estimate's standard error at J = 0.6 is sqrt(0.24 / 128) = 0.043."""
BANDS = 32
ROWS = NUM_PERM // BANDS
SHINGLE_WORDS = 4
MIN_SHINGLES = 5
"""A text with fewer distinct shingles (under about 8 words) gets no fingerprint: too short to call a duplicate."""
MAX_WORDS = 4000
"""Only a message's first words are fingerprinted: a campaign shows in its opening, and the MinHash's work and
temporary memory (words x 128 x 8 bytes: 4 MB here) stay bounded however long the text is."""
_TAIL_MAX = 4096
"""Band entries kept unsorted (scanned linearly) before they are merged into the sorted arrays."""

_URL = re.compile(r"(?:https?://|ftp://|www\.)\S*", re.IGNORECASE)
_EMAIL = re.compile(r"\S+@\S+")
_WORD = re.compile(r"\w+", re.UNICODE)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)

_rng = np.random.default_rng(20261207)
_A = _rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
_B = _rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)
_BAND_MIX = _rng.integers(1, 2**63, size=ROWS, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_BAND_TAG = np.arange(BANDS, dtype=np.uint64) << np.uint64(59)


def normalise(text: str) -> list[str]:
    """The words a fingerprint is made of: lower-cased, without links, addresses and any token with a digit."""
    text = _EMAIL.sub(" ", _URL.sub(" ", text.lower()))
    return [w for w in _WORD.findall(text) if not any(c.isdigit() for c in w) and w != "_"]


def shingles(words: list[str], k: int = SHINGLE_WORDS) -> np.ndarray:
    """Distinct 64-bit hashes of the ``k``-word windows (stable across processes: CRC-32 per word, mixed)."""
    if len(words) < k:
        return np.zeros(0, dtype=np.uint64)
    h = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint64,
                    count=len(words))
    n = len(words) - k + 1
    acc = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            acc = acc * np.uint64(0x100000001B3) + h[j: j + n] + np.uint64(j + 1)
        acc ^= acc >> np.uint64(29)
    return np.unique(acc)


def _minhash(sh: np.ndarray) -> np.ndarray:
    """The signature of a shingle set: per permutation (multiply-shift hashing), the smallest 32-bit value."""
    with np.errstate(over="ignore"):
        v = (sh[:, None] * _A[None, :] + _B[None, :]) >> np.uint64(32)
    return v.min(axis=0).astype(np.uint32)


def fingerprint_text(text: str) -> np.ndarray | None:
    """The MinHash signature of ``text`` (uint32, ``NUM_PERM``), or None when it is too short to fingerprint."""
    sh = shingles(normalise(text)[:MAX_WORDS])
    if sh.size < MIN_SHINGLES:
        return None
    return _minhash(sh)


def fingerprint(subject: str, body_text: str) -> np.ndarray | None:
    """The signature of a parsed message: its subject and visible body text (see the module docstring)."""
    return fingerprint_text(f"{subject}\n{body_text}")


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Exact Jaccard similarity of two word lists' shingle sets (the reference the estimate approximates)."""
    sa, sb = set(shingles(list(a)).tolist()), set(shingles(list(b)).tolist())
    if not sa and not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def _band_keys(sig: np.ndarray) -> np.ndarray:
    """One 64-bit hash per band of a signature (or of a (n, NUM_PERM) stack)."""
    s = sig.reshape(-1, BANDS, ROWS).astype(np.uint64)
    with np.errstate(over="ignore"):
        keys = (s * _BAND_MIX).sum(axis=2, dtype=np.uint64)
        keys ^= keys >> np.uint64(31)
        keys = (keys >> np.uint64(5)) | _BAND_TAG  # the band's number in the top 5 bits: one sorted array for all
    return keys.reshape((*sig.shape[:-1], BANDS)) if sig.ndim > 1 else keys.reshape(BANDS)


@dataclass(frozen=True, slots=True)
class CampaignHit:
    """The nearest fingerprint that decides: its estimated similarity, its label and the flagged message's id."""

    similarity: float
    flagged: str  # "spam" | "ham"
    message_id: str

    def to_dict(self) -> dict[str, object]:
        return {"match": round(self.similarity, 3), "flagged": self.flagged, "message_id": self.message_id}


class CampaignIndex:
    """A bounded LSH index of labelled MinHash signatures (thread-safe).

    ``capacity`` fingerprints at most; adding one more evicts the oldest (by insertion; re-adding a message
    refreshes it). ``add`` with a new label replaces the old; ``remove`` forgets a message (a label withdrawn).
    """

    def __init__(self, capacity: int = 100_000, threshold: float = 0.6) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.capacity = capacity
        self.threshold = threshold
        self._sigs = np.zeros((capacity, NUM_PERM), dtype=np.uint32)
        self._spam = np.zeros(capacity, dtype=bool)
        self._live = np.zeros(capacity, dtype=bool)
        self._ids: list[str | None] = [None] * capacity
        self._slot: dict[str, int] = {}
        self._age = np.zeros(capacity, dtype=np.int64)  # insertion stamp: the smallest live one is the oldest
        self._stamp = 0
        self._next = 0  # slots are handed out in order, then reused oldest first
        # The band index: (band, key) pairs as one sorted array with their slots, plus a dict of recent entries.
        self._keys = np.zeros(0, dtype=np.uint64)
        self._key_slots = np.zeros(0, dtype=np.int32)
        self._tail: dict[int, list[int]] = {}
        self._tail_n = 0
        self._lock = threading.Lock()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._slot

    def spam_count(self) -> int:
        """Live spam fingerprints (the rest are ham)."""
        return int(np.count_nonzero(self._spam & self._live))

    def label_of(self, message_id: str) -> str | None:
        slot = self._slot.get(message_id)
        return None if slot is None else ("spam" if self._spam[slot] else "ham")

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (signatures, band index, flags), the ids' strings and the id map."""
        import sys

        arrays = (self._sigs.nbytes + self._spam.nbytes + self._live.nbytes + self._age.nbytes + self._keys.nbytes
                  + self._key_slots.nbytes + 120 * BANDS * self._tail_n)
        ids = sys.getsizeof(self._ids) + sum(sys.getsizeof(i) for i in self._slot)
        return int(arrays + ids + sys.getsizeof(self._slot))

    # -- changes -----------------------------------------------------------------------------------------
    def add(self, message_id: str, signature: np.ndarray, label: str) -> None:
        """Remember ``message_id``'s signature under ``label`` ("spam" or "ham"), evicting the oldest when full."""
        if label not in ("spam", "ham"):
            raise ValueError(f"label must be spam or ham, got {label!r}")
        sig = np.asarray(signature, dtype=np.uint32).reshape(-1)
        if sig.size != NUM_PERM:
            raise ValueError(f"a signature has {NUM_PERM} values, got {sig.size}")
        with self._lock:
            old = self._slot.pop(message_id, None)
            if old is not None:
                self._free(old)
            slot = self._take_slot()
            self._sigs[slot] = sig
            self._spam[slot] = label == "spam"
            self._live[slot] = True
            self._ids[slot] = message_id
            self._stamp += 1
            self._age[slot] = self._stamp
            self._slot[message_id] = slot
            if self._tail_n == _TAIL_MAX:
                self._merge()
            for k in _band_keys(sig).tolist():
                self._tail.setdefault(k, []).append(slot)
            self._tail_n += 1

    def remove(self, message_id: str) -> bool:
        with self._lock:
            slot = self._slot.pop(message_id, None)
            if slot is None:
                return False
            self._free(slot)
            return True

    def _free(self, slot: int) -> None:
        self._live[slot] = False
        self._ids[slot] = None
        self._age[slot] = 0

    def _take_slot(self) -> int:
        if self._next < self.capacity:
            self._next += 1
            return self._next - 1
        free = np.flatnonzero(~self._live)
        if free.size:
            return int(free[0])
        oldest = int(np.argmin(self._age))
        mid = self._ids[oldest]
        if mid is not None:
            self._slot.pop(mid, None)
        self._free(oldest)
        self.evicted += 1
        return oldest

    def _merge(self) -> None:
        """Rebuild the sorted array from the live slots (stale entries of freed slots go away)."""
        slots = np.flatnonzero(self._live).astype(np.int32)
        keys = _band_keys(self._sigs[slots]).reshape(-1)  # slot-major: entry i belongs to slots[i // BANDS]
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._key_slots = np.repeat(slots, BANDS)[order]
        self._tail = {}
        self._tail_n = 0

    # -- queries -----------------------------------------------------------------------------------------
    def _candidates(self, keys: np.ndarray) -> np.ndarray:
        found: list[np.ndarray] = []
        if self._keys.size:
            lo = np.searchsorted(self._keys, keys, side="left")
            hi = np.searchsorted(self._keys, keys, side="right")
            for a, b in zip(lo[hi > lo].tolist(), hi[hi > lo].tolist(), strict=True):
                found.append(self._key_slots[a:b])
        if self._tail:
            tail = [s for k in keys.tolist() for s in self._tail.get(k, ())]
            if tail:
                found.append(np.asarray(tail, dtype=np.int32))
        if not found:
            return np.zeros(0, dtype=np.int32)
        slots = np.unique(np.concatenate(found))
        return slots[self._live[slots]]

    def query(self, signature: np.ndarray | None) -> CampaignHit | None:
        """The deciding fingerprint at similarity >= ``threshold``: the nearest ham one when any is that near
        (ham beats spam), else the nearest spam one; None when nothing is."""
        if signature is None:
            return None
        sig = np.asarray(signature, dtype=np.uint32).reshape(-1)
        keys = _band_keys(sig)
        with self._lock:
            slots = self._candidates(keys)
            if slots.size == 0:
                return None
            sims = (self._sigs[slots] == sig[None, :]).mean(axis=1)
            near = sims >= self.threshold
            if not near.any():
                return None
            slots, sims = slots[near], sims[near]
            ham = ~self._spam[slots]
            pick = np.flatnonzero(ham) if ham.any() else np.arange(slots.size)
            best = pick[int(np.argmax(sims[pick]))]
            slot = int(slots[best])
            mid = self._ids[slot]
            return CampaignHit(float(sims[best]), "spam" if self._spam[slot] else "ham", mid or "")
