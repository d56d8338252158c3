"""Per-user lists: entries, the most specific entry deciding, learning after consistent flags, the From address
read as the parser reads it, and several stores (replicas) on one directory seeing and keeping each other's
updates."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.userlists import MAX_ENTRIES, ListError, UserLists, UserListStore, list_user, normalize_entry, sender_of

pytestmark = pytest.mark.unit


def mail(from_value: str) -> bytes:
    return f"From: {from_value}\r\nTo: u@example.net\r\nSubject: hi\r\n\r\nFrom: not@this.one\r\n".encode()


def test_entries_are_addresses_or_domains() -> None:
    assert normalize_entry(" News@Lists.Example.ORG ") == "news@lists.example.org"
    assert normalize_entry("@Example.org") == "@example.org"
    for bad in ("", "no-at-sign", "a@", "@", "a b@example.org", "x" * 300 + "@example.org", "<a@b.c>"):
        with pytest.raises(ListError):
            normalize_entry(bad)


def test_the_most_specific_entry_decides() -> None:
    lists = UserLists(allow=["@example.org", "boss@corp.example"], block=["@promo.example.org", "@corp.example"])
    assert lists.decide("news@example.org") == "allow"
    assert lists.decide("deals@promo.example.org") == "block"  # the subdomain's entry is more specific
    assert lists.decide("x@mail.promo.example.org") == "block"
    assert lists.decide("boss@corp.example") == "allow"  # the address beats its domain
    assert lists.decide("intern@corp.example") == "block"
    assert lists.decide("someone@else.example") is None
    assert lists.decide("") is None


def test_the_sender_is_the_first_from_header_of_the_header_block() -> None:
    assert sender_of(mail('"News, Weekly" <News@Lists.Example.org>')) == "news@lists.example.org"
    assert sender_of(mail("=?utf-8?q?Caf=C3=A9?= <cafe@example.org>")) == "cafe@example.org"
    assert sender_of(b"FROM:\r\n  folded@example.org\r\nSubject: x\r\n\r\nbody") == "folded@example.org"
    assert sender_of(b"Subject: none\r\n\r\nFrom: body@example.org\r\n") == ""
    assert sender_of(b"From: no address here\r\n\r\n") == ""


def test_reporters_speak_for_the_user_after_their_prefix() -> None:
    assert list_user("mx1:bob") == "bob" and list_user("spamd:bob") == "bob" and list_user("alice") == "alice"


def test_a_sender_is_listed_after_consistent_flags_and_a_contrary_flag_starts_again(tmp_path: Path) -> None:
    store = UserListStore(tmp_path, learn_after=2)
    assert store.learn("alice", "news@example.org", "ham") is None
    assert store.decide("alice", mail("news@example.org")) is None  # one flag is not enough
    assert store.learn("alice", "news@example.org", "spam") is None  # contrary: the count starts again
    assert store.learn("alice", "news@example.org", "ham") is None
    assert store.learn("alice", "news@example.org", "ham") == "allow"
    assert store.decide("alice", mail("News <news@example.org>")) == "allow"
    assert store.learn("alice", "news@example.org", "spam") is None
    assert store.learn("alice", "news@example.org", "spam") == "block"  # moved, not on both
    assert store.get("alice").allow == [] and store.get("alice").block == ["news@example.org"]
    assert store.decide("bob", mail("news@example.org")) is None  # another user's lists are untouched


def test_learning_can_be_immediate_or_off(tmp_path: Path) -> None:
    assert UserListStore(tmp_path / "a", learn_after=1).learn("alice", "x@example.org", "spam") == "block"
    off = UserListStore(tmp_path / "b", learn_after=0)
    assert off.learn("alice", "x@example.org", "spam") is None and off.get("alice").block == []


def test_put_validates_and_keeps_the_learning_record(tmp_path: Path) -> None:
    store = UserListStore(tmp_path)
    store.learn("alice", "half@example.org", "spam")
    lists = store.put("alice", ["A@Example.org", "a@example.org"], ["@spam.example"])
    assert lists.allow == ["a@example.org"] and lists.block == ["@spam.example"]
    assert "half@example.org" in store.get("alice").learning
    with pytest.raises(ListError, match="both lists"):
        store.put("alice", ["a@example.org"], ["A@example.org"])
    with pytest.raises(ListError, match="exceed"):
        store.put("alice", [f"u{i}@example.org" for i in range(MAX_ENTRIES + 1)], [])
    with pytest.raises(ListError, match="user"):
        store.put("../etc", [], [])
    assert store.delete("alice") and not store.delete("alice")
    assert store.get("alice") == UserLists()


def test_replicas_on_one_directory_see_and_keep_each_others_updates(tmp_path: Path) -> None:
    a, b = UserListStore(tmp_path, learn_after=1), UserListStore(tmp_path, learn_after=1)
    assert a.decide("alice", mail("x@example.org")) is None  # cached as empty by a
    b.put("alice", ["x@example.org"], [])
    assert a.decide("alice", mail("x@example.org")) == "allow"  # a re-reads the changed file

    def flag(store: UserListStore, i: int) -> None:
        store.learn("carol", f"s{i}@example.org", "spam")

    threads = [threading.Thread(target=flag, args=(a if i % 2 else b, i)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.get("carol").block) == sorted(f"s{i}@example.org" for i in range(40))  # no update lost


def test_a_damaged_file_lists_nothing(tmp_path: Path) -> None:
    store = UserListStore(tmp_path)
    store.put("alice", [], ["@x.example"])
    for p in tmp_path.glob("*.json"):
        p.write_text("{not json")
    assert store.decide("alice", mail("a@x.example")) is None
    assert store.learn("alice", "b@x.example", "spam") is None  # a first flag; the file is whole again
    assert store.get("alice").learning == {"b@x.example": ["spam", 1]}
