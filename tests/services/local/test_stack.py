"""The real Prometheus (scrapes a target, loads the project's rules), the monitoring files, and run_stack."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import Selection
from conftest import make_settings

from services.local import stack
from services.local.daemon import is_alive, port_open, read_pid, wait_for
from services.settings import Settings

MONITORING = stack.MONITORING_DIR

@pytest.fixture()
def private(tmp_path: Path) -> Iterator[Settings]:
    """Settings of a Prometheus (and stack) of the test's own; whatever it started is stopped afterwards."""
    s = make_settings(tmp_path / "state")
    yield s
    stack.prometheus_stop(s)
    from services.local import broker

    broker.stop(s.streams())


def _up(settings: Settings, job: str) -> str | None:
    for r in stack.prometheus_query(settings, f'up{{job="{job}"}}'):
        return str(r["value"][1])
    return None


# --------------------------------------------------------------------------------------------- prometheus
@pytest.mark.integration
def test_prometheus_scrapes_a_target(private: Settings) -> None:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    Gauge("flywheel_rules_active", "rules", registry=registry).set(42)
    server, thread = start_http_server(private.api_port, addr="127.0.0.1", registry=registry)
    try:
        stack.prometheus_start(private)
        assert wait_for(lambda: _up(private, "flywheel-api") == "1", 30.0, interval_s=0.5), \
            stack.prometheus_status(private)
        assert wait_for(lambda: bool(stack.prometheus_query(private, "flywheel_rules_active == 42")), 15.0)
        # The worker is not running: Prometheus sees its target down, which is what the alert reads.
        assert wait_for(lambda: _up(private, "flywheel-worker") == "0", 30.0, interval_s=0.5)
        st = stack.prometheus_status(private)
        assert st["targets"]["flywheel-api"] == "up" and st["ready"] is True
    finally:
        server.shutdown()
        thread.join(5)
    pid = read_pid(private.state_dir / "prometheus" / "prometheus.pid")
    stack.prometheus_stop(private)
    assert pid is not None and not is_alive(pid)
    assert stack.prometheus_status(private)["running"] is False


@pytest.mark.integration
def test_session_prometheus_is_idempotent_and_loads_the_rules(prometheus: Settings,
                                                              integration_backend: Selection) -> None:
    import urllib.request

    if integration_backend.backend == "local":  # a container is no process of ours: no pid, no second start
        pid = stack.prometheus_status(prometheus)["pid"]
        stack.prometheus_start(prometheus)  # already running: no new process
        assert pid is not None and stack.prometheus_status(prometheus)["pid"] == pid
    with urllib.request.urlopen(stack.prometheus_url(prometheus) + "/api/v1/rules", timeout=5) as resp:
        groups = {g["name"]: g for g in json.load(resp)["data"]["groups"]}
    assert {"flywheel.api", "flywheel.worker", "flywheel.alerts"} <= set(groups)
    alerts = {r["name"] for r in groups["flywheel.alerts"]["rules"]}
    assert {"FlywheelApiDown", "FlywheelWorkerDown", "FlywheelHighLatency", "FlywheelFeedbackRefused",
            "FlywheelModelReloadRejected", "FlywheelGateRejectingEverything", "FlywheelWorkerLag"} <= alerts


@pytest.mark.integration
def test_port_taken_is_a_clear_error(private: Settings) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", private.prometheus_port))
        squatter.listen()
        with pytest.raises(stack.PrometheusError, match=r"already in use.*FLYWHEEL_PROMETHEUS_PORT"):
            stack.prometheus_start(private)
    assert stack.prometheus_status(private)["running"] is False


@pytest.mark.unit
def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = make_settings(tmp_path / "a", prometheus_bin=str(tmp_path / "nowhere" / "prometheus"))
    with pytest.raises(stack.PrometheusError, match=r"FLYWHEEL_PROMETHEUS_BIN.*apt-get install prometheus.*prometheus.io/download"):
        stack.prometheus_start(explicit)
    # The default name, not on PATH, and no root to install it: say how to get it.
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    default = make_settings(tmp_path / "b")
    with pytest.raises(stack.PrometheusError, match=r"not installed and installing it needs root.*apt-get install prometheus"):
        stack.ensure_prometheus(default)
    assert not (tmp_path / "b" / "prometheus" / "prometheus.pid").exists()


