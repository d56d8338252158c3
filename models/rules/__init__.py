"""The rule baseline: SpamAssassin-like weighted rules compiled into hyperscan databases.

A rule set is declarative (YAML): a threshold and rules, each with a kind (header, body,
rawbody, uri, full or meta), a pattern, a weight, a description and the date it was
added (the order rules were written is an axis of the improvement curve).

All non-meta patterns of one target text (the body, the raw body, the URI list, the raw
message, one header) are compiled into ONE hyperscan database, so a message costs one scan
per target however many rules there are. Every pattern runs in bounded time: what hyperscan
will not take runs on RE2 (linear time too), and what needs backtracking (look-arounds, back
references) on a backtracking engine under a per-message time budget that stops it (see
"Engines" in ``patterns``). A rule no engine can run within bounds is refused with the reason:
``validate_rule`` is the check a rule passes before it is saved. Meta rules are
boolean/arithmetic expressions over other rules, parsed into a small AST (never ``eval``),
with limits on their size and depth.

A ``RuleEngine`` is immutable once built: it is safe to share across threads (each thread
gets its own hyperscan scratch), and every change returns a new engine so callers can swap
the reference atomically.

The modules, in the order they build on each other:

- ``model``: ``Rule``, ``RuleHit``, ``RuleResult``, the errors, the kinds and pseudo-headers;
- ``patterns``: the pattern forms, and the engines besides hyperscan (RE2, the budgeted one);
- ``meta``: meta expressions, parsed into closures within their limits;
- ``groups``: one target's patterns in one hyperscan database, with their fallbacks;
- ``engine``: ``RuleEngine``, and the texts header rules match;
- ``validation``: ``validate_rule``, the trial run a rule passes before it is saved;
- ``spamassassin``: ``import_spamassassin``, SpamAssassin ``.cf`` files read into rules.

``default.yaml`` beside them is Flywheel's own rule set (``RuleEngine.default()``).
"""

from __future__ import annotations

from models.rules.engine import RuleEngine
from models.rules.meta import MAX_META_CHARS, MAX_META_DEPTH, MAX_META_TERMS
from models.rules.model import DEFAULT_RULES_PATH, KINDS, Rule, RuleError, RuleHit, RuleRefused, RuleResult
from models.rules.patterns import BUDGET_MS_PER_KB, DEFAULT_BUDGET_MS, strip_verbose
from models.rules.spamassassin import import_spamassassin
from models.rules.validation import validate_rule

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
