"""models.message: real corpus messages (the ugliest included), evasion normalisation, the
size cap, and a property test that nothing ever raises."""

from __future__ import annotations

import base64
import email.utils
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.message import DEFAULT_MAX_BYTES, ParsedMessage, normalize_text, parse
from models.message import html as html_mod
from models.message import parsing as parsing_mod

REPO = Path(__file__).resolve().parents[2]
_DATA_DIRS = [REPO / "var" / "downloads" / "corpus" / "package" / "data", Path("/tmp/package/data")]


def _corpus_file(rel: str) -> bytes:
    for base in _DATA_DIRS:
        p = base / rel
        if p.is_file():
            return p.read_bytes()
    pytest.skip(f"corpus file {rel} not fetched (run `flywheel corpus` / ensure_corpus first)")


def _corpus_sample(n: int) -> list[bytes]:
    for base in _DATA_DIRS:
        if base.is_dir():
            files = sorted(base.glob("*/*.txt"))
            rnd = random.Random(7)
            return [f.read_bytes() for f in rnd.sample(files, min(n, len(files)))]
    return []


def _mime(body: str, ctype: str = "text/plain; charset=utf-8", extra: str = "", cte: str = "8bit") -> bytes:
    return (
        "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
        "Date: Mon, 1 Jul 2024 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n{extra}\r\n{body}"
    ).encode()


# ---------------------------------------------------------------------------------------- basics


@pytest.mark.unit
def test_plain_message_fields() -> None:
    pm = parse(
        b"From: \"Alice A.\" <Alice@Example.ORG>\nTo: bob@example.net\nSubject: Lunch?\n"
        b"Received: from a by b\nReceived: from c by d\nX-Mailer: Mutt\n\n"
        b"See http://www.example.com/menu?x=1, or www.lunch.test/today.\n"
    )
    assert pm.subject == "Lunch?"
    assert pm.sender == "alice@example.org"
    assert pm.header("received") == "from a by b\nfrom c by d"
    assert pm.header("X-MAILER") == "Mutt"
    assert pm.header("absent") == ""
    assert [k for k, _ in pm.headers] == ["from", "to", "subject", "received", "received", "x-mailer"]
    assert pm.urls == ["http://www.example.com/menu?x=1", "www.lunch.test/today"]
    assert pm.domains == ["www.example.com", "www.lunch.test"]
    assert pm.defects == []
    assert not pm.truncated and pm.size > 0


@pytest.mark.unit
def test_rfc2047_subject_and_qp_body_and_base64_html() -> None:
    html = "<html><body><p>Caf\u00e9 <b>special</b></p><a href='http://deals.test/x'>go</a></body></html>"
    raw = (
        b"From: =?iso-8859-1?q?Ren=E9?= <rene@x.test>\nSubject: =?utf-8?b?"
        + base64.b64encode("Grüße aus Köln".encode())
        + b"?= now\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=BB\n\n--BB\n"
        b"Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n"
        b"Caf=E9 special=\n ok\n--BB\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(html.encode())
        + b"--BB--\n"
    )
    pm = parse(raw)
    assert pm.subject == "Grüße aus Köln now"
    assert "Café special ok" in pm.body_text
    assert "Café special" in pm.body_text.split("\n", 2)[-1] or pm.body_text.count("Café") == 2
    assert "<b>" in pm.raw_body and "<b>" not in pm.body_text
    assert pm.urls == ["http://deals.test/x"]
    assert pm.html_parts == 1 and pm.text_parts == 1
    assert "base64_text" in pm.defects


@pytest.mark.unit
def test_attachments_listed_not_read_as_text() -> None:
    raw = (
        b"From: a@b.test\nSubject: files\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=X\n\n"
        b"--X\nContent-Type: text/plain\n\nsee attached\n"
        b"--X\nContent-Type: application/octet-stream; name=\"invoice.pdf.exe\"\n"
        b"Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\nContent-Transfer-Encoding: base64\n\n"
        b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n--X--\n"
    )
    pm = parse(raw)
    assert pm.attachments == [("invoice.pdf.exe", "application/octet-stream")]
    assert pm.body_text == "see attached"
    assert "TVqQ" not in pm.raw_body


# ---------------------------------------------------------------------------------------- evasions


@pytest.mark.unit
def test_zero_width_and_bidi_inside_words_are_removed_and_flagged() -> None:
    defects: list[str] = []
    assert normalize_text("V\u200bI\u200cA\u200dG\u2060R\ufeffA \u202ecash", defects) == "VIAGRA cash"
    assert defects == ["invisible_chars"]


@pytest.mark.unit
def test_stray_soft_hyphen_is_not_an_evasion() -> None:
    defects: list[str] = []
    assert normalize_text("the RCA \u00ad a group", defects) == "the RCA  a group"
    assert defects == []


