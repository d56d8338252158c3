"""The one settings object every Flywheel process reads.

Every field maps to an environment variable ``FLYWHEEL_<FIELD>`` (e.g. ``FLYWHEEL_STATE_DIR``); a ``.env``
file in the working directory is read too. Derived paths live under ``state_dir`` unless set on their own, so
one setting moves everything (tests point it at a temporary directory and keep the downloads cache).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, computed_field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.config import StreamsConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(RuntimeError):
    """A setting that cannot be used as given; the message names it (shown as one line by the CLI)."""

    user_facing = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    # --- where things live -------------------------------------------------------------------------
    state_dir: Path = Field(REPO_ROOT / "var", description="Broker data, Prometheus data, registry, logs.")
    downloads_dir: Path | None = Field(
        None, description="Kafka jars and the corpus (default: <state_dir>/downloads); shared by test runs."
    )
    registry_dir: Path | None = Field(
        None, description="Model registry (default: <state_dir>/registry); point replicas at one shared path."
    )
    rules_path: Path | None = Field(
        None, description="Active rule set, persisted (default: <state_dir>/rules.yaml, seeded from the defaults)."
    )
    corpus_dir: Path | None = Field(
        None, description="A SpamAssassin corpus in its public layout to use instead of the npm download."
    )

    # --- Kafka ---------------------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        None, description="Use an existing Kafka (host:port,...); when set, Flywheel starts no broker."
    )
    kafka_port: int = Field(9092, description="Port of the local broker Flywheel starts.")
    kafka_controller_port: int = Field(9093, description="KRaft controller port of the local broker.")
    kafka_nodes: int = Field(
        1, ge=1, le=3, description="Nodes of the local KRaft cluster: 3 replicates every topic three times (min.insync.replicas "
        "2), node i listening on kafka_port + i and kafka_controller_port + i.")
    kafka_version: str = Field("4.1.1", description="org.apache.kafka:kafka_2.13 version from Maven Central.")
    kafka_heap: str = Field("512m", description="-Xmx of the local broker.")
    kafka_jvm_options: str = Field(
        "", description="More JVM options of the local broker (and its storage tool), split like a shell's words."
        " '-XX:TieredStopAtLevel=1' (C1 compilation only, what the test run uses) starts a broker on about half the"
        " CPU: 9-10 s to 5.3-5.5 s to start and take 2,000 records, measured on 2 cores.")
    kafka_start_timeout_s: float = Field(
        60.0, description="Deadline for the broker to answer metadata: the local broker's start, and a worker"
        " started while Kafka is down waits this long before it exits."
    )
    feedback_partitions: int = Field(4, description="Partitions of the feedback topic.")
    feedback_retention_ms: int = Field(
        -1, ge=-1, description="Retention of the feedback topic when Flywheel creates it (-1: kept for good). The "
        "topic is the source of truth: a worker on an empty disk rebuilds its labels and reputations from it and "
        "the worker's journal, so a finite retention (for privacy: flags may carry mail) gives that up.")
    kafka_session_timeout_s: float = Field(
        10.0, ge=6.0, le=300.0,
        description="The worker's consumer-group session: how long a crashed worker still holds its partitions "
                    "before a restarted one takes them over (the broker's minimum is 6 s).")
    topic_prefix: str = Field("flywheel", description="Prefix of every topic name (tests use their own).")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How every Kafka client (API, worker, CLI) talks to the brokers: TLS (SSL), SASL, "
        "both (SASL_SSL). The local broker speaks each: SASL with the SCRAM user below, TLS with kafka_ssl_certfile."
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism of the SASL protocols (the local broker supports the SCRAM ones)."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user of every Kafka client (SASL protocols).")
    kafka_sasl_password: SecretStr | None = Field(None, description="That user's password (SASL protocols).")
    kafka_ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA that signed the brokers' certificates (TLS protocols; default: the "
        "system's trust store)."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="The local broker's certificate chain (PEM) for SSL or SASL_SSL; its names must include "
        "127.0.0.1. Only the broker Flywheel runs reads it."
    )
    kafka_ssl_keyfile: Path | None = Field(
        None, description="The private key (PEM, PKCS#8, unencrypted) of kafka_ssl_certfile; readable by its owner only."
    )

    # --- Prometheus ----------------------------------------------------------------------------------
    prometheus_port: int = Field(9090, description="Port of the local Prometheus.")
    prometheus_bin: str = Field("prometheus", description="Prometheus binary (Debian package 'prometheus').")

    # --- API -----------------------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Bind address of the HTTP API.")
    api_port: int = Field(8000, description="Port of the HTTP API.")
    spamd_port: int = Field(7830, description="Port of the spamd-protocol listener (SpamAssassin's is 783).")
    workers: int = Field(1, description="API worker processes.")
    max_message_bytes: int = Field(10 * 1024 * 1024, description="Larger messages get 413.")
    analyse_bytes: int = Field(256 * 1024, description="Only this much of a message is parsed and scored.")
    user_list_learn_after: int = Field(
        2, ge=0, le=100, description="Consecutive flags of one label by a user on one sender that put the sender on "
                                     "that user's allow (ham) or block (spam) list; 0: lists are only edited by hand.")
    trusted_authserv_ids: list[str] = Field(
        [], description="authserv-ids of the operator's own receiving hosts: only their Authentication-Results "
                        "(and Received-SPF with that receiver=) become SPF/DKIM/DMARC evidence; empty trusts none.")
    client_timeout_s: float = Field(10.0, description="A client slower than this is disconnected.")
    classify_requires_key: bool = Field(False, description="Require an API key on /classify too.")
    api_keys: dict[str, str] = Field(
        default_factory=lambda: {"dev-admin-key": "admin", "dev-user-key": "user"},
        description='API key -> reporter identity, as JSON: {"key": "alice"}. Keys ending "admin" may administer.',
    )
    admin_identities: list[str] = Field(default_factory=lambda: ["admin"], description="Identities allowed admin calls.")
    policy: str = Field(
        "combined",
        description="Who decides the verdict: combined (calibrated blend), model, rules, either (spam if any side says so).",
    )
    model_poll_s: float = Field(2.0, description="Fallback interval at which the API checks the champion pointer.")
    model_source: Literal["registry", "kafka"] = Field(
        "registry",
        description="Where an API replica gets its models: the registry directory (shared with the worker), or kafka "
        "(the models topic the worker publishes, into this replica's own registry directory: nothing shared).",
    )
    model_bootstrap_timeout_s: float = Field(
        60.0, gt=0, description="With model_source=kafka: how long a starting replica waits for the champion.")
    publish_models: bool = Field(
        True, description="The worker publishes each champion (files and pointer) on the models topic.")
    message_cache_size: int = Field(100_000, description="Recent /classify messages kept for feedback by message id.")
    campaign_memory: bool = Field(
        True, description="Campaign memory: a trusted spam flag's near-duplicates are spam for every user (README)."
    )
    campaign_capacity: int = Field(
        100_000, ge=1, description="Fingerprints each process keeps in campaign memory; the oldest are evicted."
    )
    campaign_threshold: float = Field(
        0.6, gt=0.0, le=1.0, description="Estimated Jaccard similarity at which a fingerprint matches (4-word shingles)."
    )

    # --- serving under hostile traffic: keys, feedback identity, limits ------------------------------
    api_keys_file: Path | None = Field(
        None,
        description='A JSON file {"key": "identity"} (a Docker/systemd secret) whose keys replace api_keys.',
    )
    relay_identities: list[str] = Field(
        default_factory=list,
        description="Identities (of api_keys) that relay flags for their own users: they may send X-Flywheel-User,"
        " and the reporter becomes '<relay>:<user>'.",
    )
    classify_threads: int = Field(
        2, ge=0, description="Classification threads per API worker (off the event loop); 0 classifies inline."
    )
    classify_queue: int = Field(
        64, ge=0, description="Messages that may wait for a classification thread; beyond that 503 + Retry-After."
    )
    classify_batch_share: int = Field(
        4, ge=1, description="Slots of the classification pool one /classify/batch holds while it runs: it is "
        "scored this many messages at a time, so single messages wait behind one such chunk, not a whole batch.",
    )
    feedback_identity_rate: float = Field(1.0, gt=0, description="Flags per second each reporter earns (token bucket).")
    feedback_identity_burst: int = Field(300, ge=1, description="Flags a reporter may send at once (bucket size).")
    feedback_source_rate: float = Field(
        20.0, gt=0,
        description="Flags per second per source: an API key (all users of a relay), or a spamd client address.",
    )
    feedback_source_burst: int = Field(3000, ge=1, description="Flags a source may send at once (bucket size).")
    feedback_new_reporters: int = Field(
        100, ge=1, description="New reporters a source may introduce per feedback_new_reporters_window_s; then 429."
    )
    feedback_new_reporters_window_s: float = Field(3600.0, gt=0, description="Window of feedback_new_reporters.")
    message_spool_bytes: int = Field(
        1024**3, ge=1024 * 1024, description="Bytes the shared message spool (workers > 1) may hold on disk."
    )
    spamd_allow_tell: bool = Field(False, description="Accept spamd TELL (spamc -L) at all, like spamd --allow-tell.")
    spamd_tell_clients: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"],
        description="Addresses or networks (CIDR) whose TELL is accepted without a secret (when TELL is allowed).",
    )
    spamd_tell_secret: SecretStr | None = Field(
        None, description="A client sending this in a 'Secret:' spamd header may TELL from any address."
    )
    spamd_max_connections: int = Field(
        64, ge=1, description="Concurrent spamd connections per API worker; more are answered 75 and closed."
    )
    spamd_max_connections_per_peer: int = Field(
        32, ge=1, description="Concurrent spamd connections one client address may hold per API worker (at most "
        "spamd_max_connections); more from it are answered 75 and closed, so one client cannot take every slot.",
    )
    spamd_idle_timeout_s: float = Field(
        5.0, gt=0, description="A spamd client must send its request line and headers within this many seconds "
        "(the body then within client_timeout_s); an idle connection is closed.",
    )

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        """A SASL protocol without its credentials, or a CA file that is not there, stops every command at start
        with one line naming the setting, rather than as a failed handshake on the first request."""
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password and self.kafka_sasl_password.get_secret_value()
        ):
            raise SettingsError(f"FLYWHEEL_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                                "FLYWHEEL_KAFKA_SASL_USERNAME and FLYWHEEL_KAFKA_SASL_PASSWORD")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise SettingsError(f"FLYWHEEL_{name.upper()} {path}: no such file")
        return self

    @model_validator(mode="after")
    def _jvm_options_split(self) -> Settings:
        """Options the broker's command line could not be built from stop every command at start, by name."""
        import shlex

        try:
            shlex.split(self.kafka_jvm_options)
        except ValueError as exc:
            raise SettingsError(f"FLYWHEEL_KAFKA_JVM_OPTIONS={self.kafka_jvm_options!r}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _keys_from_file(self) -> Settings:
        """Keys from ``api_keys_file`` replace ``api_keys``: a mounted secret never mixes with the defaults.

        A missing or malformed file raises ``SettingsError`` (not a validation error): every command then stops
        with one line naming the setting instead of starting with keys nobody chose.
        """
        if self.api_keys_file is not None:
            import json

            try:
                data = json.loads(self.api_keys_file.read_text())
            except (OSError, ValueError) as exc:
                raise SettingsError(f"FLYWHEEL_API_KEYS_FILE {self.api_keys_file}: {exc}") from None
            if not isinstance(data, dict) or not data or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in data.items()
            ):
                raise SettingsError(f"FLYWHEEL_API_KEYS_FILE {self.api_keys_file}: expected a JSON object "
                                    '{"key": "identity", ...} of non-empty strings')
            self.api_keys = data
        return self

    # --- operator page -------------------------------------------------------------------------------
    operator_identities: list[str] = Field(
        default_factory=list,
        description="Identities (of api_keys) that may read the operator page's data besides admin_identities: "
        "read-only operators (it names reporters and lineage, so other keys get 403).",
    )

    # --- worker --------------------------------------------------------------------------------------
    worker_port: int = Field(6066, description="Port of the worker's metrics page.")
    worker_host: str = Field(
        "127.0.0.1", description="Bind address of the worker's metrics page (0.0.0.0 in a container, so that a "
        "Prometheus elsewhere can scrape it)."
    )
    linear_refit_s: float = Field(
        2.0, description="The linear model refits on every current label at most this often while labels change."
    )
    neural_retrain: bool = Field(True, description="Train PyTorch challengers (on the schedule below).")
    neural_first: int = Field(200, description="PyTorch: first retrain after this many labels, then as they double.")
    neural_growth: float = Field(1.0, description="PyTorch: retrain when labels grew by this share since the last.")
    neural_surprises: int = Field(
        50, description="PyTorch: retrain early once this many new flags are on mail the champion got wrong."
    )
    consensus_min_weight: float = Field(1.0, description="Reporter weight needed before a flag becomes a label.")
    registry_keep: int = Field(
        20, description="Registry housekeeping: keep the last N champions (rollback targets) and N other versions."
    )
    fpr_budget: float = Field(0.001, description="Operating thresholds: highest FPR allowed on calibration data.")
    gate_alpha: float = Field(0.05, description="Significance of every one-sided test of the gate.")
    gate_relative_margin: float = Field(
        0.25, description="Gate: a fresher challenger's ranking error may exceed the champion's by this share ..."
    )
    gate_margin_cap: float = Field(0.002, description="... but by at most this many AUC points.")
    gate_fpr_tolerance: float = Field(
        0.002, description="Gate: a challenger is blocked when its FPR rise is shown (at gate_alpha) to exceed this."
    )
    gate_clean_error: float = Field(
        0.005, description="Gate: where the champion's 1-AUC on the evaluation set is at most this, a refit on more of "
        "the same data is promoted unless shown worse (models.gate).")
    gate_eval_min_per_class: int = Field(
        50, description="Gate: flags per class below which the corpus's held-out part tops the evaluation set up."
    )
    gate_eval_max_per_class: int = Field(2000, description="Gate: newest flags per class in the evaluation set.")
    eval_exclude_file: Path | None = Field(
        None, description="Message ids (one per line) the worker never uses from the corpus (benchmark test halves)."
    )
    reporter_metrics_max: int = Field(20, description="Reporters shown by flywheel_reporter_weight (bounded series).")
    worker_base_corpus: bool = Field(
        True, description="Train on the corpus's earlier collection besides the flags (off: learn from flags alone)."
    )
    worker_store_retry_s: float = Field(
        300.0, gt=0, description="How long the worker retries a batch its store refuses (database locked, disk "
        "full), with backoff, before it exits without acknowledging the batch (a supervisor restarts it from its "
        "committed offsets). Below faust's max poll interval (1000 s).",
    )
    worker_catch_up_lag: int = Field(
        1_000, ge=0, description="While more feedback records than this wait to be applied, the learner's and the "
        "campaign publisher's passes wait (at most worker_catch_up_max_s at a time), so a backlog is applied at "
        "full speed instead of being refitted every few batches.",
    )
    worker_catch_up_max_s: float = Field(
        30.0, gt=0, description="The longest a background pass waits for a backlog: a flood that never ends still "
        "gets a refit this often.",
    )
    worker_rebuild: bool = Field(
        True, description="A worker whose store is empty (a new disk) first replays the worker's journal and the "
        "feedback topic into it: the labels, reputations and counters of the worker that wrote them.")
    store_quota_bytes: int = Field(
        1024**3, ge=1024 * 1024, description="Raw mail the worker's store keeps, in bytes; beyond it the oldest "
        "raw bytes of the largest user are dropped (their votes stay; a message without bytes is not trained on).",
    )
    store_reporter_share: float = Field(
        0.1, gt=0, le=1, description="Share of store_quota_bytes the raw mail one reporter supplied may take.",
    )
    store_source_share: float = Field(
        0.5, gt=0, le=1, description="Share of store_quota_bytes the raw mail one source (a relay, spamd, or a key's "
        "own identity: a reporter's name before ':') may take.",
    )

    # --- logging -------------------------------------------------------------------------------------
    log_level: str = Field("INFO", description="Log level of every process.")
    log_json: bool = Field(False, description="Logs as JSON lines (default: key=value for humans).")
    log_dir: Path | None = Field(
        None, description="Every record at log_level of the servers and the stack, as JSON lines (api.jsonl, "
        "worker.jsonl, stack.jsonl; default: <state_dir>/logs)."
    )
    log_console_level: str = Field(
        "WARNING", description="What the servers and the stack print on the console besides their progress lines "
        "(the log files keep everything at log_level)."
    )

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses a decorator over @property; pydantic's documented form
    @property
    def downloads(self) -> Path:
        return self.downloads_dir or self.state_dir / "downloads"

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses a decorator over @property; pydantic's documented form
    @property
    def registry(self) -> Path:
        return self.registry_dir or self.state_dir / "registry"

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses a decorator over @property; pydantic's documented form
    @property
    def rules_file(self) -> Path:
        return self.rules_path or self.state_dir / "rules.yaml"

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses a decorator over @property; pydantic's documented form
    @property
    def logs(self) -> Path:
        return self.log_dir or self.state_dir / "logs"

    @computed_field  # type: ignore[prop-decorator]  # mypy refuses a decorator over @property; pydantic's documented form
    @property
    def bootstrap_servers(self) -> str:
        return self.streams().bootstrap_servers

    def child_env(self) -> dict[str, str]:
        """``FLYWHEEL_*`` variables that reproduce these settings in a child process (API workers, the stack's
        processes, tests). Secrets are passed as their value; with ``api_keys_file`` the keys stay in the file
        (the child reads it), not in every process's environment."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None or (name == "api_keys" and self.api_keys_file is not None):
                continue
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif isinstance(value, dict | list):
                text = json.dumps(value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"FLYWHEEL_{name.upper()}"] = text
        return env

    @property
    def manages_kafka(self) -> bool:
        """False when the user pointed Flywheel at their own Kafka."""
        return self.streams().manages_kafka

    def topic(self, name: str) -> str:
        return self.streams().topic(name)

    # --- streams: the event plumbing's own config ----------------------------------------------------
    def streams(self) -> StreamsConfig:
        """What the topics, the producer, the faust app and the local broker take (``streams`` reads no Settings)."""
        return StreamsConfig(
            topic_prefix=self.topic_prefix,
            feedback_partitions=self.feedback_partitions,
            feedback_retention_ms=self.feedback_retention_ms,
            kafka_bootstrap=self.kafka_bootstrap,
            kafka_port=self.kafka_port,
            kafka_controller_port=self.kafka_controller_port,
            kafka_nodes=self.kafka_nodes,
            kafka_version=self.kafka_version,
            kafka_heap=self.kafka_heap,
            kafka_jvm_options=self.kafka_jvm_options,
            kafka_start_timeout_s=self.kafka_start_timeout_s,
            session_timeout_s=self.kafka_session_timeout_s,
            state_dir=self.state_dir,
            downloads=self.downloads,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None,
            ssl_cafile=self.kafka_ssl_cafile,
            broker_ssl_certfile=self.kafka_ssl_certfile,
            broker_ssl_keyfile=self.kafka_ssl_keyfile,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
