"""Crafted hostile messages and their in-process cost: the evidence that every message costs bounded work.

Spam is written by adversaries, so the analysis must stay linear in the size of whatever arrives. Each case
below builds a message of a requested size that attacks one part of the pipeline: look-alike letters in long
word runs, pathological headers, deep and wide MIME, huge part and URL counts, encoded-word floods, HTML
nesting, invisible text, long lines, base64 and quoted-printable abuse. :func:`run_inprocess` classifies them
one at a time through a :class:`models.classifier.Classifier` (parse, rules, features, the ONNX model) and
reports CPU milliseconds on one core, per message and per KB; :func:`corpus_baseline` measures real mail the
same way, so the two can be compared as ratios (wall-clock thresholds mean nothing on a shared machine).

The cases are deterministic (no randomness), so a figure can be reproduced and a regression bisected.
"""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["AUTHSERV_ID", "CASES", "CLASSES", "HostileCase", "build", "corpus_baseline", "measure", "run_inprocess"]


@dataclass(frozen=True, slots=True)
class HostileCase:
    """One crafted message: ``build(size)`` returns a message of about ``size`` bytes (never more)."""

    name: str
    cls: str  # the class of attack (a key of CLASSES)
    build: Callable[[int], bytes]
    what: str


#: The classes of attack the suite covers (the issue's list), with what each one aims at.
CLASSES: dict[str, str] = {
    "lookalike": "long word runs with look-alike (mixed-script) letters",
    "headers": "pathological headers: floods, long and folded values, crafted addresses",
    "mime": "deep and wide MIME, huge part counts, nested messages",
    "urls": "huge URL counts and URL-like floods",
    "encoded_words": "RFC 2047 encoded-word floods, terminated or not",
    "html": "HTML nesting, hidden-style floods, unclosed markup",
    "invisible": "invisible and bidi characters inside words",
    "long_lines": "long lines without breaks, ASCII and not",
    "transfer": "base64 and quoted-printable abuse, charset floods",
}

_HEAD = (
    b"From: Sender <sender@example.test>\n"
    b"To: rcpt@example.test\n"
    b"Subject: your account\n"
    b"Date: Mon, 1 Jul 2024 10:00:00 +0000\n"
    b"Message-ID: <hostile@example.test>\n"
    b"MIME-Version: 1.0\n"
)


