"""Refit, cross-fit, choice by validation, calibration out of sample and the retrain schedule (models.learning).

Synthetic hashed features keep these fast; the real corpus is exercised by the worker's and the end-to-end tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.features import FeatureBatch
from models.learning import (
    FOLDS,
    REPEATS,
    NeuralFit,
    RetrainSchedule,
    TrainingSet,
    calibrate,
    cross_fit_linear,
    fit_neural,
    fold_of,
    refit_linear,
    select_linear,
    subset,
    tail_threshold,
)
from models.linear import LinearConfig, LinearModel
from models.metrics import roc_auc

pytestmark = pytest.mark.unit


def _synthetic(n: int, seed: int, *, shift: int = 0, noise: float = 0.0) -> tuple[FeatureBatch, np.ndarray]:
    """Rows of 30 token ids: spam draws from tokens 0..199 (+shift), ham from 100..299; labels may be flipped."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.45
    ids, seg = [], []
    for i in range(n):
        lo = (0 if y[i] else 100) + shift
        ids.append(rng.integers(lo, lo + 200, size=30))
        seg.append(np.full(30, i))
    batch = FeatureBatch(np.concatenate(ids).astype(np.int64), np.ones(30 * n, dtype=np.float32),
                         np.concatenate(seg).astype(np.int64), n)
    labels = y.copy()
    if noise:
        labels ^= rng.random(n) < noise
    return batch, labels.astype(np.int64)


def _train(base_n: int = 400, flags_n: int = 300, *, noise: float = 0.0, shift: int = 500) -> TrainingSet:
    b_batch, b_y = _synthetic(base_n, 1)
    f_batch, f_y = _synthetic(flags_n, 2, shift=shift, noise=noise)
    batch = FeatureBatch.concat([b_batch, f_batch])
    rules = np.zeros(base_n + flags_n)
    return TrainingSet(batch, np.concatenate([b_y, f_y]), rules, np.array([False] * base_n + [True] * flags_n))


def test_cross_fit_logits_are_out_of_sample() -> None:
    """Random labels: a model scores its own training rows well, out-of-fold logits are no better than chance."""
    batch, _ = _synthetic(400, 3)
    y = np.random.default_rng(4).integers(0, 2, size=400)
    train = TrainingSet(batch, y, np.zeros(400), np.ones(400, dtype=bool))
    cross = cross_fit_linear(train, LinearConfig(), 1.0)
    in_sample = LinearModel().fit(batch, y).decision_function(batch)
    assert roc_auc(in_sample, y.astype(bool)) > 0.9
    assert abs(roc_auc(cross.oof, y.astype(bool)) - 0.5) < 0.1
    assert len(cross.models) == FOLDS * REPEATS


def test_folds_by_message_stay_put_as_rows_are_added_and_unseen_rows_score_like_held_out_ones() -> None:
    """With fold keys, a row's fold in every repeat depends on its key alone: a refit on more rows keeps each old
    row in its fold, and :meth:`CrossFit.held_out` scores a row the models never saw with the models of its folds,
    the way the out-of-fold logits score the rows they did see."""
    batch, y = _synthetic(500, 11)
    keys = np.random.default_rng(12).integers(0, 2**32, size=500)
    small = TrainingSet(batch.take(list(range(400))), y[:400], np.zeros(400), np.ones(400, dtype=bool),
                        fold_keys=keys[:400])
    big = TrainingSet(batch, y, np.zeros(500), np.ones(500, dtype=bool), fold_keys=keys)
    for r in range(REPEATS):
        assert np.array_equal(fold_of(keys[:400], r), fold_of(keys, r)[:400])
        assert np.bincount(fold_of(keys, r), minlength=FOLDS).min() > 60  # every fold gets its share
    assert not np.array_equal(fold_of(keys, 0), fold_of(keys, 1))  # the repeats split differently
    cross = cross_fit_linear(small, LinearConfig(epochs=5), 1.0)
    # the rows it trained on: held_out() reproduces the out-of-fold logits exactly
    assert np.allclose(cross.held_out(small.batch, keys[:400]), cross.oof)
    # rows it never saw: scored like out-of-fold rows, so about as well (not as well as in-sample)
    new = cross.held_out(batch.take(list(range(400, 500))), keys[400:])
    assert roc_auc(new, y[400:].astype(bool)) > 0.9
    assert cross_fit_linear(big, LinearConfig(epochs=5), 1.0).oof.shape == (500,)


