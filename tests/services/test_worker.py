"""The worker's logic without Kafka: consensus and reputation, de-duplication, retraction, the offset filter,
dead letters, the gate rule, and a learner that publishes, gates and records lineage in a real registry."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

from services.worker import (
    LabelStore,
    auc_standard_error,
    Record,
    consensus,
    gate_rule,
    is_holdout,
    model_evidence,
    reporter_weight,
)
from streams.events import FeedbackEvent, RetractionEvent, encode

TOPIC = "t.feedback"


def _non_holdout(prefix: str, n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        mid = f"{prefix}{i}"
        if not is_holdout(mid):
            out.append(mid)
        i += 1
    return out


class Feed:
    """Builds records with increasing offsets on one partition."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.offset = -1

    def rec(self, value: bytes | None) -> Record:
        self.offset += 1
        return Record(TOPIC, self.partition, self.offset, b"k", value)

    def flag(self, mid: str, label: str, reporter: str, raw: bytes | None = b"Subject: x\r\n\r\nbody") -> tuple[Record, FeedbackEvent]:
        ev = FeedbackEvent.create(message_id=mid, label=label, reporter=reporter, raw=raw)  # type: ignore[arg-type]
        return self.rec(encode(ev)), ev


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    s = LabelStore(tmp_path / "labels.db", min_weight=1.0)
    yield s
    s.close()


@pytest.mark.unit
def test_reputation_math() -> None:
    assert reporter_weight(0, 0) == 1.0
    assert reporter_weight(8, 0) == pytest.approx(2 * 10 / 12)
    assert reporter_weight(0, 8) == pytest.approx(2 * 2 / 12)
    assert reporter_weight(0, 1) == pytest.approx(0.8)
    assert reporter_weight(100, 0) < 2.0
    assert consensus([("spam", 1.0)], 1.0) == ("spam", 1.0)
    assert consensus([("spam", 1.0), ("ham", 0.5)], 1.0)[0] is None
    assert consensus([("spam", 1.8), ("ham", 0.2), ("ham", 0.3)], 1.0) == ("spam", pytest.approx(1.3))
    assert consensus([("ham", 1.2)], 1.0)[0] == "ham"
    assert model_evidence("spam", 0.995) == 1 and model_evidence("spam", 0.005) == -1
    assert model_evidence("ham", 0.5) == 0 and model_evidence("ham", None) == 0


@pytest.mark.unit
def test_flag_becomes_label_and_duplicates_count_once(store: LabelStore) -> None:
    f = Feed()
    mid = _non_holdout("m", 1)[0]
    r1, _ = f.flag(mid, "spam", "alice")
    r2, _ = f.flag(mid, "spam", "alice")  # same reporter, same message: a duplicate
    res = store.apply([r1, r2])
    assert res.processed == 2 and res.duplicates == 1 and res.accepted_flags == 1
    assert store.labels() == {mid: "spam"}
    assert store.vote_count() == 1
    assert len(res.learned) == 1 and res.learned[0][1] == mid
    assert store.counters()["votes"] == 1


@pytest.mark.unit
def test_redelivered_records_are_skipped_exactly(store: LabelStore) -> None:
    f = Feed()
    mids = _non_holdout("r", 5)
    recs = [f.flag(m, "ham", f"u{i}")[0] for i, m in enumerate(mids)]
    store.apply(recs[:3])
    res = store.apply(recs)  # the first three come again after a "restart"
    assert res.skipped == 3 and res.processed == 2
    assert store.counter("events") == 5 and store.counter("votes") == 5
    reopened = LabelStore(store.path)
    assert reopened.last_offsets() == {(TOPIC, 0): 4}
    assert reopened.apply(recs).skipped == 5
    reopened.close()


@pytest.mark.unit
def test_invalid_records_are_dead_lettered_and_do_not_stop_the_batch(store: LabelStore) -> None:
    f = Feed()
    mid = _non_holdout("d", 1)[0]
    bad = [f.rec(b"{not json"), f.rec(orjson.dumps({"type": "feedback", "label": "x"})), f.rec(None)]
    no_raw, _ = f.flag("never-seen", "spam", "bob", raw=None)
    good, _ = f.flag(mid, "spam", "bob")
    res = store.apply([*bad, no_raw, good])
    reasons = [r for _, r in res.dead]
    assert len(reasons) == 4
    assert any("not JSON" in r for r in reasons) and any("tombstone" in r for r in reasons)
    assert any("never seen" in r for r in reasons)
    assert store.labels() == {mid: "spam"}
    assert store.last_offsets()[(TOPIC, 0)] == good.offset  # dead letters advance the offset too


