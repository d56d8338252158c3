"""A throwaway Flywheel stack driven from outside, as users drive it: the benchmarks, the replay and the
end-to-end tests use it.

:class:`LocalStack` takes settings, gives them their own state directory, topic prefix and ports (so it can run
beside another stack on the same broker), starts the broker when Flywheel manages it and none answers, creates the
topics, seeds the registry (optional), then starts the worker and the API as child processes (each in its own
session, output in a log file in the state dir) and waits for both. It stops what it started. Its helpers talk
HTTP to the API and read the worker's store read-only, the way an operator would inspect it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.local.daemon import Child, free_port, wait_until
from services.settings import REPO_ROOT

if TYPE_CHECKING:
    import httpx

    from models.registry import Registry
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = ["LocalStack", "reporter_keys", "seed_registry"]


def reporter_keys(n: int, prefix: str = "k-rep") -> dict[str, str]:
    """``n`` API keys for ``n`` reporters (``rep0``...) plus the development admin key."""
    return {**{f"{prefix}-{i}": f"rep{i}" for i in range(n)}, "dev-admin-key": "admin"}


def _child(settings: Settings, name: str, argv: list[str], logfile: Path) -> Child:
    """A part of the stack as a child with ``settings`` in its environment, output appended to ``logfile``."""
    return Child(name, argv, extra_env={**settings.child_env(), "PYTHONUNBUFFERED": "1"}, logfile=logfile,
                 cwd=REPO_ROOT)


def _seed_key(settings: Settings) -> str:
    """What the seed depends on: the code of ``models/`` (training, features, rules, export) and the corpus."""
    digest = hashlib.sha256(str(settings.corpus_dir or "npm").encode())
    root = REPO_ROOT / "models"
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".cf")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def seed_registry(settings: Settings) -> None:
    """Put the seed model (``flywheel setup``'s) in the empty registry of ``settings``.

    It is trained once per version of the code and kept under the downloads directory: every stack a benchmark
    or a test session starts begins from the same seed, and training it each time would cost each of them the
    same seconds of CPU. Several processes may build it at once; the first rename wins."""
    from models.corpus import load_corpus
    from models.seed import train_seed

    cache = settings.downloads / "seed-cache" / _seed_key(settings)
    if not (cache / "champion").is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=".building-", dir=cache.parent))
        try:
            train_seed(load_corpus(settings.downloads, settings.corpus_dir), building)
            with contextlib.suppress(OSError):  # another process renamed its copy first: the same seed
                building.rename(cache)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    shutil.copytree(cache, settings.registry, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock", "tmp"))


class LocalStack:
    """See the module docstring. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(self, settings: Settings, root: Path, *, seed: bool = True, **overrides: Any) -> None:
        values: dict[str, Any] = {
            "state_dir": root, "registry_dir": None, "rules_path": None, "downloads_dir": settings.downloads,
            "topic_prefix": f"stack{uuid.uuid4().hex[:8]}", "api_port": free_port(), "spamd_port": free_port(),
            "worker_port": free_port(), "model_poll_s": min(settings.model_poll_s, 0.5),
        }
        values.update(overrides)
        self.settings: Settings = settings.model_copy(update=values)
        self.root = root
        self.seed = seed
        self.worker = _child(self.settings, "worker", [sys.executable, "-m", "services.worker"], root / "worker.log")
        self.api = _child(self.settings, "api", [sys.executable, "-m", "services.api"], root / "api.log")
        self._started_broker = False
        self._http: httpx.Client | None = None
        self._quiet: tuple[int, float] | None = None  # (data_version, since) while the worker looks idle

    @classmethod
    def attach(cls, settings: Settings) -> LocalStack:
        """Helpers over a stack that is already running with ``settings`` (nothing is started or stopped)."""
        stack = cls.__new__(cls)
        stack.settings, stack.root, stack.seed = settings, settings.state_dir, False
        stack.worker = _child(settings, "worker", [], settings.state_dir / "worker.log")
        stack.api = _child(settings, "api", [], settings.state_dir / "api.log")
        stack._started_broker, stack._http, stack._quiet = False, None, None
        return stack

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, *, api: bool = True, worker: bool = True, timeout_s: float = 300.0) -> LocalStack:
        from services.local import broker
        from streams import admin
        from streams.topics import topic_specs

        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        if s.manages_kafka and not admin.answers_metadata(s.streams(), 2.0):
            broker.ensure_jars(s.streams())
            broker.start(s.streams())
            self._started_broker = True
        admin.ensure_topics(s.streams(), topic_specs(s.streams()))
        if self.seed and self.registry().champion() is None:
            seed_registry(s)
        if worker:
            self.worker.start()
            wait_until(lambda: self.registry().champion() is not None or not self.worker.alive(), timeout_s,
                       "a champion in the registry", 0.2)
            self._require_alive(self.worker, "worker")
        if api:
            self.api.start()
            wait_until(lambda: self._ready() or not self.api.alive(), timeout_s, "the API to be ready", 0.2)
            self._require_alive(self.api, "API")
        if worker:
            wait_until(lambda: self.worker_up() or not self.worker.alive(), timeout_s, "the worker's metrics", 0.2)
            self._require_alive(self.worker, "worker")
        return self

    def _require_alive(self, proc: Child, name: str) -> None:
        if not proc.alive():
            raise RuntimeError(f"the {name} exited during start-up; its log ends:\n{proc.log_tail(30)}")

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        self.api.stop()
        self.worker.stop()
        if self._started_broker:
            from services.local import broker

            broker.stop(self.settings.streams())
            self._started_broker = False

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:  # a stack that failed to start leaves nothing running (its broker nodes included)
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP, as users do --------------------------------------------------------------------------------------
    @property
    def http(self) -> httpx.Client:
        import httpx

        if self._http is None:
            self._http = httpx.Client(base_url=f"http://127.0.0.1:{self.settings.api_port}", timeout=60.0,
                                      limits=httpx.Limits(max_connections=16))
        return self._http

    def _ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def worker_up(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.settings.worker_port}/metrics", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def classify(self, raw: bytes) -> dict[str, Any]:
        r = self.http.post("/classify", content=raw, headers={"content-type": "message/rfc822"})
        r.raise_for_status()
        return dict(r.json())

    def classify_many(self, raws: Sequence[bytes], threads: int = 4,
                      progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """``/classify`` every message (a few connections at once, as several mail servers would)."""
        out: list[dict[str, Any] | None] = [None] * len(raws)

        def one(i: int) -> None:
            out[i] = self.classify(raws[i])
            if progress is not None:
                progress(i)

        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(one, range(len(raws))))
        return [o for o in out if o is not None]

    def flag(self, label: str, key: str, *, raw: bytes | None = None, message_id: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"label": label}
        if message_id is not None:
            body["message_id"] = message_id
        else:
            assert raw is not None
            body["raw"] = raw.decode("utf-8", "surrogateescape")
        return self.http.post("/feedback", json=body, headers={"X-API-Key": key})

    # -- the worker's state, read-only ------------------------------------------------------------------------
    def registry(self) -> Registry:
        from models.registry import Registry

        return Registry(self.settings.registry)

    @contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        path = self.settings.state_dir / "worker" / "labels.db"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            yield conn
        finally:
            conn.close()

    def counters(self) -> dict[str, int]:
        try:
            with self.db() as c:
                return {k: int(v) for k, v in c.execute("SELECT name, value FROM counters").fetchall()}
        except sqlite3.OperationalError:
            return {}

    def worker_metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The sum of the samples on the worker's /metrics page whose labels include ``labels`` (None when none)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.settings.worker_port}/metrics", timeout=5.0).text
        found = [float(sample.value) for fam in text_string_to_metric_families(text) for sample in fam.samples
                 if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items())]
        return sum(found) if found else None

    def backlog(self) -> int:
        """Records on the feedback topic the worker has not applied yet (end offsets against its store)."""
        from kafka import TopicPartition

        from streams.topics import Topics, plain_consumer

        topic = Topics.from_config(self.settings.streams()).feedback
        consumer = plain_consumer(self.settings.streams(), "flywheel-bench-backlog", request_timeout_ms=10_000)
        try:
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            ends = consumer.end_offsets(parts)
        finally:
            consumer.close()
        done = self.applied_offsets(topic)
        return sum(max(0, int(end) - 1 - done.get(tp.partition, -1)) for tp, end in ends.items())

    def applied_offsets(self, topic: str) -> dict[int, int]:
        """The last offset of ``topic`` the worker applied, by partition (from its store, so exact, unlike
        counters that other records may move too)."""
        try:
            with self.db() as c:
                return {int(p): int(o) for t, p, o in c.execute("SELECT topic, partition, offset FROM offsets")
                        if t == topic}
        except sqlite3.OperationalError:
            return {}

    def settled(self, quiet_s: float = 3.0) -> bool:
        """The worker applied every record on the topic, the gate judged a refit on everything it has, nothing
        is training, and that has held for ``quiet_s`` seconds."""
        if self.backlog():
            self._quiet = None
            return False
        version = self.counters().get("data_version", 0)
        busy = sum(self.worker_metric("flywheel_training_in_progress", {"kind": k}) or 0 for k in ("linear", "neural"))
        judged = self.worker_metric("flywheel_worker_judged_data_version")
        if busy or judged is None or judged < version:
            self._quiet = None
            return False
        now = time.monotonic()
        if self._quiet is None or self._quiet[0] != version:
            self._quiet = (version, now)
        return now - self._quiet[1] >= quiet_s