# --------------------------------------------------------------------------------------------- monitoring files
@pytest.mark.integration
def test_promtool_accepts_the_rendered_config_and_rules(tmp_path: Path) -> None:
    s = make_settings(tmp_path / "state")
    config = stack.render_prometheus_config(s, tmp_path / "out")
    text = config.read_text()
    assert f"127.0.0.1:{s.api_port}" in text and f"127.0.0.1:{s.worker_port}" in text and "${" not in text
    out = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 2 rule files found" in out.stdout
    rules = sorted(str(p) for p in (MONITORING / "rules").glob("*.yml"))
    out = subprocess.run(["promtool", "check", "rules", *rules], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# The dashboards, the rules and their promtool unit tests: tests/monitoring/.


# --------------------------------------------------------------------------------------------- run_stack
_STACK_SCRIPT = textwrap.dedent(
    """
    import sys
    from services.settings import Settings
    from services.local.stack import Child, run_stack

    s = Settings()
    mode = sys.argv[1]
    serve = lambda port: [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    after = None
    if mode == "ok":
        kids = [Child("api", serve(s.api_port), s.api_port), Child("worker", serve(s.worker_port), s.worker_port)]
    elif mode == "dies-during-replay":  # the worker listens, then exits while the replay runs
        listens = ("import socket, time; s = socket.socket(); s.bind(('127.0.0.1', %d)); s.listen(); time.sleep(3)"
                   % s.worker_port)
        kids = [Child("api", serve(s.api_port), s.api_port),
                Child("worker", [sys.executable, "-c", listens], s.worker_port)]
        after = lambda stop: stop.wait(300) or True  # a replay that only ends when told to
    else:
        kids = [Child("api", serve(s.api_port), s.api_port),
                Child("worker", [sys.executable, "-c", "import sys; sys.exit(3)"], s.worker_port)]
    sys.exit(run_stack(s, children=kids, after_start=after))
    """
)


def _launch_stack(settings: Settings, tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "stack_main.py"
    script.write_text(_STACK_SCRIPT)
    log = tmp_path / f"stack-{mode}.log"
    env = {**os.environ, **settings.child_env(), "PYTHONPATH": str(stack.MONITORING_DIR.parent)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), mode], stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log


@pytest.mark.integration
def test_run_stack_starts_everything_and_ctrl_c_stops_it_in_reverse_order(private: Settings, tmp_path: Path) -> None:
    s = private
    if not s.manages_kafka:
        pytest.skip("FLYWHEEL_KAFKA_BOOTSTRAP set: the stack would not start its own broker")
    proc, log = _launch_stack(s, tmp_path, "ok")
    try:
        up = wait_for(lambda: "Press Ctrl-C" in log.read_text(), 120.0, interval_s=0.3, abort=lambda: proc.poll() is not None)
        assert up, log.read_text()[-3000:]
        text = log.read_text()
        assert f"http://127.0.0.1:{s.api_port}" in text and f"http://127.0.0.1:{s.prometheus_port}" in text
        kafka_pid = read_pid(s.state_dir / "kafka" / "kafka.pid")
        prom_pid = read_pid(s.state_dir / "prometheus" / "prometheus.pid")
        assert kafka_pid and is_alive(kafka_pid) and prom_pid and is_alive(prom_pid)
        assert port_open(s.api_port) and port_open(s.worker_port)
        from streams import admin
        from streams.topics import topic_specs

        specs = dict(topic_specs(s.streams()))
        assert admin.topic_partitions(s.streams(), specs) == specs

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    order = [text.index(f"stopping {name}") for name in ("worker", "api", "Prometheus", "Kafka")]
    assert order == sorted(order), text[-2000:]
    assert not is_alive(kafka_pid) and not is_alive(prom_pid)
    for port in (s.api_port, s.worker_port, s.prometheus_port, s.kafka_port):
        assert not port_open(port), port


@pytest.mark.integration
def test_run_stack_exits_1_and_cleans_up_when_a_part_fails(private: Settings, tmp_path: Path) -> None:
    s = private
    proc, log = _launch_stack(s, tmp_path, "fail")
    try:
        assert proc.wait(timeout=120) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "worker exited with code 3 during start-up" in text
    assert "stopping api" in text
    assert not port_open(s.api_port) and not port_open(s.prometheus_port)
    assert read_pid(s.state_dir / "prometheus" / "prometheus.pid") is None
    if s.manages_kafka:
        assert read_pid(s.state_dir / "kafka" / "kafka.pid") is None and not port_open(s.kafka_port)


# --------------------------------------------------------------------------------------------- the live record
@pytest.mark.unit
def test_the_live_record_points_state_readers_at_the_running_stack(tmp_path: Path) -> None:
    """``flywheel run`` serves from ``<state>/replay`` on its ports: commands configured with ``<state>`` follow
    it while the record's process lives, and go back to their own settings once it is removed or stale."""
    home = make_settings(tmp_path / "state")
    live = make_settings(home.state_dir / "replay")
    assert stack.live_settings(home) == (home, None)
    path = stack.record_live(home.state_dir, live)
    assert path == home.state_dir / stack.LIVE_FILE
    followed, pid = stack.live_settings(home)
    assert pid == os.getpid()
    assert followed.state_dir == live.state_dir and followed.registry == live.registry
    assert (followed.api_port, followed.spamd_port, followed.worker_port, followed.prometheus_port) == (
        live.api_port, live.spamd_port, live.worker_port, live.prometheus_port)
    assert followed.topic_prefix == live.topic_prefix and followed.downloads == home.downloads
    stack.clear_live(home.state_dir)
    assert not path.exists() and stack.live_settings(home) == (home, None)

    # a stack killed without its clean-up leaves a record whose process is gone: ignored
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    record = json.loads(stack.record_live(home.state_dir, live).read_text())
    record["pid"] = int(gone.stdout)
    path.write_text(json.dumps(record))
    assert stack.live_settings(home) == (home, None)
    # a live process that took the pid of a dead stack is not that stack
    record = json.loads(stack.record_live(home.state_dir, live).read_text())
    path.write_text(json.dumps({**record, "pid_started": "1"}))
    assert stack.live_settings(home) == (home, None)


@pytest.mark.unit
def test_clear_live_leaves_another_stacks_record(tmp_path: Path) -> None:
    home = make_settings(tmp_path / "state")
    path = stack.record_live(home.state_dir, home)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "pid": record["pid"] + 1}))
    stack.clear_live(home.state_dir)
    assert path.exists()


