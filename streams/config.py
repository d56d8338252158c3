"""What the event plumbing needs to know, as a small value of its own.

``streams`` imports nothing from ``services``: the services build a :class:`StreamsConfig` from their settings
(``Settings.streams()``) and hand it to the topics, the producer, the faust app and the local broker. Every field
is required, so the defaults live in one place (the services' settings), never here as a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["StreamsConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamsConfig:
    """Where Kafka is (or where to run the local broker), how topics are named, where local files go."""

    topic_prefix: str
    """Prefix of every topic name: ``<prefix>.feedback`` and so on; also names the worker's consumer group."""
    feedback_partitions: int
    kafka_bootstrap: str | None
    """An existing cluster (``host:port,...``); when set, the local broker is never fetched, started or stopped."""
    kafka_port: int
    kafka_controller_port: int
    kafka_version: str
    kafka_heap: str
    kafka_start_timeout_s: float
    session_timeout_s: float
    """The worker group's session: a member that stops heartbeating (``kill -9``) holds its partitions this long."""
    state_dir: Path
    """The local broker keeps its config, data, pidfile and log under ``<state_dir>/kafka``."""
    downloads: Path
    """The Kafka jars are fetched once into ``<downloads>/kafka-<version>/libs``."""

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def manages_kafka(self) -> bool:
        """False when an existing cluster was named: then nothing here starts or stops a broker."""
        return self.kafka_bootstrap is None

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"
