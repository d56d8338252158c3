"""services/api/middleware.py: the body guard and the request metrics (driven as ASGI, so the test controls when
each body chunk arrives), and the request-head deadline of the HTTP protocol on a real socket."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from prometheus_client import REGISTRY

from services.api.middleware import GuardedHttpToolsProtocol, GuardMiddleware
from services.local.daemon import free_port, wait_until

LIMIT = 100


def inner_app() -> tuple[FastAPI, list[str]]:
    """Routes that read their body the way FastAPI does; ``calls`` records which handler ran."""
    app = FastAPI()
    calls: list[str] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        calls.append("echo")
        return {"received": len(await request.body())}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        calls.append("item")
        return {"item": item_id}

    return app, calls


def call(app: Any, method: str, path: str, headers: dict[str, str], chunks: list[bytes] | None = None,
         stall: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One request through ``app`` as ASGI; ``chunks`` arrive one per receive, ``stall`` never sends the body."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("test", 80), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    pending = list(chunks or [b""])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if stall:
            await asyncio.sleep(30)
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        await asyncio.sleep(30)  # nothing more: what a server does until the client goes away
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture()
def guarded() -> Iterator[tuple[GuardMiddleware, list[str]]]:
    app, calls = inner_app()
    yield GuardMiddleware(app, max_body=LIMIT, timeout_s=0.3), calls


def requests_total(endpoint: str, method: str, status: int) -> float:
    return REGISTRY.get_sample_value("flywheel_http_requests_total",
                                     {"endpoint": endpoint, "method": method, "status": str(status)}) or 0.0


@pytest.mark.unit
def test_a_body_within_the_limit_passes(guarded: tuple[GuardMiddleware, list[str]]) -> None:
    mw, calls = guarded
    status, _, body = call(mw, "POST", "/echo", {"content-length": "100"}, [b"x" * 60, b"y" * 40])
    assert status == 200 and body == b'{"received":100}' and calls == ["echo"]


@pytest.mark.unit
def test_content_length_over_the_limit_is_refused_before_the_app_runs(guarded: tuple[GuardMiddleware, list[str]]
                                                                      ) -> None:
    mw, calls = guarded
    before = requests_total("unmatched", "POST", 413)
    status, headers, body = call(mw, "POST", "/echo", {"content-length": "101"}, [b"x" * 101])
    assert status == 413 and headers["connection"] == "close"
    assert body == b'{"detail":"body of 101 bytes exceeds the limit of 100 bytes"}'
    assert calls == [] and requests_total("unmatched", "POST", 413) == before + 1


@pytest.mark.unit
@pytest.mark.parametrize("value", ["abc", "-1", "1e3"])
def test_a_bad_content_length_is_400(guarded: tuple[GuardMiddleware, list[str]], value: str) -> None:
    mw, calls = guarded
    status, headers, body = call(mw, "POST", "/echo", {"content-length": value}, [b"x"])
    assert (status, body) == (400, b'{"detail":"bad Content-Length"}') and headers["connection"] == "close"
    assert calls == []


@pytest.mark.unit
def test_a_body_that_grows_past_the_limit_is_cut_off(guarded: tuple[GuardMiddleware, list[str]]) -> None:
    mw, calls = guarded
    status, _, body = call(mw, "POST", "/echo", {"transfer-encoding": "chunked"}, [b"x" * 60, b"y" * 60, b"z"])
    assert status == 413 and b"exceeds the limit of 100 bytes" in body and calls == ["echo"]
    status, _, _ = call(mw, "POST", "/echo", {"content-length": "10"}, [b"x" * 60, b"y" * 60])  # a lying header
    assert status == 413


@pytest.mark.unit
def test_a_client_that_never_sends_its_body_gets_408(guarded: tuple[GuardMiddleware, list[str]]) -> None:
    mw, _ = guarded
    t = time.monotonic()
    status, _, body = call(mw, "POST", "/echo", {"content-length": "50"}, stall=True)
    took = time.monotonic() - t
    assert status == 408 and b"not received in time" in body
    assert 0.25 <= took < 5.0, took  # the guard's deadline (0.3 s), not the stalled receive's (30 s)


@pytest.mark.unit
def test_requests_are_counted_by_route_template(guarded: tuple[GuardMiddleware, list[str]]) -> None:
    mw, _ = guarded
    before = requests_total("/items/{item_id}", "GET", 200)
    before_bad = requests_total("/items/{item_id}", "GET", 422)
    for i in range(3):
        assert call(mw, "GET", f"/items/{i}", {})[0] == 200
    assert call(mw, "GET", "/items/not-a-number", {})[0] == 422
    assert requests_total("/items/{item_id}", "GET", 200) == before + 3  # one series, whatever the id
    assert requests_total("/items/{item_id}", "GET", 422) == before_bad + 1
    hist = REGISTRY.get_sample_value("flywheel_http_request_duration_seconds_count", {"endpoint": "/items/{item_id}"})
    assert hist is not None and hist >= 4


@pytest.mark.unit
def test_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    asyncio.run(GuardMiddleware(app, max_body=1, timeout_s=0.1)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


# --------------------------------------------------------------------------------------------- head deadline
@pytest.fixture()
def server() -> Iterator[int]:
    """A real uvicorn server with the project's protocol class and a 0.5 s head deadline."""
    import uvicorn

    app, _ = inner_app()
    port = free_port()
    saved = GuardedHttpToolsProtocol.head_timeout_s
    GuardedHttpToolsProtocol.head_timeout_s = 0.5
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=GuardedHttpToolsProtocol,
                                        lifespan="off", log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: srv.started, 20, "uvicorn started")
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)
        GuardedHttpToolsProtocol.head_timeout_s = saved


def closed_after(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes ``sock`` (fails if it is still open after ``limit_s``)."""
    t = time.monotonic()
    sock.settimeout(limit_s)
    while sock.recv(4096):
        pass
    return time.monotonic() - t


@pytest.mark.integration
def test_a_connection_that_never_completes_its_head_is_closed(server: int) -> None:
    """On a real uvicorn server (in this process) with the project's protocol class."""
    with socket.create_connection(("127.0.0.1", server)) as idle:
        assert closed_after(idle, 5.0) < 3.0
    with socket.create_connection(("127.0.0.1", server)) as trickle:
        trickle.sendall(b"GET /items/1 HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        assert closed_after(trickle, 5.0) < 3.0
    with socket.create_connection(("127.0.0.1", server)) as ok:  # a whole head is answered
        ok.sendall(b"GET /items/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ok.settimeout(5.0)
        answer = b""
        while chunk := ok.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"item":7}')