def _fill(unit: bytes, n: int) -> bytes:
    """``unit`` repeated to exactly ``n`` bytes (cut mid-unit at the end; never negative)."""
    if n <= 0 or not unit:
        return b""
    return (unit * (n // len(unit) + 1))[:n]


def _fill_text(unit: bytes, n: int) -> bytes:
    """Like :func:`_fill` for UTF-8 text: at most ``n`` bytes, never a character cut in half at the end."""
    return _fill(unit, n).decode("utf-8", "ignore").encode("utf-8")


def _simple(size: int, body: Callable[[int], bytes], ctype: bytes = b"text/plain; charset=utf-8",
            cte: bytes = b"8bit", head: bytes = _HEAD) -> bytes:
    top = head + b"Content-Type: " + ctype + b"\nContent-Transfer-Encoding: " + cte + b"\n\n"
    return top + body(max(0, size - len(top) - 1)) + b"\n"


def _with_header(size: int, name: bytes, value: Callable[[int], bytes], head: bytes = _HEAD) -> bytes:
    """A short body and one header whose value fills the message."""
    body = b"Content-Type: text/plain\n\nhello\n"
    room = max(0, size - len(head) - len(body) - len(name) - 3)
    return head + name + b": " + value(room) + b"\n" + body


def _utf8(s: str) -> bytes:
    return s.encode("utf-8")


# ------------------------------------------------------------------------------------------- look-alikes
def _lookalike_run(size: int) -> bytes:
    # one long run of ASCII letters, then a space and one Cyrillic letter
    return _simple(size, lambda n: _fill(b"a", n - 3) + _utf8(" \u0430"))


def _lookalike_glued(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"a", n - 2) + _utf8("\u0430"))


def _lookalike_runs(size: int) -> bytes:
    # many long ASCII words around one look-alike letter: each word a separate run
    unit = _fill(b"b", 4000) + b" "
    return _simple(size, lambda n: _utf8("\u0430 ") + _fill(unit, n - 3))


def _lookalike_words(size: int) -> bytes:
    unit = _utf8("p\u0430yp\u0430l \u0410cc\u043eunt v\u0435rify \u0441lick n\u043ew ")
    return _simple(size, lambda n: _fill_text(unit, n - 8))


def _lookalike_dash_chain(size: int) -> bytes:
    # words glued by non-ASCII punctuation: one long chain of runs and separators
    unit = _utf8("p\u0430y\u2014")
    return _simple(size, lambda n: _fill_text(unit, n - 8))


def _lookalike_from(size: int) -> bytes:
    return _with_header(size, b"From", lambda n: _fill(b"a", n - 3) + _utf8(" \u0430"),
                        head=_HEAD.replace(b"From: Sender <sender@example.test>\n", b""))


def _lookalike_subject(size: int) -> bytes:
    return _with_header(size, b"Subject", lambda n: _fill(b"a", n - 3) + _utf8(" \u0430"),
                        head=_HEAD.replace(b"Subject: your account\n", b""))


# ------------------------------------------------------------------------------------------- headers
#: The authserv-id the authentication-results cases claim: run them with it trusted
#: (``models.message.configure_trusted_authserv_ids``), or the parser never reads those headers.
AUTHSERV_ID = "mx.hostile.test"


def _auth_results_flood(size: int) -> bytes:
    # thousands of trusted-looking Authentication-Results headers, each with comments and quoted strings
    unit = (b"Authentication-Results: " + AUTHSERV_ID.encode()
            + b'; spf=fail (a (b; c) "d;e") smtp.mailfrom=x; dkim=pass\n')
    body = b"\nhello\n"
    return _HEAD + _fill(unit, size - len(_HEAD) - len(body)).rsplit(b"\n", 1)[0] + b"\n" + body


def _auth_results_comments(size: int) -> bytes:
    # one trusted-looking header the size of the message: comments opened and never closed, quotes, semicolons
    return _with_header(size, b"Authentication-Results",
                        lambda n: AUTHSERV_ID.encode() + b"; " + _fill(b'spf=pass (x;"\\(;', max(0, n - 20)))


def _header_flood(size: int) -> bytes:
    body = b"\nhello\n"
    return _fill(b"X-Hdr: v\n", size - len(body)) .rsplit(b"\n", 1)[0] + b"\n" + body


def _header_long(size: int) -> bytes:
    return _with_header(size, b"X-Long", lambda n: _fill(b"word ", n))


def _header_folded(size: int) -> bytes:
    return _with_header(size, b"Subject", lambda n: b"start" + _fill(b"\n x", n - 5),
                        head=_HEAD.replace(b"Subject: your account\n", b""))


def _from_blanks(size: int) -> bytes:
    # a display name of one long blank run: a regex with [^...]*[ \t]* backtracks over every split of it
    return _with_header(size, b"From", lambda n: b"a" + _fill(b" ", n - 2) + b"b",
                        head=_HEAD.replace(b"From: Sender <sender@example.test>\n", b""))


def _from_comments(size: int) -> bytes:
    return _with_header(size, b"From", lambda n: _fill(b"(", n // 2) + _fill(b")", n - n // 2),
                        head=_HEAD.replace(b"From: Sender <sender@example.test>\n", b""))


def _from_addresses(size: int) -> bytes:
    return _with_header(size, b"From", lambda n: _fill(b"a@b.test, ", n),
                        head=_HEAD.replace(b"From: Sender <sender@example.test>\n", b""))


def _from_quotes(size: int) -> bytes:
    return _with_header(size, b"From", lambda n: _fill(b'"a\\" ', n),
                        head=_HEAD.replace(b"From: Sender <sender@example.test>\n", b""))


def _content_type_params(size: int) -> bytes:
    top = _HEAD + b"Content-Type: text/plain; name=\"x.txt\"; charset=utf-8"
    tail = b"\n\nhello\n"
    return top + _fill(b"; a=b", size - len(top) - len(tail)) + tail


def _multipart_params(size: int) -> bytes:
    # a multipart Content-Type with tens of thousands of parameters (the boundary last)
    top = _HEAD + b"Content-Type: multipart/mixed"
    tail = b"; boundary=\"p\"\n\n--p\nContent-Type: text/plain\n\nhello\n--p--\n"
    return top + _fill(b"; a=b", size - len(top) - len(tail)) + tail


def _disposition_quotes(size: int) -> bytes:
    # an attachment whose parameters open a quote that never closes
    top = _HEAD + b"Content-Type: multipart/mixed; boundary=\"q\"\n\n--q\nContent-Type: text/plain\n"
    top += b"Content-Disposition: attachment; filename=\"x"
    tail = b"\n\nhello\n--q--\n"
    return top + _fill(b"; a", size - len(top) - len(tail)) + tail


# ------------------------------------------------------------------------------------------- MIME
def _nest(size: int, opener: Callable[[int], bytes], inner: bytes, closer: Callable[[int], bytes]) -> bytes:
    """``opener(i)`` for i = 0, 1, ... then ``inner`` then ``closer(i)`` back down, as deep as ``size`` allows."""
    room = size - len(_HEAD) - len(inner)
    out, closes, used, i = [_HEAD], [], 0, 0
    while True:
        o, c = opener(i), closer(i)
        if used + len(o) + len(c) > room:
            break
        out.append(o)
        closes.append(c)
        used += len(o) + len(c)
        i += 1
    return b"".join([*out, inner, *reversed(closes)])


def _mime_deep(size: int) -> bytes:
    # nested multiparts, as deep as the size allows
    return _nest(size, lambda i: b"Content-Type: multipart/mixed; boundary=\"b%d\"\n\n--b%d\n" % (i, i),
                 b"Content-Type: text/plain\n\nhello\n", lambda i: b"--b%d--\n" % i)


def _mime_wide(size: int) -> bytes:
    top = _HEAD + b"Content-Type: multipart/mixed; boundary=\"w\"\n\n"
    unit = b"--w\nContent-Type: text/plain\n\nx\n"
    n = max(1, (size - len(top) - 8) // len(unit))
    return top + unit * n + b"--w--\n"


def _mime_wide_html(size: int) -> bytes:
    top = _HEAD + b"Content-Type: multipart/alternative; boundary=\"h\"\n\n"
    unit = b"--h\nContent-Type: text/html; charset=utf-8\n\n<p>x <a href=\"http://a.test/\">y</a></p>\n"
    n = max(1, (size - len(top) - 8) // len(unit))
    return top + unit * n + b"--h--\n"


def _mime_empty_parts(size: int) -> bytes:
    top = _HEAD + b"Content-Type: multipart/mixed; boundary=\"e\"\n\n"
    return top + _fill(b"--e\n", size - len(top) - 6) + b"--e--\n"


def _mime_unclosed_deep(size: int) -> bytes:
    # nested multiparts that never close: the stdlib parser's path (defects everywhere)
    return _nest(size, lambda i: b"Content-Type: multipart/mixed; boundary=\"u%d\"\n\n--u%d\n" % (i, i),
                 b"Content-Type: text/plain\n\nhello\n", lambda i: b"")


def _rfc822_deep(size: int) -> bytes:
    return _nest(size, lambda i: b"Content-Type: message/rfc822\n\n", b"Subject: inner\nContent-Type: text/plain\n\nhello\n",
                 lambda i: b"")


def _boundary_decls(size: int) -> bytes:
    # many sibling multiparts, each with its own boundary
    top = _HEAD + b"Content-Type: multipart/mixed; boundary=\"o\"\n\n"
    unit_i = (b"--o\nContent-Type: multipart/alternative; boundary=\"i%d\"\n\n--i%d\nContent-Type: text/plain\n\n"
              b"x\n--i%d--\n")
    out = [top]
    total = len(top)
    i = 0
    while True:
        u = unit_i % (i, i, i)
        if total + len(u) + 8 > size:
            break
        out.append(u)
        total += len(u)
        i += 1
    out.append(b"--o--\n")
    return b"".join(out)


# ------------------------------------------------------------------------------------------- URLs
def _url_glued(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"http://a.test/", n))


def _url_distinct(size: int) -> bytes:
    def body(n: int) -> bytes:
        out, total, i = [], 0, 0
        while total < n:
            u = b"http://h%d.example%d.test/p%d " % (i, i % 97, i)
            out.append(u)
            total += len(u)
            i += 1
        return b"".join(out)[:n]
    return _simple(size, body)


def _www_flood(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"www.a.test,", n))


def _scheme_flood(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"http://", n))


def _html_links(size: int) -> bytes:
    unit = b"<a href=\"http://x.test/a\">http://y.test/b</a>"
    return _simple(size, lambda n: b"<html><body>" + _fill(unit, n - 12), ctype=b"text/html; charset=utf-8")


# ------------------------------------------------------------------------------------------- encoded words
def _encoded_subject(size: int) -> bytes:
    return _with_header(size, b"Subject", lambda n: _fill(b"=?utf-8?b?YWJj?= ", n),
                        head=_HEAD.replace(b"Subject: your account\n", b""))


def _encoded_unterminated(size: int) -> bytes:
    return _with_header(size, b"Subject", lambda n: _fill(b"=?utf-8?q?a ", n),
                        head=_HEAD.replace(b"Subject: your account\n", b""))


def _encoded_glued(size: int) -> bytes:
    return _with_header(size, b"Subject", lambda n: _fill(b"=?x?q?", n),
                        head=_HEAD.replace(b"Subject: your account\n", b""))


def _encoded_header_flood(size: int) -> bytes:
    body = b"\nhello\n"
    return _fill(b"X-E: =?utf-8?q?caf=C3=A9?=\n", size - len(body)).rsplit(b"\n", 1)[0] + b"\n" + body


def _encoded_from(size: int) -> bytes:
    return _with_header(size, b"From", lambda n: _fill(b"=?utf-8?b?0LA=?=", n - 16) + b" <a@b.test>",
                        head=_HEAD.replace(b"From: Sender <sender@example.test>\n", b""))


# ------------------------------------------------------------------------------------------- HTML
def _html_nesting(size: int) -> bytes:
    return _simple(size, lambda n: b"<html><body>" + _fill(b"<div>", n - 13) + b"x",
                   ctype=b"text/html; charset=utf-8")


def _html_nesting_closed(size: int) -> bytes:
    def body(n: int) -> bytes:
        k = max(1, (n - 30) // 13)
        return b"<html><body>" + b"<span>" * k + b"x" + b"</span>" * k
    return _simple(size, body, ctype=b"text/html; charset=utf-8")


def _html_hidden(size: int) -> bytes:
    unit = b"<span style=\"display:none\">hidden</span><font color=\"#ffffff\">w</font>seen "
    return _simple(size, lambda n: b"<html><body>" + _fill(unit, n - 12), ctype=b"text/html; charset=utf-8")


def _html_styled_nesting(size: int) -> bytes:
    return _simple(size, lambda n: b"<html><body>" + _fill(b"<p style=\"color:red\">", n - 12),
                   ctype=b"text/html; charset=utf-8")


def _html_unclosed(size: int) -> bytes:
    return _simple(size, lambda n: b"<html>" + _fill(b"<", n - 6), ctype=b"text/html; charset=utf-8")


def _html_attrs(size: int) -> bytes:
    return _simple(size, lambda n: b"<html><body><p " + _fill(b"a=b ", n - 21) + b">x</p>",
                   ctype=b"text/html; charset=utf-8")


def _html_style_value(size: int) -> bytes:
    return _simple(size, lambda n: b"<html><body><p style=\"" + _fill(b"display ", n - 30) + b"\">x</p>",
                   ctype=b"text/html; charset=utf-8")


def _html_blocks(size: int) -> bytes:
    return _simple(size, lambda n: b"<html><body>" + _fill(b"<br>", n - 12), ctype=b"text/html; charset=utf-8")


def _html_in_plain(size: int) -> bytes:
    # text/plain that sniffs as HTML: rendered too
    return _simple(size, lambda n: b"<html><body>" + _fill(b"<table><tr><td>", n - 12))


# ------------------------------------------------------------------------------------------- invisible
def _invisible_inside_words(size: int) -> bytes:
    unit = _utf8("V\u200bI\u200cA\u200dG\u2060R\ufeffA ")
    return _simple(size, lambda n: _fill_text(unit, n - 16))


def _invisible_only(size: int) -> bytes:
    unit = _utf8("\u200b")
    return _simple(size, lambda n: b"x" + _fill_text(unit, n - 4) + b"y")


def _bidi_flood(size: int) -> bytes:
    unit = _utf8("\u202epay\u202c\u2066p\u0430l\u2069 ")
    return _simple(size, lambda n: _fill_text(unit, n - 16))


def _combining_flood(size: int) -> bytes:
    unit = _utf8("a\u0301\u0302\u0303\u0304")
    return _simple(size, lambda n: _fill_text(unit, n - 16))


# ------------------------------------------------------------------------------------------- long lines
def _long_line_words(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"cheap pills online now ", n))


def _long_line_char(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"x", n))


