"""Records of the campaign topic: the fingerprints of trusted labels, shared by every API replica.

The topic is compacted and keyed by message id: a replica that starts reads it from the beginning and ends up
with the latest record of every flagged message, like a table. A record's value is a :class:`CampaignRecord`
(the MinHash signature of a message whose consensus label the worker trusts, with that label); a tombstone (no
value) withdraws it (the label was retracted or is no longer trusted). Only the worker produces here: it is
the one process that weighs flags by their reporters' trust.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streams.events import EventInvalid

__all__ = ["CAMPAIGN_TOPIC_CONFIG", "CampaignRecord", "decode_campaign"]

SIGNATURE_VALUES = 128
"""Values in a signature (``models.campaign.NUM_PERM``; ``streams`` does not import ``models``)."""

CAMPAIGN_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "min.cleanable.dirty.ratio": "0.1",
    "segment.ms": "3600000",
    "delete.retention.ms": "86400000",
}
"""A table, not a log: the latest record per message id survives compaction, a tombstone removes it after a day
(long enough for every replica that was following to see it)."""


def _now() -> datetime:
    return datetime.now(UTC)


class CampaignRecord(BaseModel):
    """A trusted label's fingerprint: ``signature`` is base64 of ``SIGNATURE_VALUES`` little-endian uint32."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal[1] = 1
    type: Literal["campaign"] = "campaign"
    message_id: str = Field(min_length=1, max_length=128)
    label: Literal["spam", "ham"]
    signature: str
    reliability: float = Field(ge=0.0, le=1.0, description="the best reliability among the label's reporters")
    at: datetime = Field(default_factory=_now)

    @field_validator("signature")
    @classmethod
    def _signature(cls, v: str) -> str:
        try:
            data = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("signature is not valid base64") from exc
        if len(data) != 4 * SIGNATURE_VALUES:
            raise ValueError(f"signature must be {SIGNATURE_VALUES} uint32 values")
        return v

    @classmethod
    def create(cls, message_id: str, label: Literal["spam", "ham"], signature: np.ndarray,
               reliability: float) -> CampaignRecord:
        sig = np.asarray(signature, dtype="<u4").reshape(-1)
        return cls(message_id=message_id, label=label, reliability=min(1.0, max(0.0, reliability)),
                   signature=base64.b64encode(sig.tobytes()).decode("ascii"))

    def values(self) -> np.ndarray:
        """The signature as uint32 values."""
        return np.frombuffer(base64.b64decode(self.signature), dtype="<u4").astype(np.uint32)

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


def decode_campaign(data: bytes) -> CampaignRecord:
    """Parse a record value; raises :class:`streams.events.EventInvalid` with a short reason."""
    try:
        return CampaignRecord.model_validate(orjson.loads(data))
    except orjson.JSONDecodeError as exc:
        raise EventInvalid(f"not JSON: {exc}") from exc
    except ValidationError as exc:
        raise EventInvalid("; ".join(str(e.get("msg", "invalid")) for e in exc.errors()[:3])) from exc
