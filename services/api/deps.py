"""Request plumbing shared by the routes: settings/state access, API-key auth, bounded body reading.

Keys are compared with ``hmac.compare_digest`` against every configured key (no early exit that would
leak which prefix matched) and are never logged; the identity tied to the key is the feedback reporter.
A *relay identity* (``settings.relay_identities``: a mail server or IMAP hook that reports for its own users)
may name the user in ``X-Flywheel-User``; the reporter is then ``<relay>:<user>``, a namespace no other key
and no spamd client can write to.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from services.api.safety import RELAY_USER

if TYPE_CHECKING:
    from services.api.state import ServingState


class ORJSONResponse(JSONResponse):
    """JSON via orjson (several times faster than the stdlib encoder on /classify answers)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from settings.api_keys.")
_bearer = HTTPBearer(auto_error=False, description="An API key from settings.api_keys, as a bearer token.")


def identity_for(presented: str | None, keys: dict[str, str]) -> str | None:
    """The identity of a presented key, comparing against every key in constant time."""
    if not presented:
        return None
    given = presented.encode("utf-8", "surrogatepass")
    found: str | None = None
    for key, ident in keys.items():
        if hmac.compare_digest(given, key.encode("utf-8")):
            found = ident
    return found


def _identity(request: Request, api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    presented = api_key or (bearer.credentials if bearer is not None else None)
    return identity_for(presented, request.app.state.settings.api_keys)


async def require_identity(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    ident = _identity(request, api_key, bearer)
    if ident is None:
        raise HTTPException(401, "a valid API key is required (X-API-Key or Authorization: Bearer)",
                            headers={"WWW-Authenticate": "Bearer"})
    return ident


async def require_admin(request: Request, ident: Annotated[str, Depends(require_identity)]) -> str:
    if ident not in request.app.state.settings.admin_identities:
        raise HTTPException(403, f"identity {ident!r} may not administer")
    return ident


async def require_operator(request: Request, ident: Annotated[str, Depends(require_identity)]) -> str:
    """An administrator or a read-only operator identity (``operator_identities``); others get 403.

    What only operators may read (the champion's lineage and the gate's statistics on ``/models``, every rule's
    pattern and weight on ``/rules``, the operator page's data) is what a poisoner or a spammer tuning mail
    against the rules would like to watch; a plain user key classifies and flags, nothing more.
    """
    settings = request.app.state.settings
    if ident not in settings.admin_identities and ident not in settings.operator_identities:
        raise HTTPException(403, f"identity {ident!r} may not read this (models, rules and the operator page's "
                            "data are for operators): use an admin or operator identity")
    return ident


RELAY_USER_HEADER = "X-Flywheel-User"


@dataclass(frozen=True, slots=True)
class Reporter:
    """Who a flag is attributed to (``name``) and the authenticated key identity that vouches for it (``source``)."""

    name: str
    source: str


_relay_user = Header(
    alias=RELAY_USER_HEADER,
    description="Only for relay identities (setting relay_identities): the user the relay reports for, 1..128 "
    "characters of A-Z a-z 0-9 . _ @ + -; the reporter becomes '<relay>:<user>'. Any other identity gets 403.",
    json_schema_extra={"pattern": RELAY_USER.pattern, "maxLength": 128},
)


async def require_reporter(
    request: Request,
    ident: Annotated[str, Depends(require_identity)],
    user: Annotated[str | None, _relay_user] = None,
) -> Reporter:
    """The reporter of a feedback call: the key's identity, or ``<relay>:<user>`` for a relay naming its user."""
    if user is None:
        return Reporter(ident, ident)
    if ident not in request.app.state.settings.relay_identities:
        raise HTTPException(403, f"identity {ident!r} is not a relay identity and may not send {RELAY_USER_HEADER}; "
                            "flags are attributed to the key's own identity")
    if not RELAY_USER.fullmatch(user):
        raise HTTPException(422, f"{RELAY_USER_HEADER} must be 1..128 characters of A-Z a-z 0-9 . _ @ + -")
    return Reporter(f"{ident}:{user}", ident)


async def classify_access(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Open by default; with ``classify_requires_key`` the same check as feedback.

    This and the other key checks are ``async``: they compare a few strings, and FastAPI runs a plain ``def``
    dependency on its thread pool, one hand-off to a thread and back for every /classify call."""
    if request.app.state.settings.classify_requires_key and _identity(request, api_key, bearer) is None:
        raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` and 408 if the client is too slow.

    Content-Length is checked before reading anything; the running count catches chunked bodies and liars.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if n > limit:
            raise HTTPException(413, f"body of {n} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0

    async def _read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout_s):
            await _read()
    except TimeoutError:
        raise HTTPException(408, f"body not received within {timeout_s:g}s") from None
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    if not body:
        raise HTTPException(400, "empty body; expected JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(400, f"bad JSON: {exc}") from None
