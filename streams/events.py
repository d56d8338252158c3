"""Versioned event schemas shared by every producer and consumer of Flywheel's topics.

One JSON encoding (UTF-8, one object per record) with an explicit ``type`` discriminator and a
``schema_version`` so old records stay readable when a schema grows: consumers accept every version they know
and send anything else to the dead-letter topic with the reason (``decode`` raises :class:`EventInvalid`).

Message bytes travel base64-encoded (``raw``) so arbitrary 8-bit mail survives JSON unchanged; only the first
``MAX_RAW_BYTES`` are carried because nothing downstream analyses more (the API truncates before sending).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

SCHEMA_VERSION = 1
KNOWN_VERSIONS = frozenset({1})
MAX_RAW_BYTES = 512 * 1024
"""Largest message prefix an event carries; Kafka's default record limit is 1 MiB and base64 adds a third."""

Label = Literal["spam", "ham"]


class EventInvalid(ValueError):
    """A record that is not a valid Flywheel event; ``reason`` is short and goes to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return str(uuid.uuid4())


def message_id_for(raw: bytes) -> str:
    """Stable id of a message (hex SHA-256 of its bytes, 32 chars): the same message flagged twice dedupes."""
    return hashlib.sha256(raw).hexdigest()[:32]


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=False)

    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=_new_id)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v not in KNOWN_VERSIONS:
            raise ValueError(f"unsupported schema_version {v}")
        return v

    @field_validator("event_id")
    @classmethod
    def _uuid(cls, v: str) -> str:
        try:
            return str(uuid.UUID(v))
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValueError("event_id must be a UUID") from exc


class ServedVerdict(BaseModel):
    """What the API answered when it classified the flagged message earlier: a free label for that answer.

    Every flag on a message the API classified is evidence about the champion of the time (prequential
    quality): the worker counts the served version's live false positives and false negatives from it.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str = Field(min_length=1, max_length=128)
    is_spam: bool
    probability: float = Field(ge=0.0, le=1.0)


class FeedbackEvent(_Event):
    """A user's flag: this message is spam (or ham). Keyed by ``message_id`` on the feedback topic."""

    type: Literal["feedback"] = "feedback"
    message_id: str = Field(min_length=1, max_length=128)
    label: Label
    reporter: str = Field(min_length=1, max_length=256)
    raw: str | None = Field(None, description="base64 of the message bytes (first MAX_RAW_BYTES)")
    idempotency_key: str | None = Field(None, max_length=256)
    received_at: datetime = Field(default_factory=_now)
    served: ServedVerdict | None = Field(None, description="the API's verdict on this message, when it gave one")

    @field_validator("raw")
    @classmethod
    def _base64(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if len(v) > (MAX_RAW_BYTES * 4) // 3 + 4:
            raise ValueError(f"raw longer than {MAX_RAW_BYTES} bytes")
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("raw is not valid base64") from exc
        return v

    @classmethod
    def create(
        cls,
        *,
        message_id: str | None = None,
        label: Label,
        reporter: str,
        raw: bytes | None = None,
        idempotency_key: str | None = None,
        received_at: datetime | None = None,
        served: ServedVerdict | dict[str, Any] | None = None,
    ) -> FeedbackEvent:
        """Build a flag from raw bytes (base64-encoding and truncating them); message_id defaults to their hash.
        ``served`` may be the verdict as the API remembers it, a dict: it is validated into a ServedVerdict."""
        if message_id is None:
            if raw is None:
                raise ValueError("message_id or raw is required")
            message_id = message_id_for(raw)
        return cls(
            message_id=message_id,
            label=label,
            reporter=reporter,
            raw=None if raw is None else base64.b64encode(raw[:MAX_RAW_BYTES]).decode("ascii"),
            idempotency_key=idempotency_key,
            received_at=received_at or _now(),
            served=served,
        )

    def raw_bytes(self) -> bytes | None:
        return None if self.raw is None else base64.b64decode(self.raw)

    @property
    def dedupe_key(self) -> str:
        """One vote per reporter per message: a repeated flag replaces the earlier one instead of adding."""
        return f"{self.reporter}\x1f{self.message_id}"


class RetractionEvent(_Event):
    """Withdraws an earlier flag (by its event id); travels on the feedback topic keyed by ``message_id``."""

    type: Literal["retraction"] = "retraction"
    retracts: str
    message_id: str = Field(min_length=1, max_length=128)
    reporter: str = Field(min_length=1, max_length=256)
    received_at: datetime = Field(default_factory=_now)

    @field_validator("retracts")
    @classmethod
    def _retracts_uuid(cls, v: str) -> str:
        try:
            return str(uuid.UUID(v))
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValueError("retracts must be a feedback event id (UUID)") from exc


class ModelEvent(_Event):
    """A gate decision or a rollback, published on the model-events topic (API replicas reload on it)."""

    type: Literal["model"] = "model"
    kind: Literal["promoted", "rejected", "rolled_back"]
    version: str
    previous: str | None = None
    model_kind: str | None = Field(None, description="linear | neural")
    reason: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    at: datetime = Field(default_factory=_now)


class RuleChangeEvent(_Event):
    """An administrator changed the rule set; API replicas apply it, the worker records it."""

    type: Literal["rule_change"] = "rule_change"
    action: Literal["add", "enable", "disable"]
    rule: dict[str, Any] | str = Field(description="the full rule for add, its name for enable/disable")
    by: str
    at: datetime = Field(default_factory=_now)

    @property
    def rule_name(self) -> str:
        return self.rule if isinstance(self.rule, str) else str(self.rule.get("name", ""))


Event = Annotated[
    FeedbackEvent | RetractionEvent | ModelEvent | RuleChangeEvent, Field(discriminator="type")
]
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def encode(event: _Event) -> bytes:
    """The record value of an event (compact JSON, UTF-8)."""
    return orjson.dumps(event.model_dump(mode="json"))


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or "event"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def decode(data: bytes | str | None) -> Event:
    """Parse one record value; raises :class:`EventInvalid` with a short reason (never anything else)."""
    if data is None:
        raise EventInvalid("empty record (tombstone)")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EventInvalid(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise EventInvalid("not a JSON object")
    if "type" not in obj:
        raise EventInvalid("missing event type")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise EventInvalid(_reason(exc)) from exc


def dead_letter(value: bytes | None, reason: str, source: str, partition: int, offset: int) -> bytes:
    """The dead-letter record: the reason, where it came from and the original value (base64)."""
    return orjson.dumps(
        {
            "reason": reason,
            "source_topic": source,
            "partition": partition,
            "offset": offset,
            "value": None if value is None else base64.b64encode(value).decode("ascii"),
            "at": _now().isoformat(),
        }
    )


__all__ = [
    "MAX_RAW_BYTES",
    "SCHEMA_VERSION",
    "Event",
    "EventInvalid",
    "FeedbackEvent",
    "Label",
    "ModelEvent",
    "RetractionEvent",
    "RuleChangeEvent",
    "ServedVerdict",
    "dead_letter",
    "decode",
    "encode",
    "message_id_for",
]
