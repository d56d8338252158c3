"""Starting and stopping processes, the one way: detached servers through a pidfile (:class:`Daemon`: the local
broker, Prometheus) and foreground children (:class:`Child`: the stack's API and worker, a benchmark's servers).

The local broker (:mod:`services.local.broker`), Prometheus and the stack start their servers through it; the
bounded waits (:func:`wait_for`, :func:`wait_until`) and port helpers serve everyone who waits on a condition.

A server started here runs in its own session (Ctrl-C in the terminal that started it does not reach it; the
stack stops it in order), writes stdout and stderr to a log file, and is found again later through its
pidfile. A pidfile alone is not trusted: a stale one (process gone, or the pid reused by another program) is
detected by checking that the process is alive and that its command line still contains a marker the caller
chose (e.g. the config path), so ``stop`` never signals a stranger.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from services.local.preflight import port_free

log = structlog.get_logger(__name__)


class DaemonError(RuntimeError):
    """A server could not be started or stopped; the message is meant for the operator."""

    user_facing = True


@dataclass(frozen=True, slots=True)
class Daemon:
    """Where one managed server keeps its pidfile and log, and how to recognise its process."""

    name: str
    pidfile: Path
    logfile: Path
    marker: str
    """A string in the server's command line (a config path) that tells our process from a reused pid."""

    def pid(self) -> int | None:
        """The live pid of this server, or None (a stale pidfile is removed)."""
        pid = read_pid(self.pidfile)
        if pid is None:
            return None
        alive = is_alive(pid)
        line = cmdline(pid)
        # A live process whose command line reads empty is in the middle of exec or exit: it cannot be told
        # from ours, so the pidfile stays (deleting it would orphan a server that is only starting).
        if alive and (self.marker in line or not line):
            return pid
        log.debug("stale pidfile", server=self.name, pid=pid, alive=alive, cmdline=line[:200])
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        return None

    def running(self) -> bool:
        return self.pid() is not None

    def start(
        self, argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> int:
        """Start ``argv`` detached (new session, stdin closed, output appended to the log); returns its pid."""
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        rotate(self.logfile)
        with open(self.logfile, "ab", buffering=0) as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.name}\n".encode())
            try:
                proc = subprocess.Popen(  # noqa: S603 - argv is built by the caller from settings
                    list(argv),
                    cwd=cwd,
                    env=dict(env) if env is not None else None,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except FileNotFoundError as exc:
                raise DaemonError(f"{self.name}: cannot run {argv[0]!r}: not found") from exc
            except PermissionError as exc:
                raise DaemonError(f"{self.name}: cannot run {argv[0]!r}: permission denied") from exc
        _adopt(proc)
        write_pid(self.pidfile, proc.pid)
        log.info("started", server=self.name, pid=proc.pid, log=str(self.logfile))
        return proc.pid

    def stop(self, timeout_s: float = 20.0, kill_timeout_s: float = 5.0) -> bool:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns True when a process was stopped."""
        pid = self.pid()
        if pid is None:
            return False
        stopped_cleanly = terminate(pid, timeout_s=timeout_s, kill_timeout_s=kill_timeout_s)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        log.info("stopped", server=self.name, pid=pid, clean=stopped_cleanly)
        return True

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.logfile, lines)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The child gets SIGTERM if its parent is killed, so none outlives a stack that was SIGKILLed."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(slots=True, eq=False)
class Child:
    """A foreground child process in a session of its own: a signal reaches its whole process group (uvicorn's
    workers, a JVM's helpers), and the terminal's Ctrl-C reaches only the parent, which stops children in order.

    Output is appended to ``logfile``, or goes to the parent's own without one."""

    name: str
    argv: list[str]
    port: int | None = None
    """Ready once something accepts connections here (None: ready once started)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    logfile: Path | None = None
    cwd: Path | None = None
    die_with_parent: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> Child:
        """Start ``argv`` with ``env`` (default: this process's) plus ``extra_env``; stdin closed."""
        environ = {**(os.environ if env is None else env), **self.extra_env}
        out: Any = None
        if self.logfile is not None:
            self.logfile.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.logfile, "ab")  # noqa: SIM115 - the child holds it; closed here right after the fork
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv is built by the caller from settings
                self.argv, cwd=self.cwd, env=environ, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT if out is not None else None, start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            if out is not None:
                out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        """The end of its log ("" without one)."""
        return tail(self.logfile, lines) if self.logfile is not None else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> bool:
        """``sig`` to the group, SIGKILL after ``timeout_s``, then SIGKILL to what is left of the group (a worker
        its parent did not wait for). True when the child exited on ``sig``; a stopped child can start again."""
        proc = self.proc
        if proc is None:
            return False
        clean = True
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("did not exit; killing", child=self.name, pid=proc.pid, waited_s=timeout_s)
                clean = False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        return clean


# Children we started are reaped by a background-free poll in is_alive(); keep the Popen objects so that
# waitpid works for them (otherwise they linger as zombies and look alive until this process exits).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _adopt(proc: subprocess.Popen[bytes]) -> None:
    _CHILDREN[proc.pid] = proc


LOG_ROTATE_BYTES = 20 * 1024 * 1024


def rotate(logfile: Path, max_bytes: int = LOG_ROTATE_BYTES) -> None:
    """Keep one previous log (``.1``) once a log outgrows ``max_bytes``; checked at each start."""
    try:
        if logfile.stat().st_size > max_bytes:
            os.replace(logfile, logfile.with_name(logfile.name + ".1"))
    except FileNotFoundError:
        pass


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def write_pid(pidfile: Path, pid: int) -> None:
    """Atomically write ``pid`` (a reader never sees a half-written file)."""
    tmp = pidfile.with_suffix(pidfile.suffix + ".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, pidfile)


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of ours is reaped and counts as gone)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        # Reap it if it exited (our own zombie would otherwise look alive). poll() alone is not trusted: when
        # SIGCHLD is ignored in this process, or another part reaped the child, it reports a live child dead.
        child.poll()
        if child.returncode is not None:
            _CHILDREN.pop(pid, None)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is not our child (its parent has not reaped it yet) is as good as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (from /proc), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def terminate(pid: int, *, timeout_s: float = 20.0, kill_timeout_s: float = 5.0) -> bool:
    """SIGTERM ``pid`` (and its process group), SIGKILL after the deadline; True if it exited on SIGTERM."""
    _signal(pid, signal.SIGTERM)
    if wait_for(lambda: not is_alive(pid), timeout_s, interval_s=0.1):
        return True
    log.warning("did not exit on SIGTERM; killing", pid=pid, waited_s=timeout_s)
    _signal(pid, signal.SIGKILL)
    if not wait_for(lambda: not is_alive(pid), kill_timeout_s, interval_s=0.05):
        raise DaemonError(f"process {pid} survived SIGKILL")
    return False


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # Our servers lead their own session; signal the whole group so helpers they spawned go too.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_for(
    condition: Callable[[], bool],
    timeout_s: float,
    *,
    interval_s: float = 0.2,
    abort: Callable[[], bool] | None = None,
) -> bool:
    """Poll ``condition`` until it holds (True) or the deadline passes or ``abort`` holds (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if abort is not None and abort():
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll until ``condition`` returns something truthy and return it; ``TimeoutError`` naming ``what`` otherwise.

    The one bounded wait the tests, benchmarks and stack use instead of sleeping and hoping.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what} (last: {last!r})")


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def require_ports_free(name: str, ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    """Raise a clear error naming the setting to change when a port is taken."""
    for setting, port in ports.items():
        if not port_free(port, host):
            raise DaemonError(
                f"{name}: port {port} on {host} is already in use by another program; stop it or choose "
                f"another port (FLYWHEEL_{setting.upper()})"
            )


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (for tests and ad-hoc servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_run(n: int, avoid: Collection[int] = (), host: str = "127.0.0.1") -> int:
    """A port ``p`` with ``p .. p+n-1`` all free right now and none in ``avoid`` (a local cluster's nodes listen on
    consecutive ports)."""
    for _ in range(200):
        base = free_port(host)
        ports = range(base, base + n)
        if base + n > 65535 or any(p in avoid for p in ports):
            continue
        if all(port_free(p, host) for p in ports):
            return base
    raise DaemonError(f"no run of {n} free ports on {host}")


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' when missing); reads only the end of big logs."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


__all__ = [
    "Child",
    "Daemon",
    "DaemonError",
    "cmdline",
    "free_port",
    "free_port_run",
    "is_alive",
    "port_open",
    "read_pid",
    "require_ports_free",
    "rotate",
    "rss_bytes",
    "tail",
    "terminate",
    "wait_for",
    "wait_until",
    "write_pid",
]
