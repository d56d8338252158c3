"""The API's shared stores: the message spool's keys name one kind of record each, and the feedback records are
shared out per source, so one source's flood cannot evict what other reporters need to retract their flags."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from services.api.state import FeedbackRecords, FileStore, MessageCache

pytestmark = pytest.mark.unit


def test_a_message_id_can_name_only_a_message_in_the_shared_spool(tmp_path: Path) -> None:
    spool = FileStore(tmp_path / "spool", 1000, max_bytes=16 * 1024 * 1024)
    worker_a = MessageCache(100, 1 << 20, spool=spool)
    worker_b = MessageCache(100, 1 << 20, spool=FileStore(tmp_path / "spool", 1000, max_bytes=16 * 1024 * 1024))
    raw = b"Subject: hello\r\n\r\nlunch?\r\n"
    mid = "0123456789abcdef0123456789abcdef"
    served = {"version": "v1", "is_spam": False, "probability": 0.01}
    worker_a.put(mid, raw, served)
    # another worker finds both the message and its verdict through the spool
    assert worker_b.get(mid) == raw and worker_b.served(mid) == served
    # but no name in the spool, used as a message id, reads any record: not the served verdict's (the key the
    # spool used for it before), not any file's
    assert worker_b.get(FileStore.key("served", mid)) is None
    names = [n for n in os.listdir(tmp_path / "spool") if not n.startswith(".")]
    assert len(names) == 2
    assert all(worker_b.get(n) is None for n in names), names



def test_the_spool_is_written_again_only_when_the_served_verdict_changes(tmp_path: Path) -> None:
    spool = FileStore(tmp_path / "spool", 1000, max_bytes=16 * 1024 * 1024)
    writes: list[str] = []
    put = spool.put

    def counted(key: str, value: bytes) -> None:
        writes.append(key)
        put(key, value)

    spool.put = counted  # type: ignore[method-assign]
    worker = MessageCache(100, 1 << 20, spool=spool)
    other = MessageCache(100, 1 << 20, spool=FileStore(tmp_path / "spool", 1000, max_bytes=16 * 1024 * 1024))
    raw = b"Subject: hello\r\n\r\nlunch?\r\n"
    mid = "0123456789abcdef0123456789abcdef"
    v1 = {"version": "v1", "is_spam": False, "probability": 0.01}
    worker.put(mid, raw, v1)
    assert len(writes) == 2  # the message and its verdict
    for _ in range(3):  # the same message, the same answer: nothing to write
        worker.put(mid, raw, dict(v1))
    assert len(writes) == 2
    v2 = {"version": "v2", "is_spam": True, "probability": 0.97}
    worker.put(mid, raw, v2)  # a new verdict (a new model) replaces the record another worker reads
    assert len(writes) == 3 and other.served(mid) == v2 and other.get(mid) == raw
    # each record written whole through this thread's own temporary file, none left behind
    assert not [n for n in os.listdir(tmp_path / "spool") if n.startswith(".tmp-")]


def test_a_flood_from_one_source_keeps_every_other_sources_records(tmp_path: Path) -> None:
    records = FeedbackRecords(tmp_path / "feedback", per_source=64)
    alice_event = str(uuid.uuid4())
    records.remember(alice_event, "aa" * 16, "alice", "alice")
    spamd_event = str(uuid.uuid4())
    records.remember(spamd_event, "bb" * 16, "spamd:bob", "spamd@192.0.2.1")
    for i in range(500):  # one relay's users flag 500 messages: 1,000 records against a share of 64
        records.remember(str(uuid.uuid4()), f"{i:032x}", f"mx:u{i % 7}", "mx")
    assert records.event(alice_event, "alice") == {"event_id": alice_event, "message_id": "aa" * 16,
                                                   "reporter": "alice", "source": "alice"}
    assert records.event(alice_event) is not None  # an administrator, from another source, finds it too
    assert records.last("spamd:bob", "bb" * 16, "spamd@192.0.2.9") is not None  # the user through another address
    flooded = records.store("mx")
    flooded.prune()
    assert flooded.size()[0] <= 64
    # forgetting the last flag of a reporter finds it in its source's store
    records.forget_last("alice", "aa" * 16)
    assert records.last("alice", "aa" * 16, "alice") is None


def test_records_of_the_single_store_of_earlier_versions_are_still_found(tmp_path: Path) -> None:
    import orjson

    legacy = FileStore(tmp_path / "feedback", 1000)
    event_id = str(uuid.uuid4())
    legacy.put(FileStore.key("event", event_id), orjson.dumps({"event_id": event_id, "message_id": "cc" * 16,
                                                               "reporter": "carol"}))
    records = FeedbackRecords(tmp_path / "feedback")
    rec = records.event(event_id, "carol")
    assert rec is not None and rec["reporter"] == "carol"
