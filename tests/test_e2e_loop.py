"""The whole loop on the real broker, API and worker processes, driven as users drive it: flags through
POST /feedback, consensus labels, refits, the gate, promotion, hot reload, lineage; the improvement measured on
mail nobody flagged; then the faults: ``kill -9`` of the worker mid-stream and the broker restarted under the API.

One stack per module (worker + API on the session broker, own topics and state dir) keeps the runtime modest.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from models.consensus import message_id_for
from models.metrics import roc_auc
from services.bench.harness import LocalStack, reporter_keys
from services.local.daemon import tail, wait_until
from services.settings import Settings
from streams.events import FeedbackEvent, ServedVerdict, encode
from streams.topics import EventProducer, Topics

KEYS = reporter_keys(6)
HONEST = [k for k in KEYS if k != "dev-admin-key"]

pytestmark = pytest.mark.e2e


class Loop:
    """The running stack plus the mail the tests use: ``pool`` to flag, ``unflagged`` never shown to the worker."""

    def __init__(self, stack: LocalStack, pool: list[Any], unflagged: list[Any]) -> None:
        self.stack = stack
        self.s = stack.settings
        self.topics = Topics.from_config(stack.settings.streams())
        self.pool = pool
        self.unflagged = unflagged
        self.used = 0

    def take(self, n: int) -> list[Any]:
        out = self.pool[self.used : self.used + n]
        self.used += n
        assert len(out) == n, "corpus pool exhausted"
        return out

    def flag(self, m: Any, key: str, label: str | None = None) -> dict[str, Any]:
        mid = self.stack.classify(m.raw)["message_id"]
        r = self.stack.flag(label or ("spam" if m.is_spam else "ham"), key, message_id=mid)
        assert r.status_code == 202, r.text
        return dict(r.json())

    def applied(self, answer: dict[str, Any]) -> bool:
        """The flag ``/feedback`` answered with (its partition and offset) is in the worker's store."""
        return self.stack.applied_offsets(self.topics.feedback).get(answer["partition"], -1) >= answer["offset"]

    def settle(self, timeout_s: float = 300.0) -> None:
        wait_until(self.stack.settled, timeout_s, "the worker to settle", 0.5)


