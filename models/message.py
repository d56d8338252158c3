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
import contextlib
import email
import email.base64mime
import email.errors
import email.header
import email.message
import email.quoprimime
import email.utils
import html as html_lib
import itertools
import re
import unicodedata
from dataclasses import dataclass, field
from email import policy as _email_policy

import structlog
from selectolax.lexbor import LexborHTMLParser

log = structlog.get_logger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ParsedMessage",
    "authentication_results",
    "configure_trusted_authserv_ids",
    "normalize_text",
    "parse",
]

DEFAULT_MAX_BYTES = 262_144

# Caps. Real mail stays far below each of them (the public corpus's largest figure is in brackets); a
# message that reaches one is cut back *before* the step whose cost it would blow up, and the cap is
# recorded as a defect ("<what>_capped"): hostile structure is itself evidence for the rules and models.
_MAX_PARTS = 200  # parts walked per message; more: "too_many_parts"
_PARTS_BASE, _BYTES_PER_PART = 16, 512  # ... and no more than this many for a message's size [4 in 2 KB]
_MAX_URLS = 500  # URLs kept [500]; more: "urls_capped"
_MAX_MIME_DECLS = 16  # multipart/ and message/ Content-Types [4]: bounds the nesting depth
_MAX_BOUNDARY_LINES = 256  # lines starting "--": bounds the parts either MIME parser builds
_BOUNDARY_LINES_BASE = 32  # ... and no more than 32 + one per 512 bytes [16 in 5.6 KB]
_MAX_MIME_CT_CHARS = 1024  # a multipart/ or message/ Content-Type value [127]: the stdlib's parameter
#                            parser is quadratic in it, and both MIME parsers call it for a boundary
_MAX_STDLIB_WORK = 16_384  # lines x (1 + declarations) the stdlib feedparser is given [6,888]: it spends
#                            a Python step per line and per open multipart on every line
_MAX_HEADERS = 1000  # header fields kept [125]
_MAX_HEADER_CHARS = 32_768  # characters of one header value kept [14,286]
_MAX_ADDRESS_CHARS = 1024  # of a From value handed to the address parser (pure Python) [144]
_MAX_PARAM_CHARS = 4096  # a part's Content-Type/-Disposition read for a file name (quadratic parser)
_MAX_ENCODED_WORDS = 256  # RFC 2047 words decoded in one header value [54 in a whole message] ...
_ENCODED_WORDS_BASE, _BYTES_PER_ENCODED_WORD = 256, 128  # ... and in a message: 256 + one per 128 bytes

# ---------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------

# Invisible / formatting characters used to split words past filters ("V\u200bIAGRA").
_INVISIBLE = [
    0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0,
    *range(0x200B, 0x2010),  # zero-width space/joiners, LRM, RLM
    *range(0x202A, 0x202F),  # bidi embeddings and overrides
    *range(0x2060, 0x2070),  # word joiner, invisible operators, bidi isolates
    *range(0xFE00, 0xFE10),  # variation selectors
    *range(0xE0000, 0xE0080),  # tag characters
]
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
# The same mapping as a list indexed by code point (the BMP; others stay as they are): str.translate
# looks a list up about three times faster than a dict, and words can be a whole message long.
_CONFUSABLE_LIST: list[int] = list(range(0x10000))
for _src, _dst in _CONFUSABLES.items():
    _CONFUSABLE_LIST[ord(_src)] = ord(_dst)