def test_refit_is_a_bag_of_the_full_fit_and_the_fold_models() -> None:
    train = _train()
    choice = select_linear(train, grid=((3e-7, 1.0),))
    model = refit_linear(train, choice)
    full = LinearModel(config=choice.config).fit(train.batch, train.labels, sample_weight=train.weights(1.0))
    want = np.mean([m.decision_function(train.batch) for m in [full, *choice.cross.models]], axis=0)
    assert np.allclose(model.decision_function(train.batch), want)
    assert np.allclose(model.predict_proba(train.batch), 1 / (1 + np.exp(-want)), atol=1e-6)


def test_flags_teach_what_the_base_corpus_does_not_know() -> None:
    """New mail uses tokens the base never saw: a refit on base + flags ranks it, the base model cannot."""
    train = _train(shift=500)
    base_only = subset(train, np.flatnonzero(~train.is_flag))
    new_batch, new_y = _synthetic(300, 9, shift=500)
    base_model = LinearModel().fit(base_only.batch, base_only.labels)
    refit = refit_linear(train, select_linear(train))
    assert roc_auc(base_model.decision_function(new_batch), new_y.astype(bool)) < 0.7
    assert roc_auc(refit.decision_function(new_batch), new_y.astype(bool)) > 0.95


def test_selection_is_judged_on_the_flags_and_reports_every_candidate() -> None:
    train = _train()
    grid = ((3e-7, 1.0), (3e-7, 2.0), (3e-5, 1.0))
    choice = select_linear(train, grid=grid)
    assert choice.judged_on == "flags"
    assert [(r["alpha"], r["flag_weight"]) for r in choice.report] == list(grid)
    best = min(choice.report, key=lambda r: r["oof_one_minus_auc"])
    assert (choice.config.alpha, choice.flag_weight) == (best["alpha"], best["flag_weight"])
    assert len(choice.cross.models) == FOLDS * REPEATS  # candidates compared on one cross-fit, the winner on all
    few = _train(flags_n=20)
    assert select_linear(few, grid=grid).judged_on == "all rows"  # too few flags to judge on


def test_zero_confidence_rows_teach_nothing() -> None:
    train = _train()
    muted = TrainingSet(train.batch, train.labels, train.rule_scores, train.is_flag,
                        np.where(train.is_flag, 0.0, 1.0))
    base_only = subset(train, np.flatnonzero(~train.is_flag))
    grid = ((3e-7, 1.0),)
    z_muted = refit_linear(muted, select_linear(muted, grid=grid)).decision_function(base_only.batch)
    z_base = LinearModel().fit(base_only.batch, base_only.labels).decision_function(base_only.batch)
    assert roc_auc(z_muted, base_only.labels.astype(bool)) == pytest.approx(
        roc_auc(z_base, base_only.labels.astype(bool)), abs=0.01)


def test_calibration_comes_from_the_flags_once_they_are_enough() -> None:
    train = _train(flags_n=1200)
    choice = select_linear(train, grid=((3e-7, 1.0),))
    cal, source = calibrate(train, choice.oof, fpr_budget=0.001)
    assert "flagged rows" in source["rows"] and source["ham"] >= 200
    flags = train.is_flag
    z = choice.oof[flags]
    y = train.labels[flags].astype(bool)
    assert ((z >= cal.model_threshold_logit) & ~y).sum() <= 0.001 * (~y).sum()  # the budget holds where fitted
    few = _train(flags_n=100)
    _, few_source = calibrate(few, select_linear(few, grid=((3e-7, 1.0),)).oof, fpr_budget=0.001)
    assert "every row" in few_source["rows"]


def test_neural_fit_validates_on_rows_it_did_not_train_on() -> None:
    pytest.importorskip("torch")
    train = _train(base_n=300, flags_n=200)
    fit = fit_neural(train, 1.0)
    assert 0.1 < fit.validation.size / train.rows < 0.2
    assert train.is_flag[fit.validation].any() and (~train.is_flag[fit.validation]).any()
    assert fit.logits.shape == fit.validation.shape
    assert len(fit.report) == 2


def test_retrain_schedule_early_and_often_then_less() -> None:
    s = RetrainSchedule(first=200, growth=1.0, surprises=50)
    assert not s.due(150, 0, 0)
    assert s.due(200, 0, 0)
    assert not s.due(350, 200, 0) and s.due(400, 200, 0)  # doubles
    assert not s.due(1500, 1000, 10) and s.due(2000, 1000, 0)
    assert s.due(1100, 1000, 50)  # many flags on mail the champion got wrong: now
    assert not s.due(1050, 1000, 60)  # ... but not on a handful of new labels
    assert not s.due(1000, 1000, 500)


