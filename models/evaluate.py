"""``flywheel eval``: the offline evidence for how well rules, models and the served blend separate spam.

Protocols (defined in the models issue):

* **P1, temporal** - train on the earlier collection (``split_p1``), test on the later one. Everything fitted
  (model weights, the blend, operating thresholds) is fitted inside the training period: the blend and the
  thresholds on a hold-out made of the *last* 20% (file order) of each training group, the models then refit
  on the whole training period.
* **P2, online** - one Date-ordered stream (``stream_p2``); each message is scored first, then its label is
  learned: the linear model by the retraining worker's fast clock, a refit on every label so far (cross-fitted
  and bagged, its configuration re-chosen by validation as the labels grow fourfold). Real mail arrives far
  slower than a refit takes, so the worker refits after nearly every flag; replaying 6,046 messages back to back
  cannot afford that, so P2 refits every ``refit_every`` messages and learns each label in between by one SGD
  step on the last refit (a refit every 50 messages without those steps scores 0.45 (1-AUC)% here instead of
  0.23: on this stream the next message is often a near-copy of the last). The neural model retrains
  periodically on everything seen so far (after 50, 100, 200, 400, 800 labels, then
  every ``neural_retrain_every``; before its first training the neural column scores 0.5), the blend refitted
  at each retraining on the out-of-sample scores seen so far.

Metrics: ROC AUC (ties averaged), (1-AUC)%, FPR/FNR at the operating threshold, best spam recall at
FPR <= 0.1% and <= 1% (ROC points with tied scores grouped, so a saturated score cannot cheat), class counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from models.base import Scorer
from models.classifier import Calibration, fit_calibration, sigmoid, threshold_for_fpr
from models.corpus import load_corpus, split_p1, stream_p2
from models.features import FeatureBatch, FeatureConfig, featurize
from models.message import DEFAULT_MAX_BYTES, parse
from models.metrics import metrics, nan_none, recall_at_fpr, roc_auc, windows
from models.registry import jsonable
from models.report import plots
from models.rules import RuleEngine

log = structlog.get_logger(__name__)

SA_RULES_DIR = Path("/usr/share/spamassassin")




# ============================================================================================ curve fits
@dataclass(frozen=True, slots=True)
class Fit:
    """y = a + b * f(x) with its coefficient of determination."""

    kind: str  # "line" (f(x) = x) or "log" (f(x) = ln x)
    a: float
    b: float
    r2: float

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return self.a + self.b * (np.log(x) if self.kind == "log" else x)

    def to_dict(self) -> dict[str, Any]:
        formula = f"y = {self.a:.4f} + {self.b:.4f} * " + ("ln(n)" if self.kind == "log" else "n")
        return {"kind": self.kind, "a": self.a, "b": self.b, "r2": self.r2, "formula": formula}


def _least_squares(f: np.ndarray, y: np.ndarray, kind: str) -> Fit:
    design = np.column_stack([np.ones_like(f), f])
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - (a + b * f)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return Fit(kind, float(a), float(b), r2)


def fit_line(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Fit:
    """Least-squares line y = a + b x."""
    return _least_squares(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), "line")


def fit_log(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Fit:
    """Least-squares logarithm y = a + b ln x (x > 0)."""
    return _least_squares(np.log(np.asarray(x, dtype=np.float64)), np.asarray(y, dtype=np.float64), "log")




# ============================================================================================ learners
def logits(model: Scorer, batch: FeatureBatch) -> np.ndarray:
    """A scorer's logits as float64, one per row."""
    return np.asarray(model.decision_function(batch), dtype=np.float64).reshape(-1)



# The one place that knows the training APIs of models.linear and models.neural.
FPR_BUDGET = 0.001  # operating thresholds: lowest score with hold-out FPR <= 0.1%
HOLDOUT_FRACTION = 0.2
CURVE_SIZES = (25, 50, 100, 200, 400, 800, 1600)
CURVE_FPR = 0.01


