"""The main job: the corpus replayed through the running stack as its users and its operator would, so that the
two improvement curves are drawn by the system itself (``flywheel replay``; ``make run`` runs it by default).

* The stack runs in its own state dir (``<state_dir>/replay``), on the settings' ports, with Prometheus.
* **The model side starts from nothing**: the first champion is an empty model (no weights: until the first
  champion trained on flags, the rules decide alone), and the worker has no base corpus. Every label it learns
  comes from the replayed flags.
* **The rules side starts from nothing too**: every rule is disabled; the operator enables them one at a time, in
  the order they were written (``added``), spread evenly over the replay, through ``POST /rules/{name}/enable``.
* Messages arrive in Date order (P2's stream) and each is classified through ``POST /classify``; a share of the
  users then flag it through ``POST /feedback`` (true label, with a configurable share of wrong ones).
* The corpus's held-out part is never replayed: it is the fixed quality set on which the worker measures each
  champion and each rule set (the curves, in ``curves.jsonl`` of the registry and in Prometheus).

At the end: both curves with their fits (a line for the rules against the number of rules, a logarithm for the
model against flagged messages) and where the model's curve passes the rules', a report (HTML with a PNG), and,
when given a JSON path, every dashboard and rule query run against Prometheus and a screenshot of the operator page.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from models.corpus import CorpusMessage
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = ["ReplayPlan", "empty_champion", "plan_replay", "replay_settings", "run_replay"]

REPORTERS = 8
ADMIN_KEY = "k-replay-operator"


@dataclass(slots=True)
class ReplayPlan:
    """What happens, in order: ``steps`` of (message, flag label or None, reporter key), rules enabled before
    the step of the same index."""

    steps: list[tuple[CorpusMessage, str | None, str]]
    rules_at: dict[int, list[str]] = field(default_factory=dict)
    held_out: int = 0

    @property
    def flags(self) -> int:
        return sum(label is not None for _, label, _ in self.steps)


def replay_keys() -> dict[str, str]:
    keys = {f"k-replay-user-{i}": f"user{i}" for i in range(REPORTERS)}
    keys[ADMIN_KEY] = "admin"
    return keys


def plan_replay(corpus: Sequence[CorpusMessage], rule_order: Sequence[str], *, quick: bool, flag_share: float,
                noise: float, seed: int = 0) -> ReplayPlan:
    """The stream (the quality set left out), who flags what, and when each rule is enabled."""
    from models.consensus import is_holdout, message_id_for
    from models.corpus import stream_p2

    stream = stream_p2(corpus)
    held = [m for m in stream if is_holdout(message_id_for(m.raw))]
    stream = [m for m in stream if not is_holdout(message_id_for(m.raw))]
    if quick:
        stream = stream[::7]
    rng = random.Random(seed)
    users = [k for k in replay_keys() if k != ADMIN_KEY]
    steps: list[tuple[CorpusMessage, str | None, str]] = []
    for i, m in enumerate(stream):
        label: str | None = None
        if rng.random() < flag_share:
            truth = "spam" if m.is_spam else "ham"
            label = ("ham" if m.is_spam else "spam") if rng.random() < noise else truth
        steps.append((m, label, users[i % len(users)]))
    rules_at: dict[int, list[str]] = {}
    for j, name in enumerate(rule_order):  # evenly over the replay, the first one at the start
        rules_at.setdefault(int(j * len(steps) / max(1, len(rule_order))), []).append(name)
    return ReplayPlan(steps, rules_at, len(held))


def replay_settings(settings: Settings, *, quick: bool) -> Settings:
    """The replay's own state (the user's registry is never touched), keys for its users and its operator besides
    the configured ones (the development keys on loopback by default, so the README's examples work on the stack
    ``make run`` leaves serving; the API still refuses them on any other address)."""
    root = settings.state_dir / "replay"
    return settings.model_copy(update={
        "state_dir": root, "registry_dir": None, "rules_path": None, "downloads_dir": settings.downloads,
        "log_dir": None if settings.log_dir is None else settings.log_dir / "replay",
        "worker_base_corpus": False, "api_keys": {**settings.api_keys, **replay_keys()}, "api_keys_file": None,
        "admin_identities": sorted({*settings.admin_identities, "admin"}),
        "neural_retrain": not quick, "linear_refit_s": min(settings.linear_refit_s, 1.0),
        "model_poll_s": min(settings.model_poll_s, 0.5),
    })


def empty_champion(settings: Settings) -> str:
    """A fresh registry whose champion knows nothing (every weight zero, so every message scores 0.5) and whose
    blend lets the rules decide alone until a model learns something; a fresh rules file with every rule off."""
    import dataclasses
    import shutil
    import tempfile

    from models.classifier import Calibration
    from models.features import FeatureConfig, featurize
    from models.linear import LinearModel
    from models.message import parse
    from models.registry import Registry, SelfCheckVector
    from models.rules import RuleEngine

    shutil.rmtree(settings.state_dir, ignore_errors=True)
    settings.state_dir.mkdir(parents=True)
    engine = RuleEngine.default()
    off = RuleEngine([dataclasses.replace(r, enabled=False) for r in engine.rules], threshold=engine.threshold)
    off.save(settings.rules_file)
    model = LinearModel(FeatureConfig())
    raw = b"Subject: self-check\r\n\r\nnothing learned yet\r\n"
    rr = off.evaluate(parse(raw))
    p = float(model.predict_proba(featurize([parse(raw)], [rr], model.features))[0])
    cal = Calibration(w_model=0.0, w_rules=1.0, bias=-float(engine.threshold), threshold=0.5,
                      model_threshold_logit=1.0, rules_a=1.0, rules_b=-float(engine.threshold))
    reg = Registry(settings.registry)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.export_onnx(Path(tmp) / "model.onnx")
        version = reg.save(kind="linear", model_path=path, features=model.features,
                           self_check=[SelfCheckVector(raw, rr, p)], calibration=cal.to_dict(),
                           lineage={"source": "empty: nothing learned yet (the replay starts from nothing)",
                                    "counts": {"flags": {"spam": 0, "ham": 0}, "corpus": {"spam": 0, "ham": 0}},
                                    "reference_held_out": True},
                           hyperparameters={})
    reg.promote(version, "the replay starts from nothing")
    return version


# ============================================================================================ the run
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _wait(condition: Callable[[], Any], timeout_s: float, what: str, stop: threading.Event) -> None:
    """Wait for ``condition`` (``TimeoutError`` naming ``what``); a stop (Ctrl-C, a part of the stack that died)
    ends the wait at once as an interruption."""
    from services.local.daemon import wait_for

    if not wait_for(lambda: bool(condition()), timeout_s, interval_s=0.5, abort=stop.is_set):
        if stop.is_set():
            raise KeyboardInterrupt
        raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")


def run_replay(settings: Settings, stop: threading.Event, *, quick: bool = False, flag_share: float = 0.5,
               noise: float = 0.02, json_path: Path | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """Replay against the stack ``settings`` describe (already running); returns the result (curves, fits...)."""
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.corpus import load_corpus
    from models.registry import Registry
    from models.rules import RuleEngine

    corpus = load_corpus(settings.downloads, settings.corpus_dir)
    plan = plan_replay(corpus, RuleEngine.default().order_added(), quick=quick, flag_share=flag_share, noise=noise)
    http = httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=60.0)
    reg = Registry(settings.registry)
    admin = {"X-API-Key": ADMIN_KEY}
    _say(f"==> replay: {len(plan.steps)} messages in Date order, {plan.flags} flagged by {REPORTERS} users "
         f"({noise:.0%} of the flags wrong), {sum(len(v) for v in plan.rules_at.values())} rules enabled along the way; "
         f"the quality set is the corpus's held-out part ({plan.held_out} messages, never replayed)")
    # The curves start where the worker first measured (no rules, the empty champion): wait for that point, or
    # rules enabled before the worker is up would be folded into its first one.
    _wait(lambda: {p["side"] for p in reg.curve_points()} >= {"rules", "model"}, 300,
          "the worker's first point of both curves", stop)
    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), transient=False) as bar:
        task = bar.add_task("replay", total=len(plan.steps), status="")
        for i, (m, label, key) in enumerate(plan.steps):
            if stop.is_set():
                raise KeyboardInterrupt
            for name in plan.rules_at.get(i, ()):
                r = http.post(f"/rules/{name}/enable", headers=admin)
                if r.status_code != 200:
                    log.warning("rule not enabled", rule=name, status=r.status_code, detail=r.text[:200])
            answer = http.post("/classify", content=m.raw, headers={"content-type": "message/rfc822"})
            answer.raise_for_status()
            if label is not None:
                fb = http.post("/feedback", json={"label": label, "message_id": answer.json()["message_id"]},
                               headers={"X-API-Key": key})
                if fb.status_code == 429:  # the replay's users are faster than people: honour the limit
                    time.sleep(float(fb.headers.get("retry-after", "1")))
                    fb = http.post("/feedback", json={"label": label, "message_id": answer.json()["message_id"]},
                                   headers={"X-API-Key": key})
                fb.raise_for_status()
            if i % 25 == 0:
                champ = reg.champion() or ""
                bar.update(task, status=f"champion {champ[-13:]}  promotions {len(reg.history()) - 1}")
            bar.advance(task)
    _say("==> waiting for the worker to learn the last flags")
    from services.bench.harness import LocalStack

    probe = LocalStack.attach(settings)
    _wait(probe.settled, 900, "the worker to settle", stop)
    replay_s = time.monotonic() - started
    result = summarize(reg, plan, replay_s=replay_s)
    out = out_dir or settings.state_dir
    result["report"] = str(write_report(result, out))
    _say(format_summary(result))
    if json_path is not None:
        from services.bench.browser import screenshot_operator_page
        from services.bench.observability import run_monitoring_queries

        queries = run_monitoring_queries(settings)
        result["queries_total"], result["queries_empty"] = queries["total"], queries["empty"]
        result["queries_empty_list"] = queries["empty_list"]
        result["screenshot"] = str(screenshot_operator_page(settings, out / "operator.png"))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=float))
        _say(f"==> JSON written to {json_path}")
    http.close()
    return result


# ============================================================================================ curves
def curves(reg: Any) -> tuple[list[list[float]], list[list[float]], list[dict[str, Any]]]:
    """(rules curve, model curve, timeline) from the registry's curve points: [x, recall@0.1%, recall@1%]."""
    points = reg.curve_points()
    rules = [[p["x"], p["recall_at_fpr_0_1pct"], p["recall_at_fpr_1pct"]] for p in points if p["side"] == "rules"]
    model = [[p["x"], p["recall_at_fpr_0_1pct"], p["recall_at_fpr_1pct"]] for p in points if p["side"] == "model"]
    return rules, model, points


