"""Validation before a rule is saved: ``validate_rule`` compiles a rule into an engine, then gives it a trial run
on plain and hostile messages, and on long runs of its own characters, within the time budget.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from models.message import ParsedMessage
from models.rules.engine import RuleEngine
from models.rules.meta import meta_references
from models.rules.model import Rule, RuleRefused
from models.rules.patterns import _BT

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
