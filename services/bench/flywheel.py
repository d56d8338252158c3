"""``flywheel bench flywheel``: do users' correct flags on new mail reach serving, as much better models, soon?

Measured from outside, on the real broker, API and worker (a :class:`~services.bench.harness.LocalStack` per run):

1. P1's test period (the later mail, hard ham included) is split by a hash of the message id into a *flagged*
   half A and an *unflagged* half B. B is never seen by the worker: it is not flagged, and the worker is told to
   keep it out of its corpus (``eval_exclude_file``), so it is in no evaluation set and no training set.
2. B is scored over HTTP (``/classify``): the *before* figures, from the served probability and verdict.
3. Every message of A is classified, then flagged through ``/feedback`` by its message id, from several
   reporters in turn (with ``noise`` > 0, that share of the flags carries the wrong label).
4. The worker is left to settle (every record applied, the gate has judged a refit on everything, nothing
   training), then B is scored over HTTP again: the *after* figures.
5. In the same run, the reference: an offline refit of the served model's kind on the same data (the worker's
   base corpus plus A with its true labels), by the same learning code, scored on B the way serving scores.

``seconds_to_effect``: from the last flag to the promotion of the first champion whose figure on B is within
1.25x of the final one (champions are re-scored offline through the serving path, one per promotion).
The noisy figure comes from a second, fresh stack whose flags carry 30% wrong labels.

Where the end state depends on timing and order (which refit the gate saw when), one run proves little:
``--repeats N`` runs N clean stacks, each with its own split salt and flag order (and its own offline
reference), and at least two noisy ones, then reports the worst and the median of each figure. The flat keys
(``after_one_minus_auc_pct``, ...) are those of the worst clean run and the worst noisy run.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from services.bench.harness import LocalStack, reporter_keys
from services.local.daemon import wait_until

if TYPE_CHECKING:
    from models.corpus import CorpusMessage
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = ["run_flywheel_bench", "split_flagged"]

SPLIT_SALT = "flywheel-bench:"
REPORTERS = 8
EFFECT_RATIO = 1.25
TARGETS = {
    "after_vs_offline": 1.25,  # after <= 1.25 x offline
    "after_vs_before": 0.5,  # after <= 0.5 x before
    "recall_gap_points": 5.0,  # after recall@0.1% at most 5 points below offline's
    "after_fpr_at_verdict": 0.005,
    "seconds_to_effect": 60.0,
    "median_after_vs_offline": 1.10,  # with --repeats: the median clean run
    "median_noisy_after_vs_before": 0.9,  # with --repeats: the median noisy run learns from the 70% right flags
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_flagged(msgs: Sequence[CorpusMessage], salt: str = SPLIT_SALT,
                  ) -> tuple[list[CorpusMessage], list[CorpusMessage]]:
    """(A, B) by a salted hash of the message id: independent of the worker's own held-out hash."""
    from models.consensus import message_id_for

    a: list[CorpusMessage] = []
    b: list[CorpusMessage] = []
    for m in msgs:
        h = int(hashlib.sha256((salt + message_id_for(m.raw)).encode()).hexdigest()[:8], 16)
        (a if h % 2 == 0 else b).append(m)
    return a, b


