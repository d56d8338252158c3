"""Per-user allow and block lists of senders: one user's wish ("not spam" on a newsletter), never a global label.

A user's lists hold sender addresses (``alice@example.org``) and domains (``@example.org``, which also covers its
subdomains). They are learned from the user's own flags on a sender: after ``learn_after`` consecutive flags of
the same label on mail from one address (a flag of the other label starts the count again), "ham" puts the
address on the allow list and "spam" on the block list (taking it off the other). One flag is not enough by
default: a forged From on one phishing mail must not block a colleague. Lists are also edited directly (the
API), which takes effect at once.

Each user's lists are one small JSON file in a directory every replica shares (the model registry's), written
whole to a temporary file and renamed under an exclusive ``flock`` so that replicas and worker processes never
lose each other's updates, and read through a cache keyed by the file's modification stamp. Everything is bounded:
entries per list, the learning record per user, the length of an entry and of a user name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.message import _sender_address

__all__ = [
    "MAX_ENTRIES",
    "USER_RE",
    "ListError",
    "UserListStore",
    "UserLists",
    "list_user",
    "normalize_entry",
    "sender_of",
]

MAX_ENTRIES = 1000  # per list and user
MAX_LEARNING = 1000  # senders whose flags are being counted, per user (the oldest forgotten first)
MAX_ENTRY_CHARS = 254  # an address's longest legal length
USER_RE = re.compile(r"[A-Za-z0-9._@+\-]{1,128}")
_ADDRESS_RE = re.compile(r"[^\s@<>()\[\],;:\"]{1,64}@[a-z0-9](?:[a-z0-9\-]{0,62}\.?)*[a-z0-9]")
_DOMAIN_RE = re.compile(r"@[a-z0-9](?:[a-z0-9\-]{0,62}\.?)*[a-z0-9]")
_MAX_HEADER_SCAN = 65_536  # bytes of a message searched for its From header
_CACHE_USERS = 4096


class ListError(ValueError):
    """An entry or a user name that cannot be listed; the message says why (a 422 to API clients)."""


def normalize_entry(entry: str) -> str:
    """A list entry in its stored form (lower case, no blanks): ``user@host`` or ``@domain``; ListError otherwise."""
    e = entry.strip().lower()
    if len(e) > MAX_ENTRY_CHARS:
        raise ListError(f"entry of {len(e)} characters exceeds {MAX_ENTRY_CHARS}")
    if e.startswith("@"):
        if _DOMAIN_RE.fullmatch(e) is None:
            raise ListError(f"{entry!r} is not a domain entry (@example.org)")
        return e
    if _ADDRESS_RE.fullmatch(e) is None:
        raise ListError(f"{entry!r} is not an address (user@example.org) or a domain (@example.org)")
    return e


def list_user(reporter: str) -> str:
    """The user a reporter's flags speak for: the name after a relay's or spamd's prefix (``mx1:bob`` and
    ``spamd:bob`` are both ``bob``, as spamd's ``User: bob`` and ``X-Flywheel-User: bob`` are)."""
    return reporter.rpartition(":")[2]


_FROM_LINE_RE = re.compile(rb"(?im)^from[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)")


def sender_of(raw: bytes) -> str:
    """The From address of a raw message, lower case ("" when none): the first From header of the header block
    (at most the first 64 KB are searched), read as the parser reads it."""
    head = raw[:_MAX_HEADER_SCAN]
    end = head.find(b"\n\n")
    end2 = head.find(b"\r\n\r\n")
    cut = min(x for x in (end, end2, len(head)) if x >= 0)
    m = _FROM_LINE_RE.search(head, 0, cut)
    if m is None:
        return ""
    value = re.sub(rb"\r?\n[ \t]", b" ", m.group(1)).strip().decode("utf-8", "replace")
    addr = _sender_address(value)
    return addr if "@" in addr and len(addr) <= MAX_ENTRY_CHARS else ""


@dataclass
class UserLists:
    """One user's lists and the count of consistent flags per sender not (yet) listed by learning."""

    allow: list[str] = field(default_factory=list)
    block: list[str] = field(default_factory=list)
    learning: dict[str, list[Any]] = field(default_factory=dict)  # sender -> [label, consecutive flags]

    def decide(self, sender: str) -> str | None:
        """"allow", "block" or None for ``sender``: the address itself first, then its domain and the domains
        above it (the most specific entry wins; block wins a tie, as listed by hand on both)."""
        if not sender or (not self.allow and not self.block):
            return None
        allow, block = set(self.allow), set(self.block)
        keys = [sender]
        host = sender.rpartition("@")[2]
        while host:
            keys.append("@" + host)
            host = host.partition(".")[2] if "." in host else ""
        for k in keys:
            if k in block:
                return "block"
            if k in allow:
                return "allow"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"allow": list(self.allow), "block": list(self.block), "learning": dict(self.learning)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UserLists:
        learning = data.get("learning") or {}
        return cls(allow=list(data.get("allow") or [])[:MAX_ENTRIES], block=list(data.get("block") or [])[:MAX_ENTRIES],
                   learning={str(k): list(v) for k, v in list(learning.items())[-MAX_LEARNING:]})