_CONFUSABLE_CHARS = "".join(_CONFUSABLES)
_CONFUSABLE_RE = re.compile("[" + re.escape(_CONFUSABLE_CHARS) + "]")
# A word (a maximal run of word characters) that mixes an ASCII letter with a look-alike: the lookbehind lets a
# match start only where a word starts, and each lookahead scans that one word, so every word is read a fixed
# number of times (an unanchored ``\w*`` pattern restarts inside a word run and costs the square of its length;
# a 195 KB run took minutes). The one capture group makes ``split`` hand back the words between the rest.
_MIXED_WORD_RE = re.compile(r"((?<!\w)(?=\w*[A-Za-z])(?=\w*[" + re.escape(_CONFUSABLE_CHARS) + r"])\w+)")


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
        text = _INVISIBLE_RUN_RE.sub("", text)  # a dict-table translate costs ~100 ns for every character
    text = unicodedata.normalize("NFKC", text)
    if text.isascii() or _CONFUSABLE_RE.search(text) is None:
        return text
    # A word without a Latin letter (a genuine Russian or Greek word) stays as it is. The mixed words are mapped
    # in one call: joined by NUL (never a word character), translated and split again, so a message of ten
    # thousand look-alike words costs a few C passes, not a Python step per word.
    parts = _MIXED_WORD_RE.split(text)
    if len(parts) == 1:
        return text
    parts[1::2] = "\0".join(parts[1::2]).translate(_CONFUSABLE_LIST).split("\0")
    if defects is not None and "confusables" not in defects:
        defects.append("confusables")
    return "".join(parts)


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
    auth: list[str] = field(default_factory=list)  # "spf=fail", "dkim=pass", ...: trusted headers only

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
    name: str | None
    try:
        name = codecs.lookup(_CHARSET_ALIASES.get(cs, cs)).name  # canonical: "euc_kr", "cp1252"
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
    payload = part._payload  # type: ignore[attr-defined]  # typeshed omits Message._payload
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


def _header_value(value: object, defects: list[str], hint: str | None = None, words: list[int] | None = None) -> str:
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
        with contextlib.suppress(UnicodeError, LookupError):  # raw ISO-2022-JP (7-bit escapes), no encoded words
            s = s.encode("ascii").decode("iso2022_jp_ext")
    if "=?" in s and _ENCODED_WORD_RE.search(s) is not None:
        s = _decode_encoded_words(s, defects, words)
    if not s.isascii():
        s = normalize_text(s, defects)
    return s.strip()


def _encoded_words(s: str, limit: int = -1) -> list[tuple[int, int, str, str, str]]:
    """(start, end, charset, encoding, encoded text) of each match of the stdlib's encoded-word regex
    (``email.header.ecre``: ``=?charset?q|b?text?=``, charset up to the first "?", text up to the first
    "?=" on its line), leftmost first, in linear time: that regex rescans the rest of the line from
    every "=?" that is never closed. The next "?" and the next "?=" and line end are found once per
    position and reused while the candidates move right. At most ``limit`` matches when it is not -1."""
    out: list[tuple[int, int, str, str, str]] = []
    q_at = close_at = nl_at = -2  # cached results of find() from a position not after the current one
    p = s.find("=?")
    while p != -1:
        if q_at < p + 2:
            q_at = s.find("?", p + 2)
            if q_at == -1:
                break  # no "?" after this point: no later candidate can match either
        q = q_at
        if q + 2 < len(s) and s[q + 1] in "qQbB" and s[q + 2] == "?":
            e = q + 3
            if close_at != -1 and close_at < e:
                close_at = s.find("?=", e)
            if nl_at != -1 and nl_at < e:
                nl_at = s.find("\n", e)
            if close_at == -1:
                break  # never closed: neither is any later candidate
            if nl_at == -1 or close_at < nl_at:
                out.append((p, close_at + 2, s[p + 2 : q], s[q + 1], s[e:close_at]))
                if len(out) == limit:
                    break
                p = s.find("=?", close_at + 2)
                continue
        p = s.find("=?", p + 1)
    return out


