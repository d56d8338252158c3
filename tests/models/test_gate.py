"""The gate's statistics against known cases and simulated data: DeLong's test, the paired FPR bound, the
decision rule (better / not worse / fresher), the reference tripwire and the evaluation set's composition."""

from __future__ import annotations

import numpy as np
import pytest

from models.gate import EvalItem, GatePolicy, ScoredModel, compose_eval_set, decide, delong, paired_fpr
from models.metrics import roc_auc

pytestmark = pytest.mark.unit


def _scores(rng: np.random.Generator, y: np.ndarray, separation: float, noise: float = 1.0) -> np.ndarray:
    return separation * y + rng.normal(scale=noise, size=y.size)


def _brute_force_auc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def test_delong_aucs_match_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(120) < 0.4
    a = np.round(_scores(rng, y, 1.5), 1)  # rounded: many ties
    b = np.round(_scores(rng, y, 0.8), 1)
    r = delong(a, b, y)
    assert r.auc_a == pytest.approx(_brute_force_auc(a, y))
    assert r.auc_b == pytest.approx(_brute_force_auc(b, y))
    assert r.auc_a == pytest.approx(roc_auc(a, y))
    assert r.se > 0


def test_delong_variance_matches_the_spread_of_the_difference_over_resamples() -> None:
    """The standard error predicts how much the AUC difference varies between independent samples."""
    rng = np.random.default_rng(1)
    diffs, ses = [], []
    for _ in range(400):
        y = rng.random(200) < 0.5
        shared = _scores(rng, y, 1.0)
        a = shared + rng.normal(scale=0.6, size=y.size) + 0.3 * y
        b = shared + rng.normal(scale=0.6, size=y.size)
        r = delong(a, b, y)
        diffs.append(r.diff)
        ses.append(r.se)
    assert np.std(diffs) == pytest.approx(np.mean(ses), rel=0.15)


def test_better_test_keeps_its_level_under_the_null() -> None:
    """Two equally good models: "better" is claimed about alpha of the time, not more."""
    rng = np.random.default_rng(2)
    z = GatePolicy().z
    hits = 0
    n = 1500
    for _ in range(n):
        y = rng.random(150) < 0.5
        base = _scores(rng, y, 1.5)
        a = base + rng.normal(scale=0.7, size=y.size)
        b = base + rng.normal(scale=0.7, size=y.size)
        hits += delong(a, b, y).z_better() > z
    assert hits / n < 0.05 + 3 * np.sqrt(0.05 * 0.95 / n)


def _sm(z: np.ndarray, spam: np.ndarray | None = None) -> ScoredModel:
    return ScoredModel(z, z > 0 if spam is None else spam)


def test_a_challenger_better_by_a_resolvable_margin_is_promoted() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(800) < 0.45
    champion = _scores(rng, y, 1.5)
    challenger = _scores(rng, y, 3.0)
    r = decide(y, _sm(challenger), _sm(champion), fresher=False, policy=GatePolicy())
    assert r.promote and r.test == "better", r.reason


def test_a_worse_challenger_is_rejected_even_with_fresher_data() -> None:
    rng = np.random.default_rng(4)
    y = rng.random(800) < 0.45
    champion = _scores(rng, y, 3.0)
    challenger = _scores(rng, y, 1.5)
    r = decide(y, _sm(challenger), _sm(champion), fresher=True, policy=GatePolicy())
    assert not r.promote and "not shown not worse" in r.reason


def test_an_indistinguishable_challenger_needs_fresher_data() -> None:
    """Same quality: without newer data there is nothing to gain; with newer data it is not worse."""
    rng = np.random.default_rng(5)
    y = rng.random(2000) < 0.45
    base = _scores(rng, y, 3.0)
    champion = base + rng.normal(scale=0.05, size=y.size)
    challenger = base + rng.normal(scale=0.05, size=y.size)
    stale = decide(y, _sm(challenger), _sm(champion), fresher=False, policy=GatePolicy())
    assert not stale.promote and "better" in stale.reason
    fresh = decide(y, _sm(challenger), _sm(champion), fresher=True, policy=GatePolicy())
    assert fresh.promote and fresh.test == "not_worse", fresh.reason


