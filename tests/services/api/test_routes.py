"""The HTTP routes in-process (FastAPI's TestClient, the state swapped in through ``dependency_overrides``): every
answer's status and body, what reaches Kafka, the limits, the admin calls and the OpenAPI document. Several
processes, a real broker and real models are tests/services/test_api.py's."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_fakes import (
    ADMIN,
    BOB,
    HAM,
    MODEL_VERSION,
    OPS,
    RELAY,
    SPAM,
    USER,
    Api,
    fake_version,
    make_api,
)
from prometheus_client import REGISTRY

from services.api.schemas import ClassifyResponse
from services.local.daemon import wait_until

pytestmark = pytest.mark.unit


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    a = make_api(tmp_path)
    yield a
    a.state.close()


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rfc822(body: bytes) -> dict[str, Any]:
    return {"content": body, "headers": {"Content-Type": "message/rfc822"}}


# --------------------------------------------------------------------------------------------- classify
def test_classify_a_raw_message_answers_both_sides_and_remembers_it(api: Api) -> None:
    before = sample("flywheel_verdicts_total", {"side": "served", "verdict": "spam"})
    r = api.client.post("/classify", **rfc822(SPAM))
    assert r.status_code == 200, r.text
    body = r.json()
    ClassifyResponse.model_validate(body)  # the documented schema is what is answered
    assert body["verdict"] == "spam" and body["is_spam"] is True and body["policy"] == "combined"
    assert body["model"]["version"] == MODEL_VERSION and body["model"]["verdict"] == "spam"
    assert body["rules"]["hits"] == [{"name": "MAKE_MONEY", "weight": 3.25, "description": "says make money"}]
    assert body["rules"]["verdict"] == "ham"  # each side keeps its own verdict
    assert api.state.current().classifier.seen == [SPAM]
    assert api.state.messages.get(body["message_id"]) == SPAM  # for a later flag by id
    assert api.state.messages.served(body["message_id"])["version"] == MODEL_VERSION
    assert sample("flywheel_verdicts_total", {"side": "served", "verdict": "spam"}) == before + 1


def test_classify_json_fields_are_assembled_into_a_message(api: Api) -> None:
    r = api.client.post("/classify", json={"from": "Prize <win@prizes.example>", "to": ["a@x.org", "b@x.org"],
                                           "subject": "act now", "text": "make money fast"})
    assert r.status_code == 200, r.text
    assert r.json()["verdict"] == "spam"
    raw = api.state.current().classifier.seen[-1]
    assert raw.startswith(b"From: Prize <win@prizes.example>\r\nTo: a@x.org, b@x.org\r\nSubject: act now\r\n")
    assert raw.endswith(b"\r\n\r\nmake money fast")


@pytest.mark.parametrize(("request_kw", "status", "says"), [
    ({"content": b"\x89PNG...", "headers": {"Content-Type": "image/png"}}, 415, "unsupported Content-Type"),
    (rfc822(b"just some words, no header\r\n\r\nbody"), 400, "not an RFC 822 message"),
    (rfc822(b"   \r\n"), 400, "empty message"),
    ({"content": b"", "headers": {"Content-Type": "application/json"}}, 400, "empty body"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad JSON"),
    ({"json": {"raw": "From: a@b\r\n\r\nx", "subject": "both"}}, 422, "either 'raw' or structured"),
    ({"json": {}}, 422, "give 'raw' or at least one"),
    ({"json": {"subject": "x", "surprise": 1}}, 422, "Extra inputs are not permitted"),
    ({"json": {"subject": "x", "headers": {"Bad Name": "v"}}}, 422, "bad header name"),
    (rfc822(b"Subject: big\r\n\r\n" + b"x" * 5000), 413, "exceeds the limit of 4096 bytes"),
    ({"json": {"subject": "\u00e9" * 1500}}, 413, "message of"),  # fits as JSON, not once RFC 2047-encoded
])
def test_classify_refuses_what_it_cannot_take(api: Api, request_kw: dict[str, Any], status: int, says: str) -> None:
    r = api.client.post("/classify", **request_kw)
    assert r.status_code == status, r.text
    assert says in r.text
    assert api.state.current().classifier.seen == []


def test_a_body_without_content_length_is_cut_off_at_the_limit(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"Subject: chunked\r\n\r\n"
        for _ in range(10):
            yield b"y" * 1000

    r = api.client.post("/classify", content=chunks(), headers={"Content-Type": "message/rfc822"})
    assert r.status_code == 413 and "exceeds the limit" in r.text


def test_classify_can_require_a_key(tmp_path: Path) -> None:
    a = make_api(tmp_path, classify_requires_key=True)
    try:
        r = a.client.post("/classify", **rfc822(HAM))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert a.client.post("/classify", content=HAM, headers={**ADMIN, "Content-Type": "message/rfc822"}
                             ).status_code == 200
        assert a.client.post("/classify/batch", json={"messages": [{"raw": HAM.decode()}]}).status_code == 401
    finally:
        a.state.close()


def test_a_full_classification_pool_answers_503_with_retry_after(tmp_path: Path) -> None:
    from services.api.offload import ClassifyPool

    a = make_api(tmp_path)
    a.state.classify_pool = pool = ClassifyPool(1, 0)
    release = threading.Event()
    holder = threading.Thread(target=lambda: asyncio.run(pool.run(release.wait, 10)))
    holder.start()
    try:
        wait_until(lambda: pool.pending == 1, 10, "the pool's one slot taken")
        r = a.client.post("/classify", **rfc822(HAM))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.text
        assert a.client.post("/classify/batch", json={"messages": [{"raw": HAM.decode()}]}).status_code == 503
    finally:
        release.set()
        holder.join(10)
    wait_until(lambda: pool.pending == 0, 10, "the slot freed")
    assert a.client.post("/classify", **rfc822(HAM)).status_code == 200
    a.state.close()


@pytest.mark.parametrize(("body", "field", "says"), [
    ({"headers": {"X-A": "\u00e9" + "a" * 400_000}}, ["headers", "X-A"], "at most 10000 characters"),
    ({"to": "\u00e9" + "a" * 400_000}, ["to"], "at most 10000 characters"),
    ({"to": ["a@example.org"] * 1001}, ["to"], "at most 1000 items"),
    ({"to": ["a" * 1001 + "@example.org"]}, ["to"], "at most 1000 characters"),
    ({"subject": "s", "headers": {f"X-{i}": "v" for i in range(101)}}, ["headers"], "at most 100 items"),
    ({"subject": "x" * 10_000, "headers": {f"X-{i}": "v" * 9_990 for i in range(26)}}, [], "more than 262144"),
])
def test_every_structured_field_is_capped(tmp_path: Path, body: dict[str, Any], field: list[str], says: str) -> None:
    a = make_api(tmp_path, max_message_bytes=2 * 1024 * 1024)
    try:
        for url, payload in (("/classify", body), ("/classify/batch", {"messages": [{"subject": "ok"}, body]})):
            r = a.client.post(url, json=payload)
            assert r.status_code == 422, r.text
            (first, *_) = [e for e in r.json()["detail"] if says in e["msg"]]
            loc = first["loc"] if url == "/classify" else first["loc"][2:]
            assert not field or [x for x in loc if x in field] == field, (url, r.json())
        assert a.state.current().classifier.seen == []
    finally:
        a.state.close()


def test_json_fields_are_assembled_off_the_event_loop(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Assembling a message from JSON fields is work in proportion to the request: a classification thread's, never
    the event loop's (where it would hold up /healthz, /metrics and spamd)."""
    from services.api import routes

    threads: list[str] = []

    def recording(req: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return real(req)

    real = routes.assemble
    monkeypatch.setattr(routes, "assemble", recording)
    assert api.client.post("/classify", json={"subject": "Prix sp\u00e9cial", "text": "hi"}).status_code == 200
    r = api.client.post("/classify/batch", json={"messages": [{"subject": "a"}, {"subject": "b"}]})
    assert r.status_code == 200
    assert len(threads) == 3 and all(t.startswith("flywheel-classify") for t in threads), threads


def test_a_flag_is_parsed_and_hashed_off_the_event_loop(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag's body near the size limit takes tens of milliseconds to parse and hash: a thread's work."""
    from services.api import routes

    loop_thread: list[str] = []
    threads: list[str] = []

    def recording(raw: bytes) -> str:
        threads.append(threading.current_thread().name)
        return real(raw)

    real = routes.message_id_for
    monkeypatch.setattr(routes, "message_id_for", recording)

    @api.app.get("/test-loop-thread")
    async def _loop_thread() -> dict[str, str]:
        loop_thread.append(threading.current_thread().name)
        return {}

    api.client.get("/test-loop-thread")
    r = api.client.post("/feedback", json={"raw": SPAM.decode(), "label": "spam"}, headers=USER)
    assert r.status_code == 202, r.text
    assert threads and loop_thread and loop_thread[0] not in threads, (loop_thread, threads)


def test_a_single_message_is_not_held_behind_batches(tmp_path: Path) -> None:
    """Four clients post batches of 200 messages at 5 ms each (a second apiece on one of the two threads); a single
    message sent meanwhile waits behind at most one chunk of each, not behind whole batches. Every batch is
    answered in full and in order."""
    import time

    import httpx

    from services.api.offload import ClassifyPool

    a = make_api(tmp_path, max_message_bytes=1024 * 1024, classify_batch_share=8)
    a.state.classify_pool = ClassifyPool(2, 64)
    clf = a.state.current().classifier
    plain = clf.classify

    def slow(raw: bytes) -> Any:
        time.sleep(0.005)
        return plain(raw)

    clf.classify = slow  # type: ignore[method-assign]
    batch = {"messages": [{"subject": f"m{i}", "text": "make money" if i % 2 else "lunch"} for i in range(200)]}

    async def scenario() -> tuple[list[httpx.Response], list[float]]:
        transport = httpx.ASGITransport(app=a.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            batches = [asyncio.create_task(c.post("/classify/batch", json=batch)) for _ in range(4)]
            await asyncio.sleep(0.3)  # the batches are being scored now (they take about 2 s in all)
            singles = []
            while not all(t.done() for t in batches) and len(singles) < 10:
                t0 = time.perf_counter()
                r = await c.post("/classify", json={"subject": "single", "text": "make money"})
                assert r.status_code == 200, r.text
                singles.append(time.perf_counter() - t0)
            return await asyncio.gather(*batches), singles

    try:
        answers, singles = asyncio.run(scenario())
    finally:
        a.state.close()
    assert all(r.status_code == 200 for r in answers), [r.text[:200] for r in answers]
    for r in answers:
        assert [x["verdict"] for x in r.json()["results"]] == ["spam" if i % 2 else "ham" for i in range(200)]
    assert len(singles) >= 3, singles
    print("single /classify during four batches (s):", [round(x, 3) for x in singles])
    assert max(singles) < 0.5, singles  # one batch alone takes 1 s on a thread


def test_batch_answers_in_order_and_names_the_bad_item(api: Api) -> None:
    r = api.client.post("/classify/batch", json={"messages": [{"raw": HAM.decode()}, {"subject": "s", "text":
                                                                                     "make money"}]})
    assert r.status_code == 200, r.text
    assert [x["verdict"] for x in r.json()["results"]] == ["ham", "spam"]
    bad = api.client.post("/classify/batch", json={"messages": [{"raw": HAM.decode()}, {"raw": "no header here"}]})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("messages[1]: not an RFC 822 message")
    bad = api.client.post("/classify/batch", json={"messages": [{"subject": "x", "headers": {"a b": "c"}}]})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("messages[0]: bad header name")
    assert api.client.post("/classify/batch", json={"messages": []}).status_code == 422
    assert api.client.post("/classify/batch", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415


# --------------------------------------------------------------------------------------------- feedback
def classify(api: Api, raw: bytes = SPAM) -> str:
    r = api.client.post("/classify", **rfc822(raw))
    assert r.status_code == 200, r.text
    return str(r.json()["message_id"])


def test_feedback_by_message_id_reaches_kafka_with_the_served_verdict(api: Api) -> None:
    mid = classify(api)
    r = api.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=USER)
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["reporter"] == "alice" and answer["message_id"] == mid and answer["replayed"] is False
    ((topic, key, event),) = api.state.producer.sent
    assert (topic, key) == ("t.feedback", mid)
    assert event.reporter == "alice" and event.label == "spam" and event.event_id == answer["event_id"]
    assert event.served is not None and event.served.version == MODEL_VERSION and event.served.is_spam is True
    assert api.state.feedback_record(answer["event_id"])["reporter"] == "alice"


def test_feedback_with_the_message_itself(api: Api) -> None:
    r = api.client.post("/feedback", json={"raw": HAM.decode(), "label": "ham"}, headers=USER)
    assert r.status_code == 202, r.text
    (event,) = api.state.producer.events("t.feedback")
    assert event.served is None and event.label == "ham"


@pytest.mark.parametrize(("body", "headers", "status", "says"), [
    ({"message_id": "ab" * 16, "label": "spam"}, USER, 404, "unknown message id"),
    ({"raw": "no header line", "label": "spam"}, USER, 400, "not an RFC 822 message"),
    ({"label": "spam"}, USER, 422, "exactly one of message_id and raw"),
    ({"message_id": "ab", "raw": "Subject: x\r\n\r\n", "label": "spam"}, USER, 422, "exactly one"),
    ({"message_id": "XYZ", "label": "spam"}, USER, 422, "the answer POST /classify gave for the message"),
    ({"message_id": "<from /classify>", "label": "spam"}, USER, 422, "a message id is the 'message_id' field"),
    ({"raw": "Subject: x\r\n\r\n", "label": "maybe"}, USER, 422, "literal_error"),
    ({"raw": "Subject: x\r\n\r\n", "label": "spam"}, {}, 401, "a valid API key is required"),
    ({"raw": "Subject: x\r\n\r\n", "label": "spam"}, {"X-API-Key": "wrong"}, 401, "a valid API key"),
    ({"raw": "Subject: x\r\n\r\n", "label": "spam"}, {"Authorization": "Bearer wrong"}, 401, "a valid API key"),
])
def test_feedback_refusals(api: Api, body: dict[str, Any], headers: dict[str, str], status: int, says: str) -> None:
    r = api.client.post("/feedback", json=body, headers=headers)
    assert r.status_code == status, r.text
    assert says in r.text
    assert api.state.producer.sent == []


def test_feedback_bad_json_is_400(api: Api) -> None:
    r = api.client.post("/feedback", content=b"{", headers={**USER, "Content-Type": "application/json"})
    assert r.status_code == 400 and "bad JSON" in r.text


def test_idempotency_key_repeats_the_answer_and_produces_once(api: Api) -> None:
    mid = classify(api)
    h = {**USER, "Idempotency-Key": "retry-1"}
    first = api.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=h)
    again = api.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=h)
    assert first.status_code == again.status_code == 202
    assert again.json() == {**first.json(), "replayed": True}
    assert len(api.state.producer.sent) == 1
    other = api.client.post("/feedback", json={"message_id": mid, "label": "ham"}, headers=h)
    assert other.status_code == 409 and "different message or label" in other.text
    bob = api.client.post("/feedback", json={"message_id": mid, "label": "ham"}, headers={**BOB, "Idempotency-Key":
                                                                                          "retry-1"})
    assert bob.status_code == 202 and len(api.state.producer.sent) == 2  # keys are per reporter
    long = api.client.post("/feedback", json={"message_id": mid, "label": "spam"},
                           headers={**USER, "Idempotency-Key": "k" * 201})
    assert long.status_code == 400 and "Idempotency-Key must be 1..200" in long.text


def test_kafka_down_is_503_nothing_recorded_and_a_retry_later_goes_through(api: Api) -> None:
    mid = classify(api)
    api.state.producer.down = True
    h = {**USER, "Idempotency-Key": "k1"}
    before = sample("flywheel_feedback_total", {"outcome": "refused", "reason": "kafka_unavailable"})
    r = api.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=h)
    assert r.status_code == 503 and r.headers["retry-after"] == "5" and "NOT recorded" in r.text
    assert sample("flywheel_feedback_total", {"outcome": "refused", "reason": "kafka_unavailable"}) == before + 1
    api.state.producer.down = False
    r = api.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=h)  # the key was released
    assert r.status_code == 202 and r.json()["replayed"] is False and len(api.state.producer.sent) == 1


def test_relay_names_its_users_and_others_may_not(api: Api) -> None:
    flag = {"raw": HAM.decode(), "label": "ham"}
    r = api.client.post("/feedback", json=flag, headers={**RELAY, "X-Flywheel-User": "carol@example.org"})
    assert r.status_code == 202 and r.json()["reporter"] == "mx:carol@example.org"
    r = api.client.post("/feedback", json=flag, headers=RELAY)
    assert r.status_code == 202 and r.json()["reporter"] == "mx"
    r = api.client.post("/feedback", json=flag, headers={**USER, "X-Flywheel-User": "carol"})
    assert r.status_code == 403 and "not a relay identity" in r.text
    for bad in ("a:b", "x" * 129, "sp ace"):
        r = api.client.post("/feedback", json=flag, headers={**RELAY, "X-Flywheel-User": bad})
        assert r.status_code == 422 and "X-Flywheel-User must be" in r.text, bad
    assert [e.reporter for e in api.state.producer.events("t.feedback")] == ["mx:carol@example.org", "mx"]


def test_only_the_reporter_or_an_admin_retracts(api: Api) -> None:
    mid = classify(api)
    event_id = api.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=USER).json()["event_id"]
    assert api.client.delete(f"/feedback/{event_id}", headers=BOB).status_code == 403
    r = api.client.delete(f"/feedback/{event_id}", headers=USER)
    assert r.status_code == 202, r.text
    assert r.json() == {"event_id": r.json()["event_id"], "retracts": event_id, "message_id": mid, "reporter": "alice"}
    retraction = api.state.producer.events("t.feedback")[-1]
    assert retraction.type == "retraction" and retraction.retracts == event_id
    assert api.state.last_feedback("alice", mid) is None

    relayed = api.client.post("/feedback", json={"message_id": mid, "label": "spam"},
                              headers={**RELAY, "X-Flywheel-User": "u1"}).json()["event_id"]
    r = api.client.delete(f"/feedback/{relayed}", headers={**RELAY, "X-Flywheel-User": "u2"})
    assert r.status_code == 403  # the relay's other user
    assert api.client.delete(f"/feedback/{relayed}", headers=ADMIN).status_code == 202
    assert api.client.delete(f"/feedback/{uuid.uuid4()}", headers=USER).status_code == 404
    assert api.client.delete("/feedback/not-a-uuid", headers=USER).status_code == 404


def test_a_relay_flood_does_not_cost_other_reporters_their_retractions(tmp_path: Path) -> None:
    """Feedback records are shared out per source: 600 flags from one relay (1,200 records, more than the fake's
    1,000 per source) leave another reporter's flag retractable."""
    a = make_api(tmp_path, feedback_identity_burst=1000)
    try:
        mid = classify(a)
        mine = a.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=USER).json()["event_id"]
        flood = {**RELAY, "X-Flywheel-User": "flood"}
        for i in range(600):
            raw = f"Subject: flood {i}\r\n\r\nmake money {i}\r\n"
            assert a.client.post("/feedback", json={"raw": raw, "label": "ham"}, headers=flood).status_code == 202
        r = a.client.delete(f"/feedback/{mine}", headers=USER)
        assert r.status_code == 202, r.text
        assert r.json()["retracts"] == mine
    finally:
        a.state.close()


def test_a_flag_cannot_name_a_served_verdict_record(tmp_path: Path) -> None:
    """With a shared spool (several workers), a message id is looked up among messages only: the key under which
    the spool once kept the served verdict of a message is an unknown message, not a message to flag."""
    from services.api.state import FileStore, MessageCache

    a = make_api(tmp_path)
    try:
        a.state.messages = MessageCache(1000, 1 << 22, spool=FileStore(tmp_path / "spool", 1000, 1 << 24))
        mid = classify(a)
        assert a.client.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=USER).status_code == 202
        r = a.client.post("/feedback", json={"message_id": FileStore.key("served", mid), "label": "spam"},
                          headers=USER)
        assert r.status_code == 404, r.text
    finally:
        a.state.close()


