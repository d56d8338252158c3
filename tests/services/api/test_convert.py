"""services/api/convert.py: what counts as a message, JSON fields assembled into one (read back by the project's
own parser), a verdict turned into the /classify answer, and the spamd score that always agrees with the
verdict."""

from __future__ import annotations

import base64
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.classifier import ModelSide, Verdict
from models.message import parse
from models.rules import RuleHit, RuleResult
from services.api.convert import (
    NotAMessage,
    assemble,
    check_message,
    message_id_for,
    spamd_score,
    verdict_dict,
)
from services.api.schemas import ClassifyJSON, ClassifyResponse

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------- check_message
@pytest.mark.parametrize("raw", [
    b"Subject: hi\r\n\r\nbody",
    b"\r\n\r\nFrom: a@b\r\n\r\nleading blank lines are tolerated",
    b"From alice@example.org Mon Jan  1 00:00:00 2024\nSubject: mbox\n\nbody",
    b"X-Weird-But_Legal.Name!: v\r\n\r\n",
    b"Subject: no body at all",
])
def test_messages_are_accepted(raw: bytes) -> None:
    check_message(raw)


@pytest.mark.parametrize(("raw", "why"), [
    (b"", "empty message"),
    (b" \r\n\t\n", "empty message"),
    (b"hello there, no header here", "first line is not a header field"),
    (b"Bad Name: value\r\n\r\n", "first line is not a header field"),
    (b": no name\r\n\r\n", "first line is not a header field"),
    (b"Subj\xc3\xa9ct: accented name\r\n\r\n", "first line is not a header field"),
])
def test_non_messages_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(NotAMessage, match=why):
        check_message(raw)


# --------------------------------------------------------------------------------------------- assemble
def test_raw_is_passed_through_byte_for_byte() -> None:
    raw = "Subject: caf\udce9\r\n\r\nbytes that are not UTF-8: \udcff"
    assert assemble(ClassifyJSON(raw=raw)) == b"Subject: caf\xe9\r\n\r\nbytes that are not UTF-8: \xff"


def test_fields_become_a_message_the_parser_reads_back() -> None:
    req = ClassifyJSON.model_validate({"from": "Zoë <zoe@example.org>", "to": ["a@x.org", "b@x.org"],
                                       "subject": "Prix spécial", "headers": {"X-Mailer": "test 1.0"},
                                       "text": "Bonjour, voilà."})
    raw = assemble(req)
    assert b"Bonjour, voil\xc3\xa0." in raw  # the body stays 8-bit UTF-8
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # RFC 2047 for every non-ASCII header
    msg = parse(raw)
    assert msg.subject == "Prix spécial" and "zoe@example.org" in msg.sender
    assert msg.header("X-Mailer") == "test 1.0" and "a@x.org, b@x.org" in msg.header("To")
    assert "Bonjour, voilà." in msg.body_text
    check_message(raw)


def test_a_long_non_ascii_header_is_encoded_in_linear_time_and_read_back() -> None:
    """The e-mail package's header encoder took 3 s for one "é" and 40,000 letters (7.7 s for 400,000, on the
    event loop); the encoder here cuts the UTF-8 bytes into encoded words in one pass."""
    value = "é" + "a" * 400_000
    t0 = time.perf_counter()
    raw = assemble(ClassifyJSON.model_construct(subject=value, raw=None, from_=None, to=None, headers=None,
                                                text="x", html=None))
    took = time.perf_counter() - t0
    assert took < 0.5, took
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and max(len(line) for line in head.split(b"\r\n")) <= 998
    subject = head.split(b"Subject: ", 1)[1].split(b"\r\nMIME-Version", 1)[0].decode().replace("\r\n ", " ")
    assert "".join(base64.b64decode(w[10:-2]).decode("utf-8") for w in subject.split(" ")) == value
    assert value.startswith(parse(raw).subject[:1000])  # the parser reads what it analyses of it
    for v in ("日本語のテキスト 😀" * 40, "a" * 44 + "é" * 30, "😀"):  # never a character cut between two words
        assert parse(assemble(ClassifyJSON(subject=v))).subject == v


def test_header_values_cannot_inject_headers() -> None:
    raw = assemble(ClassifyJSON(subject="hi\r\nBcc: victim@example.org", headers={"X-A": "1\nX-Injected: yes"}))
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert not any(line.startswith((b"Bcc:", b"X-Injected:")) for line in head), head
    assert b"Subject: hi Bcc: victim@example.org" in head


