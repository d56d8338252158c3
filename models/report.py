"""The report of ``flywheel eval``: the terminal table (:func:`format_table`) and the PNG figures (:func:`plots`:
ROC curves, and for P2 the learning curves by window) of a protocol's result (:func:`models.evaluate.run_eval`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.metrics import WINDOW, roc_points

__all__ = ["SIDES", "format_table", "plots"]

SIDES = ("rules", "linear", "neural", "served")
"""The scored sides of every protocol, in report order."""


def _pct(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100.0 * float(x):.{digits}f}%"


def _metric_rows(results: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    head = f"{'':28} {'AUC':>7} {'1-AUC %':>8} {'FPR':>7} {'FNR':>7} {'R@0.1%':>7} {'R@1%':>7} {'spam/ham':>10}"
    lines = [head, "-" * len(head)]
    for name in names:
        m = results.get(name)
        if not m:
            continue
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.4f}"
        oma = "n/a" if m.get("one_minus_auc_pct") is None else f"{m['one_minus_auc_pct']:.3f}"
        lines.append(
            f"{name[:28]:28} {auc:>7} {oma:>8} {_pct(m.get('fpr')):>7} {_pct(m.get('fnr')):>7} "
            f"{_pct(m.get('recall_at_fpr_0_1pct'), 1):>7} {_pct(m.get('recall_at_fpr_1pct'), 1):>7} "
            f"{str(m.get('n_spam')) + '/' + str(m.get('n_ham')):>10}"
        )
    return lines


def format_table(result: Mapping[str, Any]) -> str:
    """The terminal report of ``run_eval``'s result."""
    proto = result.get("protocol", "?")
    lines = [f"Protocol {proto}  (FPR/FNR at the operating threshold; R@x = best spam recall at FPR <= x)", ""]
    lines += _metric_rows(result["results"], [*SIDES, *(k for k in result["results"] if k not in SIDES)])
    lines.append("targets: P1 served (the shipped seed) 1-AUC <= 0.35%, R@0.1% >= 75%, FPR of its verdicts <= 0.5%; "
                 "P2 served 1-AUC <= 0.12%")
    spread = result.get("neural_seeds", {}).get("spread")
    if spread:
        n = len(result["neural_seeds"]["per_seed"])
        parts = [f"{k} {v['mean']:.4f} +- {v['std']:.4f} (min {v['min']:.4f}, max {v['max']:.4f})"
                 for k, v in spread.items() if k in ("one_minus_auc_pct", "recall_at_fpr_0_1pct", "recall_at_fpr_1pct")]
        lines += ["", f"neural over {n} seeds: " + "; ".join(parts)]
    design = result.get("served_design")
    if design:
        c = design["calibration"]
        lines += ["", "served = sigmoid(w_m * logit_model + w_r * rule_score + b), fitted on the training hold-out "
                  f"({design['fitted_on']['n_spam']} spam / {design['fitted_on']['n_ham']} ham):",
                  f"  w_m={c['w_model']:.3f} w_r={c['w_rules']:.3f} b={c['bias']:.3f} threshold={c['threshold']:.4f}",
                  "  variants on the test period:"]
        lines += ["  " + ln for ln in _metric_rows(design["variants_on_test"], list(design["variants_on_test"]))]
    abl = result.get("ablation")
    if abl:
        lines += ["", "artefact ablation (1-AUC % / R@0.1% / R@1%):"]
        for kind in ("linear", "neural"):
            a, b = abl[kind]["without_artefacts"], abl[kind]["with_artefacts"]
            lines.append(f"  {kind:7} without artefacts {a['one_minus_auc_pct']:.3f} / {_pct(a['recall_at_fpr_0_1pct'], 1)} / "
                         f"{_pct(a['recall_at_fpr_1pct'], 1)}   with artefacts {b['one_minus_auc_pct']:.3f} / "
                         f"{_pct(b['recall_at_fpr_0_1pct'], 1)} / {_pct(b['recall_at_fpr_1pct'], 1)}")
    sa = result.get("spamassassin_import")
    if sa:
        lines += ["", f"SpamAssassin rule import: {sa['imported']} imported, {sa['skipped']} skipped; rules alone on P1:"]
        lines += ["  " + ln for ln in _metric_rows({"SpamAssassin import": sa["metrics"], "Flywheel rules": sa["own_rules_metrics"]},
                                                   ["SpamAssassin import", "Flywheel rules"])]
    wins = result.get("windows")
    if wins:
        lines += ["", "per window of 500: error rate / window AUC / cumulative AUC"]
        lines.append(f"{'window':>14} " + " ".join(f"{s:>24}" for s in SIDES))
        for i in range(len(wins["rules"])):
            w0 = wins["rules"][i]
            cells = []
            for side in SIDES:
                w = wins[side][i]
                wa = "  n/a " if w["auc"] is None else f"{w['auc']:.4f}"
                ca = "  n/a " if w["cumulative_auc"] is None else f"{w['cumulative_auc']:.4f}"
                cells.append(f"{100 * w['error_rate']:5.1f}% {wa} {ca}".rjust(24))
            lines.append(f"{w0['start']:>5}-{w0['end']:<5}{w0['n_spam']:>3}s " + " ".join(cells))
        learn = result.get("learning", {})
        for k in ("linear", "neural", "served"):
            if k in learn:
                lines.append(f"  {k}: {learn[k]}")
    cur = result.get("curves")
    if cur:
        lines += ["", f"curves ({cur['metric']}):"]
        rf = cur["rules"]["fit"]
        lines.append(f"  rules vs number of rules: {rf['formula']}  R^2={rf['r2']:.3f}  "
                     + ", ".join(f"{p['n_rules']}:{100 * p['recall']:.1f}%" for p in cur["rules"]["points"][:: max(1, len(cur['rules']['points']) // 8)]))
        for kind, d in cur["models"].items():
            f = d["fit"]
            by_n: dict[int, list[float]] = {}
            for p in d["points"]:
                by_n.setdefault(p["n"], []).append(p["recall"])
            lines.append(f"  {kind} vs training messages: {f['formula']}  R^2={f['r2']:.3f}  "
                         + ", ".join(f"{n}:{100 * float(np.mean(v)):.1f}%" for n, v in sorted(by_n.items())))
    if result.get("figures"):
        lines += ["", "figures: " + ", ".join(result["figures"])]
    return "\n".join(lines)


def plots(result: Mapping[str, Any], scores: Mapping[str, np.ndarray], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    y = np.asarray(scores["labels"])
    proto = result["protocol"]
    fig, axes = plt.subplots(1, 2 if proto == "P2" else 1, figsize=(13 if proto == "P2" else 7, 5), squeeze=False)
    ax = axes[0][0]
    for side in SIDES:
        fpr, tpr, _ = roc_points(scores[side], y)
        m = result["results"][side]
        ax.step(np.maximum(fpr, 1e-4), tpr, where="post",
                label=f"{side} (1-AUC {m['one_minus_auc_pct']:.3f}%)" if m.get("one_minus_auc_pct") is not None else side)
    ax.axvline(0.001, color="grey", ls=":", lw=1)
    ax.axvline(0.01, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("false-positive rate (ham called spam)")
    ax.set_ylabel("spam recall")
    ax.set_title(f"{proto}: ROC (log FPR)")
    ax.legend(loc="lower right", fontsize=8)
    if proto == "P2":
        ax2 = axes[0][1]
        for side in SIDES:
            w = result["windows"][side]
            ax2.plot([x["window"] for x in w], [100 * x["error_rate"] for x in w], marker="o", label=side)
        ax2.set_xlabel(f"window of {WINDOW} messages (Date order)")
        ax2.set_ylabel("error rate in window (%)")
        ax2.set_title("P2: online learning curve")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{proto.lower()}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))
    cur = result.get("curves")
    if cur:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
        pts = cur["rules"]["points"]
        xs = np.array([p["n_rules"] for p in pts])
        a1.plot(xs, [100 * p["recall"] for p in pts], "o", label="rules")
        f = cur["rules"]["fit"]
        a1.plot(xs, 100 * (f["a"] + f["b"] * xs), "-", label=f"line fit, R^2={f['r2']:.3f}")
        a1.set_xlabel("number of rules (in the order written)")
        a1.set_ylabel("spam recall at FPR <= 1% (%)")
        a1.set_title("rules: spam caught vs rule count (P1 test)")
        a1.legend(fontsize=8)
        for kind, d in cur["models"].items():
            ns = np.array([p["n"] for p in d["points"]])
            line = a2.plot(ns, [100 * p["recall"] for p in d["points"]], "o", alpha=0.6, label=kind)[0]
            grid = np.geomspace(ns.min(), ns.max(), 100)
            f = d["fit"]
            a2.plot(grid, 100 * (f["a"] + f["b"] * np.log(grid)), "-", color=line.get_color(),
                    label=f"{kind} log fit, R^2={f['r2']:.3f}")
        a2.set_xscale("log")
        a2.set_xlabel("training messages")
        a2.set_ylabel("spam recall at FPR <= 1% (%)")
        a2.set_title("learned models: spam caught vs training data (P1 test)")
        a2.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files
