"""The spamd protocol (SpamAssassin's SPAMC/SPAMD 1.x) on its own TCP port.

Mail servers that already talk to SpamAssassin (spamc, spamass-milter, Exim, Haraka) use Flywheel
unchanged: ``PING``, ``CHECK``, ``SYMBOLS``, ``REPORT``, ``REPORT_IFSPAM``, ``PROCESS``, ``HEADERS``,
``SKIP`` and ``TELL`` (``Message-class: spam|ham`` with ``Set: local`` -> a feedback event, ``Remove: local``
-> a retraction of the reporter's last flag on that message).

``TELL`` teaches the filter, so like spamd's ``--allow-tell`` it is off unless ``spamd_allow_tell`` is set, and
then accepted only from ``spamd_tell_clients`` (addresses or networks) or from a client that sends the shared
``spamd_tell_secret`` in a ``Secret:`` header; the refusal is decided on the headers, before the body is read.
The reporter is the ``User:`` header spamc sends, in its own namespace (``spamd:<user>``), so a spamd client can
never flag, relabel or retract as a user of the HTTP API; flags are rate-limited per reporter and per client
address like HTTP feedback (services.api.limits).

Messages are scored on the process's bounded classification pool, off the event loop; a full pool answers
EX_TEMPFAIL. Each worker serves at most ``spamd_max_connections`` connections at once, and at most
``spamd_max_connections_per_peer`` from one client address, so a client holding idle connections cannot take the
slots of a mail server on another host; one more is answered ``SPAMD/1.0 75 Too many connections`` and closed. A
client must send its request line and headers within ``spamd_idle_timeout_s`` (the body then within
``client_timeout_s``), so idle connections are closed early instead of holding a slot for the whole timeout.

One request per connection, like spamd. Every read has a deadline; a malformed request gets the protocol's
error reply (``SPAMD/1.0 76 Bad header line: ...``) and the connection is closed, the server goes on.
The listener runs inside each API worker (see services/api/app.py) and serves that worker's current model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import re
import socket
import sqlite3
import zlib
from typing import TYPE_CHECKING, Any

import structlog

from services.api import metrics
from services.api.convert import message_id_for, spamd_score
from services.api.offload import Busy
from services.api.safety import RELAY_USER, SPAMD_NAMESPACE

if TYPE_CHECKING:
    from services.api.state import ServingState

log = structlog.get_logger(__name__)

EX_OK = 0
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_TIMEOUT = 79

_REQUEST_LINE = re.compile(rb"^([A-Z_]{1,20}) SPAMC/(\d+)\.(\d+)$")
_HEADER_LINE = re.compile(rb"^([A-Za-z][A-Za-z0-9-]{0,63}) *: *(.*)$")
_COMMANDS = frozenset({"PING", "CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS", "HEADERS", "SKIP", "TELL"})
_MAX_LINE = 8192
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAX_HEADERS = 64
_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")
"""ASCII digits only: ``str.isdigit`` also accepts superscripts and other scripts' digits, which ``int`` refuses
or reads as numbers no spamc sends."""


class ProtocolError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def start_spamd(state: ServingState, host: str, port: int, *, timeout_s: float = 10.0) -> asyncio.Server:
    """Listen on ``host:port`` (SO_REUSEPORT: every API worker listens, the kernel spreads connections)."""
    server = SpamdServer(state, timeout_s=timeout_s)
    return await asyncio.start_server(
        server.handle, host, port, reuse_port=True, limit=_MAX_LINE * 2, backlog=1024
    )


def _peer_ip(writer: asyncio.StreamWriter) -> _IP | None:
    peer = writer.get_extra_info("peername")
    try:
        ip = ipaddress.ip_address(peer[0])
    except (TypeError, IndexError, ValueError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class SpamdServer:
    def __init__(self, state: ServingState, *, timeout_s: float) -> None:
        self.state = state
        self.timeout_s = timeout_s
        s = state.settings
        self.allow_tell = s.spamd_allow_tell
        self.tell_networks = [ipaddress.ip_network(n, strict=False) for n in s.spamd_tell_clients]
        secret = s.spamd_tell_secret.get_secret_value() if s.spamd_tell_secret is not None else ""
        self.tell_secret = secret.encode("utf-8")
        self.max_connections = s.spamd_max_connections
        self.max_per_peer = min(s.spamd_max_connections_per_peer, s.spamd_max_connections)
        self.idle_timeout_s = min(s.spamd_idle_timeout_s, timeout_s)
        self.active = 0
        self.per_peer: dict[_IP | None, int] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_ip(writer)
        held = self.per_peer.get(peer, 0)
        if self.active >= self.max_connections or held >= self.max_per_peer:
            await self._refuse_connection(reader, writer, per_peer=held >= self.max_per_peer)
            return
        self.active += 1
        self.per_peer[peer] = held + 1
        try:
            await self._handle(reader, writer)
        finally:
            self.active -= 1
            left = self.per_peer.get(peer, 1) - 1
            if left > 0:
                self.per_peer[peer] = left
            else:
                self.per_peer.pop(peer, None)

    async def _refuse_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                                 per_peer: bool = False) -> None:
        """Over the cap: say so and close, after a short bounded drain (closing with unread input would reset
        the connection and could lose the reply before the client reads it)."""
        metrics.SPAMD_REQUESTS.labels(
            "connection", "too_many_from_peer" if per_peer else "too_many_connections").inc()
        try:
            writer.write(f"SPAMD/1.0 {EX_TEMPFAIL} Too many connections\r\n".encode())
            async with asyncio.timeout(0.5):
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                await reader.read(64 * 1024)
        except (OSError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = "?"
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = _peer_ip(writer)
            try:
                async with asyncio.timeout(self.timeout_s):
                    command, headers, body = await self._read_request(reader, peer)
            except TimeoutError:
                raise ProtocolError(EX_TIMEOUT, "Timeout reading request") from None
            if command == "SKIP":
                metrics.SPAMD_REQUESTS.labels(command, "ok").inc()
                return
            reply = await self._dispatch(command, headers, body, peer)
            writer.write(reply)
            await asyncio.wait_for(writer.drain(), self.timeout_s)
            metrics.SPAMD_REQUESTS.labels(command, "ok").inc()
        except ProtocolError as exc:
            metrics.SPAMD_REQUESTS.labels(command if command in _COMMANDS else "invalid", "error").inc()
            log.info("spamd request refused", code=exc.code, reason=exc.message)
            try:
                writer.write(f"SPAMD/1.0 {exc.code} {exc.message}\r\n".encode("utf-8", "replace"))
                await asyncio.wait_for(writer.drain(), 2.0)
            except (OSError, TimeoutError):
                pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            metrics.SPAMD_REQUESTS.labels(command if command in _COMMANDS else "invalid", "disconnected").inc()
        except Exception:  # a failure on one message answers EX_SOFTWARE, the listener goes on
            log.exception("spamd request failed", command=command)
            metrics.SPAMD_REQUESTS.labels(command if command in _COMMANDS else "invalid", "error").inc()
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                writer.write(f"SPAMD/1.0 {EX_SOFTWARE} Internal error\r\n".encode())
                await asyncio.wait_for(writer.drain(), 2.0)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    # ------------------------------------------------------------------ reading
    async def _readline(self, reader: asyncio.StreamReader) -> bytes:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ProtocolError(EX_PROTOCOL, "Line too long") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise ProtocolError(EX_PROTOCOL, "Missing request line") from None
            line = exc.partial
        if len(line) > _MAX_LINE:
            raise ProtocolError(EX_PROTOCOL, "Line too long")
        return line.rstrip(b"\r\n")

    def _check_tell(self, headers: dict[str, str], peer: _IP | None) -> None:
        """Refuse a TELL that is not enabled, or from a client neither listed nor holding the secret."""
        if not self.allow_tell:
            raise ProtocolError(EX_UNAVAILABLE, "TELL commands are not enabled, set FLYWHEEL_SPAMD_ALLOW_TELL")
        presented = headers.get("secret")
        if presented is not None and self.tell_secret:
            if hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self.tell_secret):
                return
            raise ProtocolError(EX_NOPERM, "TELL refused: wrong secret")
        if peer is not None and any(peer in net for net in self.tell_networks):
            return
        raise ProtocolError(EX_NOPERM,
                            f"TELL not permitted from {peer} (FLYWHEEL_SPAMD_TELL_CLIENTS, or a Secret header)")

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
        """The request line and the header lines (the part an idle client is given ``idle_timeout_s`` for)."""
        first = await self._readline(reader)
        m = _REQUEST_LINE.match(first)
        if m is None:
            raise ProtocolError(EX_PROTOCOL, "Bad request line: " + _show(first))
        command = m.group(1).decode("ascii")
        if command not in _COMMANDS:
            raise ProtocolError(EX_PROTOCOL, f"Unknown command: {command}")
        headers: dict[str, str] = {}
        if command == "PING":
            return command, headers
        while True:
            try:
                line = await self._readline(reader)
            except ProtocolError:
                if command == "SKIP":
                    return command, headers
                raise
            if not line:
                break
            hm = _HEADER_LINE.match(line)
            if hm is None:
                raise ProtocolError(EX_PROTOCOL, "Bad header line: " + _show(line))
            if len(headers) >= _MAX_HEADERS:
                raise ProtocolError(EX_PROTOCOL, "Too many header lines")
            headers[hm.group(1).decode("ascii").lower()] = hm.group(2).decode("utf-8", "replace").strip()
        return command, headers

    async def _read_request(
        self, reader: asyncio.StreamReader, peer: _IP | None = None
    ) -> tuple[str, dict[str, str], bytes]:
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                command, headers = await self._read_head(reader)
        except TimeoutError:
            raise ProtocolError(EX_TIMEOUT, "Timeout reading request (idle connection)") from None
        if command in ("PING", "SKIP"):
            return command, headers, b""
        if command == "TELL":
            self._check_tell(headers, peer)  # before reading a body a refused client would make us hold
        limit = self.state.settings.max_message_bytes
        length_text = headers.get("content-length")
        if length_text is not None:
            if not _CONTENT_LENGTH.fullmatch(length_text):
                raise ProtocolError(EX_PROTOCOL, "Bad Content-length: " + length_text[:40])
            length = int(length_text)
            if length > limit:
                raise ProtocolError(EX_DATAERR, f"Message too big: {length} > {limit} bytes")
            try:
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise ProtocolError(EX_PROTOCOL, "Content-length larger than the data sent") from None
        else:  # SPAMC/1.0 style: the message runs to the end of the stream
            body = await reader.read(limit + 1)
            while len(body) <= limit:
                more = await reader.read(limit + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > limit:
                raise ProtocolError(EX_DATAERR, f"Message too big: more than {limit} bytes")
        if headers.get("compress", "").lower() == "zlib":
            try:
                d = zlib.decompressobj()
                body = d.decompress(body, limit + 1)
            except zlib.error:
                raise ProtocolError(EX_DATAERR, "Bad zlib data") from None
            if len(body) > limit:
                raise ProtocolError(EX_DATAERR, f"Message too big: more than {limit} bytes")
        return command, headers, body

    # ------------------------------------------------------------------ answering
    async def _dispatch(
        self, command: str, headers: dict[str, str], body: bytes,
        peer: _IP | None = None,
    ) -> bytes:
        if command == "PING":
            return b"SPAMD/1.5 0 PONG\r\n"
        if command == "TELL":
            return await self._tell(headers, body, peer)
        if not body.strip():
            raise ProtocolError(EX_DATAERR, "Empty message")
        served = self.state.current()
        from services.api.routes import classify_and_remember

        try:
            # spamc's User: names whose allow and block lists apply (a name no list could have: none)
            v, _ = await self.state.classify_pool.run(classify_and_remember, self.state, served, body,
                                                      headers.get("user"))
        except Busy:
            raise ProtocolError(EX_TEMPFAIL, "Server busy, retry later") from None
        score, threshold = spamd_score(v)
        spam_line = f"Spam: {'True' if v.is_spam else 'False'} ; {score:.1f} / {threshold:.1f}\r\n"
        if command == "CHECK":
            return _reply(spam_line, b"")
        if command == "SYMBOLS":
            return _reply(spam_line, ",".join(h.name for h in v.rules.hits).encode() + b"\r\n")
        if command == "REPORT":
            return _reply(spam_line, _report(v, score, threshold).encode())
        if command == "REPORT_IFSPAM":
            return _reply(spam_line, _report(v, score, threshold).encode() if v.is_spam else b"")
        processed_headers = _spam_headers(v, score, threshold)
        if command == "HEADERS":
            return _reply(spam_line, _rewrite(body, processed_headers, headers_only=True))
        return _reply(spam_line, _rewrite(body, processed_headers, headers_only=False))  # PROCESS

    async def _tell(
        self, headers: dict[str, str], body: bytes,
        peer: _IP | None = None,
    ) -> bytes:
        from streams.events import FeedbackEvent, RetractionEvent
        from streams.topics import BrokerUnavailable

        klass = headers.get("message-class", "").lower()
        sets = {s.strip().lower() for s in headers.get("set", "").split(",") if s.strip()}
        removes = {s.strip().lower() for s in headers.get("remove", "").split(",") if s.strip()}
        if not sets and not removes:
            raise ProtocolError(EX_PROTOCOL, "TELL needs a Set or Remove header")
        if sets and klass not in ("spam", "ham"):
            raise ProtocolError(EX_PROTOCOL, "Bad Message-class: " + klass[:40])
        if not body.strip():
            raise ProtocolError(EX_DATAERR, "Empty message")
        user = headers.get("user")
        if user is not None and not RELAY_USER.fullmatch(user):
            raise ProtocolError(EX_PROTOCOL, "Bad User: 1..128 characters of A-Z a-z 0-9 . _ @ + -")
        reporter = f"{SPAMD_NAMESPACE}:{user}" if user else SPAMD_NAMESPACE
        mid = message_id_for(body)
        loop = asyncio.get_running_loop()
        state = self.state
        source = f"{SPAMD_NAMESPACE}@{peer}"
        try:
            refusal = await loop.run_in_executor(None, lambda: state.limiter.check(
                reporter, source, new_reporter_allowed=bool(sets)))
        except sqlite3.Error as exc:  # fail closed, as over HTTP
            log.error("feedback limiter unavailable", error=str(exc))
            raise ProtocolError(EX_TEMPFAIL, "Feedback cannot be rate-limited now, not recorded") from None
        if refusal is not None:
            metrics.FEEDBACK.labels("refused", refusal.reason).inc()
            log.info("spamd feedback refused", reason=refusal.reason, reporter=reporter, peer=str(peer))
            raise ProtocolError(EX_TEMPFAIL, f"Feedback refused: {refusal.detail}")
        out_headers: list[str] = []
        try:
            if removes:
                last = state.last_feedback(reporter, mid, source)
                if last is not None:
                    ev = RetractionEvent(retracts=last["event_id"], message_id=mid, reporter=reporter)
                    await loop.run_in_executor(None, state.producer.send, state.topics.retractions, mid, ev)
                    state.forget_last_feedback(reporter, mid, last.get("source"))
                    metrics.FEEDBACK.labels("retracted", "").inc()
                    out_headers.append("DidRemove: " + ",".join(sorted(removes)))
            if sets:
                fb = FeedbackEvent.create(message_id=mid, label="spam" if klass == "spam" else "ham", reporter=reporter,
                                          raw=body, served=self.state.messages.served(mid))
                await loop.run_in_executor(None, state.producer.send, state.topics.feedback, mid, fb)
                state.remember_feedback(fb.event_id, mid, reporter, source)
                if user:
                    await loop.run_in_executor(None, state.learn_user_list, reporter, body, fb.label)
                metrics.FEEDBACK.labels("accepted", "").inc()
                log.info("spamd feedback accepted", event_id=fb.event_id, message_id=mid, label=klass,
                         reporter=reporter)
                out_headers.append("DidSet: " + ",".join(sorted(sets)))
        except BrokerUnavailable:
            metrics.FEEDBACK.labels("refused", "kafka_unavailable").inc()
            raise ProtocolError(EX_TEMPFAIL, "Kafka unavailable, feedback not recorded") from None
        return ("SPAMD/1.1 0 EX_OK\r\n" + "".join(h + "\r\n" for h in out_headers) + "\r\n").encode()


def _show(line: bytes) -> str:
    return line[:80].decode("ascii", "replace")


def _reply(spam_line: str, body: bytes) -> bytes:
    head = f"SPAMD/1.1 0 EX_OK\r\n{spam_line}"
    if body or not spam_line:
        head += f"Content-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def _spam_headers(v: Any, score: float, threshold: float) -> list[str]:
    tests = ",".join(h.name for h in v.rules.hits) or "none"
    m = v.model
    out = []
    if v.is_spam:
        out.append("X-Spam-Flag: YES")
    out += [
        f"X-Spam-Status: {'Yes' if v.is_spam else 'No'}, score={score:.1f} required={threshold:.1f} "
        f"tests={tests} probability={v.probability:.4f} decided_by={v.decided_by}",
        f"X-Spam-Level: {'*' * max(0, min(50, int(score)))}",
        f"X-Spam-Checker-Version: Flywheel model={m.version} ({m.kind}, {m.provider})",
    ]
    return out


def _rewrite(raw: bytes, new_headers: list[str], *, headers_only: bool) -> bytes:
    """The message with Flywheel's X-Spam-* headers first (any old X-Spam-* headers dropped)."""
    nl = b"\r\n" if b"\r\n" in raw[:4096] else b"\n"
    sep = nl + nl
    cut = raw.find(sep)
    if cut < 0:
        head, rest = raw.rstrip(b"\r\n"), b""
    else:
        head, rest = raw[:cut], raw[cut + len(sep):]
    lines = head.split(nl)
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"x-spam-")
        if not skipping:
            kept.append(line)
    prefix = [kept.pop(0)] if kept and kept[0].startswith(b"From ") else []
    added = [h.encode("utf-8", "replace") for h in new_headers]
    new_head = nl.join(prefix + added + kept) + sep
    return new_head if headers_only else new_head + rest


