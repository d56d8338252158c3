"""The rule baseline: SpamAssassin-like weighted rules compiled into hyperscan databases.

A rule set is declarative (YAML): a threshold and rules, each with a kind (header, body,
rawbody, uri, full or meta), a pattern, a weight, a description and the date it was
added (the order rules were written is an axis of the improvement curve).

All non-meta patterns of one target text (the body, the raw body, the URI list, the raw
message, one header) are compiled into ONE hyperscan database, so a message costs one scan
per target however many rules there are. Every pattern runs in bounded time: what hyperscan
will not take runs on RE2 (linear time too), and what needs backtracking (look-arounds, back
references) on a backtracking engine under a per-message time budget that stops it (see
"Engines" below). A rule no engine can run within bounds is refused with the reason:
``validate_rule`` is the check a rule passes before it is saved. Meta rules are
boolean/arithmetic expressions over other rules, parsed into a small AST (never ``eval``),
with limits on their size and depth.

A ``RuleEngine`` is immutable once built: it is safe to share across threads (each thread
gets its own hyperscan scratch), and every change returns a new engine so callers can swap
the reference atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import hyperscan
import re2
import regex as _bt_re
import structlog
import yaml

from models.message import ParsedMessage

log = structlog.get_logger(__name__)

__all__ = [
    "BUDGET_MS_PER_KB",
    "DEFAULT_BUDGET_MS",
    "DEFAULT_RULES_PATH",
    "KINDS",
    "MAX_META_CHARS",
    "MAX_META_DEPTH",
    "MAX_META_TERMS",
    "Rule",
    "RuleEngine",
    "RuleError",
    "RuleHit",
    "RuleRefused",
    "RuleResult",
    "import_spamassassin",
    "strip_verbose",
    "validate_rule",
]

KINDS = ("header", "body", "rawbody", "uri", "full", "meta")
DEFAULT_RULES_PATH = Path(__file__).with_name("rules") / "default.yaml"
DEFECTS_HEADER = "x-flywheel-defects"  # pseudo-header: the parser's defect flags, space separated
ATTACHMENTS_HEADER = "x-flywheel-attachments"  # pseudo-header: "filename; type" per attachment
AUTH_HEADER = "x-flywheel-auth"  # pseudo-header: trusted SPF/DKIM/DMARC outcomes, "spf=fail dkim=pass"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Header selectors whose text is computed (see ``_header_value``), not read from the message's headers.
_COMPUTED_HEADERS = frozenset(
    {"ALL", "ToCc", "MESSAGEID", "EnvelopeFrom", DEFECTS_HEADER, ATTACHMENTS_HEADER, AUTH_HEADER}
)


class RuleError(ValueError):
    """A rule (or rule file) is invalid; the message says which rule and why."""


class RuleRefused(RuleError):
    """A rule is well formed but cannot be run within bounded work (no engine with bounded time runs its
    pattern, its meta expression is too large or too deep, or it runs out of the time budget on the trial
    messages). A rule file holding one still loads: the rule is kept, inactive, in ``RuleEngine.refused``."""


# ---------------------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Rule:
    """One rule. ``pattern`` is ``/regex/flags`` (Perl style) or a bare regex; header rules
    name their header in ``header`` or use the SpamAssassin forms in ``pattern``
    (``Subject =~ /re/i``, ``Subject !~ /re/``, ``exists:X-Mailer``, ``ALL =~ /re/m``);
    a meta rule's pattern is an expression over other rule names (``A && (B || !C)``,
    ``(A + B + C) >= 2``)."""

    name: str
    kind: str
    pattern: str
    weight: float = 1.0
    description: str = ""
    added: str = "2002-01-01"
    enabled: bool = True
    header: str | None = None
    source: str = "flywheel"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.header:
            d["header"] = self.header
        d.update(
            pattern=self.pattern,
            weight=float(self.weight),
            description=self.description,
            added=str(self.added),
            enabled=bool(self.enabled),
        )
        if self.source != "flywheel":
            d["source"] = self.source
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        if not isinstance(d, dict):
            raise RuleError(f"a rule must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RuleError(f"rule {d.get('name', '?')}: unknown field(s) {sorted(unknown)}")
        for key in ("name", "kind", "pattern"):
            if key not in d:
                raise RuleError(f"rule {d.get('name', '?')}: missing field {key!r}")
        try:
            weight = float(d.get("weight", 1.0))
        except (TypeError, ValueError) as exc:
            raise RuleError(f"rule {d['name']}: weight must be a number") from exc
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            pattern=str(d["pattern"]),
            weight=weight,
            description=str(d.get("description") or ""),
            added=str(d.get("added") or "2002-01-01"),
            enabled=bool(d.get("enabled", True)),
            header=str(d["header"]) if d.get("header") else None,
            source=str(d.get("source") or "flywheel"),
        )


@dataclass(frozen=True, slots=True)
class RuleHit:
    name: str
    weight: float
    description: str


@dataclass(slots=True)
class RuleResult:
    """The rules' verdict on one message. ``timed_out`` names the backtracking rules that the per-message time
    budget stopped (counted as not hit); it is empty for all but hostile input."""

    score: float
    threshold: float
    is_spam: bool
    hits: list[RuleHit] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hits]


# ---------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# Meta expressions: tokenize -> Pratt parse -> closures
# ---------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(&&|\|\||>=|<=|==|!=|[-+*/()!<>]))")
_BINARY = {
    "||": (1, lambda a, b: 1 if (a or b) else 0),
    "&&": (2, lambda a, b: 1 if (a and b) else 0),
    "==": (3, lambda a, b: 1 if a == b else 0),
    "!=": (3, lambda a, b: 1 if a != b else 0),
    "<": (4, lambda a, b: 1 if a < b else 0),
    ">": (4, lambda a, b: 1 if a > b else 0),
    "<=": (4, lambda a, b: 1 if a <= b else 0),
    ">=": (4, lambda a, b: 1 if a >= b else 0),
    "+": (5, lambda a, b: a + b),
    "-": (5, lambda a, b: a - b),
    "*": (6, lambda a, b: a * b),
    "/": (6, lambda a, b: a / b if b else 0),
}

Evaluator = Callable[[Sequence[float]], float]


def _tokenize(expr: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None or m.end() == pos:
            raise RuleError(f"unexpected character {expr[pos:pos + 10]!r}")
        num, ident, op = m.groups()
        if num is not None:
            out.append(("num", num))
        elif ident is not None:
            out.append(("id", ident))
        else:
            out.append(("op", op))
        pos = m.end()
    return out


#: Limits of one meta expression. A flat chain of thousands of terms, or parentheses nested hundreds deep, is
#: refused: evaluating it would recurse past Python's stack on every message. [SpamAssassin's largest: 122
#: terms, 1,786 characters, parentheses 3 deep.]
MAX_META_TERMS = 512
MAX_META_CHARS = 16_384
MAX_META_DEPTH = 64  # nested operators and parentheses, as parse levels
_CHAINS = ("&&", "||", "+")  # associative: a run of one of them is evaluated as one flat loop


class _MetaParser:
    def __init__(self, expr: str, resolve: Callable[[str], int]) -> None:
        if len(expr) <= 16 * MAX_META_CHARS:  # (a larger one is not even tokenized)
            self.toks = _tokenize(expr)
            terms = sum(1 for kind, _ in self.toks if kind != "op")
            if terms > MAX_META_TERMS:
                raise RuleRefused(f"expression of {terms} terms (at most {MAX_META_TERMS})")
        if len(expr) > MAX_META_CHARS:
            raise RuleRefused(f"expression of {len(expr)} characters (at most {MAX_META_CHARS})")
        self.i = 0
        self.depth = 0
        self.resolve = resolve
        self.refs: set[str] = set()

    def parse(self) -> Evaluator:
        if not self.toks:
            raise RuleError("empty expression")
        fn = self._expr(0)
        if self.i != len(self.toks):
            raise RuleError(f"unexpected {self.toks[self.i][1]!r}")
        return fn

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_META_DEPTH:
            raise RuleRefused(f"expression nested deeper than {MAX_META_DEPTH} levels")

    def _expr(self, min_prec: int) -> Evaluator:
        self._enter()
        left = self._unary()
        chain_op: str | None = None
        chain: list[Evaluator] = []
        while self.i < len(self.toks):
            kind, val = self.toks[self.i]
            if kind != "op" or val not in _BINARY:
                break
            prec, op = _BINARY[val]
            if prec < min_prec:
                break
            self.i += 1
            right = self._expr(prec + 1)
            if val == chain_op:
                chain.append(right)
                continue
            if chain_op is not None:
                left = _chain(chain_op, chain)
                chain_op = None
            if val in _CHAINS:
                chain_op, chain = val, [left, right]
            else:
                left = _combine(val, op, left, right)
        if chain_op is not None:
            left = _chain(chain_op, chain)
        self.depth -= 1
        return left

    def _unary(self) -> Evaluator:
        if self.i >= len(self.toks):
            raise RuleError("expression ends early")
        self._enter()
        try:
            return self._unary_inner()
        finally:
            self.depth -= 1

    def _unary_inner(self) -> Evaluator:
        kind, val = self.toks[self.i]
        self.i += 1
        if kind == "num":
            num = float(val)
            return lambda h: num
        if kind == "id":
            idx = self.resolve(val)
            self.refs.add(val)
            return lambda h: h[idx]
        if val == "!":
            if self.i < len(self.toks) and self.toks[self.i][0] == "id":  # !NAME: one closure, not two
                name = self.toks[self.i][1]
                self.i += 1
                j = self.resolve(name)
                self.refs.add(name)
                return lambda h: 0 if h[j] else 1
            inner = self._unary()
            return lambda h: 0 if inner(h) else 1
        if val == "-":
            inner = self._unary()
            return lambda h: -inner(h)
        if val == "(":
            inner = self._expr(0)
            if self.i >= len(self.toks) or self.toks[self.i] != ("op", ")"):
                raise RuleError("missing ')'")
            self.i += 1
            return inner
        raise RuleError(f"unexpected {val!r}")


def _combine(op_name: str, op: Callable[[float, float], float], left: Evaluator, right: Evaluator) -> Evaluator:
    """The closure of ``left <op> right``. ``&&`` and ``||`` skip the right side when the left decides (operands
    have no side effects, so the value is the one ``op`` gives) and save a call level."""
    if op_name == "&&":
        return lambda h: 1 if (left(h) and right(h)) else 0
    if op_name == "||":
        return lambda h: 1 if (left(h) or right(h)) else 0
    return lambda h: op(left(h), right(h))


def _chain(op_name: str, operands: list[Evaluator]) -> Evaluator:
    """``a op b op c ...`` (left to right, as the nested form gives) as one closure over the list: one call
    level whatever the length."""
    if len(operands) == 2:
        return _combine(op_name, _BINARY[op_name][1], operands[0], operands[1])
    fs = tuple(operands)
    if op_name == "&&":

        def all_of(h: Sequence[float]) -> float:
            for f in fs:
                if not f(h):
                    return 0
            return 1

        return all_of
    if op_name == "||":

        def any_of(h: Sequence[float]) -> float:
            for f in fs:
                if f(h):
                    return 1
            return 0

        return any_of
    first, rest = fs[0], fs[1:]

    def total(h: Sequence[float]) -> float:
        v = first(h)
        for f in rest:
            v = v + f(h)
        return v

    return total


def _never(h: Sequence[float]) -> float:
    """The evaluator of a refused meta rule."""
    return 0


def meta_references(expr: str) -> set[str]:
    """Rule names an expression refers to (for dependency checks and import)."""
    return {v for k, v in _tokenize(expr) if k == "id"}


# ---------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------


class _Group:
    """Every pattern of one target text: one hyperscan database plus RE2 and budgeted fallbacks."""

    __slots__ = (
        "_local",
        "db",
        "empty_hits",
        "fallback",
        "gate",
        "gated",
        "hmod",
        "hname",
        "hs_ids",
        "plain",
        "refused",
        "target",
        "unset",
    )

    def __init__(self, target: str, specs: list[_Spec], rules: Sequence[Rule]) -> None:
        self.target = target
        # a header target "h:<name>[:<mod>][\x00<if-unset>]", parsed once here rather than per message
        key, sep, unset = target[2:].partition("\x00") if target.startswith("h:") else ("", "", "")
        self.hname, _, self.hmod = key.partition(":")
        self.unset: str | None = unset if sep else None
        # an ordinary header without modifier: its text is the header map's entry
        self.plain = not self.hmod and self.hname not in _COMPUTED_HEADERS
        self.fallback: list[tuple[int, int, Any]] = []  # (rule index, engine, compiled)
        self.refused: dict[int, str] = {}  # rule index -> why no engine runs it
        self.db: hyperscan.Database | None = None
        self._local = threading.local()
        by_index = {spec.index: spec for spec in specs}

        def fall_back(idx: int) -> None:
            try:
                engine, rx = _fallback(by_index[idx], rules[idx].name)
            except RuleError as exc:
                self.refused[idx] = str(exc)
                return
            self.fallback.append((idx, engine, rx))

        exprs: list[bytes] = []
        ids: list[int] = []
        flags: list[int] = []
        for spec in specs:
            _py_compile(spec, rules[spec.index].name)  # validates every pattern (``re`` is the rule language)
            hs = _hs_pattern(spec)
            if hs is None:
                fall_back(spec.index)
                continue
            exprs.append(hs[0])
            flags.append(hs[1])
            ids.append(spec.index)
        if exprs and not _hs_try(exprs, ids, flags):
            # some pattern is beyond hyperscan: test each alone (cached), send the others to a fallback
            keep = [k for k in range(len(exprs)) if _hs_single_ok(exprs[k], flags[k])]
            keep_set = set(keep)
            for k in range(len(exprs)):
                if k not in keep_set:
                    fall_back(ids[k])
            exprs = [exprs[k] for k in keep]
            ids = [ids[k] for k in keep]
            flags = [flags[k] for k in keep]
            while exprs and not _hs_try(exprs, ids, flags):  # only together too large: shed
                exprs.pop()
                flags.pop()
                fall_back(ids.pop())
        if exprs:
            self.db = _hs_try(exprs, ids, flags)
        self.hs_ids = ids
        # A budgeted fallback whose pattern hyperscan can approximate in prefilter mode (a superset of its
        # matches, e.g. with back references ignored) only runs when that approximation matched: same hits,
        # fewer calls on the budget.
        self.gate: hyperscan.Database | None = None
        self.gated: frozenset[int] = frozenset()
        pre = [(k, _hs_prefilter_pattern(by_index[idx])) for k, (idx, engine, _) in enumerate(self.fallback)
               if engine == _BT]
        pre_ok = [(k, p) for k, p in pre if p is not None and _hs_single_ok(p[0], p[1])]
        if pre_ok:
            self.gate = _hs_try([p[0] for _, p in pre_ok], [k for k, _ in pre_ok], [p[1] for _, p in pre_ok])
            if self.gate is not None:
                self.gated = frozenset(k for k, _ in pre_ok)
        # What an empty text matches (``/^\s*$/`` does) is fixed: found once here, so evaluation skips the scans
        # of the many header targets a message lacks.
        probe = bytearray(len(rules))
        self.match(b"", probe, _Budget(1.0))
        self.empty_hits: tuple[int, ...] = tuple(i for i, v in enumerate(probe) if v)

    def scratch(self) -> hyperscan.Scratch:
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = hyperscan.Scratch(self.db)
            self._local.scratch = s
        return s

    def gate_scratch(self) -> hyperscan.Scratch:
        s = getattr(self._local, "gate_scratch", None)
        if s is None:
            s = hyperscan.Scratch(self.gate)
            self._local.gate_scratch = s
        return s

    def match(self, data: bytes, hits: bytearray, budget: _Budget) -> None:
        """Set ``hits[i] = 1`` for every rule ``i`` of this group whose pattern matches ``data``."""
        if self.db is not None:
            self.db.scan(data, match_event_handler=_ON_MATCH, context=hits, scratch=self.scratch())
        if not self.fallback:
            return
        passed = bytearray(len(self.fallback))
        if self.gate is not None:
            self.gate.scan(data, match_event_handler=_ON_MATCH, context=passed, scratch=self.gate_scratch())
        gated = self.gated
        for k, (idx, engine, rx) in enumerate(self.fallback):
            if engine == _RE2:
                if rx.search(data) is not None:
                    hits[idx] = 1
                continue
            if not passed[k] and k in gated:
                continue
            if budget.left <= 0.0:
                budget.timed_out.append(idx)
                continue
            t0 = time.thread_time()
            try:
                if rx.search(data, timeout=budget.left) is not None:
                    hits[idx] = 1
            except TimeoutError:
                budget.timed_out.append(idx)
            finally:
                budget.left -= time.thread_time() - t0


def _on_match(pid: int, start: int, end: int, flags: int, hits: bytearray) -> None:
    """hyperscan match callback (one per pattern: HS_FLAG_SINGLEMATCH); the context is the hit vector."""
    hits[pid] = 1


# hyperscan types the callback's context as object: it hands back the bytearray each scan above passes
_ON_MATCH = cast("Callable[[int, int, int, int, object], None]", _on_match)


_HS_UNSUPPORTED_RE = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=|\(\?>|\\[AzZGbB]?[kK]<|\(\?\(|\(\?[a-zA-Z]*x|\\[pP]\{")


_BIG_REPEAT_RE = re.compile(r"\{\d*,?(\d{3,})\}")
_HS_MAX_REPEAT = 100
_HS_MAX_LEN = 4000
_GROUP_REPEAT_RE = re.compile(r"\)\{(?:[3-9]|\d\d)")
_GROUP_REPEAT_MIN_LEN = 200  # a short pattern may repeat a group; long ones explode  # larger bounded repeats make hyperscan's compile explode; ``re`` copes


def _plain(spec: _Spec) -> _Spec:
    """``spec`` without the verbose flag (its blanks and comments removed): what hyperscan and RE2 take."""
    if "x" not in spec.flags:
        return spec
    return dataclasses.replace(spec, regex=strip_verbose(spec.regex), flags=spec.flags.replace("x", ""))


def _hs_pattern(spec: _Spec) -> tuple[bytes, int] | None:
    """hyperscan expression and flags for a spec, or None when it must use ``re``.

    Byte mode (no HS_FLAG_UTF8): the same semantics as the ``re`` fallback on UTF-8 bytes,
    and far cheaper to compile for the big character-class alternations of imported rules."""
    spec = _plain(spec)
    if _HS_UNSUPPORTED_RE.search(spec.regex) is not None:
        return None
    if any(int(m.group(1)) > _HS_MAX_REPEAT for m in _BIG_REPEAT_RE.finditer(spec.regex)):
        return None
    # repeated big groups: minutes of hyperscan compile, microseconds in ``re``
    return _hs_expression(spec, hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY)


def _hs_prefilter_pattern(spec: _Spec) -> tuple[bytes, int] | None:
    """hyperscan prefilter-mode expression for a pattern that uses constructs hyperscan lacks (back references,
    look-arounds, ...), or None. Prefilter mode matches a superset of the pattern's matches, so it can only rule a
    text out."""
    spec = _plain(spec)
    if _HS_UNSUPPORTED_RE.search(spec.regex) is None:
        return None
    # (bounded repeats are fine: prefilter mode may widen them)
    return _hs_expression(
        spec, hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY
    )


def _hs_expression(spec: _Spec, flags: int) -> tuple[bytes, int] | None:
    """The hyperscan (expression, flags) of ``spec`` on top of ``flags``, or None where hyperscan should not take
    it: too long, big repeated groups (minutes of compile), or text it cannot encode."""
    if len(spec.regex) > _HS_MAX_LEN or (
        len(spec.regex) > _GROUP_REPEAT_MIN_LEN and _GROUP_REPEAT_RE.search(spec.regex) is not None
    ):
        return None
    for ch in spec.flags:
        flags |= _HS_FLAGS.get(ch, 0)
    if spec.target == "uri":
        flags |= hyperscan.HS_FLAG_MULTILINE
    try:
        return _utf8_escapes(spec.regex).encode("utf-8"), flags
    except UnicodeEncodeError:
        return None


_HS_SINGLE: dict[tuple[bytes, int], bool] = {}
_HS_CACHE: dict[tuple[tuple[bytes, ...], tuple[int, ...], tuple[int, ...]], hyperscan.Database | None] = {}
_HS_LOCK = threading.Lock()


def _hs_try(exprs: list[bytes], ids: list[int], flags: list[int]) -> hyperscan.Database | None:
    """Compile a database (memoised: engines rebuilt after a rule change reuse it)."""
    key = (tuple(exprs), tuple(ids), tuple(flags))
    with _HS_LOCK:
        if key in _HS_CACHE:
            return _HS_CACHE[key]
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=list(exprs), ids=list(ids), flags=list(flags))
    except hyperscan.error:
        db = None
    with _HS_LOCK:
        if len(_HS_CACHE) > 256:  # two rule sets the size of SpamAssassin's (116 targets) stay compiled
            _HS_CACHE.clear()
        _HS_CACHE[key] = db
    return db


def _hs_single_ok(expr: bytes, flag: int) -> bool:
    key = (expr, flag)
    ok = _HS_SINGLE.get(key)
    if ok is None:
        try:
            hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK).compile(expressions=[expr], ids=[0], flags=[flag])
            ok = True
        except hyperscan.error:
            ok = False
        if len(_HS_SINGLE) < 100_000:
            _HS_SINGLE[key] = ok
    return ok




# The ``:addr`` of a header: each address in <...> (one run without blanks or angle brackets that holds an @), or a
# bare local@domain, left to right. As one plain regex (``<\s*([^<>\s]*@[^<>\s]*)\s*>|(ATEXT+@[\w.-]+)``) it
# rescanned an address-character run from each of its characters (and each "@" of a bracketed run): quadratic. Here
# the runs are possessive (a run cannot give back an "@" it never holds) and a bare address only starts where no
# address character precedes it, or exactly where the previous match ended (tried anchored there first): the
# same matches in linear time.
_ATEXT = r"[\w.!#$%&'*+/=?^`{|}~-]"
_ADDR_SCAN_RE = re.compile(r"<\s*+([^<>\s@]*+@[^<>\s]*+)\s*+>|(?<!" + _ATEXT + r")(" + _ATEXT + r"++@[\w.-]+)")
_ADDR_AT_RE = re.compile(r"<\s*+([^<>\s@]*+@[^<>\s]*+)\s*+>|(" + _ATEXT + r"++@[\w.-]+)")


def _addresses(text: str) -> str:
    out: list[str] = []
    m = _ADDR_SCAN_RE.search(text)
    while m is not None:
        out.append(m.group(1) or m.group(2))
        pos = m.end()
        m2 = _ADDR_AT_RE.match(text, pos)
        while m2 is not None:
            out.append(m2.group(1) or m2.group(2))
            pos = m2.end()
            m2 = _ADDR_AT_RE.match(text, pos)
        m = _ADDR_SCAN_RE.search(text, pos)
    return "\n".join(out)


def _display_name(line: str) -> str | None:
    r"""What ``^\s*"?([^"<]*?)"?\s*<`` captures from ``line`` (None when it does not match), without that
    regex's lazy group, which tried the rest of a blank run at every step (quadratic)."""
    s = line.lstrip()
    i = 1 if s.startswith('"') else 0
    q, a = s.find('"', i), s.find("<", i)
    j = a if q < 0 else q if a < 0 else min(q, a)
    if j < 0:
        return None
    if s[j] == "<" or s[j + 1 :].lstrip().startswith("<"):
        return s[i:j]
    return None


