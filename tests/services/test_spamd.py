"""The spamd port against Debian's real ``spamc`` client (and raw sockets for what spamc never sends):
answers, feedback/retraction events really in Kafka, protocol errors, timeouts, the server going on; TELL only
when enabled and permitted, in its own reporter namespace, rate-limited; the connection cap."""

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
from conftest import consume_all

from services.bench.api_process import ApiProcess
from services.local.daemon import free_port, wait_until
from services.settings import Settings

SPAMC = shutil.which("spamc")
pytestmark = pytest.mark.skipif(SPAMC is None, reason="Debian package spamc is not installed (make system-deps)")


SECRET = "spamd-tell-secret-for-tests"
HTTP_KEYS = {"spamd-test-admin": "admin", "spamd-test-alice": "alice"}


@pytest.fixture(scope="module")
def spamd(kafka: Settings, corpus: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """An API with 2 workers: both listen on the spamd port (SO_REUSEPORT). TELL is enabled for 127.0.0.1 and
    for clients with the secret; a reporter may flag 5 times at once, a source introduce 5 new reporters."""
    from services.bench.api import train_quick_version

    s = kafka.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("spamd-state"), "downloads_dir": kafka.downloads,
        "api_port": free_port(), "spamd_port": free_port(), "workers": 2, "client_timeout_s": 2.0,
        "max_message_bytes": 256 * 1024, "api_keys": HTTP_KEYS,
        "spamd_allow_tell": True, "spamd_tell_clients": ["127.0.0.1/32"], "spamd_tell_secret": SECRET,
        "feedback_identity_burst": 5, "feedback_identity_rate": 0.01, "feedback_new_reporters": 5,
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


def raw_request(proc: ApiProcess, data: bytes, *, shut: bool = True, timeout_s: float = 20,
                source: str | None = None) -> bytes:
    """One request from a raw socket (``source``: another loopback address to connect from)."""
    with socket.create_connection(("127.0.0.1", proc.settings.spamd_port), timeout=timeout_s,
                                  source_address=(source, 0) if source else None) as sock:
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
                                if e["type"] == "feedback" and e["reporter"] == "spamd:carol"), None), 15, "TELL event")
    assert ev["label"] == "spam" and ev["message_id"] == mid and base64.b64decode(ev["raw"]) == raw

    r = spamc(spamd, "-L", "forget", "-u", "carol", stdin=raw)
    assert r.returncode == 0 and b"successfully" in r.stdout, r
    ret = wait_until(lambda: next((e for e in consume_all(spamd.settings, spamd.settings.topic("feedback"), 10.0)
                                 if e["type"] == "retraction" and e["reporter"] == "spamd:carol"), None), 15,
                     "retraction")
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


def tell(user: str | None, raw: bytes, *, klass: str = "spam", extra: str = "", action: str = "Set") -> bytes:
    head = f"TELL SPAMC/1.5\r\nMessage-class: {klass}\r\n{action}: local\r\n{extra}"
    if user is not None:
        head += f"User: {user}\r\n"
    return head.encode() + f"Content-length: {len(raw)}\r\n\r\n".encode() + raw


def feedback_events(proc: ApiProcess) -> list[dict]:
    return consume_all(proc.settings, proc.settings.topic("feedback"), 10.0)


