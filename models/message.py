"""Parse raw RFC 822 / MIME mail into the normalised view that rules and features read.

Spam is adversarial input: broken MIME, lying charsets, base64 junk, hidden HTML text,
zero-width characters and look-alike letters are all common. ``parse`` therefore never
raises; it returns the best parse it can plus *defect flags* that are themselves strong
signals for the rules and the learned models. Only the first ``max_bytes`` bytes are
analysed, so a 50 MB message costs what a 256 KB one does.

Speed matters (the whole per-message pipeline has a budget of ~400 us). Well-formed
messages (the vast majority) are split into the *same* ``compat32`` ``Message`` tree the
stdlib feedparser would build by a small header/boundary splitter (``_fast_tree``) at a
fraction of the cost; anything it is not sure of (a defect the feedparser would record,
``message/*`` parts, lone CRs ...) goes through the stdlib ``email`` feedparser. Both paths
feed one shared part walker, so a message yields the same ``ParsedMessage`` either way.
Decoding is done here with ``binascii``; HTML is rendered with selectolax's lexbor backend.
"""

from __future__ import annotations

import binascii
import codecs
import email
import email.header
import email.message
import email.utils
import re
import unicodedata
from dataclasses import dataclass, field
from email import policy as _email_policy

import structlog
from selectolax.lexbor import LexborHTMLParser

log = structlog.get_logger(__name__)

__all__ = ["DEFAULT_MAX_BYTES", "ParsedMessage", "normalize_text", "parse"]

DEFAULT_MAX_BYTES = 262_144
_MAX_PARTS = 200  # parts walked per message; more is a defect, not a reason to spend time
_MAX_URLS = 500

# ---------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------

# Invisible / formatting characters used to split words past filters ("V\u200bIAGRA").
_INVISIBLE = (
    [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0]
    + list(range(0x200B, 0x2010))  # zero-width space/joiners, LRM, RLM
    + list(range(0x202A, 0x202F))  # bidi embeddings and overrides
    + list(range(0x2060, 0x2070))  # word joiner, invisible operators, bidi isolates
    + list(range(0xFE00, 0xFE10))  # variation selectors
    + list(range(0xE0000, 0xE0080))  # tag characters
)
_STRIP_INVISIBLE = {cp: None for cp in _INVISIBLE}
_INVISIBLE_CLASS = (
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u3164\ufeff\uffa0"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufe00-\ufe0f\U000e0000-\U000e007f]"
)  # the same set as ranges: a class of single characters is ~50x slower to search
_INVISIBLE_RE = re.compile(_INVISIBLE_CLASS)
_INVISIBLE_RUN_RE = re.compile(_INVISIBLE_CLASS + "+")


def _invisible_inside_word(text: str) -> bool:
    """A run of invisible characters with a letter on both sides ("V\u200bIAGRA")."""
    n = len(text)
    for m in _INVISIBLE_RUN_RE.finditer(text):
        a, b = m.start(), m.end()
        if a > 0 and b < n and text[a - 1].isalpha() and text[b].isalpha():
            return True
    return False

# Cyrillic / Greek / fullwidth-resistant letters that render like Latin ones. Applied only to
# words that mix Latin with these scripts (a genuine Russian or Greek word is left alone).
_CONFUSABLES: dict[str, str] = {
    # Cyrillic lower
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "һ": "h", "ɡ": "g", "ո": "n", "ս": "u",
    # Cyrillic upper
    "А": "A", "В": "B", "Е": "E", "Ё": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
    "С": "C", "Т": "T", "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ї": "I", "Ј": "J", "Ԛ": "Q",
    "Ԝ": "W", "Һ": "H",
    # Greek
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "υ": "u", "χ": "x",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    # Latin look-alikes outside ASCII that NFKC keeps
    "ı": "i", "ȷ": "j", "ℓ": "l", "ɑ": "a", "ɩ": "i", "ʏ": "y",
}
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLES)
_CONFUSABLE_CHARS = "".join(_CONFUSABLES)
# A "word" holding at least one non-ASCII letter; checked for a Latin/other-script mix.
_NONASCII_WORD_RE = re.compile(r"\w*[^\x00-\x7f]\w*")
_ASCII_LETTER_RE = re.compile(r"[A-Za-z]")
_CONFUSABLE_RE = re.compile("[" + re.escape(_CONFUSABLE_CHARS) + "]")


