"""What the event plumbing needs to know, as a small value of its own.

``streams`` imports nothing from ``services``: the services build a :class:`StreamsConfig` from their settings
(``Settings.streams()``) and hand it to the topics, the producer, the faust app and the local broker. Every field
is required, so the defaults live in one place (the services' settings), never here as a second copy.

How every client reaches a secured cluster (TLS, SASL/SCRAM) is part of the same value: :meth:`kafka_python_auth`
gives the kafka-python producer, consumers and admin client their keyword arguments, :meth:`faust_credentials` the
faust worker's (aiokafka's) ``broker_credentials``, both from the same fields, so no client can be left on
PLAINTEXT by accident.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SASL_MECHANISMS", "SECURITY_PROTOCOLS", "StreamsConfig"]

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamsConfig:
    """Where Kafka is (or where to run the local broker), how topics are named, where local files go."""

    topic_prefix: str
    """Prefix of every topic name: ``<prefix>.feedback`` and so on; also names the worker's consumer group."""
    feedback_partitions: int
    feedback_retention_ms: int = -1
    """How long the feedback topic keeps flags (-1: for good, so a worker on an empty disk can rebuild from it)."""
    kafka_bootstrap: str | None
    """An existing cluster (``host:port,...``); when set, the local broker is never fetched, started or stopped."""
    kafka_port: int
    kafka_controller_port: int
    kafka_nodes: int = 1
    """Nodes of the local cluster: node i listens on ``kafka_port + i`` (controller ``kafka_controller_port + i``)."""
    kafka_version: str
    kafka_heap: str
    kafka_jvm_options: str = ""
    """More JVM options of the local broker, split like a shell's words."""
    kafka_start_timeout_s: float
    session_timeout_s: float
    """The worker group's session: a member that stops heartbeating (``kill -9``) holds its partitions this long."""
    state_dir: Path
    """The local broker keeps its config, data, pidfile and log under ``<state_dir>/kafka``."""
    downloads: Path
    """The Kafka jars are fetched once into ``<downloads>/kafka-<version>/libs``."""
    security_protocol: str
    """How every client talks to the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)."""
    sasl_mechanism: str
    """SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN; used with the SASL protocols only."""
    sasl_username: str | None
    sasl_password: str | None = field(repr=False)
    """Never in a repr, so never in a log line that prints the config."""
    ssl_cafile: Path | None
    """PEM file of the CA that signed the brokers' certificates (TLS protocols); None: the system's trust store."""
    broker_ssl_certfile: Path | None
    """The local broker's certificate chain (PEM), when it runs SSL or SASL_SSL; clients never read it."""
    broker_ssl_keyfile: Path | None
    """Its private key (PEM, PKCS#8)."""

    def __post_init__(self) -> None:
        """Refuse a combination no client could use, naming it (the services' settings check the same earlier)."""
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"Kafka security protocol {self.security_protocol!r}: expected one of {SECURITY_PROTOCOLS}")
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(f"SASL mechanism {self.sasl_mechanism!r}: expected one of {SASL_MECHANISMS}")
        if self.uses_sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"Kafka security protocol {self.security_protocol} needs a SASL username and password")

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap or ",".join(f"127.0.0.1:{self.kafka_port + i}" for i in range(self.kafka_nodes))

    @property
    def replication_factor(self) -> int:
        """Replicas of each topic created here: every node of the local cluster; an existing cluster's default."""
        return self.kafka_nodes if self.manages_kafka else -1

    @property
    def manages_kafka(self) -> bool:
        """False when an existing cluster was named: then nothing here starts or stops a broker."""
        return self.kafka_bootstrap is None

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    # --- security: one source for every client ---------------------------------------------------------
    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def kafka_python_auth(self) -> dict[str, Any]:
        """Keyword arguments that put a kafka-python client (producer, consumer, admin) on this security protocol."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.uses_tls:
            kwargs["ssl_check_hostname"] = True
            if self.ssl_cafile is not None:
                kwargs["ssl_cafile"] = str(self.ssl_cafile)
        if self.uses_sasl:
            # kafka-python takes SCRAM's credentials through its sasl_plain_* arguments too
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        return kwargs

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the aiokafka clients under faust (hostname checked, this CA or the system's)."""
        if not self.uses_tls:
            return None
        return ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile is not None else None)

    def faust_credentials(self) -> Any:
        """faust's ``broker_credentials`` for this protocol (None for PLAINTEXT): aiokafka then authenticates the
        worker's consumer, producer and admin client alike."""
        if self.security_protocol == "PLAINTEXT":
            return None
        from faust.auth import SASLCredentials, SSLCredentials

        if self.uses_sasl:
            return SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                   mechanism=self.sasl_mechanism, ssl_context=self.ssl_context())
        return SSLCredentials(self.ssl_context())
