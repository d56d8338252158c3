"""Console and log file: a server's console shows warnings for people, its file keeps every record as JSON lines;
the coordinator's routine start-up errors never reach the console; a host warning reaches it once per session."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from services import logging as flylog

pytestmark = pytest.mark.unit


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger and the variables ``configure`` sets (children of later tests must not inherit them)."""
    import os

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = (flylog.SESSION_ENV, flylog.FILE_ENV, flylog.CONSOLE_ENV)
    saved = {name: os.environ.pop(name, None) for name in names}
    config = structlog.get_config()
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def _console(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    return out


def test_with_a_file_the_console_gets_warnings_and_the_file_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    out = _console(monkeypatch)
    file = flylog.log_file(tmp_path / "logs", "api")
    flylog.configure("INFO", file=file)
    log = structlog.get_logger("services.api.middleware")
    for i in range(5):
        log.info("request", path="/classify", n=i)
    log.warning("something to look at")
    assert "request" not in out.getvalue() and out.getvalue().count("something to look at") == 1
    records = [json.loads(line) for line in file.read_text().splitlines()]
    assert [r["event"] for r in records] == ["request"] * 5 + ["something to look at"]
    assert records[0]["level"] == "info" and records[0]["path"] == "/classify"


def test_the_coordinator_errors_of_a_normal_start_stay_off_the_console(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    out = _console(monkeypatch)
    file = tmp_path / "worker.jsonl"
    flylog.configure("INFO", file=file)
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Group Coordinator Request failed: %s", "[Error 15] GroupCoordinatorNotAvailableError")
    coordinator.warning("Marking the coordinator dead (node %s)for group %s.", 1, "flywheel-worker")
    logging.getLogger("kafka.cluster").error("Metadata refresh: failed %s", "Cancelled")
    assert out.getvalue() == ""
    assert "GroupCoordinatorNotAvailableError" in file.read_text()  # kept where someone may look for it


def test_a_library_warning_repeated_reaches_the_console_once(
        monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    out = _console(monkeypatch)
    flylog.configure("INFO")
    conn = logging.getLogger("kafka.conn")
    for _ in range(20):
        conn.warning("Connect attempt to %s returned error %s. Disconnecting.", "broker", 111)
    assert out.getvalue().count("Connect attempt") == 1


def test_a_host_warning_reaches_the_console_once_per_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    """Two processes of one session (simulated: two configures sharing the session and the log directory) print
    ``onnx_cuda_unavailable`` once between them; each file has its own."""
    out = _console(monkeypatch)
    monkeypatch.setenv(flylog.SESSION_ENV, "s1")
    for process in ("api", "worker"):
        flylog.configure("INFO", file=flylog.log_file(tmp_path, process))
        structlog.get_logger("models.runtime").warning("onnx_cuda_unavailable", provider="CPUExecutionProvider")
    assert out.getvalue().count("onnx_cuda_unavailable") == 1
    for process in ("api", "worker"):
        assert "onnx_cuda_unavailable" in flylog.log_file(tmp_path, process).read_text()


def test_spawned_workers_inherit_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          restore_logging: None) -> None:
    _console(monkeypatch)
    file = tmp_path / "api.jsonl"
    flylog.configure("INFO", file=file, console_level="ERROR")
    logging.getLogger().handlers[:] = []
    flylog.configure_inherited("INFO")  # what an API worker process does with the environment it inherited
    structlog.get_logger("x").info("from the worker")
    assert "from the worker" in file.read_text()
    assert logging.getLogger().handlers[0].level == logging.ERROR