def normalize_text(text: str, defects: list[str] | None = None) -> str:
    """NFKC, strip invisible characters and map mixed-script look-alikes to Latin.

    ASCII text (the vast majority) returns at once. When ``defects`` is given, the
    evasions found are recorded there ("invisible_chars", "confusables").
    """
    if text.isascii():
        return text
    if _INVISIBLE_RE.search(text) is not None:
        # only invisible characters *inside* words are an evasion; a stray soft hyphen is not
        if defects is not None and "invisible_chars" not in defects and _invisible_inside_word(text):
            defects.append("invisible_chars")
        text = text.translate(_STRIP_INVISIBLE)
    text = unicodedata.normalize("NFKC", text)
    if text.isascii() or _CONFUSABLE_RE.search(text) is None:
        return text
    found = False

    def _fix(m: re.Match[str]) -> str:
        nonlocal found
        word = m.group(0)
        if _ASCII_LETTER_RE.search(word) is None:
            # no Latin letter: only a skeleton made *entirely* of look-alikes stays foreign
            return word
        if _CONFUSABLE_RE.search(word) is None:
            return word
        found = True
        return word.translate(_CONFUSABLE_TABLE)

    text = _NONASCII_WORD_RE.sub(_fix, text)
    if found and defects is not None and "confusables" not in defects:
        defects.append("confusables")
    return text


# ---------------------------------------------------------------------------------------
# The parsed view
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class ParsedMessage:
    """What the rules and the features see of one message.

    ``headers`` keeps wire order with lower-case names and decoded, normalised values;
    ``body_text`` is the visible text (HTML rendered, hidden text dropped); ``raw_body``
    is the decoded parts with HTML markup kept; ``raw`` is the analysed (capped) bytes.
    """

    headers: list[tuple[str, str]] = field(default_factory=list)
    subject: str = ""
    sender: str = ""
    body_text: str = ""
    raw_body: str = ""
    urls: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    attachments: list[tuple[str, str]] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    size: int = 0
    truncated: bool = False
    raw: bytes = b""
    content_types: list[str] = field(default_factory=list)
    html_parts: int = 0
    text_parts: int = 0

    def header(self, name: str) -> str:
        """All values of header ``name`` (case-insensitive) joined by newlines; "" if absent."""
        key = name.lower()
        return "\n".join(v for k, v in self.headers if k == key)

    def has_header(self, name: str) -> bool:
        key = name.lower()
        return any(k == key for k, _ in self.headers)


# ---------------------------------------------------------------------------------------
# Decoding helpers
# ---------------------------------------------------------------------------------------

_CHARSET_ALIASES = {
    "unknown-8bit": "cp1252",
    "x-unknown": "cp1252",
    "unknown": "cp1252",
    "default": "cp1252",
    "default_charset": "cp1252",
    "x-user-defined": "cp1252",
    "iso-8859-1": "cp1252",  # what senders mean in practice (smart quotes in 0x80-0x9f)
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "ks_c_5601-1987": "cp949",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-2022-jp": "iso2022_jp_ext",
    "windows-874": "cp874",
    "_iso-2022-jp$esc": "iso2022_jp",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    "utf8": "utf-8",
    "x-euc-tw": "big5",
    "big5-hkscs": "big5hkscs",
}
_codec_cache: dict[str, str | None] = {}
_CJK_CODECS = ("gb18030", "big5", "big5hkscs", "euc_kr", "cp949", "shift_jis", "euc_jp")


def _codec_for(charset: str | None) -> str | None:
    """Python codec name for a declared MIME charset, or None when unknown."""
    if not charset:
        return None
    cs = charset.strip().strip("\"'").lower()
    hit = _codec_cache.get(cs)
    if hit is not None or cs in _codec_cache:
        return hit
    name: str | None = _CHARSET_ALIASES.get(cs, cs)
    try:
        name = codecs.lookup(name).name  # type: ignore[arg-type]  # canonical: "euc_kr", "cp1252"
    except (LookupError, TypeError, ValueError):
        name = None
    if len(_codec_cache) < 1024:
        _codec_cache[cs] = name
    return name


