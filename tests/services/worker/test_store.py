"""The worker's store without Kafka: consensus and reputation, de-duplication, retraction, the offset filter,
dead letters, the data version, lineage offsets and the live tallies of served verdicts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from models.consensus import RELIABLE, add_to_record, confidence, reliability, reporter_weight
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
    seen = ServedVerdict(version="v1", is_spam=False, probability=0.1)  # classified by the API: seen by others
    store.apply([f.flag(f"e{i}", "spam", "dan", served=seen)[0] for i in range(6)])
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


def _proven(store: LabelStore, *reporters: str) -> float:
    """Give reporters a long agreeing record (reliability 0.96); returns the live weight of their flags."""
    for r in reporters:
        store._db.execute("INSERT INTO reporters (reporter, agree, disagree, flags, steps) VALUES (?, 40, 0, 40, 40)",
                          (r,))
    return confidence(reliability(40, 0))


def test_flags_on_served_verdicts_are_tallied_per_version(store: LabelStore) -> None:
    f = Feed()
    w = _proven(store, "amy", "bea")
    said_spam = ServedVerdict(version="v1", is_spam=True, probability=0.9)
    said_ham = ServedVerdict(version="v1", is_spam=False, probability=0.1)
    res = store.apply([
        f.flag("p1", "ham", "amy", served=said_spam)[0],  # a false positive of v1
        f.flag("p2", "spam", "amy", served=said_ham)[0],  # a false negative
        f.flag("p3", "spam", "bea", served=said_spam)[0],  # a true positive
        f.flag("p3", "spam", "bea", served=said_spam)[0],  # a duplicate flag: not counted again
        f.flag("p4", "ham", "amy")[0],  # never classified: nothing to judge
    ])
    assert res.live == {("v1", "fp"): 0, ("v1", "fn"): 0, ("v1", "tp"): 0}  # the series, before any judgement
    pending = store.pending_evidence()
    live = store.apply_model_evidence(pending[-1][0], [(p[1], 0) for p in pending])  # the models unsure
    assert live == pytest.approx({("v1", "fp"): w, ("v1", "fn"): w, ("v1", "tp"): w})
    assert store.live_tallies() == pytest.approx({("v1", "fp"): w, ("v1", "fn"): w, ("v1", "tp"): w})


# -- reputation that only honest work earns ---------------------------------------------------------------------
SURE_SPAM = lambda raws: [0.999] * len(raws)  # noqa: E731 - the models are very sure: every flag is judged


def test_flag_and_retract_rounds_buy_no_reliability(store: LabelStore) -> None:
    """One key flags one obvious spam and retracts it, 15 times (it reached 0.913 before: evidence counted at
    every flag and kept after the retraction)."""
    f = Feed()
    seen = ServedVerdict(version="v1", is_spam=True, probability=0.999)
    newcomer = store.reporter_reliability("nobody")
    for i in range(15):
        rec, ev = f.flag("obvious", "spam", "farmer", served=seen)
        if i % 2:  # half the rounds judged by the learner after ingest, as the worker does
            store.apply([rec])
            pending = store.pending_evidence()
            assert [p[1] for p in pending] == ["farmer"]
            store.apply_model_evidence(pending[-1][0], [("farmer", 1)])
        else:
            store.apply([rec], model_probability=SURE_SPAM)
        assert store.reporter_reliability("farmer") > newcomer  # while the flag stands, it counts
        store.apply([f.rec(encode(RetractionEvent(retracts=ev.event_id, message_id="obvious", reporter="farmer")))])
    got = store.reporter_reliability("farmer")
    assert got < RELIABLE and got <= newcomer + 1e-9, got
    assert store.reporter_weight("farmer") <= 1.0 + 1e-9


def test_evidence_counts_once_per_reporter_and_message(store: LabelStore) -> None:
    """Flagging the same message again, or back and forth, does not add evidence: the last vote's counts."""
    f = Feed()
    seen = ServedVerdict(version="v1", is_spam=True, probability=0.999)
    store.apply([f.flag("m", "spam", "eve", served=seen)[0]], model_probability=SURE_SPAM)
    once = store.reporter_reliability("eve")
    for label in ("ham", "spam", "ham", "spam", "spam"):
        store.apply([f.flag("m", label, "eve", served=seen)[0]], model_probability=SURE_SPAM)
    assert store.reporter_reliability("eve") == pytest.approx(once)
    assert store.reporter_reliability("eve") == pytest.approx(reliability(1, 0))


