"""Kafka administration for any cluster, the project's local broker or someone else's: whether a broker answers
(:func:`answers_metadata`), and the topics the stack needs created, grown and led (:func:`ensure_topics`).
Everything goes through kafka-python's admin client on the configured security protocol (TLS, SASL)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from streams.config import StreamsConfig

log = structlog.get_logger(__name__)

__all__ = ["BrokerError", "answers_metadata", "brokers_answering", "ensure_topics", "topic_partitions"]


class BrokerError(RuntimeError):
    """The broker could not be fetched, started, reached or stopped; the message is meant for the operator."""

    user_facing = True



# ------------------------------------------------------------------------------------------------- probing
def _admin(target: StreamsConfig | str, timeout_s: float) -> Any:
    """A kafka-python admin client; on a config's security protocol (TLS, SASL) when given a config."""
    from kafka import KafkaAdminClient

    bootstrap, auth = (target, {}) if isinstance(target, str) else (target.bootstrap_servers, target.kafka_python_auth())
    ms = max(200, int(timeout_s * 1000))
    return KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","),
        client_id="flywheel-admin",
        **auth,
        request_timeout_ms=ms,
        bootstrap_timeout_ms=ms,
        reconnect_backoff_ms=100,
        reconnect_backoff_max_ms=500,
    )


@contextlib.contextmanager
def _quiet_client_logs() -> Iterator[None]:
    """Mute kafka-python while probing: every refused connection of a broker still starting is logged as an
    error, which buries the one line that matters (ready, or the broker's own log tail)."""
    logger = logging.getLogger("kafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def answers_metadata(target: StreamsConfig | str, timeout_s: float = 2.0) -> bool:
    """True when a broker answers a metadata request within ``timeout_s``: at a config's bootstrap servers and on
    its security protocol (a broker that refuses our credentials does not answer), or at a PLAINTEXT address."""
    return brokers_answering(target, timeout_s) > 0


def brokers_answering(target: StreamsConfig | str, timeout_s: float = 2.0) -> int:
    """How many brokers the cluster's metadata lists (0: none answered within ``timeout_s``)."""
    from kafka.errors import KafkaError

    with _quiet_client_logs():
        try:
            admin = _admin(target, timeout_s)
        except (KafkaError, OSError, ValueError):
            return 0
        try:
            return len(admin.describe_cluster().get("brokers") or ())
        except (KafkaError, OSError, ValueError):
            return 0
        finally:
            with contextlib.suppress(Exception):
                admin.close()


# ------------------------------------------------------------------------------------------------- topics
def ensure_topics(config: StreamsConfig, specs: Iterable[tuple[str, int]], timeout_s: float = 30.0) -> None:
    """Create missing topics with their partition counts and grow ones with too few; idempotent.

    Returns once every topic has a leader for each partition, so producers can send right away. A cluster that
    has just started may answer with a node its client does not know yet (``UnknownBrokerIdError``: the brokers'
    registrations still spreading): such errors are retried with a new client until ``timeout_s``.
    """
    from kafka.errors import BrokerNotAvailableError, KafkaError, UnknownBrokerIdError

    wanted = {name: max(1, int(n)) for name, n in specs}
    if not wanted:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = _admin(config, timeout_s)
        except (KafkaError, OSError) as exc:
            raise BrokerError(f"Kafka at {config.bootstrap_servers} is not reachable to create topics: {exc}") from exc
        try:
            _ensure_with(admin, config, wanted, max(1.0, deadline - time.monotonic()))
            return
        except (UnknownBrokerIdError, BrokerNotAvailableError) as exc:
            if time.monotonic() >= deadline:
                raise BrokerError(f"managing topics on {config.bootstrap_servers} failed: {exc}") from exc
            log.info("cluster not settled yet; topics retried", error=repr(exc))
            time.sleep(0.5)
        except KafkaError as exc:
            raise BrokerError(f"managing topics on {config.bootstrap_servers} failed: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                admin.close()


def _ensure_with(admin: Any, config: StreamsConfig, wanted: dict[str, int], timeout_s: float) -> None:
    rf = config.replication_factor  # every node of the local cluster; someone else's cluster: its default (-1)
    existing = {t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics()}
    missing = {n: p for n, p in wanted.items() if n not in existing}
    if missing:
        from streams.topics import topic_configs

        configs = topic_configs(config)
        result = admin.create_topics(
            {n: {"num_partitions": p, "replication_factor": rf, **({"configs": configs[n]} if n in configs else {})}
             for n, p in missing.items()},
            timeout_ms=int(timeout_s * 1000),
            raise_errors=False,
            wait_for_metadata=True,
        )
        for t in result.get("topics", []):
            code = t.get("error_code", 0)
            if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a concurrent creator won)
                raise BrokerError(f"creating topic {t.get('name')} failed: {t.get('error_message') or code}")
        log.info("topics created", topics=missing)
    grow = {n: p for n, p in wanted.items() if n in existing and existing[n] < p}
    if grow:
        admin.create_partitions(grow, timeout_ms=int(timeout_s * 1000))
        log.info("topics grown", topics=grow)
    for n, p in wanted.items():
        if n in existing and existing[n] > p:
            log.warning("topic has more partitions than configured", topic=n, has=existing[n], wanted=p)
    _wait_topics_ready(admin, wanted, timeout_s)


def _wait_topics_ready(admin: Any, wanted: dict[str, int], timeout_s: float) -> None:
    def ready() -> bool:
        topics = {t["name"]: t for t in admin.describe_topics(list(wanted))}
        for name, n in wanted.items():
            t = topics.get(name)
            if t is None or t.get("error_code", 0) != 0:
                return False
            parts = t.get("partitions") or []
            if len(parts) < n or any(p.get("leader_id", p.get("leader", -1)) in (-1, None) for p in parts):
                return False
        return True

    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() >= deadline:
            raise BrokerError(f"topics {sorted(wanted)} did not get partition leaders within {timeout_s:.0f}s")
        time.sleep(0.2)


def _partitions(config: StreamsConfig, names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """The described partitions of each named topic that exists."""
    with contextlib.closing(_admin(config, 10.0)) as admin:
        return {t["name"]: t.get("partitions") or [] for t in admin.describe_topics(list(names))
                if t.get("error_code", 0) == 0}


def topic_partitions(config: StreamsConfig, names: Iterable[str]) -> dict[str, int]:
    """Partition count of each named topic that exists (for status pages and tests)."""
    return {name: len(parts) for name, parts in _partitions(config, names).items()}


def topic_replicas(config: StreamsConfig, names: Iterable[str]) -> dict[str, int]:
    """The fewest replicas of any partition of each named topic that exists (three on a three-node cluster)."""
    return {name: min((len(p["replica_nodes"]) for p in parts), default=0)
            for name, parts in _partitions(config, names).items()}
