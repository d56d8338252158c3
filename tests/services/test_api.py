"""The API over real HTTP against running servers: both sides in every answer, feedback into the real broker,
promotions reaching two running API processes, refusal of a corrupt artifact, rules at run time (and a rule
that would recurse refused before it is saved), every bad input's 4xx, slow clients, metrics, no torch in the
serving processes, keys from a file, relay identities, and feedback limits shared by the workers."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import consume_all

from services.bench.api_process import ApiProcess
from services.local.daemon import free_port, wait_until
from services.settings import REPO_ROOT, Settings

ADMIN = {"X-API-Key": "test-admin-key"}
USER = {"Authorization": "Bearer test-user-key"}
RELAY = {"X-API-Key": "test-relay-key"}
KEYS = {"test-admin-key": "admin", "test-user-key": "alice", "test-bob-key": "bob", "test-relay-key": "mx",
        "test-relay2-key": "mx2", "test-dave-key": "dave"}
BURST = 20  # flags a reporter may send at once in these replicas
NEW_REPORTERS = 4  # new reporters a key may introduce per hour


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def api_base(kafka: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings of this module's API replicas: own state dir (registry, rules), the session's broker/topics; the
    keys come from a file (as a mounted secret would), two of them relays."""
    state = tmp_path_factory.mktemp("api-state")
    keys_file = state / "api-keys.json"
    keys_file.write_text(json.dumps(KEYS))
    return kafka.model_copy(update={
        "state_dir": state,
        "downloads_dir": kafka.downloads,
        "api_keys": KEYS,
        "api_keys_file": keys_file,
        "relay_identities": ["mx", "mx2"],
        "admin_identities": ["admin"],
        "client_timeout_s": 2.0,
        "max_message_bytes": 256 * 1024,
        "feedback_identity_burst": BURST,
        "feedback_identity_rate": 0.01,
        "feedback_new_reporters": NEW_REPORTERS,
        "message_spool_bytes": 2 * 1024 * 1024,
    })


@pytest.fixture(scope="module")
def versions(api_base: Settings, corpus: list) -> dict[str, str]:
    """A champion, a second good version, and a corrupt copy (truncated graph) in the replicas' registry."""
    import random

    from services.bench.api import train_quick_version

    shuffled = random.Random(7).sample(corpus, len(corpus))
    a, b = shuffled[:700], shuffled[700:1400]
    v1 = train_quick_version(api_base.registry, [m.raw for m in a], [m.is_spam for m in a], seed=1, promote=True)
    v2 = train_quick_version(api_base.registry, [m.raw for m in b], [m.is_spam for m in b], seed=2)
    bad = v2[:-4] + "dead"
    vdir = api_base.registry / "versions"
    shutil.copytree(vdir / v2, vdir / bad)
    meta = (vdir / bad / "meta.json").read_text().replace(v2, bad)
    (vdir / bad / "meta.json").write_text(meta)
    model = vdir / bad / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return {"v1": v1, "v2": v2, "bad": bad}


