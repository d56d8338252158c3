"""``parse``: raw bytes to a ``ParsedMessage``, never raising.

The structure the MIME parsers would spend unbounded work on is cut back first; then a well-formed message is split
by the fast splitter below (``_fast_tree``) into the tree the stdlib feedparser would build, anything else goes
through the feedparser, and one part walker reads either tree.
"""

from __future__ import annotations

import email
import email.message
import email.utils
import itertools
import re
from email import policy as _email_policy

import structlog

from models.message import auth
from models.message.decode import _decode_bytes, _decode_transfer, _header_value, _payload_bytes
from models.message.html import HtmlBudget, html_to_text
from models.message.normalize import normalize_text
from models.message.urls import _extract_urls
from models.message.view import (
    _BOUNDARY_LINES_BASE,
    _BYTES_PER_ENCODED_WORD,
    _BYTES_PER_PART,
    _ENCODED_WORDS_BASE,
    _MAX_ADDRESS_CHARS,
    _MAX_BOUNDARY_LINES,
    _MAX_HEADER_CHARS,
    _MAX_HEADERS,
    _MAX_MIME_CT_CHARS,
    _MAX_MIME_DECLS,
    _MAX_PARAM_CHARS,
    _MAX_PARTS,
    _MAX_STDLIB_WORK,
    _PARTS_BASE,
    DEFAULT_MAX_BYTES,
    ParsedMessage,
)

log = structlog.get_logger(__package__)  # the package's logger: records are named models.message


