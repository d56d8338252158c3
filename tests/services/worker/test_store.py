"""The worker's store without Kafka: consensus and reputation, de-duplication, retraction, the offset filter,
dead letters, the data version, lineage offsets and the live tallies of served verdicts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from models.consensus import add_to_record, reporter_weight
from services.worker.store import LabelStore
from streams.events import FeedbackEvent, RetractionEvent, ServedVerdict, encode
from streams.records import Record

TOPIC = "t.feedback"
pytestmark = pytest.mark.unit


class Feed:
    """Builds records with increasing offsets on one partition."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.offset = -1

    def rec(self, value: bytes | None) -> Record:
        self.offset += 1
        return Record(TOPIC, self.partition, self.offset, b"k", value)

    def flag(self, mid: str, label: str, reporter: str, raw: bytes | None = b"Subject: x\r\n\r\nbody",
             served: ServedVerdict | None = None) -> tuple[Record, FeedbackEvent]:
        ev = FeedbackEvent.create(message_id=mid, label=label, reporter=reporter, raw=raw, served=served)  # type: ignore[arg-type]
        return self.rec(encode(ev)), ev


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LabelStore]:
    s = LabelStore(tmp_path / "labels.db", min_weight=1.0)
    yield s
    s.close()


def test_flag_becomes_label_and_duplicates_count_once(store: LabelStore) -> None:
    f = Feed()
    r1, _ = f.flag("m1", "spam", "alice")
    r2, _ = f.flag("m1", "spam", "alice")  # same reporter, same message: a duplicate
    res = store.apply([r1, r2])
    assert res.processed == 2 and res.duplicates == 1 and res.accepted_flags == 1
    assert store.labels() == {"m1": "spam"}
    assert store.vote_count() == 1
    assert store.counters()["votes"] == 1
    labelled = store.labelled()
    assert [(lb.message_id, lb.label) for lb in labelled] == [("m1", "spam")]
    assert labelled[0].offsets == ((TOPIC, 0, 0),) and labelled[0].reliability == pytest.approx(0.8)


def test_redelivered_records_are_skipped_exactly(store: LabelStore) -> None:
    f = Feed()
    recs = [f.flag(f"r{i}", "ham", f"u{i}")[0] for i in range(5)]
    store.apply(recs[:3])
    res = store.apply(recs)  # the first three come again after a "restart"
    assert res.skipped == 3 and res.processed == 2
    assert store.counter("events") == 5 and store.counter("votes") == 5
    reopened = LabelStore(store.path)
    assert reopened.last_offsets() == {(TOPIC, 0): 4}
    assert reopened.apply(recs).skipped == 5
    reopened.close()


def test_invalid_records_are_dead_lettered_and_do_not_stop_the_batch(store: LabelStore) -> None:
    f = Feed()
    bad = [f.rec(b"{not json"), f.rec(orjson.dumps({"type": "feedback", "label": "x"})), f.rec(None)]
    no_raw, _ = f.flag("never-seen", "spam", "bob", raw=None)
    good, _ = f.flag("d1", "spam", "bob")
    res = store.apply([*bad, no_raw, good])
    reasons = [r for _, r in res.dead]
    assert len(reasons) == 4
    assert any("not JSON" in r for r in reasons) and any("tombstone" in r for r in reasons)
    assert any("never seen" in r for r in reasons)
    assert store.labels() == {"d1": "spam"}
    assert store.last_offsets()[(TOPIC, 0)] == good.offset  # dead letters advance the offset too


def test_retraction_removes_the_label_and_moves_the_data_version(store: LabelStore) -> None:
    f = Feed()
    rec, ev = f.flag("x1", "spam", "carol")
    store.apply([rec])
    v1 = store.data_version
    assert store.label_counts() == {"spam": 1, "ham": 0} and v1 > 0
    wrong = f.rec(encode(RetractionEvent(retracts=ev.event_id, message_id="x1", reporter="mallory")))
    assert store.apply([wrong]).retractions == 0  # only the reporter may retract their own flag
    assert store.data_version == v1  # nothing a model would learn changed
    right = f.rec(encode(RetractionEvent(retracts=ev.event_id, message_id="x1", reporter="carol")))
    res = store.apply([right])
    assert res.retractions == 1 and res.removed_labels == 1
    assert store.labels() == {} and store.vote_count() == 0 and store.data_version > v1


