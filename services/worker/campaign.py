"""The worker's side of campaign memory: publish the fingerprint of every label the consensus trusts.

Why the worker and not the API at flag time: a fingerprint blocks mail for every user at once, so it must carry
the same trust a label needs before the model learns it. Only the worker knows that (reporters' reputations,
the consensus margin, what the base model is sure of: ``models.consensus.trusted``). A flag from an unproven or
hostile reporter on a newsletter the base model does not call spam is not trusted, so it publishes nothing;
a proven reporter's flag is trusted at once and its fingerprint reaches every API replica within a second or two
(one pass of this thread, one Kafka round trip, one poll of each replica's follower).

Each pass (every ``PASS_S`` while labels change, or four times as long as the last pass took, whichever is
longer; at least every ``FULL_PASS_S`` for reputations that moved)
compares the trusted labels with what was published: new or relabelled messages get a record, labels that were
withdrawn (a retraction, a reporter shown hostile) get a tombstone. The published state is read back from the
compacted topic at start, so a restart neither republishes everything nor forgets to withdraw.

A ham fingerprint needs more: its reporters' reliability must reach ``RELIABLE`` even where the base model is sure
the message is ham. Otherwise a spammer could flag one copy of a campaign the model misses (the model is sure it
is ham: that is why it misses it) as "not spam" from a fresh identity, and the ham fingerprint would then
overrule every trusted spam flag on the campaign's later copies.

False positives: a trusted ham label on a message that matches a spam fingerprint published before it is a
campaign hit the users disagreed with; it is counted (``flywheel_campaign_false_positives_total``) and its ham
fingerprint, published as usual, protects the rest of that list's mail from then on.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Literal

import numpy as np
import structlog
from prometheus_client import Counter, Gauge

from models.campaign import CampaignIndex, fingerprint
from models.consensus import RELIABLE, trusted

if TYPE_CHECKING:
    from services.settings import Settings
    from services.worker.learner import Learner
    from services.worker.metrics import WorkerMetrics
    from services.worker.store import LabelStore
    from streams.topics import EventProducer

log = structlog.get_logger(__name__)

__all__ = ["FULL_PASS_S", "PASS_S", "CampaignPublisher"]

PASS_S = 0.25
"""How often the thread looks for changed labels (a pass with nothing changed costs one small query)."""
FULL_PASS_S = 5.0
"""A pass runs at least this often anyway: reputations move without new labels, and with them what is trusted."""


class CampaignPublisher:
    """Keeps the campaign topic equal to the fingerprints of the trusted labels (see the module docstring)."""

    def __init__(self, settings: Settings, store: LabelStore, learner: Learner, producer: EventProducer,
                 metrics: WorkerMetrics) -> None:
        from streams.topics import Topics

        self.settings = settings
        self.store = store
        self.learner = learner
        self.producer = producer
        self.topic = Topics.from_config(settings.streams()).campaigns
        self.index = CampaignIndex(settings.campaign_capacity, settings.campaign_threshold)
        self.published: dict[str, str] = {}  # message id -> label on the topic now
        self._sigs: dict[str, np.ndarray | None] = {}
        self._seen_version = -1
        self._full_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        r = metrics.registry
        self.records = Counter("flywheel_campaign_published_total",
                               "Campaign fingerprints published (spam, ham) and withdrawn.", ["kind"], registry=r)
        self.false_positives = Counter(
            "flywheel_campaign_false_positives_total",
            "Trusted ham labels on messages that matched a spam fingerprint published before them.", registry=r)
        self.size = Gauge("flywheel_campaign_topic_fingerprints", "Fingerprints on the campaign topic now.", ["flagged"],
                          registry=r)
        for kind in ("spam", "ham", "withdrawn"):
            self.records.labels(kind=kind).inc(0)

    # -- the state on the topic ------------------------------------------------------------------------
    def load_published(self, timeout_s: float = 10.0) -> None:
        """Read the compacted topic to its end: what earlier runs published (best effort, bounded)."""
        from kafka import TopicPartition

        from streams.campaign import decode_campaign
        from streams.events import EventInvalid
        from streams.topics import plain_consumer

        consumer = plain_consumer(self.settings.streams(), "flywheel-worker-campaigns", request_timeout_ms=5000)
        try:
            parts = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or ()]
            if not parts:
                return
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            end = consumer.end_offsets(parts)
            deadline = time.monotonic() + timeout_s
            while any(consumer.position(tp) < end[tp] for tp in parts) and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=200).values():
                    for rec in records:
                        mid = rec.key.decode("utf-8", "replace") if rec.key else None
                        if mid is None:
                            continue
                        if rec.value is None:
                            self.published.pop(mid, None)
                            self.index.remove(mid)
                            continue
                        try:
                            cr = decode_campaign(rec.value)
                        except EventInvalid:
                            continue
                        self.published[mid] = cr.label
                        self.index.add(mid, cr.values(), cr.label)
        finally:
            consumer.close()
        log.info("campaign fingerprints on the topic", published=len(self.published))

    # -- one pass --------------------------------------------------------------------------------------
    def _signature(self, message_id: str, raw: bytes) -> np.ndarray | None:
        if message_id not in self._sigs:
            from models.message import parse

            msg = parse(raw, max_bytes=self.settings.analyse_bytes)
            self._sigs[message_id] = fingerprint(msg.subject, msg.body_text)
        return self._sigs[message_id]

    def sync(self, force: bool = False) -> int:
        """One pass: publish what became trusted, withdraw what no longer is. Returns the records sent."""
        from streams.campaign import CampaignRecord

        version = self.store.data_version
        now = time.monotonic()
        if not force and version == self._seen_version and now - self._full_at < FULL_PASS_S:
            return 0
        if not force and self.learner.backlog is not None and self.learner.backlog.defer("campaign"):
            return 0
        labelled = self.store.labelled()
        probs = self.learner.base_probability([(lb.message_id, lb.raw) for lb in labelled])
        want: dict[str, tuple[Literal["spam", "ham"], float, bytes]] = {}
        for lb, p in zip(labelled, probs, strict=True):
            if lb.label == "ham" and lb.reliability < RELIABLE:
                continue  # "not spam" protects a campaign only from proven reporters (see the module docstring)
            if lb.label in ("spam", "ham") and trusted(lb.label, p, lb.reliability):
                want[lb.message_id] = ("spam" if lb.label == "spam" else "ham", lb.reliability, lb.raw)
        items: list[tuple[str | bytes | None, bytes | None]] = []
        changes: list[tuple[str, str | None, np.ndarray | None]] = []
        for mid, (label, rel, raw) in want.items():
            if self.published.get(mid) == label:
                continue
            sig = self._signature(mid, raw)
            if sig is None:
                continue  # too short to fingerprint
            if label == "ham":
                hit = self.index.query(sig)
                if hit is not None and hit.flagged == "spam":
                    self.false_positives.inc()
                    log.warning("campaign false positive", message_id=mid, spam_fingerprint=hit.message_id,
                                similarity=round(hit.similarity, 3))
            items.append((mid, CampaignRecord.create(mid, label, sig, rel).encode()))
            changes.append((mid, label, sig))
        for mid in [m for m in self.published if m not in want]:
            items.append((mid, None))
            changes.append((mid, None, None))
        if items:
            self._send(items)
            for mid, new_label, sig in changes:
                if new_label is None or sig is None:
                    self.published.pop(mid, None)
                    self.index.remove(mid)
                    self.records.labels(kind="withdrawn").inc()
                else:
                    self.published[mid] = new_label
                    self.index.add(mid, sig, new_label)
                    self.records.labels(kind=new_label).inc()
            spam = sum(1 for v in self.published.values() if v == "spam")
            self.size.labels(flagged="spam").set(spam)
            self.size.labels(flagged="ham").set(len(self.published) - spam)
            log.info("campaign fingerprints published", records=len(items), published=len(self.published))
        self._seen_version, self._full_at = version, now
        return len(items)

    def _send(self, items: list[tuple[str | bytes | None, bytes | None]]) -> None:
        """Tombstones (None values) and records, pipelined; ``BrokerUnavailable`` propagates (the pass retries)."""
        for start in range(0, len(items), 1000):
            self.producer.send_many(self.topic, items[start:start + 1000])

    # -- the thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        def loop() -> None:
            try:
                self.load_published()
            except Exception as exc:  # noqa: BLE001 - the topic is read again on the next start
                log.warning("campaign topic not read back; publishing from scratch", error=str(exc))
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self.sync()
                except Exception:  # Kafka down or the store busy: the next pass retries the same diff
                    log.warning("campaign pass failed", exc_info=True)
                    self._stop.wait(2.0)
                # A pass reads every label: on a large store it takes a while, and the thread then spends at most
                # a fifth of its time on passes (the delay to publish grows with the store, the cost does not).
                self._stop.wait(max(PASS_S, 4.0 * (time.monotonic() - started)))

        self._thread = threading.Thread(target=loop, name="campaign-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
