"""The learner on real mail, without Kafka: the first champion, refits from flags with lineage, the gate
rejecting a challenger trained on flipped labels, and out-of-sample records that survive a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.consensus import is_holdout, message_id_for
from services.settings import Settings
from services.worker.data import Candidate, CorpusData, load_oof
from services.worker.learner import Learner
from services.worker.metrics import WorkerMetrics
from services.worker.store import LabelStore
from streams.events import FeedbackEvent, ServedVerdict, encode
from streams.records import Record

pytestmark = pytest.mark.integration
CLASSIFIED = ServedVerdict(version="served-earlier", is_spam=False, probability=0.5)


@pytest.fixture(scope="module")
def mail(p1_split: tuple[list, list]) -> dict[str, Any]:
    train, test = p1_split
    ids = {id(m): message_id_for(m.raw) for m in train + test}
    base = [(ids[id(m)], m.raw, m.is_spam, m.group) for m in train[::3] if not is_holdout(ids[id(m)])]
    reference = [(ids[id(m)], m.raw, m.is_spam, m.group) for m in train + test if is_holdout(ids[id(m)])][::2]
    later = [m for m in test if not is_holdout(ids[id(m)])]
    spam, ham = [m for m in later if m.is_spam][1::3], [m for m in later if not m.is_spam][1::3]
    flags = [m for pair in zip(spam, ham, strict=False) for m in pair]  # both classes in every prefix
    return {"corpus": CorpusData(base, reference), "flags": flags, "later": later}


class Rig:
    def __init__(self, root: Path, corpus: CorpusData) -> None:
        self.settings = Settings(state_dir=root, neural_retrain=False, linear_refit_s=0.0)
        self.store = LabelStore(root / "worker" / "labels.db")
        self.metrics = WorkerMetrics()
        self.emitted: list[Any] = []
        self.learner = Learner(self.settings, self.store, self.metrics, self.emitted.append, corpus)
        self.offset = 0

    def flag(self, msgs: list[Any], reporter_of: Any = lambda i: f"rep{i % 4}", flip: bool = False) -> None:
        recs = []
        for i, m in enumerate(msgs):
            label = "spam" if m.is_spam != flip else "ham"
            # Flags on mail the API classified (a message only its reporter has seen earns them no reputation).
            ev = FeedbackEvent.create(label=label, reporter=reporter_of(i), raw=m.raw, served=CLASSIFIED)
            recs.append(Record("t.feedback", i % 2, self.offset, None, encode(ev)))
            self.offset += 1
        self.store.apply(recs)
        while self.learner._judge_votes():
            pass


@pytest.fixture
def rig(tmp_path: Path, mail: dict[str, Any]) -> Iterator[Rig]:
    r = Rig(tmp_path, mail["corpus"])
    yield r
    r.store.close()


def test_a_fresh_registry_gets_the_base_model_as_its_first_champion(rig: Rig) -> None:
    reg = rig.learner.registry
    assert reg.champion() is None
    version = rig.learner.refit()
    assert version is not None and reg.champion() == version
    info = reg.get(version)
    assert info.kind == "linear" and info.calibration is not None
    assert info.lineage["counts"]["flags"] == {"spam": 0, "ham": 0}
    assert info.lineage["counts"]["corpus"]["spam"] > 0
    assert reg.decisions()[-1]["test"] == "first"


def test_flags_are_refit_gated_and_recorded_with_their_lineage(rig: Rig, mail: dict[str, Any]) -> None:
    first = rig.learner.refit()
    flags = mail["flags"][:240]
    rig.flag(flags)
    version = rig.learner.refit()
    reg = rig.learner.registry
    d = reg.decisions()[-1]
    assert d["challenger"] == version and d["champion"] == first
    assert d["evaluation_set"]["flags"]["spam"] + d["evaluation_set"]["flags"]["ham"] > 100
    stats = d["statistics"]
    assert {"auc", "fpr", "policy", "margin"} <= set(stats) and stats["fresher"] is True
    info = reg.get(version)
    rows = rig.store._r().execute("SELECT topic, partition, offset FROM votes").fetchall()
    want: dict[str, list[int]] = {}
    for t, p, o in rows:
        r = want.setdefault(f"{t}:{p}", [o, o])
        r[0], r[1] = min(r[0], o), max(r[1], o)
    assert info.lineage["offsets"] == dict(sorted(want.items()))
    assert info.lineage["counts"]["flags"] == {"spam": sum(m.is_spam for m in flags),
                                               "ham": sum(not m.is_spam for m in flags)}
    assert info.lineage["data_version"] == rig.store.data_version and len(info.lineage["flags_hash"]) == 64
    oof, trained, dv = load_oof(rig.learner.oof_dir, version)
    assert len(oof) == len(flags) == len(trained) and dv == rig.store.data_version
    assert rig.emitted[-1].version == version and rig.emitted[-1].reason == d["reason"]


def test_a_challenger_trained_on_flipped_labels_is_rejected(rig: Rig, mail: dict[str, Any]) -> None:
    from models.learning import calibrate, refit_linear, select_linear

    rig.learner.refit()
    flags = mail["flags"][:240]
    rig.flag(flags)
    rig.learner.refit()
    champion = rig.learner.registry.champion()
    rejected_before = rig.metrics.registry.get_sample_value("flywheel_gate_decisions_total",
                                                            {"decision": "rejected", "kind": "linear"}) or 0
    labelled = rig.store.labelled()
    train = rig.learner.training_set(labelled)
    base_n = train.rows - len(labelled)
    flipped = train.labels.copy()
    flipped[base_n:] = 1 - flipped[base_n:]  # every flag's label turned around
    from models.learning import TrainingSet

    bad_train = TrainingSet(train.batch, flipped, train.rule_scores, train.is_flag)
    choice = select_linear(bad_train, grid=((3e-7, 2.0),))
    bad = refit_linear(bad_train, choice)
    cal, _ = calibrate(bad_train, choice.oof, fpr_budget=0.001)
    oof = {lb.message_id: float(z) for lb, z in zip(labelled, choice.oof[base_n:], strict=True)}
    cand = Candidate("linear", bad, cal, oof, set(oof), rig.store.data_version + 1, {"source": "test"}, {}, 0.0)
    version = rig.learner.challenge(cand, labelled)
    reg = rig.learner.registry
    d = reg.decisions()[-1]
    assert d["challenger"] == version and d["decision"] == "rejected", d["reason"]
    assert d["challenger_metrics"]["one_minus_auc"] > d["champion_metrics"]["one_minus_auc"]
    assert reg.champion() == champion
    sample = rig.metrics.registry.get_sample_value("flywheel_gate_decisions_total",
                                                   {"decision": "rejected", "kind": "linear"})
    assert sample == rejected_before + 1


def test_a_restarted_learner_judges_the_champion_as_before(rig: Rig, mail: dict[str, Any], tmp_path: Path) -> None:
    rig.learner.refit()
    rig.flag(mail["flags"][:200])
    version = rig.learner.refit()  # promoted or not, its out-of-sample record is kept with it
    again = Learner(rig.settings, rig.store, WorkerMetrics(), lambda e: None, mail["corpus"])
    judge = again._judge(version)
    assert judge is not None and judge.oof == load_oof(again.oof_dir, version)[0] and len(judge.oof) == 200
    assert judge.data_version == rig.store.data_version
    # The quality set is scored for every side once a champion exists.
    again.update_quality()
    for side in ("rules", "model", "served"):
        v = again.metrics.registry.get_sample_value("flywheel_quality_recall", {"side": side, "fpr": "0.01"})
        assert v is not None and 0.0 < v <= 1.0
    assert np.isfinite(again.metrics.registry.get_sample_value("flywheel_quality_one_minus_auc", {"side": "model"}))


def test_the_gate_judges_on_labels_the_challenger_left_out(rig: Rig, mail: dict[str, Any]) -> None:
    """A challenger that dropped labels (as when reporters' reliability falls and their labels stop being
    trusted) is judged on them all the same: here one trained on the base corpus alone, with a fresher data
    version, against a champion that learned 240 flags, hard ham among them (what the base corpus does not
    teach). On its own (empty) training flags it would have nothing to be judged on but the corpus."""
    from models.learning import calibrate, refit_linear, select_linear

    later = mail["later"]
    hard = [m for m in later if m.group.startswith("hard")][:80]
    ham = hard + [m for m in later if m.group.startswith("easy")][: 120 - len(hard)]
    spam = [m for m in later if m.is_spam][:120]
    rig.learner.refit()
    rig.flag([m for pair in zip(spam, ham, strict=True) for m in pair])
    rig.learner.refit()
    champion = rig.learner.registry.champion()
    labelled = rig.store.labelled()
    train = rig.learner.training_set([])
    choice = select_linear(train, grid=((3e-7, 1.0),))
    cal, _ = calibrate(train, choice.oof, fpr_budget=0.001)
    cand = Candidate("linear", refit_linear(train, choice), cal, {}, set(), rig.store.data_version + 1,
                     {"source": "test"}, {}, 0.0, cross=choice.cross)
    rig.learner.challenge(cand, labelled)
    d = rig.learner.registry.decisions()[-1]
    assert d["evaluation_set"]["flags"]["spam"] + d["evaluation_set"]["flags"]["ham"] == len(labelled) == 240
    assert d["decision"] == "rejected" and rig.learner.registry.champion() == champion, d["reason"]
    assert d["challenger_metrics"]["one_minus_auc"] > d["champion_metrics"]["one_minus_auc"]


def test_a_rollback_during_a_gate_decision_is_kept(rig: Rig, mail: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Promotion is a compare-and-swap against the champion the gate judged: an administrator who rolls back
    while the gate decides keeps the rollback; the decision is recorded as rejected, saying why."""
    import services.worker.learner as learner_mod
    from models.gate import GateResult

    reg = rig.learner.registry
    first = rig.learner.refit()
    promote_all = lambda *a, **k: GateResult(True, "promoted for the test", "better", {})  # noqa: E731
    monkeypatch.setattr(learner_mod, "decide", promote_all)
    rig.flag(mail["flags"][:60])
    second = rig.learner.refit()
    assert reg.champion() == second != first

    def rollback_meanwhile(*a: Any, **k: Any) -> GateResult:
        reg.rollback("an administrator, while the gate decides")
        return promote_all()

    monkeypatch.setattr(learner_mod, "decide", rollback_meanwhile)
    rig.flag(mail["flags"][60:100])
    third = rig.learner.refit()
    assert third not in (None, first, second)
    assert reg.champion() == first, "the administrator's rollback was undone"
    d = reg.decisions()[-1]
    assert d["challenger"] == third and d["champion"] == second
    assert d["decision"] == "rejected" and "champion changed during the gate" in d["reason"]
    assert [h["action"] for h in reg.history()][-1] == "rollback"
