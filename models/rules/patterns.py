"""A rule's pattern: the ``/regex/flags`` forms, a non-meta rule reduced to its target and regex (``_Spec``), the
``re`` form every pattern is validated by, and the engines that run what hyperscan will not take in bounded time (RE2,
and a backtracking engine under the per-message time budget).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import hyperscan
import re2
import regex as _bt_re

from models.rules.model import KINDS, Rule, RuleError

_HEADER_EXPR_RE = re.compile(r"^\s*([A-Za-z0-9_:.\-]+(?::[a-z]+)?)\s*(=~|!~)\s*(.+?)\s*(\[if-unset:\s*(.*)\])?\s*$", re.DOTALL)
_EXISTS_RE = re.compile(r"^\s*exists:\s*([A-Za-z0-9_.\-]+)\s*$")


_BRACKETS = {"{": "}", "(": ")", "[": "]", "<": ">"}
_FLAGS_TAIL_RE = re.compile(r"([a-zA-Z]*)\s*$")


def split_delimited(pattern: str) -> tuple[str, str]:
    """``/re/flags`` or Perl's ``m{re}flags`` / ``m;re;flags`` -> (re, flags); a bare regex
    -> (regex, "")."""
    p = pattern.strip()
    if p.startswith("/"):
        open_ = "/"
        body_start = 1
    elif len(p) > 2 and p[0] == "m" and not p[1].isalnum() and not p[1].isspace() and p[1] != "_":
        open_ = p[1]
        body_start = 2
    else:
        return pattern, ""
    close = _BRACKETS.get(open_, open_)
    tail = _FLAGS_TAIL_RE.search(p)
    flags = tail.group(1) if tail else ""
    end = len(p) - len(tail.group(0)) if tail else len(p)
    if end - 1 < body_start or p[end - 1] != close:
        return pattern, ""
    return p[body_start : end - 1], flags


@dataclass(frozen=True, slots=True)
class _Spec:
    """A non-meta rule reduced to what matching needs."""

    index: int
    target: str  # "body" | "rawbody" | "uri" | "full" | "h:<name>" | "exists:<name>"
    regex: str
    flags: str
    negate: bool
    unset: str | None = None


def _rule_spec(index: int, rule: Rule) -> _Spec:
    kind = rule.kind
    if kind == "header":
        pat = rule.pattern
        if rule.header:
            hdr = rule.header.strip()
            if hdr.lower().startswith("exists:"):
                return _Spec(index, "exists:" + hdr[7:].strip().lower(), "", "", False)
            if pat.strip().lower() == "exists:" or pat.strip().lower() == "exists":
                return _Spec(index, "exists:" + hdr.lower(), "", "", False)
            negate = False
            if pat.lstrip().startswith("!~"):
                negate, pat = True, pat.lstrip()[2:]
            elif pat.lstrip().startswith("=~"):
                pat = pat.lstrip()[2:]
            regex, flags = split_delimited(pat.strip())
            return _Spec(index, "h:" + _header_key(hdr), regex, flags, negate)
        m = _EXISTS_RE.match(pat)
        if m is not None:
            return _Spec(index, "exists:" + m.group(1).lower(), "", "", False)
        m = _HEADER_EXPR_RE.match(pat)
        if m is None:
            raise RuleError(f"rule {rule.name}: header rule needs a header (use 'header:' or 'Name =~ /re/')")
        hdr, op, rest, _, unset = m.groups()
        regex, flags = split_delimited(rest)
        target = "h:" + _header_key(hdr) + ("\x00" + unset if unset is not None else "")
        return _Spec(index, target, regex, flags, op == "!~", unset)
    if kind in ("body", "rawbody", "uri", "full"):
        regex, flags = split_delimited(rule.pattern)
        return _Spec(index, kind, regex, flags, False)
    raise RuleError(f"rule {rule.name}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")


def _header_key(hdr: str) -> str:
    """Normalise a header selector: ``ALL``, ``ToCc``, ``MESSAGEID`` keep their case;
    ordinary names are lower-cased; ``:addr``/``:name``/``:raw`` modifiers are kept."""
    name, _, mod = hdr.partition(":")
    if name in ("ALL", "ToCc", "MESSAGEID", "EnvelopeFrom"):
        base = name
    else:
        base = name.lower()
    return base + (":" + mod.lower() if mod else "")


_PY_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_HS_FLAGS = {"i": hyperscan.HS_FLAG_CASELESS, "m": hyperscan.HS_FLAG_MULTILINE, "s": hyperscan.HS_FLAG_DOTALL}


_PY_CACHE: dict[tuple[bytes, int], re.Pattern[bytes]] = {}


def _py_compile(spec: _Spec, name: str) -> re.Pattern[bytes]:
    """The ``re`` form of a pattern, on UTF-8 bytes like the hyperscan form (and like
    SpamAssassin, whose rules match the bytes of UTF-8 text). Also the validator."""
    fl = 0
    for ch in spec.flags:
        if ch in _PY_FLAGS:
            fl |= _PY_FLAGS[ch]
        elif ch not in "gose":  # Perl flags with no meaning for a match test
            raise RuleError(f"rule {name}: unsupported regex flag {ch!r}")
    if spec.target == "uri":
        fl |= re.MULTILINE  # the URI list is one URL per line; ^ and $ anchor each
    try:
        pat = _utf8_escapes(spec.regex).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RuleError(f"rule {name}: pattern is not valid text: {exc}") from exc
    key = (pat, fl)
    hit = _PY_CACHE.get(key)
    if hit is not None:
        return hit
    try:
        rx = re.compile(pat, fl)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise RuleError(f"rule {name}: bad regex {spec.regex!r}: {exc}") from exc
    if len(_PY_CACHE) < 50_000:
        _PY_CACHE[key] = rx
    return rx


_UNI_ESCAPE_RE = re.compile(r"(?<!\\)\\(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|x\{([0-9A-Fa-f]{1,6})\})")


def _utf8_escapes(regex: str) -> str:
    """``\\u00e9``-style escapes (invalid in a bytes pattern) become their UTF-8 byte escapes."""
    if "\\u" not in regex and "\\U" not in regex and "\\x{" not in regex:
        return regex

    def repl(m: re.Match[str]) -> str:
        cp = int(m.group(1) or m.group(2) or m.group(3), 16)
        if cp < 0x80:
            return f"\\x{cp:02x}"
        return "(?:" + "".join(f"\\x{b:02x}" for b in chr(cp).encode("utf-8")) + ")"

    return _UNI_ESCAPE_RE.sub(repl, regex)


# ---------------------------------------------------------------------------------------
# Engines that never backtrack without bound
# ---------------------------------------------------------------------------------------
#
# Every pattern runs on one of three engines, chosen once when the rule set is built:
#   hyperscan  (one database per target, linear time) - most patterns;
#   RE2        (linear time, one pattern at a time) - what hyperscan will not take: large repeat counts,
#              very long patterns, the verbose flag (its blanks and comments removed first);
#   ``regex``  (a backtracking engine with a hard timeout) - look-arounds and back references, which no
#              linear engine runs. These share a per-message time budget (``budget_ms`` plus
#              ``BUDGET_MS_PER_KB`` per KB analysed, CPU time): a call is given what is left of it and is
#              stopped when that runs out; the rule then counts as not hit and is named in
#              ``RuleResult.timed_out``. A rule that stalls on the trial messages or on long runs of its own
#              characters is refused when it is added (``validate_rule``) and at import.
# A pattern none of them can run is refused, with the reason. (Flywheel's own rules stay far inside the
# budget. SpamAssassin's imported look-around rules cost 5 ms on a median real message but up to half a
# second on the largest: with them, about one real message in twenty has some of them stopped.)

DEFAULT_BUDGET_MS = 20.0  # per message, plus
BUDGET_MS_PER_KB = 0.2  # per KB of the message's analysed bytes (71 ms at the 256 KB default)
_RE2, _BT = 1, 2  # fallback engines (hyperscan patterns live in the group's database)
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.encoding = re2.Options.Encoding.LATIN1  # bytes in, bytes matched: like hyperscan and re
_RE2_OPTIONS.log_errors = False
_BT_FLAGS = {"i": _bt_re.IGNORECASE, "m": _bt_re.MULTILINE, "s": _bt_re.DOTALL, "x": _bt_re.VERBOSE}
_WHITESPACE = frozenset(" \t\n\r\v\f")  # what Python's verbose mode skips
_REPEAT_RE = re.compile(r"\{(?!\})\d*(?:,\d*)?\}")


def _open_class(pattern: str, i: int, out: list[str]) -> int:
    """Copy the ``[`` at ``i`` (and a ``^`` right after it) to ``out``; returns where the class's members start
    (a ``]`` there is a member, not the end)."""
    out.append("[")
    i += 1
    if pattern.startswith("^", i):
        out.append("^")
        i += 1
    return i


def strip_verbose(pattern: str) -> str:
    """A verbose-mode (``x`` flag) pattern as the same pattern without it: unescaped blanks and ``#``
    comments outside character classes dropped, as Python's parser does, so that linear engines (which
    lack the flag) can take it."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    body = 0  # where the current class's members start (a "]" there is a member)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if pattern.startswith("N{", i + 1):  # a named character: its name keeps its blanks
                j = pattern.find("}", i)
                j = n if j < 0 else j + 1
                out.append(pattern[i:j])
                i = j
                continue
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            out.append(c)
            if c == "]" and i > body:
                in_class = False
            i += 1
            continue
        if c == "[":
            in_class = True
            i = body = _open_class(pattern, i, out)
            continue
        if c == "{":
            # a repeat only when "{m,n}" follows with no blank inside; otherwise Python reads a literal "{"
            # (and drops the blanks after it), which must stay a literal once the blanks are gone
            m = _REPEAT_RE.match(pattern, i)
            if m is not None:
                out.append(m.group(0))
                i = m.end()
            else:
                out.append("\\{")
                i += 1
            continue
        if c in _WHITESPACE:
            i += 1
            continue
        if c == "#":
            j = pattern.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _re2_syntax(pattern: str, multiline: bool) -> str:
    r"""The Python pattern in RE2's spelling: ``\Z`` is RE2's ``\z``; outside multi-line mode Python's
    ``$`` also matches before a final newline, which RE2's does not (``(?:\n?\z)`` does)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    body = 0
    while i < n:
        c = pattern[i]
        if c == "\\":
            esc = pattern[i : i + 2]
            out.append("\\z" if esc == "\\Z" and not in_class else esc)
            i += 2
            continue
        if in_class:
            if c == "]" and i > body:
                in_class = False
        elif c == "[":
            in_class = True
            i = body = _open_class(pattern, i, out)
            continue
        elif c == "$" and not multiline:
            out.append("(?:\\n?\\z)")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _plain(spec: _Spec) -> _Spec:
    """``spec`` without the verbose flag (its blanks and comments removed): what hyperscan and RE2 take."""
    if "x" not in spec.flags:
        return spec
    return dataclasses.replace(spec, regex=strip_verbose(spec.regex), flags=spec.flags.replace("x", ""))


_RE2_CACHE: dict[tuple[str, str, bool], Any] = {}


def _re2_compile(spec: _Spec) -> Any | None:
    """The RE2 form of a pattern (on UTF-8 bytes read as Latin-1: byte for byte), or None. Memoised: an
    imported rule's alternation can take a second to compile, and every rule change rebuilds the engine."""
    spec = _plain(spec)
    flags = spec.flags
    multiline = "m" in flags or spec.target == "uri"
    key = (spec.regex, flags, multiline)
    if key in _RE2_CACHE:
        return _RE2_CACHE[key]
    inline = "".join(sorted({ch for ch in flags if ch in "ims"} | ({"m"} if multiline else set())))
    try:
        body = _re2_syntax(_utf8_escapes(spec.regex), multiline).encode("utf-8")
        rx = re2.compile((b"(?" + inline.encode() + b")" if inline else b"") + body, _RE2_OPTIONS)
    except (re2.error, UnicodeEncodeError, ValueError, TypeError):
        rx = None
    if len(_RE2_CACHE) < 10_000:
        _RE2_CACHE[key] = rx
    return rx


def _bt_compile(spec: _Spec) -> Any | None:
    """The budgeted backtracking form of a pattern (the ``regex`` module, ``re``'s syntax), or None."""
    fl = _bt_re.V0
    for ch in spec.flags:
        fl |= _BT_FLAGS.get(ch, 0)
    if spec.target == "uri":
        fl |= _bt_re.MULTILINE
    try:
        return _bt_re.compile(_utf8_escapes(spec.regex).encode("utf-8"), fl)
    except (_bt_re.error, OverflowError, RecursionError, ValueError, UnicodeEncodeError):
        return None


def _fallback(spec: _Spec, name: str) -> tuple[int, Any]:
    """(engine, compiled) for a pattern hyperscan does not take: RE2 when it can, else the budgeted
    backtracking engine; RuleError with the reason when neither can."""
    rx = _re2_compile(spec)
    if rx is not None:
        return _RE2, rx
    rx = _bt_compile(spec)
    if rx is not None:
        return _BT, rx
    raise RuleError(
        f"rule {name}: pattern {spec.regex[:80]!r} runs on none of the engines with bounded time "
        "(hyperscan and RE2 refuse it, and the budgeted backtracking engine cannot compile it)"
    )


class _Budget:
    """What is left of one message's time for backtracking patterns, and the rules it stopped."""

    __slots__ = ("left", "timed_out")

    def __init__(self, seconds: float) -> None:
        self.left = seconds
        self.timed_out: list[int] = []