def crossing(points: Sequence[dict[str, Any]], column: str = "recall_at_fpr_1pct") -> int | None:
    """Flags after which the champion's recall passes the rules' recall of the same moment (both measured on
    the quality set), or None when it never does."""
    rules_now: float | None = None
    for p in points:
        if p["side"] == "rules":
            rules_now = p[column]
        elif p["side"] == "model" and rules_now is not None and p["x"] > 0 and p[column] > rules_now:
            return int(p["x"])
    return None


def summarize(reg: Any, plan: ReplayPlan, *, replay_s: float) -> dict[str, Any]:
    from models.evaluate import fit_line, fit_log

    rules_curve, model_curve, points = curves(reg)
    out: dict[str, Any] = {"messages": len(plan.steps), "flags": plan.flags, "quality_set": plan.held_out,
                           "replay_s": round(replay_s, 1), "rules_curve": rules_curve, "model_curve": model_curve}
    if len(rules_curve) >= 2:
        x, y = zip(*[(r[0], r[2]) for r in rules_curve], strict=True)
        out["rules_fit"] = fit_line(x, y).to_dict()
    if len([m for m in model_curve if m[0] > 0]) >= 2:
        x, y = zip(*[(m[0], m[2]) for m in model_curve if m[0] > 0], strict=True)
        out["model_fit"] = fit_log(x, y).to_dict()
    out["crossing_flags"] = crossing(points)
    out["champions"] = len([h for h in reg.history() if h.get("action") == "promote"])
    return out