@pytest.mark.unit
def test_preflight_names_every_problem_on_one_line(tmp_path: Path) -> None:
    import socket

    s = make_settings(tmp_path / "state", prometheus_bin=str(tmp_path / "no-prometheus"))
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", s.api_port))
        a.listen()
        b.bind(("127.0.0.1", s.worker_port))
        b.listen()
        with pytest.raises(stack.PreflightError) as err:
            stack.preflight(s, api=True, worker=True, prometheus=True, flags={"api_port": "--port"})
    text = str(err.value)
    assert "\n" not in text
    assert f"port {s.api_port} is in use by another program; stop it or change --port or FLYWHEEL_API_PORT" in text
    assert f"port {s.worker_port} is in use by another program; stop it or change FLYWHEEL_WORKER_PORT" in text
    assert "FLYWHEEL_PROMETHEUS_BIN" in text
    stack.preflight(s, api=True, worker=True)  # free again: nothing to say


@pytest.mark.integration
def test_a_part_that_dies_during_the_replay_stops_the_stack_with_1(private: Settings, tmp_path: Path) -> None:
    """The replay does not wait for a worker that is gone: the stack says which part exited and stops it all."""
    s = private
    proc, log = _launch_stack(s, tmp_path, "dies-during-replay")
    try:
        assert proc.wait(timeout=150) == 1, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "worker exited with code 0; stopping the stack" in text, text[-3000:]
    assert "Press Ctrl-C" not in text and not (s.state_dir / stack.LIVE_FILE).exists()
    assert not port_open(s.api_port) and not port_open(s.prometheus_port)