def _decode_bytes(data: bytes, charset: str | None, defects: list[str]) -> str:
    """Decode text bytes. Valid UTF-8 wins whatever the label says (mislabelled UTF-8 is far
    more common than legacy text that happens to be valid UTF-8); otherwise the declared
    charset; otherwise cp1252. A charset that is unknown or does not fit is flagged."""
    codec = _codec_for(charset)
    if charset and codec is None and "bad_charset" not in defects:
        defects.append("bad_charset")  # a label no decoder knows
    if data.isascii():
        if b"\x1b" in data and codec is not None and codec.startswith("iso2022"):
            try:  # ISO-2022-JP/KR are 7-bit: escape sequences switch the character set
                return data.decode(codec)
            except (UnicodeDecodeError, LookupError, ValueError):
                pass
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if codec is not None and codec != "utf-8":
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError, ValueError):
            pass
    if charset and "bad_charset" not in defects:
        defects.append("bad_charset")
    if codec in _CJK_CODECS:  # CJK mail is often labelled with a sibling encoding
        for alt in _CJK_CODECS:
            if alt != codec:
                try:
                    return data.decode(alt)
                except (UnicodeDecodeError, LookupError):
                    continue
    if codec is not None and codec != "utf-8":
        try:
            return data.decode(codec, errors="replace")
        except (LookupError, ValueError):
            pass
    return data.decode("cp1252", errors="replace")


_B64_JUNK_RE = re.compile(rb"[^A-Za-z0-9+/=\s]")
_B64_CLEAN_RE = re.compile(rb"[^A-Za-z0-9+/]")


def _decode_base64(data: bytes, defects: list[str], truncated: bool) -> bytes:
    try:
        return binascii.a2b_base64(data, strict_mode=False)
    except (binascii.Error, ValueError):
        pass
    clean = _B64_CLEAN_RE.sub(b"", data)
    rem = len(clean) % 4
    if rem == 1:
        clean = clean[:-1]
    elif rem:
        clean += b"=" * (4 - rem)
    if not truncated and "bad_base64" not in defects:
        defects.append("bad_base64")
    try:
        return binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return b""


def _decode_transfer(data: bytes, cte: str, defects: list[str], truncated: bool) -> bytes:
    if cte == "base64":
        if _B64_JUNK_RE.search(data) is not None and "bad_base64" not in defects:
            defects.append("bad_base64")
        return _decode_base64(data, defects, truncated)
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(data)
        except (binascii.Error, ValueError):
            defects.append("bad_qp")
            return data
    return data


def _payload_bytes(part: email.message.Message) -> bytes:
    # the raw payload: get_payload() would already decode 8-bit bytes with "replace"
    payload = part._payload  # noqa: SLF001
    if isinstance(payload, bytes):
        return payload
    if not isinstance(payload, str):
        return b""
    try:
        return payload.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return payload.encode("utf-8", "surrogateescape")


_ENCODED_WORD_RE = re.compile(r"=\?[^?\s]+\?[bBqQ]\?")
_FOLD_RE = re.compile(r"\r?\n[ \t]*")


def _header_value(value: object, defects: list[str], hint: str | None = None) -> str:
    """Unfold, decode RFC 2047 words and raw 8-bit bytes (in the body's charset, ``hint``,
    when they are not UTF-8), normalise."""
    if isinstance(value, email.header.Header):
        try:
            return normalize_text(str(value), defects)
        except Exception:  # noqa: BLE001 - a broken header is a defect, not a crash
            value = value.encode()
    s = value if isinstance(value, str) else str(value)
    if "\n" in s:
        s = _FOLD_RE.sub(" ", s)
    if not s.isascii():
        # compat32 keeps undecodable header bytes as surrogate escapes
        raw = s.encode("utf-8", "surrogateescape")
        s = _decode_bytes(raw, hint, [])
    elif "\x1b" in s:
        try:  # raw ISO-2022-JP (7-bit escape sequences) without encoded words
            s = s.encode("ascii").decode("iso2022_jp_ext")
        except (UnicodeError, LookupError):
            pass
    if "=?" in s and _ENCODED_WORD_RE.search(s) is not None:
        s = _decode_encoded_words(s, defects)
    if not s.isascii():
        s = normalize_text(s, defects)
    return s.strip()


def _decode_encoded_words(s: str, defects: list[str]) -> str:
    try:
        chunks = email.header.decode_header(s)
    except Exception:  # noqa: BLE001
        defects.append("bad_encoded_word")
        return s
    out: list[str] = []
    for chunk, cs in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(_decode_bytes(chunk, cs or "utf-8", defects))
    # decode_header drops the whitespace between an encoded word and plain text; keep it
    return "".join(out) if len(out) < 2 else _join_decoded(chunks, out)