def _display_names(text: str) -> str:
    out = []
    for line in text.split("\n"):
        name = _display_name(line)
        if name is not None and name.strip():
            out.append(name.strip())
        elif "(" in line and ")" in line:  # old form: addr (Name)
            out.append(line[line.index("(") + 1 : line.rindex(")")].strip())
    return "\n".join(out)


def _header_map(msg: ParsedMessage) -> dict[str, str]:
    """Every header's values joined by newlines, built once per evaluation."""
    out: dict[str, str] = {}
    for k, v in msg.headers:
        prev = out.get(k)
        out[k] = v if prev is None else prev + "\n" + v
    return out


def _header_text(msg: ParsedMessage, key: str, hmap: dict[str, str] | None = None) -> str:
    if hmap is None:
        hmap = _header_map(msg)
    name, _, mod = key.partition(":")
    return _header_value(msg, name, mod, hmap)


def _header_value(msg: ParsedMessage, name: str, mod: str, hmap: dict[str, str]) -> str:
    """The text a header rule on ``name`` (with modifier ``mod``: addr, name, raw or "") matches."""
    if name == "ALL":
        text = "\n".join(f"{k}: {v}" for k, v in msg.headers)
    elif name == "ToCc":
        text = "\n".join(x for x in (hmap.get("to"), hmap.get("cc")) if x)
    elif name == "MESSAGEID":
        text = "\n".join(x for x in (hmap.get(h) for h in ("message-id", "resent-message-id", "x-message-id")) if x)
    elif name == "EnvelopeFrom":
        text = hmap.get("return-path", "")
    elif name == DEFECTS_HEADER:
        text = " ".join(msg.defects)
    elif name == ATTACHMENTS_HEADER:
        text = "\n".join(f"{fn}; {ct}" for fn, ct in msg.attachments)
    elif name == AUTH_HEADER:
        text = " ".join(msg.auth)
    else:
        text = hmap.get(name, "")
    if not mod or not text or mod == "raw":
        return text
    if mod == "addr":
        return _addresses(text)
    if mod == "name":
        return _display_names(text)
    return text


