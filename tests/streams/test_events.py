"""Event schemas: round trips, validation with readable reasons, the producer's bounded failure."""

from __future__ import annotations

import base64
import socket
import time
import uuid

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from services.settings import Settings
from streams.events import (
    MAX_RAW_BYTES,
    EventInvalid,
    FeedbackEvent,
    ModelEvent,
    RetractionEvent,
    RuleChangeEvent,
    dead_letter,
    decode,
    encode,
    message_id_for,
)
from streams.topics import BrokerUnavailable, EventProducer, Topics, topic_configs, topic_specs


@pytest.mark.unit
@hsettings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=2000), label=st.sampled_from(["spam", "ham"]), reporter=st.text(min_size=1, max_size=40))
def test_feedback_round_trip_keeps_any_bytes(raw: bytes, label: str, reporter: str) -> None:
    ev = FeedbackEvent.create(label=label, reporter=reporter, raw=raw)  # type: ignore[arg-type]
    back = decode(encode(ev))
    assert isinstance(back, FeedbackEvent)
    assert back == ev
    assert back.raw_bytes() == raw
    assert back.message_id == message_id_for(raw)


@pytest.mark.unit
def test_every_event_type_round_trips() -> None:
    fb = FeedbackEvent.create(message_id="m1", label="ham", reporter="alice")
    events = [
        fb,
        RetractionEvent(retracts=fb.event_id, message_id="m1", reporter="alice"),
        ModelEvent(kind="promoted", version="v2", previous="v1", reason="better", metrics={"auc": 0.99}),
        RuleChangeEvent(action="disable", rule="HTML_ONLY", by="admin"),
        RuleChangeEvent(action="add", rule={"name": "X", "kind": "body", "pattern": "/x/", "weight": 1.0}, by="admin"),
    ]
    for ev in events:
        assert decode(encode(ev)) == ev
    assert events[4].rule_name == "X"  # type: ignore[attr-defined]


@pytest.mark.unit
def test_raw_is_truncated_to_the_limit() -> None:
    ev = FeedbackEvent.create(label="spam", reporter="r", raw=b"x" * (MAX_RAW_BYTES + 10))
    assert len(ev.raw_bytes() or b"") == MAX_RAW_BYTES
    assert len(encode(ev)) < 1024 * 1024  # fits Kafka's default record limit


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "tombstone"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"label": "spam"}', "missing event type"),
        (b'{"type": "nope"}', "type"),
        (orjson.dumps({"type": "feedback", "message_id": "m", "label": "maybe", "reporter": "r"}), "label"),
        (orjson.dumps({"type": "feedback", "message_id": "m", "label": "spam"}), "reporter"),
        (orjson.dumps({"type": "feedback", "message_id": "m", "label": "spam", "reporter": "r", "raw": "***"}), "base64"),
        (orjson.dumps({"type": "feedback", "message_id": "m", "label": "spam", "reporter": "r", "schema_version": 99}), "schema_version"),
        (orjson.dumps({"type": "feedback", "message_id": "m", "label": "spam", "reporter": "r", "event_id": "x"}), "UUID"),
        (orjson.dumps({"type": "retraction", "retracts": "nope", "message_id": "m", "reporter": "r"}), "retracts"),
    ],
)
def test_invalid_records_raise_with_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(EventInvalid) as info:
        decode(value)
    assert reason in info.value.reason


@pytest.mark.unit
def test_dead_letter_record_carries_reason_and_original() -> None:
    rec = orjson.loads(dead_letter(b"\x00bad", "not JSON", "t.feedback", 2, 17))
    assert rec["reason"] == "not JSON" and rec["partition"] == 2 and rec["offset"] == 17
    assert base64.b64decode(rec["value"]) == b"\x00bad"


@pytest.mark.unit
def test_event_ids_are_uuids_and_unique() -> None:
    a = FeedbackEvent.create(message_id="m", label="spam", reporter="r")
    b = FeedbackEvent.create(message_id="m", label="spam", reporter="r")
    assert a.event_id != b.event_id
    uuid.UUID(a.event_id)
    assert a.dedupe_key == b.dedupe_key


@pytest.mark.unit
def test_topics_and_specs() -> None:
    s = Settings(topic_prefix="t1", feedback_partitions=6)
    t = Topics.from_config(s.streams())
    assert t.feedback == "t1.feedback" and t.retractions == t.feedback
    specs = dict(topic_specs(s.streams()))
    assert specs == {"t1.feedback": 6, "t1.model-events": 1, "t1.rule-changes": 1, "t1.dead-letter": 1,
                     "t1.campaigns": 1, "t1.models": 1, "t1.worker-journal": 1}
    configs = topic_configs(s.streams())  # the log a worker is rebuilt from is kept (unless set otherwise)
    assert configs["t1.feedback"] == {"retention.ms": "-1"} and configs["t1.worker-journal"]["retention.ms"] == "-1"
    kept = topic_configs(Settings(topic_prefix="t1", feedback_retention_ms=86_400_000).streams())["t1.feedback"]
    assert kept == {"retention.ms": "86400000"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.unit
def test_producer_never_hangs_without_a_broker() -> None:
    s = Settings(kafka_port=_closed_port())
    t0 = time.monotonic()
    producer = EventProducer(s.streams(), timeout_s=1.0)  # no I/O at construction
    assert time.monotonic() - t0 < 0.5
    ev = FeedbackEvent.create(message_id="m", label="spam", reporter="r")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        producer.send("x.feedback", "m", ev)
    assert time.monotonic() - t0 < 5.0
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable):  # right after a failure: fails fast
        producer.send("x.feedback", "m", ev)
    assert time.monotonic() - t0 < 0.5
    producer.close()