@pytest.mark.unit
def test_retraction_removes_the_label(store: LabelStore) -> None:
    f = Feed()
    mid = _non_holdout("x", 1)[0]
    rec, ev = f.flag(mid, "spam", "carol")
    store.apply([rec])
    assert store.label_counts() == {"spam": 1, "ham": 0}
    wrong = f.rec(encode(RetractionEvent(retracts=ev.event_id, message_id=mid, reporter="mallory")))
    assert store.apply([wrong]).retractions == 0  # only the reporter may retract their own flag
    right = f.rec(encode(RetractionEvent(retracts=ev.event_id, message_id=mid, reporter="carol")))
    res = store.apply([right])
    assert res.retractions == 1 and res.removed_labels == 1
    assert store.labels() == {} and store.vote_count() == 0


@pytest.mark.unit
def test_hostile_reporter_loses_weight_and_its_lone_flags_stop_counting(store: LabelStore) -> None:
    f = Feed()
    hams = _non_holdout("h", 30)
    # Honest reporters say ham; the model is very sure they are ham; mallory says spam.
    recs = []
    for i, mid in enumerate(hams[:20]):
        recs.append(f.flag(mid, "ham", f"honest{i % 3}")[0])
        recs.append(f.flag(mid, "spam", "mallory")[0])
    store.apply(recs, model_probability=lambda raws: [0.001] * len(raws))
    w = store.weights()
    assert w["mallory"] < 0.2
    assert min(w[f"honest{i}"] for i in range(3)) > 1.5
    assert all(label == "ham" for label in store.labels().values())
    # A lone flag from mallory on a new message no longer becomes a label.
    store.apply([f.flag(hams[25], "spam", "mallory")[0]], model_probability=lambda raws: [0.5] * len(raws))
    assert hams[25] not in store.labels()
    # ...and the batch training set recomputed with today's weights has none of mallory's spam labels.
    assert all(label == "ham" for _, _, label in store.current_consensus())


@pytest.mark.unit
def test_holdout_is_stable_and_never_learned(store: LabelStore) -> None:
    ids = [f"msg{i}" for i in range(400)]
    held = [m for m in ids if is_holdout(m)]
    assert 20 <= len(held) <= 70  # about one in ten
    assert held == [m for m in ids if is_holdout(m)]
    f = Feed()
    res = store.apply([f.flag(m, "spam", "a")[0] for m in held[:5]])
    assert res.learned == [] and len(store.labels()) == 5
    assert len(store.current_consensus(holdout=True)) == 5 and store.current_consensus(holdout=False) == []


@pytest.mark.unit
def test_lineage_offset_ranges(store: LabelStore) -> None:
    a, b = Feed(0), Feed(3)
    mids = _non_holdout("o", 4)
    store.apply([a.flag(mids[0], "spam", "u")[0], a.flag(mids[1], "ham", "u")[0]])
    store.apply([b.flag(mids[2], "spam", "u")[0], b.flag(mids[3], "spam", "u")[0]])
    assert store.offset_ranges(mids) == {f"{TOPIC}:0": [0, 1], f"{TOPIC}:3": [0, 1]}


@pytest.mark.unit
def test_gate_rule() -> None:
    champ = {"one_minus_auc": 0.010, "fpr": 0.001}
    tol = 0.002
    assert gate_rule(None, {"one_minus_auc": 0.5, "fpr": 0.1}, fpr_tolerance=tol).promote
    assert not gate_rule(champ, {"one_minus_auc": math.nan, "fpr": 0.0}, fpr_tolerance=tol).promote
    better = gate_rule(champ, {"one_minus_auc": 0.008, "fpr": 0.001}, fpr_tolerance=tol)
    assert better.promote and "improves" in better.reason
    worse = gate_rule(champ, {"one_minus_auc": 0.02, "fpr": 0.001}, fpr_tolerance=tol)
    assert not worse.promote and "does not improve" in worse.reason
    fpr = gate_rule(champ, {"one_minus_auc": 0.005, "fpr": 0.0041}, fpr_tolerance=tol)
    assert not fpr.promote and "FPR" in fpr.reason
    same = {"one_minus_auc": 0.010, "fpr": 0.001}
    assert not gate_rule(champ, same, fpr_tolerance=tol).promote  # another lineage must be strictly better
    tie = {"one_minus_auc": 0.0101, "fpr": 0.001}
    assert gate_rule(champ, tie, fpr_tolerance=tol, descends_from_champion=True).promote  # within the margin
    drifted = gate_rule(champ, tie, fpr_tolerance=tol, descends_from_champion=True, anchor={"one_minus_auc": 0.0098})
    assert not drifted.promote and "anchor" in drifted.reason
    # The margin is one standard error of the champion's AUC: it shrinks as the evaluation set grows.
    small = {"one_minus_auc": 0.010, "fpr": 0.001, "n_spam": 100, "n_ham": 100}
    big = {**small, "n_spam": 10_000, "n_ham": 10_000}
    ch = {"one_minus_auc": 0.014, "fpr": 0.001}
    assert gate_rule(small, ch, fpr_tolerance=tol, descends_from_champion=True).promote
    assert not gate_rule(big, ch, fpr_tolerance=tol, descends_from_champion=True).promote
    assert auc_standard_error(0.99, 100, 100) > auc_standard_error(0.99, 10_000, 10_000) > 0