def figures(probability: np.ndarray, verdict: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """What users see: ranking quality of the served probability, and the served verdicts' error rates."""
    from models.metrics import recall_at_fpr, roc_auc

    y = np.asarray(y, dtype=bool)
    v = np.asarray(verdict, dtype=bool)
    return {
        "one_minus_auc_pct": 100.0 * (1.0 - roc_auc(probability, y)),
        "recall_at_fpr_0_1pct": recall_at_fpr(probability, y, 0.001),
        "recall_at_fpr_1pct": recall_at_fpr(probability, y, 0.01),
        "fpr_at_verdict": float((v & ~y).sum() / max(1, (~y).sum())),
        "recall_at_verdict": float((v & y).sum() / max(1, y.sum())),
        "n_spam": int(y.sum()),
        "n_ham": int((~y).sum()),
    }


def _served(answers: Sequence[dict[str, Any]], y: np.ndarray) -> dict[str, float]:
    """Figures of /classify answers: ranked by ``score`` (the probability saturates), verdicts as answered."""
    return figures(np.array([a["score"] for a in answers]), np.array([a["is_spam"] for a in answers]), y)


def _offline_served(registry_root: Path, version: str, raws: Sequence[bytes], y: np.ndarray) -> dict[str, float]:
    """A registry version scored the way serving scores (parse, rules, ONNX, the version's calibration)."""
    from models.classifier import Classifier
    from models.registry import Registry
    from models.rules import RuleEngine

    loaded = Registry(registry_root).load(version)
    verdicts = Classifier(RuleEngine.default(), loaded).classify_batch(list(raws))
    return figures(np.array([v.score for v in verdicts]), np.array([v.is_spam for v in verdicts]), y)


def offline_reference(settings: Settings, flagged: Sequence[CorpusMessage], unflagged: Sequence[CorpusMessage],
                      kind: str) -> dict[str, Any]:
    """The same learning code, offline, on the worker's base corpus plus every flagged message (true labels)."""
    from models.consensus import message_id_for
    from models.features import FeatureConfig, featurize
    from models.learning import TrainingSet, calibrate, fit_neural, fold_key, refit_linear, select_linear, subset
    from models.message import parse
    from models.rules import RuleEngine
    from services.worker.data import corpus_data

    engine = RuleEngine.default()
    cfg = FeatureConfig()
    base = corpus_data(settings).base

    def feats(raws: Sequence[bytes]) -> tuple[Any, np.ndarray]:
        parsed = [parse(r, max_bytes=settings.analyse_bytes) for r in raws]
        results = [engine.evaluate(p) for p in parsed]
        return featurize(parsed, results, cfg), np.array([r.score for r in results], dtype=np.float64)

    raws = [raw for _, raw, _, _ in base] + [m.raw for m in flagged]
    batch, rules = feats(raws)
    labels = np.array([int(s) for _, _, s, _ in base] + [int(m.is_spam) for m in flagged])
    is_flag = np.array([False] * len(base) + [True] * len(flagged))
    keys = [fold_key(mid) for mid, _, _, _ in base] + [fold_key(message_id_for(m.raw)) for m in flagged]
    train = TrainingSet(batch, labels, rules, is_flag, fold_keys=np.array(keys))
    choice = select_linear(train, features=cfg)
    if kind == "neural":
        fit = fit_neural(train, choice.flag_weight, features=cfg)
        model: Any = fit.model
        cal, _ = calibrate(subset(train, fit.validation), fit.logits, fpr_budget=settings.fpr_budget)
    else:
        model = refit_linear(train, choice, features=cfg)
        cal, _ = calibrate(train, choice.oof, fpr_budget=settings.fpr_budget)
    b_batch, b_rules = feats([m.raw for m in unflagged])
    z = np.asarray(model.decision_function(b_batch), dtype=np.float64).reshape(-1)
    out: dict[str, Any] = figures(cal.combined_logit(z, b_rules), cal.combined(z, b_rules) >= cal.threshold,
                  np.array([m.is_spam for m in unflagged]))
    out["kind"] = kind
    out["flag_weight"] = choice.flag_weight
    out["alpha"] = choice.config.alpha
    return out


def _iso_epoch(at: str) -> float:
    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


def run_once(settings: Settings, root: Path, flagged: Sequence[CorpusMessage], unflagged: Sequence[CorpusMessage],
             *, noise: float, label: str, order_seed: int = 20261201) -> dict[str, Any]:
    """One stack: before, flags, settle, after, and the timeline of champions."""
    from models.consensus import message_id_for

    root.mkdir(parents=True, exist_ok=True)
    exclude = root / "unflagged-ids.txt"
    exclude.write_text("\n".join(message_id_for(m.raw) for m in unflagged) + "\n")
    keys = reporter_keys(REPORTERS, prefix="k-bench")
    reporter_keys_list = [k for k in keys if k != "dev-admin-key"]
    y_b = np.array([m.is_spam for m in unflagged])
    raws_b = [m.raw for m in unflagged]
    out: dict[str, Any] = {"noise": noise}
    with LocalStack(settings, root, api_keys=keys, eval_exclude_file=exclude) as stack:
        _say(f"==> [{label}] stack up; scoring the unflagged half ({len(unflagged)}) over HTTP")
        before = _served(stack.classify_many(raws_b), y_b)
        out["before"] = before
        _say(f"    before: (1-AUC)% {before['one_minus_auc_pct']:.3f}, recall@0.1% {before['recall_at_fpr_0_1pct']:.1%}, "
             f"FPR at verdict {before['fpr_at_verdict']:.2%}")
        rng = random.Random(order_seed)
        order = list(flagged)
        rng.shuffle(order)
        wrong = set(rng.sample(range(len(order)), round(noise * len(order)))) if noise else set()
        _say(f"==> [{label}] flagging {len(order)} messages from {REPORTERS} reporters"
             + (f", {len(wrong)} with the wrong label" if wrong else ""))
        t0 = time.monotonic()
        answers = stack.classify_many([m.raw for m in order], threads=4)
        from concurrent.futures import ThreadPoolExecutor

        def flag(i: int) -> None:
            m = order[i]
            label_ = "spam" if m.is_spam != (i in wrong) else "ham"
            r = stack.flag(label_, reporter_keys_list[i % len(reporter_keys_list)], message_id=answers[i]["message_id"])
            if r.status_code != 202:
                raise RuntimeError(f"/feedback answered {r.status_code}: {r.text}")

        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(flag, range(len(order))))
        t_last_flag = time.time()
        out["flagging_s"] = round(time.monotonic() - t0, 1)
        _say(f"    {len(order)} flags accepted in {out['flagging_s']} s; waiting for the worker to settle")
        counted = len(order)
        wait_until(lambda: stack.counters().get("events", 0) >= counted, 300, "the worker to apply every flag", 0.5)
        t_settle = time.monotonic()
        wait_until(stack.settled, 900, "the worker to settle", 1.0)
        out["settle_s"] = round(time.monotonic() - t_settle, 1)
        reg = stack.registry()
        champion = reg.champion()
        assert champion is not None
        wait_until(lambda: stack.classify(raws_b[0])["model"]["version"] == champion, 60, "the API to serve the champion")
        after = _served(stack.classify_many(raws_b), y_b)
        out["after"] = after
        out["champion"] = {"version": champion, "kind": reg.get(champion).kind}
        decisions = reg.decisions()
        out["decisions"] = {"promoted": sum(d["decision"] == "promoted" for d in decisions),
                            "rejected": sum(d["decision"] == "rejected" for d in decisions),
                            "by_kind": {k: sum(d.get("kind") == k for d in decisions) for k in ("linear", "neural")}}
        _say(f"    after: (1-AUC)% {after['one_minus_auc_pct']:.3f}, recall@0.1% {after['recall_at_fpr_0_1pct']:.1%}, "
             f"FPR at verdict {after['fpr_at_verdict']:.2%} (champion {champion[-20:]}, {out['decisions']})")
        # Timeline: the champion in force at the last flag, then every promotion after it.
        history = [h for h in reg.history() if h.get("action") == "promote"]
        in_force = [h for h in history if _iso_epoch(h["at"]) <= t_last_flag]
        timeline = ([in_force[-1]] if in_force else []) + [h for h in history if _iso_epoch(h["at"]) > t_last_flag]
        final = after["one_minus_auc_pct"]
        effect: float | None = None
        points = []
        for h in timeline:
            try:
                f = _offline_served(stack.settings.registry, h["version"], raws_b, y_b)
            except Exception as exc:  # noqa: BLE001 - a pruned early version: it can no longer be scored
                log.warning("timeline version not scored", version=h["version"], error=str(exc))
                continue
            at = max(0.0, _iso_epoch(h["at"]) - t_last_flag)
            points.append({"seconds_after_last_flag": round(at, 2), "version": h["version"],
                           "one_minus_auc_pct": f["one_minus_auc_pct"]})
            if effect is None and f["one_minus_auc_pct"] <= EFFECT_RATIO * final + 1e-9:
                effect = at
        out["timeline"] = points
        out["seconds_to_effect"] = None if effect is None else round(effect, 2)
        out["live_verdicts"] = {k: v for k, v in stack.counters().items() if k in ("events", "votes", "data_version")}
    return out


