"""HTTP routes: classification, feedback, model and rule administration, health and metrics.

Classification runs on the process's bounded classification pool (services.api.offload), never on the event
loop, so one large or crafted message cannot hold up /healthz, /readyz, /metrics or spamd; a full pool answers
503 with Retry-After. Anything that blocks on I/O (Kafka acknowledgements, registry loads, hyperscan compiles,
the feedback limiter) goes to the thread pool. Feedback is attributed to a reporter (the key's identity, or
``<relay>:<user>`` for a relay) and limited per reporter and per source (services.api.limits).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from services.api import metrics
from services.api.convert import NotAMessage, assemble, check_message, message_id_for, verdict_dict
from services.api.deps import (
    RELAY_USER_HEADER,
    ORJSONResponse,
    Reporter,
    classify_access,
    get_state,
    parse_json,
    read_body,
    require_admin,
    require_operator,
    require_reporter,
)
from services.api.offload import Busy
from services.api.safety import RELAY_USER
from services.api.schemas import (
    BatchJSON,
    BatchResponse,
    ChampionOut,
    ClassifyJSON,
    ClassifyResponse,
    ErrorOut,
    FeedbackAccepted,
    FeedbackIn,
    Health,
    ModelsOut,
    PromoteIn,
    Ready,
    RetractionAccepted,
    RuleChangeOut,
    RuleIn,
    RulesOut,
)
from services.api.state import FileStore, ServingState

log = structlog.get_logger(__name__)
router = APIRouter()

ReporterDep = Annotated[Reporter, Depends(require_reporter)]
Admin = Annotated[str, Depends(require_admin)]
Operator = Annotated[str, Depends(require_operator)]
State = Annotated[ServingState, Depends(get_state)]

_ERR = {"model": ErrorOut}
_RETRY_AFTER_S = "5"
_MAX_IDEMPOTENCY_KEY = 200


def _body(ref: str, *, raw_message: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}
    if raw_message:
        content["message/rfc822"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def _validate(model: type[BaseModel], obj: Any) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_context=False, include_input=False)) from None


def record_verdict(v: Any) -> None:
    """Verdict, score and rule-hit metrics of one answer (shared with spamd)."""
    metrics.verdicts("served", v.is_spam).inc()
    metrics.verdicts("rules", v.rules.is_spam).inc()
    metrics.verdicts("model", v.model.is_spam).inc()
    metrics.probability("served").observe(v.probability)
    metrics.probability("model").observe(v.model.probability)
    metrics.probability("rules").observe(v.rules_probability)
    for h in v.rules.hits:
        metrics.rule_hits(h.name).inc()
    if getattr(v, "campaign", None) is not None:
        metrics.CAMPAIGN_HITS.labels(v.campaign.flagged, "true" if v.decided_by == "campaign" else "false").inc()


def served_record(v: Any) -> dict[str, Any]:
    """What the message cache keeps of an answer: the free label a later flag gives it (prequential quality)."""
    return {"version": v.model.version, "is_spam": bool(v.is_spam), "probability": float(v.probability)}


def classify_and_remember(state: ServingState, served: Any, raw: bytes, user: str | None = None) -> tuple[Any, str]:
    """Score one message, record its metrics and keep it for feedback by id (on a classification thread:
    hashing, the spool write and the metrics stay off the event loop too). Shared with spamd. With ``user``
    named, that user's allow or block list decides when it lists the sender (models.userlists)."""
    v = served.classifier.classify(raw)
    if user:
        v = v.with_list(state.user_lists.decide(user, raw))
    mid = message_id_for(raw)
    state.messages.put(mid, raw, served_record(v))
    record_verdict(v)
    return v, mid


