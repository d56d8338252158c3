"""Turning requests into messages and verdicts into answers (shared by HTTP routes and the spamd server)."""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, Any

from streams.events import message_id_for

if TYPE_CHECKING:
    from models.classifier import Verdict
    from services.api.schemas import ClassifyJSON

__all__ = ["NotAMessage", "assemble", "check_message", "message_id_for", "spamd_score", "verdict_dict"]

_HEADER_NAME = re.compile(rb"^[!-9;-~]+$")
_HEADER_NAME_STR = re.compile(r"^[!-9;-~]{1,200}$")
_HEAD_SCAN = 64 * 1024


class NotAMessage(ValueError):
    """The bytes are not an RFC 822 message (no header section)."""


def check_message(raw: bytes) -> None:
    """Refuse what is not a message: empty, or a first line that is neither a header field nor mbox 'From '.

    Deliberately lenient beyond that (broken MIME is itself a spam signal the classifier should see).
    """
    if not raw.strip():
        raise NotAMessage("empty message")
    head = raw[:_HEAD_SCAN].lstrip(b"\r\n")
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if first.startswith(b"From "):
        return
    name, sep, _ = first.partition(b":")
    if not sep or not name or not _HEADER_NAME.match(name):
        raise NotAMessage("not an RFC 822 message: the first line is not a header field ('Name: value')")


_WORD_BYTES = 45
"""UTF-8 bytes per RFC 2047 encoded word: ``=?utf-8?b?`` + 60 base64 characters + ``?=`` is 72, under the 75
the RFC allows."""


def _field(value: str) -> str:
    """A header value on one line (folded), RFC 2047-encoded when it is not ASCII, in time linear in its length.

    The e-mail package's ``Header.encode`` is quadratic on long non-ASCII values (seconds for 10,000 characters),
    so the value is cut here: its UTF-8 bytes in runs of at most ``_WORD_BYTES`` that never split a character,
    each run one base64 encoded word, the words folded onto continuation lines.
    """
    value = " ".join(value.replace("\r", " ").replace("\n", " ").split())
    if value.isascii():
        return value
    data = value.encode("utf-8", "surrogateescape")
    words: list[str] = []
    start, n = 0, len(data)
    while start < n:
        end = min(start + _WORD_BYTES, n)
        while end < n and end > start + 1 and 0x80 <= data[end] < 0xC0:  # not inside a multi-byte character
            end -= 1
        words.append("=?utf-8?b?" + base64.b64encode(data[start:end]).decode("ascii") + "?=")
        start = end
    return "\r\n ".join(words)


def assemble(req: ClassifyJSON) -> bytes:
    """Build an RFC 822 message from structured JSON fields (raises ValueError on a bad header name)."""
    if req.raw is not None:
        return req.raw.encode("utf-8", "surrogateescape")
    lines: list[str] = []
    if req.from_ is not None:
        lines.append(f"From: {_field(req.from_)}")
    if req.to is not None:
        to = req.to if isinstance(req.to, str) else ", ".join(req.to)
        lines.append(f"To: {_field(to)}")
    if req.subject is not None:
        lines.append(f"Subject: {_field(req.subject)}")
    for name, value in (req.headers or {}).items():
        if not _HEADER_NAME_STR.match(name):
            raise ValueError(f"bad header name {name[:50]!r}")
        if name.lower() in ("content-type", "content-transfer-encoding", "mime-version"):
            continue  # the body structure below decides these
        lines.append(f"{name}: {_field(value)}")
    lines.append("MIME-Version: 1.0")
    text, html = req.text, req.html
    if text is not None and html is not None:
        boundary = "=_flywheel_alt_" + message_id_for((text + html).encode("utf-8", "surrogateescape"))[:16]
        lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        body = (
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            f"{text}\r\n--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n{html}\r\n--{boundary}--\r\n"
        )
    else:
        ctype = "text/html" if html is not None and text is None else "text/plain"
        lines.append(f"Content-Type: {ctype}; charset=utf-8")
        lines.append("Content-Transfer-Encoding: 8bit")
        body = html if html is not None and text is None else (text or "")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8", "surrogateescape")


def verdict_dict(v: Verdict, message_id: str, policy: str) -> dict[str, Any]:
    """The /classify answer (schema: ``ClassifyResponse``) as a plain dict for orjson."""
    r = v.rules
    m = v.model
    m_spam = bool(m.is_spam)
    return {
        "message_id": message_id,
        "verdict": "spam" if v.is_spam else "ham",
        "is_spam": bool(v.is_spam),
        "probability": float(v.probability),
        "score": float(v.score),
        "threshold": float(v.threshold),
        "decided_by": v.decided_by,
        "policy": policy,
        "rules": {
            "score": round(float(r.score), 3),
            "threshold": float(r.threshold),
            "is_spam": bool(r.is_spam),
            "verdict": "spam" if r.is_spam else "ham",
            "probability": float(v.rules_probability),
            "hits": [{"name": h.name, "weight": float(h.weight), "description": h.description} for h in r.hits],
        },
        "model": {
            "probability": float(m.probability),
            "is_spam": m_spam,
            "verdict": "spam" if m_spam else "ham",
            "threshold": float(m.threshold),
            "version": m.version,
            "kind": m.kind,
            "provider": m.provider,
        },
        "campaign": v.campaign.to_dict() if v.campaign is not None else None,
        "list": v.user_list,
    }


def spamd_score(v: Verdict) -> tuple[float, float]:
    """(score, threshold) on SpamAssassin's scale, consistent with the served verdict.

    The served probability is mapped piecewise-linearly so that the deciding side's probability threshold
    lands on the rules threshold (0 -> 0, t -> T, 1 -> 2T); it is nudged across T when the policy decided
    otherwise (policy "either"), so ``score >= threshold`` always agrees with ``Spam: True``.
    """
    threshold = float(v.rules.threshold) or 5.0
    p, t = float(v.probability), min(max(float(v.threshold), 1e-6), 1 - 1e-6)
    score = threshold * p / t if p < t else threshold * (1.0 + (p - t) / (1.0 - t))
    score = round(score, 1)
    if v.is_spam and score < threshold:
        score = threshold
    elif not v.is_spam and score >= threshold:
        score = round(threshold - 0.1, 1)
    return score, threshold