def _decode_header(
    header: str, found: list[tuple[int, int, str, str, str]] | None = None
) -> list[tuple[bytes | str, str | None]]:
    """``email.header.decode_header(header)`` for a string, in linear time: the same chunks, through the
    linear encoded-word scan above and list joins (the stdlib concatenates bytes word by word). ``found``:
    the scan of ``header``, when the caller has it."""
    if found is None:
        found = _encoded_words(header)
    if not found:
        return [(header, None)]
    lines = header.splitlines()
    words: list[tuple[str, str | None, str | None]] = []
    for line in lines:
        pos = 0
        first = True
        # one line (the common case): the scan of the whole header is this line's
        for a, b, charset, encoding, encoded in found if len(lines) == 1 and len(line) == len(header) else _encoded_words(line):
            unencoded = line[pos:a]
            if first:
                unencoded = unencoded.lstrip()
                first = False
            if unencoded:
                words.append((unencoded, None, None))
            words.append((encoded, encoding.lower(), charset.lower()))
            pos = b
        unencoded = line[pos:]
        if first:
            unencoded = unencoded.lstrip()
        if unencoded:
            words.append((unencoded, None, None))
    # whitespace between two encoded words goes
    drop = {n - 1 for n, w in enumerate(words) if n > 1 and w[1] and words[n - 2][1] and words[n - 1][0].isspace()}
    if drop:
        words = [w for n, w in enumerate(words) if n not in drop]
    collapsed: list[tuple[bytes | str, str | None]] = []
    run: list[bytes] = []
    run_charset: str | None = None
    for encoded_string, word_encoding, word_charset in words:
        if word_encoding is None:
            word: str | bytes = encoded_string
        elif word_encoding == "q":  # email.quoprimime.header_decode, without its per-call pattern lookup
            word = encoded_string.replace("_", " ")
            if "=" in word:
                word = _QP_HEADER_ESC_RE.sub(_qp_unquote, word)
        else:
            pad = len(encoded_string) % 4  # Postel's law: add the missing padding
            if pad:
                encoded_string += "==="[: 4 - pad]
            try:  # email.base64mime.decode
                word = binascii.a2b_base64(encoded_string.encode("raw-unicode-escape"))
            except binascii.Error as exc:
                raise email.errors.HeaderParseError("Base64 decoding error") from exc
        if isinstance(word, str):
            word = bytes(word, "raw-unicode-escape")
        if run and word_charset != run_charset:
            collapsed.append(((b" " if run_charset is None else b"").join(run), run_charset))
            run = []
        run.append(word)
        run_charset = word_charset
    collapsed.append(((b" " if run_charset is None else b"").join(run), run_charset))
    return collapsed


_QP_HEADER_ESC_RE = re.compile(r"=[a-fA-F0-9]{2}", re.ASCII)


def _qp_unquote(m: re.Match[str]) -> str:
    return chr(int(m.group(0)[1:], 16))


def _decode_encoded_words(s: str, defects: list[str], words: list[int] | None = None) -> str:
    """The header value with its RFC 2047 encoded words decoded. Each word costs a decode of its own, so a
    value decodes at most ``_MAX_ENCODED_WORDS`` of them and a message at most ``words[0]`` (what is left of
    its budget); the rest of the value stays as it is ("encoded_words_capped")."""
    tail = ""
    limit = _MAX_ENCODED_WORDS if words is None else max(0, min(_MAX_ENCODED_WORDS, words[0]))
    found = _encoded_words(s, limit + 1)
    if len(found) > limit:
        if "encoded_words_capped" not in defects:
            defects.append("encoded_words_capped")
        if not limit:
            return s
        found = found[:limit]
        cut = found[-1][1]
        s, tail = s[:cut], s[cut:]
    if words is not None:
        words[0] -= len(found)
    try:
        chunks = _decode_header(s, found if not tail else None)
    except Exception:  # noqa: BLE001 - a broken encoded word is a defect, not a crash
        defects.append("bad_encoded_word")
        return s + tail
    if tail:
        chunks.append((tail, None))
    out: list[str] = []
    for chunk, cs in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(_decode_bytes(chunk, cs or "utf-8", defects))
    # decode_header drops the whitespace between an encoded word and plain text; keep it
    return "".join(out) if len(out) < 2 else _join_decoded(chunks, out)


def _join_decoded(chunks: list[tuple[bytes | str, str | None]], out: list[str]) -> str:
    res: list[str] = []
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