class _Refused(Exception):
    """A message a client sent that cannot be classified: the HTTP status and the reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _prepare(item: ClassifyJSON | bytes, limit: int) -> bytes:
    """The message's bytes: JSON fields assembled (linear in their size, on a classification thread), then the
    size limit and the check that it is a message at all. Raises ``_Refused``."""
    if isinstance(item, bytes):
        raw = item
    else:
        try:
            raw = assemble(item)
        except ValueError as exc:
            raise _Refused(422, str(exc)) from None
        if len(raw) > limit:
            raise _Refused(413, f"message of {len(raw)} bytes exceeds the limit of {limit} bytes")
    try:
        check_message(raw)
    except NotAMessage as exc:
        raise _Refused(400, str(exc)) from None
    return raw


def _prepare_and_classify(state: ServingState, served: Any, item: ClassifyJSON | bytes, limit: int,
                          user: str | None = None) -> tuple[Any, str]:
    return classify_and_remember(state, served, _prepare(item, limit), user)


def _prepare_all(items: list[ClassifyJSON], limit: int) -> list[bytes]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(_prepare(item, limit))
        except _Refused as exc:
            raise _Refused(exc.status, f"messages[{i}]: {exc.detail}") from None
    return out


def _classify_batch(state: ServingState, served: Any, raws: list[bytes]) -> list[dict[str, Any]]:
    verdicts = served.classifier.classify_batch(raws)
    out = []
    policy = served.classifier.policy
    for raw, v in zip(raws, verdicts, strict=True):
        mid = message_id_for(raw)
        state.messages.put(mid, raw, served_record(v))
        record_verdict(v)
        out.append(verdict_dict(v, mid, policy))
    return out


def _busy(exc: Busy) -> HTTPException:
    return HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)})


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _parse(model: type[BaseModel], body: bytes) -> Any:
    """Parse and validate a JSON body (on a thread: a body near the size limit takes milliseconds)."""
    return _validate(model, parse_json(body))


async def _one_message(request: Request) -> ClassifyJSON | bytes:
    """The request's message: raw bytes, or the validated JSON fields (assembled later, off the event loop)."""
    settings = request.app.state.settings
    body = await read_body(request, settings.max_message_bytes, settings.client_timeout_s)
    mt = _media_type(request)
    if mt in ("application/json", "text/json") or mt.endswith("+json"):
        req: ClassifyJSON = await run_in_threadpool(_parse, ClassifyJSON, body)
        return req
    if mt in ("", "message/rfc822", "text/plain", "application/octet-stream"):
        return body
    raise HTTPException(415, f"unsupported Content-Type {mt!r}: send message/rfc822 or application/json")


# --------------------------------------------------------------------------------------------- classify
@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Classify one message (raw RFC 822, or JSON)",
    openapi_extra=_body("ClassifyJSON", raw_message=True),
    responses={400: _ERR, 401: _ERR, 408: _ERR, 413: _ERR, 415: _ERR, 422: _ERR, 503: _ERR},
    tags=["classify"],
    dependencies=[Depends(classify_access)],
)
async def classify(request: Request) -> Response:
    """``X-Flywheel-User`` names the user the message is for: their allow and block lists apply."""
    user = request.headers.get(RELAY_USER_HEADER)
    if user is not None and not RELAY_USER.fullmatch(user):
        raise HTTPException(422, f"{RELAY_USER_HEADER} must be 1..128 characters of A-Z a-z 0-9 . _ @ + -")
    item = await _one_message(request)
    state: ServingState = request.app.state.serving
    served = state.current()
    try:
        v, mid = await state.classify_pool.run(_prepare_and_classify, state, served, item,
                                               state.settings.max_message_bytes, user)
    except Busy as exc:
        raise _busy(exc) from None
    except _Refused as exc:
        raise HTTPException(exc.status, exc.detail) from None
    return ORJSONResponse(verdict_dict(v, mid, served.classifier.policy))


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    summary="Classify many messages in one call (one batched model inference)",
    openapi_extra=_body("BatchJSON"),
    responses={400: _ERR, 401: _ERR, 408: _ERR, 413: _ERR, 415: _ERR, 422: _ERR, 503: _ERR},
    tags=["classify"],
    dependencies=[Depends(classify_access)],
)
async def classify_batch(request: Request) -> Response:
    """Charged per message: the batch holds ``classify_batch_share`` slots of the pool while it runs and is scored
    that many messages at a time, so single messages wait behind one chunk of it, not the whole batch."""
    settings = request.app.state.settings
    body = await read_body(request, settings.max_message_bytes, settings.client_timeout_s)
    mt = _media_type(request)
    if mt not in ("application/json", "text/json", "") and not mt.endswith("+json"):
        raise HTTPException(415, f"unsupported Content-Type {mt!r}: send application/json")
    req: BatchJSON = await run_in_threadpool(_parse, BatchJSON, body)
    state: ServingState = request.app.state.serving
    served = state.current()
    chunk = max(1, settings.classify_batch_share)
    out: list[dict[str, Any]] = []
    try:
        async with state.classify_pool.share(min(chunk, len(req.messages))) as share:
            raws = await share.run(_prepare_all, req.messages, settings.max_message_bytes)
            for start in range(0, len(raws), chunk):
                out += await share.run(_classify_batch, state, served, raws[start:start + chunk])
    except Busy as exc:
        raise _busy(exc) from None
    except _Refused as exc:
        raise HTTPException(exc.status, exc.detail) from None
    return ORJSONResponse({"results": out})


