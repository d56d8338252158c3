"""The request plumbing of services/api/deps.py: keys to identities, the admin and relay rules, bounded body
reading, JSON parsing; on a small app of their own and, through ``dependency_overrides``, on the real one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import pytest
from api_fakes import ADMIN, USER, Api, api_settings, make_api
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.testclient import TestClient

from services.api.deps import (
    ORJSONResponse,
    Reporter,
    identity_for,
    parse_json,
    read_body,
    require_admin,
    require_identity,
    require_reporter,
)

pytestmark = pytest.mark.unit

KEYS = {"k-alice": "alice", "k-admin": "admin", "k-relay": "mx"}


# --------------------------------------------------------------------------------------------- identity_for
def test_identity_for_matches_whole_keys_only() -> None:
    assert identity_for("k-alice", KEYS) == "alice"
    assert identity_for("k-admin", KEYS) == "admin"
    for wrong in (None, "", "k-alic", "k-alice ", "k-alicex", "K-ALICE", "alice"):
        assert identity_for(wrong, KEYS) is None, wrong
    assert identity_for("k-\udcff", KEYS) is None  # a header that is not valid UTF-8 is no key, not an error
    assert identity_for("k-alice", {}) is None


# --------------------------------------------------------------------------------------------- a small app
@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """An app of three routes, one per dependency, with the settings the dependencies read."""
    app = FastAPI()
    app.state.settings = api_settings(tmp_path_factory.mktemp("deps"), api_keys=KEYS)

    @app.get("/me")
    def me(ident: Annotated[str, Depends(require_identity)]) -> dict[str, str]:
        return {"identity": ident}

    @app.get("/admin")
    def admin(ident: Annotated[str, Depends(require_admin)]) -> dict[str, str]:
        return {"identity": ident}

    @app.get("/reporter")
    def reporter(r: Annotated[Reporter, Depends(require_reporter)]) -> dict[str, str]:
        return {"name": r.name, "source": r.source}

    return TestClient(app)


def test_a_key_by_header_or_bearer_names_the_identity(small: TestClient) -> None:
    assert small.get("/me", headers={"X-API-Key": "k-alice"}).json() == {"identity": "alice"}
    assert small.get("/me", headers={"Authorization": "Bearer k-alice"}).json() == {"identity": "alice"}
    both = small.get("/me", headers={"X-API-Key": "k-admin", "Authorization": "Bearer k-alice"})
    assert both.json() == {"identity": "admin"}  # the X-API-Key header wins
    for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k-alice"}):
        r = small.get("/me", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert "k-alice" not in r.text and "nope" not in r.text  # keys are never echoed


def test_admin_calls_need_an_admin_identity(small: TestClient) -> None:
    assert small.get("/admin", headers={"X-API-Key": "k-admin"}).json() == {"identity": "admin"}
    r = small.get("/admin", headers={"X-API-Key": "k-alice"})
    assert r.status_code == 403 and r.json()["detail"] == "identity 'alice' may not administer"
    assert small.get("/admin").status_code == 401  # no key: 401 before 403


@pytest.mark.parametrize(("key", "user", "status", "answer"), [
    ("k-alice", None, 200, {"name": "alice", "source": "alice"}),
    ("k-relay", None, 200, {"name": "mx", "source": "mx"}),
    ("k-relay", "bob@example.org", 200, {"name": "mx:bob@example.org", "source": "mx"}),
    ("k-relay", "A.b_c+d-e@f", 200, {"name": "mx:A.b_c+d-e@f", "source": "mx"}),
    ("k-alice", "bob", 403, None),
    ("k-relay", "mx:bob", 422, None),  # ':' separates namespaces: a user may not forge one
    ("k-relay", "b" * 129, 422, None),
    ("k-relay", "b" * 128, 200, {"name": "mx:" + "b" * 128, "source": "mx"}),
    ("k-relay", "", 422, None),
])
def test_reporter_is_the_key_or_a_relay_and_its_user(small: TestClient, key: str, user: str | None, status: int,
                                                     answer: dict[str, str] | None) -> None:
    headers = {"X-API-Key": key, **({"X-Flywheel-User": user} if user is not None else {})}
    r = small.get("/reporter", headers=headers)
    assert r.status_code == status, r.text
    if answer is not None:
        assert r.json() == answer


# --------------------------------------------------------------------------------------------- the real app
@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    a = make_api(tmp_path)
    yield a
    a.state.close()


def test_the_routes_take_identity_from_the_dependency(api: Api) -> None:
    """Auth is one dependency: overriding it changes every route that uses it (and only through it)."""
    assert api.client.get("/rules").status_code == 401
    api.app.dependency_overrides[require_identity] = lambda: "admin"
    assert api.client.get("/rules").status_code == 200
    r = api.client.post("/rules/MAKE_MONEY/disable")
    assert r.status_code == 200 and r.json()["active"] == 1  # require_admin builds on the overridden identity
    api.app.dependency_overrides[require_identity] = lambda: "alice"
    assert api.client.post("/rules/MAKE_MONEY/enable").status_code == 403
    del api.app.dependency_overrides[require_identity]
    assert api.client.get("/rules", headers=USER).status_code == 403 and api.client.get("/rules").status_code == 401
    assert api.client.get("/rules", headers=ADMIN).status_code == 200


def test_the_state_comes_from_the_dependency(api: Api) -> None:
    """``get_state`` is what the routes read: replace it and /readyz answers from the replacement."""
    from services.api.deps import get_state

    assert api.client.get("/readyz").json()["ready"] is True
    api.state.kafka_up = False
    assert api.client.get("/readyz").json()["kafka"] is False
    other = type("Down", (), {"served": None, "kafka_reachable": lambda self: True})()
    api.app.dependency_overrides[get_state] = lambda: other
    assert api.client.get("/readyz").json() == {"ready": False, "model": None, "kafka": True}


# --------------------------------------------------------------------------------------------- read_body
def request_with(headers: dict[str, str], receive: Callable[[], Awaitable[dict[str, Any]]]) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.lower().encode(), v.encode())
                                                                          for k, v in headers.items()]}
    return Request(scope, receive)  # type: ignore[arg-type]


def chunks(*parts: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    queue = list(parts)

    async def receive() -> dict[str, Any]:
        body = queue.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    return receive


async def never_called() -> dict[str, Any]:
    raise AssertionError("the body was read although the header already refused it")


def status_of(coro: Awaitable[Any]) -> tuple[int, str]:
    with pytest.raises(HTTPException) as exc:
        asyncio.run(coro)  # type: ignore[arg-type]
    return exc.value.status_code, str(exc.value.detail)


def test_read_body_joins_the_chunks() -> None:
    body = asyncio.run(read_body(request_with({}, chunks(b"ab", b"cd", b"e")), 5, 1.0))
    assert body == b"abcde"


def test_read_body_refuses_by_the_header_before_reading() -> None:
    assert status_of(read_body(request_with({"Content-Length": "6"}, never_called), 5, 1.0)) == (
        413, "body of 6 bytes exceeds the limit of 5 bytes")
    assert status_of(read_body(request_with({"Content-Length": "five"}, never_called), 5, 1.0)) == (
        400, "Content-Length is not a number")


def test_read_body_stops_a_body_that_grows_past_the_limit() -> None:
    code, detail = status_of(read_body(request_with({}, chunks(b"abc", b"def", b"never")), 5, 1.0))
    assert code == 413 and "exceeds the limit of 5 bytes" in detail
    code, _ = status_of(read_body(request_with({"Content-Length": "2"}, chunks(b"abc", b"def")), 5, 1.0))
    assert code == 413  # a header that lies is caught by the count


def test_read_body_gives_a_slow_client_408() -> None:
    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"type": "http.request", "body": b"late", "more_body": False}

    code, detail = status_of(read_body(request_with({}, trickle), 100, 0.05))
    assert code == 408 and detail == "body not received within 0.05s"


# --------------------------------------------------------------------------------------------- parse_json, response
def test_parse_json() -> None:
    assert parse_json(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(HTTPException) as exc:
        parse_json(b"")
    assert exc.value.status_code == 400 and "empty body" in str(exc.value.detail)
    with pytest.raises(HTTPException) as exc:
        parse_json(b'{"a": ')
    assert exc.value.status_code == 400 and str(exc.value.detail).startswith("bad JSON")


def test_orjson_response_serialises_numpy() -> None:
    r = ORJSONResponse({"p": np.float32(0.25), "v": np.arange(3)})
    assert r.media_type == "application/json" and orjson.loads(r.body) == {"p": 0.25, "v": [0, 1, 2]}
