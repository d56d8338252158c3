"""What the worker's learner works on and keeps: the corpus split it trains and judges on, the challengers on
their way through the gate, the champion as the gate sees it, and each version's out-of-sample record (stored
under ``<state>/worker/oof/``, so a restarted worker judges the champion as before)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

if TYPE_CHECKING:
    from models.base import Scorer, SpamModel
    from models.classifier import Calibration
    from models.features import FeatureBatch
    from models.learning import CrossFit
    from models.linear import LinearModel
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = ["Candidate", "CorpusData", "Judge", "corpus_data", "load_oof", "oof_path", "save_oof"]


# ============================================================================================ corpus
@dataclass(slots=True)
class CorpusData:
    """What the worker takes from the corpus.

    ``base``: trained on by every model (the earlier collection minus its held-out part); ``reference``: the
    corpus's held-out part (both collections, hard ham included), never trained on: the gate's top-up and clean
    reference set, and the fixed quality set of the metrics. Entries are (message id, raw, is spam, group).
    """

    base: list[tuple[str, bytes, bool, str]] = field(default_factory=list)
    reference: list[tuple[str, bytes, bool, str]] = field(default_factory=list)


def corpus_data(settings: Settings) -> CorpusData:
    """The corpus split for the worker (empty without a corpus: the gate then judges on flags alone).

    ``eval_exclude_file`` lists message ids the worker must never use from the corpus (a benchmark keeps its
    test half out this way); with ``worker_base_corpus`` off there is no base (the replay learns from flags alone).
    """
    from models.consensus import is_holdout
    from models.corpus import CorpusError, load_corpus, split_p1
    from streams.events import message_id_for

    try:
        msgs = load_corpus(settings.downloads, settings.corpus_dir)
    except (CorpusError, OSError) as exc:
        log.warning("no corpus: the gate judges on flags alone", error=str(exc))
        return CorpusData()
    excluded: set[str] = set()
    if settings.eval_exclude_file is not None:
        excluded = {ln.strip() for ln in settings.eval_exclude_file.read_text().splitlines() if ln.strip()}
    train, test = split_p1(msgs)
    later = {id(m) for m in test}
    data = CorpusData()
    for m in msgs:
        mid = message_id_for(m.raw)
        if mid in excluded:
            continue
        entry = (mid, m.raw, m.is_spam, m.group)
        if is_holdout(mid):
            data.reference.append(entry)
        elif id(m) not in later and settings.worker_base_corpus:
            data.base.append(entry)
    del train
    log.info("corpus for the worker", base=len(data.base), reference=len(data.reference), excluded=len(excluded))
    return data


# ============================================================================================ candidates
@dataclass(slots=True)
class Candidate:
    """A trained challenger on its way through the gate.

    ``oof`` maps the flags it trained on to out-of-sample logits (cross-fitted or validation); ``trained`` is
    every flag it trained on (a trained flag without an ``oof`` entry cannot judge it).
    """

    kind: str
    model: SpamModel
    calibration: Calibration
    oof: dict[str, float]
    trained: set[str]
    data_version: int
    lineage: dict[str, Any]
    hyperparameters: dict[str, Any]
    training_s: float
    linear_state: LinearModel | None = None
    cross: CrossFit | None = None  # a linear challenger's cross-fit: its fold models score flags it never saw
    reselected: bool = False  # a refit on the champion's data with its configuration chosen again on all of it
    vouched: bool = False  # every flag it learned is one the base model is very sure of, with the same label


@dataclass(slots=True)
class Judge:
    """A model as the gate sees it: a loaded version, its calibration and its out-of-sample record."""

    version: str
    kind: str
    model: Scorer  # the version's ONNX graph
    calibration: Calibration
    oof: dict[str, float]
    trained: set[str]
    data_version: int
    reference_held_out: bool = False  # never trained on the corpus's held-out part: the tripwire can judge it

    def logit(self, batch: FeatureBatch) -> np.ndarray:
        return np.asarray(self.model.decision_function(batch), dtype=np.float64).reshape(-1)


def oof_path(root: Path, version: str) -> Path:
    """Where a version's out-of-sample record lives."""
    return root / f"{version}.npz"


def save_oof(root: Path, version: str, oof: dict[str, float], trained: set[str], data_version: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{version}.tmp.npz"
    ids = sorted(oof)
    np.savez(tmp, ids=np.array(ids, dtype=str), logits=np.array([oof[i] for i in ids], dtype=np.float64),
             trained=np.array(sorted(trained), dtype=str), data_version=np.array([data_version]))
    tmp.replace(oof_path(root, version))


def load_oof(root: Path, version: str) -> tuple[dict[str, float], set[str], int]:
    """A version's out-of-sample record; a version without one (the seed, an imported model) trained on no flags."""
    path = oof_path(root, version)
    if not path.exists():
        return {}, set(), 0
    with np.load(path, allow_pickle=False) as d:
        return (dict(zip(d["ids"].tolist(), d["logits"].tolist(), strict=True)), set(d["trained"].tolist()),
                int(d["data_version"][0]))
