"""What a rule set is made of: the rule record, a hit, the verdict on one message, and the errors a bad rule
(or one that cannot run within bounded work) raises; the rule kinds and the pseudo-headers the parser's findings are
matched under.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("header", "body", "rawbody", "uri", "full", "meta")
DEFAULT_RULES_PATH = Path(__file__).with_name("default.yaml")
DEFECTS_HEADER = "x-flywheel-defects"  # pseudo-header: the parser's defect flags, space separated
ATTACHMENTS_HEADER = "x-flywheel-attachments"  # pseudo-header: "filename; type" per attachment
AUTH_HEADER = "x-flywheel-auth"  # pseudo-header: trusted SPF/DKIM/DMARC outcomes, "spf=fail dkim=pass"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Header selectors whose text is computed (see ``engine._header_value``), not read from the message's headers.
_COMPUTED_HEADERS = frozenset(
    {"ALL", "ToCc", "MESSAGEID", "EnvelopeFrom", DEFECTS_HEADER, ATTACHMENTS_HEADER, AUTH_HEADER}
)


class RuleError(ValueError):
    """A rule (or rule file) is invalid; the message says which rule and why."""


class RuleRefused(RuleError):
    """A rule is well formed but cannot be run within bounded work (no engine with bounded time runs its
    pattern, its meta expression is too large or too deep, or it runs out of the time budget on the trial
    messages). A rule file holding one still loads: the rule is kept, inactive, in ``RuleEngine.refused``."""


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
