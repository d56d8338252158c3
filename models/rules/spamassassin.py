"""SpamAssassin import: ``.cf`` rule files read into Flywheel rules, with what cannot be emulated skipped and
named.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from models.rules.engine import RuleEngine
from models.rules.groups import _HS_UNSUPPORTED_RE, _hs_pattern, _hs_single_ok
from models.rules.meta import _MetaParser, meta_references
from models.rules.model import Rule, RuleError, RuleRefused
from models.rules.patterns import (
    _EXISTS_RE,
    _HEADER_EXPR_RE,
    DEFAULT_BUDGET_MS,
    _bt_compile,
    _plain,
    _py_compile,
    _re2_compile,
    _rule_spec,
    split_delimited,
)
from models.rules.validation import _stalls


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
