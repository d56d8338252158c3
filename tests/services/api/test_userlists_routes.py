"""``/users/{user}/lists`` and the lists at work, in-process: a key edits its own user's lists only (a relay the
user it names, admins anyone's); /classify with ``X-Flywheel-User`` answers with the list that decided; flags
teach a user's lists and never another user's verdict."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_fakes import ADMIN, BOB, HAM, RELAY, SPAM, USER, Api, make_api

pytestmark = pytest.mark.unit


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    a = make_api(tmp_path)
    yield a
    a.state.close()


def classify(api: Api, raw: bytes, user: str | None = None) -> dict:
    headers = {"Content-Type": "message/rfc822"} | ({"X-Flywheel-User": user} if user else {})
    r = api.client.post("/classify", content=raw, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_key_reads_and_edits_its_own_lists_only(api: Api) -> None:
    assert api.client.get("/users/alice/lists").status_code == 401
    r = api.client.get("/users/alice/lists", headers=USER)
    assert r.status_code == 200 and r.json() == {"user": "alice", "allow": [], "block": [], "learning": 0}
    r = api.client.put("/users/alice/lists", headers=USER, json={"allow": ["Win@Prizes.example"], "block": []})
    assert r.status_code == 200, r.text
    assert r.json()["allow"] == ["win@prizes.example"]
    assert api.client.get("/users/alice/lists", headers=BOB).status_code == 403
    assert api.client.put("/users/alice/lists", headers=BOB, json={"block": ["@x.example"]}).status_code == 403
    assert api.client.delete("/users/alice/lists", headers=BOB).status_code == 403
    assert api.client.get("/users/alice/lists", headers=ADMIN).json()["allow"] == ["win@prizes.example"]
    assert api.client.delete("/users/alice/lists", headers=ADMIN).status_code == 204
    assert api.client.get("/users/alice/lists", headers=USER).json()["allow"] == []


def test_a_relay_edits_the_lists_of_the_user_it_names(api: Api) -> None:
    as_bob = RELAY | {"X-Flywheel-User": "bob"}
    assert api.client.put("/users/bob/lists", headers=as_bob, json={"block": ["@prizes.example"]}).status_code == 200
    assert api.client.get("/users/carol/lists", headers=as_bob).status_code == 403
    assert api.client.get("/users/bob/lists", headers=BOB).json()["block"] == ["@prizes.example"]


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"allow": ["not an address"]}, 422, "not an address"),
    ({"allow": ["a@example.org"], "block": ["A@example.org"]}, 422, "on both lists"),
    ({"allow": "a@example.org"}, 422, "list_type"),
    ({"allow": [f"u{i}@e.org" for i in range(500)]}, 413, "exceeds the limit"),  # this API's body limit: 4 KB
])
def test_bad_lists_are_refused_with_the_reason(api: Api, body: dict, status: int, says: str) -> None:
    r = api.client.put("/users/alice/lists", headers=USER, json=body)
    assert r.status_code == status and says in r.text, r.text
    assert api.client.get("/users/alice/lists", headers=USER).json()["allow"] == []  # nothing was saved


def test_bad_json_and_a_bad_user_name(api: Api) -> None:
    r = api.client.put("/users/alice/lists", headers=USER | {"Content-Type": "application/json"}, content=b"{")
    assert r.status_code == 400 and "bad JSON" in r.text
    assert api.client.get("/users/al%20ice/lists", headers=ADMIN).status_code == 422
    r = api.client.post("/classify", content=HAM, headers={"X-Flywheel-User": "al ice"})
    assert r.status_code == 422 and "X-Flywheel-User" in r.text


def test_the_named_users_list_decides_and_says_so(api: Api) -> None:
    api.client.put("/users/alice/lists", headers=USER, json={"allow": ["@prizes.example"]})
    api.client.put("/users/bob/lists", headers=BOB, json={"block": ["alice@example.org"]})
    plain = classify(api, SPAM)
    assert plain["verdict"] == "spam" and plain["list"] is None
    mine = classify(api, SPAM, "alice")
    assert mine["verdict"] == "ham" and mine["list"] == "allow" and mine["decided_by"] == "list"
    assert mine["model"]["verdict"] == "spam"  # what the model thought stays in the answer
    assert classify(api, SPAM, "bob")["verdict"] == "spam"  # alice's list is hers alone
    blocked = classify(api, HAM, "bob")
    assert blocked["verdict"] == "spam" and blocked["list"] == "block"
    assert classify(api, HAM, "alice")["list"] is None


def test_flags_teach_the_reporters_lists_and_nobody_elses(api: Api) -> None:
    for _ in range(2):  # user_list_learn_after: two consistent flags
        r = api.client.post("/feedback", headers=USER, json={"raw": SPAM.decode(), "label": "ham"})
        assert r.status_code == 202, r.text
    assert api.client.get("/users/alice/lists", headers=USER).json()["allow"] == ["win@prizes.example"]
    assert classify(api, SPAM, "alice")["list"] == "allow"
    assert classify(api, SPAM, "bob")["verdict"] == "spam"
    r = api.client.post("/feedback", headers=RELAY | {"X-Flywheel-User": "bob"},
                        json={"raw": HAM.decode(), "label": "spam"})
    assert r.status_code == 202
    after = api.client.get("/users/bob/lists", headers=BOB).json()
    assert after["block"] == [] and after["learning"] == 1  # one flag is counted, not yet listed