@pytest.mark.integration
def test_tell_needs_a_listed_address_or_the_secret(spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    raw = mail["ham"]
    refused = raw_request(spamd, tell("dora", raw), source="127.0.0.2")  # loopback, but not a listed client
    assert refused.startswith(b"SPAMD/1.0 77 TELL not permitted from 127.0.0.2"), refused
    wrong = raw_request(spamd, tell("dora", raw, extra="Secret: not-the-secret\r\n"), source="127.0.0.2")
    assert wrong.startswith(b"SPAMD/1.0 77 TELL refused: wrong secret"), wrong
    ok = raw_request(spamd, tell("dora", raw, extra=f"Secret: {SECRET}\r\n"), source="127.0.0.2")
    assert ok.startswith(b"SPAMD/1.1 0 EX_OK") and b"DidSet: local" in ok, ok
    assert raw_request(spamd, tell("bad user!", raw)).startswith(b"SPAMD/1.0 76 Bad User"), "user name checked"
    events = wait_until(lambda: [e for e in feedback_events(spamd) if e["reporter"].endswith("dora")] or None, 15,
                        "the permitted TELL")
    assert [e["reporter"] for e in events] == ["spamd:dora"]  # the refused ones never reached Kafka


@pytest.mark.integration
def test_a_spamd_user_can_never_act_as_an_http_user(spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    import httpx

    raw = mail["spam"].replace(b"Subject:", b"Subject: [ns]", 1)
    with httpx.Client(base_url=spamd.base_url, timeout=30) as http:
        mid = http.post("/classify", content=raw, headers={"Content-Type": "message/rfc822"}).json()["message_id"]
        fb = http.post("/feedback", json={"message_id": mid, "label": "spam"},
                       headers={"X-API-Key": "spamd-test-alice"})
        assert fb.status_code == 202 and fb.json()["reporter"] == "alice"
    # spamc as "alice" relabels and retracts: only its own spamd:alice flags, never the HTTP user's
    r = spamc(spamd, "-L", "ham", "-u", "alice", stdin=raw)
    assert r.returncode == 0, r
    r = spamc(spamd, "-L", "forget", "-u", "alice", stdin=raw)
    assert r.returncode == 0, r
    events = wait_until(lambda: (lambda ev: ev if len(ev) >= 3 else None)(
        [e for e in feedback_events(spamd) if e["message_id"] == mid]), 15, "the three events on the message")
    by = [(e["type"], e["reporter"], e.get("label")) for e in events]
    assert ("feedback", "alice", "spam") in by and ("feedback", "spamd:alice", "ham") in by, by
    retractions = [e for e in events if e["type"] == "retraction"]
    assert [e["reporter"] for e in retractions] == ["spamd:alice"], by
    assert retractions[0]["retracts"] != fb.json()["event_id"]  # alice's HTTP flag stands


@pytest.mark.integration
def test_tell_floods_and_invented_reporters_are_refused(spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    raw = mail["ham"]
    codes = [spamc(spamd, "-L", "ham", "-u", "flood", stdin=raw) for _ in range(7)]
    assert [c.returncode == 0 for c in codes] == [True] * 5 + [False] * 2, [(c.returncode, c.stderr) for c in codes]
    reply = raw_request(spamd, tell("flood", raw, klass="ham"))
    assert reply.startswith(b"SPAMD/1.0 75 Feedback refused: too many flags from reporter 'spamd:flood'"), reply
    # a client inventing a reporter per flag (another address, with the secret: its own source)
    replies = [raw_request(spamd, tell(f"sock{i}", raw, extra=f"Secret: {SECRET}\r\n"), source="127.0.0.3")
               for i in range(7)]
    assert [r.startswith(b"SPAMD/1.1 0 EX_OK") for r in replies] == [True] * 5 + [False] * 2, replies
    assert b"75 Feedback refused: source 'spamd@127.0.0.3' introduced 5 new reporters" in replies[-1], replies[-1]
    flood = wait_until(lambda: (lambda ev: ev if len(ev) >= 5 else None)(
        [e for e in feedback_events(spamd) if e["reporter"] == "spamd:flood"]), 15, "the accepted flood flags")
    assert len(flood) == 5
    assert len({e["reporter"] for e in feedback_events(spamd) if e["reporter"].startswith("spamd:sock")}) == 5


# --------------------------------------------------------------------------------------------- defaults
@pytest.fixture(scope="module")
def closed_spamd(kafka: Settings, spamd: ApiProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """The default settings for TELL (off), one worker, at most 3 spamd connections at once."""
    s = spamd.settings.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("closed-state"), "registry_dir": spamd.settings.registry,
        "api_port": free_port(), "spamd_port": free_port(), "workers": 1, "client_timeout_s": 5.0,
        "spamd_allow_tell": False, "spamd_max_connections": 3,
    })
    with ApiProcess(s, tmp_path_factory.mktemp("closed-logs") / "api.log").start() as proc:
        yield proc


@pytest.mark.integration
def test_tell_is_off_by_default(closed_spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    raw = mail["spam"].replace(b"Subject:", b"Subject: [off]", 1)
    mid = hashlib.sha256(raw).hexdigest()[:32]
    r = spamc(closed_spamd, "-L", "spam", "-u", "erin", stdin=raw)
    assert r.returncode != 0 and b"successfully" not in r.stdout, r
    reply = raw_request(closed_spamd, tell("erin", raw))
    assert reply.startswith(b"SPAMD/1.0 69 TELL commands are not enabled"), reply
    assert spamc(closed_spamd, "-c", stdin=raw).returncode == 1  # checking still works
    assert not [e for e in feedback_events(closed_spamd) if e["message_id"] == mid]


@pytest.mark.integration
def test_spamd_connections_are_capped(closed_spamd: ApiProcess) -> None:
    port = closed_spamd.settings.spamd_port
    held = []
    try:
        for _ in range(3):  # three clients that send half a request and wait
            sock = socket.create_connection(("127.0.0.1", port), timeout=20)
            sock.sendall(b"CHECK SPAMC/1.5\r\nContent-length: 100\r\n")
            held.append(sock)
        # once the server has accepted all three (they wait for their body until the 5 s timeout), one more is
        # turned away at once
        over = wait_until(lambda: (lambda r: r if r.startswith(b"SPAMD/1.0 75") else None)(
            raw_request(closed_spamd, b"PING SPAMC/1.5\r\n\r\n")), 3, "a refused fourth connection", 0.05)
        assert over.startswith(b"SPAMD/1.0 75 Too many connections"), over
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: raw_request(closed_spamd, b"PING SPAMC/1.5\r\n\r\n") == b"SPAMD/1.5 0 PONG\r\n", 15,
               "a free connection slot")


@pytest.mark.integration
def test_spamds_user_gets_their_own_lists(spamd: ApiProcess, mail: dict[str, bytes]) -> None:
    """spamc -u names the user: their block list turns ham into spam for them alone, their allow list spam into
    ham; the report says the list decided."""
    import httpx

    from models.userlists import sender_of

    admin = {"X-API-Key": "spamd-test-admin"}
    with httpx.Client(base_url=spamd.base_url, timeout=30) as http:
        r = http.put("/users/dave/lists", headers=admin, json={"block": [sender_of(mail["ham"])],
                                                               "allow": [sender_of(mail["spam"])]})
        assert r.status_code == 200, r.text
    r = spamc(spamd, "-c", "-u", "dave", stdin=mail["ham"])
    assert r.returncode == 1, r  # blocked for dave
    r = spamc(spamd, "-c", "-u", "erin", stdin=mail["ham"])
    assert r.returncode == 0, r  # erin has no lists
    r = spamc(spamd, "-c", "-u", "dave", stdin=mail["spam"])
    assert r.returncode == 0, r  # allowed for dave
    score, threshold = (float(x) for x in r.stdout.decode().strip().split("/"))
    assert score < threshold
    report = spamc(spamd, "-R", "-u", "dave", stdin=mail["spam"]).stdout.decode()
    assert "allow list (decided)" in report and "decided by list" in report
    headers = spamc(spamd, "--headers", "-u", "dave", stdin=mail["ham"]).stdout
    assert b"X-Spam-Flag: YES" in headers and b"decided_by=list" in headers