def test_mail_only_its_reporter_has_seen_earns_nothing_until_another_source_sees_it(store: LabelStore) -> None:
    f = Feed()
    raws = {f"own{i}": f"Subject: mine {i}\r\n\r\nbuy now {i}".encode() for i in range(20)}
    store.apply([f.flag(mid, "spam", "self", raw=raw)[0] for mid, raw in raws.items()], model_probability=SURE_SPAM)
    pending = store.pending_evidence()
    assert pending == []  # judged at ingest (the models' opinion was given)
    assert store.reporter_reliability("self") == pytest.approx(reliability(0, 0))  # held, not counted
    # Another source flags one of them, and the API classified another: those two count now.
    store.apply([f.flag("own0", "spam", "other", raw=raws["own0"])[0],
                 f.flag("own1", "spam", "self:relayed", raw=raws["own1"])[0],  # another source, not a sybil of the key
                 f.flag("own2", "spam", "self", raw=raws["own2"],
                        served=ServedVerdict(version="v1", is_spam=True, probability=0.999))[0]],
                model_probability=SURE_SPAM)
    a, d = 0.0, 0.0
    for _ in range(2):
        a, d = add_to_record(a, d, 1.0, 0.0)
    assert store.reporter_reliability("self") == pytest.approx(reliability(a, d))


def test_a_newcomers_flags_do_not_move_the_live_counts(store: LabelStore) -> None:
    """~50 "ham" flags from one new key on mail the champion blocked: no live false positive (it fired the
    rollback alert before); the same flags from a proven reporter count, weighted like labels."""
    f = Feed()
    blocked = ServedVerdict(version="v1", is_spam=True, probability=0.97)
    store.apply([f.flag(f"b{i}", "ham", "newkey", served=blocked)[0] for i in range(50)])
    pending = store.pending_evidence()
    assert store.apply_model_evidence(pending[-1][0], [(p[1], 0) for p in pending]) == {("v1", "fp"): 0.0}
    assert store.live_tallies() == {("v1", "fp"): 0.0}
    w = _proven(store, "veteran")
    store.apply([f.flag(f"b{i}", "ham", "veteran", served=blocked)[0] for i in range(50, 60)],
                model_probability=lambda raws: [0.5] * len(raws))  # judged with the batch: counted at once
    assert store.live_tallies() == pytest.approx({("v1", "fp"): 10 * w})


# -- a store with a bound ---------------------------------------------------------------------------------------
def test_a_flood_of_unique_large_messages_stays_within_the_quota(tmp_path: Path) -> None:
    """One reporter floods unique 500 KB messages: its raw mail stays within its share, the file within the
    quota, other reporters' mail is kept, and what is dropped is unlabelled mail first."""
    quota = 16 * 1024 * 1024
    store = LabelStore(tmp_path / "labels.db", quota_bytes=quota, reporter_share=0.25, source_share=0.5)
    try:
        f = Feed()
        keep = f.flag("honest-mail", "spam", "honest", raw=b"Subject: keep me\r\n\r\nhello")[0]
        store.apply([keep])
        blob = b"x" * (500 * 1024 - 64)
        for i in range(120):  # 60 MB from one reporter, four times the quota
            raw = b"Subject: flood %d\r\n\r\n" % i + blob
            store.apply([f.flag(f"flood{i}", "spam", "flooder", raw=raw)[0]])
        limit = int(0.8 * quota * 0.25)
        assert 0 < store.raw_bytes("r:flooder") <= limit
        assert store.raw_bytes() <= int(0.8 * quota)
        assert store.file_bytes() <= quota, store.file_bytes()
        assert "honest-mail" in {lb.message_id for lb in store.labelled()}
        assert store.vote_count() == 121  # every vote stays; only bytes went
        kept = {lb.message_id for lb in store.labelled()}
        assert "flood119" in kept and "flood0" not in kept  # the oldest bytes went first
        reopened = LabelStore(store.path, quota_bytes=quota)
        assert reopened.raw_bytes("r:flooder") == store.raw_bytes("r:flooder")
        reopened.close()
    finally:
        store.close()