# (The first-letter class rejects a "<" that starts no block tag before the alternation is tried: a run of
# "<" costs a sixth of what it did.)
_BLOCK_TAG_RE = re.compile(
    r"<(?=/?[abcdhlopstu])(?=/?(?:br|p|div|tr|td|th|li|ul|ol|table|h[1-6]|hr|blockquote|pre|title|center|dd|dt|section|article)\b)",
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
    return color is not None and _WHITE_RE.match(color) is not None


# The HTML parser's cost grows with the depth of the open elements at each tag (lexbor checks element
# scopes by walking that stack: 16,000 nested <div> cost 0.7 s), and every element with a style is then
# looked at in Python. So each message has a budget of parser work in proportion to its size: an estimate
# of the summed depth at each tag, and a number of tags. A part whose tag count squared fits the budget is
# charged that worst case without a scan; a larger one is scanned tag by tag, and what lies past the
# budget is rendered by a linear tag stripper ("html_capped"). [The corpus's largest: 27,343 units of
# work, 0.92 a byte; 2,299 tags, one per 17 bytes.]
_HTML_WORK_BASE, _HTML_WORK_PER_BYTE = 65_536, 8
_HTML_TAGS_BASE, _HTML_BYTES_PER_TAG = 1024, 16
_TAG_SCAN_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)")
# elements that never stay open in a parse (void) or that the next sibling closes: no depth
_FLAT_ELEMENTS = frozenset(
    ["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr", "p", "li", "td", "th", "tr", "option", "dt", "dd"]
)
_ANY_TAG_RE = re.compile(r"<[^<>]*>")


class HtmlBudget:
    """HTML parser work left to the parts of one message of ``size`` analysed bytes (see above)."""

    __slots__ = ("tags", "work")

    def __init__(self, size: int) -> None:
        self.work = _HTML_WORK_BASE + _HTML_WORK_PER_BYTE * size
        self.tags = _HTML_TAGS_BASE + size // _HTML_BYTES_PER_TAG


def _html_cut(html: str, budget: HtmlBudget) -> int:
    """How much of ``html`` the parser may take within ``budget`` (charged for it): all of it, or the
    offset of the first tag past the budget."""
    n_lt = html.count("<")
    if n_lt * n_lt <= budget.work and n_lt <= budget.tags:
        budget.work -= n_lt * n_lt
        budget.tags -= n_lt
        return len(html)
    depth = 0
    work, tags = budget.work, budget.tags
    cut = len(html)
    for m in _TAG_SCAN_RE.finditer(html):
        tags -= 1
        close, name = m.groups()
        if close:
            depth = depth - 1 if depth else 0
        elif name.lower() not in _FLAT_ELEMENTS:
            depth += 1
        work -= depth + 1
        if tags < 0 or work < 0:
            cut = m.start()
            break
    budget.work, budget.tags = max(0, work), max(0, tags)
    return cut


def _strip_markup(html: str) -> str:
    """Text of HTML by a linear tag stripper (what lies past the parser's budget): block tags become line
    breaks, other tags go, entities are decoded. No hidden-text detection."""
    return html_lib.unescape(_ANY_TAG_RE.sub("", _BLOCK_TAG_RE.sub("\n<", html)))


def html_to_text(html: str, defects: list[str], budget: HtmlBudget | None = None) -> str:
    """Visible text of an HTML part: no script/style/comments, no hidden elements.

    ``budget`` (one per message) bounds the HTML parser's work; without one the part gets a fresh one."""
    if "<" not in html:
        return html
    cut = _html_cut(html, budget if budget is not None else HtmlBudget(len(html)))
    rest = ""
    if cut < len(html):
        if "html_capped" not in defects:
            defects.append("html_capped")
        html, rest = html[:cut], _strip_markup(html[cut:])
    marked = _BLOCK_TAG_RE.sub("\n<", html)
    try:
        tree = LexborHTMLParser(marked)
    except Exception:  # noqa: BLE001 - markup the parser refuses is a defect, not a crash
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
    if rest:
        text += "\n" + rest
    text = _WS_RUN_RE.sub(" ", text)
    return _collapse_lines(text)