def _long_line_nonascii(size: int) -> bytes:
    return _simple(size, lambda n: _fill_text(_utf8("\u00e9"), n - 2))


def _long_line_cjk(size: int) -> bytes:
    return _simple(size, lambda n: _fill_text(_utf8("\u4e2d\u6587"), n - 4))


def _long_line_punct(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"$!$!.-'", n))


def _no_newline(size: int) -> bytes:
    # no line break at all: the whole message is one header line
    return b"Subject: " + _fill(b"a", max(0, size - 9))


# ------------------------------------------------------------------------------------------- transfer encodings
def _base64_junk(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"QUJD!RE VG*\n", n), cte=b"base64")


def _base64_html_deep(size: int) -> bytes:
    def body(n: int) -> bytes:
        html = b"<html><body>" + _fill(b"<div>", (n * 3) // 4 - 16)
        return base64.encodebytes(html)[:n]
    return _simple(size, body, ctype=b"text/html; charset=utf-8", cte=b"base64")


def _base64_lookalike(size: int) -> bytes:
    def body(n: int) -> bytes:
        text = _fill(b"a", (n * 3) // 4 - 8) + _utf8(" \u0430")
        return base64.encodebytes(text)[:n]
    return _simple(size, body, cte=b"base64")


def _qp_soft_breaks(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"=\n", n), cte=b"quoted-printable")


def _qp_escapes(size: int) -> bytes:
    # quoted-printable zero-width spaces between letters: invisible text after decoding
    return _simple(size, lambda n: _fill(b"a=E2=80=8B", n), cte=b"quoted-printable")


def _qp_invalid(size: int) -> bytes:
    return _simple(size, lambda n: _fill(b"=ZZ=", n), cte=b"quoted-printable")


def _charset_flood(size: int) -> bytes:
    top = _HEAD + b"Content-Type: multipart/mixed; boundary=\"c\"\n\n"
    out, total, i = [top], len(top), 0
    while True:
        u = b"--c\nContent-Type: text/plain; charset=\"x-bogus-%d\"\n\n\xe9t\xe9\n" % i
        if total + len(u) + 8 > size:
            break
        out.append(u)
        total += len(u)
        i += 1
    out.append(b"--c--\n")
    return b"".join(out)


def _binary_junk(size: int) -> bytes:
    unit = bytes(range(256))
    return _simple(size, lambda n: _fill(unit, n), ctype=b"text/plain; charset=utf-8")


CASES: tuple[HostileCase, ...] = (
    HostileCase("lookalike_run", "lookalike", _lookalike_run, "one long ASCII run, a space, one Cyrillic letter"),
    HostileCase("lookalike_glued", "lookalike", _lookalike_glued, "one long ASCII run glued to a Cyrillic letter"),
    HostileCase("lookalike_runs", "lookalike", _lookalike_runs, "4 KB ASCII words after one look-alike"),
    HostileCase("lookalike_words", "lookalike", _lookalike_words, "mixed-script words (p\u0430yp\u0430l)"),
    HostileCase("lookalike_dash_chain", "lookalike", _lookalike_dash_chain, "words glued by em dashes"),
    HostileCase("lookalike_from", "lookalike", _lookalike_from, "From: a long ASCII run and a Cyrillic letter"),
    HostileCase("lookalike_subject", "lookalike", _lookalike_subject, "Subject: the same"),
    HostileCase("header_flood", "headers", _header_flood, "tens of thousands of short headers"),
    HostileCase("header_long", "headers", _header_long, "one header the size of the message"),
    HostileCase("header_folded", "headers", _header_folded, "one header folded into tens of thousands of lines"),
    HostileCase("from_blanks", "headers", _from_blanks, "From: a display name that is one blank run"),
    HostileCase("from_comments", "headers", _from_comments, "From: deeply nested comments"),
    HostileCase("auth_results_flood", "headers", _auth_results_flood,
                "thousands of Authentication-Results headers from a trusted authserv-id"),
    HostileCase("auth_results_comments", "headers", _auth_results_comments,
                "one Authentication-Results header of unclosed comments, quotes and semicolons"),
    HostileCase("from_addresses", "headers", _from_addresses, "From: tens of thousands of addresses"),
    HostileCase("from_quotes", "headers", _from_quotes, "From: escaped quotes that never close"),
    HostileCase("content_type_params", "headers", _content_type_params, "Content-Type with 50k parameters"),
    HostileCase("multipart_params", "headers", _multipart_params, "multipart Content-Type with 50k parameters"),
    HostileCase("disposition_quotes", "headers", _disposition_quotes, "file name parameters with an open quote"),
    HostileCase("mime_deep", "mime", _mime_deep, "multiparts nested thousands deep"),
    HostileCase("mime_unclosed_deep", "mime", _mime_unclosed_deep, "nested multiparts that never close"),
    HostileCase("mime_wide", "mime", _mime_wide, "thousands of sibling parts"),
    HostileCase("mime_wide_html", "mime", _mime_wide_html, "thousands of HTML alternatives"),
    HostileCase("mime_empty_parts", "mime", _mime_empty_parts, "a flood of boundary lines"),
    HostileCase("mime_boundary_decls", "mime", _boundary_decls, "thousands of nested multiparts, one boundary each"),
    HostileCase("rfc822_deep", "mime", _rfc822_deep, "message/rfc822 nested thousands deep"),
    HostileCase("url_glued", "urls", _url_glued, "URLs glued together without blanks"),
    HostileCase("url_distinct", "urls", _url_distinct, "tens of thousands of distinct URLs and hosts"),
    HostileCase("www_flood", "urls", _www_flood, "www. hosts glued by commas"),
    HostileCase("scheme_flood", "urls", _scheme_flood, "http:// repeated"),
    HostileCase("html_links", "urls", _html_links, "HTML links by the thousand"),
    HostileCase("encoded_subject", "encoded_words", _encoded_subject, "Subject of 20k encoded words"),
    HostileCase("encoded_unterminated", "encoded_words", _encoded_unterminated, "encoded words never closed"),
    HostileCase("encoded_glued", "encoded_words", _encoded_glued, "encoded-word openers glued together"),
    HostileCase("encoded_header_flood", "encoded_words", _encoded_header_flood, "thousands of encoded headers"),
    HostileCase("encoded_from", "encoded_words", _encoded_from, "From: thousands of encoded words"),
    HostileCase("html_nesting", "html", _html_nesting, "tens of thousands of nested unclosed divs"),
    HostileCase("html_nesting_closed", "html", _html_nesting_closed, "tens of thousands of nested spans, closed"),
    HostileCase("html_hidden", "html", _html_hidden, "hidden-style and white-font elements by the thousand"),
    HostileCase("html_styled_nesting", "html", _html_styled_nesting, "nested styled paragraphs"),
    HostileCase("html_unclosed", "html", _html_unclosed, "a run of '<'"),
    HostileCase("html_attrs", "html", _html_attrs, "one element with tens of thousands of attributes"),
    HostileCase("html_style_value", "html", _html_style_value, "one style attribute the size of the message"),
    HostileCase("html_blocks", "html", _html_blocks, "a flood of <br>"),
    HostileCase("html_in_plain", "html", _html_in_plain, "text/plain that sniffs as HTML, nested tables"),
    HostileCase("invisible_inside_words", "invisible", _invisible_inside_words, "zero-width characters in words"),
    HostileCase("invisible_only", "invisible", _invisible_only, "nothing but zero-width spaces"),
    HostileCase("bidi_flood", "invisible", _bidi_flood, "bidi overrides and isolates around look-alikes"),
    HostileCase("combining_flood", "invisible", _combining_flood, "stacked combining marks (NFKC work)"),
    HostileCase("long_line_words", "long_lines", _long_line_words, "one line of words, no break"),
    HostileCase("long_line_char", "long_lines", _long_line_char, "one line of one letter"),
    HostileCase("long_line_nonascii", "long_lines", _long_line_nonascii, "one line of one accented letter"),
    HostileCase("long_line_cjk", "long_lines", _long_line_cjk, "one line of CJK"),
    HostileCase("long_line_punct", "long_lines", _long_line_punct, "one line of $!.-'"),
    HostileCase("no_newline", "long_lines", _no_newline, "no line break at all"),
    HostileCase("base64_junk", "transfer", _base64_junk, "base64 with junk in every group"),
    HostileCase("base64_html_deep", "transfer", _base64_html_deep, "base64 of deeply nested HTML"),
    HostileCase("base64_lookalike", "transfer", _base64_lookalike, "base64 of the look-alike run"),
    HostileCase("qp_soft_breaks", "transfer", _qp_soft_breaks, "quoted-printable soft line breaks only"),
    HostileCase("qp_escapes", "transfer", _qp_escapes, "quoted-printable zero-width spaces"),
    HostileCase("qp_invalid", "transfer", _qp_invalid, "invalid quoted-printable escapes"),
    HostileCase("charset_flood", "transfer", _charset_flood, "thousands of parts with unknown charsets"),
    HostileCase("binary_junk", "transfer", _binary_junk, "every byte value, as text"),
)

_BY_NAME = {c.name: c for c in CASES}
assert set(_BY_NAME) == {c.name for c in CASES} and {c.cls for c in CASES} == set(CLASSES)


def build(name: str, size: int) -> bytes:
    """The message of case ``name`` at about ``size`` bytes."""
    return _BY_NAME[name].build(int(size))


# ------------------------------------------------------------------------------------------- measuring
def measure(fn: Callable[[bytes], Any], raw: bytes, repeats: int = 3) -> tuple[float, float]:
    """(median CPU ms of this thread, median wall ms) of ``fn(raw)`` over ``repeats`` calls.

    CPU time of the calling thread is what one core spends on the message, whatever else the machine runs.
    """
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(max(1, repeats)):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn(raw)
        cpu.append((time.thread_time() - c0) * 1000.0)
        wall.append((time.perf_counter() - w0) * 1000.0)
    return statistics.median(cpu), statistics.median(wall)


def corpus_baseline(classify: Callable[[bytes], Any], raws: Sequence[bytes], repeats: int = 1) -> dict[str, Any]:
    """Per-KB CPU time of real mail: the median over all messages and over the largest decile by size."""
    rows = []
    for raw in raws:
        cpu, _ = measure(classify, raw, repeats)
        rows.append((len(raw), cpu))
    if not rows:
        raise ValueError("no corpus messages to measure")
    per_kb = [cpu / (size / 1024.0) for size, cpu in rows if size]
    sizes = sorted(size for size, _ in rows)
    cut = sizes[int(0.9 * (len(sizes) - 1))]
    decile = [cpu / (size / 1024.0) for size, cpu in rows if size >= cut]
    return {
        "messages": len(rows),
        "normal_ms_per_kb": statistics.median(per_kb),
        "normal_ms_median": statistics.median(cpu for _, cpu in rows),
        "largest_decile_min_bytes": cut,
        "largest_decile_messages": len(decile),
        "largest_decile_ms_per_kb": statistics.median(decile),
        "largest_decile_ms_max": max(cpu for size, cpu in rows if size >= cut),
    }


def run_inprocess(
    classify: Callable[[bytes], Any],
    sizes: Iterable[int],
    *,
    cases: Sequence[HostileCase] = CASES,
    repeats: int = 3,
    stages: Callable[[bytes], dict[str, float]] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Classify every case at every size, one message at a time; one row per (case, size).

    ``stages``, when given, returns a per-stage CPU breakdown of one message (parse, rules, features+model);
    ``progress`` is called with each row as soon as it is measured.
    """
    out = []
    for size in sizes:
        for case in cases:
            raw = case.build(size)
            classify(raw)  # warm: first-use costs (codec lookups, hyperscan scratch) are not the message's
            cpu, wall = measure(classify, raw, repeats)
            row: dict[str, Any] = {
                "case": case.name, "class": case.cls, "bytes": len(raw), "ms": cpu, "wall_ms": wall,
                "ms_per_kb": cpu / (len(raw) / 1024.0),
            }
            if stages is not None:
                row["stages_ms"] = stages(raw)
            out.append(row)
            if progress is not None:
                progress(row)
    return out
