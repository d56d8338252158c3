"""Request and response models of the HTTP API (they are the OpenAPI schema clients are generated from).

Hot-path responses are built as plain dicts and serialised with orjson; these models document them and
validate the (small, infrequent) admin and feedback bodies.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Label = Literal["spam", "ham"]
_MESSAGE_ID = re.compile(r"[0-9a-f]*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------- classify
MAX_HEADER_VALUE = 10_000
"""Characters of one structured header field (``subject``, ``from``, ``to`` as one string, each of ``headers``)."""
MAX_HEADERS = 100
"""Entries of ``headers``."""
MAX_RECIPIENTS = 1000
"""Addresses in a ``to`` list, each at most ``MAX_RECIPIENT`` characters."""
MAX_RECIPIENT = 1000
MAX_HEADER_SECTION = 256 * 1024
"""Characters of every structured header field together: the most of a message that is analysed by default
(``analyse_bytes``); the body fields are bounded by the request size (``max_message_bytes``)."""

_HeaderValue = Annotated[str, Field(max_length=MAX_HEADER_VALUE)]
_Recipients = Annotated[list[Annotated[str, Field(max_length=MAX_RECIPIENT)]], Field(max_length=MAX_RECIPIENTS)]


class ClassifyJSON(_Strict):
    """Either ``raw`` (the whole RFC 822 message) or structured fields assembled into one.

    Every field is bounded (422 with the field and its bound beyond), so the work of assembling a message is
    bounded by the request's size before it starts; ``raw``, ``text`` and ``html`` by the request body limit.
    """

    raw: str | None = Field(None, description="The whole message (RFC 822 / MIME), as text.")
    subject: str | None = Field(None, max_length=MAX_HEADER_VALUE)
    from_: str | None = Field(None, alias="from", max_length=MAX_HEADER_VALUE)
    to: _HeaderValue | _Recipients | None = Field(
        None, description=f"Recipient address(es): one string, or at most {MAX_RECIPIENTS} addresses.")
    headers: dict[str, _HeaderValue] | None = Field(
        None, max_length=MAX_HEADERS, description=f"Further header fields, name -> value (at most {MAX_HEADERS}).")
    text: str | None = Field(None, description="Plain-text body.")
    html: str | None = Field(None, description="HTML body.")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _something(self) -> ClassifyJSON:
        structured = (self.subject, self.from_, self.to, self.headers, self.text, self.html)
        if self.raw is None and all(v is None for v in structured):
            raise ValueError("give 'raw' or at least one of subject, from, to, headers, text, html")
        if self.raw is not None and any(v is not None for v in structured):
            raise ValueError("give either 'raw' or structured fields, not both")
        to = self.to if isinstance(self.to, str) or self.to is None else ", ".join(self.to)
        total = sum(len(v) for v in (self.subject or "", self.from_ or "", to or ""))
        total += sum(len(k) + len(v) for k, v in (self.headers or {}).items())
        if total > MAX_HEADER_SECTION:
            raise ValueError(f"the header fields total {total} characters, more than {MAX_HEADER_SECTION}")
        return self


class BatchJSON(_Strict):
    messages: list[ClassifyJSON] = Field(min_length=1, max_length=1000)


class RuleHitOut(BaseModel):
    name: str
    weight: float
    description: str


class RulesSide(BaseModel):
    score: float
    threshold: float
    is_spam: bool
    verdict: Label
    probability: float = Field(ge=0.0, le=1.0, description="Calibrated probability of the rule score.")
    hits: list[RuleHitOut]


class ModelSide(BaseModel):
    probability: float = Field(ge=0.0, le=1.0)
    is_spam: bool
    verdict: Label
    threshold: float
    version: str
    kind: str
    provider: str = Field(description="ONNX Runtime execution provider in use.")


class CampaignMatch(BaseModel):
    """A near-duplicate of a message a trusted reporter flagged: a spam match makes the verdict spam (decided_by
    "campaign") unless a ham fingerprint is as near; a ham match only protects the message from campaign memory."""

    match: float = Field(ge=0.0, le=1.0, description="Estimated Jaccard similarity of the 4-word shingles.")
    flagged: Label = Field(description="The trusted label of the flagged message.")
    message_id: str = Field(description="The flagged message's id.")


class ClassifyResponse(BaseModel):
    message_id: str = Field(description="Stable id (SHA-256 of the bytes, 32 hex chars) for POST /feedback.")
    verdict: Label
    is_spam: bool
    probability: float = Field(ge=0.0, le=1.0, description="Served spam probability.")
    score: float = Field(description="Log-odds of the served probability, unbounded: rank messages by this (the "
                                     "probability saturates at 0 and 1).")
    threshold: float = Field(description="Probability threshold of the deciding side.")
    decided_by: str = Field(description="Which side decided under the policy (rules, model, combined, either), or "
                                        "campaign (a trusted spam flag's near-duplicate), or list (the named "
                                        "user's allow or block list).")
    policy: str
    rules: RulesSide
    model: ModelSide
    campaign: CampaignMatch | None = Field(
        None, description="The campaign-memory fingerprint this message matched (null when none did).")
    list: Literal["allow", "block"] | None = Field(
        None, description="The named user's list that decided (decided_by 'list'): the sender is on their allow or "
                          "block list (user named by X-Flywheel-User, or spamd's User:); null otherwise.")


class ListsIn(_Strict):
    """Both of a user's lists, replaced whole: addresses (``alice@example.org``) or domains (``@example.org``,
    subdomains included). An entry may be on one list only."""

    allow: list[str] = Field(default_factory=list, max_length=1000)
    block: list[str] = Field(default_factory=list, max_length=1000)


class ListsOut(BaseModel):
    user: str
    allow: list[str]
    block: list[str]
    learning: int = Field(description="Senders whose flags are being counted towards a list (not listed yet).")


class BatchResponse(BaseModel):
    results: list[ClassifyResponse]


# --------------------------------------------------------------------------------------------- feedback
class FeedbackIn(_Strict):
    """A flag: by ``message_id`` of a recent /classify, or with the message itself in ``raw``."""

    label: Label
    message_id: str | None = Field(
        None, min_length=1, max_length=128, pattern=r"^[0-9a-f]+$",
        description="The `message_id` field of the answer POST /classify gave for this message (lowercase hex).")
    raw: str | None = Field(None, min_length=1)

    @field_validator("message_id", mode="before")
    @classmethod
    def _message_id(cls, value: Any) -> Any:
        """Say what a message id is (a client pasting a placeholder learns where the real one comes from)."""
        if isinstance(value, str) and not _MESSAGE_ID.fullmatch(value):
            raise ValueError("a message id is the 'message_id' field of the answer POST /classify gave for the "
                             "message (lowercase hex characters); classify the message first and send that "
                             "id, or send the message itself in 'raw'")
        return value

    @model_validator(mode="after")
    def _one(self) -> FeedbackIn:
        if (self.message_id is None) == (self.raw is None):
            raise ValueError("give exactly one of message_id and raw")
        return self


class FeedbackAccepted(BaseModel):
    event_id: str
    message_id: str
    label: Label
    reporter: str
    partition: int
    offset: int
    replayed: bool = Field(False, description="True when an Idempotency-Key repeated an earlier request.")


class RetractIn(_Strict):
    event_id: str = Field(min_length=1, max_length=64)


class RetractionAccepted(BaseModel):
    event_id: str
    retracts: str
    message_id: str
    reporter: str


# --------------------------------------------------------------------------------------------- models / rules
class ModelVersionOut(BaseModel):
    version: str
    kind: str
    created_at: str
    champion: bool
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    parent: str | None
    hyperparameters: dict[str, Any]
    code_version: str
    served_here: bool = Field(description="This process serves this version right now.")


class ModelsOut(BaseModel):
    champion: str | None
    serving: str
    versions: list[ModelVersionOut]


class PromoteIn(_Strict):
    reason: str = Field("promoted through the API", max_length=1000)


class ChampionOut(BaseModel):
    champion: str
    previous: str | None
    event_id: str | None = Field(description="The model event announcing it (None if Kafka was unreachable).")


class RuleIn(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["header", "body", "rawbody", "uri", "full", "meta"]
    pattern: str = Field(min_length=1, max_length=5000)
    weight: float = Field(ge=-100.0, le=100.0)
    description: str = Field("", max_length=1000)
    header: str | None = Field(None, max_length=200, description="The header a 'header' rule tests.")
    enabled: bool = True


class RuleOut(BaseModel):
    name: str
    kind: str
    pattern: str
    weight: float
    description: str
    enabled: bool
    added: str | None = None
    header: str | None = None


class RulesOut(BaseModel):
    threshold: float
    active: int
    rules: list[RuleOut]


class RuleChangeOut(BaseModel):
    action: str
    rule: str
    active: int
    event_id: str | None


# --------------------------------------------------------------------------------------------- health
class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    model: str | None
    kafka: bool


class ErrorOut(BaseModel):
    detail: Any