def fit_linear(batch: FeatureBatch, labels: np.ndarray, features: FeatureConfig, seed: int = 0) -> Any:
    from models.linear import LinearConfig, LinearModel

    return LinearModel(features, LinearConfig(seed=seed)).fit(batch, labels)


def fit_neural(batch: FeatureBatch, labels: np.ndarray, features: FeatureConfig, seed: int = 0) -> Any:
    from models.neural import NeuralModel

    return NeuralModel(features, seed=seed).fit(batch, labels)


def onnx_logit(model: Any, batch: FeatureBatch, workdir: Path) -> tuple[np.ndarray, float]:
    """Logits through the exported ONNX graph (what is served) and the max |p_ONNX - p_framework| difference."""
    from models.runtime import OnnxModel

    path = model.export_onnx(workdir / f"{type(model).__name__}-{time.monotonic_ns()}.onnx")
    served = OnnxModel(Path(path)).run(batch)
    z = np.asarray(served["logit"], dtype=np.float64).reshape(-1)
    p = np.asarray(served["prob"], dtype=np.float64).reshape(-1)
    return z, float(np.max(np.abs(p - np.asarray(model.predict_proba(batch), dtype=np.float64).reshape(-1)))) if batch.rows else 0.0


# ============================================================================================ data
@dataclass(slots=True)
class Prepared:
    """Messages parsed and scored by the rules once; feature batches cached per FeatureConfig."""

    msgs: list[Any]
    parsed: list[Any]
    results: list[Any]
    labels: np.ndarray  # int64 0/1
    rule_scores: np.ndarray
    rule_spam: np.ndarray
    _batches: dict[str, FeatureBatch]

    def batch(self, config: FeatureConfig) -> FeatureBatch:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in self._batches:
            self._batches[key] = featurize(self.parsed, self.results, config)
        return self._batches[key]

    def subset(self, index: Sequence[int] | np.ndarray) -> Prepared:
        idx = [int(i) for i in index]
        return Prepared(
            [self.msgs[i] for i in idx], [self.parsed[i] for i in idx], [self.results[i] for i in idx],
            self.labels[idx], self.rule_scores[idx], self.rule_spam[idx],
            {k: b.take(idx) for k, b in self._batches.items()},
        )


def prepare(msgs: Sequence[Any], engine: RuleEngine, max_bytes: int = DEFAULT_MAX_BYTES) -> Prepared:
    parsed = [parse(m.raw, max_bytes=max_bytes) for m in msgs]
    results = [engine.evaluate(p) for p in parsed]
    return Prepared(
        list(msgs), parsed, results, np.array([1 if m.is_spam else 0 for m in msgs], dtype=np.int64),
        np.array([r.score for r in results], dtype=np.float64), np.array([r.is_spam for r in results], dtype=bool), {},
    )