@pytest.fixture(scope="module")
def replicas(api_base: Settings, versions: dict[str, str], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[ApiProcess, ApiProcess]]:
    """Two API processes on one registry: A (2 workers, learns promotions only from Kafka events: its pointer
    poll is slower than any deadline below) and B (1 worker, 1 s pointer poll)."""
    logs = tmp_path_factory.mktemp("api-logs")
    a = ApiProcess(api_base.model_copy(update={
        "api_port": free_port(), "spamd_port": free_port(), "workers": 2, "model_poll_s": 600.0,
    }), logs / "a.log")
    b = ApiProcess(api_base.model_copy(update={
        "api_port": free_port(), "spamd_port": free_port(), "workers": 1, "model_poll_s": 1.0,
    }), logs / "b.log")
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def api(replicas: tuple[ApiProcess, ApiProcess]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=replicas[0].base_url, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def samples(corpus: list) -> dict[str, bytes]:
    spam = next(m.raw for m in corpus if m.is_spam and 2000 < len(m.raw) < 20000)
    ham = next(m.raw for m in corpus if not m.is_spam and 1000 < len(m.raw) < 20000)
    return {"spam": spam, "ham": ham}




def find_event(settings: Settings, topic: str, event_id: str, timeout_s: float = 15.0) -> dict[str, Any]:
    return wait_until(lambda: next((e for e in consume_all(settings, topic) if e.get("event_id") == event_id), None),
                    timeout_s, f"event {event_id} in {topic}", interval_s=0.3)


# --------------------------------------------------------------------------------------------- torch
@pytest.mark.unit
def test_api_modules_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import services.api.app, services.api.routes, services.api.state, services.spamd\n"
        "import models.classifier, models.registry, models.runtime, streams.topics\n"
        "services.api.app.create_app().openapi()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.integration
def test_serving_processes_have_no_torch_loaded(replicas: tuple[ApiProcess, ApiProcess]) -> None:
    for rep in replicas:
        pids = rep.worker_pids()
        assert pids
        for pid in pids:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "onnxruntime" in maps, "the worker should serve through onnxruntime"
            assert "libtorch" not in maps, f"worker {pid} loaded torch"


# --------------------------------------------------------------------------------------------- classify
def _check_both_sides(body: dict[str, Any], raw: bytes) -> None:
    assert body["message_id"] == hashlib.sha256(raw).hexdigest()[:32]
    assert body["verdict"] in ("spam", "ham") and body["is_spam"] == (body["verdict"] == "spam")
    assert 0.0 <= body["probability"] <= 1.0
    assert body["decided_by"] in ("combined", "model", "rules", "both")
    r, m = body["rules"], body["model"]
    assert set(r) >= {"score", "threshold", "verdict", "hits"} and r["threshold"] > 0
    assert all(set(h) == {"name", "weight", "description"} for h in r["hits"])
    assert abs(sum(h["weight"] for h in r["hits"]) - r["score"]) < 0.01
    assert set(m) >= {"probability", "verdict", "version", "provider"}
    assert 0.0 <= m["probability"] <= 1.0 and m["provider"].endswith("ExecutionProvider") and m["version"]


@pytest.mark.integration
def test_classify_raw_json_structured_and_batch(api: httpx.Client, samples: dict[str, bytes],
                                                versions: dict[str, str]) -> None:
    spam, ham = samples["spam"], samples["ham"]
    r = api.post("/classify", content=spam, headers={"Content-Type": "message/rfc822"})
    assert r.status_code == 200, r.text
    _check_both_sides(r.json(), spam)
    assert r.json()["verdict"] == "spam" and r.json()["rules"]["hits"]
    assert r.json()["model"]["version"] == versions["v1"]

    r = api.post("/classify", json={"raw": ham.decode("latin-1")})
    assert r.status_code == 200, r.text
    assert r.json()["verdict"] == "ham"
    _check_both_sides(r.json(), ham.decode("latin-1").encode("utf-8"))

    fields = {"subject": "WIN A FREE iPhone!!! Act now", "from": "promo@winner-prizes.biz", "to": ["a@b.org"],
              "headers": {"X-Mailer": "Bulk Sender 3.1"}, "text": "Click here to claim your prize now!",
              "html": "<a href='http://winner-prizes.biz/claim'>CLAIM NOW</a>"}
    r = api.post("/classify", json=fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rules"]["hits"] is not None and body["model"]["version"] == versions["v1"]

    r = api.post("/classify/batch", json={"messages": [{"raw": spam.decode("latin-1")}, {"raw": ham.decode("latin-1")},
                                                       fields]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["verdict"] for x in results[:2]] == ["spam", "ham"]
    for x in results:
        assert x["rules"] is not None and x["model"]["version"] == versions["v1"]


# --------------------------------------------------------------------------------------------- feedback
@pytest.mark.integration
def test_feedback_lands_in_kafka_idempotently_and_retracts(api: httpx.Client, api_base: Settings,
                                                           samples: dict[str, bytes]) -> None:
    raw = samples["spam"]
    mid = api.post("/classify", content=raw, headers={"Content-Type": "message/rfc822"}).json()["message_id"]
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}", **USER}
    r1 = api.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=key)
    assert r1.status_code == 202, r1.text
    ev_id = r1.json()["event_id"]
    assert r1.json()["reporter"] == "alice" and r1.json()["replayed"] is False
    topic = api_base.topic("feedback")
    ev = find_event(api_base, topic, ev_id)
    assert ev["type"] == "feedback" and ev["label"] == "spam" and ev["reporter"] == "alice"
    assert ev["message_id"] == mid and base64.b64decode(ev["raw"]) == raw

    r2 = api.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=key)  # a retry
    assert r2.status_code == 202 and r2.json()["event_id"] == ev_id and r2.json()["replayed"] is True
    r3 = api.post("/feedback", json={"message_id": mid, "label": "ham"}, headers=key)  # key reused, other body
    assert r3.status_code == 409
    same_key = [e for e in consume_all(api_base, topic) if e.get("idempotency_key") == key["Idempotency-Key"]]
    assert len(same_key) == 1

    by_raw = api.post("/feedback", json={"raw": samples["ham"].decode("latin-1"), "label": "ham"},
                      headers={"X-API-Key": "test-bob-key"})
    assert by_raw.status_code == 202 and by_raw.json()["reporter"] == "bob"
    assert find_event(api_base, topic, by_raw.json()["event_id"])["label"] == "ham"

    assert api.delete(f"/feedback/{ev_id}", headers={"X-API-Key": "test-bob-key"}).status_code == 403
    rr = api.delete(f"/feedback/{ev_id}", headers=USER)
    assert rr.status_code == 202, rr.text
    ret = find_event(api_base, topic, rr.json()["event_id"])
    assert ret["type"] == "retraction" and ret["retracts"] == ev_id and ret["message_id"] == mid
    assert api.delete(f"/feedback/{uuid.uuid4()}", headers=USER).status_code == 404


