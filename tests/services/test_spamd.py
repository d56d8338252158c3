"""The spamd port against Debian's real ``spamc`` client (and raw sockets for what spamc never sends):
answers, feedback/retraction events really in Kafka, protocol errors, timeouts, the server going on."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.api.testing import ApiProcess
from services.settings import Settings
from conftest import consume_all
from services.daemon import free_port, wait_until

SPAMC = shutil.which("spamc")
pytestmark = pytest.mark.skipif(SPAMC is None, reason="Debian package spamc is not installed (make system-deps)")


@pytest.fixture(scope="module")
def spamd(kafka: Settings, corpus: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """An API with 2 workers: both listen on the spamd port (SO_REUSEPORT)."""
    from services.bench import train_quick_version

    s = kafka.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("spamd-state"), "downloads_dir": kafka.downloads,
        "api_port": free_port(), "spamd_port": free_port(), "workers": 2, "client_timeout_s": 2.0,
        "max_message_bytes": 256 * 1024,
    })
    import random

    sub = random.Random(8).sample(corpus, 700)
    train_quick_version(s.registry, [m.raw for m in sub], [m.is_spam for m in sub], seed=4, promote=True)
    with ApiProcess(s, tmp_path_factory.mktemp("spamd-logs") / "api.log").start() as proc:
        yield proc


@pytest.fixture(scope="module")
def mail(corpus: list) -> dict[str, bytes]:
    spam = next(m.raw for m in corpus if m.is_spam and "spam-2" in m.group and 2000 < len(m.raw) < 20000)
    ham = next(m.raw for m in corpus if not m.is_spam and "easy" in m.group and 1000 < len(m.raw) < 20000)
    return {"spam": spam, "ham": ham}


def spamc(proc: ApiProcess, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    assert SPAMC is not None
    return subprocess.run([SPAMC, "-d", "127.0.0.1", "-p", str(proc.settings.spamd_port), "-t", "20", *args],
                          input=stdin, capture_output=True, timeout=60)


def raw_request(proc: ApiProcess, data: bytes, *, shut: bool = True, timeout_s: float = 20) -> bytes:
    with socket.create_connection(("127.0.0.1", proc.settings.spamd_port), timeout=timeout_s) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out  # the server closed the connection (recv returned b"")




@pytest.mark.integration
def test_spamc_check_and_report(spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    r = spamc(spamd, "-c", stdin=mail["spam"])
    assert r.returncode == 1, r  # spamc -c exits 1 for spam
    score, threshold = (float(x) for x in r.stdout.decode().strip().split("/"))
    assert score >= threshold == 5.0
    r = spamc(spamd, "-c", stdin=mail["ham"])
    assert r.returncode == 0, r
    score, threshold = (float(x) for x in r.stdout.decode().strip().split("/"))
    assert score < threshold

    r = spamc(spamd, "-R", stdin=mail["spam"])
    text = r.stdout.decode()
    assert text.splitlines()[0].endswith("/5.0")
    assert "Content analysis details" in text and "pts rule name" in text and "model:" in text

    r = spamc(spamd, "-y", stdin=mail["spam"])
    symbols = r.stdout.decode().strip().split(",")
    assert symbols and all(s.isupper() or "_" in s for s in symbols)

    r = spamc(spamd, stdin=mail["spam"])  # PROCESS: the message comes back with our headers
    assert r.returncode == 0
    out = r.stdout
    assert b"X-Spam-Flag: YES" in out and b"X-Spam-Status: Yes, score=" in out
    assert out.endswith(mail["spam"].split(b"\n\n", 1)[1])
    r = spamc(spamd, "--headers", stdin=mail["ham"])
    assert b"X-Spam-Status: No, score=" in r.stdout and b"X-Spam-Flag" not in r.stdout

    assert spamc(spamd, "-K", stdin=b"").returncode == 0  # PING


@pytest.mark.integration
def test_spamc_learn_produces_feedback_and_retraction_events(spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    raw = mail["spam"]
    mid = hashlib.sha256(raw).hexdigest()[:32]
    r = spamc(spamd, "-L", "spam", "-u", "carol", stdin=raw)
    assert r.returncode == 0 and b"successfully" in r.stdout, r
    ev = wait_until(lambda: next((e for e in consume_all(spamd.settings, spamd.settings.topic("feedback"), 10.0)
                                if e["type"] == "feedback" and e["reporter"] == "carol"), None), 15, "TELL event")
    assert ev["label"] == "spam" and ev["message_id"] == mid and base64.b64decode(ev["raw"]) == raw

    r = spamc(spamd, "-L", "forget", "-u", "carol", stdin=raw)
    assert r.returncode == 0 and b"successfully" in r.stdout, r
    ret = wait_until(lambda: next((e for e in consume_all(spamd.settings, spamd.settings.topic("feedback"), 10.0)
                                 if e["type"] == "retraction" and e["reporter"] == "carol"), None), 15, "retraction")
    assert ret["retracts"] == ev["event_id"] and ret["message_id"] == mid

    r = spamc(spamd, "-L", "ham", stdin=mail["ham"])  # no -u: spamc sends the login name as User
    assert r.returncode == 0 and b"successfully" in r.stdout


@pytest.mark.integration
def test_concurrent_spamc_clients(spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    msgs = [mail["spam"], mail["ham"]] * 10
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda m: spamc(spamd, "-c", stdin=m).returncode, msgs))
    assert codes == [1, 0] * 10


@pytest.mark.integration
def test_protocol_errors_get_error_replies_and_the_server_goes_on(spamd: ApiProcess) -> None:
    bad_header = raw_request(spamd, b"CHECK SPAMC/1.5\r\nthis is not a header\r\n\r\n")
    assert bad_header.startswith(b"SPAMD/1.0 76 Bad header line"), bad_header
    assert raw_request(spamd, b"HELLO WORLD\r\n\r\n").startswith(b"SPAMD/1.0 76 Bad request line")
    assert raw_request(spamd, b"FROB SPAMC/1.5\r\n\r\n").startswith(b"SPAMD/1.0 76 Unknown command")
    assert raw_request(spamd, b"CHECK SPAMC/1.5\r\nContent-length: x\r\n\r\n").startswith(b"SPAMD/1.0 76 Bad Content")
    short = raw_request(spamd, b"CHECK SPAMC/1.5\r\nContent-length: 500\r\n\r\nSubject: hi\r\n\r\nshort")
    assert short.startswith(b"SPAMD/1.0 76 Content-length larger"), short
    big = raw_request(spamd, b"CHECK SPAMC/1.5\r\nContent-length: 99999999\r\n\r\n")
    assert big.startswith(b"SPAMD/1.0 65 Message too big"), big
    assert raw_request(spamd, b"TELL SPAMC/1.5\r\nMessage-class: eggs\r\nSet: local\r\n"
                              b"Content-length: 12\r\n\r\nSubject: x\r\n").startswith(b"SPAMD/1.0 76 Bad Message-class")
    assert raw_request(spamd, b"A" * 20000 + b"\r\n").startswith(b"SPAMD/1.0 76")
    # a client that sends half a request and stalls gets a timeout reply, then the connection closes
    t0 = time.monotonic()
    stalled = raw_request(spamd, b"CHECK SPAMC/1.5\r\nContent-length: 100\r\n", shut=False)
    assert stalled.startswith(b"SPAMD/1.0 79 Timeout"), stalled
    assert time.monotonic() - t0 < spamd.settings.client_timeout_s + 5
    # still serving
    assert raw_request(spamd, b"PING SPAMC/1.5\r\n\r\n") == b"SPAMD/1.5 0 PONG\r\n"
    ok = raw_request(spamd, b"CHECK SPAMC/1.5\r\nContent-length: 33\r\n\r\nSubject: hello\r\n\r\nlunch at noon?\r\n")
    assert re.fullmatch(rb"SPAMD/1\.1 0 EX_OK\r\nSpam: (True|False) ; -?\d+\.\d / 5\.0\r\n\r\n", ok), ok
