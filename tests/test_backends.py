"""The integration backend: which one runs (and why), what the run reports, and the containers' settings, checked
without Docker. The containers themselves start only where a Docker daemon answers (README: Tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backends import (
    BACKEND_ENV,
    KAFKA_IMAGE_ENV,
    PROMETHEUS_IMAGE,
    PROMETHEUS_IMAGE_ENV,
    BackendError,
    ContainerSpec,
    Selection,
    Session,
    docker_unavailable,
    kafka_spec,
    prometheus_spec,
    select,
)
from conftest import make_settings

from services.settings import REPO_ROOT


def _no_daemon() -> str:
    return "DockerException: Error while fetching server API version"


def _daemon() -> None:
    return None


def _never() -> str | None:
    raise AssertionError("Docker must not be probed")


# --------------------------------------------------------------------------------------------- selection
@pytest.mark.unit
def test_auto_without_a_daemon_runs_local_and_says_why() -> None:
    for env in ({}, {BACKEND_ENV: "auto"}, {BACKEND_ENV: " AUTO "}, {BACKEND_ENV: ""}):
        chosen = select(env, _no_daemon)
        assert chosen == Selection("auto", "local", f"no Docker daemon answered: {_no_daemon()}")
        assert chosen.describe().startswith(f"local ({BACKEND_ENV}=auto: no Docker daemon answered: DockerException")


@pytest.mark.unit
def test_auto_with_a_daemon_runs_containers() -> None:
    assert select({}, _daemon) == Selection("auto", "containers", "a Docker daemon answered")


@pytest.mark.unit
def test_forced_local_never_asks_docker() -> None:
    assert select({BACKEND_ENV: "local"}, _never).backend == "local"


@pytest.mark.unit
def test_forced_containers_without_a_daemon_is_a_clear_error_not_a_fallback() -> None:
    with pytest.raises(BackendError) as err:
        select({BACKEND_ENV: "containers"}, _no_daemon)
    message = str(err.value)
    assert f"{BACKEND_ENV}=containers, but no Docker daemon answers" in message
    assert _no_daemon() in message and f"{BACKEND_ENV}=local or auto" in message
    assert select({BACKEND_ENV: "containers"}, _daemon).backend == "containers"


@pytest.mark.unit
def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(BackendError, match=r"FLYWHEEL_TEST_BACKEND='docker' is not one of auto, local, containers"):
        select({BACKEND_ENV: "docker"}, _never)


@pytest.mark.unit
def test_the_probe_agrees_with_testcontainers() -> None:
    """Where testcontainers' constructor raises (no daemon), the probe says so, in milliseconds; and vice versa."""
    from docker.errors import DockerException
    from testcontainers.core.container import DockerContainer

    docker_unavailable()  # imports done; what follows is the probe itself
    t0 = time.monotonic()
    why_not = docker_unavailable()
    probe_s = time.monotonic() - t0
    try:
        DockerContainer("apache/kafka").get_docker_client().client.close()
        constructed = True
    except DockerException:
        constructed = False
    assert (why_not is None) == constructed, why_not
    if why_not is not None:
        assert why_not.startswith("DockerException: ") and probe_s < 2.0, (why_not, probe_s)


@pytest.mark.unit
def test_the_session_chooses_once_and_reports_what_started() -> None:
    calls: list[int] = []

    def probe() -> str:
        calls.append(1)
        return _no_daemon()

    session = Session(env={BACKEND_ENV: "auto"}, probe=probe)
    assert "probed when a test first needs Kafka or Prometheus" in session.header() and not calls
    assert session.summary() == ["integration backend: not used (no test needed Kafka or Prometheus)"]
    assert session.selection() is session.selection() and calls == [1]
    session.started.append("kafka: local broker 4.1.1 at 127.0.0.1:1234")
    assert session.header() == (
        f"integration backend: local ({BACKEND_ENV}=auto: no Docker daemon answered: {_no_daemon()})")
    assert session.summary() == [session.header(), "  kafka: local broker 4.1.1 at 127.0.0.1:1234"]


# --------------------------------------------------------------------------------------------- container settings
def _props(value: str) -> dict[str, str]:
    """``NAME://host:port,...`` as {name: host:port}."""
    return dict(item.split("://", 1) for item in value.split(","))


