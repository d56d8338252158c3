"""The one settings object every Flywheel process reads.

Every field maps to an environment variable ``FLYWHEEL_<FIELD>`` (e.g. ``FLYWHEEL_STATE_DIR``); a ``.env``
file in the working directory is read too. Derived paths live under ``state_dir`` unless set on their own, so
one setting moves everything (tests point it at a temporary directory and keep the downloads cache).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


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
    kafka_version: str = Field("4.1.1", description="org.apache.kafka:kafka_2.13 version from Maven Central.")
    kafka_heap: str = Field("512m", description="-Xmx of the local broker.")
    kafka_start_timeout_s: float = Field(60.0, description="Deadline for the broker to answer metadata.")
    feedback_partitions: int = Field(4, description="Partitions of the feedback topic.")
    topic_prefix: str = Field("flywheel", description="Prefix of every topic name (tests use their own).")

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
    message_cache_size: int = Field(100_000, description="Recent /classify messages kept for feedback by message id.")

    # --- worker --------------------------------------------------------------------------------------
    worker_port: int = Field(6066, description="Port of the worker's metrics page.")
    linear_publish_every: int = Field(50, description="The incremental model publishes a candidate every N labels.")
    linear_publish_s: float = Field(2.0, description="... or every T seconds when labels arrived.")
    neural_retrain_every: int = Field(1000, description="The PyTorch model retrains every N new labels.")
    consensus_min_weight: float = Field(1.0, description="Reporter weight needed before a flag becomes a label.")
    registry_keep: int = Field(
        20, description="Registry housekeeping: keep the last N champions (rollback targets) and N other versions."
    )
    gate_fpr_tolerance: float = Field(0.002, description="A challenger may raise FPR by at most this much.")

    # --- logging -------------------------------------------------------------------------------------
    log_level: str = Field("INFO", description="Log level of every process.")
    log_json: bool = Field(False, description="Logs as JSON lines (default: key=value for humans).")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def downloads(self) -> Path:
        return self.downloads_dir or self.state_dir / "downloads"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def registry(self) -> Path:
        return self.registry_dir or self.state_dir / "registry"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rules_file(self) -> Path:
        return self.rules_path or self.state_dir / "rules.yaml"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def manages_kafka(self) -> bool:
        """False when the user pointed Flywheel at their own Kafka."""
        return self.kafka_bootstrap is None

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