def format_summary(r: dict[str, Any]) -> str:
    lines = ["", f"replay: {r['messages']} messages, {r['flags']} flags, {r['replay_s']} s, "
                 f"{r['champions']} champions; quality set {r['quality_set']} messages", "",
             "rules: recall on the quality set against the number of active rules"]
    for x, r01, r1 in r["rules_curve"][:: max(1, len(r["rules_curve"]) // 12)]:
        lines.append(f"  {int(x):5} rules   R@0.1% {r01:6.1%}   R@1% {r1:6.1%}")
    if "rules_fit" in r:
        f = r["rules_fit"]
        lines.append(f"  fit (line): {f['formula']}  R^2={f['r2']:.3f}")
    lines.append("model: recall on the quality set against the flagged messages behind the champion")
    model = r["model_curve"]
    step = max(1, len(model) // 12)
    for x, r01, r1 in [*model[:-1:step], *model[-1:]]:
        lines.append(f"  {int(x):5} flags   R@0.1% {r01:6.1%}   R@1% {r1:6.1%}")
    if "model_fit" in r:
        f = r["model_fit"]
        lines.append(f"  fit (log):  {f['formula']}  R^2={f['r2']:.3f}")
    lines.append(f"the model passes the rules after {r['crossing_flags']} flags" if r["crossing_flags"] is not None
                 else "the model does not pass the rules in this replay")
    lines.append(f"report: {r.get('report')}")
    return "\n".join(lines)


def write_report(r: dict[str, Any], out_dir: Path) -> Path:
    """A PNG of both curves with their fits and the crossing, inside a small HTML page with the table."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rules = np.array(r["rules_curve"]) if r["rules_curve"] else np.zeros((0, 3))
    model = np.array(r["model_curve"]) if r["model_curve"] else np.zeros((0, 3))
    if rules.size:
        ax1.plot(rules[:, 0], rules[:, 2], "o-", ms=3, label="rules: recall at FPR <= 1%")
        ax1.plot(rules[:, 0], rules[:, 1], ".:", ms=3, label="rules: recall at FPR <= 0.1%")
        if "rules_fit" in r:
            xs = np.linspace(rules[:, 0].min(), rules[:, 0].max(), 50)
            ax1.plot(xs, r["rules_fit"]["a"] + r["rules_fit"]["b"] * xs, "--", label=f"line fit, R^2={r['rules_fit']['r2']:.2f}")
    ax1.set_xlabel("active rules (in the order they were written)")
    ax1.set_ylabel("spam recall on the quality set")
    ax1.set_title("Rules: human effort")
    ax1.legend(fontsize=8)
    pos = model[model[:, 0] > 0] if model.size else model
    if pos.size:
        ax2.plot(pos[:, 0], pos[:, 2], "o-", ms=3, label="model: recall at FPR <= 1%")
        ax2.plot(pos[:, 0], pos[:, 1], ".:", ms=3, label="model: recall at FPR <= 0.1%")
        if "model_fit" in r:
            xs = np.linspace(pos[:, 0].min(), pos[:, 0].max(), 100)
            ax2.plot(xs, r["model_fit"]["a"] + r["model_fit"]["b"] * np.log(xs), "--",
                     label=f"log fit, R^2={r['model_fit']['r2']:.2f}")
    if r.get("crossing_flags"):
        ax2.axvline(r["crossing_flags"], color="grey", lw=1)
        ax2.annotate(f"passes the rules\nafter {r['crossing_flags']} flags", (r["crossing_flags"], 0.05), fontsize=8)
    ax2.set_xlabel("flagged messages behind the champion")
    ax2.set_title("Model: data from users' flags")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out_dir / "replay.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    html = out_dir / "replay.html"
    rows = "".join(f"<tr><td>{int(x)}</td><td>{a:.1%}</td><td>{b:.1%}</td></tr>" for x, a, b in r["rules_curve"])
    mrows = "".join(f"<tr><td>{int(x)}</td><td>{a:.1%}</td><td>{b:.1%}</td></tr>" for x, a, b in r["model_curve"])
    fits = " ".join(f"<p>{k}: {v['formula']} (R&sup2; {v['r2']:.3f})</p>" for k, v in r.items() if k.endswith("_fit"))
    html.write_text(
        "<!doctype html><meta charset='utf-8'><title>Flywheel replay</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 2em 1em 0;"
        "display:inline-table}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style>"
        f"<h1>Flywheel: the two improvement curves</h1><p>{r['messages']} messages replayed in Date order, "
        f"{r['flags']} flagged; recall measured on the corpus's held-out part ({r['quality_set']} messages).</p>"
        f"<img src='{png.name}' width='100%'>{fits}<p>crossing: "
        f"{'after ' + str(r['crossing_flags']) + ' flags' if r.get('crossing_flags') else 'none in this replay'}</p>"
        f"<table><tr><th>rules</th><th>R@0.1%</th><th>R@1%</th></tr>{rows}</table>"
        f"<table><tr><th>flags</th><th>R@0.1%</th><th>R@1%</th></tr>{mrows}</table>"
    )
    return html


def replay_then(settings: Settings, *, quick: bool, json_path: Path | None,
                keep_running: bool) -> Callable[[threading.Event], bool]:
    """The ``after_start`` hook of :func:`services.local.stack.run_stack`: replay, then keep the stack up or stop it."""

    def hook(stop: threading.Event) -> bool:
        run_replay(settings, stop, quick=quick, json_path=json_path)
        return keep_running

    return hook