def _report(v: Any, score: float, threshold: float) -> str:
    m = v.model
    lines = [
        "Spam detection software (Flywheel) has identified this incoming email as"
        + (" possible spam." if v.is_spam else " not spam."),
        "",
        f"Content analysis details:   ({score:.1f} points, {threshold:.1f} required)",
        "",
        f" model: {m.version} ({m.kind}, {m.provider}) spam probability {m.probability:.4f};"
        f" served probability {v.probability:.4f} decided by {v.decided_by} (policy {v.policy})",
        f" rules: score {v.rules.score:.1f} / {v.rules.threshold:.1f}",
        "",
        " pts rule name              description",
        "---- ---------------------- --------------------------------------------------",
    ]
    for h in v.rules.hits:
        lines.append(f"{h.weight:4.1f} {h.name:<22} {h.description[:60]}")
    if getattr(v, "user_list", None) is not None:
        lines.append(f" list: the sender is on the user's {v.user_list} list (decided)")
    hit = getattr(v, "campaign", None)
    if hit is not None:
        lines.append(f" 0.0 {'FLYWHEEL_CAMPAIGN':<22} near-duplicate ({hit.similarity:.2f}) of mail flagged "
                     f"{hit.flagged}" + (" (decided)" if v.decided_by == "campaign" else ""))
    return "\r\n".join(lines) + "\r\n"