def _join_decoded(chunks: list[tuple[bytes | str, str | None]], out: list[str]) -> str:
    res = []
    prev_encoded = False
    for (_, cs), text in zip(chunks, out, strict=True):
        encoded = cs is not None
        if res and not (encoded and prev_encoded) and not res[-1].endswith(" ") and not text.startswith(" "):
            res.append(" ")
        res.append(text)
        prev_encoded = encoded
    return "".join(res)


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------

_BLOCK_TAG_RE = re.compile(
    r"<(?=/?(?:br|p|div|tr|td|th|li|ul|ol|table|h[1-6]|hr|blockquote|pre|title|center|dd|dt|section|article)\b)",
    re.IGNORECASE,
)
_HIDDEN_STYLE_RE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*(?:0|[01](?:\.\d+)?\s*(?:px|pt)|0*\.\d+\s*(?:em|rem))\b"
    r"|(?:^|;|\s)(?:max-)?(?:height|width)\s*:\s*0(?:px)?\s*(?:;|$)|opacity\s*:\s*0(?:\.0+)?\s*(?:;|$)",
    re.IGNORECASE,
)
_WHITE_RE = re.compile(r"^\s*(?:#?f{3}(?:f{3})?|white|rgb\(\s*255\s*,\s*255\s*,\s*255\s*\))\s*$", re.IGNORECASE)
_STYLE_COLOR_RE = re.compile(r"(?:^|;|\s)color\s*:\s*([^;]+)", re.IGNORECASE)
# Runs of blanks that need rewriting to one space: a single plain space (the common case) is
# left alone instead of being matched and replaced by itself.
_WS_RUN_RE = re.compile(r" [ \t\r\f\v\xa0]+|[\t\r\f\v\xa0][ \t\r\f\v\xa0]*")
_NL_SPLIT_RE = re.compile(r"\n\s*")


def _is_white(color: str | None) -> bool:
    return bool(color) and _WHITE_RE.match(color) is not None  # type: ignore[arg-type]


def html_to_text(html: str, defects: list[str]) -> str:
    """Visible text of an HTML part: no script/style/comments, no hidden elements."""
    if "<" not in html:
        return html
    marked = _BLOCK_TAG_RE.sub("\n<", html)
    try:
        tree = LexborHTMLParser(marked)
    except Exception:  # noqa: BLE001
        defects.append("bad_html")
        return html
    tree.strip_tags(["script", "style", "noscript", "template", "object", "applet", "head"])
    hidden = 0
    lowered_has = "style" in html or "hidden" in html or "color" in html or "STYLE" in html or "COLOR" in html
    for node in tree.css("[style], [hidden], font[color]") if lowered_has else ():
        attrs = node.attributes
        style = attrs.get("style") or ""
        if "hidden" in attrs or (style and _HIDDEN_STYLE_RE.search(style) is not None):
            hidden += 1
            node.decompose()
            continue
        color = attrs.get("color")
        if color is None and style:
            m = _STYLE_COLOR_RE.search(style)
            color = m.group(1) if m else None
        if _is_white(color):
            body = tree.body
            bg = (body.attributes.get("bgcolor") if body is not None else None) or ""
            if not bg or _is_white(bg):
                hidden += 1
                node.decompose()
    if hidden and "hidden_text" not in defects:
        defects.append("hidden_text")
    root = tree.body or tree.root
    text = root.text(separator="") if root is not None else ""
    title = tree.css_first("title") if ("<title" in html or "<TITLE" in html or "<Title" in html) else None
    if title is not None:
        text = title.text() + "\n" + text
    text = _WS_RUN_RE.sub(" ", text)
    return _collapse_lines(text)


def _collapse_lines(text: str) -> str:
    """``re.sub(r"\s*\n\s*", "\n", text).strip()``: one newline between non-blank lines,
    no blanks around it. Splitting is ~3x faster than that substitution (every newline
    matched) on rendered HTML."""
    return "\n".join([seg for seg in [s.rstrip() for s in _NL_SPLIT_RE.split(text)] if seg]).strip()


# ---------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------

