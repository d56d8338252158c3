"""What an API replica follows on Kafka as whole tables: the campaign topic, and the models topic
(``streams.models``) followed into the replica's own registry.

With ``model_source = "kafka"`` a replica needs no directory shared with the worker: on start it reads the
compacted topic from its beginning into its local registry (every published version whole, then the champion),
and afterwards follows it, so a promotion or a rollback the worker publishes reaches it within a poll. The
registry checks each version's hashes and self-check when the replica loads it (``Registry.load``), exactly as
for a version on a shared disk: a record that was tampered with or truncated is refused there, and the replica
keeps serving the champion it has.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from services.api import metrics

if TYPE_CHECKING:
    from kafka import KafkaConsumer

    from models.registry import Registry
    from services.settings import Settings
    from streams.models import Received

log = structlog.get_logger(__name__)

__all__ = ["ModelFollower", "TopicFollower", "follower_consumer"]


def follower_consumer(settings: Settings, name: str, **extra: Any) -> KafkaConsumer:
    """A consumer without a group (partitions assigned by hand) on the configured brokers and security: each
    replica follows the topics on its own, whatever the others read."""
    from streams.topics import plain_consumer

    return plain_consumer(settings.streams(), f"flywheel-api-{name}-{os.getpid()}", request_timeout_ms=5000,
                          reconnect_backoff_max_ms=2000, **extra)


class TopicFollower:
    """Follows a compacted, single-partition topic from its beginning, as a table every replica holds whole (the
    models topic, the campaign topic): each record goes to ``apply``; ``after_batch`` runs after each poll that
    brought records. It reconnects with back-off when Kafka goes away and goes on where it stopped."""

    def __init__(self, settings: Settings, topic: str, name: str, apply: Callable[[bytes | None, bytes | None], None],
                 after_batch: Callable[[], None] = lambda: None, **consumer: Any) -> None:
        self.settings = settings
        self.topic = topic
        self.name = name
        self.apply = apply
        self.after_batch = after_batch
        self.consumer_settings = consumer
        self.position = -1  # the offset applied last

    def _consumer(self) -> KafkaConsumer:
        return follower_consumer(self.settings, self.name, fetch_max_wait_ms=100, **self.consumer_settings)

    def _assign(self, consumer: KafkaConsumer) -> Any:
        from kafka import TopicPartition

        parts = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or ()]
        if not parts:
            raise RuntimeError(f"the topic {self.topic} does not exist yet")
        consumer.assign(parts)
        for tp in parts:  # after a reconnect, go on where this replica stopped
            if self.position >= 0:
                consumer.seek(tp, self.position + 1)
            else:
                consumer.seek_to_beginning(tp)
        return parts

    def _poll(self, consumer: KafkaConsumer) -> None:
        batches = consumer.poll(timeout_ms=200)
        for records in batches.values():
            for rec in records:
                self.apply(rec.key, rec.value)
                self.position = int(rec.offset)
        if batches:
            self.after_batch()

    def catch_up(self, timeout_s: float, done: Callable[[], bool] = lambda: True) -> None:
        """Read the topic to its current end, and on until ``done()`` holds, for at most ``timeout_s`` (best
        effort: Kafka unreachable is logged, and the caller checks what it needed)."""
        consumer = None
        deadline = time.monotonic() + timeout_s
        try:
            consumer = self._consumer()
            parts = self._assign(consumer)
            end = consumer.end_offsets(parts)
            while time.monotonic() < deadline:
                if not any(consumer.position(tp) < end[tp] for tp in parts) and done():
                    break
                self._poll(consumer)
        except Exception as exc:  # noqa: BLE001 - Kafka unreachable or no topic yet: the caller says what is missing
            log.warning("topic not read", topic=self.topic, error=str(exc))
        finally:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    consumer.close()

    def run(self, stop: threading.Event) -> None:
        """Follow the topic until ``stop``."""
        backoff = 0.5
        while not stop.is_set():
            consumer = None
            try:
                consumer = self._consumer()
                self._assign(consumer)
                log.info("following", topic=self.topic, from_offset=self.position + 1)
                backoff = 0.5
                while not stop.is_set():
                    self._poll(consumer)
            except Exception as exc:  # noqa: BLE001 - Kafka down: keep what was applied, retry later
                log.debug("follower retrying", topic=self.topic, error=str(exc))
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close()


class ModelFollower:
    """Applies the models topic to ``registry`` (see the module docstring); ``on_champion`` is called after the
    champion pointer changed (the API wakes its reloader)."""

    def __init__(self, settings: Settings, registry: Registry, on_champion: Callable[[], None] = lambda: None) -> None:
        from streams.models import ModelAssembler
        from streams.topics import Topics

        self.registry = registry
        self.keep = settings.registry_keep
        self.on_champion = on_champion
        self.assembler = ModelAssembler()
        self.waiting: str | None = None  # a champion named before its version arrived whole
        self.follower = TopicFollower(settings, Topics.from_config(settings.streams()).models, "models", self.apply,
                                      max_partition_fetch_bytes=4 * 1024 * 1024)

    def catch_up(self, timeout_s: float) -> bool:
        """Read the topic to its current end, and on until a champion is installed (a worker that has not
        published yet), for at most ``timeout_s``; True when the registry then has a champion."""
        self.follower.catch_up(timeout_s, lambda: self.registry.champion() is not None)
        return self.registry.champion() is not None

    def run(self, stop: threading.Event) -> None:
        self.follower.run(stop)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One record of the models topic."""
        got = self.assembler.feed(key, value)
        if got is None:
            if key is not None and not key.startswith(b"file/"):  # a manifest or pointer refused (not a chunk)
                metrics.MODEL_RECORDS.labels("refused").inc()
            return
        self._received(got)

    def _received(self, got: Received) -> None:
        from models.registry import ChampionChanged, RegistryError

        if got.champion is not None:
            self.waiting = got.champion.version
        elif got.files is not None:
            try:
                if self.registry.install(got.version, got.files):
                    metrics.MODEL_RECORDS.labels("version").inc()
                    self.registry.prune(self.keep)  # this replica's copy stays as bounded as the worker's
            except (RegistryError, OSError) as exc:
                metrics.MODEL_RECORDS.labels("refused").inc()
                log.error("model version not installed", version=got.version, error=str(exc))
                return
        else:  # withdrawn by the worker (its registry pruned it): this copy goes too, unless it serves
            with contextlib.suppress(RegistryError, OSError):
                self.registry.delete(got.version, keep_rollback_targets=False)
            return
        wanted = self.waiting
        if wanted is None or not (self.registry.versions_dir / wanted).is_dir():
            return
        current = self.registry.champion()
        self.waiting = None
        if wanted == current:
            return
        with contextlib.suppress(ChampionChanged):  # another process of this replica applied it first
            reason = got.champion.reason if got.champion is not None else "published on the models topic"
            self.registry.promote(wanted, f"from the models topic: {reason}"[:2000], expected=current)
            metrics.MODEL_RECORDS.labels("champion").inc()
            log.info("champion from the models topic", version=wanted, previous=current)
        self.on_champion()
