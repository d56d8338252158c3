"""The rule engine: a compiled, immutable rule set that scores parsed messages, and the texts header rules match
(computed selectors such as ``ALL`` and ``ToCc``, and the ``:addr`` and ``:name`` of a header).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
import yaml

from models.message import ParsedMessage
from models.rules.groups import _Group
from models.rules.meta import Evaluator, _MetaParser, _never, meta_references
from models.rules.model import (
    _NAME_RE,
    ATTACHMENTS_HEADER,
    AUTH_HEADER,
    DEFAULT_RULES_PATH,
    DEFECTS_HEADER,
    KINDS,
    Rule,
    RuleError,
    RuleHit,
    RuleRefused,
    RuleResult,
)
from models.rules.patterns import (
    _BT,
    _RE2,
    BUDGET_MS_PER_KB,
    DEFAULT_BUDGET_MS,
    _Budget,
    _py_compile,
    _rule_spec,
    _Spec,
)

log = structlog.get_logger(__package__)  # the package's logger: records are named models.rules


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
    """A compiled, immutable rule set (see the package docstring, ``models.rules``)."""

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