def _validated(entries: list[str], what: str) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for e in entries:
        n = normalize_entry(e)
        if n not in seen:
            seen.add(n)
            out.append(n)
    if len(out) > MAX_ENTRIES:
        raise ListError(f"{what}: {len(out)} entries exceed the limit of {MAX_ENTRIES}")
    return out


class UserListStore:
    """Every user's lists under ``root`` (one file per user, named by a hash of the user name)."""

    def __init__(self, root: Path, learn_after: int = 2) -> None:
        self.root = Path(root)
        self.learn_after = int(learn_after)
        self._cache: OrderedDict[str, tuple[tuple[int, int, int], UserLists]] = OrderedDict()
        self._lock = threading.Lock()

    def _path(self, user: str) -> Path:
        return self.root / (hashlib.sha256(user.encode()).hexdigest()[:40] + ".json")

    @staticmethod
    def check_user(user: str) -> str:
        if USER_RE.fullmatch(user) is None:
            raise ListError("a user is 1..128 characters of A-Z a-z 0-9 . _ @ + -")
        return user

    def get(self, user: str) -> UserLists:
        """The user's lists (empty when none were ever set); a stat per call, a read only when the file changed."""
        path = self._path(self.check_user(user))
        try:
            st = path.stat()
        except FileNotFoundError:
            return UserLists()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)  # a rename is a new inode
        with self._lock:
            hit = self._cache.get(user)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(user)
                return hit[1]
        try:
            lists = UserLists.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return UserLists()
        except (OSError, ValueError, TypeError, AttributeError):
            return UserLists()  # a damaged file lists nothing rather than failing every request
        with self._lock:
            self._cache[user] = (stamp, lists)
            self._cache.move_to_end(user)
            while len(self._cache) > _CACHE_USERS:
                self._cache.popitem(last=False)
        return lists

    def decide(self, user: str | None, raw: bytes) -> str | None:
        """What ``user``'s lists say about the message's sender: "allow", "block" or None (no user, no lists)."""
        if not user or USER_RE.fullmatch(user) is None:
            return None
        lists = self.get(user)
        if not lists.allow and not lists.block:
            return None
        return lists.decide(sender_of(raw))

    @contextlib.contextmanager
    def _locked(self, user: str) -> Iterator[Path]:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(user)
        with open(path.with_suffix(".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self, path: Path) -> UserLists:
        try:
            return UserLists.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return UserLists()
        except (OSError, ValueError, TypeError, AttributeError):
            return UserLists()

    def _write(self, path: Path, lists: UserLists) -> None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(lists.to_dict()))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def put(self, user: str, allow: list[str], block: list[str]) -> UserLists:
        """Replace both lists (an entry on both is refused); the learning record is kept."""
        self.check_user(user)
        a, b = _validated(allow, "allow"), _validated(block, "block")
        both = set(a) & set(b)
        if both:
            raise ListError(f"on both lists: {sorted(both)[:5]}")
        with self._locked(user) as path:
            lists = self._read(path)
            lists.allow, lists.block = a, b
            self._write(path, lists)
        return lists

    def delete(self, user: str) -> bool:
        """Forget the user's lists and learning record; True when there was anything."""
        self.check_user(user)
        with self._locked(user) as path:
            try:
                path.unlink()
                return True
            except FileNotFoundError:
                return False

    def learn(self, user: str, sender: str, label: str) -> str | None:
        """Count one flag of ``user`` on mail from ``sender``; returns the list the sender moved to ("allow" or
        "block") when this flag completed ``learn_after`` consecutive flags of one label, else None."""
        if self.learn_after <= 0 or not sender or label not in ("spam", "ham") or USER_RE.fullmatch(user) is None:
            return None
        try:
            sender = normalize_entry(sender)
        except ListError:
            return None
        target = "block" if label == "spam" else "allow"
        with self._locked(user) as path:
            lists = self._read(path)
            prev = lists.learning.pop(sender, None)
            count = prev[1] + 1 if prev and prev[0] == label else 1
            moved = None
            if count >= self.learn_after:
                other = lists.allow if target == "block" else lists.block
                mine = lists.block if target == "block" else lists.allow
                if sender in other:
                    other.remove(sender)
                if sender not in mine and len(mine) < MAX_ENTRIES:
                    mine.append(sender)
                    moved = target
                elif sender in mine:
                    moved = target
            else:
                lists.learning[sender] = [label, count]
                while len(lists.learning) > MAX_LEARNING:
                    lists.learning.pop(next(iter(lists.learning)))
            self._write(path, lists)
        return moved
