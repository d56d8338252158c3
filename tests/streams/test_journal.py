"""The worker's journal entries (streams.journal): offsets kept as runs, evidence as judged, anything else refused."""

from __future__ import annotations

import pytest

from streams.events import EventInvalid
from streams.journal import BatchEntry, EvidenceEntry, batch_entry, decode_entry, evidence_entry
from streams.records import Record

pytestmark = pytest.mark.unit


def test_a_batch_is_kept_as_runs_of_offsets_in_the_order_applied() -> None:
    offsets = [(0, 5), (0, 6), (0, 7), (2, 3), (2, 4), (0, 8), (1, 0), (1, 2)]
    records = [Record("fb", p, o, None, b"x") for p, o in offsets]
    entry = decode_entry(batch_entry(records, prev=41))
    assert entry == BatchEntry((("fb", 0, 5, 7), ("fb", 2, 3, 4), ("fb", 0, 8, 8), ("fb", 1, 0, 0), ("fb", 1, 2, 2)), 41)
    expanded = [(p, o) for _, p, a, b in entry.runs for o in range(a, b + 1)]
    assert expanded == offsets


def test_evidence_comes_back_as_judged() -> None:
    votes = [(3, "user:a", 1), (4, "user:b", -1), (9, "user:a", 0)]
    assert decode_entry(evidence_entry(9, votes, prev=-1)) == EvidenceEntry(9, tuple(votes), -1)


@pytest.mark.parametrize("value", [b"", b"{}", b'{"type": "flag"}', b'{"type": "batch", "runs": [["t", 0, 5, 2]], "prev": 1}',
                                   b'{"type": "evidence", "upto": 3, "votes": [[1, "a"]], "prev": 0}', b"\xff"])
def test_anything_else_is_refused(value: bytes) -> None:
    with pytest.raises(EventInvalid):
        decode_entry(value)
