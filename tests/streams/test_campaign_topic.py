"""Records of the campaign topic (streams.campaign): round trip, malformed records refused with a reason, and the
topic created compacted."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from services.settings import Settings
from streams.campaign import CampaignRecord, decode_campaign
from streams.events import EventInvalid


@pytest.mark.unit
def test_round_trip_keeps_the_signature() -> None:
    sig = np.arange(128, dtype=np.uint32) * np.uint32(40_000_000)
    rec = CampaignRecord.create("abc123", "spam", sig, 0.97)
    back = decode_campaign(rec.encode())
    assert back.message_id == "abc123" and back.label == "spam" and back.reliability == pytest.approx(0.97)
    assert np.array_equal(back.values(), sig)


@pytest.mark.unit
@pytest.mark.parametrize(("value", "reason"), [
    (b"not json", "not JSON"),
    (orjson.dumps({"message_id": "a", "label": "spam", "signature": "!!", "reliability": 1.0}), "base64"),
    (orjson.dumps({"message_id": "a", "label": "spam", "reliability": 1.0,
                   "signature": base64.b64encode(b"\0" * 12).decode()}), "128"),
    (orjson.dumps({"message_id": "a", "label": "maybe", "reliability": 1.0,
                   "signature": base64.b64encode(b"\0" * 512).decode()}), "spam"),
])
def test_malformed_records_are_refused_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(EventInvalid, match=reason):
        decode_campaign(value)


@pytest.mark.integration
def test_the_campaign_topic_is_created_compacted(kafka: Settings) -> None:
    """A table, not a log: the latest fingerprint per message id survives, a tombstone removes it."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    from streams import admin
    from streams.topics import Topics, topic_specs

    admin.ensure_topics(kafka.streams(), topic_specs(kafka.streams()))
    topic = Topics.from_config(kafka.streams()).campaigns
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers.split(","))
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        admin.close()
    text = repr(described)
    assert topic in text and "cleanup.policy" in text and "compact" in text, text
