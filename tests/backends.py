"""Where the integration fixtures get Kafka and Prometheus: containers where a Docker daemon answers, the project's
own local broker and Prometheus where none does.

``FLYWHEEL_TEST_BACKEND`` chooses:

- ``auto`` (the default): Docker is probed once, when a test first needs Kafka or Prometheus; containers if a
  daemon answers, the local servers otherwise. The run says which in its header and its summary.
- ``local``: the local broker and Prometheus; Docker is never touched.
- ``containers``: containers or nothing. Without a daemon the run stops before the first test, with the reason
  (never a silent fallback to the local servers).

The containers (testcontainers; a Docker Engine on the machine that runs the tests):

- Kafka is Apache's image, ``apache/kafka:<kafka_version>`` (the version the local broker fetches), run as a
  generic ``DockerContainer``: testcontainers' ``KafkaContainer`` would start Confluent's cp-kafka 7.6.0 with
  ZooKeeper unless ``with_kraft()``. One KRaft node is broker and controller; its client listener is published on
  the host port ``settings.kafka_port`` (free when the session began) and advertised as ``127.0.0.1:<that port>``,
  so the settings the fixture yields name it in ``kafka_bootstrap``: to every part of the project it is an
  existing cluster, and nothing starts, stops or formats a broker of its own.
- Prometheus runs in the host's network namespace (``network_mode=host``). The API and worker processes the tests
  start listen on the host's 127.0.0.1: from a bridge network the container's 127.0.0.1 is its own, and
  ``host.docker.internal`` reaches the host's bridge address, where loopback-bound servers do not answer. On the
  host network the prometheus.yml rendered for the local Prometheus (targets ``127.0.0.1:<api_port>`` and
  ``<worker_port>``) works unchanged, and Prometheus listens on ``127.0.0.1:<prometheus_port>`` as the local one
  does. Host networking needs Docker Engine on Linux (Docker Desktop: its host networking setting, 4.34 or later).
  The config and the rules are mounted read-only at their host paths, the TSDB lives in the state dir, and the
  container runs as the test user so it can read the session's private temporary directories.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.local.daemon import wait_for
from services.settings import Settings

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

BACKEND_ENV = "FLYWHEEL_TEST_BACKEND"
KAFKA_IMAGE_ENV = "FLYWHEEL_TEST_KAFKA_IMAGE"
PROMETHEUS_IMAGE_ENV = "FLYWHEEL_TEST_PROMETHEUS_IMAGE"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.4"
"""The 2.x long-term-support line: the rules and config are those the local Prometheus (Debian's 2.x) loads."""
MODES = ("auto", "local", "containers")
CONTAINER_READY_TIMEOUT_S = 120.0


class BackendError(RuntimeError):
    """The requested backend cannot run here; the message says why and what to do."""


# --------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True, slots=True)
class Selection:
    requested: str
    """What ``FLYWHEEL_TEST_BACKEND`` asked for: auto, local or containers."""
    backend: str
    """What runs: local or containers."""
    reason: str

    def describe(self) -> str:
        return f"{self.backend} ({BACKEND_ENV}={self.requested}: {self.reason})"


def requested_mode(env: Mapping[str, str]) -> str:
    value = (env.get(BACKEND_ENV) or "auto").strip().lower()
    if value not in MODES:
        raise BackendError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(MODES)}")
    return value