def holdout_split(msgs: Sequence[Any], fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(fit, hold-out) positions: the last ``fraction`` of every group in file order, so the hold-out is the
    latest part of the training period, as the test period is later than the training period."""
    by_group: dict[str, list[int]] = {}
    for i, m in enumerate(msgs):
        by_group.setdefault(m.group, []).append(i)
    fit: list[int] = []
    hold: list[int] = []
    for positions in by_group.values():
        positions.sort(key=lambda i: msgs[i].index)
        k = math.ceil(len(positions) * fraction)
        fit.extend(positions[: len(positions) - k])
        hold.extend(positions[len(positions) - k :])
    return np.array(sorted(fit), dtype=np.int64), np.array(sorted(hold), dtype=np.int64)


def _stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positions keeping the class ratio, at least one of each class."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if n >= len(labels):
        return rng.permutation(len(labels))
    k_pos = min(max(1, round(n * len(pos) / len(labels))), len(pos), n - 1)
    return np.sort(np.concatenate([rng.choice(pos, k_pos, replace=False), rng.choice(neg, n - k_pos, replace=False)]))


def _spread(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key in ("auc", "one_minus_auc_pct", "recall_at_fpr_0_1pct", "recall_at_fpr_1pct", "fpr", "fnr"):
        vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)
        if vals.size:
            out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                        "min": float(vals.min()), "max": float(vals.max())}
    return out


class _Progress:
    """Progress of a long evaluation for the person waiting: stage lines timed from the start (stderr by default),
    and a count of the steps done of those planned so far. A sink that also has ``advance(done, total)`` (the
    CLI's progress bar) is told the count after each change; a plain callable gets the lines only."""

    def __init__(self, sink: Callable[[str], None] | None) -> None:
        self.sink = sink or (lambda s: print(s, file=sys.stderr, flush=True))
        self.t0 = time.perf_counter()
        self.done = 0
        self.total = 0
        self._advance: Callable[[int, int], None] | None = getattr(sink, "advance", None)

    def __call__(self, msg: str) -> None:
        self.sink(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}")

    def plan(self, steps: int) -> None:
        """``steps`` more steps lie ahead."""
        self.total += max(0, steps)
        self._tell()

    def step(self) -> None:
        """One planned step is done."""
        self.done = min(self.done + 1, self.total)
        self._tell()

    def _tell(self) -> None:
        if self._advance is not None:
            self._advance(self.done, self.total)


# ============================================================================================ P1
def run_p1(
    corpus: Sequence[Any],
    *,
    engine: RuleEngine,
    workdir: Path,
    seeds: int = 3,
    ablation: bool = True,
    sa_rules_dir: Path | None = SA_RULES_DIR,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Temporal protocol; every fitted parameter comes from the training period (see the module docstring)."""
    say = progress if isinstance(progress, _Progress) else _Progress(progress)
    train, test = split_p1(corpus)
    has_sa = sa_rules_dir is not None and Path(sa_rules_dir).is_dir()
    say.plan(4 + max(1, seeds) + int(ablation) + int(has_sa))
    say(f"P1: parsing and rules on {len(train)} train / {len(test)} test messages")
    tr, te = prepare(train, engine), prepare(test, engine)
    say.step()
    cfg = FeatureConfig()
    x_tr, x_te = tr.batch(cfg), te.batch(cfg)
    fit_i, hold_i = holdout_split(train)
    y_tr, y_te, y_hold = tr.labels, te.labels, tr.labels[hold_i]
    x_fit, x_hold = x_tr.take(fit_i), x_tr.take(hold_i)
    timing: dict[str, float] = {}
    results: dict[str, Any] = {"rules": metrics(te.rule_scores, y_te, te.rule_spam)}
    results["rules"]["threshold"] = float(engine.threshold)

    say("P1: linear model (hold-out fit, then the whole training period)")
    lin_h = fit_linear(x_fit, y_tr[fit_i], cfg)
    p_hold_lin = logits(lin_h, x_hold)
    t = time.perf_counter()
    lin = fit_linear(x_tr, y_tr, cfg)
    timing["train_linear_s"] = time.perf_counter() - t
    p_te_lin, parity_lin = onnx_logit(lin, x_te, workdir)
    thr_lin = threshold_for_fpr(p_hold_lin, y_hold, FPR_BUDGET)
    results["linear"] = {**metrics(p_te_lin, y_te, p_te_lin >= thr_lin), "threshold": thr_lin}
    say.step()

    say(f"P1: neural model, hold-out fit + {seeds} seed(s) on the whole training period")
    nn_h = fit_neural(x_fit, y_tr[fit_i], cfg, seed=0)
    p_hold_nn = logits(nn_h, x_hold)
    say.step()
    seed_rows: list[dict[str, Any]] = []
    p_te_nn = np.zeros(0)
    parity_nn = 0.0
    thr_nn = threshold_for_fpr(p_hold_nn, y_hold, FPR_BUDGET)
    for s in range(max(1, seeds)):
        t = time.perf_counter()
        nn = fit_neural(x_tr, y_tr, cfg, seed=s)
        timing.setdefault("train_neural_s", time.perf_counter() - t)
        p, par = onnx_logit(nn, x_te, workdir)
        parity_nn = max(parity_nn, par)
        row = {**metrics(p, y_te, p >= thr_nn), "seed": s}
        seed_rows.append(row)
        say(f"  seed {s}: 1-AUC {row['one_minus_auc_pct']:.3f}%  recall@0.1% {row['recall_at_fpr_0_1pct']:.3f}")
        say.step()
        if s == 0:
            p_te_nn = p
    results["neural"] = {**{k: v for k, v in seed_rows[0].items() if k != "seed"}, "threshold": thr_nn}

    say("P1: blends fitted on the training-period hold-out")
    cal = fit_calibration(p_hold_nn, tr.rule_scores[hold_i], y_hold, fpr_budget=FPR_BUDGET)
    # Served figures rank by the blend's log-odds (what /classify answers as ``score``): the probability
    # saturates at 1.0 for confident messages and would tie them.
    p_blend_nn = cal.combined_logit(p_te_nn, te.rule_scores)
    blend_nn = {**metrics(p_blend_nn, y_te, cal.combined(p_te_nn, te.rule_scores) >= cal.threshold),
                "threshold": cal.threshold}
    say("P1: the seed `flywheel setup` ships, scored through the serving path")
    p_served, results["served"] = served_seed(corpus, test, engine, workdir)
    cal_lin = fit_calibration(p_hold_lin, tr.rule_scores[hold_i], y_hold, fpr_budget=FPR_BUDGET)
    p_served_lin = cal_lin.combined_logit(p_te_lin, te.rule_scores)
    either = (p_te_nn >= thr_nn) | te.rule_spam
    variants = {
        "combined(neural, rules)": blend_nn,
        "combined(linear, rules)": {**metrics(p_served_lin, y_te,
                                             cal_lin.combined(p_te_lin, te.rule_scores) >= cal_lin.threshold),
                                    "threshold": cal_lin.threshold},
        "either(neural, rules)": metrics(np.maximum(sigmoid(p_te_nn), cal.rules_probability(te.rule_scores)), y_te, either),
        "model only (neural)": results["neural"],
    }
    hold_metrics = {
        "neural": metrics(p_hold_nn, y_hold, p_hold_nn >= thr_nn),
        "combined": metrics(cal.combined_logit(p_hold_nn, tr.rule_scores[hold_i]), y_hold,
                            cal.combined(p_hold_nn, tr.rule_scores[hold_i]) >= cal.threshold),
    }
    out: dict[str, Any] = {
        "protocol": "P1",
        "results": results,
        "neural_seeds": {"per_seed": seed_rows, "spread": _spread(seed_rows)},
        "served_design": {
            "policy": "combined", "calibration": cal.to_dict(), "calibration_linear": cal_lin.to_dict(),
            "fitted_on": {"holdout": "last 20% (file order) of each P1 training group", "n_ham": int((y_hold == 0).sum()),
                          "n_spam": int(y_hold.sum())},
            "holdout_metrics": hold_metrics, "variants_on_test": variants,
        },
        "onnx_parity_max_abs": {"linear": parity_lin, "neural": parity_nn},
        "split": {"train": len(train), "test": len(test), "train_spam": int(y_tr.sum()), "test_spam": int(y_te.sum())},
        "rules_active": int(engine.active_count),
        "timing_s": timing,
    }
    say.step()
    if ablation:
        say("P1: artefact ablation (features with the corpus's collection artefacts)")
        out["ablation"] = _ablation(tr, te, cfg, results)
        say.step()
    if has_sa and sa_rules_dir is not None:
        say(f"P1: SpamAssassin rules imported from {sa_rules_dir}")
        out["spamassassin_import"] = _sa_import(Path(sa_rules_dir), te, results["rules"])
        say.step()
    out["_scores"] = {"rules": te.rule_scores, "linear": p_te_lin, "neural": p_te_nn, "served": p_served, "labels": y_te}
    return out


def served_seed(corpus: Sequence[Any], test: Sequence[Any], engine: RuleEngine, workdir: Path,
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """The seed ``flywheel setup`` ships (:func:`models.seed.train_seed`, its defaults), stored in a registry and
    loaded back as the API loads it, then scored on ``test`` by the serving classifier (parse, rules, ONNX, the
    version's calibration): day one as a fresh install serves it. Returns the ranking scores (``score``, the
    served log-odds) and the metrics with the version and its kind."""
    from models.classifier import Classifier
    from models.registry import Registry
    from models.seed import train_seed

    root = workdir / "seed-registry"
    version = train_seed(corpus, root, engine=engine)
    loaded = Registry(root).load(version)
    verdicts = Classifier(engine, loaded).classify_batch([m.raw for m in test])
    scores = np.array([v.score for v in verdicts], dtype=np.float64)
    y = np.array([m.is_spam for m in test], dtype=bool)
    out = {**metrics(scores, y, np.array([v.is_spam for v in verdicts], dtype=bool)), "version": version,
           "kind": loaded.kind, "threshold": float(loaded.calibration.get("threshold", 0.5)) if loaded.calibration
           else None, "scored": "the shipped seed through models.classifier.Classifier, as /classify serves it"}
    return scores, out


def _ablation(tr: Prepared, te: Prepared, cfg: FeatureConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    """Same models with the collection artefacts switched on: if the models leaned on artefacts, the
    artefact-free features (the default) would lose clearly to these; equal figures mean they do not."""
    art = dataclasses.replace(cfg, include_artefacts=True)
    xa_tr, xa_te = tr.batch(art), te.batch(art)
    lin = fit_linear(xa_tr, tr.labels, art)
    nn = fit_neural(xa_tr, tr.labels, art, seed=0)
    p_lin, p_nn = logits(lin, xa_te), logits(nn, xa_te)
    pick = ("auc", "one_minus_auc_pct", "recall_at_fpr_0_1pct", "recall_at_fpr_1pct")
    rows = {
        "linear": {"without_artefacts": {k: base["linear"][k] for k in pick},
                   "with_artefacts": {k: v for k, v in metrics(p_lin, te.labels, p_lin >= 0.0).items() if k in pick}},
        "neural": {"without_artefacts": {k: base["neural"][k] for k in pick},
                   "with_artefacts": {k: v for k, v in metrics(p_nn, te.labels, p_nn >= 0.0).items() if k in pick}},
    }
    return {"note": "default features exclude the artefacts (FeatureConfig.include_artefacts=False)", **rows}


def _sa_import(sa_dir: Path, te: Prepared, own: Mapping[str, Any]) -> dict[str, Any]:
    from models.rules import import_spamassassin

    t = time.perf_counter()
    rules, skipped = import_spamassassin(sorted(sa_dir.glob("*.cf")))
    eng = RuleEngine(rules, threshold=5.0)
    scores = np.array([eng.evaluate(p).score for p in te.parsed])
    reasons: dict[str, int] = {}
    for _, why in skipped:
        key = why.split(":")[0][:60]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "imported": len(rules), "skipped": len(skipped), "skipped_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:10]),
        "metrics": metrics(scores, te.labels, scores >= 5.0), "own_rules_metrics": dict(own),
        "seconds": time.perf_counter() - t,
    }


# ============================================================================================ P2
def neural_schedule(n: int, every: int, first: int = 50) -> list[int]:
    """Stream positions at which the neural model retrains: 50, 100, 200, ... doubling, then every ``every``."""
    points: list[int] = []
    k = first
    while k < n:
        points.append(k)
        k = min(2 * k, k + every)
    return points


def run_p2(
    corpus: Sequence[Any],
    *,
    engine: RuleEngine,
    neural_retrain_every: int = 1000,
    recalibrate_every: int = 250,
    refit_every: int = 50,
    recent: int = 2000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Online protocol: score each message, then learn its label (see the module docstring)."""
    say = progress if isinstance(progress, _Progress) else _Progress(progress)
    stream = stream_p2(corpus)
    say.plan(2 + len(range(0, len(stream), refit_every)) + len(neural_schedule(len(stream), neural_retrain_every)))
    say(f"P2: parsing and rules on {len(stream)} messages in Date order")
    pr = prepare(stream, engine)
    say.step()
    cfg = FeatureConfig()
    x = pr.batch(cfg)
    y = pr.labels
    n = len(stream)
    starts = np.searchsorted(x.seg, np.arange(n + 1))

    say(f"P2: linear model, refit on every label so far each {refit_every} messages, each label also learned "
        "by one SGD step as it arrives")
    from models.learning import TrainingSet, calibrate, cross_fit_linear, refit_linear, select_linear
    from models.linear import LinearModel

    t = time.perf_counter()
    z_lin = np.zeros(n)
    blend = np.zeros(n)  # the worker's served blend: fitted with each refit on its out-of-fold logits
    blend_spam = np.zeros(n, dtype=bool)
    model: Any = LinearModel(cfg)  # until a refit is possible (both classes seen), SGD steps from nothing
    cal_k = Calibration()
    choice = None
    chosen_at = 0
    for k in range(0, n, refit_every):
        if k > 0 and len(set(y[:k].tolist())) == 2:
            seen = TrainingSet(x.take(np.arange(k)), y[:k], pr.rule_scores[:k], np.ones(k, dtype=bool))
            if choice is None or k >= max(4 * chosen_at, 100):
                choice, chosen_at = select_linear(seen, features=cfg), k
            else:
                choice.cross = cross_fit_linear(seen, choice.config, choice.flag_weight, features=cfg)
            model = refit_linear(seen, choice, features=cfg)
            cal_k, _ = calibrate(seen, choice.oof, fpr_budget=FPR_BUDGET)
        for i in range(k, min(n, k + refit_every)):
            row = FeatureBatch(x.ids[starts[i] : starts[i + 1]], x.vals[starts[i] : starts[i + 1]],
                               np.zeros(starts[i + 1] - starts[i], dtype=np.int64), 1)
            z_lin[i] = float(model.decision_function(row)[0])
            blend[i] = float(cal_k.combined_logit(z_lin[i], pr.rule_scores[i]))
            blend_spam[i] = bool(cal_k.combined(z_lin[i], pr.rule_scores[i]) >= cal_k.threshold)
            model.partial_fit(row, y[i : i + 1])
        say.step()
    linear_s = time.perf_counter() - t

    say(f"P2: neural model, retrained at {neural_schedule(n, neural_retrain_every)}")
    z_nn = np.zeros(n)  # logit 0 = probability 0.5 until the first training
    trained_at: list[int] = []
    points = [*neural_schedule(n, neural_retrain_every), n]
    t = time.perf_counter()
    for k, nxt in pairwise(points):
        if len(set(y[:k].tolist())) < 2:
            say.step()
            continue
        nn = fit_neural(x.take(np.arange(k)), y[:k], cfg, seed=0)
        z_nn[k:nxt] = logits(nn, x.take(np.arange(k, nxt)))
        trained_at.append(k)
        say(f"  neural trained on {k} labels")
        say.step()
    neural_s = time.perf_counter() - t
    first_nn = trained_at[0] if trained_at else n

    say("P2: served blend, champion chosen and blend refitted on past scores only")
    served = np.zeros(n)
    served_spam = np.zeros(n, dtype=bool)
    thr_lin_arr, thr_nn_arr = np.full(n, 0.0), np.full(n, 0.0)
    champions: list[dict[str, Any]] = []
    marks = sorted(set(range(0, n, recalibrate_every)) | set(trained_at))
    for k, nxt in pairwise([*marks, n]):
        lo = max(0, k - recent)
        past_y = y[lo:k]
        both = len(set(past_y.tolist())) == 2 and min(int(past_y.sum()), int((past_y == 0).sum())) >= 5
        kind, z_now = "linear", z_lin
        if both and k > first_nn:
            nlo = max(lo, first_nn)
            if (
                len(set(y[nlo:k].tolist())) == 2
                and k - nlo >= 100
                and roc_auc(z_nn[nlo:k], y[nlo:k]) > roc_auc(z_lin[nlo:k], y[nlo:k])
            ):
                kind, z_now = "neural", z_nn
        if both:
            cal = fit_calibration(z_now[lo:k], pr.rule_scores[lo:k], past_y, fpr_budget=FPR_BUDGET)
            thr_lin_arr[k:nxt] = threshold_for_fpr(z_lin[lo:k], past_y, FPR_BUDGET)
            thr_nn_arr[k:nxt] = threshold_for_fpr(z_nn[lo:k], past_y, FPR_BUDGET)
        else:
            cal = Calibration()
        served[k:nxt] = cal.combined_logit(z_now[k:nxt], pr.rule_scores[k:nxt])
        served_spam[k:nxt] = cal.combined(z_now[k:nxt], pr.rule_scores[k:nxt]) >= cal.threshold
        if not champions or champions[-1]["kind"] != kind:
            champions.append({"from": k, "kind": kind})
    say.step()

    results = {
        "rules": metrics(pr.rule_scores, y, pr.rule_spam),
        "linear": metrics(z_lin, y, z_lin >= thr_lin_arr),
        "neural": metrics(z_nn, y, z_nn >= thr_nn_arr),
        "served": metrics(served, y, served_spam),
        "served_refit_blend": metrics(blend, y, blend_spam),
    }
    results["neural_after_first_training"] = metrics(z_nn[first_nn:], y[first_nn:], (z_nn >= thr_nn_arr)[first_nn:])
    wins = {
        "rules": windows(pr.rule_scores, y, pr.rule_spam),
        "linear": windows(z_lin, y, z_lin >= thr_lin_arr),
        "neural": windows(z_nn, y, z_nn >= thr_nn_arr),
        "served": windows(served, y, served_spam),
    }
    return {
        "protocol": "P2",
        "results": results,
        "windows": wins,
        "learning": {
            "linear": f"refit on every label so far each {refit_every} messages, cross-fitted and bagged (the "
                      "worker's fast clock), each label in between learned by one SGD step on the last refit; "
                      "before the first refit (both classes seen), SGD steps from an all-zero model",
            "neural": f"retrained from scratch on all labels so far at {trained_at}; logit 0 (p=0.5) before {first_nn}",
            "served": f"combined blend re-fitted every {recalibrate_every} messages on the last {recent} scored "
                      "messages' out-of-sample scores; champion = the model with the higher past AUC",
            "served_refit_blend": "the worker's way: the linear model with the blend calibrated at each refit on "
                                  "its out-of-fold logits",
            "champions": champions,
        },
        "timing_s": {"linear_online_s": linear_s, "neural_retraining_s": neural_s},
        "_scores": {"rules": pr.rule_scores, "linear": z_lin, "neural": z_nn, "served": served,
                    "served_refit_blend": blend, "labels": y},
    }


# ============================================================================================ curves
def run_curves(
    corpus: Sequence[Any],
    *,
    engine: RuleEngine,
    draws: int = 3,
    sizes: Sequence[int] = CURVE_SIZES,
    progress: Callable[[str], None] | None = None,
    prepared: tuple[Prepared, Prepared] | None = None,
) -> dict[str, Any]:
    """The two improvement curves on the P1 test period, at FPR <= 1%: rules vs rule count (line fit) and
    learned models vs training-set size (log fit)."""
    say = progress if isinstance(progress, _Progress) else _Progress(progress)
    train, test = split_p1(corpus)
    if prepared is None:
        say.plan(1)
        say(f"curves: parsing and rules on {len(train)} train / {len(test)} test messages")
    tr, te = prepared or (prepare(train, engine), prepare(test, engine))
    if prepared is None:
        say.step()
    y_te = te.labels
    order = engine.order_added()
    total = len(order)
    counts = sorted(set(np.linspace(0, total, num=min(total, 32) + 1).round().astype(int).tolist()))
    say.plan(len(counts) + draws * (len([s for s in sizes if s < tr.labels.size]) + 1))
    say(f"curves: rules, {len(counts)} rule counts of {total}")
    rule_pts: list[dict[str, Any]] = []
    for c in counts:
        eng = engine.first(c)
        s = np.array([eng.evaluate(p).score for p in te.parsed])
        rule_pts.append({"n_rules": int(c), "recall": recall_at_fpr(s, y_te, CURVE_FPR), "auc": nan_none(roc_auc(s, y_te))})
        say.step()
    rule_fit = fit_line([p["n_rules"] for p in rule_pts], [p["recall"] for p in rule_pts])

    cfg = FeatureConfig()
    x_tr, x_te = tr.batch(cfg), te.batch(cfg)
    n_all = tr.labels.size
    grid = [s for s in sizes if s < n_all] + [n_all]
    model_pts: dict[str, list[dict[str, Any]]] = {"linear": [], "neural": []}
    for n in grid:
        say(f"curves: models on {n} training messages x {draws} draws")
        for d in range(draws):
            rng = np.random.default_rng(1000 * d + n)
            idx = _stratified_sample(tr.labels, n, rng)
            xb, yb = x_tr.take(idx), tr.labels[idx]
            for kind, fit in (("linear", fit_linear), ("neural", fit_neural)):
                m = fit(xb, yb, cfg, seed=d)
                z = logits(m, x_te)
                model_pts[kind].append({"n": int(n), "draw": d, "recall": recall_at_fpr(z, y_te, CURVE_FPR),
                                        "auc": nan_none(roc_auc(z, y_te))})
            say.step()
    model_fits = {k: fit_log([p["n"] for p in v], [p["recall"] for p in v]) for k, v in model_pts.items()}
    return {
        "fpr_budget": CURVE_FPR,
        "metric": "spam recall at FPR <= 1% on the P1 test period",
        "rules": {"points": rule_pts, "fit": rule_fit.to_dict()},
        "models": {k: {"points": v, "fit": model_fits[k].to_dict()} for k, v in model_pts.items()},
    }


# ============================================================================================ entry points
def run_eval(
    protocol: str,
    *,
    downloads_dir: Path,
    corpus_dir: Path | None,
    out_dir: Path,
    json_path: Path | None,
    curves: bool,
    seeds: int,
    neural_retrain_every: int = 1000,
    progress: Callable[[str], None] | None = None,
    corpus: Sequence[Any] | None = None,
    ablation: bool = True,
    sa_rules_dir: Path | None = SA_RULES_DIR,
) -> dict[str, Any]:
    """``flywheel eval``: run a protocol (and optionally the curves), write the PNG(s) and JSON, return the dict."""
    if protocol not in ("P1", "P2"):
        raise ValueError(f"protocol must be P1 or P2, got {protocol!r}")
    say = _Progress(progress)
    say.plan(2 + int(json_path is not None))
    if corpus is None:
        say("loading the corpus")
    msgs = list(corpus) if corpus is not None else load_corpus(Path(downloads_dir), corpus_dir)
    say.step()
    engine = RuleEngine.default()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flywheel-eval-") as tmp:
        if protocol == "P1":
            result = run_p1(msgs, engine=engine, workdir=Path(tmp), seeds=seeds, ablation=ablation,
                            sa_rules_dir=sa_rules_dir, progress=say)
        else:
            result = run_p2(msgs, engine=engine, neural_retrain_every=neural_retrain_every, progress=say)
    if curves:
        result["curves"] = run_curves(msgs, engine=engine, progress=say)
    scores = result.pop("_scores")
    result["figures"] = plots(result, scores, out_dir)
    result["corpus"] = {"messages": len(msgs), "spam": sum(1 for m in msgs if m.is_spam)}
    say(f"figures: {', '.join(result['figures'])}")
    say.step()
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
        say(f"JSON written to {json_path}")
        say.step()
    return result