def test_validation_errors_never_echo_the_input(api: Api) -> None:
    r = api.client.delete("/feedback/" + "z" * 65, headers=USER)  # FastAPI's own path validation
    assert r.status_code == 422
    assert all(set(e) <= {"loc", "msg", "type"} for e in r.json()["detail"])
    r = api.client.post("/feedback", json={"raw": "Subject: x\r\n\r\n", "label": "secret-value"}, headers=USER)
    assert r.status_code == 422 and "secret-value" not in r.text


# --------------------------------------------------------------------------------------------- limits
def test_a_reporter_over_its_bucket_gets_429_with_retry_after(tmp_path: Path) -> None:
    a = make_api(tmp_path, feedback_identity_rate=0.01, feedback_identity_burst=2)
    try:
        flag = {"raw": HAM.decode(), "label": "ham"}
        assert [a.client.post("/feedback", json=flag, headers=USER).status_code for _ in range(2)] == [202, 202]
        r = a.client.post("/feedback", json=flag, headers=USER)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert a.client.post("/feedback", json=flag, headers=BOB).status_code == 202  # the bucket is per reporter
        assert len(a.state.producer.sent) == 3
    finally:
        a.state.close()


def test_a_relay_may_introduce_only_so_many_new_reporters(tmp_path: Path) -> None:
    a = make_api(tmp_path, feedback_new_reporters=2)
    try:
        flag = {"raw": HAM.decode(), "label": "ham"}
        codes = [a.client.post("/feedback", json=flag, headers={**RELAY, "X-Flywheel-User": f"u{i}"}).status_code
                 for i in range(3)]
        assert codes == [202, 202, 429]
        assert a.client.post("/feedback", json=flag, headers={**RELAY, "X-Flywheel-User": "u0"}).status_code == 202
    finally:
        a.state.close()


