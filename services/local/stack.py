"""The local stack: a real Prometheus run from ``monitoring/``, and ``run_stack`` behind ``make run``.

Prometheus is Debian's ``prometheus`` package run as a plain detached process (no system service): its config
is rendered from the template ``monitoring/prometheus.yml`` with the ports of this stack into
``<state_dir>/prometheus/``, its TSDB lives there too, and the rule files are read from ``monitoring/rules/``.

``run_stack`` brings up the broker (when Flywheel manages it), the topics, Prometheus, then the API and the
retraining worker as child processes, prints the addresses and waits. Ctrl-C (or SIGTERM) stops everything it
started in reverse order; servers that were already running before it (``flywheel kafka start``) are left as
they were. If a child dies, the stack stops and exits 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.local.daemon import Child, Daemon, DaemonError, port_open, rss_bytes, wait_for
from services.local.preflight import PreflightError, port_free, preflight
from services.local.preflight import bind_host as _bind_host

if TYPE_CHECKING:
    from services.settings import Settings

log = structlog.get_logger(__name__)

MONITORING_DIR = Path(__file__).resolve().parents[2] / "monitoring"
PROMETHEUS_READY_TIMEOUT_S = 30.0
CHILD_READY_TIMEOUT_S = 120.0
CHILD_STOP_TIMEOUT_S = 20.0


class PrometheusError(RuntimeError):
    """Prometheus is missing, cannot be installed, or did not come up; the message is meant for the operator."""

    user_facing = True


class StackError(RuntimeError):
    """A part of the stack failed to start; the message is meant for the operator."""

    user_facing = True


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- prometheus
def prometheus_dir(settings: Settings) -> Path:
    return settings.state_dir / "prometheus"


def _prometheus_daemon(settings: Settings) -> Daemon:
    d = prometheus_dir(settings)
    return Daemon(name="prometheus", pidfile=d / "prometheus.pid", logfile=d / "prometheus.log",
                  marker=str(d / "prometheus.yml"))


_HOW_TO_GET = (
    "Install it: Debian/Ubuntu `sudo apt-get install prometheus` (the service it installs need not run), or "
    "download a release from https://prometheus.io/download/ and set FLYWHEEL_PROMETHEUS_BIN to the binary."
)


def _resolve_binary(name: str) -> str | None:
    if os.sep in name:
        return name if os.access(name, os.X_OK) and Path(name).is_file() else None
    return shutil.which(name)


def ensure_prometheus(settings: Settings) -> str:
    """The Prometheus binary's path; installs Debian's package when missing and we are root.

    Only the default name (``prometheus``) is installed automatically: an explicit FLYWHEEL_PROMETHEUS_BIN
    that does not exist is the user's choice to fix, never replaced behind their back.
    """
    found = _resolve_binary(settings.prometheus_bin)
    if found:
        return found
    if settings.prometheus_bin != "prometheus":
        raise PrometheusError(f"Prometheus binary {settings.prometheus_bin!r} (FLYWHEEL_PROMETHEUS_BIN) was not found. {_HOW_TO_GET}")
    if os.geteuid() != 0:
        raise PrometheusError(f"Prometheus is not installed and installing it needs root. {_HOW_TO_GET}")
    if shutil.which("apt-get") is None:
        raise PrometheusError(f"Prometheus is not installed and this system has no apt-get. {_HOW_TO_GET}")
    _progress("==> installing Prometheus (apt-get install prometheus)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
    out = subprocess.run(install, capture_output=True, text=True, env=env, check=False)  # noqa: S603 - fixed argv
    if out.returncode != 0 or not shutil.which("prometheus"):
        _progress("    install failed; refreshing the package lists (apt-get update) and retrying")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)  # noqa: S607 - apt-get found on PATH above
        out = subprocess.run(install, capture_output=True, text=True, env=env, check=False)  # noqa: S603 - fixed argv
    found = shutil.which("prometheus")
    if not found:
        detail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
        raise PrometheusError(f"Prometheus is not installed and apt-get could not install it. {_HOW_TO_GET}\n{detail}")
    return found


def render_prometheus_config(settings: Settings, out_dir: Path | None = None) -> Path:
    """Write ``prometheus.yml`` for this stack's ports (rules read from ``monitoring/rules``); returns its path."""
    out_dir = out_dir or prometheus_dir(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    template = string.Template((MONITORING_DIR / "prometheus.yml").read_text())
    text = template.substitute(
        api_port=settings.api_port,
        worker_port=settings.worker_port,
        prometheus_port=settings.prometheus_port,
        rules_dir=str(MONITORING_DIR / "rules"),
    )
    path = out_dir / "prometheus.yml"
    tmp = path.with_suffix(".yml.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def prometheus_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.prometheus_port}"


def _http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback URL we built
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def prometheus_ready(settings: Settings) -> bool:
    return _http_ok(prometheus_url(settings) + "/-/ready")


def prometheus_start(settings: Settings) -> None:
    """Start Prometheus (a no-op when it runs) and wait for /-/ready; the config is re-rendered each start."""
    daemon = _prometheus_daemon(settings)
    if daemon.running():
        if not wait_for(lambda: prometheus_ready(settings), PROMETHEUS_READY_TIMEOUT_S, abort=lambda: not daemon.running()):
            raise PrometheusError(f"Prometheus (pid {daemon.pid()}) runs but is not ready; see {daemon.logfile}")
        log.info("prometheus already running", pid=daemon.pid())
        return
    binary = ensure_prometheus(settings)
    if not port_free(settings.prometheus_port):
        raise PrometheusError(
            f"port {settings.prometheus_port} on 127.0.0.1 is already in use by another program; stop it or "
            "choose another port (FLYWHEEL_PROMETHEUS_PORT)"
        )
    config = render_prometheus_config(settings)
    data = prometheus_dir(settings) / "data"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=15d",
        f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
        "--web.enable-lifecycle",
        f"--log.level={'debug' if settings.log_level.upper() == 'DEBUG' else 'info'}",
    ]
    _progress(f"==> starting Prometheus on {prometheus_url(settings)}")
    started = time.monotonic()
    try:
        daemon.start(argv, cwd=prometheus_dir(settings))
    except DaemonError as exc:
        raise PrometheusError(str(exc)) from exc
    if wait_for(lambda: prometheus_ready(settings), PROMETHEUS_READY_TIMEOUT_S, interval_s=0.1,
                abort=lambda: not daemon.running()):
        log.info("prometheus ready", seconds=round(time.monotonic() - started, 2), pid=daemon.pid())
        return
    tail = daemon.log_tail(20)
    if daemon.running():
        daemon.stop(timeout_s=10.0)
        raise PrometheusError(f"Prometheus was not ready within {PROMETHEUS_READY_TIMEOUT_S:.0f}s and was stopped; "
                              f"last lines of {daemon.logfile}:\n{tail}")
    raise PrometheusError(f"Prometheus exited during start-up; last lines of {daemon.logfile}:\n{tail}")


def prometheus_stop(settings: Settings) -> None:
    """Stop Prometheus (SIGTERM, SIGKILL after 20 s); a no-op when it is not running."""
    daemon = _prometheus_daemon(settings)
    pid = daemon.pid()
    if pid is None:
        log.info("prometheus not running")
        return
    _progress(f"==> stopping Prometheus (pid {pid})")
    try:
        daemon.stop(timeout_s=20.0)
    except DaemonError as exc:
        raise PrometheusError(str(exc)) from exc


def prometheus_status(settings: Settings) -> dict[str, Any]:
    """Prometheus's state: pid, memory, ready?, and each scrape target's health."""
    daemon = _prometheus_daemon(settings)
    pid = daemon.pid()
    rss = rss_bytes(pid) if pid else None
    st: dict[str, Any] = {
        "running": pid is not None,
        "pid": pid,
        "rss_mb": round(rss / 1e6, 1) if rss else None,
        "url": prometheus_url(settings),
        "ready": prometheus_ready(settings),
        "config": str(prometheus_dir(settings) / "prometheus.yml"),
        "log": str(daemon.logfile),
    }
    if st["ready"]:
        with contextlib.suppress(OSError, ValueError, KeyError, urllib.error.URLError):
            with urllib.request.urlopen(prometheus_url(settings) + "/api/v1/targets", timeout=2) as resp:  # noqa: S310 - our Prometheus's http URL
                active = json.load(resp)["data"]["activeTargets"]
            st["targets"] = {t["labels"].get("job", "?"): t.get("health") for t in active}
    return st


def prometheus_query(settings: Settings, query: str, timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """Run an instant PromQL query; returns the result vector (``[{"metric": {...}, "value": [t, "v"]}]``)."""
    url = prometheus_url(settings) + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our Prometheus's http URL
        body = json.load(resp)
    if body.get("status") != "success":
        raise PrometheusError(f"query {query!r} failed: {body.get('error')}")
    return list(body["data"]["result"])


# ------------------------------------------------------------------------------------------------- live record
LIVE_FILE = "live-stack.json"
"""Under the configured state directory while a stack runs: which state directory and ports it serves from, so
``flywheel status`` (and every command that reads state) follows the stack that is running."""

_LIVE_SETTINGS = ("state_dir", "registry_dir", "rules_path", "log_dir", "api_host", "api_port", "spamd_port",
                  "worker_port", "prometheus_port", "kafka_port", "kafka_controller_port", "kafka_bootstrap",
                  "topic_prefix")


def _started_at(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc): tells a live stack from a process that was given
    its pid after it died."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def record_live(home: Path, settings: Settings) -> Path:
    """Write the live record under ``home`` (the configured state dir) for the stack ``settings`` describe."""
    home.mkdir(parents=True, exist_ok=True)
    values = {name: getattr(settings, name) for name in _LIVE_SETTINGS}
    record = {"pid": os.getpid(), "pid_started": _started_at(os.getpid()), "started_at": time.time(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}}
    path = home / LIVE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def clear_live(home: Path) -> None:
    """Remove the live record if it is this process's."""
    path = home / LIVE_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def live_settings(settings: Settings) -> tuple[Settings, int | None]:
    """``settings`` pointed at the stack running from this state directory (its state dir and ports), and that
    stack's pid; ``settings`` and None when no stack runs (no record, or its process is gone)."""
    path = settings.state_dir / LIVE_FILE
    try:
        record = json.loads(path.read_text())
        pid = int(record["pid"])
        values = dict(record["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return settings, None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return settings, None  # a stack killed without its clean-up: stale
    except PermissionError:
        pass  # alive, another user's
    if record.get("pid_started") not in (None, _started_at(pid)):
        return settings, None  # the pid now belongs to another process: stale
    paths = {"state_dir", "registry_dir", "rules_path", "log_dir"}
    update = {k: (Path(v) if k in paths and v is not None else v) for k, v in values.items() if k in _LIVE_SETTINGS}
    return settings.model_copy(update=update), pid


# ------------------------------------------------------------------------------------------------- the stack
def flywheel_argv(*args: str) -> list[str]:
    """Command line of a ``flywheel`` subcommand run with this interpreter (works without the script on PATH)."""
    script = Path(sys.executable).with_name("flywheel")
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-c", "import sys; from services.cli import main; sys.argv[0] = 'flywheel'; main()", *args]


def default_children(settings: Settings) -> list[Child]:
    return [
        Child("api", flywheel_argv("serve"), settings.api_port),
        Child("worker", flywheel_argv("worker"), settings.worker_port),
    ]


def _start_child(child: Child, env: dict[str, str]) -> None:
    _progress(f"==> starting {child.name}: {' '.join(child.argv[-1:]) if child.argv else ''}")
    child.die_with_parent = True
    child.start(env)


def _stop_child(child: Child) -> None:
    if not child.alive():
        return
    _progress(f"==> stopping {child.name} (pid {child.proc.pid if child.proc else '?'})")
    if not child.stop(timeout_s=CHILD_STOP_TIMEOUT_S):
        log.warning("child did not stop on SIGTERM; killed", child=child.name)


def run_stack(
    settings: Settings,
    *,
    children: Sequence[Child] | None = None,
    stop_event: threading.Event | None = None,
    install_signal_handlers: bool = True,
    after_start: Callable[[threading.Event], bool] | None = None,
    home: Path | None = None,
    public_keys: Sequence[str] = (),
) -> int:
    """Run the whole stack until Ctrl-C/SIGTERM (exit 0) or until a child dies (exit 1).

    ``children`` replaces the API and worker (tests); ``stop_event`` stops the stack from another thread;
    ``after_start`` runs once everything is up (the replay) and says whether the stack keeps running after it.
    Every port and prerequisite is checked before anything starts (one line, exit 1). While it runs, the live
    record under ``home`` (the configured state dir; default ``settings.state_dir``) names this stack's state
    dir and ports. ``public_keys``: API keys the banner may print (known values, such as the replay's).
    """
    from services.local import broker

    stop = stop_event or threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    teardown: list[tuple[str, Callable[[], None]]] = []
    kids = list(children) if children is not None else default_children(settings)
    exit_code = 0
    home = home or settings.state_dir
    recorded = False
    try:
        preflight(settings, api=children is None, worker=children is None, kafka=True, prometheus=True)
        taken = [c for c in kids if children is not None and c.port is not None and not port_free(
            c.port, _bind_host(settings.api_host) if c.name == "api" else "127.0.0.1")]
        if taken:
            raise StackError("; ".join(f"{c.name}: port {c.port} is in use by another program; stop it or change "
                                       "its port setting" for c in taken))
        # --- servers (each stopped at the end only if this run started it)
        kafka = settings.streams()
        if kafka.manages_kafka:
            was_running = broker.is_running(kafka)
            broker.start(kafka)
            if not was_running:
                teardown.append(("kafka", lambda: broker.stop(kafka)))
        else:
            broker.start(kafka)  # only checks the external cluster answers
        _ensure_project_topics(settings)
        if stop.is_set():
            return 0
        was_running = _prometheus_daemon(settings).running()
        prometheus_start(settings)
        if not was_running:
            teardown.append(("prometheus", lambda: prometheus_stop(settings)))
        # --- the application processes
        env = {**os.environ, **settings.child_env()}
        for child in kids:
            if stop.is_set():
                return 0
            _start_child(child, env)
            teardown.append((child.name, functools.partial(_stop_child, child)))
            _wait_child_ready(child, settings, stop)
        if stop.is_set():
            return 0
        record_live(home, settings)
        recorded = True
        if after_start is not None:
            died: list[Child] = []
            done = threading.Event()
            watch = threading.Thread(target=_watch_children, args=(kids, stop, done, died), daemon=True,
                                     name="stack-watch")
            watch.start()
            try:
                keep = after_start(stop)
            except KeyboardInterrupt:
                if not died:
                    raise
                keep = False
            finally:
                done.set()
                watch.join()
            if died:
                return 1
            if not keep or stop.is_set():
                return 0
        _print_addresses(settings, kids, public_keys)
        # --- wait for Ctrl-C or a child's death
        while not stop.wait(0.5):
            if _dead(kids):
                exit_code = 1
                break
        else:
            _progress("\n==> stopping the stack")
    except (StackError, PreflightError, PrometheusError, broker.BrokerError, DaemonError) as exc:
        _progress(f"error: {exc}")
        exit_code = 1
    except KeyboardInterrupt:
        _progress("\n==> interrupted; stopping the stack")
    finally:
        if recorded:
            clear_live(home)
        for name, fn in reversed(teardown):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                log.error("stopping failed", part=name, error=str(exc))
                exit_code = exit_code or 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if teardown:
            _progress("==> stack stopped")
    return exit_code


def _dead(kids: Sequence[Child]) -> list[Child]:
    """The children that have exited, each said on the console."""
    dead = [c for c in kids if c.returncode is not None]
    for c in dead:
        _progress(f"!!  {c.name} exited with code {c.returncode}; stopping the stack")
    return dead


def _watch_children(kids: Sequence[Child], stop: threading.Event, done: threading.Event,
                    died: list[Child]) -> None:
    """While the replay runs in the main thread (until ``done``): a child that exits stops the stack (``died``
    says which)."""
    while not done.wait(0.5) and not stop.is_set():
        dead = _dead(kids)
        if dead:
            died.extend(dead)
            stop.set()
            return


def _ensure_project_topics(settings: Settings) -> None:
    from streams import admin

    try:
        from streams.topics import topic_specs
    except ImportError:  # the worker's modules may be absent in a partial checkout
        log.warning("streams.topics not importable; no topics created")
        return
    admin.ensure_topics(settings.streams(), topic_specs(settings.streams()))


def _wait_child_ready(child: Child, settings: Settings, stop: threading.Event) -> None:
    proc = child.proc
    assert proc is not None
    if child.port is None:
        return
    host = settings.api_host if child.name == "api" else "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - reads a wildcard bind, binds nothing
    ok = wait_for(lambda: port_open(child.port or 0, host), CHILD_READY_TIMEOUT_S, interval_s=0.2,
                  abort=lambda: proc.poll() is not None or stop.is_set())
    if ok or stop.is_set():
        return
    if proc.poll() is not None:
        raise StackError(f"{child.name} exited with code {proc.returncode} during start-up (see its output above)")
    raise StackError(f"{child.name} did not listen on port {child.port} within {CHILD_READY_TIMEOUT_S:.0f}s")


def _keys_line(settings: Settings, public_keys: Sequence[str]) -> list[str]:
    """Which API key opens what, for the banner: the development keys and ``public_keys`` by value (known values,
    nothing secret), any other key by where it is configured."""
    from services.api.safety import DEV_KEYS

    admins = set(settings.admin_identities)
    operators = admins | set(settings.operator_identities)
    shown = [k for k in settings.api_keys if k in DEV_KEYS or k in public_keys]
    lines: list[str] = []
    op = [k for k in shown if settings.api_keys[k] in operators]
    users = [k for k in shown if settings.api_keys[k] not in operators]
    if op:
        lines.append(f"  operator key   {', '.join(op)}   (X-API-Key: /operator, models, rules, /feedback)")
    if users:
        lines.append(f"  user keys      {_compact(users)}   (X-API-Key: /feedback)")
    hidden = len(settings.api_keys) - len(shown)
    if hidden:
        where = f"FLYWHEEL_API_KEYS_FILE ({settings.api_keys_file})" if settings.api_keys_file else "FLYWHEEL_API_KEYS"
        lines.append(f"  other keys     {hidden} from {where}")
    return lines


def _compact(keys: Sequence[str]) -> str:
    """``k-user-0..7`` for a numbered run of keys, the keys themselves otherwise."""
    import re

    runs: dict[str, list[int]] = {}
    plain: list[str] = []
    for k in keys:
        m = re.fullmatch(r"(.*?)(\d+)", k)
        if m:
            runs.setdefault(m[1], []).append(int(m[2]))
        else:
            plain.append(k)
    for stem, nums in runs.items():
        nums.sort()
        if len(nums) > 2 and nums == list(range(nums[0], nums[-1] + 1)):
            plain.append(f"{stem}{nums[0]}..{nums[-1]}")
        else:
            plain.extend(f"{stem}{n}" for n in nums)
    return ", ".join(plain)


def _print_addresses(settings: Settings, kids: Sequence[Child], public_keys: Sequence[str] = ()) -> None:
    """Every address with what it needs: the API and its docs, the operator page and its key, spamd, the
    worker's metrics, Prometheus, Kafka, where the state and the logs are."""
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "") else settings.api_host  # noqa: S104 - reads a wildcard bind, binds nothing
    api = f"http://{host}:{settings.api_port}"
    lines = ["", "Flywheel is running:"]
    names = {c.name for c in kids}
    if "api" in names:
        lines += [
            f"  API            {api}   (POST /classify needs no key; docs: {api}/docs)",
            f"  operator page  {api}/operator   (an operator or admin key)",
            f"  spamd          {host}:{settings.spamd_port}   (spamc -p {settings.spamd_port})",
            *_keys_line(settings, public_keys),
        ]
    if "worker" in names:
        lines.append(f"  worker metrics http://127.0.0.1:{settings.worker_port}/metrics")
    lines += [
        f"  Prometheus     {prometheus_url(settings)}",
        f"  Kafka          {settings.bootstrap_servers}" + ("" if settings.manages_kafka else "  (external)"),
        f"  state          {settings.state_dir}   (flywheel status follows it)",
        f"  logs           {settings.logs}/   (JSON lines: api.jsonl, worker.jsonl, stack.jsonl)",
        "Press Ctrl-C to stop everything.",
        "",
    ]
    _progress("\n".join(lines))


__all__ = [
    "LIVE_FILE",
    "Child",
    "PreflightError",
    "PrometheusError",
    "StackError",
    "default_children",
    "ensure_prometheus",
    "flywheel_argv",
    "live_settings",
    "preflight",
    "prometheus_query",
    "prometheus_ready",
    "prometheus_start",
    "prometheus_status",
    "prometheus_stop",
    "prometheus_url",
    "render_prometheus_config",
    "run_stack",
]