class RuleEngine:
    """A compiled, immutable rule set (see module docstring)."""

    def __init__(
        self, rules: Iterable[Rule], threshold: float = 5.0, *, budget_ms: float = DEFAULT_BUDGET_MS,
        strict: bool = False,
    ) -> None:
        """Build (compile) a rule set. A malformed rule raises RuleError. A well-formed rule that cannot run
        within bounded work raises RuleRefused when ``strict``; otherwise it is kept in the set but inactive,
        with its reason in ``refused`` and a logged warning (so a rule file saved before a limit existed still
        loads, and saving it back keeps the rule for its author to fix)."""
        self._rules: tuple[Rule, ...] = tuple(dataclasses.replace(r) for r in rules)
        try:
            self._threshold = float(threshold)
            self._budget_s = float(budget_ms) / 1000.0
        except (TypeError, ValueError) as exc:
            raise RuleError("threshold and budget_ms must be numbers") from exc
        self._strict = strict
        self._refused: dict[str, str] = {}
        self._index: dict[str, int] = {}
        for i, r in enumerate(self._rules):
            if not isinstance(r.name, str) or _NAME_RE.match(r.name) is None:
                raise RuleError(f"bad rule name {r.name!r} (letters, digits, underscore)")
            if r.name in self._index:
                raise RuleError(f"duplicate rule name {r.name}")
            if r.kind not in KINDS:
                raise RuleError(f"rule {r.name}: unknown kind {r.kind!r} (expected one of {', '.join(KINDS)})")
            if not isinstance(r.weight, (int, float)) or r.weight != r.weight:
                raise RuleError(f"rule {r.name}: weight must be a number")
            self._index[r.name] = i
        self._compile()

    # -- construction -------------------------------------------------------------

    def _compile(self) -> None:
        specs: dict[str, list[_Spec]] = {}
        exists: list[tuple[int, str]] = []
        negated: list[int] = []
        metas: list[tuple[int, Evaluator, set[str]]] = []
        for i, r in enumerate(self._rules):
            if r.kind == "meta":
                try:
                    parser = _MetaParser(r.pattern, self._resolver(r.name))
                    fn = parser.parse()
                except RuleRefused as exc:
                    try:  # its references still resolve (an unknown name or a cycle is an error as ever)
                        refs = meta_references(r.pattern)
                        for ref in refs:
                            self._resolver(r.name)(ref)
                    except RuleError as bad:
                        raise RuleError(f"rule {r.name}: bad meta expression: {bad}") from None
                    self._refuse(i, f"rule {r.name}: meta expression refused: {exc}")
                    metas.append((i, _never, refs))
                    continue
                except RuleError as exc:
                    raise RuleError(f"rule {r.name}: bad meta expression: {exc}") from None
                metas.append((i, fn, parser.refs))
                continue
            spec = _rule_spec(i, r)
            if not r.enabled:
                if spec.regex:
                    _py_compile(spec, r.name)  # a disabled rule is still validated
                continue
            if spec.target.startswith("exists:"):
                exists.append((i, spec.target[7:]))
                continue
            if not spec.regex and not spec.target.startswith("h:"):
                raise RuleError(f"rule {r.name}: empty pattern")
            if spec.negate:
                negated.append(i)
            specs.setdefault(spec.target, []).append(spec)
        self._groups = [_Group(t, s, self._rules) for t, s in specs.items()]
        for g in self._groups:
            for i, why in g.refused.items():
                self._refuse(i, why)
        refused = {self._index[name] for name in self._refused}
        self._exists = exists
        self._negated = [i for i in negated if i not in refused]
        self._metas = [(i, fn) for i, fn in self._order_metas(metas) if i not in refused]
        self._active = sum(1 for i, r in enumerate(self._rules) if r.enabled and i not in refused)
        self._weights = [r.weight if r.enabled else 0.0 for r in self._rules]
        # Per rule: None when disabled, else (weight, the RuleHit it reports or None for a "__" sub-rule). RuleHit is
        # frozen, so one instance per rule is shared by every result.
        self._hit_table: list[tuple[float, RuleHit | None] | None] = [
            (r.weight, None if r.name.startswith("__") else RuleHit(r.name, r.weight, r.description))
            if r.enabled and i not in refused
            else None
            for i, r in enumerate(self._rules)
        ]

    def _refuse(self, i: int, why: str) -> None:
        """Rule ``i`` cannot run within bounded work: raise (strict) or keep it inactive, logged."""
        name = self._rules[i].name
        if self._strict:
            raise RuleRefused(why)
        if not self._rules[i].enabled:
            return  # a disabled rule never runs: nothing to refuse until it is enabled
        self._refused[name] = why
        log.warning("rule_refused", rule=name, reason=why)

    def _resolver(self, owner: str) -> Callable[[str], int]:
        def resolve(name: str) -> int:
            idx = self._index.get(name)
            if idx is None:
                raise RuleError(f"refers to unknown rule {name!r}")
            if name == owner:
                raise RuleError("refers to itself")
            return idx

        return resolve

    def _order_metas(self, metas: list[tuple[int, Evaluator, set[str]]]) -> list[tuple[int, Evaluator]]:
        """Metas in dependency order (each after the metas it reads); RuleError on a cycle. Iterative: a chain
        of metas thousands long must not exhaust the stack."""
        by_idx = {i: (fn, sorted(refs)) for i, fn, refs in metas}
        order: list[tuple[int, Evaluator]] = []
        state: dict[int, int] = {}  # 1: on the current path, 2: done
        for root in by_idx:
            if state.get(root):
                continue
            state[root] = 1
            path = [self._rules[root].name]
            stack: list[tuple[int, int]] = [(root, 0)]  # (meta, next reference to look at)
            while stack:
                i, k = stack[-1]
                refs = by_idx[i][1]
                if k < len(refs):
                    stack[-1] = (i, k + 1)
                    j = self._index[refs[k]]
                    if j not in by_idx:
                        continue
                    st = state.get(j, 0)
                    if st == 1:
                        raise RuleError(
                            f"rule {self._rules[j].name}: meta rules form a cycle: {' -> '.join([*path, refs[k]])}"
                        )
                    if st == 0:
                        state[j] = 1
                        path.append(refs[k])
                        stack.append((j, 0))
                    continue
                stack.pop()
                path.pop()
                state[i] = 2
                if self._rules[i].enabled:
                    order.append((i, by_idx[i][0]))
        return order

    @classmethod
    def default(cls) -> RuleEngine:
        """Flywheel's own rule set (models/rules/default.yaml)."""
        return cls.load(DEFAULT_RULES_PATH)

    @classmethod
    def load(cls, path: Path | str, *, budget_ms: float = DEFAULT_BUDGET_MS) -> RuleEngine:
        """Load a YAML rule file (``threshold`` + ``rules``). A rule in it that cannot run within bounded work
        is kept inactive with its reason (``refused``), not an error: see the constructor."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise RuleError(f"cannot read rule file {path}: {exc}") from exc
        return cls.from_dict(data, budget_ms=budget_ms)

    @classmethod
    def from_dict(cls, data: Any, *, budget_ms: float = DEFAULT_BUDGET_MS) -> RuleEngine:
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise RuleError("a rule file is a mapping with a 'rules' list")
        rules = [Rule.from_dict(d) for d in data["rules"]]
        return cls(rules, threshold=data.get("threshold", 5.0), budget_ms=budget_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self._threshold, "rules": [r.to_dict() for r in self._rules]}

    def save(self, path: Path | str) -> None:
        """Write the rule set as YAML (atomically: temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120), encoding="utf-8"
        )
        tmp.replace(path)

    # -- read-only views ---------------------------------------------------------------

    @property
    def rules(self) -> list[Rule]:
        """Copies of the rules, in file order (mutating them does not touch the engine)."""
        return [dataclasses.replace(r) for r in self._rules]

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def active_count(self) -> int:
        return self._active

    @property
    def fallback_count(self) -> int:
        """Active patterns hyperscan does not take (run by RE2 or, budgeted, by a backtracking engine)."""
        return sum(len(g.fallback) for g in self._groups)

    @property
    def re2_count(self) -> int:
        return sum(1 for g in self._groups for _, engine, _ in g.fallback if engine == _RE2)

    @property
    def budgeted_count(self) -> int:
        """Active patterns that need backtracking and run under the per-message time budget."""
        return sum(1 for g in self._groups for _, engine, _ in g.fallback if engine == _BT)

    @property
    def budget_ms(self) -> float:
        return self._budget_s * 1000.0

    @property
    def refused(self) -> dict[str, str]:
        """Rules kept in the set but not run, each with the reason (see RuleRefused)."""
        return dict(self._refused)

    @property
    def hyperscan_count(self) -> int:
        return sum(len(g.hs_ids) for g in self._groups)

    def get(self, name: str) -> Rule | None:
        idx = self._index.get(name)
        return dataclasses.replace(self._rules[idx]) if idx is not None else None

    def __len__(self) -> int:
        return len(self._rules)

    # -- changes (each returns a new engine) ------------------------------------------

    def _derive(self, rules: Iterable[Rule], threshold: float | None = None) -> RuleEngine:
        return RuleEngine(rules, self._threshold if threshold is None else threshold, budget_ms=self.budget_ms)

    def with_rule(self, rule: Rule) -> RuleEngine:
        """Add ``rule``, or replace the rule of the same name. RuleRefused when ``rule`` itself cannot run within
        bounded work (rules refused before stay as they are); ``validate_rule`` also gives it a trial run."""
        rules = list(self._rules)
        idx = self._index.get(rule.name)
        if idx is None:
            rules.append(rule)
        else:
            rules[idx] = rule
        engine = self._derive(rules)
        why = engine._refused.get(rule.name)
        if why is not None:
            raise RuleRefused(why)
        return engine

    def without_rule(self, name: str) -> RuleEngine:
        if name not in self._index:
            raise RuleError(f"no rule named {name!r}")
        return self._derive([r for r in self._rules if r.name != name])

    def with_enabled(self, name: str, enabled: bool) -> RuleEngine:
        idx = self._index.get(name)
        if idx is None:
            raise RuleError(f"no rule named {name!r}")
        rules = list(self._rules)
        rules[idx] = dataclasses.replace(rules[idx], enabled=bool(enabled))
        engine = self._derive(rules)
        why = engine._refused.get(name)
        if enabled and why is not None:
            raise RuleRefused(why)
        return engine

    def with_threshold(self, threshold: float) -> RuleEngine:
        return self._derive(self._rules, threshold)

    def order_added(self) -> list[str]:
        """Rule names in the order they were written (``added`` date, then file order)."""
        order = sorted(range(len(self._rules)), key=lambda i: (str(self._rules[i].added), i))
        return [self._rules[i].name for i in order]

    def first(self, n: int) -> RuleEngine:
        """Only the first ``n`` rules in the order added stay enabled (for the rules curve).

        The later rules stay in the set, disabled, so meta references remain valid
        (a disabled rule counts as not hit)."""
        keep = set(self.order_added()[: max(0, int(n))])
        rules = [r if r.name in keep else dataclasses.replace(r, enabled=False) for r in self._rules]
        return self._derive(rules)

    # -- evaluation ----------------------------------------------------------------------

    def evaluate(self, msg: ParsedMessage) -> RuleResult:
        """Score one parsed message: the sum of the weights of the rules that hit."""
        hits = bytearray(len(self._rules))
        hmap = _header_map(msg)
        budget = _Budget(self._budget_s + BUDGET_MS_PER_KB / 1000.0 * len(msg.raw) / 1024.0)
        for g in self._groups:
            t = g.target
            if t == "full":
                data = msg.raw
            else:
                if t == "body":
                    text = (msg.subject + "\n" + msg.body_text) if msg.subject else msg.body_text
                elif t == "rawbody":
                    text = msg.raw_body
                elif t == "uri":
                    text = "\n".join(msg.urls)
                else:
                    text = hmap.get(g.hname, "") if g.plain else _header_value(msg, g.hname, g.hmod, hmap)
                    if not text and g.unset is not None:
                        text = g.unset  # SpamAssassin's [if-unset: STR]
                data = text.encode("utf-8", "surrogatepass")
            if data:
                g.match(data, hits, budget)
            else:
                for i in g.empty_hits:
                    hits[i] = 1
        for i in self._negated:
            hits[i] ^= 1
        if self._exists:
            present = {k for k, _ in msg.headers}
            for i, name in self._exists:
                if (
                    name in present
                    or (name == "tocc" and ("to" in present or "cc" in present))
                    or (name == DEFECTS_HEADER and msg.defects)
                    or (name == ATTACHMENTS_HEADER and msg.attachments)
                    or (name == AUTH_HEADER and msg.auth)
                ):
                    hits[i] = 1
        for i, fn in self._metas:
            hits[i] = 1 if fn(hits) else 0
        # Walk the set entries only (bytearray.find is a C scan), in rule order so the float sum is unchanged.
        score = 0.0
        out: list[RuleHit] = []
        table = self._hit_table
        find = hits.find
        i = find(1)
        while i >= 0:
            entry = table[i]
            if entry is not None:
                score += entry[0]
                if entry[1] is not None:
                    out.append(entry[1])
            i = find(1, i + 1)
        score = round(score, 6)
        result = RuleResult(score=score, threshold=self._threshold, is_spam=score >= self._threshold, hits=out)
        if budget.timed_out:
            result.timed_out = [self._rules[i].name for i in budget.timed_out]
        return result


