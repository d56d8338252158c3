"""Decoding helpers: declared (and lying) charsets, transfer encodings (base64 junk included), header values and
their RFC 2047 encoded words. Done here with ``binascii`` and ``codecs``; what cannot be decoded cleanly is a defect.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import email.base64mime
import email.errors
import email.header
import email.message
import email.quoprimime
import re

from models.message.normalize import normalize_text
from models.message.view import _MAX_ENCODED_WORDS

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
