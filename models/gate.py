"""The gate: does a challenger replace the champion? Paired statistics on the same messages, and the evaluation
set they are measured on. Pure code: arrays in, a decision with its figures out (no SQLite, threads or Kafka).

Decision rule (every test one-sided at level ``alpha``, default 5%, on the SAME messages for both models):

* **Ranking** - DeLong's test for two correlated ROC curves (DeLong, DeLong & Clarke-Pearson 1988, in the
  structural-components form of Sun & Xu 2014) gives both AUCs and their covariance. With ranking errors
  ``e = 1 - AUC``, the challenger is
  *better* when ``(e_k - e_c) / se > z(1 - alpha)``, and
  *not worse* when ``(e_k + margin - e_c) / se > z(1 - alpha)``, with ``margin = min(r e_k, cap) + f``: its
  error may exceed the champion's by a share ``r`` of it, at most ``cap`` AUC points, at least a floor ``f``
  (a champion without errors on the set). The margin follows the champion's error because a set of easy mail
  shrinks every error (a fixed margin would wave anything through there); the cap keeps it small where the
  labels themselves are noisy (observed errors are then mostly label noise).
  Error rates (per decision, asymptotically): a challenger no better than the champion is called better with
  probability <= alpha; one worse by more than the margin is called not worse with probability <= alpha.
* **Which test applies** - a challenger trained on *fresher* data (labels the champion never saw: its data
  watermark is later) must be *not worse*: new flags carry value the evaluation set may not resolve yet. Any
  other challenger (a retrain on the same or older data, another family) must be *better*. So that a chain of
  "not worse" steps cannot drift down, a fresher challenger must also be not worse than the *anchor* (the best
  champion of recent history, re-scored on the same set) when one is given.
* **A refit on more of the same data** - a fresher challenger of the champion's family that trained on every flag
  the champion trained on (and newer ones) is the same learner with more evidence: its expected error is no
  higher. Where the champion's observed error on the set is tiny (``1 - AUC <= clean_error``, labels the models
  all but agree with), the non-inferiority test lacks the power to say so: the standard error of the paired
  difference does not shrink with the errors (measured on the flywheel benchmark: champion 1-AUC 0.00105, margin
  0.00036, se 0.00021, so a refit on every flag, worse by 0.00023 on the set, was refused and a refit on part of
  the flags stayed served at 1.73 times the offline refit on B). There the burden is reversed: such a refit is
  promoted unless it is *shown worse* (``(e_c - e_k) / se > z(1 - alpha)``), against the champion and against
  the anchor, and the guards below still apply. Error rates: a refit no worse than the champion is refused with
  probability <= alpha, so once the flags settle the newest refit serves whatever order they came in (the end
  state no longer depends on which refit happened to pass); one worse by ``d`` is promoted with probability
  ``Phi(z - d / se)``, a risk taken only where the labels are clean. Label noise or poisoning raises the
  champion's observed error above ``clean_error`` (30% wrong flags: about 0.3), and then the non-inferiority
  test with its margin decides, unless the refit is *vouched*: every flag it learned is one the base model is
  very sure of, with the same label (the learner's trust filter admits nothing else from unproven reporters).
  Wrong labels cannot bend such a refit (on 30% wrong flags, 2 of its 877 labels were wrong), and the set,
  whose labels are a third wrong, cannot show it is not worse: the observed AUC is
  ``1/2 + (1 - 2 noise)(AUC - 1/2)``, so differences shrink to 0.4 of their size while ``se`` grows (0.002 to
  0.006 on the flywheel benchmark, against a margin of 0.002). Before this rule nothing was promoted there, and
  the 70% right flags taught nothing (served 1.00 times before; the vouched refit 0.95).
* **Reference guard** - when a clean reference set is given (messages with known labels that no feedback can
  touch: the corpus's held-out part), a challenger *shown worse* there beyond the margin (the mirror of the
  not-worse test) is blocked. Flags come from the same users as the training flags, so coordinated reporters
  can bend both; the reference set cannot be bent. It is a tripwire, not a race: old mail need not improve.
* **False-positive guard** - on the evaluation set's *credible* ham (labels right with probability
  ``>= credible``, 0.9: corpus labels and proven reporters' flags), or where the set has too few of them, on the
  clean reference set's ham, each model's served verdict at its own operating threshold. A "false positive" on
  a doubtful ham label is as likely a spam caught under a wrong label: with 30% wrong flags, a refit that learned
  the new spam was blocked at "FPR 21.9% -> 26.1%" on flags whose "ham" was a third spam. Paired: only
  discordant ham tell the models apart; given ``m`` discordant ham of which ``b`` are false positives of the
  challenger only, ``b ~ Binomial(m, pi)`` and ``FPR_c - FPR_k = m (2 pi - 1) / n``. The
  challenger is blocked when the one-sided lower confidence bound (exact Clopper-Pearson on ``pi``) of that
  difference exceeds ``fpr_tolerance``. Error rate: a challenger whose FPR exceeds the champion's by no more than
  the tolerance is blocked with probability <= alpha. One extra false positive among a few hundred ham is not
  evidence; a challenger whose FPR is clearly higher is blocked.

Label noise cuts both ways. Noisy labels inflate ``se`` and shrink observed differences, so "better" gets harder
to show; but they also inflate the champion's observed error, and with it the "not worse" margin, up to
``cap``. So the set must not lose the labels that show what a challenger gave up: the worker judges on every
consensus label, learned or not (with 30% wrong flags and only the learned labels judged, the set became the
easy mail, both models scored AUC 1.0 there, and a challenger worse on unflagged mail passed).

The evaluation set (:func:`compose_eval_set`): flags first, scored out of sample for both models (each model's
cross-fitted scores on the flags it trained on; on flags it never saw, its fold models' scores where the caller
has them, else its served model's), the newest per class (recency-weighted as a window), stratified so both
classes are represented; the corpus's held-out part tops a class up only while flags are few. Its composition is
recorded with every decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "EvalItem",
    "EvalSelection",
    "GatePolicy",
    "GateResult",
    "PairedAUC",
    "PairedFPR",
    "ScoredModel",
    "compose_eval_set",
    "decide",
    "delong",
    "paired_fpr",
]


# ============================================================================================ statistics
@dataclass(frozen=True, slots=True)
class PairedAUC:
    """Two models' AUCs on the same messages with DeLong's covariance of the pair (a = challenger, b = champion).

    ``var_a``, ``var_b`` and ``cov`` are the variances and covariance of the two AUC estimates; every test of the
    gate is a linear combination of the two AUCs, whose variance they give.
    """

    auc_a: float
    auc_b: float
    var_a: float
    var_b: float
    cov: float
    n_spam: int
    n_ham: int

    @property
    def diff(self) -> float:
        return self.auc_a - self.auc_b

    @property
    def se(self) -> float:
        """Standard error of ``diff``."""
        return math.sqrt(max(self.var_a + self.var_b - 2.0 * self.cov, 0.0))

    def z_better(self) -> float:
        """``diff / se``: large when the challenger ranks better."""
        return _z(self.diff, self.se)

    def z_not_worse(self, margin: float) -> float:
        """``(diff + margin) / se``: large when the challenger trails by less than ``margin`` AUC points."""
        return _z(self.diff + margin, self.se)

    def to_dict(self) -> dict[str, float]:
        return {"auc_challenger": self.auc_a, "auc_champion": self.auc_b, "diff": self.diff, "se": self.se,
                "n_spam": self.n_spam, "n_ham": self.n_ham}


def _z(num: float, se: float) -> float:
    if se > 0:
        return num / se
    return math.inf if num > 0 else (-math.inf if num < 0 else 0.0)


def _midranks(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong(scores_a: Sequence[float] | np.ndarray, scores_b: Sequence[float] | np.ndarray,
           labels: Sequence[bool] | np.ndarray) -> PairedAUC:
    """DeLong's paired comparison of two scorers on the same labelled messages (O(n log n)).

    Structural components: for each spam, the share of ham it outscores (ties one half); for each ham, the share
    of spam that outscore it. Their means are the AUCs; their covariances across messages give the variance of
    the difference: ``var = (s10_aa + s10_bb - 2 s10_ab) / m + (s01_aa + s01_bb - 2 s01_ab) / n``.
    """
    y = np.asarray(labels).astype(bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        return PairedAUC(math.nan, math.nan, math.nan, math.nan, math.nan, int(m), int(n))
    v10, v01 = [], []
    for s in (np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)):
        sp, sn = s[pos], s[neg]
        r_all = _midranks(np.concatenate([sp, sn]))
        v10.append((r_all[:m] - _midranks(sp)) / n)
        v01.append(1.0 - (r_all[m:] - _midranks(sn)) / m)
    a10, a01 = np.vstack(v10), np.vstack(v01)
    aucs = a10.mean(axis=1)
    s10 = np.cov(a10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(a01) if n > 1 else np.zeros((2, 2))
    v = s10 / m + s01 / n
    return PairedAUC(float(aucs[0]), float(aucs[1]), float(v[0, 0]), float(v[1, 1]), float(v[0, 1]), int(m), int(n))


@dataclass(frozen=True, slots=True)
class PairedFPR:
    """False positives of two models on the same ham, and a one-sided lower bound of ``FPR_a - FPR_b``."""

    fpr_a: float
    fpr_b: float
    n_ham: int
    only_a: int  # ham flagged by a and not by b
    only_b: int
    lower: float  # one-sided (1 - alpha) lower confidence bound of fpr_a - fpr_b

    @property
    def diff(self) -> float:
        return self.fpr_a - self.fpr_b

    def to_dict(self) -> dict[str, float]:
        return {"fpr_challenger": self.fpr_a, "fpr_champion": self.fpr_b, "diff": self.diff,
                "lower_bound": self.lower, "n_ham": self.n_ham, "only_challenger": self.only_a,
                "only_champion": self.only_b}


def paired_fpr(spam_a: Sequence[bool] | np.ndarray, spam_b: Sequence[bool] | np.ndarray, alpha: float) -> PairedFPR:
    """Compare two models' verdicts on the same ham (``spam_*`` are their spam verdicts on those ham).

    Conditional exact bound: with ``m`` discordant ham, ``only_a ~ Binomial(m, pi)``; the Clopper-Pearson lower
    bound of ``pi`` gives the lower bound ``m (2 pi_L - 1) / n`` of the difference. No discordant ham, no
    evidence of a difference: the bound is 0.
    """
    a = np.asarray(spam_a).astype(bool)
    b = np.asarray(spam_b).astype(bool)
    n = int(a.size)
    if n == 0:
        return PairedFPR(math.nan, math.nan, 0, 0, 0, -math.inf)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    disc = only_a + only_b
    if disc == 0:
        lower = 0.0
    else:
        pi_lower = 0.0 if only_a == 0 else float(stats.beta.ppf(alpha, only_a, disc - only_a + 1))
        lower = disc * (2.0 * pi_lower - 1.0) / n
    return PairedFPR(float(a.mean()), float(b.mean()), n, only_a, only_b, lower)


# ============================================================================================ the decision
@dataclass(frozen=True, slots=True)
class GatePolicy:
    """The gate's stated significance and margins (see the module docstring)."""

    alpha: float = 0.05
    relative_margin: float = 0.25  # a fresher challenger's ranking error may exceed the champion's by 25% ...
    margin_cap: float = 0.002  # ... but never by more than this much AUC ...
    floor: float = 1e-4  # ... and by at least this much (a champion without errors on the set)
    fpr_tolerance: float = 0.002  # FPR rise at the operating point that is not held against a challenger
    clean_error: float = 0.005  # champion's 1-AUC on the set at or below which a refit on more data needs only
    # not to be shown worse
    min_per_class: int = 30  # fewer messages of a class: the set cannot judge, nothing is promoted on it
    credible: float = 0.9  # a label this likely to be right is held against a challenger's false positives

    @property
    def z(self) -> float:
        return float(stats.norm.ppf(1.0 - self.alpha))

    def margin(self, champion_auc: float) -> float:
        """The non-inferiority margin in AUC points for a champion of AUC ``champion_auc`` on the set."""
        return min(self.relative_margin * max(0.0, 1.0 - champion_auc), self.margin_cap) + self.floor

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ScoredModel:
    """One model's scores on a set: ``ranking`` ranks (logits), ``spam`` is its served verdict per message."""

    ranking: np.ndarray
    spam: np.ndarray