_CHARSET_PARAM_RE = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_CHARSET_BYTES_RE = re.compile(rb"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_HEADER_LINE_RE = re.compile(rb"^[!-9;-~]+[ \t]*:")


# after "content-type:" at a line start (in a lower-cased copy: a literal search beats a case-blind regex)
_MIME_DECL_TAIL_RE = re.compile(rb"[ \t]*(?:\r?\n[ \t]+)*(?:multipart|message)/")
_LINE_END_RE = re.compile(rb"\r\n|\r|\n")


def _cap_structure(data: bytes, defects: list[str]) -> tuple[bytes, int]:
    """``data`` with the structure the MIME parsers would spend unbounded work on cut back, before
    either parser sees it; also the number of multipart/message declarations kept.

    A linear scan, not a parse: every line that starts a multipart/ or message/ Content-Type counts as a
    declaration (an upper bound on the nesting depth), every line that starts with "--" as a possible
    boundary. Past ``_MAX_MIME_DECLS`` declarations, or past ``_MAX_BOUNDARY_LINES`` such lines (and one per
    512 bytes beyond the first 32), the message is cut at that line ("mime_depth_capped", "mime_parts_capped":
    the MIME parsers spend a Python step per part); a declaration's Content-Type value longer than
    ``_MAX_MIME_CT_CHARS`` is shortened ("header_capped")."""
    decls = 0
    spans: list[tuple[int, int]] = []  # parts of declaration values to drop
    end = len(data)
    low = data.lower()
    i = low.find(b"content-type:")
    while i != -1:
        m = _MIME_DECL_TAIL_RE.match(low, i + 13) if i == 0 or low[i - 1] == 0x0A else None
        if m is not None:
            if decls == _MAX_MIME_DECLS:
                end = i
                defects.append("mime_depth_capped")
                break
            decls += 1
            e = data.find(b"\n", m.end())
            while e != -1 and data[e + 1 : e + 2] in (b" ", b"\t"):
                e = data.find(b"\n", e + 1)
            if e == -1:
                e = len(data)
            elif data[e - 1 : e] == b"\r":
                e -= 1
            if e - i > _MAX_MIME_CT_CHARS:
                spans.append((i + _MAX_MIME_CT_CHARS, e))
        i = low.find(b"content-type:", i + 13)
    max_lines = min(_MAX_BOUNDARY_LINES, _BOUNDARY_LINES_BASE + len(data) // _BYTES_PER_PART)
    if data.count(b"\n--", 0, end) > max_lines:
        i = -1
        for _ in range(max_lines + 1):
            i = data.find(b"\n--", i + 1, end)
        end = i + 1
        if "mime_parts_capped" not in defects:
            defects.append("mime_parts_capped")
    if not spans and end == len(data):
        return data, decls
    if spans:
        if "header_capped" not in defects:
            defects.append("header_capped")
        pieces, pos = [], 0
        for a, b in spans:
            if a >= end:
                break
            pieces.append(data[pos:a])
            pos = min(b, end)
        pieces.append(data[pos:end])
        return b"".join(pieces), decls
    return data[:end], decls


def _cap_lines(data: bytes, decls: int, defects: list[str]) -> tuple[bytes, bool]:
    """``data`` cut so the stdlib feedparser's work stays within ``_MAX_STDLIB_WORK`` ("lines_capped"):
    it spends a Python step per line and per open multipart on each line, which a flood of empty lines
    in a deep structure turns into seconds."""
    lines = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    keep = _MAX_STDLIB_WORK // (1 + decls)
    if lines <= keep:
        return data, False
    m = next(itertools.islice(_LINE_END_RE.finditer(data), keep - 1, None))
    defects.append("lines_capped")
    return data[: m.end()], True


def _empty(raw: bytes, max_bytes: int, defects: list[str]) -> ParsedMessage:
    return ParsedMessage(defects=defects, size=len(raw), truncated=len(raw) > max_bytes, raw=raw[:max_bytes])


def parse(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ParsedMessage:
    """Parse one raw message; never raises (malformed input gives defect flags)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raw = str(raw).encode("utf-8", "surrogateescape")
    raw = bytes(raw)
    try:
        return _parse(raw, max(1, int(max_bytes)))
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
        log.warning("parse_failed", error=repr(exc)[:200], size=len(raw))
        pm = _empty(raw, max_bytes, ["parse_error"])
        try:
            text = raw[:max_bytes].decode("utf-8", errors="replace")
            pm.body_text = normalize_text(text)
            pm.raw_body = text
            pm.urls, pm.domains = _extract_urls(text)
        except Exception:  # noqa: BLE001, S110 - "never raises": what was filled in before the failure stands
            pass
        return pm


def _parse(raw: bytes, max_bytes: int, *, fast: bool = True) -> ParsedMessage:
    """``fast=False`` forces the stdlib feedparser: the reference the fast splitter is
    tested against (both must give equal results)."""
    size = len(raw)
    truncated = size > max_bytes
    data = raw[:max_bytes] if truncated else raw
    defects: list[str] = []
    if truncated:
        defects.append("truncated")
    # mbox "From " envelope line is not a header; email would flag it, skip it quietly
    if data.startswith(b"From "):
        nl = data.find(b"\n")
        data_hdr = data[nl + 1 :] if nl >= 0 else b""
    else:
        data_hdr = data
    data_hdr = data_hdr.lstrip(b"\r\n") if data_hdr[:1] in (b"\r", b"\n") else data_hdr
    if not data_hdr.strip():
        defects.append("empty")
        defects.append("missing_headers")
        defects.append("no_text")
        return ParsedMessage(defects=defects, size=size, truncated=truncated, raw=data)
    if _HEADER_LINE_RE.match(data_hdr) is None:
        defects.append("missing_headers")
    data_hdr, decls = _cap_structure(data_hdr, defects)
    # a message cut short: a base64 part that ends mid-group is no defect of the sender's
    cut = truncated or "mime_depth_capped" in defects or "mime_parts_capped" in defects

    msg = _fast_tree(data_hdr) if fast else None
    if msg is None:
        data_hdr, capped = _cap_lines(data_hdr, decls, defects)
        cut = cut or capped
        msg = email.message_from_bytes(data_hdr, policy=_email_policy.compat32)

    hint = None
    ct0 = next((v for k, v in msg._headers if k.lower() == "content-type"), None)  # type: ignore[attr-defined]  # typeshed omits Message._headers: wire order, raw values, no policy cost
    if ct0.__class__ is not str or not ct0.isascii():
        ct0 = msg.get("content-type")  # compat32's own view of 8-bit or odd values
    m = _CHARSET_PARAM_RE.search(str(ct0 or ""))
    if m is not None:
        hint = m.group(1)
    elif b"charset=" in data:  # data is already capped: no copy of it
        m2 = _CHARSET_BYTES_RE.search(data)
        hint = m2.group(1).decode("ascii") if m2 else None
    headers: list[tuple[str, str]] = []
    words = [_ENCODED_WORDS_BASE + len(data) // _BYTES_PER_ENCODED_WORD]  # encoded words left to decode
    for name, value in msg._headers:  # type: ignore[attr-defined]  # typeshed omits Message._headers: wire order, raw values
        if len(headers) >= _MAX_HEADERS:
            defects.append("headers_capped")
            break
        if value.__class__ is str and len(value) > _MAX_HEADER_CHARS:
            value = value[:_MAX_HEADER_CHARS]
            if "header_capped" not in defects:
                defects.append("header_capped")
        if (
            value.__class__ is str
            and value.isascii()
            and "\n" not in value
            and "=?" not in value
            and "\x1b" not in value
        ):
            headers.append((name.strip().lower(), value.strip()))  # plain ASCII: nothing to decode
        else:
            headers.append((name.strip().lower(), _header_value(value, defects, hint, words)))
    if not headers and "missing_headers" not in defects:
        defects.append("missing_headers")

    pm = ParsedMessage(headers=headers, size=size, truncated=truncated, raw=data, defects=defects)
    trusted = auth._TRUSTED_AUTHSERV_IDS  # read here: configure_trusted_authserv_ids rebinds it
    if trusted:
        pm.auth = auth.authentication_results(headers, trusted, defects)
    for k, v in headers:
        if k == "subject" and not pm.subject:
            pm.subject = v
        elif k == "from" and not pm.sender:
            pm.sender = _sender_address(v, defects)

    texts: list[str] = []
    raws: list[str] = []
    n = 0
    max_parts = min(_MAX_PARTS, _PARTS_BASE + len(data) // _BYTES_PER_PART)
    decoded_left = max_bytes
    html_budget = HtmlBudget(len(data))
    for part in msg.walk():
        n += 1
        if n > max_parts:
            defects.append("too_many_parts")
            break
        for d in part.defects:
            flag = "mime_defect:" + type(d).__name__.removesuffix("Defect")
            if flag not in defects:
                defects.append(flag)
        # one pass over the part's headers instead of Message.get()'s scan per lookup
        phdr: dict[str, str] = {}
        for hk, hv in part._headers:  # type: ignore[attr-defined]  # typeshed omits Message._headers
            if len(hk) < 12 or hk[0] not in "cC":
                continue  # only content-type/-disposition/-transfer-encoding are read
            hk = hk.lower()
            if hk not in phdr:
                phdr[hk] = hv if isinstance(hv, str) else str(hv)
        ct_raw = phdr.get("content-type", "")
        if not ct_raw:
            ctype = part.get_default_type()
        else:
            ctype = ct_raw.split(";", 1)[0].strip().lower()
            if ctype.count("/") != 1:
                ctype = "text/plain"
        pm.content_types.append(ctype)
        if part.is_multipart():
            continue
        disp_raw = phdr.get("content-disposition", "")
        filename = _safe_filename(part, defects, ct_raw, disp_raw) if ("name" in ct_raw or "name" in disp_raw) else ""
        disp = disp_raw.split(";", 1)[0].strip().lower()
        maintype = ctype.split("/", 1)[0]
        is_attachment = bool(filename) or disp == "attachment"
        if is_attachment:
            pm.attachments.append((filename or "", ctype))
        if maintype == "message" or (maintype != "text" and is_attachment):
            continue
        if (
            maintype != "text"
            and not (maintype == "application" and ctype.endswith(("/html", "/xhtml+xml")))
            and (ctype not in ("application/octet-stream",) or is_attachment)
        ):
            continue  # non-text inline part (image, application/octet-stream ...): not read as text
        if is_attachment and ctype not in ("text/plain", "text/html"):
            continue
        cte = phdr.get("content-transfer-encoding", "").strip().lower()
        payload = _decode_transfer(_payload_bytes(part), cte, defects, cut)
        if cte == "base64" and "base64_text" not in defects:
            defects.append("base64_text")
        if len(payload) > decoded_left:
            # never reached while every payload is a slice of the analysed bytes; kept so that no change
            # to the parsers can make the text steps below cost more than the analysed size
            payload = payload[: max(0, decoded_left)]
            if "decoded_size_capped" not in defects:
                defects.append("decoded_size_capped")
        decoded_left -= len(payload)
        cm = _CHARSET_PARAM_RE.search(ct_raw)
        text = _decode_bytes(payload, cm.group(1) if cm else None, defects)
        raws.append(text)
        if ctype.endswith("html") or (ctype == "text/plain" and _looks_like_html(text)):
            pm.html_parts += 1
            texts.append(normalize_text(html_to_text(text, defects, html_budget), defects))
        else:
            pm.text_parts += 1
            texts.append(normalize_text(text, defects))

    pm.raw_body = "\n".join(raws)
    pm.body_text = "\n".join(t for t in texts if t)
    if not pm.body_text.strip():
        defects.append("no_text")
    pm.urls, pm.domains = _extract_urls(pm.raw_body, defects)
    return pm


# "addr@host", "<addr@host>", "Name <addr@host>", '"Name" <addr@host>' with a plain dot-atom
# address and a display name free of RFC 5322 specials: what email.utils.parseaddr returns
# for these is the address itself, so the (slow, pure-Python) tokenizer is skipped.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_ADDR = _ATEXT + r"(?:\." + _ATEXT + r")*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# (The blanks before "<" belong to the unquoted name's class already: a separate ``[ \t]*`` after it made
# the regex try every split of a blank run, quadratic in its length.)
_SIMPLE_FROM_RE = re.compile(
    r"""(?:"[^"\\\r\n]*"[ \t]*|[^"()<>@,;:\\\[\]\r\n]*)<(""" + _DOT_ATOM_ADDR + r")>|(" + _DOT_ATOM_ADDR + ")"
)


def _sender_address(value: str, defects: list[str] | None = None) -> str:
    """The lower-case From address (``parseaddr``'s), or the whole value when none parses.

    ``parseaddr`` walks the value a character at a time in Python (and recurses into nested comments):
    only the first ``_MAX_ADDRESS_CHARS`` of a longer value are given to it ("from_capped")."""
    m = _SIMPLE_FROM_RE.fullmatch(value)
    if m is not None:
        return (m.group(1) or m.group(2)).lower()
    if len(value) > _MAX_ADDRESS_CHARS:
        value = value[:_MAX_ADDRESS_CHARS]
        if defects is not None and "from_capped" not in defects:
            defects.append("from_capped")
    try:
        addr = email.utils.parseaddr(value)[1]
    except RecursionError:  # comments nested hundreds deep
        addr = ""
    return addr.lower() or value.lower()


_HTML_SNIFF_RE = re.compile(r"<(?:html|body|table|font|a\s+href|div|p)\b", re.IGNORECASE)


def _looks_like_html(text: str) -> bool:
    return _HTML_SNIFF_RE.search(text, 0, 4096) is not None


def _safe_filename(part: email.message.Message, defects: list[str], ct_raw: str = "", disp_raw: str = "") -> str:
    if len(ct_raw) > _MAX_PARAM_CHARS or len(disp_raw) > _MAX_PARAM_CHARS:
        # the stdlib's parameter parser is quadratic in a value's length: it reads a cut copy
        if "header_capped" not in defects:
            defects.append("header_capped")
        view = email.message.Message()
        view._headers = [  # type: ignore[attr-defined]  # typeshed omits Message._headers
            (k, v[:_MAX_PARAM_CHARS] if isinstance(v, str) else v)
            for k, v in part._headers  # type: ignore[attr-defined]  # typeshed omits Message._headers
            if k.lower() in ("content-type", "content-disposition")
        ]
        part = view
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001 - a filename the stdlib cannot parse is a defect, not a crash
        defects.append("bad_filename")
        return ""
    if not name:
        return ""
    return _header_value(name, defects)


# ---------------------------------------------------------------------------------------
# Fast splitter: the feedparser's compat32 tree for well-formed messages
# ---------------------------------------------------------------------------------------

# compat32's header_source_parse as a regex: a non-empty name of RFC 5322 ftext, a colon,
# the value without its leading blanks, continuation lines (leading blank) kept verbatim.
_FAST_HEADER_FIELD_RE = re.compile(r"([!-9;-~]+):[ \t]*([^\n]*\n(?:[ \t][^\n]*\n)*)")
# A header block the feedparser reads without recording a defect.
_FAST_HEADER_BLOCK_RE = re.compile(r"(?:[!-9;-~]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*")
_FAST_MAX_PARTS = 400
# What may follow "--boundary" on a boundary line (the feedparser's boundaryre tail).
_BOUNDARY_TAIL_RE = re.compile(r"(--)?[ \t]*(?:\r?\n|\Z)")


def _boundary_lines(text: str, boundary: str, start: int, end: int) -> list[tuple[int, int, bool]]:
    """(line start, line end, is close) of the boundary lines in ``text[start:end]`` up to
    the first close line: literal searches plus one anchored match each (no per-message
    regex compile, no line-by-line Python loop)."""
    sep = "--" + boundary
    nsep = "\n" + sep
    out: list[tuple[int, int, bool]] = []
    i = start if text.startswith(sep, start, end) else -1
    if i < 0:
        i = text.find(nsep, start, end)
        i = i + 1 if i >= 0 else -1
    while i >= 0:
        m = _BOUNDARY_TAIL_RE.match(text, i + len(sep), end)
        if m is not None:
            close = m.group(1) is not None
            out.append((i, m.end(), close))
            if close:
                break
        i = text.find(nsep, i + len(sep), end)
        i = i + 1 if i >= 0 else -1
    return out


def _fast_tree(data: bytes) -> email.message.Message | None:
    """The ``compat32`` ``Message`` tree ``email.message_from_bytes`` would build, or None
    when the message has anything the feedparser would treat specially (any defect it
    would record, ``message/*`` or digest parts, lone CR line ends, empty or doubled
    boundaries): those take the stdlib path, so both paths always agree."""
    text = data.decode("ascii", "surrogateescape")
    if "\r" in text and text.count("\r") != text.count("\r\n"):
        return None  # lone CRs are line ends to the feedparser, not to this splitter
    budget = [_FAST_MAX_PARTS]
    return _fast_part(text, 0, len(text), (), budget, top=True)


def _fast_part(
    text: str, start: int, end: int, outer: tuple[str, ...], budget: list[int], *, top: bool
) -> email.message.Message | None:
    budget[0] -= 1
    if budget[0] < 0:
        return None
    # the header block ends at the first empty line (or the end of the part)
    if text.startswith("\n", start) or text.startswith("\r\n", start):
        block = ""
        body = start + (1 if text[start] == "\n" else 2)
    else:
        i = text.find("\n\n", start, end)
        j = text.find("\n\r\n", start, i + 2 if i >= 0 else end)
        if j >= 0:
            block, body = text[start : j + 1], j + 3
        elif i >= 0:
            block, body = text[start : i + 1], i + 2
        else:
            block, body = text[start:end], end
            if not block.endswith("\n"):
                block += "\n"  # the value's final line end is stripped anyway
    if block and _FAST_HEADER_BLOCK_RE.fullmatch(block) is None:
        # a first line that is a continuation, an envelope "From " line, a line that is no
        # header before the empty line: all feedparser defects
        return None
    headers = [(name, value.rstrip("\r\n")) for name, value in _FAST_HEADER_FIELD_RE.findall(block)]
    msg = email.message.Message()
    msg._headers = headers  # type: ignore[attr-defined]  # typeshed omits it; what the feedparser's set_raw builds
    ct = next((v for k, v in headers if len(k) == 12 and k.lower() == "content-type"), None)
    if ct is None:
        ctype = "text/plain"
    elif ct.isascii():  # Message.get_content_type() without its per-call header scans
        ctype = ct.partition(";")[0].strip().lower()
        if ctype.count("/") != 1:
            ctype = "text/plain"
    else:
        ctype = msg.get_content_type()  # 8-bit bytes: compat32 hands back a Header object
    maintype = ctype.partition("/")[0]
    if maintype == "message" or ctype == "multipart/digest":
        return None  # sub-messages and digest defaults: left to the feedparser
    if maintype != "multipart":
        payload = text[body:end]
        if not top:  # the line end before a boundary belongs to the boundary (RFC 2046)
            if payload.endswith("\r\n"):
                payload = payload[:-2]
            elif payload.endswith("\n"):
                payload = payload[:-1]
        msg._payload = payload  # type: ignore[attr-defined]  # typeshed omits Message._payload
        return msg
    boundary = msg.get_boundary()
    if not boundary or boundary in outer:
        return None
    if str(msg.get("content-transfer-encoding", "8bit")).lower() not in ("7bit", "8bit", "binary"):
        return None  # InvalidMultipartContentTransferEncodingDefect
    lines = _boundary_lines(text, boundary, body, end)
    if len(lines) < 2 or lines[0][2] or not lines[-1][2]:
        return None  # no start or no close boundary: defects the feedparser records
    parts: list[email.message.Message] = []
    inner = (*outer, boundary)
    for (_, prev_end, _), (next_start, _, _) in itertools.pairwise(lines):
        if next_start <= prev_end:
            return None  # doubled boundary lines: the feedparser merges them
        sub = _fast_part(text, prev_end, next_start, inner, budget, top=False)
        if sub is None:
            return None
        parts.append(sub)
    msg._payload = parts  # type: ignore[attr-defined]  # typeshed omits Message._payload
    return msg
