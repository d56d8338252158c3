"""The served verdict: rules and the learned model side by side, combined into one calibrated probability.

Design (numbers in the models issue's closing note, from ``flywheel eval``):

* The model's probability ``p_m`` and the rule score ``s`` are both kept and returned (every answer shows both
  sides). The rule hits are also inputs of the model (hashed "rule:NAME" tokens), so the model already sees
  *which* rules fired; the blend adds the engine's *weighted sum* on the same footing as the model's logit.
* Policy ``combined`` (default): ``p = sigmoid(w_m * logit(p_m) + w_r * s + b)``, a 3-parameter logistic
  stacking fit on a hold-out carved out of the training period (never the test period). The parameters and
  the operating threshold are stored in the model version's ``meta.json["calibration"]``, so they are versioned
  with the model they were fitted for and a rollback restores both together.
* The operating threshold is the lowest one whose hold-out false-positive rate stays within the FPR budget
  (0.1% by default): a spam filter that loses real mail is worse than one that lets some spam through.
* ``model``: the model's probability and its own threshold; ``rules``: the engine's score against its own
  threshold, with a 2-parameter Platt-calibrated probability for display; ``either``: spam when either side
  says so (higher recall, higher FPR).

The rule engine and the model are single attributes read once per call, so the API swaps either by plain
assignment (``classifier.rules = new_engine``) or by building a new Classifier; a call in flight finishes on
the objects it started with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from models.message import DEFAULT_MAX_BYTES, ParsedMessage, parse
from models.registry import LoadedModel
from models.rules import RuleEngine, RuleResult

if TYPE_CHECKING:
    from models.campaign import CampaignHit, CampaignIndex

POLICIES = ("combined", "model", "rules", "either")

# Logits are clipped so that a saturated probability (0 or 1 in float32) stays finite in the blend; the graphs
# give unsaturated logits, so the clip is wide enough not to tie confident messages together.
_LOGIT_CLIP = 50.0


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.clip(np.log(p) - np.log1p(-p), -_LOGIT_CLIP, _LOGIT_CLIP)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True, slots=True)
class Calibration:
    """Parameters that turn (model logit, rule score) into the served probability and verdict.

    ``w_model, w_rules, bias``: the combined logistic blend ``sigmoid(w_model * z + w_rules * s + bias)`` where
    ``z`` is the model's logit (unsaturated, read from the graph's ``logit`` output); ``threshold``: its
    operating point (a probability); ``model_threshold_logit``: the model-alone operating point as a logit;
    ``rules_a, rules_b``: Platt scaling of the rule score (``sigmoid(rules_a * s + rules_b)``) used for the
    rules side's displayed probability.
    """

    w_model: float = 1.0
    w_rules: float = 0.0
    bias: float = 0.0
    threshold: float = 0.5
    model_threshold_logit: float = 0.0
    rules_a: float = 1.0
    rules_b: float = -5.0
    fpr_budget: float = 0.001

    @classmethod
    def from_meta(cls, cal: Mapping[str, Any] | None, rules_threshold: float = 5.0) -> Calibration:
        """Read ``meta.json["calibration"]``; without one the model decides alone at p = 0.5 (a safe default)."""
        if not cal:
            return cls(rules_b=-float(rules_threshold))
        fields = {k: float(cal[k]) for k in cls.__dataclass_fields__ if k in cal and cal[k] is not None}
        return cls(**fields)

    def to_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.__dataclass_fields__}

    @property
    def model_threshold(self) -> float:
        """The model-alone operating point as a probability (for display)."""
        return float(sigmoid(self.model_threshold_logit))

    def combined_logit(self, z_model: np.ndarray, rule_score: np.ndarray) -> np.ndarray:
        """Log-odds of the served probability (unbounded: rank by this, the probability saturates)."""
        z = np.clip(np.asarray(z_model, dtype=np.float64), -_LOGIT_CLIP, _LOGIT_CLIP)
        return self.w_model * z + self.w_rules * np.asarray(rule_score, dtype=np.float64) + self.bias

    def combined(self, z_model: np.ndarray, rule_score: np.ndarray) -> np.ndarray:
        return sigmoid(self.combined_logit(z_model, rule_score))

    def rules_probability(self, rule_score: np.ndarray) -> np.ndarray:
        return sigmoid(self.rules_a * np.asarray(rule_score, dtype=np.float64) + self.rules_b)


@dataclass(frozen=True, slots=True)
class ModelSide:
    """The learned model's half of an answer."""

    probability: float
    is_spam: bool
    version: str
    provider: str
    kind: str
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "probability": self.probability, "is_spam": self.is_spam, "version": self.version,
            "provider": self.provider, "kind": self.kind, "threshold": self.threshold,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """One served answer: the final decision plus both sides that fed it."""

    is_spam: bool
    probability: float
    threshold: float  # of the deciding side (policy "either": the model's)
    decided_by: str  # "combined" | "model" | "rules" | "both" (policy "either": both sides agreed)
    policy: str
    rules: RuleResult
    rules_probability: float
    model: ModelSide
    score: float = 0.0  # log-odds of ``probability``, unbounded: rank by this (the probability saturates)
    campaign: CampaignHit | None = None  # the campaign-memory fingerprint that matched, if any (models.campaign)
    user_list: str | None = None  # "allow" | "block": the named user's list decided (models.userlists)

    def to_dict(self) -> dict[str, Any]:
        return {
            "is_spam": self.is_spam,
            "probability": self.probability,
            "score": self.score,
            "threshold": self.threshold,
            "decided_by": self.decided_by,
            "policy": self.policy,
            "rules": {
                "score": float(self.rules.score),
                "threshold": float(self.rules.threshold),
                "is_spam": bool(self.rules.is_spam),
                "probability": self.rules_probability,
                "hits": [{"name": h.name, "weight": float(h.weight), "description": h.description} for h in self.rules.hits],
            },
            "model": self.model.to_dict(),
            "campaign": self.campaign.to_dict() if self.campaign is not None else None,
            "list": self.user_list,
        }

    def with_list(self, decision: str | None) -> Verdict:
        """This verdict as the user's list decides it: "block" is spam, "allow" ham (``decided_by`` "list"); the
        probability and both sides stay as scored, so the answer still shows what the models thought."""
        if decision not in ("allow", "block"):
            return self
        return replace(self, is_spam=decision == "block", decided_by="list", user_list=decision)