def _collapse_lines(text: str) -> str:
    """``re.sub(r"\\s*\n\\s*", "\n", text).strip()``: one newline between non-blank lines,
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


def _find_urls(text: str) -> tuple[list[str], bool]:
    """URLs in document order, and whether ``_MAX_URLS`` stopped the search. Literal searches for
    "://" and "www." (C speed) and an anchored match at each hit: several times faster than one regex
    over the text. The next search starts after the URL just found: a hit inside it would start a URL
    that overlaps it (dropped below), and rescanning the rest of a long run of URL characters from every
    such hit made a run of glued URLs cost the square of its length."""
    found: list[tuple[int, int]] = []
    i = text.find("://")
    while i != -1 and len(found) < _MAX_URLS:
        head = text[max(0, i - 5) : i].lower()
        nxt = i + 3
        for sch in _SCHEMES:
            if head.endswith(sch):
                begin = i - len(sch)
                m = _URL_TAIL_RE.match(text, i + 3)
                if m is not None:
                    found.append((begin, m.end()))
                    nxt = m.end()
                break
        i = text.find("://", nxt)
    for needle in ("www", "WWW", "Www"):
        i = text.find(needle)
        while i != -1 and len(found) < _MAX_URLS:
            j = i + 3
            nxt = j
            if j < len(text) and text[j].isdigit():
                j += 1
            prev = text[i - 1] if i else " "
            if j + 1 < len(text) and text[j] == "." and text[j + 1].isalnum() and not (prev.isalnum() or prev in "./@-_"):
                m = _URL_TAIL_RE.match(text, i)
                if m is not None:
                    found.append((i, m.end()))
                    nxt = m.end()
            i = text.find(needle, nxt)
    capped = len(found) >= _MAX_URLS
    if not found:
        return [], capped
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
    return urls, capped


def _extract_urls(text: str, defects: list[str] | None = None) -> tuple[list[str], list[str]]:
    urls, capped = _find_urls(text)
    if capped and defects is not None and "urls_capped" not in defects:
        defects.append("urls_capped")
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
    if _TRUSTED_AUTHSERV_IDS:
        pm.auth = authentication_results(headers, _TRUSTED_AUTHSERV_IDS, defects)
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


# ---------------------------------------------------------------------------------------
# Authentication results (RFC 8601 Authentication-Results, RFC 7208 Received-SPF)
# ---------------------------------------------------------------------------------------

# Anyone can write these headers into a message; only those the operator's own receiving hosts added are evidence.
# A header counts when its authserv-id (Authentication-Results) or its receiver= (Received-SPF) is one of the
# trusted ids; the receiving MTA is expected to remove headers claiming its own id on arrival (RFC 8601 section 5,
# what OpenDKIM, OpenDMARC and Postfix's milters do). Empty (the default): no header is trusted.
_TRUSTED_AUTHSERV_IDS: frozenset[str] = frozenset()
_AUTH_METHODS = ("spf", "dkim", "dmarc")
_AUTH_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"})
_MAX_AUTH_HEADERS = 8  # Authentication-Results / Received-SPF headers read [real mail: 1-3]
_MAX_AUTH_CHARS = 2048  # characters of one such header read [real mail: a few hundred]
_MAX_AUTH_RESINFOS = 32  # "method=result" clauses read in one header
_MAX_AUTH_SPECIALS = 64  # ( ) " ; and backslashes in one header [real mail: under 30]; more: not read, a defect


def configure_trusted_authserv_ids(ids: list[str] | tuple[str, ...] | frozenset[str]) -> None:
    """Set which authserv-ids ``parse`` trusts (the process's settings, once at start; lower-cased)."""
    global _TRUSTED_AUTHSERV_IDS
    _TRUSTED_AUTHSERV_IDS = frozenset(i.strip().lower() for i in ids if i.strip())


_AUTH_SPECIALS_RE = re.compile(r'[()";\\]')


def _clauses(value: str) -> list[str] | None:
    """``value`` split at the semicolons outside comments and quoted strings, comments removed; None when it
    has more than ``_MAX_AUTH_SPECIALS`` special characters. One pass that steps only over the special characters
    (found by a C scan; nesting counted, never recursed), so the cost is linear in the (capped) value; a value
    without comments or quotes (most) is split at once."""
    if "(" not in value and '"' not in value and "\\" not in value:
        return value.split(";", _MAX_AUTH_RESINFOS + 1)
    if sum(value.count(c) for c in '()";\\') > _MAX_AUTH_SPECIALS:
        return None
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    quoted = False
    pos = 0  # start of the text not yet copied (or skipped)
    skip_next = -1  # index of a character escaped by a backslash
    for m in _AUTH_SPECIALS_RE.finditer(value):
        i = m.start()
        if i == skip_next:
            continue
        ch = value[i]
        if ch == "\\":
            if quoted or depth:
                skip_next = i + 1
            continue
        if quoted:
            if ch == '"':
                quoted = False
            continue
        if ch == '"' and not depth:
            quoted = True
        elif ch == "(":
            if not depth:
                cur.append(value[pos:i])
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if not depth:
                pos = i + 1
        elif ch == ";" and not depth:
            cur.append(value[pos:i])
            out.append("".join(cur))
            cur = []
            pos = i + 1
            if len(out) > _MAX_AUTH_RESINFOS:
                return out
    if not depth:
        cur.append(value[pos:])
    out.append("".join(cur))
    return out


def authentication_results(
    headers: list[tuple[str, str]], trusted: frozenset[str], defects: list[str] | None = None
) -> list[str]:
    """The SPF, DKIM and DMARC outcomes the trusted receiving hosts recorded, as ``"method=result"`` (sorted).

    Authentication-Results headers whose authserv-id is in ``trusted`` are read, the topmost (the last added)
    first: per method the first result counts, except DKIM, which passes when any signature passed (a message
    may carry several). Received-SPF (its result word, trusted when its ``receiver=`` is) fills in SPF when no
    Authentication-Results gave one. Work is bounded: at most ``_MAX_AUTH_HEADERS`` headers of
    ``_MAX_AUTH_CHARS`` characters each, each scanned once; a header past a cap is left out ("auth_capped")."""
    found: dict[str, str] = {}
    spf_header: str | None = None
    seen = 0
    for name, value in headers:
        if name != "authentication-results" and name != "received-spf":
            continue
        seen += 1
        if seen > _MAX_AUTH_HEADERS:
            if defects is not None and "auth_capped" not in defects:
                defects.append("auth_capped")
            break
        value = value[:_MAX_AUTH_CHARS].lower()
        if name == "authentication-results":
            ident = value.lstrip().split(";", 1)[0].split("(", 1)[0].split(None, 1)
            if not ident or ident[0] not in trusted:
                continue  # not the operator's host: not read further
        parts = _clauses(value)
        if parts is None:
            if defects is not None and "auth_capped" not in defects:
                defects.append("auth_capped")
            continue
        if name == "received-spf":
            if spf_header is None and "spf" not in found:
                words = parts[0].split()
                result = words[0] if words else ""
                receiver = ""
                for clause in parts:
                    for kv in clause.split():
                        if kv.startswith("receiver="):
                            receiver = kv[9:].strip('"')
                if result in _AUTH_RESULTS and receiver in trusted:
                    spf_header = result
            continue
        for clause in parts[1:]:
            words = clause.split()
            if not words:
                continue
            method, _, result = words[0].partition("=")
            method = method.partition("/")[0]
            if method not in _AUTH_METHODS or result not in _AUTH_RESULTS:
                continue
            prev = found.get(method)
            if prev is None or (method == "dkim" and result == "pass"):
                found[method] = result
    if "spf" not in found and spf_header is not None:
        found["spf"] = spf_header
    return sorted(f"{m}={r}" for m, r in found.items())
