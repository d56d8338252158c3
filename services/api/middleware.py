"""One pure-ASGI middleware for every request: metrics, a body-size limit and a body deadline.

Pure ASGI (not Starlette's BaseHTTPMiddleware) because it runs on every /classify call and must cost a few
microseconds. The body guard covers routes whose body FastAPI parses itself: Content-Length above the limit
is refused before a byte is read, a body that grows past it (chunked, or a lying header) is cut off with 413,
and a client that trickles its body slower than ``timeout_s`` gets 408 instead of holding the connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.api import metrics


class GuardMiddleware:
    def __init__(self, app: ASGIApp, max_body: int, timeout_s: float) -> None:
        self.app = app
        self.max_body = max_body
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_body:
                    status = 400 if declared < 0 else 413
                    detail = (
                        "bad Content-Length"
                        if declared < 0
                        else f"body of {declared} bytes exceeds the limit of {self.max_body} bytes"
                    )
                    await _reply(send, status, detail)
                    self._observe(scope, status, start)
                    return
                break

        received = 0
        done = False
        deadline = time.monotonic() + self.timeout_s
        max_body = self.max_body

        async def guarded_receive() -> Message:
            nonlocal received, done
            if done:  # body complete: later receives wait for a disconnect, no deadline applies
                return await receive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HTTPException(408, "request body not received in time")
            try:
                async with asyncio.timeout(remaining):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, "request body not received in time") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise HTTPException(413, f"body exceeds the limit of {max_body} bytes")
                done = not message.get("more_body", False)
            return message

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, guarded_receive, observed_send)
        finally:
            self._observe(scope, status, start)

    @staticmethod
    def _observe(scope: Scope, status: int, start: float) -> None:
        route: Any = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        metrics.http_requests(endpoint, scope["method"], status).inc()
        metrics.http_duration(endpoint).observe(time.perf_counter() - start)


async def _reply(send: Send, status: int, detail: str) -> None:
    import orjson

    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------- slow headers


def _head_timeout_s() -> float:
    import os

    try:
        return max(0.5, float(os.environ.get("FLYWHEEL_CLIENT_TIMEOUT_S", "10")))
    except ValueError:
        return 10.0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline for the request head.

    uvicorn times out idle keep-alive connections only after a response; a client that connects and sends
    nothing, or trickles a header line now and then, would hold its connection (and a slot of
    ``limit_concurrency``) forever. Here every connection must complete each request head within
    ``client_timeout_s`` of connecting or of starting the request, or it is closed.
    """

    _head_timer: Any = None
    head_timeout_s: float | None = None

    def _arm(self) -> None:
        self._disarm()
        if GuardedHttpToolsProtocol.head_timeout_s is None:
            GuardedHttpToolsProtocol.head_timeout_s = _head_timeout_s()
        self._head_timer = self.loop.call_later(GuardedHttpToolsProtocol.head_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
