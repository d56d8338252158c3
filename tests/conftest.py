"""Session fixtures shared by every test: settings on fresh ports and a temporary state dir, the real broker,
the real Prometheus, the corpus.

Servers start once per session, on first use, and stop at the end. Kafka and Prometheus run in containers where a
Docker daemon answers and as the project's local servers where none does; FLYWHEEL_TEST_BACKEND=auto|local|containers
chooses, and the run's header and summary say which ran (see tests/backends.py). The downloads cache (Kafka jars,
corpus) is the checkout's ``var/downloads`` so test runs never fetch twice. A final check fails the session if any
process started by a test is still alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import backends
import pytest

from services.settings import REPO_ROOT, Settings

DOWNLOADS = REPO_ROOT / "var" / "downloads"
TEST_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (all bound at once, so the OS cannot hand out one twice)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def make_settings(state_dir: Path, **overrides: object) -> Settings:
    """A Settings for an isolated stack: its own state dir, free ports, a unique topic prefix, shared downloads."""
    kafka, controller, prom, api, spamd, worker = free_ports(6)
    values: dict[str, object] = {
        "state_dir": state_dir,
        "downloads_dir": DOWNLOADS,
        "kafka_port": kafka,
        "kafka_controller_port": controller,
        "prometheus_port": prom,
        "api_port": api,
        "spamd_port": spamd,
        "worker_port": worker,
        "topic_prefix": f"test-{uuid.uuid4().hex[:8]}",
        # C1 only: a test broker lives minutes, and starts on about half the CPU of the JVM's default compilers
        "kafka_jvm_options": TEST_JVM_OPTIONS,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- leftovers
def _children_of(pid: int) -> list[int]:
    """Live (non-zombie) descendants of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


_HARMLESS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Torn down last: fail the session if a test left a process running (and kill it, so CI does not hang)."""
    before = set(_children_of(os.getpid()))
    yield
    left = [p for p in _children_of(os.getpid()) if p not in before and not any(h in _cmdline(p) for h in _HARMLESS)]
    if not left:
        return
    described = [f"{p}: {_cmdline(p)[:160]}" for p in left]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    pytest.fail("processes left behind by the tests (killed now):\n" + "\n".join(described), pytrace=False)


def _worker_data_dirs() -> set[Path]:
    """faust data directories (``<app id>-data``, the worker's is ``<prefix>-worker-data``) where a run could drop
    them by mistake: the checkout and the current directory."""
    return {p.resolve() for d in {REPO_ROOT, Path.cwd()} for p in d.glob("*-worker-data")}


@pytest.fixture(scope="session", autouse=True)
def no_worker_data_outside_the_state_dir() -> Iterator[None]:
    """Fail the session if a test's worker left faust's data directory outside its state directory."""
    before = _worker_data_dirs()
    yield
    left = sorted(str(p) for p in _worker_data_dirs() - before)
    if left:
        pytest.fail(f"faust data directories outside the state directory: {left}", pytrace=False)


# --------------------------------------------------------------------------------------------- tiers
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test carries exactly one tier mark (``-m unit`` must select every pure-logic test, and a test without
    a tier would fall out of every tiered run)."""
    wrong = [f"{item.nodeid} ({', '.join(t for t in TIERS if item.get_closest_marker(t)) or 'no tier'})"
             for item in items if sum(item.get_closest_marker(t) is not None for t in TIERS) != 1]
    if wrong:
        raise pytest.UsageError("tests need exactly one tier mark (" + ", ".join(TIERS) + "):\n  "
                                + "\n  ".join(wrong))
    # Slowest first: modules with end-to-end tests, then those with integration tests, the unit tests last, so
    # that parallel workers (`make test`) fill the end of the run with short tests instead of one long module.
    rank = {name: i for i, name in enumerate(reversed(TIERS))}  # e2e 0, integration 1, unit 2
    module_rank: dict[str, int] = {}
    for item in items:
        tier = next(t for t in TIERS if item.get_closest_marker(t))
        module = item.nodeid.split("::", 1)[0]
        module_rank[module] = min(module_rank.get(module, 2), rank[tier])
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (module_rank[item.nodeid.split("::", 1)[0]], order[id(item)]))


# --------------------------------------------------------------------------------------------- backend
def pytest_configure(config: pytest.Config) -> None:
    """Check FLYWHEEL_TEST_BACKEND before any test: a bad value, or containers without Docker, stops the run here."""
    try:
        if backends.requested_mode(backends.SESSION.env) == "containers":
            backends.SESSION.selection()
    except backends.BackendError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> str:
    return backends.SESSION.header()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in backends.SESSION.summary():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def integration_backend() -> backends.Selection:
    """Which backend serves ``kafka`` and ``prometheus`` this session (Docker is probed on first use)."""
    return backends.SESSION.selection()


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The session's Settings: a fresh state dir, free ports for every server, a unique topic prefix."""
    return make_settings(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="session")
def kafka(settings: Settings, integration_backend: backends.Selection) -> Iterator[Settings]:
    """The real broker for this session, the project's topics created; yields settings that reach it.

    Local: the project's broker on ``settings.kafka_port`` (jars fetched once), the settings as they are. Containers:
    Apache Kafka published on that same port, and the settings with ``kafka_bootstrap`` naming it, so nothing tries
    to start a local broker.
    """
    with backends.kafka(settings, backends.SESSION) as reached:
        yield reached


@pytest.fixture(scope="session")
def prometheus(settings: Settings, integration_backend: backends.Selection) -> Iterator[Settings]:
    """The real Prometheus for this session on ``settings.prometheus_port``, scraping the settings' API and worker
    ports on 127.0.0.1; yields the settings."""
    with backends.prometheus(settings, backends.SESSION) as reached:
        yield reached


@pytest.fixture(scope="session")
def corpus(settings: Settings) -> list:
    """Every distinct corpus message (``models.corpus.CorpusMessage``), loaded once per session."""
    from models.corpus import load_corpus

    return load_corpus(settings.downloads, settings.corpus_dir)


@pytest.fixture(scope="session")
def p1_split(corpus: list) -> tuple[list, list]:
    """P1's training and test periods of the real corpus."""
    from models.corpus import split_p1

    return split_p1(corpus)


@pytest.fixture(scope="session")
def featurize_corpus() -> Callable[[Sequence[Any], Any], tuple[Any, Any]]:
    """Parse, score with the default rules and featurize corpus messages, as serving does: (batch, 0/1 labels)."""
    import numpy as np

    from models.features import featurize
    from models.message import parse
    from models.rules import RuleEngine

    engine = RuleEngine.default()

    def run(msgs: Sequence[Any], cfg: Any) -> tuple[Any, Any]:
        parsed = [parse(m.raw) for m in msgs]
        return featurize(parsed, [engine.evaluate(p) for p in parsed], cfg), np.array([int(m.is_spam) for m in msgs])

    return run

def consume_all(settings: Settings, topic: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Every record of ``topic`` from the beginning, decoded (reads the real broker)."""
    import orjson
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                             enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(consumer.position(p) < end[p] for p in parts):
            for records in consumer.poll(timeout_ms=300).values():
                out.extend(orjson.loads(r.value) for r in records)
        return out
    finally:
        consumer.close()
