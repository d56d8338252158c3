"""``flywheel bench models``: the in-process cost of a verdict, stage by stage, on one core.

Both learned models are first trained on the earlier collection (the neural one on 2 cores, timed as
``train_neural_s``) and exported to ONNX; then the process pins itself to one CPU with one thread for torch and
onnxruntime and runs parse -> rules -> features -> linear ONNX -> neural ONNX over the whole corpus, one message
at a time and then in batches of 64. Stage shares show where the time goes; ratios to the targets
(>= 2,500 msgs/s single, <= 30 s neural training) and to the peer filters measured on the same corpus
(SpamAssassin's spamd 12.7 msgs/s, rspamd 379 msgs/s, both on 2 workers) are printed and stored.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from models.corpus import load_corpus, split_p1
from models.evaluate import fit_linear, prepare
from models.features import FeatureConfig, featurize
from models.message import parse
from models.rules import RuleEngine

log = structlog.get_logger(__name__)

TARGET_SINGLE_MSGS_PER_S = 2500.0
TARGET_TRAIN_NEURAL_S = 30.0
PEERS_MSGS_PER_S = {"spamassassin_spamd": 12.7, "rspamd": 379.0}
STAGES = ("parse", "rules", "features", "linear", "neural")
BATCH = 64


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pin_one_core() -> int:
    """Pin this process to the first CPU it may run on; returns that CPU."""
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


def run_models_bench(
    *,
    downloads_dir: Path,
    corpus_dir: Path | None,
    json_path: Path | None,
    progress: Callable[[str], None] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print the table, write ``json_path`` and return the figures."""
    say = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    import torch

    from models.neural import NeuralConfig, NeuralModel
    from models.runtime import OnnxModel

    corpus = load_corpus(Path(downloads_dir), corpus_dir)
    msgs = corpus[:limit] if limit else corpus
    engine = RuleEngine.default()
    cfg = FeatureConfig()
    train, _ = split_p1(corpus)
    say(f"bench: preparing the earlier collection ({len(train)} messages)")
    prep = prepare(train, engine)
    x = prep.batch(cfg)
    say("bench: training the neural model on 2 cores")
    torch.set_num_threads(2)
    t = time.perf_counter()
    neural = NeuralModel(cfg, NeuralConfig(threads=2), seed=0).fit(x, prep.labels)
    train_neural_s = time.perf_counter() - t
    t = time.perf_counter()
    linear = fit_linear(x, prep.labels, cfg)
    train_linear_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="flywheel-bench-") as tmp:
        lin = OnnxModel(linear.export_onnx(Path(tmp) / "linear.onnx"), intra_op_threads=1)
        nn = OnnxModel(neural.export_onnx(Path(tmp) / "neural.onnx"), intra_op_threads=1)
        cpu = _pin_one_core()
        torch.set_num_threads(1)
        raws = [m.raw for m in msgs]
        say(f"bench: pinned to CPU {cpu}; {len(raws)} messages one at a time")
        for raw in raws[:200]:  # warm caches and the ONNX sessions
            p = parse(raw)
            r = engine.evaluate(p)
            b = featurize([p], [r], cfg)
            lin.predict_proba(b)
            nn.predict_proba(b)
        single = np.zeros(len(STAGES))
        pc = time.perf_counter
        t_all = pc()
        for raw in raws:
            t0 = pc()
            p = parse(raw)
            t1 = pc()
            r = engine.evaluate(p)
            t2 = pc()
            b = featurize([p], [r], cfg)
            t3 = pc()
            lin.predict_proba(b)
            t4 = pc()
            nn.predict_proba(b)
            t5 = pc()
            single += (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        single_wall = pc() - t_all
        say(f"bench: batches of {BATCH}")
        batched = np.zeros(len(STAGES))
        t_all = pc()
        for lo in range(0, len(raws), BATCH):
            t0 = pc()
            ps = [parse(raw) for raw in raws[lo : lo + BATCH]]
            t1 = pc()
            rs = [engine.evaluate(p) for p in ps]
            t2 = pc()
            b = featurize(ps, rs, cfg)
            t3 = pc()
            lin.predict_proba(b)
            t4 = pc()
            nn.predict_proba(b)
            t5 = pc()
            batched += (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        batch_wall = pc() - t_all
        providers = {"linear": lin.provider, "neural": nn.provider}

    n = len(raws)
    single_rate = n / single_wall
    batch_rate = n / batch_wall
    out: dict[str, Any] = {
        "messages": n,
        "cpu": cpu,
        "single_msgs_per_s": single_rate,
        "batch64_msgs_per_s": batch_rate,
        "stage_share": {s: float(v / single.sum()) for s, v in zip(STAGES, single, strict=True)},
        "stage_us_per_msg": {s: float(1e6 * v / n) for s, v in zip(STAGES, single, strict=True)},
        "batch64_stage_share": {s: float(v / batched.sum()) for s, v in zip(STAGES, batched, strict=True)},
        "peak_rss_mb": _rss_mb(),
        "train_neural_s": train_neural_s,
        "train_neural_rows": int(x.rows),
        "train_linear_s": train_linear_s,
        "providers": providers,
        "rules_active": int(engine.active_count),
        "targets": {"single_msgs_per_s": TARGET_SINGLE_MSGS_PER_S, "train_neural_s": TARGET_TRAIN_NEURAL_S},
        "ratio_to_target": {
            "single_msgs_per_s": single_rate / TARGET_SINGLE_MSGS_PER_S,
            "train_neural_s": TARGET_TRAIN_NEURAL_S / train_neural_s if train_neural_s > 0 else None,
        },
        "ratio_to_peers": {k: single_rate / v for k, v in PEERS_MSGS_PER_S.items()},
        "peers_msgs_per_s": PEERS_MSGS_PER_S,
    }
    print(format_bench(out), flush=True)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
        say(f"bench: JSON written to {json_path}")
    return out


def format_bench(r: dict[str, Any]) -> str:
    """The terminal report (ratios >= 1 mean the target is met / the peer is beaten)."""
    lines = [
        f"models bench: {r['messages']} messages, one core (CPU {r['cpu']}), providers {r['providers']}",
        f"  single message   {r['single_msgs_per_s']:9.0f} msgs/s   target {TARGET_SINGLE_MSGS_PER_S:.0f}  "
        f"ratio {r['ratio_to_target']['single_msgs_per_s']:.2f}",
        f"  batches of {BATCH}    {r['batch64_msgs_per_s']:9.0f} msgs/s   ({r['batch64_msgs_per_s'] / r['single_msgs_per_s']:.2f}x single)",
        "  stage share (single): " + ", ".join(
            f"{s} {100 * r['stage_share'][s]:.1f}% ({r['stage_us_per_msg'][s]:.0f} us)" for s in STAGES),
        "  stage share (batch64): " + ", ".join(f"{s} {100 * r['batch64_stage_share'][s]:.1f}%" for s in STAGES),
        f"  peak RSS {r['peak_rss_mb']:.0f} MB",
        f"  train neural (earlier collection, {r['train_neural_rows']} msgs, 2 cores) {r['train_neural_s']:.1f} s   "
        f"target <= {TARGET_TRAIN_NEURAL_S:.0f} s  ratio {r['ratio_to_target']['train_neural_s']:.2f}",
        "  vs peers (same corpus): " + ", ".join(
            f"{k} {v:.1f} msgs/s -> {r['ratio_to_peers'][k]:.1f}x" for k, v in PEERS_MSGS_PER_S.items()),
    ]
    return "\n".join(lines)


__all__ = ["format_bench", "run_models_bench"]
