"""The spamd listener's limits in-process, over real sockets on loopback: one client address cannot take every
connection slot, idle connections are closed after ``spamd_idle_timeout_s`` (not the whole client timeout), and
a Content-length in digits other than ASCII's is a protocol error, never a traceback. (Answers, TELL and the
real ``spamc`` are tests/services/test_spamd.py's.)"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.local.daemon import free_port
from services.settings import Settings
from services.spamd import SpamdServer

pytestmark = pytest.mark.unit


def _server(tmp_path: Path, **overrides: Any) -> SpamdServer:
    settings = Settings(state_dir=tmp_path, **overrides)
    return SpamdServer(SimpleNamespace(settings=settings), timeout_s=settings.client_timeout_s)  # type: ignore[arg-type]


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _request(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


def test_one_peer_holding_idle_connections_cannot_starve_another(tmp_path: Path) -> None:
    server = _server(tmp_path, spamd_max_connections=8, spamd_max_connections_per_peer=3,
                     client_timeout_s=30.0, spamd_idle_timeout_s=30.0)

    async def scenario() -> None:
        port = free_port()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
        held = []
        try:
            for _ in range(8):  # as many idle connections as the whole cap, all from 127.0.0.2
                held.append(await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)))
            await _until(lambda: server.active == 3, 5, "three held connections")
            # the five beyond the peer's share were told so and closed at once
            refused = [await asyncio.wait_for(r.read(), 5) for r, _ in held[3:]]
            assert all(r.startswith(b"SPAMD/1.0 75 Too many connections") for r in refused), refused
            assert server.per_peer == {ipaddress.ip_address("127.0.0.2"): 3}
            # a mail server on another address still gets answered
            assert await _request(port, b"PING SPAMC/1.5\r\n\r\n") == b"SPAMD/1.5 0 PONG\r\n"
            # and the flooding peer gets its slots back once its connections close
            for _, w in held:
                w.close()
            await _until(lambda: server.active == 0 and not server.per_peer, 5, "the slots to be released")
            assert await _request(port, b"PING SPAMC/1.5\r\n\r\n", "127.0.0.2") == b"SPAMD/1.5 0 PONG\r\n"
        finally:
            for _, w in held:
                w.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(scenario())


def test_an_idle_connection_is_closed_after_the_idle_timeout_not_the_client_timeout(tmp_path: Path) -> None:
    server = _server(tmp_path, client_timeout_s=30.0, spamd_idle_timeout_s=0.3)

    async def scenario() -> None:
        port = free_port()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.monotonic()
            writer.write(b"CHECK SPAMC/1.5\r\n")  # a request line, then nothing
            await writer.drain()
            reply = await asyncio.wait_for(reader.read(), 10)
            took = time.monotonic() - t0
            writer.close()
            assert reply.startswith(b"SPAMD/1.0 79 Timeout"), reply
            assert 0.25 < took < 5.0, took
            assert server.active == 0
        finally:
            listener.close()
            await listener.wait_closed()

    asyncio.run(scenario())


@pytest.mark.parametrize("length", ["²", "١٢", "１２", "+12", "1" * 16])
def test_content_length_in_other_digits_is_a_protocol_error(tmp_path: Path, length: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    server = _server(tmp_path)

    async def scenario() -> bytes:
        port = free_port()
        listener = await asyncio.start_server(server.handle, "127.0.0.1", port)
        try:
            head = f"CHECK SPAMC/1.5\r\nContent-length: {length}\r\n\r\n".encode()
            return await _request(port, head + b"Subject: hi\r\n\r\nhello\r\n")
        finally:
            listener.close()
            await listener.wait_closed()

    reply = asyncio.run(scenario())
    assert reply.startswith(b"SPAMD/1.0 76 Bad Content-length"), reply
    assert "Traceback" not in caplog.text and "spamd request failed" not in caplog.text