@pytest.mark.unit
def test_nfkc_folds_fullwidth_and_ligatures() -> None:
    assert normalize_text("\uff26\uff32\uff25\uff25 \ufb01nance \u2460") == "FREE finance 1"


@pytest.mark.unit
def test_mixed_script_confusables_mapped_but_real_cyrillic_kept() -> None:
    defects: list[str] = []
    # "PayPal" with Cyrillic Р and а, "Viagra" with Greek ι and Cyrillic а
    out = normalize_text("Your \u0420\u0430yPal account: V\u03b9\u0430gra", defects)
    assert out == "Your PayPal account: Viagra"
    assert defects == ["confusables"]
    defects.clear()
    assert normalize_text("\u043f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", defects) == "привет мир"
    assert defects == []
    # Each word is judged alone: a Cyrillic word glued to a Latin one by a dash is not a mix.
    assert normalize_text("abc\u2014\u0440\u0443 p\u0430y\u2014p\u0430y", defects) == "abc\u2014\u0440\u0443 pay\u2014pay"
    assert defects == ["confusables"]


@pytest.mark.unit
def test_hidden_html_text_comments_and_scripts_dropped() -> None:
    html = (
        "<html><head><style>p{color:red}</style><script>var x='script text';</script></head>"
        "<body bgcolor='#ffffff'><p>Buy <!-- filler -->now</p>"
        "<div style='display:none'>ham words ham words</div>"
        "<span style='font-size:0px'>tiny hidden</span>"
        "<font color='#FFFFFF'>white on white</font>"
        "<p style='visibility: hidden'>invisible</p><p>V<!-- x -->iagra</p></body></html>"
    )
    pm = parse(_mime(html, "text/html; charset=utf-8"))
    assert "Buy now" in pm.body_text
    assert "Viagra" in pm.body_text
    for gone in ("ham words", "tiny hidden", "white on white", "invisible", "script text", "color:red", "filler"):
        assert gone not in pm.body_text
    assert "hidden_text" in pm.defects
    assert "ham words" in pm.raw_body  # raw_body keeps the markup for rawbody rules


@pytest.mark.unit
def test_html_blocks_become_line_breaks() -> None:
    pm = parse(_mime("<p>Hello</p><p>World</p><div>again<br>and</div>", "text/html"))
    assert pm.body_text.split("\n") == ["Hello", "World", "again", "and"]


# ---------------------------------------------------------------------------------------- malformed input


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        (b"", "missing_headers"),
        (b"just some text with no headers at all\nsecond line\n", "missing_headers"),
        (_mime("\u00e9t\u00e9".encode("latin-1").decode("latin-1"), "text/plain; charset=x-klingon"), "bad_charset"),
        (_mime("!!!@@@ not base64 at all ###", cte="base64"), "bad_base64"),
        (
            b"Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=Q\n\n--Q\nContent-Type: text/plain\n\nbody\n",
            "mime_defect:CloseBoundaryNotFound",
        ),
        (_mime(""), "no_text"),
    ],
)
def test_malformed_input_gives_defects(raw: bytes, flag: str) -> None:
    pm = parse(raw)
    assert isinstance(pm, ParsedMessage)
    assert flag in pm.defects


@pytest.mark.unit
def test_charset_that_lies_falls_back() -> None:
    # bytes that are not valid in the declared Shift-JIS, nor UTF-8: decoded, flagged
    body = "caf\u00e9 cr\u00e8me".encode("cp1252")
    raw = b"Subject: x\nContent-Type: text/plain; charset=utf-8\n\n" + body
    pm = parse(raw)
    assert pm.body_text == "café crème"
    assert "bad_charset" in pm.defects
    # mislabelled UTF-8 (declared windows-1251) is read as UTF-8, no mojibake
    raw2 = b"Subject: x\nContent-Type: text/plain; charset=windows-1251\n\nbison\xe2\x80\x94one"
    assert parse(raw2).body_text == "bison\u2014one"


@pytest.mark.unit
def test_non_bytes_input_does_not_raise() -> None:
    assert isinstance(parse("Subject: str input\n\nhi"), ParsedMessage)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- the cap