@pytest.mark.integration
def test_feedback_answers_503_when_kafka_is_unreachable(api_base: Settings, versions: dict[str, str],
                                                       samples: dict[str, bytes], tmp_path: Path) -> None:
    dead = api_base.model_copy(update={
        "kafka_bootstrap": f"127.0.0.1:{free_port()}", "api_port": free_port(), "spamd_port": free_port(),
        "workers": 1,
    })
    with ApiProcess(dead, tmp_path / "dead.log").start() as proc, httpx.Client(base_url=proc.base_url,
                                                                               timeout=30) as c:
        r = c.post("/classify", content=samples["spam"], headers={"Content-Type": "message/rfc822"})
        assert r.status_code == 200  # classification does not need Kafka
        fb = c.post("/feedback", json={"message_id": r.json()["message_id"], "label": "spam"}, headers=USER)
        assert fb.status_code == 503 and int(fb.headers["Retry-After"]) > 0
        assert "NOT recorded" in fb.json()["detail"]
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["kafka"] is False
        metrics = c.get("/metrics").text
        assert 'flywheel_feedback_total{outcome="refused",reason="kafka_unavailable"} 1.0' in metrics


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.integration
def test_every_bad_input_gets_its_4xx(api: httpx.Client, api_base: Settings) -> None:
    limit = api_base.max_message_bytes
    big = b"Subject: big\r\n\r\n" + b"x" * (limit + 10)
    r = api.post("/classify", content=big, headers={"Content-Type": "message/rfc822"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the running count must catch it
        yield b"Subject: big\r\n\r\n"
        for _ in range(limit // 65536 + 2):
            yield b"y" * 65536

    assert api.post("/classify", content=chunks(), headers={"Content-Type": "message/rfc822"}).status_code == 413
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("/classify", {"content": b"", "headers": {"Content-Type": "message/rfc822"}}, 400),
        ("/classify", {"content": b"\x00\x01 just bytes", "headers": {"Content-Type": "message/rfc822"}}, 400),
        ("/classify", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ("/classify", {"json": {"unknown": 1}}, 422),
        ("/classify", {"json": {"raw": "Subject: x\r\n\r\nhi", "subject": "both"}}, 422),
        ("/classify", {"json": {"headers": {"Bad Name": "v"}}}, 422),
        ("/classify", {"json": ["not", "an", "object"]}, 422),
        ("/classify", {"content": b"Subject: x\r\n\r\nhi", "headers": {"Content-Type": "image/png"}}, 415),
        ("/classify/batch", {"json": {"messages": []}}, 422),
        ("/classify/batch", {"json": {"messages": [{"raw": "no header line here"}]}}, 400),
        ("/feedback", {"json": {"message_id": "ab" * 16, "label": "spam"}}, 401),
        ("/feedback", {"json": {"message_id": "ab" * 16, "label": "spam"}, "headers": {"X-API-Key": "wrong"}}, 401),
        ("/feedback", {"json": {"message_id": "ab" * 16, "label": "spam"}, "headers": USER}, 404),
        ("/feedback", {"json": {"message_id": "ab" * 16, "label": "eggs"}, "headers": USER}, 422),
        ("/feedback", {"json": {"label": "spam"}, "headers": USER}, 422),
        ("/feedback", {"content": b"[1,", "headers": {**USER, "Content-Type": "application/json"}}, 400),
        ("/models/rollback", {"headers": USER}, 403),
        ("/rules", {"json": {"name": "X", "kind": "body", "pattern": "/x/", "weight": 1}, "headers": USER}, 403),
        ("/rules", {"json": {"name": "BAD_RE", "kind": "body", "pattern": "/(/", "weight": 1},
                    "headers": ADMIN}, 422),
        ("/rules/NO_SUCH_RULE/disable", {"headers": ADMIN}, 404),
        ("/models/no-such-version/promote", {"headers": ADMIN}, 404),
    ]
    for path, kwargs, want in cases:
        r = api.post(path, **kwargs)
        assert r.status_code == want, (path, kwargs, r.status_code, r.text)
        assert "detail" in r.json(), r.text
    assert api.get("/models").status_code == 401
    assert api.get("/models", headers=USER).status_code == 403  # operators and admins only
    assert api.get("/models", headers=ADMIN).status_code == 200


@pytest.mark.integration
def test_slow_client_is_cut_off_and_the_server_goes_on(replicas: tuple[ApiProcess, ApiProcess],
                                                       api: httpx.Client, samples: dict[str, bytes]) -> None:
    s = replicas[0].settings
    with socket.create_connection((s.api_host, s.api_port), timeout=30) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
                     b"Content-Length: 5000\r\n\r\nSubject: slow\r\n")  # and then nothing
        t0 = time.monotonic()
        data = sock.recv(4096)
        waited = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert waited < s.client_timeout_s + 5
    # a client that never finishes its request head, or never sends anything, is disconnected as well
    for opening in (b"POST /classify HTTP/1.1\r\nHost: x\r\n", b""):
        with socket.create_connection((s.api_host, s.api_port), timeout=30) as sock:
            sock.sendall(opening)
            t0 = time.monotonic()
            assert sock.recv(4096) == b""  # closed by the server, not by our 30 s socket timeout
            assert time.monotonic() - t0 < s.client_timeout_s + 5
    # an idle keep-alive connection is closed by the server too
    with socket.create_connection((s.api_host, s.api_port), timeout=30) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in sock.recv(4096)
        while sock.recv(4096):
            pass
        assert time.monotonic() - t0 < 15
    assert api.post("/classify", content=samples["ham"], headers={"Content-Type": "message/rfc822"}).status_code == 200


# --------------------------------------------------------------------------------------------- models
def _served_versions(base_url: str, raw: bytes, n: int) -> set[str]:
    seen = set()
    with httpx.Client(base_url=base_url, timeout=10) as c:
        for _ in range(n):
            r = c.post("/classify", content=raw, headers={"Content-Type": "message/rfc822"})
            assert r.status_code == 200, r.text
            seen.add(r.json()["model"]["version"])
    return seen


@pytest.mark.integration
def test_promotion_reaches_two_api_processes_and_corrupt_artifact_is_refused(
    replicas: tuple[ApiProcess, ApiProcess], api: httpx.Client, api_base: Settings,
    versions: dict[str, str], samples: dict[str, bytes],
) -> None:
    a, b = replicas
    raw = samples["spam"]
    v1, v2, bad = versions["v1"], versions["v2"], versions["bad"]
    assert _served_versions(a.base_url, raw, 6) == {v1} and _served_versions(b.base_url, raw, 3) == {v1}

    listing = api.get("/models", headers=ADMIN).json()
    assert listing["champion"] == v1
    by_version = {v["version"]: v for v in listing["versions"]}
    assert by_version[v1]["champion"] and not by_version[v2]["champion"]
    assert "train_rows" in by_version[v2]["metrics"] and by_version[v2]["lineage"]["seed"] == 2

    # The API refuses to promote a corrupt artifact at all.
    r = api.post(f"/models/{bad}/promote", headers=ADMIN)
    assert r.status_code == 409 and "refused" in r.json()["detail"]

    t0 = time.monotonic()
    r = api.post(f"/models/{v2}/promote", json={"reason": "test"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["champion"] == v2 and r.json()["previous"] == v1 and r.json()["event_id"]
    # A's pointer poll is 600 s: only the Kafka model event can bring it there within the deadline.
    wait_until(lambda: _served_versions(a.base_url, raw, 20) == {v2}, 20, "replica A (2 workers) on v2")
    wait_until(lambda: _served_versions(b.base_url, raw, 3) == {v2}, 20, "replica B on v2")
    assert time.monotonic() - t0 < 30
    model_event = find_event(api_base, api_base.topic("model-events"), r.json()["event_id"])
    assert model_event["kind"] == "promoted" and model_event["version"] == v2

    # A corrupt artifact written straight to the pointer (bypassing the API) is refused by every replica,
    # which keep answering with the model they had.
    from models.registry import Registry
    from streams.events import ModelEvent
    from streams.topics import EventProducer

    Registry(api_base.registry).promote(bad, "simulated bad push")
    with EventProducer(api_base.streams()) as prod:
        prod.send(api_base.topic("model-events"), bad, ModelEvent(kind="promoted", version=bad))

    def rejected(rep: ApiProcess) -> float:
        text = httpx.get(rep.base_url + "/metrics", timeout=10).text
        line = next((ln for ln in text.splitlines()
                     if ln.startswith('flywheel_model_reloads_total{outcome="rejected"}')), "x 0")
        return float(line.split()[-1])

    wait_until(lambda: rejected(a) >= 2, 20, "both workers of A refusing the corrupt version")
    wait_until(lambda: rejected(b) >= 1, 20, "B refusing the corrupt version")
    assert _served_versions(a.base_url, raw, 10) == {v2}
    assert _served_versions(b.base_url, raw, 3) == {v2}
    assert "model refused" in a.tail(400)

    # Roll back (pops the bad pointer: back to v2), then again (back to v1), and replicas follow.
    r = api.post("/models/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["champion"] == v2
    r = api.post("/models/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["champion"] == v1, r.text
    wait_until(lambda: _served_versions(a.base_url, raw, 20) == {v1}, 20, "replica A back on v1")
    wait_until(lambda: _served_versions(b.base_url, raw, 3) == {v1}, 20, "replica B back on v1")


# --------------------------------------------------------------------------------------------- rules
@pytest.mark.integration
def test_rules_added_and_disabled_at_run_time_reach_every_replica(
    replicas: tuple[ApiProcess, ApiProcess], api: httpx.Client, api_base: Settings,
) -> None:
    token = "zqxjflywheeltoken"
    msg = f"From: x@example.org\r\nSubject: hello\r\n\r\nplease read {token} today\r\n".encode()
    rule = {"name": "TEST_TOKEN_RULE", "kind": "body", "pattern": f"/{token}/i", "weight": 2.5,
            "description": "test token"}

    def hits(base: str) -> set[str]:
        r = httpx.post(base + "/classify", content=msg, headers={"Content-Type": "message/rfc822"}, timeout=30)
        return {h["name"] for h in r.json()["rules"]["hits"]}

    assert all("TEST_TOKEN_RULE" not in hits(rep.base_url) for rep in replicas)
    r = api.post("/rules", json=rule, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["event_id"]
    for rep in replicas:
        wait_until(lambda rep=rep: all("TEST_TOKEN_RULE" in hits(rep.base_url) for _ in range(10)), 60,
                 f"rule on {rep.base_url}")
    assert "TEST_TOKEN_RULE" in api_base.rules_file.read_text()
    listed = {x["name"]: x for x in api.get("/rules", headers=ADMIN).json()["rules"]}
    assert listed["TEST_TOKEN_RULE"]["enabled"] is True

    assert api.post("/rules/TEST_TOKEN_RULE/disable", headers=ADMIN).status_code == 200
    for rep in replicas:
        wait_until(lambda rep=rep: all("TEST_TOKEN_RULE" not in hits(rep.base_url) for _ in range(10)), 60,
                 f"rule disabled on {rep.base_url}")
    assert api.post("/rules/TEST_TOKEN_RULE/enable", headers=ADMIN).status_code == 200
    text = api.get("/metrics").text
    assert 'flywheel_rule_changes_total{action="add"}' in text
    assert 'flywheel_rule_changes_total{action="disable"}' in text
    events = consume_all(api_base, api_base.topic("rule-changes"))
    assert [e["action"] for e in events if e.get("rule") in ("TEST_TOKEN_RULE",) or
            (isinstance(e.get("rule"), dict) and e["rule"].get("name") == "TEST_TOKEN_RULE")] == \
        ["add", "disable", "enable"]


# --------------------------------------------------------------------------------------------- ops
@pytest.mark.integration
def test_health_ready_and_multiprocess_metrics(replicas: tuple[ApiProcess, ApiProcess], api: httpx.Client,
                                               samples: dict[str, bytes]) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["kafka"]
    before = _metric(api.get("/metrics").text, 'flywheel_http_requests_total{endpoint="/classify",method="POST",'
                                               'status="200"}')
    for _ in range(20):
        assert api.post("/classify", content=samples["spam"],
                        headers={"Content-Type": "message/rfc822"}).status_code == 200
    text = api.get("/metrics").text
    after = _metric(text, 'flywheel_http_requests_total{endpoint="/classify",method="POST",status="200"}')
    assert after - before == 20  # counted across both workers of replica A
    for name in ("flywheel_http_request_duration_seconds_bucket", 'flywheel_verdicts_total{side="rules"',
                 'flywheel_verdicts_total{side="model"', 'flywheel_verdicts_total{side="served"',
                 "flywheel_rule_hits_total", "flywheel_spam_probability_bucket", "flywheel_model_info",
                 "flywheel_rules_active", 'flywheel_model_reloads_total{outcome="ok"}'):
        assert name in text, name


def _metric(text: str, prefix: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.split()[-1])
    return total


@pytest.mark.integration
def test_start_with_a_refused_champion_serves_the_previous_one(api_base: Settings, versions: dict[str, str],
                                                                tmp_path: Path) -> None:
    from models.registry import Registry
    from services.api.state import ServingState

    s = api_base.model_copy(update={"state_dir": tmp_path, "registry_dir": tmp_path / "registry"})
    shutil.copytree(api_base.registry, s.registry)
    reg = Registry(s.registry)
    before = reg.champion()
    assert before in (versions["v1"], versions["v2"])
    reg.promote(versions["bad"], "bad pointer before a restart")
    state = ServingState(s)
    model = state._first_servable(versions["bad"])
    assert model.version == before
    assert "sha256" in state.rejected[versions["bad"]]


# --------------------------------------------------------------------------------------------- hostile traffic
@pytest.mark.integration
def test_relay_identities_name_their_users(api: httpx.Client, api_base: Settings, samples: dict[str, bytes]) -> None:
    raw = samples["ham"].replace(b"Subject:", b"Subject: [relay]", 1)
    mid = api.post("/classify", content=raw, headers={"Content-Type": "message/rfc822"}).json()["message_id"]
    body = {"message_id": mid, "label": "ham"}
    r = api.post("/feedback", json=body, headers={**RELAY, "X-Flywheel-User": "dora@example.org"})
    assert r.status_code == 202, r.text
    assert r.json()["reporter"] == "mx:dora@example.org"
    ev = find_event(api_base, api_base.topic("feedback"), r.json()["event_id"])
    assert ev["reporter"] == "mx:dora@example.org" and ev["label"] == "ham"
    plain = api.post("/feedback", json=body, headers=RELAY)  # no header: the relay itself
    assert plain.status_code == 202 and plain.json()["reporter"] == "mx"

    denied = api.post("/feedback", json=body, headers={**USER, "X-Flywheel-User": "dora@example.org"})
    assert denied.status_code == 403 and "not a relay identity" in denied.json()["detail"], denied.text
    for bad in ("", "a" * 129, "dora:x", "do ra", "dóra"):
        r2 = api.post("/feedback", json=body, headers={**RELAY, "X-Flywheel-User": bad.encode("utf-8")})
        assert r2.status_code == 422 and "X-Flywheel-User" in r2.json()["detail"], (bad, r2.text)

    ev_id = r.json()["event_id"]
    for who in ({**RELAY, "X-Flywheel-User": "erin"}, RELAY, USER):  # another user of the relay, the relay, alice
        assert api.delete(f"/feedback/{ev_id}", headers=who).status_code == 403
    assert api.delete(f"/feedback/{ev_id}", headers={**USER, "X-Flywheel-User": "dora@example.org"}).status_code == 403
    rr = api.delete(f"/feedback/{ev_id}", headers={**RELAY, "X-Flywheel-User": "dora@example.org"})
    assert rr.status_code == 202 and rr.json()["reporter"] == "mx:dora@example.org", rr.text
    ret = find_event(api_base, api_base.topic("feedback"), rr.json()["event_id"])
    assert ret["type"] == "retraction" and ret["retracts"] == ev_id and ret["reporter"] == "mx:dora@example.org"

    doc = api.get("/openapi.json").json()
    assert "X-Flywheel-User" in doc["info"]["description"]
    params = {p["name"] for p in doc["paths"]["/feedback"]["post"]["parameters"]}
    assert "X-Flywheel-User" in params


@pytest.mark.integration
def test_feedback_flood_gets_429_across_both_workers(replicas: tuple[ApiProcess, ApiProcess], api_base: Settings,
                                                    samples: dict[str, bytes]) -> None:
    """Replica A has two workers; each request on its own connection lands on either. The limit is one bucket
    for the reporter however the requests are spread (per-worker buckets would let 2 x BURST through)."""
    a = replicas[0]
    raw = samples["ham"].decode("latin-1")
    answers = [httpx.post(a.base_url + "/feedback", json={"raw": raw, "label": "ham"}, timeout=30,
                          headers={"X-API-Key": "test-dave-key", "Connection": "close"}) for _ in range(BURST + 15)]
    codes = [r.status_code for r in answers]
    assert set(codes) == {202, 429}, codes
    assert codes.count(202) == BURST, codes  # the rate refills 0.01/s: not one more within the test
    assert codes[:BURST] == [202] * BURST
    refused = [r for r in answers if r.status_code == 429]
    assert all(int(r.headers["Retry-After"]) >= 1 and "too many flags from reporter 'dave'" in r.json()["detail"]
               for r in refused)
    text = httpx.get(a.base_url + "/metrics", timeout=10).text
    assert _metric(text, 'flywheel_feedback_total{outcome="refused",reason="rate_limited"}') >= 15
    assert len(a.worker_pids()) == 2


@pytest.mark.integration
def test_a_relay_cannot_invent_reporters_without_bound(api: httpx.Client, samples: dict[str, bytes]) -> None:
    body = {"raw": samples["spam"].decode("latin-1"), "label": "spam"}
    relay2 = {"X-API-Key": "test-relay2-key"}
    codes = [api.post("/feedback", json=body, headers={**relay2, "X-Flywheel-User": f"sock{i}"})
             for i in range(NEW_REPORTERS + 2)]
    assert [r.status_code for r in codes] == [202] * NEW_REPORTERS + [429, 429], [r.text for r in codes]
    assert "new reporters" in codes[-1].json()["detail"] and int(codes[-1].headers["Retry-After"]) > 60
    known = api.post("/feedback", json=body, headers={**relay2, "X-Flywheel-User": "sock0"})
    assert known.status_code == 202  # a reporter it already has is still welcome


@pytest.mark.integration
def test_a_rule_that_would_recurse_is_refused_and_never_saved(replicas: tuple[ApiProcess, ApiProcess],
                                                             api: httpx.Client, api_base: Settings) -> None:
    before = api_base.rules_file.read_text()
    base_rule = api.get("/rules", headers=ADMIN).json()["rules"][0]["name"]
    depth = (4990 - len(base_rule)) // 2  # within the 5000 characters a pattern may have
    for name, pattern in (("DEEP_META", "(" * depth + base_rule + ")" * depth),
                          ("NOT_META", "!" * 2 * depth + base_rule)):
        r = api.post("/rules", json={"name": name, "kind": "meta", "pattern": pattern, "weight": 1.0},
                     headers=ADMIN)
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert name in r.json()["detail"], r.text[:300]
    assert api_base.rules_file.read_text() == before
    for rep in replicas:
        names = {x["name"] for x in httpx.get(rep.base_url + "/rules", headers=ADMIN, timeout=30).json()["rules"]}
        assert not names & {"DEEP_META", "NOT_META"}
    events = consume_all(api_base, api_base.topic("rule-changes"))
    assert not [e for e in events if isinstance(e.get("rule"), dict) and e["rule"].get("name") in
                ("DEEP_META", "NOT_META")]
    assert api.get("/healthz").status_code == 200


@pytest.mark.integration
def test_the_message_spool_of_two_workers_is_bounded_in_bytes(replicas: tuple[ApiProcess, ApiProcess],
                                                              api_base: Settings) -> None:
    a = replicas[0]
    spool = api_base.state_dir / "api" / "messages"
    bound = api_base.message_spool_bytes
    for i in range(60):  # 60 distinct messages of ~100 KB: 6 MB through a 2 MB spool
        raw = b"Subject: spool %d\r\n\r\n" % i + (b"word%d " % i) * 16_000
        r = httpx.post(a.base_url + "/classify", content=raw, timeout=30,
                       headers={"Content-Type": "message/rfc822", "Connection": "close"})
        assert r.status_code == 200
    total = sum(f.stat().st_size for f in spool.iterdir() if f.is_file())
    assert total <= bound * (1 + 2 / 16) + 256 * 1024, total  # one sixteenth per writing worker, one message