def test_hostile_reporter_loses_weight_and_its_lone_flags_stop_counting(store: LabelStore) -> None:
    f = Feed()
    recs = []
    # Honest reporters say ham; the model is very sure they are ham; mallory says spam.
    for i in range(20):
        recs.append(f.flag(f"h{i}", "ham", f"honest{i % 3}")[0])
        recs.append(f.flag(f"h{i}", "spam", "mallory")[0])
    store.apply(recs, model_probability=lambda raws: [0.001] * len(raws))
    w = store.weights()
    assert w["mallory"] < 0.2
    assert min(w[f"honest{i}"] for i in range(3)) > 1.5
    assert all(label == "ham" for label in store.labels().values())
    # A lone flag from mallory on a new message no longer becomes a label...
    store.apply([f.flag("h25", "spam", "mallory")[0]], model_probability=lambda raws: [0.5] * len(raws))
    assert "h25" not in store.labels()
    # ... and the training view recomputed with today's weights has none of mallory's spam labels.
    assert all(lb.label == "ham" for lb in store.labelled())


def test_model_evidence_judged_later_counts_once(store: LabelStore) -> None:
    f = Feed()
    store.apply([f.flag(f"e{i}", "spam", "dan")[0] for i in range(6)])
    pending = store.pending_evidence()
    assert len(pending) == 6
    v = store.data_version
    store.apply_model_evidence(pending[-1][0], [("dan", -1)] * 6)
    store.apply_model_evidence(pending[-1][0], [("dan", -1)] * 6)  # a replay after a crash: no second count
    assert store.pending_evidence() == []
    a, d = 0.0, 0.0
    for _ in range(6):  # the SQL keeps the same recency-weighted record as the reference arithmetic
        a, d = add_to_record(a, d, 0.0, 1.0)
    assert d < 6 and store.reporter_weight("dan") == pytest.approx(reporter_weight(a, d))
    assert store.data_version == v + 1


def test_labelled_carries_offsets_recency_and_the_best_reliability(store: LabelStore) -> None:
    a, b = Feed(0), Feed(3)
    store.apply([a.flag("o1", "spam", "u")[0], a.flag("o2", "ham", "u")[0]])
    store.apply([b.flag("o3", "spam", "u")[0], b.flag("o3", "spam", "v")[0]])
    got = {lb.message_id: lb for lb in store.labelled()}
    assert got["o3"].offsets == ((TOPIC, 3, 0), (TOPIC, 3, 1))
    assert got["o1"].recency < got["o2"].recency < got["o3"].recency == store.newest_recency()


def test_flags_on_served_verdicts_are_tallied_per_version(store: LabelStore) -> None:
    f = Feed()
    said_spam = ServedVerdict(version="v1", is_spam=True, probability=0.9)
    said_ham = ServedVerdict(version="v1", is_spam=False, probability=0.1)
    res = store.apply([
        f.flag("p1", "ham", "amy", served=said_spam)[0],  # a false positive of v1
        f.flag("p2", "spam", "amy", served=said_ham)[0],  # a false negative
        f.flag("p3", "spam", "bea", served=said_spam)[0],  # a true positive
        f.flag("p3", "spam", "bea", served=said_spam)[0],  # a duplicate flag: not counted again
        f.flag("p4", "ham", "amy")[0],  # never classified: nothing to judge
    ])
    assert res.live == {("v1", "fp"): 1, ("v1", "fn"): 1, ("v1", "tp"): 1}
    assert store.live_tallies() == {("v1", "fp"): 1, ("v1", "fn"): 1, ("v1", "tp"): 1}