def docker_unavailable() -> str | None:
    """None when a Docker daemon answers a ping, else why not.

    Asked through testcontainers' own client (``DOCKER_HOST``, Docker contexts, its properties file): what answers
    here is what would start the containers. With no daemon the client's constructor raises ``DockerException``
    within milliseconds.
    """
    try:
        from docker.errors import DockerException
        from testcontainers.core.docker_client import DockerClient
    except ImportError as exc:
        return f"testcontainers is not installed ({exc})"
    try:
        client = DockerClient()
    except (DockerException, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        client.client.ping()
    except (DockerException, OSError) as exc:  # requests' errors are OSErrors
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.client.close()
    return None


def select(env: Mapping[str, str], probe: Callable[[], str | None] = docker_unavailable) -> Selection:
    """The backend for ``env``: ``BackendError`` when containers are required and no daemon answers."""
    mode = requested_mode(env)
    if mode == "local":
        return Selection(mode, "local", "Docker not asked")
    why_not = probe()
    if why_not is None:
        return Selection(mode, "containers", "a Docker daemon answered")
    if mode == "containers":
        raise BackendError(
            f"{BACKEND_ENV}=containers, but no Docker daemon answers ({why_not}). Start Docker (or point DOCKER_HOST "
            f"at one), or run with {BACKEND_ENV}=local or auto to use the local broker and Prometheus."
        )
    return Selection(mode, "local", f"no Docker daemon answered: {why_not}")


@dataclass
class Session:
    """The session's choice (made once, on first need) and what it started, for the run's header and summary."""

    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    probe: Callable[[], str | None] = docker_unavailable
    started: list[str] = field(default_factory=list)
    _selection: Selection | None = None

    @property
    def resolved(self) -> Selection | None:
        return self._selection

    def selection(self) -> Selection:
        if self._selection is None:
            self._selection = select(self.env, self.probe)
        return self._selection

    def header(self) -> str:
        if self._selection is not None:
            return f"integration backend: {self._selection.describe()}"
        mode = requested_mode(self.env)
        return (f"integration backend: {BACKEND_ENV}={mode} "
                "(Docker is probed when a test first needs Kafka or Prometheus)")

    def summary(self) -> list[str]:
        if self._selection is None:
            return ["integration backend: not used (no test needed Kafka or Prometheus)"]
        return [f"integration backend: {self._selection.describe()}", *(f"  {s}" for s in self.started)]


SESSION = Session()
"""This test run's session (conftest's hooks and fixtures share it)."""


# --------------------------------------------------------------------------------------------- containers
@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything a container is started with, as plain data (built and checked without Docker)."""

    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    ports: Mapping[int, int] = field(default_factory=dict)
    """Container port -> host port."""
    volumes: tuple[tuple[str, str, str], ...] = ()
    """(host path, container path, mode)."""
    network_mode: str | None = None
    user: str | None = None

    def container(self, docker_client_kw: dict[str, Any] | None = None) -> DockerContainer:
        """The testcontainers object, not started; raises ``DockerException`` when no daemon answers (unless
        ``docker_client_kw`` pins an API ``version``: then the client connects only when the container starts)."""
        from testcontainers.core.container import DockerContainer

        c = DockerContainer(self.image, docker_client_kw=docker_client_kw)
        for key, value in self.env.items():
            c.with_env(key, value)
        for inside, outside in self.ports.items():
            c.with_bind_ports(inside, outside)
        for host, inside_path, mode in self.volumes:
            c.with_volume_mapping(host, inside_path, mode)
        if self.command:
            c.with_command(list(self.command))
        kwargs: dict[str, Any] = {}
        if self.network_mode is not None:
            kwargs["network_mode"] = self.network_mode
        if self.user is not None:
            kwargs["user"] = self.user
        if kwargs:
            c.with_kwargs(**kwargs)
        return c


def _cluster_id() -> str:
    """A KRaft cluster id (Kafka's Uuid: 22 url-safe base64 characters, not starting with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def kafka_spec(settings: Settings, env: Mapping[str, str] | None = None) -> tuple[ContainerSpec, Settings]:
    """Apache Kafka in KRaft mode, its client listener on ``127.0.0.1:<kafka_port>``; and the settings that name it."""
    env = os.environ if env is None else env
    port = settings.kafka_port
    image = env.get(KAFKA_IMAGE_ENV) or f"apache/kafka:{settings.kafka_version}"
    spec = ContainerSpec(
        image=image,
        env={
            "CLUSTER_ID": _cluster_id(),
            "KAFKA_NODE_ID": "1",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
            # HOST: for the tests, published on the host and advertised there; BROKER: the broker's own traffic
            # inside the container; CONTROLLER: the KRaft quorum (this one node).
            "KAFKA_LISTENERS": "HOST://0.0.0.0:9092,BROKER://localhost:19092,CONTROLLER://localhost:9093",
            "KAFKA_ADVERTISED_LISTENERS": f"HOST://127.0.0.1:{port},BROKER://localhost:19092",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "HOST:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            # One node: internal topics with replication 1 (their default of 3 could never be met), no rebalance
            # delay for new groups; the same as the local broker's server.properties.
            "KAFKA_NUM_PARTITIONS": "1",
            "KAFKA_DEFAULT_REPLICATION_FACTOR": "1",
            "KAFKA_MIN_INSYNC_REPLICAS": "1",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "10",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
            "KAFKA_HEAP_OPTS": f"-Xmx{settings.kafka_heap} -Xms256m",
        },
        ports={9092: port},
    )
    return spec, settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"})


def prometheus_spec(settings: Settings, env: Mapping[str, str] | None = None) -> ContainerSpec:
    """Prometheus on the host network with the config rendered for ``settings`` (rendered here, in the state dir)."""
    from services.local.stack import MONITORING_DIR, prometheus_dir, render_prometheus_config

    env = os.environ if env is None else env
    config = render_prometheus_config(settings)
    pdir = prometheus_dir(settings)
    data = pdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    rules = MONITORING_DIR / "rules"
    return ContainerSpec(
        image=env.get(PROMETHEUS_IMAGE_ENV) or PROMETHEUS_IMAGE,
        command=(
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
            "--web.enable-lifecycle",
        ),
        volumes=((str(pdir), str(pdir), "rw"), (str(rules), str(rules), "ro")),
        network_mode="host",
        user=f"{os.getuid()}:{os.getgid()}",
    )


def _logs(container: DockerContainer, lines: int = 30) -> str:
    with contextlib.suppress(Exception):  # the container may be gone already; the logs are only a hint
        out, err = container.get_logs()
        return "\n".join((out + err).decode(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def running(spec: ContainerSpec, ready: Callable[[], bool], what: str,
            timeout_s: float = CONTAINER_READY_TIMEOUT_S) -> Iterator[DockerContainer]:
    """Start ``spec``, wait until ``ready()`` (or the container exits, or the deadline), remove it at the end."""
    container = spec.container()

    def exited() -> bool:
        container.reload()
        return container.status in ("exited", "dead")

    try:
        container.start()  # pulls the image first when missing; the deadline below starts after that
        if not wait_for(ready, timeout_s, interval_s=0.25, abort=exited):
            state = "exited" if exited() else f"was not ready within {timeout_s:.0f}s"
            raise BackendError(f"{what} ({spec.image}) {state}; its last log lines:\n{_logs(container)}")
        yield container
    finally:
        container.stop()


# --------------------------------------------------------------------------------------------- the servers
@contextlib.contextmanager
def kafka(settings: Settings, session: Session) -> Iterator[Settings]:
    """The session's Kafka with the project's topics; yields the settings that reach it."""
    from services.local import broker
    from streams import admin
    from streams.topics import topic_specs

    if not settings.manages_kafka:  # FLYWHEEL_KAFKA_BOOTSTRAP names a cluster: every backend uses it as it is
        broker.start(settings.streams())
        session.started.append(f"kafka: the existing cluster at {settings.bootstrap_servers}")
        admin.ensure_topics(settings.streams(), topic_specs(settings.streams()))
        yield settings
        return
    if session.selection().backend == "containers":
        spec, reached = kafka_spec(settings, session.env)
        with running(spec, lambda: admin.answers_metadata(reached.bootstrap_servers, timeout_s=1.0),
                     "the Kafka container"):
            session.started.append(f"kafka: container {spec.image} (KRaft) at {reached.bootstrap_servers}")
            admin.ensure_topics(reached.streams(), topic_specs(reached.streams()))
            yield reached
        return
    config = settings.streams()
    broker.ensure_jars(config)
    broker.start(config)
    session.started.append(f"kafka: local broker {settings.kafka_version} at {settings.bootstrap_servers}")
    try:
        admin.ensure_topics(config, topic_specs(config))
        yield settings
    finally:
        broker.stop(config)


@contextlib.contextmanager
def prometheus(settings: Settings, session: Session) -> Iterator[Settings]:
    """The session's Prometheus, scraping the settings' API and worker ports on 127.0.0.1; yields the settings."""
    from services.local.stack import prometheus_ready, prometheus_start, prometheus_stop, prometheus_url

    if session.selection().backend == "containers":
        spec = prometheus_spec(settings, session.env)
        with running(spec, lambda: prometheus_ready(settings), "the Prometheus container"):
            session.started.append(f"prometheus: container {spec.image} (host network) at {prometheus_url(settings)}")
            yield settings
        return
    prometheus_start(settings)
    session.started.append(f"prometheus: local at {prometheus_url(settings)}")
    try:
        yield settings
    finally:
        prometheus_stop(settings)