def test_a_limiter_that_cannot_count_refuses_with_503(api: Api) -> None:
    class Broken:
        def check(self, *args: Any, **kwargs: Any) -> None:
            raise sqlite3.OperationalError("database is locked")

        def close(self) -> None:
            pass

    api.state.limiter = Broken()  # type: ignore[assignment]
    r = api.client.post("/feedback", json={"raw": HAM.decode(), "label": "ham"}, headers=USER)
    assert r.status_code == 503 and "NOT recorded" in r.text and r.headers["retry-after"] == "5"
    assert api.state.producer.sent == []


# --------------------------------------------------------------------------------------------- models
def test_models_are_listed_to_operators_only(api: Api) -> None:
    reg = api.state.registry
    v1 = fake_version(reg.root, "20260101T000000000001Z-linear-aaaaaa")
    v2 = fake_version(reg.root, "20260101T000000000002Z-linear-bbbbbb")
    reg.promote(v1, "first")
    assert api.client.get("/models").status_code == 401
    refused = api.client.get("/models", headers=USER)  # lineage and gate statistics help a poisoner
    assert refused.status_code == 403 and "operators" in refused.json()["detail"], refused.text
    assert api.client.get("/models", headers=ADMIN).status_code == 200
    r = api.client.get("/models", headers=OPS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["champion"] == v1 and body["serving"] == MODEL_VERSION
    assert [(v["version"], v["champion"], v["served_here"]) for v in body["versions"]] == [(v1, True, False),
                                                                                          (v2, False, False)]
    assert all("calibration" not in v for v in body["versions"])


def test_promote_is_for_admins_and_refuses_what_does_not_load(api: Api) -> None:
    broken = fake_version(api.state.registry.root, "20260101T000000000003Z-linear-cccccc")
    assert api.client.post(f"/models/{broken}/promote", headers=USER).status_code == 403
    r = api.client.post(f"/models/{broken}/promote", headers=ADMIN)
    assert r.status_code == 409 and "refused" in r.text and "features.json" in r.text
    assert api.state.registry.champion() is None and api.state.producer.sent == []
    r = api.client.post("/models/20990101T000000000000Z-linear-000000/promote", headers=ADMIN)
    assert r.status_code == 404 and "unknown model version" in r.text
    assert api.client.post("/models/..%2Fetc/promote", headers=ADMIN).status_code in (404, 422)
    r = api.client.post(f"/models/{broken}/promote", json={"reason": "x" * 1001}, headers=ADMIN)
    assert r.status_code == 422


def test_rollback_moves_the_pointer_announces_it_and_wakes_the_reloader(api: Api) -> None:
    reg = api.state.registry
    v1 = fake_version(reg.root, "20260101T000000000001Z-linear-aaaaaa")
    v2 = fake_version(reg.root, "20260101T000000000002Z-linear-bbbbbb")
    assert api.client.post("/models/rollback", headers=ADMIN).status_code == 409  # nothing to go back to
    reg.promote(v1, "first")
    reg.promote(v2, "second")
    r = api.client.post("/models/rollback", json={"reason": "bad day"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"champion": v1, "previous": v2, "event_id": r.json()["event_id"]}
    (event,) = api.state.producer.events("t.model-events")
    assert event.kind == "rolled_back" and event.version == v1 and str(event.event_id) == r.json()["event_id"]
    assert reg.champion() == v1 and reg.history()[-1]["reason"] == "bad day (by admin)" and api.state.checks == 1
    api.state.producer.down = True  # the registry holds the change; Kafka down only delays the announcement
    reg.promote(v2, "again")
    r = api.client.post("/models/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["event_id"] is None and reg.champion() == v1


# --------------------------------------------------------------------------------------------- roles
ROLE_OF_ROUTE = {
    # route: (who may call it, beyond 401 for no key); "open" needs no key at all
    ("POST", "/classify"): "open", ("POST", "/classify/batch"): "open",
    ("POST", "/feedback"): "any key", ("DELETE", "/feedback/{event_id}"): "any key",
    ("GET", "/models"): "operator", ("GET", "/rules"): "operator", ("GET", "/operator/data"): "operator",
    ("POST", "/models/{version}/promote"): "admin", ("POST", "/models/rollback"): "admin",
    ("POST", "/rules"): "admin", ("POST", "/rules/{name}/disable"): "admin", ("POST", "/rules/{name}/enable"): "admin",
    ("GET", "/healthz"): "open", ("GET", "/readyz"): "open", ("GET", "/metrics"): "open",
    ("GET", "/operator"): "open",
    # a key reaches its own user's lists only, admins anyone's (tests/services/api/test_userlists_routes.py)
    ("GET", "/users/{owner}/lists"): "any key", ("PUT", "/users/{owner}/lists"): "any key",
    ("DELETE", "/users/{owner}/lists"): "any key",
}


def test_every_route_has_the_role_the_operator_page_states(api: Api) -> None:
    """Users classify and flag; operators also read models, rules and the operator page's data; admins also
    change models and rules. Every documented route is in the table (a new one must be placed in it)."""
    routes = {(m.upper(), path) for path, methods in api.app.openapi()["paths"].items() for m in methods}
    assert routes == set(ROLE_OF_ROUTE), routes ^ set(ROLE_OF_ROUTE)
    allowed = {"open": {"none", "user", "operator", "admin"}, "any key": {"user", "operator", "admin"},
               "operator": {"operator", "admin"}, "admin": {"admin"}}
    who = {"none": {}, "user": USER, "operator": OPS, "admin": ADMIN}
    concrete = {"{event_id}": str(uuid.uuid4()), "{version}": "20990101T000000000000Z-linear-000000",
                "{name}": "MAKE_MONEY"}
    from fastapi.testclient import TestClient

    client = TestClient(api.app, raise_server_exceptions=False)  # the fake state cannot serve every page
    for (method, path), role in ROLE_OF_ROUTE.items():
        url = path
        for k, v in concrete.items():
            url = url.replace(k, v)
        for caller, headers in who.items():
            status = client.request(method, url, headers=headers).status_code
            if caller in allowed[role]:
                assert status not in (401, 403), (method, path, caller, status)
            else:
                assert status == (401 if caller == "none" else 403), (method, path, caller, status)


# --------------------------------------------------------------------------------------------- rules
def test_rules_are_listed_to_operators_and_changed_by_admins(api: Api) -> None:
    assert api.client.get("/rules").status_code == 401
    assert api.client.get("/rules", headers=USER).status_code == 403  # patterns and weights help a spammer
    listed = api.client.get("/rules", headers=OPS).json()
    assert listed["active"] == 2 and [r["name"] for r in listed["rules"]] == ["MAKE_MONEY", "SUBJ_ACT_NOW"]
    rule = {"name": "WIN_PRIZE", "kind": "body", "pattern": "/win a prize/i", "weight": 2.5}
    assert api.client.post("/rules", json=rule, headers=USER).status_code == 403
    assert api.client.post("/rules", json=rule, headers=OPS).status_code == 403  # operators read, admins change
    r = api.client.post("/rules", json=rule, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "add" and r.json()["rule"] == "WIN_PRIZE" and r.json()["active"] == 3
    (event,) = api.state.producer.events("t.rule-changes")
    assert event.action == "add" and event.rule["pattern"] == "/win a prize/i" and event.by == "admin"
    r = api.client.post("/rules/SUBJ_ACT_NOW/disable", headers=ADMIN)
    assert r.status_code == 200 and r.json()["active"] == 2
    assert api.client.post("/rules/SUBJ_ACT_NOW/enable", headers=ADMIN).json()["active"] == 3
    assert api.client.post("/rules/NO_SUCH_RULE/disable", headers=ADMIN).status_code == 404
    names = [r["name"] for r in api.client.get("/rules", headers=ADMIN).json()["rules"]]
    assert names == ["MAKE_MONEY", "SUBJ_ACT_NOW", "WIN_PRIZE"]


@pytest.mark.parametrize(("rule", "says"), [
    ({"name": "BAD_RE", "kind": "body", "pattern": "/(unclosed/", "weight": 1.0}, "BAD_RE"),
    ({"name": "1BAD", "kind": "body", "pattern": "/x/", "weight": 1.0}, "string_pattern_mismatch"),
    ({"name": "HEAVY", "kind": "body", "pattern": "/x/", "weight": 1000.0}, "less_than_equal"),
    ({"name": "META_LOOP", "kind": "meta", "pattern": "META_LOOP && MAKE_MONEY", "weight": 1.0}, "META_LOOP"),
    ({"name": "NOKIND", "kind": "eval", "pattern": "/x/", "weight": 1.0}, "literal_error"),
])
def test_a_bad_rule_is_422_and_never_applied(api: Api, rule: dict[str, Any], says: str) -> None:
    r = api.client.post("/rules", json=rule, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert says in r.text
    assert api.state.current().engine.active_count == 2 and api.state.producer.sent == []


# --------------------------------------------------------------------------------------------- health, metrics
def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {"ready": True, "model": MODEL_VERSION, "kafka": True}
    api.state.kafka_up = False
    r = api.client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"ready": False, "model": MODEL_VERSION, "kafka": False}
    api.state.kafka_up, api.state.served = True, None
    r = api.client.get("/readyz")
    assert r.status_code == 503 and r.json()["model"] is None
    assert api.client.get("/healthz").status_code == 200  # alive even when not ready


def test_metrics_count_requests_by_route_template_not_by_path(api: Api) -> None:
    labels = {"endpoint": "/feedback/{event_id}", "method": "DELETE", "status": "404"}
    unmatched = {"endpoint": "unmatched", "method": "GET", "status": "404"}
    before, before_unmatched = sample("flywheel_http_requests_total", labels), sample("flywheel_http_requests_total",
                                                                                       unmatched)
    for _ in range(3):
        api.client.delete(f"/feedback/{uuid.uuid4()}", headers=USER)
    api.client.get(f"/no/such/{uuid.uuid4()}")
    page = api.client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert sample("flywheel_http_requests_total", labels) == before + 3
    assert sample("flywheel_http_requests_total", unmatched) == before_unmatched + 1
    assert 'flywheel_http_requests_total{endpoint="/feedback/{event_id}",method="DELETE",status="404"}' in page.text


# --------------------------------------------------------------------------------------------- OpenAPI
def test_openapi_documents_every_route_body_and_key(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    paths = doc["paths"]
    assert {"/classify", "/classify/batch", "/feedback", "/feedback/{event_id}", "/models", "/models/{version}/promote",
            "/models/rollback", "/rules", "/rules/{name}/enable", "/rules/{name}/disable", "/healthz", "/readyz",
            "/metrics"} <= set(paths)
    components = doc["components"]["schemas"]
    for route, schema in (("/classify", "ClassifyJSON"), ("/classify/batch", "BatchJSON"), ("/feedback", "FeedbackIn"),
                          ("/rules", "RuleIn")):
        body = paths[route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{schema}"} and schema in components
    assert "message/rfc822" in paths["/classify"]["post"]["requestBody"]["content"]
    assert components["ClassifyJSON"]["properties"]["from"]  # the alias, as clients send it
    schemes = doc["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"]["name"] == "X-API-Key" and schemes["HTTPBearer"]["scheme"] == "bearer"
    relay = [p for p in paths["/feedback"]["post"]["parameters"] if p["name"] == "X-Flywheel-User"]
    assert relay and relay[0]["in"] == "header" and relay[0]["schema"]["maxLength"] == 128
    assert set(paths["/feedback"]["post"]["responses"]) >= {"202", "401", "403", "429", "503"}

    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    dangling = {r for r in refs if r.removeprefix("#/components/schemas/") not in components}
    assert refs and not dangling, dangling