@pytest.mark.unit
def test_50mb_message_analyses_only_the_cap() -> None:
    head = b"From: a@b.test\nSubject: huge\nContent-Type: text/html\n\n<html><body>"
    filler = b"<p>spam spam spam http://x.test/" + b"a" * 40 + b"</p>\n"
    raw = head + filler * (50 * 1024 * 1024 // len(filler))
    assert len(raw) > 50 * 1024 * 1024 - 1024
    pm = parse(raw)
    assert pm.truncated and "truncated" in pm.defects
    assert pm.size == len(raw)
    assert len(pm.raw) == DEFAULT_MAX_BYTES
    assert len(pm.raw_body) <= DEFAULT_MAX_BYTES
    assert pm.subject == "huge"
    small = parse(raw, max_bytes=4096)
    assert len(small.raw) == 4096 and len(small.raw_body) < 4096


# ---------------------------------------------------------------------------------------- real corpus


@pytest.mark.unit
def test_corpus_wrong_charset_mislabelled_utf8() -> None:
    pm = parse(_corpus_file("easy-ham-1/00733.8cd99b24ae020e6028d85ad0c4f06186.txt"))
    assert "confusables" not in pm.defects  # was mojibake before the UTF-8-first rule
    assert "\u2013" in pm.body_text or "\u2014" in pm.body_text


@pytest.mark.unit
def test_corpus_iso2022jp_subject_and_truncated_huge_message() -> None:
    pm = parse(_corpus_file("hard-ham-1/00039.b2b936a8501444b213f61f9ff193b480.txt"))
    assert pm.subject.startswith("日本語の件名")
    assert "いつもお世話になっております" in pm.body_text
    assert pm.truncated and "mime_defect:CloseBoundaryNotFound" in pm.defects


@pytest.mark.unit
def test_corpus_broken_multipart() -> None:
    pm = parse(_corpus_file("spam-1/00467.5b733c506b7165424a0d4a298e67970f.txt"))
    assert "mime_defect:StartBoundaryNotFound" in pm.defects
    assert pm.subject.startswith("Printer Cartridges")


@pytest.mark.unit
def test_corpus_bad_base64_korean_spam() -> None:
    pm = parse(_corpus_file("spam-2/00588.44b644374b89ba4885f91f0ed836e622.txt"))
    assert "bad_base64" in pm.defects and "base64_text" in pm.defects
    assert "이멜리스트" in pm.subject and "이멜리스트" in pm.body_text


@pytest.mark.unit
def test_corpus_biggest_html() -> None:
    pm = parse(_corpus_file("hard-ham-1/00198.9b71c90c298d453025eae7bbcc46018b.txt"))
    assert pm.html_parts >= 1
    assert len(pm.raw_body) > 80_000
    assert re.search(r"<(?:p|td|tr|table|font|a|div|span|img)\b", pm.body_text, re.I) is None
    assert len(pm.body_text) > 1000


# ---------------------------------------------------------------------------------------- never raises


@pytest.mark.unit
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(raw: bytes) -> None:
    pm = parse(raw)
    assert isinstance(pm, ParsedMessage)
    assert pm.size == len(raw)


_SAMPLE = _corpus_sample(40)


@pytest.mark.unit
@pytest.mark.skipif(not _SAMPLE, reason="corpus not fetched")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    idx=st.integers(min_value=0, max_value=max(0, len(_SAMPLE) - 1)),
    ops=st.lists(
        st.tuples(st.sampled_from(["flip", "cut", "dup", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
        min_size=1,
        max_size=8,
    ),
    cap=st.sampled_from([64, 1000, DEFAULT_MAX_BYTES]),
)
def test_mutated_real_messages_never_raise(idx: int, ops: list[tuple[str, float, bytes]], cap: int) -> None:
    raw = bytearray(_SAMPLE[idx])
    for op, where, blob in ops:
        pos = int(where * len(raw)) if raw else 0
        if op == "flip" and raw:
            raw[min(pos, len(raw) - 1)] ^= blob[0] or 0xFF
        elif op == "cut":
            del raw[pos : pos + len(blob) * 16]
        elif op == "dup":
            raw[pos:pos] = raw[pos : pos + 200]
        else:
            raw[pos:pos] = blob
    pm = parse(bytes(raw), max_bytes=cap)
    assert isinstance(pm, ParsedMessage)
    assert len(pm.raw) <= cap


# ---------------------------------------------------------------------------------------- fast path


def _stdlib_parse(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ParsedMessage:
    """The reference: every message through the stdlib feedparser."""
    return parsing_mod._parse(raw, max_bytes, fast=False)


def _takes_fast_path(raw: bytes) -> bool:
    data = raw[raw.find(b"\n") + 1 :] if raw.startswith(b"From ") else raw
    return parsing_mod._fast_tree(data.lstrip(b"\r\n")) is not None


_FAST_SAMPLE = _corpus_sample(400)


@pytest.mark.unit
@pytest.mark.skipif(not _FAST_SAMPLE, reason="corpus not fetched")
def test_fast_path_equals_stdlib_path_on_real_messages() -> None:
    fast_taken = 0
    for raw in _FAST_SAMPLE:
        fast_taken += _takes_fast_path(raw)
        for cap in (DEFAULT_MAX_BYTES, 2048):
            got, want = parse(raw, cap), _stdlib_parse(raw, cap)
            # the fields rules and features read, named so a failure says which one
            assert got.subject == want.subject
            assert got.sender == want.sender
            assert got.body_text == want.body_text
            assert got.urls == want.urls and got.domains == want.domains
            assert got.attachments == want.attachments
            assert got.defects == want.defects
            assert got == want  # and everything else (headers, raw_body, part counts ...)
    assert fast_taken >= 0.9 * len(_FAST_SAMPLE)  # the fast path is the common path


_MULTIPART = (
    b"From: a@b.test\nSubject: parts\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"o\"\n\n"
    b"preamble\n--o\nContent-Type: multipart/alternative; boundary=i\n\n--i\nContent-Type: text/plain\n\n"
    b"plain http://a.test/x\n\n--i\nContent-Type: text/html\n\n<p>html <b>www.b.test</b></p>\n--i--\nepi\n"
    b"--o\nContent-Type: text/plain; name=\"n.txt\"\nContent-Disposition: attachment\n\nfile\n--o--  \nend\n"
)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        (_MULTIPART, True),
        (_MULTIPART.replace(b"\n", b"\r\n"), True),
        (_MULTIPART.replace(b"--o\nContent-Type: text/plain;", b"--o\n--o\nContent-Type: text/plain;"), False),
        (_MULTIPART.replace(b"\n", b"\r"), False),  # lone CR line ends
        (_MULTIPART.replace(b"--o--  \n", b""), False),  # no close boundary
        (_MULTIPART.replace(b"--i\nContent-Type: text/plain", b"--i\n Content-Type: text/plain"), False),
        (_MULTIPART.replace(b"Subject: parts\n", b"Subject: parts\nFrom oops\n"), False),
        (_MULTIPART.replace(b"multipart/alternative", b"message/rfc822"), False),
        (_MULTIPART.replace(b"Subject: parts\n", b"Subject: parts\nContent-Transfer-Encoding: base64\n"), False),
        (b"Subject: =?utf-8?q?caf=C3=A9?=\nX-8bit: \xe9t\xe9\n\nbody \xff\n", True),
        (b"Subject: only headers", True),
    ],
)
def test_fast_path_routing_and_agreement(raw: bytes, fast: bool) -> None:
    assert _takes_fast_path(raw) is fast
    assert parse(raw) == _stdlib_parse(raw)


@pytest.mark.unit
def test_fast_path_multipart_fields() -> None:
    pm = parse(_MULTIPART)
    assert pm.content_types == ["multipart/mixed", "multipart/alternative", "text/plain", "text/html", "text/plain"]
    assert pm.attachments == [("n.txt", "text/plain")]
    assert pm.urls == ["http://a.test/x", "www.b.test"]
    assert pm.body_text == "plain http://a.test/x\n\nhtml www.b.test\nfile"  # the part keeps its blank line
    assert pm.defects == []


@pytest.mark.unit
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from([b"--o\n", b"--o--\n", b"--i\n", b"--i--\n", b"\n", b"X: y\n", b" z\n", b"text\n", b"\r\n"]),
        max_size=14,
    )
)
def test_fast_path_agrees_on_shuffled_structure(lines: list[bytes]) -> None:
    raw = _MULTIPART.split(b"\n\n", 1)[0] + b"\n\n" + b"".join(lines)
    assert parse(raw) == _stdlib_parse(raw)


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    [
        "alice@example.org",
        "Alice A. <Alice@Example.ORG>",
        '"Doe, John" <j@x.test>',
        "Doe, John <j@x.test>",
        "<a@b.test>",
        "a . b@c.test",
        "a@b.test (Alice)",
        "x <a..b@c.test>",
        "Ren\u00e9 <r@x.test>",
        "group: a@b.test;",
        "not an address",
        "",
    ],
)
def test_sender_address_matches_parseaddr(value: str) -> None:
    want = email.utils.parseaddr(value)[1].lower() or value.lower()
    assert parsing_mod._sender_address(value) == want


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=" \t\r\n\f\v\xa0\u3000\u2028ab", max_size=60))
def test_whitespace_collapsing_matches_the_plain_regexes(text: str) -> None:
    assert html_mod._WS_RUN_RE.sub(" ", text) == re.sub(r"[ \t\r\f\v\xa0]+", " ", text)
    assert html_mod._collapse_lines(text) == re.sub(r"\s*\n\s*", "\n", text).strip()


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='ab.@<> "(),;:\\[]\t\u00e9', max_size=24))
def test_sender_address_matches_parseaddr_on_random_forms(value: str) -> None:
    assert parsing_mod._sender_address(value) == (email.utils.parseaddr(value)[1].lower() or value.lower())