class Classifier:
    """Parse, run the rules, score with the model, combine under ``policy``.

    ``rules`` and ``model`` are public attributes: assigning a new engine or LoadedModel swaps it for the next
    call without locks (each call reads both once).

    ``campaign``, when set, is the campaign memory (``models.campaign.CampaignIndex``) consulted after both
    sides: a match at its threshold with a spam fingerprint (one no ham fingerprint is as near to) makes the
    verdict spam whatever the model and the rules said (``decided_by`` "campaign"; the probability and score
    stay the blend's, so ranking is unchanged). A ham match never turns a spam verdict into ham: it only keeps
    campaign memory from blocking the message (a spammer flagging their own mail as "not spam" gains nothing).
    """

    def __init__(
        self, rules: RuleEngine, model: LoadedModel, policy: str = "combined", max_bytes: int = DEFAULT_MAX_BYTES,
        campaign: CampaignIndex | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.rules = rules
        self.model = model
        self.policy = policy
        self.max_bytes = max_bytes
        self.campaign: CampaignIndex | None = campaign
        self._cal: tuple[LoadedModel, float, Calibration] | None = None

    def _calibration(self, loaded: LoadedModel, rules_threshold: float) -> Calibration:
        """Parsed once per (model, rule threshold) pair, not per request."""
        cached = self._cal
        if cached is not None and cached[0] is loaded and cached[1] == rules_threshold:
            return cached[2]
        cal = Calibration.from_meta(loaded.calibration, rules_threshold=rules_threshold)
        self._cal = (loaded, rules_threshold, cal)
        return cal

    def classify(self, raw: bytes) -> Verdict:
        return self.classify_batch([raw])[0]

    def classify_parsed(self, msgs: Sequence[ParsedMessage]) -> list[Verdict]:
        """Score already-parsed messages (one batched ONNX call)."""
        from models.features import featurize

        engine, loaded = self.rules, self.model  # read once: a concurrent swap does not mix two versions
        results = [engine.evaluate(m) for m in msgs]
        if not msgs:
            return []
        outs = loaded.model.run(featurize(msgs, results, loaded.features))
        p_model = np.asarray(outs["prob"], dtype=np.float64).reshape(-1)
        z_model = np.asarray(outs["logit"], dtype=np.float64).reshape(-1) if "logit" in outs else logit(p_model)
        verdicts = self._combine(results, p_model, z_model, loaded, engine)
        memory = self.campaign
        if memory is not None and len(memory):
            verdicts = [self._with_campaign(memory, m, v) for m, v in zip(msgs, verdicts, strict=True)]
        return verdicts

    @staticmethod
    def _with_campaign(memory: CampaignIndex, msg: ParsedMessage, v: Verdict) -> Verdict:
        from models.campaign import fingerprint

        hit = memory.query(fingerprint(msg.subject, msg.body_text))
        if hit is None:
            return v
        if hit.flagged == "spam" and not v.is_spam:
            return replace(v, is_spam=True, decided_by="campaign", campaign=hit)
        return replace(v, campaign=hit)

    def classify_batch(self, raws: Sequence[bytes]) -> list[Verdict]:
        return self.classify_parsed([parse(r, max_bytes=self.max_bytes) for r in raws])

    def _combine(
        self, results: Sequence[RuleResult], p_model: np.ndarray, z_model: np.ndarray, loaded: LoadedModel,
        engine: RuleEngine,
    ) -> list[Verdict]:
        cal = self._calibration(loaded, float(engine.threshold))
        scores = np.array([r.score for r in results], dtype=np.float64)
        z_rules = cal.rules_a * scores + cal.rules_b
        p_rules = sigmoid(z_rules)
        z_comb = cal.combined_logit(z_model, scores)
        p_comb = sigmoid(z_comb)
        out: list[Verdict] = []
        for i, rr in enumerate(results):
            pm = float(p_model[i])
            m_spam = bool(z_model[i] >= cal.model_threshold_logit)
            side = ModelSide(pm, bool(m_spam), loaded.version, loaded.provider, loaded.kind, cal.model_threshold)
            pr = float(p_rules[i])
            if self.policy == "combined":
                prob, thr, spam, by = float(p_comb[i]), cal.threshold, bool(p_comb[i] >= cal.threshold), "combined"
                score = float(z_comb[i])
            elif self.policy == "model":
                prob, thr, spam, by, score = pm, cal.model_threshold, bool(m_spam), "model", float(z_model[i])
            elif self.policy == "rules":
                prob, thr, spam, by = pr, float(rr.threshold), bool(rr.is_spam), "rules"
                score = float(z_rules[i])
            else:  # either: spam if any side says spam; the probability is the more alarmed side's
                spam = bool(rr.is_spam or m_spam)
                by = "both" if rr.is_spam == m_spam else ("rules" if rr.is_spam else "model")
                prob, thr = max(pr, pm), cal.model_threshold
                score = float(max(z_rules[i], z_model[i]))
            out.append(Verdict(spam, prob, thr, by, self.policy, rr, pr, side, score))
        return out


# --------------------------------------------------------------------------------------------- fitting
def fit_calibration(
    z_model: Sequence[float] | np.ndarray,
    rule_scores: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    *,
    fpr_budget: float = 0.001,
    l2: float = 1e-3,
) -> Calibration:
    """Fit the blend and both thresholds on a training-period hold-out (never on test data).

    ``z_model`` are the model's logits on the hold-out. The blend is an L2-regularised logistic regression on
    (z, rule score) solved by Newton steps: 3 parameters, so a few hundred hold-out messages pin it down.
    Thresholds: the lowest score whose hold-out FPR stays within ``fpr_budget``.
    """
    y = np.asarray(labels, dtype=np.float64)
    z = np.clip(np.asarray(z_model, dtype=np.float64), -_LOGIT_CLIP, _LOGIT_CLIP)
    s = np.asarray(rule_scores, dtype=np.float64)
    x = np.column_stack([z, s, np.ones_like(s)])
    t = platt_targets(y)
    w_comb = _newton_logreg(x, t, l2)
    w_rules = _newton_logreg(np.column_stack([s, np.ones_like(s)]), t, l2)
    p_comb = sigmoid(x @ w_comb)
    return Calibration(
        w_model=float(w_comb[0]), w_rules=float(w_comb[1]), bias=float(w_comb[2]),
        threshold=threshold_for_fpr(p_comb, y, fpr_budget),
        model_threshold_logit=threshold_for_fpr(np.asarray(z_model, dtype=np.float64), y, fpr_budget),
        rules_a=float(w_rules[0]), rules_b=float(w_rules[1]), fpr_budget=fpr_budget,
    )


def platt_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's (1999) smoothed targets: ``(N+ + 1) / (N+ + 2)`` for spam, ``1 / (N- + 2)`` for ham.

    A hold-out the model separates perfectly (common: the hold-out is easy, or small) has no finite maximum
    likelihood with 0/1 targets, and Newton's method then drives the blend's weights towards infinity: the
    served probability saturates to exactly 1.0 for most spam and some ham, and its ranking is lost. The smoothed
    targets keep the fit finite and barely move it when the classes overlap.
    """
    y = np.asarray(labels, dtype=np.float64)
    n_pos, n_neg = float(y.sum()), float((1.0 - y).sum())
    return np.where(y > 0.5, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def _newton_logreg(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 50) -> np.ndarray:
    w = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2)
    reg[-1] = 0.0  # the intercept is not shrunk
    for _ in range(iters):
        p = sigmoid(x @ w)
        g = x.T @ (p - y) + reg * w
        h = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(h, g)
        w -= step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return w


def threshold_for_fpr(scores: np.ndarray, labels: np.ndarray, fpr_budget: float) -> float:
    """Smallest threshold t (spam iff score >= t) whose FPR on (scores, labels) is <= fpr_budget."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    ham = np.sort(scores[~labels])[::-1]
    if ham.size == 0:
        return 0.5
    allowed = math.floor(fpr_budget * ham.size + 1e-9)  # how many ham may sit at or above t
    # t must exceed the (allowed+1)-th highest ham score: take the midpoint to the next distinct score above it.
    bar = ham[allowed] if allowed < ham.size else -np.inf
    above = np.unique(scores[scores > bar])
    if above.size == 0:
        return float(np.nextafter(bar, np.inf))
    return float((bar + above[0]) / 2.0)


__all__ = [
    "POLICIES",
    "Calibration",
    "Classifier",
    "ModelSide",
    "Verdict",
    "fit_calibration",
    "logit",
    "platt_targets",
    "sigmoid",
    "threshold_for_fpr",
]