def _salt(run: int) -> str:
    return SPLIT_SALT if run == 0 else f"{SPLIT_SALT}{run}:"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def run_flywheel_bench(settings: Settings, json_path: Path | None, *, noise: float = 0.3,
                       noisy_run: bool = True, every: int = 1, repeats: int = 1) -> dict[str, Any]:
    """The clean runs with their offline references and the noisy runs; prints a table and writes the JSON.

    ``repeats`` clean runs (each its own split salt and flag order) and, with ``noisy_run``, one noisy run for a
    single repeat or at least two otherwise. ``every`` > 1 keeps one message in ``every`` of the test period (a
    smaller, quicker run; the targets are stated for the whole period)."""
    from models.corpus import load_corpus, split_p1

    started = time.monotonic()
    corpus = load_corpus(settings.downloads, settings.corpus_dir)
    _, test = split_p1(corpus)
    test = test[:: max(1, every)]
    root = settings.state_dir / "bench-flywheel" / time.strftime("%Y%m%dT%H%M%S")
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"reporters": REPORTERS, "repeats": repeats, "runs": runs}
    for r in range(repeats):
        flagged, unflagged = split_flagged(test, _salt(r))
        tag = f"run {r + 1}/{repeats}: " if repeats > 1 else ""
        clean = run_once(settings, root / f"clean-{r}", flagged, unflagged, noise=0.0,
                         label=f"{tag}correct flags", order_seed=20261201 + r)
        kind = clean["champion"]["kind"]
        _say(f"==> [{tag}offline reference] a refit of the served kind ({kind}) on the same data")
        offline = offline_reference(clean_settings(settings, root / f"clean-{r}"), flagged, unflagged, kind)
        runs.append({"kind": "clean", "split": r, "flagged": len(flagged), "unflagged": len(unflagged),
                     "run": clean, "offline": offline, **_run_figures(clean, offline)})
    for r in range((1 if repeats == 1 else max(2, repeats // 2)) if noisy_run else 0):
        flagged, unflagged = split_flagged(test, _salt(r))
        noisy = run_once(settings, root / f"noisy-{r}", flagged, unflagged, noise=noise,
                         label=f"noisy run {r + 1}: {noise:.0%} wrong flags", order_seed=20261201 + r)
        runs.append({"kind": "noisy", "split": r, "noise": noise, "flagged": len(flagged),
                     "unflagged": len(unflagged), "run": noisy, **_run_figures(noisy, None)})
    clean_runs = [x for x in runs if x["kind"] == "clean"]
    noisy_runs = [x for x in runs if x["kind"] == "noisy"]
    worst = max(clean_runs, key=lambda x: x["after_vs_offline"])
    effects = [x["seconds_to_effect"] for x in clean_runs]
    result.update({
        "flagged": worst["flagged"], "unflagged": worst["unflagged"],
        "clean": worst["run"], "offline": worst["offline"],
        "worst_after_vs_offline": worst["after_vs_offline"],
        "median_after_vs_offline": float(np.median([x["after_vs_offline"] for x in clean_runs])),
        "worst_seconds_to_effect": None if any(e is None for e in effects) else max(effects),
        "worst_after_fpr_at_verdict": max(x["after_fpr_at_verdict"] for x in clean_runs),
        "worst_after_vs_before": max(x["after_vs_before"] for x in clean_runs),
    })
    b, a, offline = worst["run"]["before"], worst["run"]["after"], worst["offline"]
    result.update({
        "before_one_minus_auc_pct": b["one_minus_auc_pct"],
        "after_one_minus_auc_pct": a["one_minus_auc_pct"],
        "offline_one_minus_auc_pct": offline["one_minus_auc_pct"],
        "before_recall_at_fpr_0_1pct": b["recall_at_fpr_0_1pct"],
        "after_recall_at_fpr_0_1pct": a["recall_at_fpr_0_1pct"],
        "offline_recall_at_fpr_0_1pct": offline["recall_at_fpr_0_1pct"],
        "seconds_to_effect": worst["run"]["seconds_to_effect"],
        "before_fpr_at_verdict": b["fpr_at_verdict"],
        "after_fpr_at_verdict": a["fpr_at_verdict"],
        "after_recall_at_verdict": a["recall_at_verdict"],
        "noisy_after_one_minus_auc_pct": None, "noisy_before_one_minus_auc_pct": None,
        "worst_noisy_after_vs_before": None, "median_noisy_after_vs_before": None,
    })
    if noisy_runs:
        worst_noisy = max(noisy_runs, key=lambda x: x["after_vs_before"])
        result.update({
            "noisy": worst_noisy["run"],
            "noisy_after_one_minus_auc_pct": worst_noisy["run"]["after"]["one_minus_auc_pct"],
            "noisy_before_one_minus_auc_pct": worst_noisy["run"]["before"]["one_minus_auc_pct"],
            "worst_noisy_after_vs_before": worst_noisy["after_vs_before"],
            "median_noisy_after_vs_before": float(np.median([x["after_vs_before"] for x in noisy_runs])),
        })
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["checks"] = checks(result)
    _say(format_result(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=float))
    return result


def _run_figures(run: dict[str, Any], offline: dict[str, Any] | None) -> dict[str, Any]:
    """One run's headline figures (the per-run row of ``runs``)."""
    b, a = run["before"], run["after"]
    out: dict[str, Any] = {
        "before_one_minus_auc_pct": b["one_minus_auc_pct"], "after_one_minus_auc_pct": a["one_minus_auc_pct"],
        "after_vs_before": _ratio(a["one_minus_auc_pct"], b["one_minus_auc_pct"]),
        "after_recall_at_fpr_0_1pct": a["recall_at_fpr_0_1pct"], "after_fpr_at_verdict": a["fpr_at_verdict"],
        "seconds_to_effect": run["seconds_to_effect"], "champion_kind": run["champion"]["kind"],
        "decisions": run["decisions"],
    }
    if offline is not None:
        out.update({"offline_one_minus_auc_pct": offline["one_minus_auc_pct"],
                    "offline_recall_at_fpr_0_1pct": offline["recall_at_fpr_0_1pct"],
                    "after_vs_offline": _ratio(a["one_minus_auc_pct"], offline["one_minus_auc_pct"])})
    return out


def clean_settings(settings: Settings, root: Path) -> Settings:
    """Settings whose ``eval_exclude_file`` is the clean run's (so the offline base equals the worker's)."""
    return settings.model_copy(update={"eval_exclude_file": root / "unflagged-ids.txt"})


def checks(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its figure, its bound and the ratio (figure / bound; <= 1 is met)."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float | None, bound: float | None) -> None:
        if value is None or bound is None or bound == 0:
            out[name] = {"value": value, "bound": bound, "ratio": None, "met": False}
            return
        out[name] = {"value": value, "bound": bound, "ratio": value / bound, "met": value <= bound + 1e-12}

    after, before, off = r["after_one_minus_auc_pct"], r["before_one_minus_auc_pct"], r["offline_one_minus_auc_pct"]
    add("after <= 1.25 x offline", after, TARGETS["after_vs_offline"] * off)
    add("after <= 0.5 x before", after, TARGETS["after_vs_before"] * before)
    gap = 100.0 * (r["offline_recall_at_fpr_0_1pct"] - r["after_recall_at_fpr_0_1pct"])
    add("recall@0.1% gap to offline (points)", gap, TARGETS["recall_gap_points"])
    add("FPR at verdict after", r["after_fpr_at_verdict"], TARGETS["after_fpr_at_verdict"])
    add("seconds to effect", r["seconds_to_effect"], TARGETS["seconds_to_effect"])
    if r.get("noisy_after_one_minus_auc_pct") is not None:
        add("noisy after <= noisy run's before", r["noisy_after_one_minus_auc_pct"], r["noisy_before_one_minus_auc_pct"])
    if r.get("repeats", 1) > 1:
        add("worst after / offline", r["worst_after_vs_offline"], TARGETS["after_vs_offline"])
        add("median after / offline", r["median_after_vs_offline"], TARGETS["median_after_vs_offline"])
        add("worst seconds to effect", r["worst_seconds_to_effect"], TARGETS["seconds_to_effect"])
        add("worst FPR at verdict after", r["worst_after_fpr_at_verdict"], TARGETS["after_fpr_at_verdict"])
        if r.get("worst_noisy_after_vs_before") is not None:
            add("worst noisy after / before", r["worst_noisy_after_vs_before"], 1.0)
            add("median noisy after / before", r["median_noisy_after_vs_before"],
                TARGETS["median_noisy_after_vs_before"])
    return out


def format_result(r: dict[str, Any]) -> str:
    lines = [
        "",
        f"flywheel bench: {r['flagged']} flagged / {r['unflagged']} unflagged (P1 test period), {r['reporters']} reporters",
        f"{'':28}{'(1-AUC)%':>10}{'R@0.1%':>9}{'R@1%':>8}{'FPR@verdict':>13}{'recall@verdict':>16}",
    ]
    rows: list[tuple[str, dict[str, Any]]] = []
    for x in r["runs"]:
        tag = f"{x['kind']} {x['split'] + 1}: " if r.get("repeats", 1) > 1 else ("noisy: " if x["kind"] == "noisy" else "")
        rows += [(f"{tag}before (HTTP)", x["run"]["before"]), (f"{tag}after (HTTP)", x["run"]["after"])]
        if x["kind"] == "clean":
            rows.append((f"{tag}offline ({x['offline']['kind']})", x["offline"]))
    for name, f in rows:
        lines.append(f"{name:28}{f['one_minus_auc_pct']:>10.3f}{f['recall_at_fpr_0_1pct']:>9.1%}"
                     f"{f['recall_at_fpr_1pct']:>8.1%}{f['fpr_at_verdict']:>13.2%}{f['recall_at_verdict']:>16.1%}")
    for x in r["runs"]:
        lines.append(f"{x['kind']} run {x['split'] + 1}: after/before {x['after_vs_before']:.2f}"
                     + (f", after/offline {x['after_vs_offline']:.2f}" if "after_vs_offline" in x else "")
                     + f", seconds to effect {x['seconds_to_effect']}, champion {x['champion_kind']}, "
                       f"decisions {x['decisions']}")
    lines.append(f"wall: {r['wall_s']} s")
    lines.append("targets:")
    for name, c in r["checks"].items():
        v = "n/a" if c["value"] is None else f"{c['value']:.4g}"
        b = "n/a" if c["bound"] is None else f"{c['bound']:.4g}"
        ratio = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}"
        lines.append(f"  {name:40} {v:>10} vs {b:>10}  ratio {ratio:>5}  {'met' if c['met'] else 'MISSED'}")
    return "\n".join(lines)