def test_not_worse_holds_its_level_at_the_margin() -> None:
    """A challenger worse by more than the margin passes "not worse" at most about alpha of the time."""
    rng = np.random.default_rng(6)
    policy = GatePolicy(relative_margin=0.25, margin_cap=0.002, floor=1e-4)
    passes = 0
    n = 400
    for _ in range(n):
        y = rng.random(600) < 0.5
        champion = _scores(rng, y, 2.2)
        challenger = _scores(rng, y, 1.6)  # clearly more ranking errors than 1.25x the champion's
        r = decide(y, _sm(challenger), _sm(champion), fresher=True, policy=policy)
        passes += r.promote
    assert passes / n <= 0.05


def test_the_anchor_stops_a_chain_of_small_steps_down() -> None:
    rng = np.random.default_rng(7)
    y = rng.random(3000) < 0.45
    anchor = _scores(rng, y, 3.2, noise=0.9)
    champion = _scores(rng, y, 2.6, noise=0.9)
    challenger = champion + rng.normal(scale=0.01, size=y.size)
    r = decide(y, _sm(challenger), _sm(champion), fresher=True, policy=GatePolicy(), anchor=_sm(anchor))
    assert not r.promote and "anchor" in r.reason


def test_the_reference_tripwire_blocks_a_challenger_shown_worse_on_clean_labels() -> None:
    rng = np.random.default_rng(8)
    y = rng.random(600) < 0.5
    champion = _scores(rng, y, 2.0)
    challenger = champion + 0.01
    ry = rng.random(600) < 0.5
    ref_champion = _scores(rng, ry, 3.0)
    ref_challenger = _scores(rng, ry, 1.0)  # poisoned: much worse on mail whose labels nobody could bend
    r = decide(y, _sm(challenger), _sm(champion), fresher=True, policy=GatePolicy(),
               reference=(ry, _sm(ref_challenger), _sm(ref_champion)))
    assert not r.promote and "reference" in r.reason
    ok = decide(y, _sm(challenger), _sm(champion), fresher=True, policy=GatePolicy(),
                reference=(ry, _sm(ref_champion + 0.01), _sm(ref_champion)))
    assert ok.promote, ok.reason


def test_the_fpr_guard_keeps_its_level_when_the_rise_equals_the_tolerance() -> None:
    """Simulated ham: a challenger whose FPR is higher by exactly the tolerance is blocked <= alpha of the time."""
    rng = np.random.default_rng(9)
    tol, alpha, n = 0.002, 0.05, 2000
    blocked = 0
    for _ in range(n):
        champion = rng.random(500) < 0.01
        challenger = champion | (rng.random(500) < tol)
        blocked += paired_fpr(challenger, champion, alpha).lower > tol
    assert blocked / n <= alpha


def test_the_fpr_guard_blocks_a_clearly_worse_challenger() -> None:
    rng = np.random.default_rng(10)
    blocked = 0
    for _ in range(200):
        champion = rng.random(1000) < 0.01
        challenger = champion | (rng.random(1000) < 0.04)
        blocked += paired_fpr(challenger, champion, 0.05).lower > 0.002
    assert blocked >= 190


def test_one_extra_false_positive_among_a_few_hundred_ham_is_not_evidence() -> None:
    """The case the old gate got wrong: a better model rejected for 1 false positive among ~250 ham."""
    rng = np.random.default_rng(11)
    y = np.zeros(500, dtype=bool)
    y[:250] = True
    champion = _scores(rng, y, 2.5)
    challenger = _scores(rng, y, 4.0)
    spam_k = y.copy()
    spam_c = y.copy()
    spam_c[300] = True  # one ham called spam by the challenger only
    r = decide(y, ScoredModel(challenger, spam_c), ScoredModel(champion, spam_k), fresher=False, policy=GatePolicy())
    assert r.promote, r.reason
    assert r.figures["fpr"]["only_challenger"] == 1 and r.figures["fpr"]["lower_bound"] <= 0


def test_the_fpr_guard_rejects_through_decide() -> None:
    rng = np.random.default_rng(12)
    y = rng.random(2000) < 0.3
    z = _scores(rng, y, 3.0)
    spam_k = z > 2.5
    spam_c = spam_k | ((~y) & (rng.random(y.size) < 0.05))
    r = decide(y, ScoredModel(z + 0.5 * y, spam_c), ScoredModel(z, spam_k), fresher=True, policy=GatePolicy())
    assert not r.promote and "false positives" in r.reason


def test_too_small_a_set_judges_nothing_and_no_champion_promotes() -> None:
    y = np.array([True, False] * 10)
    z = np.arange(20, dtype=float)
    r = decide(y, _sm(z), _sm(z), fresher=True, policy=GatePolicy(min_per_class=30))
    assert not r.promote and "too small" in r.reason
    first = decide(y, _sm(z), None, fresher=True, policy=GatePolicy())
    assert first.promote and first.test == "first"


