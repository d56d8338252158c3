"""Seed model: trained on the earlier collection, stored with lineage and self-check, promoted, serves at once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from models.classifier import Classifier
from models.consensus import is_holdout, message_id_for
from models.registry import Registry
from models.rules import RuleEngine
from models.seed import train_seed


@pytest.mark.integration
def test_linear_seed_is_promoted_and_classifies(tmp_path: Path) -> None:
    from models.corpus import ensure_corpus, load_corpus
    from services.settings import get_settings

    s = get_settings()
    ensure_corpus(s.downloads, s.corpus_dir)
    msgs = load_corpus(s.downloads, s.corpus_dir)
    rng = random.Random(5)
    sample = [m for g in sorted({m.group for m in msgs}) for m in rng.sample([x for x in msgs if x.group == g], 120)]
    version = train_seed(sample, tmp_path / "reg", kind="linear")
    reg = Registry(tmp_path / "reg")
    assert reg.champion() == version and reg.history()[-1]["reason"].startswith("seed model")
    info = reg.get(version)
    assert info.lineage["source"] == "seed" and set(info.lineage["corpus_groups"]) == {"easy-ham-1", "spam-1", "hard-ham-1"}
    # The corpus's held-out part (the clean reference) is never trained on.
    held = sum(is_holdout(message_id_for(m.raw)) for m in sample if m.group == "spam-1")
    assert held > 0 and info.lineage["counts"]["spam"] == 120 - held and info.lineage["reference_held_out"]
    assert len(info.lineage["training_set_hash"]) == 64
    assert info.calibration and 0 < info.calibration["threshold"] < 1
    assert info.metrics["holdout"]["combined"]["auc"] > 0.9
    loaded = reg.load(version)  # runs the self-check
    clf = Classifier(RuleEngine.default(), loaded)
    later = [m for m in msgs if m.group in ("spam-2", "easy-ham-2")][:: 40]
    verdicts = clf.classify_batch([m.raw for m in later])
    accuracy = sum(v.is_spam == m.is_spam for v, m in zip(verdicts, later, strict=True)) / len(later)
    assert accuracy > 0.85


@pytest.mark.integration
def test_eval_scores_the_seed_that_setup_ships(tmp_path: Path) -> None:
    """``flywheel eval --protocol P1`` reports as "served" the very model ``flywheel setup`` ships (the same
    training, stored and loaded the same way), scored by the serving classifier."""
    import numpy as np

    from models.corpus import ensure_corpus, load_corpus, split_p1
    from models.evaluate import served_seed
    from services.settings import get_settings

    s = get_settings()
    ensure_corpus(s.downloads, s.corpus_dir)
    msgs = load_corpus(s.downloads, s.corpus_dir)
    rng = random.Random(6)
    sample = [m for g in sorted({m.group for m in msgs}) for m in rng.sample([x for x in msgs if x.group == g], 80)]
    shipped = train_seed(sample, tmp_path / "setup")  # what `flywheel setup` runs: train_seed(corpus, registry)
    _, test = split_p1(sample)
    scores, out = served_seed(sample, test, RuleEngine.default(), tmp_path / "eval")
    setup_reg, eval_reg = Registry(tmp_path / "setup"), Registry(tmp_path / "eval" / "seed-registry")
    assert out["kind"] == setup_reg.get(shipped).kind == "linear"
    assert eval_reg.get(out["version"]).calibration == setup_reg.get(shipped).calibration
    mine = Classifier(RuleEngine.default(), setup_reg.load(shipped)).classify_batch([m.raw for m in test])
    assert np.allclose([v.score for v in mine], scores, atol=1e-6)
    assert out["fpr"] == sum(v.is_spam and not m.is_spam for v, m in zip(mine, test, strict=True)) / out["n_ham"]