# ------------------------------------------------------------------------------- the learner (real models)
@pytest.fixture(scope="module")
def small_corpus(corpus: list) -> tuple[list, list]:
    from models.corpus import split_p1
    from streams.events import message_id_for

    train, test = split_p1(corpus)
    evals = [(message_id_for(m.raw), m.raw, m.is_spam) for m in test[::8]]
    flags = [m for m in test[3::8]]
    return evals, [(m.raw, m.is_spam) for m in train[::4]], flags  # type: ignore[return-value]


@pytest.mark.integration
def test_learner_publishes_with_lineage_and_rejects_a_worse_challenger(tmp_path: Path, small_corpus: tuple) -> None:
    import numpy as np

    from models.linear import LinearModel
    from models.registry import Registry
    from services.settings import Settings
    from services.worker import Learner, WorkerMetrics

    evals, train, flags = small_corpus
    s = Settings(state_dir=tmp_path, linear_publish_every=10_000, linear_publish_s=3600.0)
    store = LabelStore(tmp_path / "worker" / "labels.db")
    emitted: list = []
    metrics = WorkerMetrics()
    learner = Learner(s, store, metrics, emitted.append, corpus_eval=evals, corpus_train=train)
    reg = Registry(s.registry)
    first = learner.bootstrap()
    assert first is not None and reg.champion() == first
    assert reg.meta(first)["calibration"] is not None  # fitted on the calibration half

    # Flags in, learned, published: lineage names the offsets learned from.
    f0, f1 = Feed(0), Feed(1)
    recs = []
    for i, m in enumerate(flags[:60]):
        feed = f0 if i % 2 else f1
        recs.append(feed.flag(f"m{i}", "spam" if m.is_spam else "ham", "alice", raw=m.raw)[0])
    res = store.apply(recs)
    n_learned = len(res.learned)
    assert n_learned > 40
    while learner.step():
        pass
    assert learner.learned_seq == res.learned[-1][0]
    assert learner.maybe_publish(force=True)
    learner.join()
    decision = reg.decisions()[-1]
    v = decision["challenger"]
    lineage = reg.get(v).lineage
    want: dict[str, list[int]] = {}
    for *_, topic, part, off in res.learned:
        r = want.setdefault(f"{topic}:{part}", [off, off])
        r[0], r[1] = min(r[0], off), max(r[1], off)
    assert lineage["offsets"] == want and sum(lineage["counts"].values()) == n_learned
    assert lineage["learn_log_seq"] == learner.learned_seq and reg.get(v).parent == first

    # A worse challenger (trained on flipped labels) is rejected, with the reason and both sides' metrics.
    champion_before = reg.champion()
    bad = LinearModel()
    batch = learner.rows([(f"corpus:{i}", r) for i, (r, _) in enumerate(train)])
    bad.fit(batch, np.array([0 if spam else 1 for _, spam in train]))
    path = tmp_path / "bad.onnx"
    bad.export_onnx(path)
    version = learner.challenge("linear", path, bad.features, bad.predict_proba, {"source": "test"}, {}, training_s=0.0)
    rec = reg.decisions()[-1]
    assert rec["challenger"] == version and rec["decision"] == "rejected"
    assert "1-AUC" in rec["reason"] or "FPR" in rec["reason"]
    assert rec["challenger_metrics"]["one_minus_auc"] > rec["champion_metrics"]["one_minus_auc"]
    assert reg.champion() == champion_before
    assert emitted[-1].kind == "rejected" and emitted[-1].version == version and emitted[-1].reason == rec["reason"]
    sample = metrics.registry.get_sample_value("flywheel_gate_decisions_total", {"decision": "rejected", "kind": "linear"})
    assert sample is not None and sample >= 1
    store.close()
