"""Before a server starts: its ports free and what it needs present, so that a command that cannot run says why
at once (one line naming each problem and the setting or option to change, exit 1) and starts nothing.

Only the standard library is imported here at module level: ``flywheel serve`` and ``flywheel worker`` check
their ports before the logging, web and training libraries load (a second or more on a busy host). The broker and
Prometheus checks import what they need when asked for.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.settings import Settings

__all__ = ["PreflightError", "bind_host", "port_free", "preflight"]


class PreflightError(RuntimeError):
    """A server cannot start as configured; the one-line message names each problem and what to change."""

    user_facing = True


def bind_host(host: str) -> str:
    """The address the API binds for ``host`` (a wildcard stays a wildcard)."""
    return "0.0.0.0" if host in ("", "0.0.0.0") else host  # noqa: S104 - checks the address the API will bind


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` and a server could bind it (standard library only, so a server
    checks its ports before the logging, web and training libraries load)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def preflight(settings: Settings, *, api: bool = False, worker: bool = False, kafka: bool = False,
              prometheus: bool = False, flags: dict[str, str] | None = None) -> None:
    """Check what the named servers need before any of them starts: their ports free, Java for the local broker,
    a Prometheus binary. Raises ``PreflightError`` with one line naming each problem and the setting (or
    ``flags``: the command's own option for a setting) to change, so nothing is left half-started.

    A server already running as this stack's own (the broker or Prometheus of ``flywheel kafka start``) needs
    nothing: it is used as it is.
    """
    named = flags or {}

    def setting(name: str) -> str:
        env = f"FLYWHEEL_{name.upper()}"
        return f"{named[name]} or {env}" if name in named else env

    problems: list[str] = []

    def port(name: str, value: int, host: str = "127.0.0.1") -> None:
        try:
            free = port_free(value, host)
        except OSError as exc:  # an address this host does not have
            problems.append(f"cannot bind {host}:{value} ({exc.strerror or exc}); change {setting('api_host')}")
            return
        if not free:
            problems.append(f"port {value} is in use by another program; stop it or change {setting(name)}")

    if api:
        port("api_port", settings.api_port, bind_host(settings.api_host))
        port("spamd_port", settings.spamd_port, bind_host(settings.api_host))
    if worker:
        port("worker_port", settings.worker_port)
    if kafka and settings.manages_kafka:
        from services.local import broker

        s = settings.streams()
        if not broker.is_running(s):
            before = len(problems)
            for node in range(settings.kafka_nodes):  # node i listens on the configured ports + i
                port("kafka_port", settings.kafka_port + node)
                port("kafka_controller_port", settings.kafka_controller_port + node)
            if len(problems) == before:  # Java answers in seconds on a busy host: only when the ports are free
                try:
                    broker.find_java()
                except broker.BrokerError as exc:
                    problems.append(str(exc))
    if prometheus:
        from services.local.stack import _prometheus_daemon, _resolve_binary

        if not _prometheus_daemon(settings).running():
            port("prometheus_port", settings.prometheus_port)
            if _resolve_binary(settings.prometheus_bin) is None and (
                    settings.prometheus_bin != "prometheus" or os.geteuid() != 0 or shutil.which("apt-get") is None):
                problems.append(f"Prometheus binary {settings.prometheus_bin!r} not found; install Debian's "
                                "'prometheus' package or set FLYWHEEL_PROMETHEUS_BIN")
    if problems:
        raise PreflightError("; ".join(problems))