@dataclass(slots=True)
class GateResult:
    promote: bool
    reason: str
    test: str  # "better" | "not_worse" | "not_shown_worse" | "first" | "none"
    figures: dict[str, Any] = field(default_factory=dict)


def _enough(y: np.ndarray, k: int) -> bool:
    return int(y.sum()) >= k and int((~y).sum()) >= k


def decide(
    labels: Sequence[bool] | np.ndarray,
    challenger: ScoredModel,
    champion: ScoredModel | None,
    *,
    fresher: bool,
    policy: GatePolicy,
    anchor: ScoredModel | None = None,
    reference: tuple[np.ndarray, ScoredModel, ScoredModel] | None = None,
    refit: bool = False,
    reliability: Sequence[float] | np.ndarray | None = None,
    vouched: bool = False,
) -> GateResult:
    """Promote or reject ``challenger`` (see the module docstring for the rule and its error rates).

    ``reference`` is ``(labels, challenger scores, champion scores)`` on the clean reference set, or None.
    ``refit``: the challenger is of the champion's family and trained on every flag the champion trained on
    (with ``fresher``, a refit on more of the same data), judged on users' flags alone (the caller's to say: on a
    set topped up from an old corpus every model looks nearly faultless, whatever the users' labels are like).
    ``reliability``: per label, the probability that it is right (its reporters' reliability; 1 for corpus
    labels); None treats every label as right. ``vouched``: every flag the challenger learned is one the base
    model is very sure of, with the same label (the learner's trust filter let no other in).
    """
    y = np.asarray(labels).astype(bool)
    q = np.ones(y.size) if reliability is None else np.clip(np.asarray(reliability, dtype=np.float64), 0.0, 1.0)
    noise = float(np.mean(1.0 - q)) if q.size else 0.0
    figures: dict[str, Any] = {"policy": policy.to_dict(), "fresher": fresher, "refit": refit, "n_spam": int(y.sum()),
                               "n_ham": int((~y).sum()), "label_noise": noise,
                               "vouched": vouched}
    if champion is None:
        return GateResult(True, "no champion to beat", "first", figures)
    if not _enough(y, policy.min_per_class):
        return GateResult(False, f"evaluation set too small to judge ({int(y.sum())} spam, {int((~y).sum())} ham; "
                                 f"at least {policy.min_per_class} of each needed)", "none", figures)
    z = policy.z
    auc = delong(challenger.ranking, champion.ranking, y)
    figures["auc"] = auc.to_dict()
    fpr, judged_on = _fpr_guard(y, q, challenger, champion, reference, policy)
    figures["fpr"], figures["fpr_judged_on"] = fpr.to_dict(), judged_on
    if fpr.lower > policy.fpr_tolerance:
        return GateResult(False, f"false positives rise ({judged_on}): FPR {fpr.fpr_b:.3%} -> {fpr.fpr_a:.3%}, lower "
                                 f"bound of the rise {fpr.lower:.3%} > tolerance {policy.fpr_tolerance:.3%}", "none",
                          figures)
    margin = policy.margin(auc.auc_b)
    figures["margin"] = margin
    better = auc.z_better() > z
    not_worse = auc.z_not_worse(margin) > z
    # A refit on more of the same data needs only not to be shown worse where its new labels are sound: the set's
    # labels are clean (the champion's error on them is tiny), or every label it learned is one the base model is
    # very sure of (labels from unproven reporters that only confirm it: noise there cannot bend the refit).
    clean = (1.0 - auc.auc_b) <= policy.clean_error
    lenient = fresher and refit and (clean or vouched)
    shown_worse = -auc.z_better() > z
    figures["better"], figures["not_worse"], figures["shown_worse"] = better, not_worse, shown_worse
    figures["lenient"] = lenient
    anchor_ok = True
    if anchor is not None:
        anchor_auc = delong(challenger.ranking, anchor.ranking, y)
        figures["anchor_auc"] = anchor_auc.to_dict()
        anchor_ok = (-anchor_auc.z_better() <= z if lenient
                     else anchor_auc.z_not_worse(policy.margin(anchor_auc.auc_b)) > z)
    if reference is not None:
        ry, rc, rk = reference
        ry = np.asarray(ry).astype(bool)
        if _enough(ry, policy.min_per_class):
            ref = delong(rc.ranking, rk.ranking, ry)
            figures["reference_auc"] = ref.to_dict()
            if -ref.z_not_worse(policy.margin(ref.auc_b)) > z:
                return GateResult(False, f"shown worse on the clean reference set: AUC {ref.auc_b:.5f} -> "
                                         f"{ref.auc_a:.5f} (se {ref.se:.5f})", "none", figures)
    d = f"AUC {auc.auc_b:.5f} -> {auc.auc_a:.5f} (diff {auc.diff:+.5f}, se {auc.se:.5f})"
    if better:
        return GateResult(True, f"better: {d}, z={auc.z_better():.2f} > {z:.2f}", "better", figures)
    if lenient and not shown_worse and anchor_ok:
        return GateResult(True, f"a refit on more of the same data, not shown worse: {d}, "
                                f"z={-auc.z_better():.2f} <= {z:.2f} ("
                                + (f"champion's 1-AUC {1.0 - auc.auc_b:.5f} <= {policy.clean_error}" if clean else
                                   f"every label learned vouched for by the base model; labels' noise {noise:.2f}")
                                + ")", "not_shown_worse", figures)
    if lenient and not shown_worse:
        a = figures["anchor_auc"]
        return GateResult(False, f"a refit on more data, but shown worse than the anchor: AUC "
                                 f"{a['auc_champion']:.5f} -> {a['auc_challenger']:.5f} (se {a['se']:.5f})",
                          "none", figures)
    if lenient:
        return GateResult(False, f"a refit on more data, shown worse: {d}, z={-auc.z_better():.2f} > {z:.2f}",
                          "none", figures)
    if fresher and not_worse and anchor_ok:
        return GateResult(True, f"fresher data and not worse: {d}, z={auc.z_not_worse(margin):.2f} > {z:.2f} "
                                f"at margin {margin:.5f}", "not_worse", figures)
    if fresher and not_worse:
        a = figures["anchor_auc"]
        return GateResult(False, f"not worse than the champion but worse than the anchor: AUC "
                                 f"{a['auc_champion']:.5f} -> {a['auc_challenger']:.5f} (se {a['se']:.5f})",
                          "none", figures)
    need = "not worse (fresher data)" if fresher else "better (no fresher data than the champion)"
    return GateResult(False, f"not shown {need}: {d}", "none", figures)