# --------------------------------------------------------------------------------------------- feedback
def _refuse(reason: str, status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    metrics.FEEDBACK.labels("refused", reason).inc()
    return HTTPException(status, detail, headers=headers)


@router.post(
    "/feedback",
    status_code=202,
    response_model=FeedbackAccepted,
    summary="Flag a message as spam or ham (acknowledged by Kafka before the answer)",
    openapi_extra=_body("FeedbackIn"),
    responses={400: _ERR, 401: _ERR, 403: _ERR, 404: _ERR, 409: _ERR, 413: _ERR, 422: _ERR, 429: _ERR, 503: _ERR},
    tags=["feedback"],
)
async def feedback(request: Request, reporter: ReporterDep, state: State) -> Response:
    """The reporter is the key's identity; a relay identity may name its user in ``X-Flywheel-User`` (the
    reporter is then ``<relay>:<user>``). Flags are limited per reporter and per key (429 with Retry-After),
    and a key may introduce only so many new reporters per window."""
    settings = state.settings
    await _check_limits(state, reporter, new_reporter_allowed=True)
    ident = reporter.name
    body = await read_body(request, settings.max_message_bytes, settings.client_timeout_s)
    fb, raw, mid = await run_in_threadpool(_read_flag, state, body)

    key = request.headers.get("idempotency-key")
    store_key: str | None = None
    fingerprint = hashlib.sha256(f"{fb.label}\x1f{mid}".encode()).hexdigest()
    if key is not None:
        if not key or len(key) > _MAX_IDEMPOTENCY_KEY:
            raise _refuse("invalid", 400, f"Idempotency-Key must be 1..{_MAX_IDEMPOTENCY_KEY} characters")
        store_key = FileStore.key("feedback", ident, key)
        replay = await _idempotent_replay(state, store_key, fingerprint)
        if replay is not None:
            return replay

    try:
        from streams.events import FeedbackEvent
        from streams.topics import BrokerUnavailable

        event = FeedbackEvent.create(message_id=mid, label=fb.label, reporter=ident, raw=raw, idempotency_key=key,
                                     served=state.messages.served(mid))
        try:
            partition, offset = await run_in_threadpool(state.producer.send, state.topics.feedback, mid, event)
        except BrokerUnavailable as exc:
            log.warning("feedback refused: Kafka unavailable", error=str(exc))
            raise _refuse("kafka_unavailable", 503, "Kafka is unavailable; the flag was NOT recorded, retry later",
                          {"Retry-After": _RETRY_AFTER_S}) from None
        answer = {
            "event_id": event.event_id, "message_id": mid, "label": fb.label, "reporter": ident,
            "partition": partition, "offset": offset, "replayed": False,
        }
        if store_key is not None:
            state.idempotency.put(store_key, orjson.dumps({"fingerprint": fingerprint, "answer": answer}))
    finally:
        if store_key is not None:
            state.idempotency.release(store_key)
    # two small files, and every tenth of its bound a prune of the source's store: a thread's work
    await run_in_threadpool(state.remember_feedback, event.event_id, mid, ident, reporter.source)
    await run_in_threadpool(state.learn_user_list, ident, raw, fb.label)
    metrics.FEEDBACK.labels("accepted", "").inc()
    log.info("feedback accepted", event_id=event.event_id, message_id=mid, label=fb.label, reporter=ident)
    return ORJSONResponse(answer, status_code=202)


def _read_flag(state: ServingState, body: bytes) -> tuple[FeedbackIn, bytes, str]:
    """The flag, the message's bytes and its id (on a thread: parsing, checking and hashing a body near the size
    limit takes tens of milliseconds, too long for the event loop)."""
    try:
        fb: FeedbackIn = _validate(FeedbackIn, parse_json(body))
    except HTTPException as exc:
        metrics.FEEDBACK.labels("refused", "invalid").inc()
        raise exc
    if fb.message_id is not None:
        raw = state.messages.get(fb.message_id)
        if raw is None:
            raise _refuse("unknown_message", 404, f"unknown message id {fb.message_id} (not among recent messages); "
                          "send the message itself in 'raw'")
        return fb, raw, fb.message_id
    raw = (fb.raw or "").encode("utf-8", "surrogateescape")
    try:
        check_message(raw)
    except NotAMessage as exc:
        raise _refuse("invalid", 400, str(exc)) from None
    return fb, raw, message_id_for(raw)


async def _check_limits(state: ServingState, reporter: Reporter, *, new_reporter_allowed: bool) -> None:
    import sqlite3

    try:
        refusal = await run_in_threadpool(state.limiter.check, reporter.name, reporter.source,
                                          new_reporter_allowed=new_reporter_allowed)
    except sqlite3.Error as exc:  # fail closed: a flag that cannot be counted is not taken
        log.error("feedback limiter unavailable", error=str(exc))
        raise _refuse("limiter_unavailable", 503, "feedback cannot be rate-limited right now; the flag was NOT "
                      "recorded, retry later", {"Retry-After": _RETRY_AFTER_S}) from None
    if refusal is not None:
        log.info("feedback refused", reason=refusal.reason, reporter=reporter.name, source=reporter.source)
        raise _refuse(refusal.reason, 429, refusal.detail, {"Retry-After": str(refusal.retry_after_s)})


async def _idempotent_replay(state: ServingState, store_key: str, fingerprint: str) -> Response | None:
    """The earlier answer for this key, or None after claiming the key for this request."""
    deadline = time.monotonic() + state.producer.timeout_s + 3.0
    while True:
        stored = state.idempotency.get(store_key)
        if stored is not None:
            rec = orjson.loads(stored)
            if rec.get("fingerprint") != fingerprint:
                raise _refuse("idempotency_conflict", 409,
                              "Idempotency-Key was already used with a different message or label")
            return ORJSONResponse({**rec["answer"], "replayed": True}, status_code=202)
        if state.idempotency.claim(store_key):
            # Re-check: the holder may have stored its answer between our read and our claim.
            stored = state.idempotency.get(store_key)
            if stored is None:
                return None
            state.idempotency.release(store_key)
            continue
        if time.monotonic() > deadline:
            raise _refuse("idempotency_conflict", 409, "a request with this Idempotency-Key is still in progress")
        await asyncio.sleep(0.05)


@router.delete(
    "/feedback/{event_id}",
    status_code=202,
    response_model=RetractionAccepted,
    summary="Retract an earlier flag (produces a retraction event)",
    responses={401: _ERR, 403: _ERR, 404: _ERR, 422: _ERR, 429: _ERR, 503: _ERR},
    tags=["feedback"],
)
async def retract(
    event_id: Annotated[str, Path(max_length=64)], reporter: ReporterDep, state: State
) -> Response:
    """Only the flag's reporter may retract it (a relay names the user in ``X-Flywheel-User``, as when it
    flagged), or an administrator."""
    await _check_limits(state, reporter, new_reporter_allowed=False)
    try:
        event_id = str(uuid.UUID(event_id))
    except ValueError:
        raise HTTPException(404, f"unknown feedback event {event_id!r}") from None
    rec = state.feedback_record(event_id, reporter.source)
    if rec is None:
        raise HTTPException(404, f"unknown feedback event {event_id}")
    if rec["reporter"] != reporter.name and reporter.name not in state.settings.admin_identities:
        raise HTTPException(403, "only the reporter (or an administrator) may retract a flag")
    from streams.events import RetractionEvent
    from streams.topics import BrokerUnavailable

    event = RetractionEvent(retracts=event_id, message_id=rec["message_id"], reporter=rec["reporter"])
    try:
        await run_in_threadpool(state.producer.send, state.topics.retractions, rec["message_id"], event)
    except BrokerUnavailable:
        raise HTTPException(503, "Kafka is unavailable; the retraction was NOT recorded, retry later",
                            headers={"Retry-After": _RETRY_AFTER_S}) from None
    state.forget_last_feedback(rec["reporter"], rec["message_id"], rec.get("source"))
    metrics.FEEDBACK.labels("retracted", "").inc()
    return ORJSONResponse(
        {"event_id": event.event_id, "retracts": event_id, "message_id": rec["message_id"], "reporter": rec["reporter"]},
        status_code=202,
    )


# --------------------------------------------------------------------------------------------- models
async def _publish(state: ServingState, topic: str, key: str, event: Any) -> str | None:
    """Announce an admin change; the registry / rules file already holds it, so Kafka down only delays
    other replicas until their next poll (logged, not an error for the caller)."""
    from streams.topics import BrokerUnavailable

    try:
        await run_in_threadpool(state.producer.send, topic, key, event)
    except BrokerUnavailable as exc:
        log.warning("change not announced on Kafka; replicas pick it up by polling", topic=topic, error=str(exc))
        return None
    return str(event.event_id)


@router.get("/models", response_model=ModelsOut, responses={401: _ERR, 403: _ERR}, tags=["models"])
async def list_models(_: Operator, state: State) -> Response:
    """Every version with its lineage and the gate's statistics: for operators and administrators only."""
    infos = await run_in_threadpool(state.registry.list)
    champion = state.registry.champion()
    serving = state.current().version
    versions = [
        {**i.to_dict(), "champion": i.version == champion, "served_here": i.version == serving} for i in infos
    ]
    for v in versions:
        v.pop("calibration", None)
    return ORJSONResponse({"champion": champion, "serving": serving, "versions": versions})


_VERSION = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@router.post(
    "/models/{version}/promote",
    response_model=ChampionOut,
    openapi_extra={"requestBody": {"required": False, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PromoteIn"}}}}},
    responses={401: _ERR, 403: _ERR, 404: _ERR, 409: _ERR, 422: _ERR},
    tags=["models"],
)
async def promote(request: Request, version: Annotated[str, _VERSION], ident: Admin, state: State) -> Response:
    from models.registry import ModelRejected, RegistryError
    from streams.events import ModelEvent

    _not_following_kafka(state)
    body = await read_body(request, 64 * 1024, state.settings.client_timeout_s)
    reason = _validate(PromoteIn, parse_json(body)).reason if body.strip() else "promoted through the API"
    try:
        info = state.registry.get(version)
    except RegistryError:
        raise HTTPException(404, f"unknown model version {version}") from None
    try:  # refuse before the pointer moves: a corrupt artifact must never become champion
        loaded = await run_in_threadpool(state.registry.load, version, max_bytes=state.settings.analyse_bytes)
    except ModelRejected as exc:
        raise HTTPException(409, f"model {version} refused: {exc.reason}") from None
    previous = state.registry.champion()
    try:
        await run_in_threadpool(state.registry.promote, version, f"{reason} (by {ident})")
    except RegistryError as exc:
        raise HTTPException(404, str(exc)) from None
    event = ModelEvent(kind="promoted", version=version, previous=previous, model_kind=info.kind,
                       reason=reason, metrics=info.metrics)
    await run_in_threadpool(state.adopt, loaded)
    event_id = await _publish(state, state.topics.model_events, version, event)
    return ORJSONResponse({"champion": version, "previous": previous, "event_id": event_id})


def _not_following_kafka(state: ServingState) -> None:
    """A replica that follows the models topic holds a copy: its champion is the one the worker publishes."""
    if state.settings.model_source == "kafka":
        raise HTTPException(409, "this replica follows the models topic (model_source=kafka): promote or roll back "
                                 "on the worker's registry (`flywheel models promote|rollback` there)")


@router.post(
    "/models/rollback",
    response_model=ChampionOut,
    openapi_extra={"requestBody": {"required": False, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PromoteIn"}}}}},
    responses={401: _ERR, 403: _ERR, 409: _ERR, 422: _ERR},
    tags=["models"],
)
async def rollback(request: Request, ident: Admin, state: State) -> Response:
    from models.registry import RegistryError
    from streams.events import ModelEvent

    _not_following_kafka(state)
    body = await read_body(request, 64 * 1024, state.settings.client_timeout_s)
    reason = _validate(PromoteIn, parse_json(body)).reason if body.strip() else "rolled back through the API"
    previous = state.registry.champion()
    try:
        target = await run_in_threadpool(state.registry.rollback, f"{reason} (by {ident})")
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    event = ModelEvent(kind="rolled_back", version=target, previous=previous, reason=reason)
    event_id = await _publish(state, state.topics.model_events, target, event)
    state.request_check()
    return ORJSONResponse({"champion": target, "previous": previous, "event_id": event_id})


# --------------------------------------------------------------------------------------------- rules
@router.get("/rules", response_model=RulesOut, responses={401: _ERR, 403: _ERR}, tags=["rules"])
async def list_rules(_: Operator, state: State) -> Response:
    """Every rule's pattern and weight (what a spammer would tune mail against): operators and administrators."""
    engine = state.current().engine
    rules = [
        {"name": r.name, "kind": r.kind, "pattern": r.pattern, "weight": r.weight, "description": r.description,
         "enabled": r.enabled, "added": r.added, "header": r.header}
        for r in engine.rules
    ]
    return ORJSONResponse({"threshold": engine.threshold, "active": engine.active_count, "rules": rules})


async def _change_rule(state: ServingState, ident: str, action: str, rule_ref: Any, change: Any) -> Response:
    from models.rules import RuleError
    from streams.events import RuleChangeEvent

    try:
        engine = await run_in_threadpool(state.change_rules, change)
    except RuleError as exc:
        msg = str(exc)
        raise HTTPException(404 if msg.startswith("no rule named") else 422, msg) from None
    metrics.RULE_CHANGES.labels(action).inc()
    name = rule_ref if isinstance(rule_ref, str) else rule_ref["name"]
    event = RuleChangeEvent(action=action, rule=rule_ref, by=ident)
    event_id = await _publish(state, state.topics.rule_changes, name, event)
    log.info("rule changed", action=action, rule=name, by=ident, active=engine.active_count)
    return ORJSONResponse({"action": action, "rule": name, "active": engine.active_count, "event_id": event_id})


@router.post(
    "/rules",
    response_model=RuleChangeOut,
    openapi_extra=_body("RuleIn"),
    responses={401: _ERR, 403: _ERR, 413: _ERR, 422: _ERR},
    tags=["rules"],
)
async def add_rule(request: Request, ident: Admin, state: State) -> Response:
    from datetime import UTC, datetime

    from models.rules import Rule, validate_rule

    body = await read_body(request, 64 * 1024, state.settings.client_timeout_s)
    rin: RuleIn = _validate(RuleIn, parse_json(body))
    rule = Rule(name=rin.name, kind=rin.kind, pattern=rin.pattern, weight=rin.weight, description=rin.description,
                added=datetime.now(UTC).date().isoformat(), enabled=rin.enabled, header=rin.header, source="api")
    # validate_rule: compile, size and depth limits, and a trial under the time budget of the rule alone;
    # trial_run: then the whole changed rule set once on plain mail. A refusal never reaches rules.yaml.
    return await _change_rule(state, ident, "add", rule.to_dict(),
                              lambda e: trial_run(lambda: validate_rule(e, rule), rule.name))


_TRIAL_MESSAGES = (
    b"From: \"Sender\" <sender@example.org>\r\nTo: user@example.com\r\nSubject: Lunch on Friday?\r\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <a1@example.org>\r\n\r\n"
    b"Hi, are we still on for lunch? See http://example.org/menu\r\n",
    b"From: Prize Team <win@prizes.example>\r\nTo: you@example.com\r\nSubject: =?utf-8?B?V0lOIE5PVw==?=\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b1\r\n\r\n--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nClaim your FREE prize now!!! http://prizes.example/c\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><a href=\"http://prizes.example/c\">"
    b"CLAIM</a><img src=\"http://prizes.example/p.gif\"></body></html>\r\n--b1--\r\n",
)
_TRIAL_BUDGET_S = 1.0
"""A new rule set that takes longer than this on one small sample message would stall every replica."""


def trial_run(build: Any, name: str) -> Any:
    """Build a changed rule set and evaluate it whole on sample messages before it is saved; any failure
    (including one the build itself raises, such as RecursionError) refuses the change with a RuleError, so
    such a rule never reaches rules.yaml, Kafka or another replica.
    """
    from models.message import parse
    from models.rules import RuleError

    try:
        engine = build()
    except RuleError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise RuleError(f"rule {name} cannot be compiled ({type(exc).__name__}): the expression is too deep or "
                        "too large") from None
    for raw in _TRIAL_MESSAGES:
        t0 = time.perf_counter()
        try:
            engine.evaluate(parse(raw))
        except RuleError:
            raise
        except (RecursionError, MemoryError) as exc:
            raise RuleError(f"rule {name} cannot be evaluated ({type(exc).__name__}): the expression is too "
                            "deep or too large") from None
        except Exception as exc:  # noqa: BLE001 - any failure on a plain message refuses the rule
            raise RuleError(f"rule {name} fails on a sample message: {type(exc).__name__}: {exc}") from None
        took = time.perf_counter() - t0
        if took > _TRIAL_BUDGET_S:
            raise RuleError(f"rule {name} is too slow: {took:.2f} s on a small sample message "
                            f"(budget {_TRIAL_BUDGET_S:g} s)")
    return engine


_RULE_NAME = Path(min_length=1, max_length=100)


@router.post("/rules/{name}/disable", response_model=RuleChangeOut, responses={401: _ERR, 403: _ERR, 404: _ERR},
             tags=["rules"])
async def disable_rule(name: Annotated[str, _RULE_NAME], ident: Admin, state: State) -> Response:
    return await _change_rule(state, ident, "disable", name, lambda e: e.with_enabled(name, False))


@router.post("/rules/{name}/enable", response_model=RuleChangeOut, responses={401: _ERR, 403: _ERR, 404: _ERR},
             tags=["rules"])
async def enable_rule(name: Annotated[str, _RULE_NAME], ident: Admin, state: State) -> Response:
    return await _change_rule(state, ident, "enable", name,
                              lambda e: trial_run(lambda: e.with_enabled(name, True), name))


# --------------------------------------------------------------------------------------------- health
@router.get("/healthz", response_model=Health, tags=["ops"])
async def healthz() -> Response:
    return ORJSONResponse({"status": "ok"})


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready}}, tags=["ops"])
async def readyz(state: State) -> Response:
    served = state.served
    kafka = await run_in_threadpool(state.kafka_reachable)
    ready = served is not None and kafka
    body = {"ready": ready, "model": served.version if served else None, "kafka": kafka}
    return ORJSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", tags=["ops"], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics_page() -> Response:
    data, ctype = await run_in_threadpool(metrics.render)
    return Response(data, media_type=ctype)