@pytest.mark.unit
def test_kafka_container_is_one_kraft_node_advertised_on_its_published_port(tmp_path: Path) -> None:
    s = make_settings(tmp_path / "state")
    spec, reached = kafka_spec(s, env={})
    assert spec.image == f"apache/kafka:{s.kafka_version}"
    e = spec.env
    assert e["KAFKA_PROCESS_ROLES"] == "broker,controller" and e["KAFKA_NODE_ID"] == "1"
    assert e["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"1@{_props(e['KAFKA_LISTENERS'])['CONTROLLER']}"
    assert len(e["CLUSTER_ID"]) == 22 and not e["CLUSTER_ID"].startswith("-")
    listeners, advertised = _props(e["KAFKA_LISTENERS"]), _props(e["KAFKA_ADVERTISED_LISTENERS"])
    protocol_map = e["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    protocols = dict(item.split(":") for item in protocol_map.split(","))
    assert set(listeners) == {"HOST", "BROKER", "CONTROLLER"} and set(advertised) == {"HOST", "BROKER"}
    assert set(protocols) == set(listeners) and set(protocols.values()) == {"PLAINTEXT"}
    assert e["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised and e["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    # The client listener is published on the session's Kafka port and advertised as exactly that address.
    inside = int(listeners["HOST"].rsplit(":", 1)[1])
    assert spec.ports == {inside: s.kafka_port}
    assert advertised["HOST"] == f"127.0.0.1:{s.kafka_port}"
    assert e["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1" and e["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    # The settings it yields name that cluster, so nothing starts a local broker; the rest is the session's.
    assert reached.kafka_bootstrap == reached.bootstrap_servers == f"127.0.0.1:{s.kafka_port}"
    assert not reached.manages_kafka and not reached.streams().manages_kafka
    assert reached.model_dump(exclude={"kafka_bootstrap"}) == s.model_dump(exclude={"kafka_bootstrap"})
    assert s.manages_kafka and s.kafka_bootstrap is None  # the session's own settings are left as they were
    assert kafka_spec(s, env={KAFKA_IMAGE_ENV: "apache/kafka:4.0.0"})[0].image == "apache/kafka:4.0.0"


@pytest.mark.unit
def test_prometheus_container_scrapes_the_host_loopback_with_the_local_config(tmp_path: Path) -> None:
    s = make_settings(tmp_path / "state")
    spec = prometheus_spec(s, env={})
    assert spec.image == PROMETHEUS_IMAGE and spec.network_mode == "host" and not spec.ports
    assert spec.user == f"{os.getuid()}:{os.getgid()}"
    args = dict(a.removeprefix("--").split("=", 1) for a in spec.command if "=" in a)
    assert args["web.listen-address"] == f"127.0.0.1:{s.prometheus_port}"
    config = Path(args["config.file"])
    text = config.read_text()
    assert f'"127.0.0.1:{s.api_port}"' in text and f'"127.0.0.1:{s.worker_port}"' in text
    rule_files = [line.split("- ", 1)[1].strip() for line in text.splitlines() if line.strip().endswith(".yml")]
    assert len(rule_files) == 2 and all(Path(r).is_file() for r in rule_files)
    # Every path Prometheus reads or writes is mounted at the same path, writable only where it writes.
    mounts = {inside: (host, mode) for host, inside, mode in spec.volumes}
    assert all(host == inside for inside, (host, _) in mounts.items())

    def mount_of(path: str) -> str:
        return next(mode for inside, (_, mode) in mounts.items() if Path(path).is_relative_to(inside))

    assert mount_of(str(config)) == "rw" and mount_of(args["storage.tsdb.path"]) == "rw"
    assert all(mount_of(r) == "ro" for r in rule_files)
    assert prometheus_spec(s, env={PROMETHEUS_IMAGE_ENV: "prom/prometheus:v3.5.0"}).image == "prom/prometheus:v3.5.0"


@pytest.mark.unit
def test_a_spec_becomes_the_container_it_describes() -> None:
    spec = ContainerSpec(image="img:1", env={"A": "1"}, command=("--x=1",), ports={9092: 41234},
                         volumes=(("/h", "/h", "ro"),), network_mode="host", user="1000:1000")
    c = spec.container(docker_client_kw={"version": "1.44"})  # a pinned API version: no connection yet
    try:
        assert c.image.endswith("img:1") and c.env == {"A": "1"} and c._command == ["--x=1"]
        assert c.ports == {"9092": 41234} and c.volumes == {"/h": {"bind": "/h", "mode": "ro"}}
        assert c._kwargs == {"network_mode": "host", "user": "1000:1000"}
    finally:
        c.get_docker_client().client.close()


# --------------------------------------------------------------------------------------------- the run itself
@pytest.mark.unit
def test_the_session_backend_is_known(integration_backend: Selection) -> None:
    """Run by the tests below in a child pytest: requesting the fixture resolves the session's choice."""
    assert integration_backend.backend in ("local", "containers")


def _pytest(mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, BACKEND_ENV: mode}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


NODE = "tests/test_backends.py::test_the_session_backend_is_known"


@pytest.mark.integration
def test_the_run_says_which_backend_ran_and_refuses_containers_without_docker() -> None:
    why_not = docker_unavailable()
    auto = _pytest("auto", NODE)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert f"integration backend: {BACKEND_ENV}=auto (Docker is probed when" in auto.stdout  # the header
    if why_not is None:
        assert f"integration backend: containers ({BACKEND_ENV}=auto: a Docker daemon answered)" in auto.stdout
    else:
        assert f"integration backend: local ({BACKEND_ENV}=auto: no Docker daemon answered: DockerException" \
            in auto.stdout

    local = _pytest("local", NODE)
    assert local.returncode == 0 and f"integration backend: local ({BACKEND_ENV}=local: Docker not asked)" \
        in local.stdout, local.stdout + local.stderr

    forced = _pytest("containers", NODE)
    if why_not is None:
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert f"integration backend: containers ({BACKEND_ENV}=containers" in forced.stdout
    else:
        assert forced.returncode == pytest.ExitCode.USAGE_ERROR, forced.stdout + forced.stderr
        assert f"{BACKEND_ENV}=containers, but no Docker daemon answers" in forced.stderr
        assert " passed" not in forced.stdout  # stopped before any test ran

    bogus = _pytest("podman", NODE)
    assert bogus.returncode == pytest.ExitCode.USAGE_ERROR and "is not one of" in bogus.stderr