# ---------------------------------------------------------------------------------------
# Validation before a rule is saved
# ---------------------------------------------------------------------------------------

_TRIAL_SIZE = 32 * 1024
_TRIAL_MESSAGES: list[ParsedMessage] = []
_TRIAL_LOCK = threading.Lock()
_LITERAL_CHARS_RE = re.compile(r"\\.|[^\\[\](){}?*+|^$.]")


def _trial_messages() -> list[ParsedMessage]:
    """Messages a new rule is tried on: plain mail and hostile shapes (long runs of one letter, of blanks, of
    words and of tags, floods of headers and URLs), parsed once per process."""
    with _TRIAL_LOCK:
        if not _TRIAL_MESSAGES:
            from models import hostile
            from models.message import parse

            plain = (
                b"From: Alice <alice@example.test>\nTo: bob@example.test\nSubject: lunch on friday\n"
                b"Date: Mon, 1 Jul 2024 10:00:00 +0000\nMessage-ID: <1@example.test>\n\n"
                b"Hi Bob, are we still on for lunch? See http://example.test/menu for the menu.\n"
            )
            _TRIAL_MESSAGES.append(parse(plain))
            for name in ("long_line_char", "lookalike_run", "from_blanks", "header_long", "long_line_words",
                         "long_line_punct", "html_nesting", "html_links", "url_glued", "header_flood",
                         "encoded_subject", "mime_wide", "binary_junk"):
                _TRIAL_MESSAGES.append(parse(hostile.build(name, _TRIAL_SIZE)))
        return list(_TRIAL_MESSAGES)