def test_compose_prefers_the_newest_flags_and_tops_up_from_every_corpus_group() -> None:
    flags = [EvalItem(f"f{i}", i % 2 == 0, "flags", "x", recency=i) for i in range(40)]
    groups = ["easy-ham-2", "hard-ham-1", "spam-2"]
    corpus = [EvalItem(f"c{i}", groups[i % 3] == "spam-2", "corpus", groups[i % 3]) for i in range(300)]
    sel = compose_eval_set(flags, corpus, min_per_class=30, max_per_class=15)
    spam_flags = [it for it in sel.items if it.source == "flags" and it.is_spam]
    assert [it.recency for it in spam_flags] == sorted((i for i in range(40) if i % 2 == 0), reverse=True)[:15]
    assert sel.composition["flags"] == {"ham": 15, "spam": 15}
    assert sel.composition["corpus"]["spam-2"] == 15
    assert set(sel.composition["corpus"]) == {"easy-ham-2", "hard-ham-1", "spam-2"}  # hard ham is in
    many = [EvalItem(f"f{i}", i % 2 == 0, "flags", "x", recency=i) for i in range(200)]
    only_flags = compose_eval_set(many, corpus, min_per_class=30, max_per_class=1000)
    assert set(only_flags.composition) == {"flags"}


def _tiny_errors(rng: np.random.Generator, n: int = 1400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two near-identical scorers with about 0.1% ranking error (the clean benchmark's regime)."""
    y = np.arange(n) % 2 == 0
    shared = _scores(rng, y, 4.4)
    return y, shared + rng.normal(scale=0.3, size=n), shared + rng.normal(scale=0.3, size=n)


def test_a_refit_on_more_data_that_the_strict_test_leaves_inconclusive_is_promoted_where_labels_are_clean() -> None:
    """Tiny errors: the non-inferiority margin is smaller than the set can resolve, so a refit on every flag that
    is a little behind by chance was refused and an older champion stayed. Judged as a refit on more of the same
    data, it is promoted unless shown worse."""
    rng = np.random.default_rng(11)
    for _ in range(200):  # find a draw where the challenger trails by chance and the strict test is inconclusive
        y, champion, challenger = _tiny_errors(rng)
        strict = decide(y, _sm(challenger), _sm(champion), fresher=True, policy=GatePolicy())
        auc = delong(challenger, champion, y)
        if not strict.promote and auc.diff < 0:
            break
    else:
        pytest.fail("no inconclusive draw")
    assert "not shown not worse" in strict.reason
    assert 1 - auc.auc_b <= GatePolicy().clean_error
    again = decide(y, _sm(challenger), _sm(champion), fresher=True, refit=True, policy=GatePolicy())
    assert again.promote and again.test == "not_shown_worse", again.reason
    # Not for another family, nor for a challenger that is not fresher: those must still be shown better.
    assert not decide(y, _sm(challenger), _sm(champion), fresher=False, refit=True, policy=GatePolicy()).promote


def test_the_lenient_refit_rule_refuses_an_equal_refit_at_most_alpha_of_the_time() -> None:
    """Two equally good models with tiny errors: a refit is refused ("shown worse") about alpha of the time."""
    rng = np.random.default_rng(12)
    n, refused = 300, 0
    for _ in range(n):
        y, champion, challenger = _tiny_errors(rng, 600)
        r = decide(y, _sm(challenger), _sm(champion), fresher=True, refit=True, policy=GatePolicy())
        refused += not r.promote
    assert refused / n < 0.05 + 3 * np.sqrt(0.05 * 0.95 / n)


def test_a_refit_shown_worse_is_refused_even_where_labels_are_clean() -> None:
    rng = np.random.default_rng(13)
    y = np.arange(2000) % 2 == 0
    champion = _scores(rng, y, 4.4)
    challenger = _scores(rng, y, 3.0)
    r = decide(y, _sm(challenger), _sm(champion), fresher=True, refit=True, policy=GatePolicy())
    assert not r.promote and "shown worse" in r.reason


def test_noisy_labels_keep_the_non_inferiority_test_for_refits() -> None:
    """With label noise the champion's observed error is far above ``clean_error``: a refit must still be shown
    not worse, so a slightly worse one (inside the noise, beyond the capped margin) is not waved through."""
    rng = np.random.default_rng(14)
    y = rng.random(1500) < 0.5
    noisy = np.where(rng.random(y.size) < 0.3, ~y, y)  # 30% of the labels wrong
    champion = _scores(rng, y, 3.0)
    challenger = _scores(rng, y, 2.0)
    r = decide(noisy, _sm(challenger), _sm(champion), fresher=True, refit=True, policy=GatePolicy())
    assert not r.figures["lenient"]
    assert not r.promote, r.reason


def _noisy_flags(rng: np.random.Generator, n: int = 1200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(true labels, flags with 30% wrong, champion scores, a refit's scores that rank the true labels better)."""
    y = rng.random(n) < 0.5
    flags = np.where(rng.random(n) < 0.3, ~y, y)
    base = _scores(rng, y, 3.0, noise=0.3)
    return y, flags, base + rng.normal(scale=1.0, size=n), base + rng.normal(scale=0.6, size=n)


def test_a_refit_that_learned_only_vouched_labels_is_promoted_through_label_noise() -> None:
    """30% wrong flags: the set cannot show that a refit is not worse, but a refit that learned only labels the
    base model is sure of (noise there cannot bend it) needs only not to be shown worse; one that learned other
    labels still needs the non-inferiority test."""
    rng = np.random.default_rng(15)
    y, flags, champion, challenger = _noisy_flags(rng)
    q = np.full(y.size, 0.7)
    plain = decide(flags, _sm(challenger), _sm(champion), fresher=True, refit=True, policy=GatePolicy(), reliability=q)
    assert not plain.promote and not plain.figures["lenient"], plain.reason
    vouched = decide(flags, _sm(challenger), _sm(champion), fresher=True, refit=True, policy=GatePolicy(),
                     reliability=q, vouched=True)
    assert vouched.promote and vouched.test == "not_shown_worse" and "vouched" in vouched.reason, vouched.reason
    assert abs(vouched.figures["label_noise"] - 0.3) < 1e-9
    # not another family (refit=False), and never one shown worse
    assert not decide(flags, _sm(challenger), _sm(champion), fresher=True, policy=GatePolicy(), reliability=q,
                      vouched=True).promote
    worse = decide(y, _sm(champion - 2.0 * rng.normal(size=y.size)), _sm(champion), fresher=True, refit=True,
                   policy=GatePolicy(), reliability=q, vouched=True)
    assert not worse.promote and "shown worse" in worse.reason


def test_false_positives_are_counted_on_credible_ham_labels_only() -> None:
    """A refit that catches spam flagged "ham" by careless reporters "raises the FPR" on those labels; the guard
    judges on credible ham labels, and on the clean reference set where the set has too few of them."""
    rng = np.random.default_rng(16)
    n = 1200
    y = rng.random(n) < 0.5
    flags = np.where(rng.random(n) < 0.3, ~y, y)
    champion_spam = y & (rng.random(n) < 0.7)  # misses 30% of the spam
    challenger_spam = y.copy()  # catches every spam, no ham
    z = _scores(rng, y, 3.0)
    ref_y = np.arange(400) % 2 == 0
    ref = (ref_y, _sm(_scores(rng, ref_y, 3.0), ref_y.copy()), _sm(_scores(rng, ref_y, 3.0), ref_y.copy()))
    careless = decide(flags, ScoredModel(z, challenger_spam), ScoredModel(z, champion_spam), fresher=True,
                      policy=GatePolicy(), reliability=np.ones(n))
    assert not careless.promote and "false positives rise" in careless.reason  # labels taken at their word
    doubtful = decide(flags, ScoredModel(z, challenger_spam), ScoredModel(z, champion_spam), fresher=True,
                      policy=GatePolicy(), reliability=np.full(n, 0.7), reference=ref)
    assert doubtful.figures["fpr_judged_on"] == "the clean reference set's ham"
    assert "false positives" not in doubtful.reason, doubtful.reason
    # ... and a challenger whose verdicts do mark clean ham as spam is still blocked there
    ref_bad = (ref_y, _sm(ref[1].ranking, ref_y | (rng.random(400) < 0.2)), ref[2])
    blocked = decide(flags, ScoredModel(z, challenger_spam), ScoredModel(z, champion_spam), fresher=True,
                     policy=GatePolicy(), reliability=np.full(n, 0.7), reference=ref_bad)
    assert not blocked.promote and "clean reference set" in blocked.reason, blocked.reason