def test_calibration_keeps_the_fpr_budget_within_each_group_of_ham() -> None:
    """A small group of hard ham that scores like spam: a budget on the whole ham is spent on it; with the groups
    given, the thresholds keep the budget inside each group too."""
    from models.classifier import Calibration
    from models.learning import TrainingSet, calibrate

    rng = np.random.default_rng(3)
    n_easy, n_hard, n_spam = 2000, 100, 600
    z = np.concatenate([rng.normal(-4, 1, n_easy), rng.normal(1.5, 1, n_hard), rng.normal(4, 1, n_spam)])
    y = np.concatenate([np.zeros(n_easy + n_hard, dtype=int), np.ones(n_spam, dtype=int)])
    groups = np.array(["easy"] * n_easy + ["hard"] * n_hard + ["spam"] * n_spam)
    train = TrainingSet(FeatureBatch(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), y.size), y, np.zeros(y.size), np.zeros(y.size, dtype=bool))
    plain, _ = calibrate(train, z, fpr_budget=0.01)
    grouped, source = calibrate(train, z, fpr_budget=0.01, ham_groups=groups)
    hard = groups == "hard"

    def fpr(cal: Calibration, rows: np.ndarray) -> float:
        return float((cal.combined(z[rows], np.zeros(int(rows.sum()))) >= cal.threshold).mean())

    assert fpr(plain, hard) > 0.01  # the whole ham's budget is spent on the hard group
    assert fpr(grouped, hard) <= 0.01 and fpr(grouped, groups == "easy") <= 0.01
    assert grouped.threshold >= plain.threshold and "each group of ham" in source["thresholds"]


def test_a_small_group_of_ham_keeps_the_budget_by_its_tail_not_its_maximum() -> None:
    """100 ham cannot show a 0.1% quantile: the empirical threshold is just above their maximum, and fresh ham of
    the same kind crosses it several times as often as the budget allows. The logistic tail fitted to the same
    100 scores keeps the budget on 200,000 fresh ones."""
    from models.classifier import threshold_for_fpr

    rng = np.random.default_rng(11)
    budget = 0.001
    empirical_fpr, tail_fpr = [], []
    for _ in range(20):
        seen = rng.logistic(-5.0, 1.5, 100)
        fresh = rng.logistic(-5.0, 1.5, 200_000)
        empirical = threshold_for_fpr(seen, np.zeros(seen.size, dtype=bool), budget)
        tail = tail_threshold(seen, budget)
        empirical_fpr.append(float((fresh >= empirical).mean()))
        tail_fpr.append(float((fresh >= max(empirical, tail)).mean()))
    assert np.median(empirical_fpr) > 5 * budget
    assert np.median(tail_fpr) <= 1.5 * budget  # a fit to 100 points: right on the median, not in every draw
    assert max(tail_fpr) < max(empirical_fpr) / 5
    assert tail_threshold(np.zeros(5), budget) == -np.inf  # too few or constant scores: no extrapolation


def test_the_neural_challengers_threshold_keeps_the_budget_on_the_flags_it_is_judged_on() -> None:
    """Its validation share is mostly easy corpus ham; the gate judges it on users' flags, whose ham is harder.
    A threshold fitted on the whole share calls several times the budget of fresh flagged ham spam; its own
    calibration keeps the budget on them."""
    from models.classifier import Calibration

    rng = np.random.default_rng(5)
    n_corpus, n_flags = 3000, 600
    is_flag = np.r_[np.zeros(n_corpus, dtype=bool), np.ones(n_flags, dtype=bool)]
    y = rng.random(is_flag.size) < 0.4

    def logits(flag: np.ndarray, spam: np.ndarray) -> np.ndarray:
        return np.where(spam, rng.normal(4.0, 1.0, spam.size),
                        np.where(flag, rng.logistic(-3.0, 0.8, spam.size), rng.logistic(-7.0, 0.8, spam.size)))

    empty = FeatureBatch(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), is_flag.size)
    train = TrainingSet(empty, y.astype(int), np.zeros(is_flag.size), is_flag)
    fresh_ham = logits(np.ones(100_000, dtype=bool), np.zeros(100_000, dtype=bool))

    def fpr(cal: Calibration) -> float:
        return float((cal.combined(fresh_ham, np.zeros(fresh_ham.size)) >= cal.threshold).mean())

    own_fpr, whole_fpr = [], []
    for _ in range(10):  # a threshold from ~50 flagged ham varies a lot: the median of ten draws
        z = logits(is_flag, y)
        val = np.flatnonzero(rng.random(is_flag.size) < 0.15)
        fit = NeuralFit(model=None, config={}, validation=val, logits=z[val], report=[])
        own, source = fit.calibrate(train, fpr_budget=0.001)
        whole, _ = calibrate(subset(train, val), z[val], fpr_budget=0.001)
        own_fpr.append(fpr(own))
        whole_fpr.append(fpr(whole))
    assert np.median(whole_fpr) > 0.005
    assert np.median(own_fpr) <= 0.0015 and "each group of ham" in source["thresholds"]