# The leading character class lets the regex engine skip quickly to candidate letters; the
# look-behinds then check the scheme. Far faster than an alternation on this hot path.
_URL_RE = re.compile(
    r"""[hHfFwW](?<![\w.][hHfFwW])(?:(?<=[hH])[tT][tT][pP][sS]?://|(?<=[fF])[tT][pP]://|(?<=[wW])[wW][wW]\d?\.)"""
    r"""[^\s<>"'()\[\]{}\\^`|]+"""
)
_HOST_RE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?/*(?:[^@/?#]*@)?([^/?#:\s]+)", re.IGNORECASE)
_TRAILING_PUNCT = ".,;:!?)'\"]>"


_URL_TAIL_RE = re.compile(r"""[^\s<>"'()\[\]{}\\^`|]+""")
_SCHEMES = ("https", "http", "ftp")


def _find_urls(text: str) -> list[str]:
    """URLs in document order. Literal searches for "://" and "www." (C speed) and an
    anchored match at each hit: several times faster than one regex over the text."""
    found: list[tuple[int, int]] = []
    i = text.find("://")
    while i != -1 and len(found) < _MAX_URLS:
        head = text[max(0, i - 5) : i].lower()
        for sch in _SCHEMES:
            if head.endswith(sch):
                begin = i - len(sch)
                m = _URL_TAIL_RE.match(text, i + 3)
                if m is not None:
                    found.append((begin, m.end()))
                break
        i = text.find("://", i + 3)
    for needle in ("www", "WWW", "Www"):
        i = text.find(needle)
        while i != -1 and len(found) < _MAX_URLS:
            j = i + 3
            if j < len(text) and text[j].isdigit():
                j += 1
            prev = text[i - 1] if i else " "
            if j + 1 < len(text) and text[j] == "." and text[j + 1].isalnum() and not (prev.isalnum() or prev in "./@-_"):
                m = _URL_TAIL_RE.match(text, i)
                if m is not None:
                    found.append((i, m.end()))
            i = text.find(needle, i + 3)
    if not found:
        return []
    found.sort()
    urls: list[str] = []
    seen: set[str] = set()
    last_end = -1
    for a, b in found:
        if a < last_end:
            continue  # a www. inside an http:// URL already taken
        last_end = b
        url = text[a:b].rstrip(_TRAILING_PUNCT)
        if url not in seen:
            seen.add(url)
            urls.append(url)
    return urls


def _extract_urls(text: str) -> tuple[list[str], list[str]]:
    urls = _find_urls(text)
    domains: list[str] = []
    seen_d: set[str] = set()
    for url in urls:
        hm = _HOST_RE.match(url)
        if hm is None:
            continue
        host = hm.group(1).lower().strip(".")
        if host.startswith("www") is False and "." not in host:
            continue
        if host and host not in seen_d:
            seen_d.add(host)
            domains.append(host)
    return urls, domains


# ---------------------------------------------------------------------------------------
# parse
# ---------------------------------------------------------------------------------------

_CHARSET_PARAM_RE = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_CHARSET_BYTES_RE = re.compile(rb"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_HEADER_LINE_RE = re.compile(rb"^[!-9;-~]+[ \t]*:")


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
        except Exception:  # noqa: BLE001
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

    msg = _fast_tree(data_hdr) if fast else None
    if msg is None:
        msg = email.message_from_bytes(data_hdr, policy=_email_policy.compat32)

    hint = None
    ct0 = next((v for k, v in msg._headers if k.lower() == "content-type"), None)  # noqa: SLF001
    if ct0.__class__ is not str or not ct0.isascii():  # type: ignore[union-attr]
        ct0 = msg.get("content-type")  # compat32's own view of 8-bit or odd values
    m = _CHARSET_PARAM_RE.search(str(ct0 or ""))
    if m is not None:
        hint = m.group(1)
    elif b"charset=" in data:  # data is already capped: no copy of it
        m2 = _CHARSET_BYTES_RE.search(data)
        hint = m2.group(1).decode("ascii") if m2 else None
    headers: list[tuple[str, str]] = []
    for name, value in msg._headers:  # noqa: SLF001 - wire order, raw values, no policy cost
        if (
            value.__class__ is str
            and value.isascii()
            and "\n" not in value
            and "=?" not in value
            and "\x1b" not in value
        ):
            headers.append((name.strip().lower(), value.strip()))  # plain ASCII: nothing to decode
        else:
            headers.append((name.strip().lower(), _header_value(value, defects, hint)))
    if not headers and "missing_headers" not in defects:
        defects.append("missing_headers")

    pm = ParsedMessage(headers=headers, size=size, truncated=truncated, raw=data, defects=defects)
    for k, v in headers:
        if k == "subject" and not pm.subject:
            pm.subject = v
        elif k == "from" and not pm.sender:
            pm.sender = _sender_address(v)

    texts: list[str] = []
    raws: list[str] = []
    n = 0
    for part in msg.walk():
        n += 1
        if n > _MAX_PARTS:
            defects.append("too_many_parts")
            break
        for d in part.defects:
            flag = "mime_defect:" + type(d).__name__.removesuffix("Defect")
            if flag not in defects:
                defects.append(flag)
        # one pass over the part's headers instead of Message.get()'s scan per lookup
        phdr: dict[str, str] = {}
        for hk, hv in part._headers:  # noqa: SLF001
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
        filename = _safe_filename(part, defects) if ("name" in ct_raw or "name" in disp_raw) else ""
        disp = disp_raw.split(";", 1)[0].strip().lower()
        maintype = ctype.split("/", 1)[0]
        is_attachment = bool(filename) or disp == "attachment"
        if is_attachment:
            pm.attachments.append((filename or "", ctype))
        if maintype == "message" or (maintype != "text" and is_attachment):
            continue
        if maintype != "text" and not (maintype == "application" and ctype.endswith(("/html", "/xhtml+xml"))):
            # non-text inline part (image, application/octet-stream ...): not read as text
            if ctype not in ("application/octet-stream",) or is_attachment:
                continue
        if is_attachment and ctype not in ("text/plain", "text/html"):
            continue
        cte = phdr.get("content-transfer-encoding", "").strip().lower()
        payload = _decode_transfer(_payload_bytes(part), cte, defects, truncated)
        if cte == "base64" and "base64_text" not in defects:
            defects.append("base64_text")
        cm = _CHARSET_PARAM_RE.search(ct_raw)
        text = _decode_bytes(payload, cm.group(1) if cm else None, defects)
        raws.append(text)
        if ctype.endswith("html") or (ctype == "text/plain" and _looks_like_html(text)):
            pm.html_parts += 1
            texts.append(normalize_text(html_to_text(text, defects), defects))
        else:
            pm.text_parts += 1
            texts.append(normalize_text(text, defects))

    pm.raw_body = "\n".join(raws)
    pm.body_text = "\n".join(t for t in texts if t)
    if not pm.body_text.strip():
        defects.append("no_text")
    pm.urls, pm.domains = _extract_urls(pm.raw_body)
    return pm


# "addr@host", "<addr@host>", "Name <addr@host>", '"Name" <addr@host>' with a plain dot-atom
# address and a display name free of RFC 5322 specials: what email.utils.parseaddr returns
# for these is the address itself, so the (slow, pure-Python) tokenizer is skipped.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_ADDR = _ATEXT + r"(?:\." + _ATEXT + r")*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_FROM_RE = re.compile(
    r"""(?:"[^"\\\r\n]*"|[^"()<>@,;:\\\[\]\r\n]*)[ \t]*<(""" + _DOT_ATOM_ADDR + r")>|(" + _DOT_ATOM_ADDR + ")"
)


def _sender_address(value: str) -> str:
    """The lower-case From address (``parseaddr``'s), or the whole value when none parses."""
    m = _SIMPLE_FROM_RE.fullmatch(value)
    if m is not None:
        return (m.group(1) or m.group(2)).lower()
    return email.utils.parseaddr(value)[1].lower() or value.lower()


_HTML_SNIFF_RE = re.compile(r"<(?:html|body|table|font|a\s+href|div|p)\b", re.IGNORECASE)


def _looks_like_html(text: str) -> bool:
    return _HTML_SNIFF_RE.search(text, 0, 4096) is not None


def _safe_filename(part: email.message.Message, defects: list[str]) -> str:
    try:
        name = part.get_filename()
    except Exception:  # noqa: BLE001
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
    msg._headers = headers  # noqa: SLF001 - what the feedparser's set_raw builds
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
        msg._payload = payload  # noqa: SLF001
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
    for (_, prev_end, _), (next_start, _, _) in zip(lines, lines[1:]):
        if next_start <= prev_end:
            return None  # doubled boundary lines: the feedparser merges them
        sub = _fast_part(text, prev_end, next_start, inner, budget, top=False)
        if sub is None:
            return None
        parts.append(sub)
    msg._payload = parts  # noqa: SLF001
    return msg
