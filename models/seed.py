"""The seed model: trained on the earlier collection so a fresh install classifies well from the first message.

Other filters refuse to classify before a few hundred labels are learned; Flywheel ships a model trained on the
P1 training period (easy-ham-1, spam-1, the first half of hard-ham-1). The served blend of model and rules is
fitted on the last 20% of each training group (a hold-out inside the training period), then the model is refit
on the whole period with the same hyperparameters, exported to ONNX, stored with its lineage and self-check
vectors, and promoted.

The default kind is the linear model: it trains in under a second (the whole seed step is dominated by parsing
the 3,125 messages), and it is the model the retraining worker then updates message by message with
``partial_fit``, so the first champion and its incremental successors are the same family. ``kind="neural"``
trains the PyTorch model instead (two trainings: hold-out and full, ~20 s each on 2 cores).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from models.classifier import fit_calibration
from models.consensus import is_holdout, message_id_for
from models.corpus import CorpusMessage, split_p1
from models.evaluate import (
    FPR_BUDGET,
    fit_linear,
    fit_neural,
    holdout_split,
    logits,
    metrics,
    prepare,
)
from models.features import FeatureConfig
from models.registry import Registry, SelfCheckVector, training_set_hash
from models.rules import RuleEngine

log = structlog.get_logger(__name__)

SELF_CHECK_PER_CLASS = 4


def pick_self_check(labels: np.ndarray, per_class: int = SELF_CHECK_PER_CLASS) -> list[int]:
    """Evenly spread positions, ``per_class`` spam and ``per_class`` ham (deterministic)."""
    out: list[int] = []
    for cls in (1, 0):
        pos = np.flatnonzero(labels == cls)
        if pos.size:
            out.extend(int(p) for p in pos[np.linspace(0, pos.size - 1, min(per_class, pos.size)).round().astype(int)])
    return sorted(set(out))


def train_seed(
    corpus_msgs: Sequence[CorpusMessage],
    registry_root: Path,
    kind: str = "linear",
    *,
    seed: int = 0,
    promote: bool = True,
    engine: RuleEngine | None = None,
    features: FeatureConfig | None = None,
) -> str:
    """Train, store and (by default) promote the seed model; returns its version id."""
    if kind not in ("neural", "linear"):
        raise ValueError(f"kind must be 'neural' or 'linear', got {kind!r}")
    started = time.perf_counter()
    engine = engine or RuleEngine.default()
    cfg = features or FeatureConfig()
    train, _ = split_p1(corpus_msgs)
    # The corpus's held-out part is the clean reference the gate and the quality metrics judge on: never train on it.
    train = [m for m in train if not is_holdout(message_id_for(m.raw))]
    prep = prepare(train, engine)
    x = prep.batch(cfg)
    y = prep.labels
    fit_i, hold_i = holdout_split(train)
    fit = fit_neural if kind == "neural" else fit_linear

    held = fit(x.take(fit_i), y[fit_i], cfg, seed=seed)
    z_hold = logits(held, x.take(hold_i))
    cal = fit_calibration(z_hold, prep.rule_scores[hold_i], y[hold_i], fpr_budget=FPR_BUDGET)
    s_comb = cal.combined_logit(z_hold, prep.rule_scores[hold_i])
    hold_metrics = {
        "model": metrics(z_hold, y[hold_i], z_hold >= cal.model_threshold_logit),
        "combined": metrics(s_comb, y[hold_i], cal.combined(z_hold, prep.rule_scores[hold_i]) >= cal.threshold),
        "rules": metrics(prep.rule_scores[hold_i], y[hold_i], prep.rule_spam[hold_i]),
    }

    t = time.perf_counter()
    model = fit(x, y, cfg, seed=seed)
    train_s = time.perf_counter() - t
    check = pick_self_check(y)
    expected = np.asarray(model.predict_proba(x.take(check)), dtype=np.float64)
    vectors = [SelfCheckVector(train[i].raw, prep.results[i], float(p)) for i, p in zip(check, expected, strict=True)]
    groups = Counter(m.group for m in train)
    lineage: dict[str, Any] = {
        "source": "seed",
        "corpus_groups": dict(sorted(groups.items())),
        "protocol": "P1 training period (hard-ham-1: first half in file order) minus the corpus's held-out part",
        "counts": {"spam": int(y.sum()), "ham": int((y == 0).sum())},
        "training_set_hash": training_set_hash([m.raw for m in train], [m.is_spam for m in train]),
        "training_time_s": round(train_s, 3),
        "calibration_holdout": {"what": "last 20% (file order) of each training group",
                                "spam": int(y[hold_i].sum()), "ham": int((y[hold_i] == 0).sum())},
        "rules_active": int(engine.active_count),
        "seed": seed,
        "reference_held_out": True,
    }
    with tempfile.TemporaryDirectory(prefix="flywheel-seed-") as tmp:
        path = model.export_onnx(Path(tmp) / "model.onnx")
        reg = Registry(Path(registry_root))
        version = reg.save(
            kind=kind, model_path=Path(path), features=cfg, self_check=vectors,
            metrics={"holdout": hold_metrics}, lineage=lineage, hyperparameters=model.config.to_dict(),
            parent=None, calibration=cal.to_dict(),
        )
    if promote:
        reg.promote(version, f"seed model ({kind}) trained on the earlier collection")
    log.info("seed_model_ready", version=version, kind=kind, seconds=round(time.perf_counter() - started, 1),
             holdout_one_minus_auc_pct=hold_metrics["combined"]["one_minus_auc_pct"])
    return version


__all__ = ["pick_self_check", "train_seed"]
