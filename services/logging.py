"""Structured logging for every Flywheel process (structlog over the standard library).

Two audiences, two outputs. The console is for the person who started the process: warnings and errors only when
the process writes a log file (progress and results are printed by the commands themselves), each library
warning once, and nothing that reads as an error on a healthy start. The log file (``<log_dir>/<process>.jsonl``,
JSON lines) is for later: every record at ``log_level``, per request and per event.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import structlog

SESSION_ENV = "FLYWHEEL_LOG_SESSION"
"""Shared by a process and its children (the stack's API and worker, uvicorn's workers): a warning in
``ONCE_PER_SESSION`` reaches the console once per session, not once per process."""

FILE_ENV = "FLYWHEEL_LOG_PROCESS_FILE"
CONSOLE_ENV = "FLYWHEEL_LOG_PROCESS_CONSOLE"
"""Set by :func:`configure` with a file, so the processes it spawns to serve the same thing (uvicorn's workers)
log the same way: :func:`configure_inherited`."""

ONCE_PER_SESSION = frozenset({"onnx_cuda_unavailable"})
"""Events that say the same thing about the host from every process (the log file keeps every one)."""

_LIBRARIES = ("kafka", "aiokafka", "faust", "mode")
"""Loggers whose warnings repeat while a condition lasts (a broker not up yet): each distinct one once."""

_ROUTINE = ("GroupCoordinatorNotAvailable", "NotCoordinatorForGroup", "CoordinatorLoadInProgress",
            "Marking the coordinator dead", "Metadata refresh: failed Cancelled")
"""The Kafka clients' errors while the broker elects the group coordinator (every fresh start), a heartbeat late
on a busy host, a metadata request cancelled by the client itself: each is retried by the client, and reads as a
failure to a person; the log file keeps them."""


def _event(record: logging.LogRecord) -> str:
    """The event name of a structlog record, or the message template of a library's record."""
    msg: Any = record.msg
    if isinstance(msg, dict):
        return str(msg.get("event", ""))
    return str(msg)


class ConsoleFilter(logging.Filter):
    """What the console does not need: the coordinator's routine start-up errors, a library's repeated warning,
    a host warning another process of the same session already printed."""

    def __init__(self, once_dir: Path | None) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()
        self._once_dir = once_dir

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        library = name.split(".", 1)[0] in _LIBRARIES
        if library:
            text = record.getMessage()
            if any(word in text for word in _ROUTINE):
                return False
            key = (name, _event(record)[:80])
            if key in self._seen:
                return False
            self._seen.add(key)
            return True
        event = _event(record)
        if event in ONCE_PER_SESSION:
            if ("", event) in self._seen:
                return False
            self._seen.add(("", event))
            return self._first_in_session(event)
        return True

    def _first_in_session(self, event: str) -> bool:
        """True for the first process of the session to claim ``event`` (an exclusive create of a marker file)."""
        if self._once_dir is None:
            return True
        session = os.environ.get(SESSION_ENV, "")
        try:
            self._once_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._once_dir / f"{session}-{event}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError:
            return True  # no marker possible: saying it twice beats not saying it
        os.close(fd)
        return True


class _FileHandler(logging.FileHandler):
    """Opens its file on the first record, creating the directory then (a state directory wiped and recreated
    after logging was configured, as the replay does, still gets its log)."""

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_file(log_dir: Path, process: str) -> Path:
    """Where ``process`` (``api``, ``worker``, ``stack``) writes its JSON lines."""
    return log_dir / f"{process}.jsonl"


def configure(level: str = "INFO", json: bool = False, *, file: Path | None = None,
              console_level: str | None = None) -> None:
    """Route stdlib and structlog records through one renderer; call once, in a process entry point.

    ``file``: every record at ``level`` as JSON lines there, and the console shows ``console_level`` (default
    WARNING) and above. Without it the console shows ``level`` and above (a command without a state directory).
    """
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    if file is not None:
        os.environ.setdefault(SESSION_ENV, uuid.uuid4().hex[:12])
        os.environ[FILE_ENV] = str(file)
        os.environ[CONSOLE_ENV] = console_level or "WARNING"
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    console.addFilter(ConsoleFilter(file.parent / ".once" if file is not None else None))
    handlers: list[logging.Handler] = [console]
    root_level = logging.getLevelName(level.upper())
    if file is not None:
        console.setLevel((console_level or "WARNING").upper())
        to_file: logging.FileHandler | None = None
        with contextlib.suppress(OSError):
            file.parent.mkdir(parents=True, exist_ok=True)
            to_file = _FileHandler(file, encoding="utf-8", delay=True)
        if to_file is None:
            console.setLevel(root_level)  # no file to hold the rest: the console shows what the file would
        else:
            to_file.setFormatter(
                structlog.stdlib.ProcessorFormatter(
                    foreign_pre_chain=shared,
                    processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                                structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
                )
            )
            handlers.append(to_file)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(root_level)
    for noisy in ("kafka", "aiokafka", "faust", "mode", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def configure_inherited(level: str = "INFO", json: bool = False) -> None:
    """Configure a process spawned by one that called :func:`configure` with a file (an API worker of ``flywheel
    serve``): the same file and console level. Without one (``python -m services.api``), the console only."""
    file = os.environ.get(FILE_ENV)
    if file:
        configure(level, json, file=Path(file), console_level=os.environ.get(CONSOLE_ENV))
    else:
        configure(level, json)