def _fpr_guard(y: np.ndarray, q: np.ndarray, challenger: ScoredModel, champion: ScoredModel,
               reference: tuple[np.ndarray, ScoredModel, ScoredModel] | None, policy: GatePolicy,
               ) -> tuple[PairedFPR, str]:
    """The paired FPR comparison on ham whose labels are credible (``q >= policy.credible``), and where the set
    has too few of them, on the clean reference set's ham. A "false positive" on a doubtful ham label is as likely
    a spam caught under a wrong label: with 30% wrong flags, a refit that learned the new spam was blocked at
    "FPR 21.9% -> 26.1%" on flags whose "ham" was a third spam. With neither, every ham label of the set."""
    credible = ~y & (q >= policy.credible)
    if int(credible.sum()) >= policy.min_per_class:
        what = "ham labels of the set" if bool(credible.sum() == (~y).sum()) else "credible ham labels of the set"
        return paired_fpr(challenger.spam[credible], champion.spam[credible], policy.alpha), what
    if reference is not None:
        ry, rc, rk = reference
        ham = ~np.asarray(ry).astype(bool)
        if int(ham.sum()) >= policy.min_per_class:
            return paired_fpr(rc.spam[ham], rk.spam[ham], policy.alpha), "the clean reference set's ham"
    return paired_fpr(challenger.spam[~y], champion.spam[~y], policy.alpha), "ham labels of the set"