def test_a_bad_header_name_is_refused_and_structure_headers_are_ours() -> None:
    with pytest.raises(ValueError, match="bad header name"):
        assemble(ClassifyJSON(subject="x", headers={"Bad Name": "v"}))
    with pytest.raises(ValueError, match="bad header name"):
        assemble(ClassifyJSON(subject="x", headers={"X-" + "a" * 300: "v"}))
    raw = assemble(ClassifyJSON(text="plain", headers={"Content-Type": "application/x-evil", "MIME-Version": "9"}))
    assert b"application/x-evil" not in raw and raw.count(b"MIME-Version:") == 1


@pytest.mark.parametrize(("fields", "ctype"), [
    ({"text": "t"}, b"text/plain; charset=utf-8"),
    ({"html": "<b>h</b>"}, b"text/html; charset=utf-8"),
    ({"subject": "only a subject"}, b"text/plain; charset=utf-8"),
])
def test_a_single_body_gets_its_content_type(fields: dict[str, str], ctype: bytes) -> None:
    raw = assemble(ClassifyJSON(**fields))
    assert b"Content-Type: " + ctype in raw


def test_text_and_html_become_multipart_alternative_with_a_stable_boundary() -> None:
    a = assemble(ClassifyJSON(text="plain words", html="<p>html words</p>"))
    assert a == assemble(ClassifyJSON(text="plain words", html="<p>html words</p>"))  # same message, same id
    assert b"multipart/alternative" in a and a.rstrip().endswith(b"--")
    msg = parse(a)
    assert (msg.text_parts, msg.html_parts) == (1, 1)
    assert "plain words" in msg.body_text and "html words" in msg.body_text


# --------------------------------------------------------------------------------------------- verdict_dict
def verdict(*, spam: bool = True, p: float = 0.9, policy: str = "combined", threshold: float = 0.5) -> Verdict:
    rules = RuleResult(score=4.5678, threshold=5.0, is_spam=False,
                       hits=[RuleHit("A", 2.5, "first"), RuleHit("B", 2.0678, "second")])
    model = ModelSide(probability=0.8, is_spam=True, version="v9", provider="CPUExecutionProvider", kind="neural",
                      threshold=0.7)
    return Verdict(is_spam=spam, probability=p, threshold=threshold, decided_by="combined", policy=policy,
                   rules=rules, rules_probability=0.3, model=model, score=logit(p))


def logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def test_verdict_dict_is_the_documented_answer() -> None:
    d = verdict_dict(verdict(), "abc123", "combined")
    ClassifyResponse.model_validate(d)
    assert d["message_id"] == "abc123" and d["verdict"] == "spam" and d["is_spam"] is True
    assert d["rules"] == {"score": 4.568, "threshold": 5.0, "is_spam": False, "verdict": "ham", "probability": 0.3,
                          "hits": [{"name": "A", "weight": 2.5, "description": "first"},
                                   {"name": "B", "weight": 2.0678, "description": "second"}]}
    assert d["model"] == {"probability": 0.8, "is_spam": True, "verdict": "spam", "threshold": 0.7, "version": "v9",
                          "kind": "neural", "provider": "CPUExecutionProvider"}
    assert d["score"] == pytest.approx(math.log(9)) and d["decided_by"] == "combined"
    assert all(type(v) is not float or math.isfinite(v) for v in d.values())


def test_message_id_is_stable_hex() -> None:
    a, b = message_id_for(b"Subject: x\r\n\r\n"), message_id_for(b"Subject: y\r\n\r\n")
    assert a == message_id_for(b"Subject: x\r\n\r\n") and a != b
    assert len(a) == 32 and int(a, 16) >= 0


# --------------------------------------------------------------------------------------------- spamd_score
@settings(max_examples=300, deadline=None)
@given(p=st.floats(0.0, 1.0), t=st.floats(0.0, 1.0), spam=st.booleans())
def test_spamd_score_always_agrees_with_the_verdict(p: float, t: float, spam: bool) -> None:
    """``score >= threshold`` is the spam verdict whatever the probability and threshold (even policy "either",
    where the deciding side's threshold is not the blend's)."""
    score, threshold = spamd_score(verdict(spam=spam, p=p, threshold=t, policy="either"))
    assert threshold == 5.0
    assert (score >= threshold) is spam, (p, t, spam, score)
    assert score == round(score, 1)


def test_spamd_score_maps_the_threshold_onto_the_rules_scale() -> None:
    assert spamd_score(verdict(spam=True, p=0.5, threshold=0.5)) == (5.0, 5.0)
    assert spamd_score(verdict(spam=False, p=0.0, threshold=0.5)) == (0.0, 5.0)
    assert spamd_score(verdict(spam=True, p=1.0, threshold=0.5)) == (10.0, 5.0)
    assert spamd_score(verdict(spam=False, p=0.25, threshold=0.5)) == (2.5, 5.0)