@pytest.fixture(scope="module")
def loop(kafka: Settings, p1_split: tuple[list, list], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from services.bench.flywheel import split_flagged

    root = tmp_path_factory.mktemp("loop")
    _, test = p1_split
    flaggable, unflagged = split_flagged([m for m in test if len(m.raw) < 100_000])
    exclude = root / "unflagged.txt"
    exclude.write_text("\n".join(message_id_for(m.raw) for m in unflagged))
    pool = list(flaggable)
    random.Random(7).shuffle(pool)  # the later mail as it comes: every group, hard ham included
    stack = LocalStack(kafka, root / "stack", api_keys=KEYS, eval_exclude_file=exclude, neural_retrain=False,
                       linear_refit_s=1.0)
    with stack:
        yield Loop(stack, pool, unflagged)


def _served_one_minus_auc(lp: Loop) -> float:
    answers = lp.stack.classify_many([m.raw for m in lp.unflagged])
    return 1.0 - roc_auc(np.array([a["score"] for a in answers]), np.array([m.is_spam for m in lp.unflagged]))


def test_flags_on_new_mail_improve_the_mail_nobody_flagged(loop: Loop) -> None:
    """Most of one half of the later mail flagged with its true label: the other half, never seen by the worker,
    is ranked with far fewer errors afterwards (measured over HTTP, as a ratio to before)."""
    before = _served_one_minus_auc(loop)
    v0 = loop.stack.registry().champion()
    produced: set[tuple[str, int, int]] = set()
    flags = loop.take(1100)
    for i, m in enumerate(flags):
        body = loop.flag(m, HONEST[i % len(HONEST)])
        produced.add((loop.topics.feedback, body["partition"], body["offset"]))
    loop.settle()
    reg = loop.stack.registry()
    champ = reg.champion()
    assert champ is not None and champ != v0, [(d["decision"], d["reason"]) for d in reg.decisions()]
    wait_until(lambda: loop.stack.classify(loop.unflagged[0].raw)["model"]["version"] == champ, 60, "the API to reload")
    after = _served_one_minus_auc(loop)
    # An offline refit on the same flags gets to about 0.3 of before here (with 600 flags only to about 0.65, so
    # the test flags most of its half). The served champion is the last refit the gate could show not worse,
    # which is not always the last refit (under 0.5 of before in one run, 0.52 in another), so the bar here is 0.7; the
    # benchmark (`flywheel bench flywheel`) measures the bar, half of before, against the offline refit.
    assert after <= 0.7 * before, (before, after)
    # Lineage: the offsets of exactly the flags behind the champion, all of them offsets the API answered.
    info = reg.get(champ)
    assert info.kind == "linear" and info.parent
    with loop.stack.db() as db:
        rows = db.execute("SELECT topic, partition, offset, label FROM votes WHERE retracted=0").fetchall()
    assert rows and all((t, p, o) in produced for t, p, o, _ in rows)
    # The champion is the last promoted refit, not necessarily the last one tried (the gate may have rejected a
    # later challenger): its lineage names, per partition, a prefix of the flags (from the first offset on), and
    # its counts are exactly the flags within those ranges.
    first: dict[str, int] = {}
    for t, p, o, _ in rows:
        first[f"{t}:{p}"] = min(o, first.get(f"{t}:{p}", o))
    seen = info.lineage["offsets"]
    assert seen and all(lo == first[key] for key, (lo, _hi) in seen.items()), (seen, first)
    trained = [lab for t, p, o, lab in rows if f"{t}:{p}" in seen and o <= seen[f"{t}:{p}"][1]]
    assert info.lineage["counts"]["flags"] == {"spam": trained.count("spam"), "ham": trained.count("ham")}
    promoted = [d for d in reg.decisions() if d["decision"] == "promoted" and d["challenger"] == champ]
    assert promoted and promoted[0]["champion_metrics"]["one_minus_auc"] is not None  # both sides recorded
    assert promoted[0]["evaluation_set"]["flags"]  # judged on flags, not only on the corpus
    meta = json.loads((loop.s.registry / "versions" / champ / "meta.json").read_text())
    assert meta["lineage"]["offsets"] == info.lineage["offsets"]
    # Prequential quality: every flag judged the verdict served for it, weighted like a label
    # (models.consensus.live_weight), counted once the models judged the flag: nothing while its reporter is
    # unproven, about 0.9 once proven.
    # Per version: the seed served the first verdicts, the champions after it the rest.
    judged = loop.stack.worker_metric("flywheel_live_verdicts_total") or 0
    assert 0.5 * len(flags) <= judged <= len(flags)
    assert loop.stack.worker_metric("flywheel_live_verdicts_total", {"version": v0}) is not None


def test_kill9_worker_mid_stream_loses_nothing_and_counts_nothing_twice(loop: Loop) -> None:
    base = {"events": 0, "votes": 0, **loop.stack.counters()}  # run alone, the store has counted nothing yet
    msgs = loop.take(300)
    # Flags as the API sends them for mail it classified (mail only its reporter has seen would earn the bulk
    # reporters no reliability, and their labels on hard mail would rightly not be learned).
    served = ServedVerdict(version=loop.stack.registry().champion() or "none", is_spam=False, probability=0.5)
    events = [FeedbackEvent.create(label="spam" if m.is_spam else "ham", reporter=f"bulk{i % 3}", raw=m.raw,
                                   served=served) for i, m in enumerate(msgs)]
    producer = EventProducer(loop.s.streams())
    try:
        items = [(e.message_id, encode(e)) for e in events]
        producer.send_many(loop.topics.feedback, items[:150])
        wait_until(lambda: loop.stack.counters().get("events", 0) > base["events"], 60, "the worker mid-stream", 0.02)
        loop.stack.worker.stop(signal.SIGKILL)
        producer.send_many(loop.topics.feedback, items[150:])
    finally:
        producer.close()
    loop.stack.worker.start()
    total = base["events"] + 300
    wait_until(lambda: loop.stack.counters().get("events", 0) >= total, 240, "every record after the restart", 0.5)
    c = loop.stack.counters()
    assert c["events"] == total and c["votes"] == base["votes"] + 300
    assert c.get("duplicates", 0) == base.get("duplicates", 0)
    with loop.stack.db() as db:
        labels = dict(db.execute("SELECT message_id, label FROM labels").fetchall())
    for e in events:  # every flag became exactly its label
        assert labels[e.message_id] == e.label
    wait_until(lambda: loop.stack.worker_up(), 120, "the restarted worker's metrics")
    loop.settle()
    now = loop.stack.counters()["data_version"]
    decided = [d for d in loop.stack.registry().decisions() if d.get("data_version") == now]
    assert decided, "the gate judged a refit on everything the restarted worker holds"
    assert loop.stack.registry().get(decided[-1]["challenger"]).lineage["counts"]["flags"] == {
        "spam": sum(v == "spam" for v in labels.values()), "ham": sum(v == "ham" for v in labels.values())}


def test_broker_restart_api_keeps_classifying_and_feedback_503_until_back(loop: Loop, kafka: Settings,
                                                                       integration_backend: Any) -> None:
    from services.local import broker
    from streams import admin

    if integration_backend.backend != "local":  # the test stops and starts the broker it runs on
        pytest.skip("stops and restarts the project's own broker: run it with FLYWHEEL_TEST_BACKEND=local")
    first, m = loop.take(2)
    before = loop.flag(first, HONEST[0])  # the worker is consuming (not merely started) before the broker goes
    wait_until(lambda: loop.applied(before), 120, "the worker to consume", 0.5)
    broker.stop(kafka.streams())
    try:
        wait_until(lambda: not admin.answers_metadata(loop.s.bootstrap_servers, 1.0), 30, "the broker to be down")
        for _ in range(3):
            assert loop.stack.classify(m.raw)["verdict"] in ("spam", "ham")
        t0 = time.monotonic()
        mid = loop.stack.classify(m.raw)["message_id"]
        r = loop.stack.flag("spam" if m.is_spam else "ham", HONEST[0], message_id=mid)
        assert r.status_code == 503, r.text
        assert time.monotonic() - t0 < 15
    finally:
        broker.start(kafka.streams())

    def accepted() -> Any:
        r = loop.stack.flag("spam" if m.is_spam else "ham", HONEST[0], message_id=mid)
        return r.json() if r.status_code == 202 else None

    flag = wait_until(accepted, 60, "/feedback to accept again", 1.0)
    # this very flag reaches the worker's store (an events counter read after the 202 could miss a fast worker)
    try:
        wait_until(lambda: loop.applied(flag), 120, "the worker to consume again", 0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; worker alive: {loop.stack.worker.alive()}; its log ends:\n"
                             f"{tail(loop.stack.worker.logfile, 40)}") from None