# ============================================================================================ the evaluation set
@dataclass(frozen=True, slots=True)
class EvalItem:
    """A labelled candidate for the evaluation set: ``source`` is "flags" or "corpus"; ``group`` names where a
    corpus message comes from (or the flag's class); ``recency`` orders flags (larger is newer)."""

    key: str
    is_spam: bool
    source: str
    group: str
    recency: int = 0


@dataclass(slots=True)
class EvalSelection:
    items: list[EvalItem]
    composition: dict[str, dict[str, int]]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.is_spam for it in self.items], dtype=bool)


def _composition(items: Sequence[EvalItem]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for it in items:
        d = out.setdefault(it.source, {})
        key = it.group if it.source == "corpus" else ("spam" if it.is_spam else "ham")
        d[key] = d.get(key, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def compose_eval_set(
    flags: Sequence[EvalItem], corpus: Sequence[EvalItem], *, min_per_class: int, max_per_class: int,
) -> EvalSelection:
    """Held-out flags first (the newest ``max_per_class`` of each class); a class with fewer than
    ``min_per_class`` flags is topped up from ``corpus`` (the caller passes it already shuffled and spread over
    every group, hard ham included), so the set looks like the mail users flag as soon as they flag enough."""
    chosen: list[EvalItem] = []
    for cls in (True, False):
        mine = sorted((it for it in flags if it.is_spam is cls), key=lambda it: it.recency, reverse=True)
        mine = mine[:max_per_class]
        if len(mine) < min_per_class:
            extra = [it for it in corpus if it.is_spam is cls][: max(0, min_per_class - len(mine))]
            mine = mine + extra
        chosen.extend(mine)
    return EvalSelection(chosen, _composition(chosen))


def composition_counts(composition: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Messages per source (``{"flags": n, "corpus": n}``)."""
    return {src: int(sum(v.values())) for src, v in composition.items()}