def _trial_texts(pattern: str) -> list[bytes]:
    """Texts that make a backtracking pattern show an exponential or polynomial blow-up: long runs of the
    pattern's own literal characters (one at a time, and all of them in turn), of letters, blanks and digits,
    each with and without a last character that spoils the match."""
    lits: list[str] = []
    for m in _LITERAL_CHARS_RE.finditer(pattern):
        tok = m.group(0)
        ch = {"\\s": " ", "\\d": "7", "\\w": "w", "\\S": "x", "\\W": "-", "\\D": "d"}.get(tok, tok[-1])
        if ch not in lits and ch.isprintable():
            lits.append(ch)
        if len(lits) >= 12:
            break
    units = [*lits, "".join(lits), "a", " ", "0", "a ", "ab", "<a>"]
    out: list[bytes] = []
    for unit in dict.fromkeys(u for u in units if u):
        run = (unit * (_TRIAL_SIZE // (4 * len(unit)) + 1)).encode("utf-8", "surrogatepass")[: _TRIAL_SIZE // 4]
        out.append(run)
        out.append(run + b"\x00")
    return out


def validate_rule(
    engine: RuleEngine, rule: Rule | dict[str, Any], samples: Sequence[bytes] | None = None
) -> RuleEngine:
    """The one check a rule passes before it is saved anywhere: ``engine`` with ``rule`` added (or replacing
    the rule of its name), or RuleError (RuleRefused for a well-formed rule that cannot run within bounded
    work) whose message says why.

    Steps: the rule's fields (``Rule.from_dict`` for a mapping); its pattern compiled by the rule language
    (``re``) and by an engine with bounded time (hyperscan, RE2, or the budgeted backtracking engine); a meta
    expression within MAX_META_TERMS / MAX_META_CHARS / MAX_META_DEPTH, whose references resolve without a
    cycle; then a trial run: the rule alone evaluated on the trial messages (and on ``samples``, raw messages,
    when given) within the engine's time budget, and a backtracking pattern run on long runs of its own
    characters, each of which must finish within half of that budget.
    """
    from models.message import parse

    if not isinstance(rule, Rule):
        rule = Rule.from_dict(dict(rule))
    try:
        candidate = engine.with_rule(rule)
    except RecursionError:
        raise RuleRefused(f"rule {rule.name}: expression too deeply nested to compile") from None
    # the rule and what it depends on, alone: its time is its own
    needed: dict[str, Rule] = {}
    stack = [rule]
    while stack:
        r = stack.pop()
        if r.name in needed:
            continue
        needed[r.name] = r
        if r.kind == "meta":
            for ref in meta_references(r.pattern):
                dep = candidate.get(ref)
                if dep is not None:
                    stack.append(dep)
    alone = RuleEngine([dataclasses.replace(r, enabled=True) for r in needed.values()],
                       candidate.threshold, budget_ms=candidate.budget_ms, strict=True)
    half = alone._budget_s / 2.0
    msgs = _trial_messages() + [parse(raw) for raw in (samples or ())]
    for k, msg in enumerate(msgs):
        try:
            result = alone.evaluate(msg)
        except (RecursionError, MemoryError, ValueError, TypeError, ZeroDivisionError) as exc:
            raise RuleRefused(f"rule {rule.name}: fails on trial message {k}: {exc!r}"[:300]) from None
        if rule.name in result.timed_out:
            raise RuleRefused(
                f"rule {rule.name}: ran out of the {alone.budget_ms:g} ms time budget on trial message {k} "
                f"({msg.subject[:40]!r}); its pattern backtracks too much"
            )
    for g in alone._groups:
        for idx, kind, rx in g.fallback:
            why = _stalls(rx, alone._rules[idx].pattern, half) if kind == _BT else None
            if why is not None:
                raise RuleRefused(f"rule {alone._rules[idx].name}: {why}")
    return candidate


def _stalls(rx: Any, pattern: str, limit_s: float) -> str | None:
    """Why the budgeted pattern ``rx`` stalls (more than ``limit_s`` CPU seconds on one of its trial texts),
    or None."""
    for text in _trial_texts(pattern):
        t0 = time.thread_time()
        try:
            rx.search(text, timeout=limit_s)
        except TimeoutError:
            spent = limit_s
        else:
            spent = time.thread_time() - t0
        if spent >= limit_s:
            return (f"needs more than {limit_s * 1000:g} ms (half the time budget) on a {len(text)}-byte run of "
                    f"{text[:8]!r}...; its pattern backtracks too much")
    return None


# ---------------------------------------------------------------------------------------
# SpamAssassin import
# ---------------------------------------------------------------------------------------


def import_spamassassin(paths: Iterable[Path]) -> tuple[list[Rule], list[tuple[str, str]]]:
    """Import SpamAssassin ``.cf`` rule files; return (rules, skipped (name, reason)).

    Emulated: header (incl. ``exists:``, ``:addr``/``:name``, ``ALL``, ``ToCc``,
    ``[if-unset: ...]``), body, rawbody, uri, full and meta rules, ``score`` (score set 0:
    no Bayes, no network tests), ``describe``, ``tflags`` (``net`` rules skipped), the
    ReplaceTags plugin (``replace_tag``/``pre``/``inter``/``post``/``replace_rules``), and
    ``ifplugin``/``if`` blocks evaluated as SpamAssassin would with only ReplaceTags
    loaded. Skipped, with the reason: ``eval:`` rules (plugin code), rules inside blocks of
    plugins we do not emulate, network tests, pseudo-headers only SpamAssassin computes,
    regexes Python cannot compile, metas depending on any skipped rule. Files are read in
    the order given (sort them by name as SpamAssassin does); later lines override.
    """
    return _SAImporter().run(paths)


_SA_EMULATED_PLUGINS = {"Mail::SpamAssassin::Plugin::ReplaceTags"}
_SA_VERSION = 4.0
_SA_PSEUDO_HEADERS = re.compile(r"^(?:X-Spam-Relays-|ALL-TRUSTED|ALL-UNTRUSTED|ALL-INTERNAL|ALL-EXTERNAL|X-Spam-|Received-SPF|X-Spam-DCC)", re.I)
_SA_RULE_KINDS = {"header", "body", "rawbody", "uri", "full", "meta"}
_SA_UNSUPPORTED_KINDS = {
    "mimeheader": "mimeheader needs the MIMEHeader plugin",
    "uri_detail": "uri_detail needs the URIDetail plugin",
    "askdns": "askdns is a network test",
    "urirhssub": "URI blocklist lookups are network tests",
    "urirhsbl": "URI blocklist lookups are network tests",
    "uridnsbl": "URI blocklist lookups are network tests",
    "uridnssub": "URI blocklist lookups are network tests",
    "check_rbl": "DNS blocklist lookups are network tests",
}
_POSIX_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": r"\s", "punct": r"!-/:-@\[-`{-~", "print": r"\x20-\x7e", "xdigit": "0-9A-Fa-f",
    "word": r"\w", "cntrl": r"\x00-\x1f\x7f", "blank": r" \t", "graph": r"\x21-\x7e",
}
_POSIX_RE = re.compile(r"\[:(\^?)(" + "|".join(_POSIX_CLASSES) + r"):\]")
_PERL_UNSUPPORTED = [
    (re.compile(r"\\[KRXCGNV]|\\[pP]\{|\\Q|\\E"), "Perl escape Python lacks"),
    (re.compile(r"\(\?\||\(\?\{|\(\?\?\{|\(\?R\)|\(\?\d|\(\?&|\(\?\+"), "Perl construct Python lacks (branch reset, code, recursion)"),
    (re.compile(r"\\[gk]\{?\d|\\g\{"), "relative back reference"),
]


def perl_to_python_regex(regex: str) -> str:
    """Rewrite the Perl regex features that Python spells differently; raise RuleError
    for those it has no equivalent of."""
    for rx, reason in _PERL_UNSUPPORTED:
        if rx.search(regex):
            raise RuleError(reason)
    out = _POSIX_RE.sub(lambda m: ("^" if m.group(1) else "") + _POSIX_CLASSES[m.group(2)], regex)
    out = out.replace(r"\z", r"\Z").replace(r"\h", r"[ \t]")
    out = re.sub(r"\(\?<(?=[A-Za-z_])", "(?P<", out)
    out = re.sub(r"(?<!\\)\\Z(?!\))", r"(?=\\n?\\Z)", out) if r"\Z" in regex else out
    # a Perl mid-pattern (?i) applies to the rest of the pattern; Python 3.11 refuses it
    m = re.search(r"(?<!\\)\(\?([imsx]+)\)", out)
    if m is not None and m.start() > 0:
        raise RuleError("inline flag group not at the start of the pattern")
    return out


class _SAImporter:
    def __init__(self) -> None:
        self.defs: dict[str, tuple[str, str, str]] = {}  # name -> (kind, body, file)
        self.order: list[str] = []
        self.scores: dict[str, float] = {}
        self.describe: dict[str, str] = {}
        self.tflags: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.pre: dict[str, str] = {}
        self.inter: dict[str, str] = {}
        self.post: dict[str, str] = {}
        self.replace_rules: set[str] = set()
        self.tag_start, self.tag_end = "<", ">"

    # -- reading -----------------------------------------------------------------------

    def run(self, paths: Iterable[Path]) -> tuple[list[Rule], list[tuple[str, str]]]:
        for path in paths:
            try:
                data = Path(path).read_bytes()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    text = data.decode("latin-1")
            except OSError as exc:
                self.skipped[f"file:{path}"] = f"cannot read: {exc}"
                continue
            self._read(text, Path(path).name)
        return self._build()

    def _read(self, text: str, fname: str) -> None:
        stack: list[tuple[bool, str]] = []  # (active, why inactive)

        def active() -> tuple[bool, str]:
            for ok, why in stack:
                if not ok:
                    return False, why
            return True, ""

        for raw_line in text.splitlines():
            line = re.sub(r"(?<!\\)#.*$", "", raw_line).replace("\\#", "#").strip()
            if not line:
                continue
            parts = line.split(None, 1)
            key = parts[0].lower()
            rest = parts[1] if len(parts) > 1 else ""
            if key == "ifplugin":
                plugin = rest.strip()
                ok = plugin in _SA_EMULATED_PLUGINS
                stack.append((ok, f"needs SpamAssassin plugin {plugin.rsplit('::', 1)[-1]}"))
                continue
            if key == "if":
                ok = self._eval_if(rest)
                stack.append((ok, f"inside 'if {rest.strip()}' which is false here"))
                continue
            if key == "else":
                if stack:
                    ok, why = stack.pop()
                    stack.append((not ok, "inside the else branch of a true 'if'"))
                continue
            if key == "endif":
                if stack:
                    stack.pop()
                continue
            on, why = active()
            if key in _SA_RULE_KINDS or key in _SA_UNSUPPORTED_KINDS:
                name_rest = rest.split(None, 1)
                if not name_rest:
                    continue
                name = name_rest[0]
                body = name_rest[1] if len(name_rest) > 1 else ""
                if not on:
                    if name not in self.defs:
                        self.skipped.setdefault(name, why)
                    continue
                if key in _SA_UNSUPPORTED_KINDS:
                    self.skipped[name] = _SA_UNSUPPORTED_KINDS[key]
                    self.defs.pop(name, None)
                    continue
                if name not in self.defs:
                    self.order.append(name)
                self.defs[name] = (key, body, fname)
                self.skipped.pop(name, None)
                continue
            if not on:
                continue
            if key == "score":
                bits = rest.split()
                if len(bits) >= 2:
                    with contextlib.suppress(ValueError):
                        self.scores[bits[0]] = float(bits[1])  # score set 0 (no Bayes, no net)
            elif key == "describe":
                bits = rest.split(None, 1)
                if len(bits) == 2:
                    self.describe[bits[0]] = bits[1]
            elif key == "tflags":
                bits = rest.split(None, 1)
                if len(bits) == 2:
                    self.tflags[bits[0]] = bits[1]
            elif key == "replace_tag":
                bits = rest.split(None, 1)
                if len(bits) == 2:
                    self.tags[bits[0]] = bits[1]
            elif key in ("replace_pre", "replace_inter", "replace_post"):
                bits = rest.split(None, 1)
                if len(bits) == 2:
                    {"replace_pre": self.pre, "replace_inter": self.inter, "replace_post": self.post}[key][bits[0]] = bits[1]
            elif key == "replace_rules":
                self.replace_rules.update(rest.split())
            elif key == "replace_start":
                self.tag_start = rest.strip() or "<"
            elif key == "replace_end":
                self.tag_end = rest.strip() or ">"

    @staticmethod
    def _eval_if(expr: str) -> bool:
        e = expr.strip()
        neg = False
        while e.startswith("(") and e.endswith(")") and e.count("(") == e.count(")"):
            e = e[1:-1].strip()
        if e.startswith("!"):
            neg, e = True, e[1:].strip()
            while e.startswith("(") and e.endswith(")"):
                e = e[1:-1].strip()
        if e.startswith("plugin(") or e.startswith("plugin ("):
            val = e[e.index("(") + 1 : e.rindex(")")].strip() in _SA_EMULATED_PLUGINS
        elif e.startswith("version"):
            m = re.match(r"version\s*(>=|<=|>|<|==)\s*([\d.]+)", e)
            if m is None:
                val = True
            else:
                op, num = m.group(1), float(m.group(2))
                val = {">=": num <= _SA_VERSION, "<=": num >= _SA_VERSION, ">": num < _SA_VERSION,
                       "<": num > _SA_VERSION, "==": num == _SA_VERSION}[op]
        else:
            val = True  # can(feature_...), perl_version: a modern SpamAssassin has them
        return val != neg

    # -- building ----------------------------------------------------------------------

    def _apply_tags(self, name: str, pattern: str) -> str:
        if name not in self.replace_rules or not self.tags:
            return pattern
        st, en = re.escape(self.tag_start), re.escape(self.tag_end)
        pre = inter = post = ""
        for kind, table in (("pre", self.pre), ("inter", self.inter), ("post", self.post)):
            m = re.search(st + kind + r"\s+(\w+)" + en, pattern)
            if m is not None:
                val = table.get(m.group(1), "")
                pattern = pattern.replace(m.group(0), "")
                if kind == "pre":
                    pre = val
                elif kind == "inter":
                    inter = val
                else:
                    post = val
        tag_re = re.compile(st + r"(\w+)" + en)
        if inter:
            pattern = re.sub(en + r"(?=" + st + r"\w+" + en + ")", lambda m: self.tag_end + "\x00", pattern)
        pattern = tag_re.sub(lambda m: pre + self.tags[m.group(1)] + post if m.group(1) in self.tags else m.group(0), pattern)
        return pattern.replace("\x00", inter)

    def _convert(self, name: str, kind: str, body: str) -> Rule:
        flags = self.tflags.get(name, "")
        if re.search(r"\bnet\b", flags):
            raise RuleError("network test (tflags net)")
        if re.search(r"\blearn\b", flags):
            raise RuleError("Bayes learning test (tflags learn)")
        body = body.strip()
        if kind != "meta" and re.search(r"^\s*(?:[\w\-:]+\s+)?(?:eval|rbleval|check_\w+):", body):
            raise RuleError("eval rule needs SpamAssassin plugin code")
        if kind == "meta" and "eval:" in body:
            raise RuleError("eval rule needs SpamAssassin plugin code")
        score = self.scores.get(name)
        if score is None:  # SpamAssassin's defaults: sub-rules 0, testing rules 0.01, "nice" -1
            if name.startswith("__"):
                score = 0.0
            elif name.startswith("T_"):
                score = 0.01
            else:
                score = -1.0 if re.search(r"\bnice\b", flags) else 1.0
        common: dict[str, Any] = {
            "weight": score,
            "description": self.describe.get(name, ""),
            "added": "2002-01-01",
            "source": "spamassassin",
        }
        if kind == "meta":
            _MetaParser(body, lambda ref: 0).parse()  # syntax and size limits (references are checked later)
            return Rule(name=name, kind="meta", pattern=body, **common)
        if kind == "header":
            m = _EXISTS_RE.match(body)
            if m is not None:
                return Rule(name=name, kind="header", pattern=f"exists:{m.group(1)}", **common)
            m = _HEADER_EXPR_RE.match(body)
            if m is None:
                raise RuleError("unrecognised header rule")
            hdr, op, rest, unset_part, _ = m.groups()
            if _SA_PSEUDO_HEADERS.match(hdr):
                raise RuleError(f"needs pseudo-header {hdr.split(':')[0]} that only SpamAssassin computes")
            regex, fl = split_delimited(self._apply_tags(name, rest))
            regex = perl_to_python_regex(regex)
            pattern = f"{hdr} {op} /{regex}/{fl}" + (f" {unset_part}" if unset_part else "")
            rule = Rule(name=name, kind="header", pattern=pattern, **common)
        else:
            regex, fl = split_delimited(self._apply_tags(name, body))
            if regex == body:
                raise RuleError("pattern is not a /regex/")
            rule = Rule(name=name, kind=kind, pattern=f"/{perl_to_python_regex(regex)}/{fl}", **common)
        spec = _rule_spec(0, rule)
        _py_compile(spec, name)
        if _re2_compile(spec) is None:
            bt = _bt_compile(spec)
            if bt is None:
                hs = _hs_pattern(spec)
                if hs is None or not _hs_single_ok(*hs):
                    raise RuleRefused("runs on no engine with bounded time (hyperscan, RE2, budgeted backtracking)")
            elif _HS_UNSUPPORTED_RE.search(_plain(spec).regex) is not None:
                why = _stalls(bt, spec.regex, DEFAULT_BUDGET_MS / 2000.0)  # it will run under the budget
                if why is not None:
                    raise RuleRefused(why)
        return rule

    def _build(self) -> tuple[list[Rule], list[tuple[str, str]]]:
        rules: dict[str, Rule] = {}
        skipped = dict(self.skipped)
        for name in self.order:
            if name not in self.defs:
                continue
            kind, body, _ = self.defs[name]
            try:
                rules[name] = self._convert(name, kind, body)
            except RuleError as exc:
                reason = str(exc).split(": ", 1)[-1] if str(exc).startswith(f"rule {name}:") else str(exc)
                if reason.startswith("bad regex"):
                    reason = "regex Python cannot compile: " + reason.split(": ", 2)[-1]
                skipped[name] = reason
        # metas that refer to anything not imported are dropped (their meaning would change)
        changed = True
        while changed:
            changed = False
            for name, rule in list(rules.items()):
                if rule.kind != "meta":
                    continue
                try:
                    refs = meta_references(rule.pattern)
                except RuleError as exc:
                    skipped[name] = f"bad meta expression: {exc}"
                    del rules[name]
                    changed = True
                    continue
                missing = sorted(r for r in refs if r not in rules)
                if missing:
                    why = "skipped" if missing[0] in skipped else "undefined"
                    skipped[name] = f"meta depends on {why} rule {missing[0]}"
                    del rules[name]
                    changed = True
        out = list(rules.values())
        # validate the whole set once (meta syntax, cycles); drop offenders one by one
        while True:
            try:
                RuleEngine(out)
                break
            except RuleError as exc:
                m = re.match(r"rule (\w+): (.*)", str(exc))
                if m is None:
                    raise
                skipped[m.group(1)] = m.group(2)
                out = [r for r in out if r.name != m.group(1)]
        for r in out:
            skipped.pop(r.name, None)
        return out, sorted(skipped.items())
