"""Topic names, their partition counts, the one producer every Flywheel process uses, and a consumer without a
group for the processes that read topics by hand.

Retractions travel on the feedback topic, keyed like the flag they withdraw (by message id): Kafka orders
records only within a partition, so a separate retractions topic could deliver a retraction before its flag
(the worker would drop it as unknown and the label would survive). On one topic and one key the flag always
comes first, and one consumer sees every vote on a message in order.

``EventProducer`` never hangs its caller: construction does no I/O (the API starts while Kafka is down), every
wait is bounded, and a broker that can't be reached in time surfaces as :class:`BrokerUnavailable` (the API
answers 503). The producer is idempotent with ``acks="all"``: its retries can't duplicate a record.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from streams.events import encode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from kafka import KafkaConsumer, KafkaProducer

    from streams.config import StreamsConfig
    from streams.events import _Event

log = structlog.get_logger(__name__)


class BrokerUnavailable(RuntimeError):
    """Kafka could not be reached (or did not acknowledge) within the producer's deadline."""


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic name for one ``config.topic_prefix``."""

    feedback: str
    retractions: str  # the same topic as feedback, on purpose (ordering per message id)
    model_events: str
    rule_changes: str
    dead_letter: str
    campaigns: str  # compacted: the fingerprints of trusted labels (streams.campaign)
    models: str  # compacted: published model versions and the champion (streams.models)
    journal: str  # the worker's order of application (streams.journal)

    @classmethod
    def from_config(cls, config: StreamsConfig) -> Topics:
        feedback = config.topic("feedback")
        return cls(
            feedback=feedback,
            retractions=feedback,
            model_events=config.topic("model-events"),
            rule_changes=config.topic("rule-changes"),
            dead_letter=config.topic("dead-letter"),
            campaigns=config.topic("campaigns"),
            models=config.topic("models"),
            journal=config.topic("worker-journal"),
        )


def topic_specs(config: StreamsConfig) -> list[tuple[str, int]]:
    """(name, partitions) of every topic to create before producers or the worker start.

    Model events and rule changes have one partition so every consumer sees one total order of decisions; so
    have the campaign and models topics, which every API replica reads whole, and the worker's journal.
    """
    t = Topics.from_config(config)
    return [
        (t.feedback, max(1, config.feedback_partitions)),
        (t.model_events, 1),
        (t.rule_changes, 1),
        (t.dead_letter, 1),
        (t.campaigns, 1),
        (t.models, 1),
        (t.journal, 1),
    ]


def topic_configs(config: StreamsConfig) -> dict[str, dict[str, str]]:
    """Topic-level settings a topic is created with (the others take the broker's defaults)."""
    from streams.campaign import CAMPAIGN_TOPIC_CONFIG
    from streams.journal import JOURNAL_TOPIC_CONFIG
    from streams.models import MODELS_TOPIC_CONFIG

    t = Topics.from_config(config)
    return {t.campaigns: dict(CAMPAIGN_TOPIC_CONFIG), t.models: dict(MODELS_TOPIC_CONFIG),
            t.journal: dict(JOURNAL_TOPIC_CONFIG), t.feedback: {"retention.ms": str(config.feedback_retention_ms)}}


def plain_consumer(config: StreamsConfig, client_id: str, **extra: Any) -> KafkaConsumer:
    """A kafka-python consumer without a group (partitions assigned by hand, nothing committed) on the config's
    brokers and security protocol: for a process that reads a topic whole or by offset, whatever others read."""
    from kafka import KafkaConsumer

    return KafkaConsumer(bootstrap_servers=config.bootstrap_servers.split(","), **config.kafka_python_auth(),
                         group_id=None, enable_auto_commit=False, client_id=client_id, **extra)


class EventProducer:
    """Blocking, bounded, idempotent producer of Flywheel events (thread-safe; share one per process).

    The Kafka client is created on first use and re-created after a failure, so a process started while the
    broker is down recovers by itself once it is back.
    """

    def __init__(
        self,
        config: StreamsConfig,
        *,
        timeout_s: float = 3.0,
        client_id: str = "flywheel",
        retry_after_failure_s: float = 0.5,
    ) -> None:
        self._bootstrap = config.bootstrap_servers
        self._auth = config.kafka_python_auth()  # TLS / SASL, as every client of this config
        self._timeout_s = timeout_s
        self._client_id = client_id
        self._retry_after_failure_s = retry_after_failure_s
        self._lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._failed_at: float = 0.0
        self._closed = False

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def _client(self) -> KafkaProducer:
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("producer closed")
            if self._producer is not None:
                return self._producer
            # A connection attempt costs up to the whole deadline; after a failure, answer fast for a moment
            # instead of making every caller wait for the same dead broker.
            if time.monotonic() - self._failed_at < self._retry_after_failure_s:
                raise BrokerUnavailable("Kafka unreachable (recent failure)")
            from kafka import KafkaProducer
            from kafka.errors import KafkaError

            ms = max(500, int(self._timeout_s * 1000))
            try:
                self._producer = KafkaProducer(
                    bootstrap_servers=self._bootstrap.split(","),
                    client_id=self._client_id,
                    **self._auth,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=0,
                    max_in_flight_requests_per_connection=5,
                    max_block_ms=ms,
                    request_timeout_ms=ms,
                    delivery_timeout_ms=ms + 500,
                    bootstrap_timeout_ms=ms,
                    retry_backoff_ms=100,
                    reconnect_backoff_ms=100,
                    reconnect_backoff_max_ms=1000,
                    max_request_size=2 * 1024 * 1024,
                )
            except (KafkaError, OSError, ValueError) as exc:
                self._failed_at = time.monotonic()
                log.warning("kafka producer unavailable", bootstrap=self._bootstrap, error=str(exc))
                raise BrokerUnavailable(f"Kafka unreachable at {self._bootstrap}: {exc}") from exc
            return self._producer

    def _reset(self, producer: KafkaProducer) -> None:
        """Drop a client whose send failed: an idempotent producer that timed out must restart its sequence."""
        with self._lock:
            if self._producer is producer:
                self._producer = None
                self._failed_at = time.monotonic()
        try:
            producer.close(timeout=0)
        except Exception:  # closing a broken client must not mask the original error
            log.debug("closing failed kafka producer raised", exc_info=True)

    def send_bytes(self, topic: str, key: str | bytes | None, value: bytes) -> tuple[int, int]:
        """Send one record and wait for the broker's acknowledgement; returns (partition, offset)."""
        from kafka.errors import KafkaError

        producer = self._client()
        k = key.encode("utf-8") if isinstance(key, str) else key
        try:
            future = producer.send(topic, value=value, key=k)
            meta = future.get(timeout=self._timeout_s + 1.0)
        except (KafkaError, OSError) as exc:
            self._reset(producer)
            raise BrokerUnavailable(f"Kafka did not acknowledge within {self._timeout_s:.1f}s: {exc}") from exc
        return int(meta.partition), int(meta.offset)

    def send(self, topic: str, key: str | bytes | None, event: _Event) -> tuple[int, int]:
        """Encode ``event`` and send it (see :meth:`send_bytes`)."""
        return self.send_bytes(topic, key, encode(event))

    def send_many(self, topic: str, items: Sequence[tuple[str | bytes | None, bytes | None]]) -> list[tuple[int, int]]:
        """Send a batch pipelined (one wait for all); for replay, benchmarks and the campaign topic (a None value
        is a tombstone: compaction then removes the key)."""
        from kafka.errors import KafkaError

        producer = self._client()
        try:
            futures = [
                producer.send(topic, value=v, key=k.encode("utf-8") if isinstance(k, str) else k)
                for k, v in items
            ]
            producer.flush(timeout=max(self._timeout_s, 0.002 * len(items) + self._timeout_s))
            metas = [f.get(timeout=self._timeout_s) for f in futures]
        except (KafkaError, OSError) as exc:
            self._reset(producer)
            raise BrokerUnavailable(f"Kafka did not acknowledge the batch: {exc}") from exc
        return [(int(m.partition), int(m.offset)) for m in metas]

    def close(self, timeout_s: float = 2.0) -> None:
        with self._lock:
            producer, self._producer, self._closed = self._producer, None, True
        if producer is not None:
            try:
                producer.close(timeout=timeout_s)
            except Exception:
                log.debug("closing kafka producer raised", exc_info=True)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "BrokerUnavailable",
    "EventProducer",
    "Topics",
    "plain_consumer",
    "topic_configs",
    "topic_specs",
]
