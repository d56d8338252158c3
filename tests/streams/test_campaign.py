"""Records of the campaign topic (streams.campaign): round trip, and malformed records refused with a reason."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from streams.campaign import CampaignRecord, decode_campaign
from streams.events import EventInvalid

pytestmark = pytest.mark.unit


def test_round_trip_keeps_the_signature() -> None:
    sig = np.arange(128, dtype=np.uint32) * np.uint32(40_000_000)
    rec = CampaignRecord.create("abc123", "spam", sig, 0.97)
    back = decode_campaign(rec.encode())
    assert back.message_id == "abc123" and back.label == "spam" and back.reliability == pytest.approx(0.97)
    assert np.array_equal(back.values(), sig)


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
