"""The serving state of one API process: the current Classifier, its hot reload, the small caches, the bounded
classification pool (services.api.offload) and the feedback limiter (services.api.limits).

Swapping is one attribute assignment (``self.classifier = new``), atomic under the GIL: a request reads the
reference once at its start and finishes on that object even if a reload lands meanwhile. Every load, rule
compile and self-check happens on the reloader thread, never on the request path; a version that fails to
load is refused (metric + log), remembered so it is not retried every poll, and the champion keeps serving.

Several uvicorn workers share nothing in memory, so what a request in one worker must find from another
(a message id classified elsewhere, an idempotency key, the event a retraction refers to) also lives in
small file stores under ``<state_dir>/api/`` when more than one worker serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from services.api import metrics

if TYPE_CHECKING:

    from models.campaign import CampaignIndex
    from models.classifier import Classifier
    from models.registry import LoadedModel, Registry
    from models.rules import RuleEngine
    from services.settings import Settings
    from streams.topics import EventProducer

log = structlog.get_logger(__name__)

MAX_CACHED_RAW_BYTES = 512 * 1024
"""Only this much of a message is kept for feedback (what a feedback event carries)."""


# --------------------------------------------------------------------------------------------- file store
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
"""A record's temporary file is never opened through a link planted in the store, nor inherited by a child."""


class FileStore:
    """A bounded directory of small records keyed by hex digests, shared by worker processes.

    Writes are temp-file + ``os.replace`` so a reader sees a whole record or none; ``claim`` is an
    ``O_EXCL`` create so exactly one process wins a race (used to make idempotent retries produce once).

    Bounded in entries and, with ``max_bytes``, in bytes: each process prunes (oldest first) after every tenth
    of the entry bound it wrote, or every sixteenth of the byte bound, and once when it opens the store, so
    the directory exceeds ``max_bytes`` by at most one sixteenth per writing process.
    """

    def __init__(self, root: Path, max_entries: int, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_entries = max(16, max_entries)
        self.max_bytes = max_bytes
        self._writes = 0
        self._written = 0
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        if max_bytes is not None:
            self.prune()  # a spool left by an earlier run (maybe under a larger bound)

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:40]

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def put(self, key: str, value: bytes) -> None:
        # The temporary name is this thread's own (process id and thread id): no other writer uses it, so a plain
        # create-or-truncate replaces mkstemp's random names and exclusive-create retries (a third of the cost of
        # a record on the /classify path).
        tmp = os.path.join(self.root, f".tmp-{os.getpid()}-{threading.get_native_id()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NO_FOLLOW, 0o600)
            try:
                view = memoryview(value)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, self._path(key))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._count_write(len(value))

    def put_if_absent(self, key: str, value: bytes) -> None:
        if not self._path(key).exists():
            self.put(key, value)

    def claim(self, key: str) -> bool:
        """Create ``key.claim`` exclusively; True for the one caller that created it."""
        try:
            fd = os.open(self._path(key + ".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            # A claim left by a crashed process must not block the key forever.
            with contextlib.suppress(FileNotFoundError):
                if time.time() - self._path(key + ".claim").stat().st_mtime > 60:
                    os.unlink(self._path(key + ".claim"))
            return False
        os.close(fd)
        return True

    def release(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key + ".claim"))

    def _count_write(self, size: int) -> None:
        with self._lock:
            self._writes += 1
            self._written += size
            due = self._writes % max(64, self.max_entries // 10) == 0
            if self.max_bytes is not None and self._written > self.max_bytes // 16:
                due = True
            if due:
                self._written = 0
        if due:
            self.prune()

    def prune(self) -> None:
        """Drop the oldest records (by modification time) beyond ``max_entries`` and ``max_bytes``."""
        entries: list[tuple[float, int, str]] = []
        try:
            with os.scandir(self.root) as it:
                for e in it:
                    if e.name.startswith(".") or not e.is_file():
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat()
                        entries.append((st.st_mtime, st.st_size, e.path))
        except FileNotFoundError:
            return
        total = sum(size for _, size, _ in entries)
        limit = self.max_bytes if self.max_bytes is not None else float("inf")
        if len(entries) <= self.max_entries and total <= limit:
            return
        entries.sort()
        n = len(entries)
        for _, size, path in entries:
            if n <= self.max_entries and total <= limit:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            n -= 1
            total -= size

    def size(self) -> tuple[int, int]:
        """(records, bytes) on disk now."""
        n = total = 0
        with os.scandir(self.root) as it:
            for e in it:
                if not e.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        total += e.stat().st_size
                        n += 1
        return n, total


# --------------------------------------------------------------------------------------------- message cache
class MessageCache:
    """Recent classified messages by id (bounded LRU by count and bytes), for feedback by message id.

    Each entry also keeps the verdict served for it (version, spam or not, probability), so a later flag on
    the message carries a free label for that answer (see ``streams.events.ServedVerdict``). With several
    workers every entry is also spooled to a shared ``FileStore`` so another worker finds it. Both kinds of
    record live in the spool under keys derived from their kind and the id (``spool_key``), never under the id
    itself: a message id a client sends can then name only a message, not a served-verdict record (which a
    flag would otherwise carry to the worker as if it were the message).
    """

    def __init__(self, max_entries: int, max_bytes: int, spool: FileStore | None) -> None:
        self._max_entries = max(1, max_entries)
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, tuple[bytes, bytes | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._spool = spool

    def put(self, message_id: str, raw: bytes, served: dict[str, Any] | None = None) -> None:
        raw = raw[:MAX_CACHED_RAW_BYTES]
        verdict = orjson.dumps(served) if served is not None else None
        with self._lock:
            old = self._items.pop(message_id, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._items[message_id] = (raw, verdict)
            self._bytes += len(raw)
            while self._items and (len(self._items) > self._max_entries or self._bytes > self._max_bytes):
                _, (dropped, _) = self._items.popitem(last=False)
                self._bytes -= len(dropped)
            fresh = old is None
            # the same message answered the same way again: the spool already holds both records from this
            # worker (rewriting an existing file costs more than scoring the message)
            unchanged = old is not None and old[1] == verdict
        if self._spool is not None and not unchanged:
            try:
                if fresh:
                    self._spool.put_if_absent(spool_key("message", message_id), raw)
                if verdict is not None:
                    self._spool.put(spool_key("served", message_id), verdict)
            except OSError as exc:  # a full disk must not fail /classify; feedback by raw still works
                log.warning("message spool write failed", error=str(exc))

    def get(self, message_id: str) -> bytes | None:
        with self._lock:
            item = self._items.get(message_id)
            if item is not None:
                self._items.move_to_end(message_id)
                return item[0]
        if self._spool is not None and _is_hex(message_id):
            return self._spool.get(spool_key("message", message_id))
        return None

    def served(self, message_id: str) -> dict[str, Any] | None:
        """The verdict last served for ``message_id`` (``version``, ``is_spam``, ``probability``), if known."""
        with self._lock:
            item = self._items.get(message_id)
        data = item[1] if item is not None else None
        if data is None and self._spool is not None:
            data = self._spool.get(spool_key("served", message_id))
        return orjson.loads(data) if data else None

    def __len__(self) -> int:
        return len(self._items)


def spool_key(kind: str, message_id: str) -> str:
    """The spool's key of a ``kind`` ("message" or "served") record of ``message_id``: a digest of both, so no
    id names another kind's record."""
    return FileStore.key("spool", kind, message_id)


def _is_hex(s: str) -> bool:
    return 0 < len(s) <= 64 and all(c in "0123456789abcdef" for c in s)


# --------------------------------------------------------------------------------------------- feedback records
FEEDBACK_RECORDS_PER_SOURCE = 100_000
"""Records (two per flag) one source's store keeps, oldest dropped first."""


class FeedbackRecords:
    """Who flagged what, for retractions: the event behind each flag and each reporter's last flag on a message.

    One bounded ``FileStore`` per source (the key identity a flag came through, or a spamd client address), so a
    flood from one relay or key evicts only its own records, never the records other reporters need to retract
    their flags. Lookups try the caller's source first, then every other (an administrator retracts anyone's
    flag; a spamd user may come through another address), then the single store of earlier versions.
    """

    def __init__(self, root: Path, per_source: int = FEEDBACK_RECORDS_PER_SOURCE) -> None:
        self.root = root
        self.per_source = per_source
        self._stores: dict[str, FileStore] = {}
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, source: str) -> Path:
        return self.root / ("source-" + FileStore.key("source", source)[:32])

    def store(self, source: str) -> FileStore:
        d = self._dir(source)
        with self._lock:
            st = self._stores.get(d.name)
            if st is None:
                st = self._stores[d.name] = FileStore(d, self.per_source)
            return st

    def _candidates(self, source: str | None) -> Iterator[Path]:
        first = self._dir(source) if source is not None else None
        if first is not None:
            yield first
        try:
            with os.scandir(self.root) as it:
                others = [Path(e.path) for e in it if e.name.startswith("source-") and e.is_dir()]
        except FileNotFoundError:
            others = []
        yield from (d for d in others if d != first)
        yield self.root  # records written before stores were per source

    def _find(self, key: str, source: str | None) -> tuple[Path, bytes] | None:
        for d in self._candidates(source):
            try:
                return d / key, (d / key).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
        return None

    def remember(self, event_id: str, message_id: str, reporter: str, source: str) -> None:
        rec = orjson.dumps({"event_id": event_id, "message_id": message_id, "reporter": reporter, "source": source})
        st = self.store(source)
        st.put(FileStore.key("event", event_id), rec)
        st.put(FileStore.key("last", reporter, message_id), rec)

    def event(self, event_id: str, source: str | None = None) -> dict[str, Any] | None:
        found = self._find(FileStore.key("event", event_id), source)
        return orjson.loads(found[1]) if found else None

    def last(self, reporter: str, message_id: str, source: str | None = None) -> dict[str, Any] | None:
        found = self._find(FileStore.key("last", reporter, message_id), source)
        return orjson.loads(found[1]) if found else None

    def forget_last(self, reporter: str, message_id: str, source: str | None = None) -> None:
        found = self._find(FileStore.key("last", reporter, message_id), source)
        if found is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(found[0])


# --------------------------------------------------------------------------------------------- serving state
@dataclass(frozen=True, slots=True)
class Served:
    """One consistent snapshot: the classifier and what it was built from (swapped as a unit)."""

    classifier: Classifier
    engine: RuleEngine
    model: LoadedModel

    @property
    def version(self) -> str:
        return self.model.version


class ServingState:
    """Everything one API process serves from; created in the app lifespan, shared by HTTP and spamd."""

    def __init__(self, settings: Settings) -> None:
        from models.message import configure_trusted_authserv_ids
        from models.registry import Registry
        from models.userlists import UserListStore
        from streams.topics import EventProducer, Topics

        self.settings = settings
        configure_trusted_authserv_ids(settings.trusted_authserv_ids)  # what parse() takes as evidence
        self.registry: Registry = Registry(settings.registry)
        # per-user allow and block lists: in the registry directory every replica shares (models.userlists)
        self.user_lists = UserListStore(settings.registry / "user-lists", settings.user_list_learn_after)
        self.topics = Topics.from_config(settings.streams())
        self.producer: EventProducer = EventProducer(settings.streams(), client_id=f"flywheel-api-{os.getpid()}")
        api_dir = settings.state_dir / "api"
        shared = settings.workers > 1
        self.messages = MessageCache(
            settings.message_cache_size,
            max_bytes=256 * 1024 * 1024,
            spool=FileStore(api_dir / "messages", settings.message_cache_size, settings.message_spool_bytes)
            if shared else None,
        )
        from services.api.limits import FeedbackLimiter
        from services.api.offload import ClassifyPool

        self.classify_pool = ClassifyPool(settings.classify_threads, settings.classify_queue)
        self.limiter = FeedbackLimiter.from_settings(api_dir / "limits.sqlite3", settings)
        # Idempotency keys and feedback records are always on disk: low rate, and they must survive a worker
        # restart between a client's attempt and its retry.
        self.idempotency = FileStore(api_dir / "idempotency", 10_000)
        self.feedback_records = FeedbackRecords(api_dir / "feedback")
        self.served: Served | None = None
        self.rejected: dict[str, str] = {}
        self.campaign: CampaignIndex | None = None
        if settings.campaign_memory:
            from models.campaign import CampaignIndex

            self.campaign = CampaignIndex(settings.campaign_capacity, settings.campaign_threshold)
        self._rules_stamp: tuple[int, int] | None = None
        self._reload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._kafka_ok: tuple[float, bool] = (0.0, False)

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        """Load rules and the champion (blocking, before serving), then start the reload threads."""
        loops = [(self._reload_loop, "flywheel-reloader"), (self._events_loop, "flywheel-events")]
        if self.settings.model_source == "kafka":
            from services.api.follow import ModelFollower

            follower = ModelFollower(self.settings, self.registry, self.request_check)
            if self.registry.champion() is None:  # `flywheel serve` has caught up before starting the workers
                follower.catch_up(self.settings.model_bootstrap_timeout_s)
            loops.append((lambda: follower.run(self._stop), "flywheel-models"))
        version = require_champion(self.settings, self.registry)
        engine = self._load_rules_from_disk(initial=True)
        model = self._first_servable(version)
        self._install(engine, model)
        metrics.MODEL_RELOADS.labels("ok").inc()
        if self.campaign is not None:
            loops.append((self._campaign_loop, "flywheel-campaigns"))
        for target, name in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _first_servable(self, champion: str) -> LoadedModel:
        """The champion, or, when its artifact is refused, the most recent earlier champion that loads.

        A restart must not turn a bad pointer into an outage; the refusal is logged and counted, and the
        pointer poll keeps checking, so a fixed champion is picked up later.
        """
        from models.registry import ModelRejected

        candidates = [champion]
        for rec in reversed(self.registry.history()):
            for v in (rec.get("version"), rec.get("previous")):
                if isinstance(v, str) and v not in candidates:
                    candidates.append(v)
        first_reason = ""
        for v in candidates:
            try:
                model = self.registry.load(v, max_bytes=self.settings.analyse_bytes)
            except ModelRejected as exc:
                metrics.MODEL_RELOADS.labels("rejected").inc()
                self.rejected[v] = exc.reason
                first_reason = first_reason or exc.reason
                log.error("model refused at start", version=v, reason=exc.reason)
                continue
            if v != champion:
                log.error("champion refused; serving an earlier champion", champion=champion, serving=v,
                          reason=first_reason)
            return model
        raise RuntimeError(f"no servable model: champion {champion} refused ({first_reason}) and no earlier "
                           "champion loads")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=3.0)
        self.classify_pool.shutdown()
        self.producer.close(timeout_s=1.0)
        self.limiter.close()

    # ------------------------------------------------------------------ building / swapping
    def _build(self, engine: RuleEngine, model: LoadedModel) -> Classifier:
        from models.classifier import Classifier

        return Classifier(engine, model, policy=self.settings.policy, max_bytes=self.settings.analyse_bytes,
                          campaign=self.campaign)

    def _install(self, engine: RuleEngine, model: LoadedModel) -> None:
        classifier = self._build(engine, model)
        self.served = Served(classifier=classifier, engine=engine, model=model)  # the atomic swap
        metrics.set_model_info(model.version, model.kind, model.provider)
        metrics.RULES_ACTIVE.set(engine.active_count)

    def learn_user_list(self, reporter: str, raw: bytes, label: str) -> str | None:
        """Count an accepted flag towards its user's lists (the sender allowed or blocked for them alone after
        ``user_list_learn_after`` consistent flags); the list it moved to, if any. Never fails the flag."""
        from models.userlists import list_user, sender_of

        try:
            moved = self.user_lists.learn(list_user(reporter), sender_of(raw), label)
        except OSError as exc:
            log.warning("user list not updated", reporter=reporter, error=str(exc))
            return None
        if moved is not None:
            log.info("user list learned", user=list_user(reporter), list=moved)
        return moved

    def current(self) -> Served:
        served = self.served
        if served is None:
            raise RuntimeError("no model loaded")
        return served

    # ------------------------------------------------------------------ rules
    def _rules_file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.settings.rules_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load_rules_from_disk(self, initial: bool = False) -> RuleEngine:
        from models.rules import RuleEngine

        path = self.settings.rules_file
        with rules_lock(path):
            stamp = self._rules_file_stamp()
            if stamp is None:
                engine = RuleEngine.default()
                path.parent.mkdir(parents=True, exist_ok=True)
                engine.save(path)
                stamp = self._rules_file_stamp()
            else:
                engine = RuleEngine.load(path)
        self._rules_stamp = stamp
        return engine

    def change_rules(self, change: Callable[[RuleEngine], RuleEngine]) -> RuleEngine:
        """Apply ``change`` to the rule set on disk under the cross-process lock, persist it and serve it."""
        from models.rules import RuleEngine

        path = self.settings.rules_file
        with self._reload_lock, rules_lock(path):
            stamp = self._rules_file_stamp()
            # Re-read only when another process changed the file since this one loaded it (a compile costs
            # seconds on a busy machine); under the lock the file cannot change meanwhile.
            if stamp is not None and stamp != self._rules_stamp:
                base = RuleEngine.load(path)
            else:
                base = self.current().engine
            engine = change(base)
            engine.save(path)
            self._rules_stamp = self._rules_file_stamp()
            self._install(engine, self.current().model)
        return engine

    # ------------------------------------------------------------------ reload
    def request_check(self) -> None:
        """Wake the reloader now (a model or rule event arrived, or this process promoted)."""
        self._wake.set()

    def check_once(self) -> None:
        """Compare the champion pointer and the rules file with what is served; reload what changed."""
        from models.registry import ModelRejected
        from models.rules import RuleError

        with self._reload_lock:
            served = self.current()
            engine = served.engine
            stamp = self._rules_file_stamp()
            if stamp is not None and stamp != self._rules_stamp:
                try:
                    engine = self._load_rules_from_disk()
                    log.info("rules reloaded", active=engine.active_count)
                except (RuleError, OSError, ValueError) as exc:
                    self._rules_stamp = stamp  # refuse this file version; keep serving the current rules
                    log.error("rules file refused", error=str(exc))
            model = served.model
            version = self.registry.champion()
            if version and version != served.version and version not in self.rejected:
                try:
                    model = self.registry.load(version, max_bytes=self.settings.analyse_bytes)
                except ModelRejected as exc:
                    self.rejected[version] = exc.reason
                    metrics.MODEL_RELOADS.labels("rejected").inc()
                    log.error("model refused; keeping the current champion", version=version,
                              serving=served.version, reason=exc.reason)
                else:
                    metrics.MODEL_RELOADS.labels("ok").inc()
                    log.info("model reloaded", version=version, previous=served.version)
            if engine is not served.engine or model is not served.model:
                self._install(engine, model)

    def adopt(self, model: LoadedModel) -> None:
        """Serve an already loaded and self-checked version if it is the champion (saves this process a second
        load after it validated the version for a promotion)."""
        with self._reload_lock:
            served = self.current()
            if self.registry.champion() == model.version and served.version != model.version:
                self._install(served.engine, model)
                metrics.MODEL_RELOADS.labels("ok").inc()
                log.info("model reloaded", version=model.version, previous=served.version)

    def _reload_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=max(0.05, self.settings.model_poll_s))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_once()
            except Exception:  # the reloader must survive anything and keep the champion
                log.exception("reload check failed")

    def _events_loop(self) -> None:
        """Follow the model-events and rule-changes topics from their end (no consumer group)."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        from services.api.follow import follower_consumer
        from streams.events import EventInvalid, ModelEvent, RuleChangeEvent, decode

        wanted = (self.topics.model_events, self.topics.rule_changes)
        backoff = 0.5
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = follower_consumer(self.settings, "reload")
                parts = []
                for topic in wanted:
                    for p in consumer.partitions_for_topic(topic) or ():
                        parts.append(TopicPartition(topic, p))
                if not parts:
                    raise KafkaError("event topics do not exist yet")
                consumer.assign(parts)
                consumer.seek_to_end(*parts)
                for tp in parts:  # resolve the end offsets now, so events published from here on are seen
                    consumer.position(tp)
                log.info("following model and rule events", partitions=len(parts))
                backoff = 0.5
                while not self._stop.is_set():
                    batches = consumer.poll(timeout_ms=500)
                    for records in batches.values():
                        for rec in records:
                            try:
                                ev = decode(rec.value)
                            except EventInvalid:
                                continue
                            if isinstance(ev, ModelEvent | RuleChangeEvent):
                                log.info("event received", type=ev.type, event_id=ev.event_id)
                                self.request_check()
            except Exception as exc:  # noqa: BLE001 - Kafka down: the pointer poll still reloads; retry later
                log.debug("event follower retrying", error=str(exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close()

    def _campaign_loop(self) -> None:
        """Follow the compacted campaign topic from its beginning: every trusted label's fingerprint, whenever
        it was published, ends up in this replica's campaign memory (a tombstone removes one)."""
        from services.api.follow import TopicFollower

        memory = self.campaign
        assert memory is not None

        def gauges() -> None:
            spam = memory.spam_count()
            metrics.CAMPAIGN_FINGERPRINTS.labels("spam").set(spam)
            metrics.CAMPAIGN_FINGERPRINTS.labels("ham").set(len(memory) - spam)

        TopicFollower(self.settings, self.topics.campaigns, "campaigns", self.apply_campaign_record, gauges).run(self._stop)

    def apply_campaign_record(self, key: bytes | None, value: bytes | None) -> None:
        """One campaign-topic record into this replica's memory (a fingerprint, or a tombstone withdrawing one)."""
        from streams.campaign import decode_campaign
        from streams.events import EventInvalid

        memory = self.campaign
        if memory is None or key is None:
            return
        message_id = key.decode("utf-8", "replace")
        if value is None:
            memory.remove(message_id)
            metrics.CAMPAIGN_RECORDS.labels("withdrawn").inc()
        else:
            try:
                rec = decode_campaign(value)
            except EventInvalid as exc:
                metrics.CAMPAIGN_RECORDS.labels("invalid").inc()
                log.warning("campaign record refused", message_id=message_id, reason=exc.reason)
                return
            memory.add(rec.message_id, rec.values(), rec.label)
            metrics.CAMPAIGN_RECORDS.labels("fingerprint").inc()

    # ------------------------------------------------------------------ Kafka readiness
    def kafka_reachable(self, ttl_s: float = 3.0) -> bool:
        """A TCP connect to a bootstrap server, cached ``ttl_s`` so /readyz stays cheap under probing."""
        at, ok = self._kafka_ok
        now = time.monotonic()
        if now - at < ttl_s:
            return ok
        ok = False
        for server in self.settings.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=0.5):
                    ok = True
                    break
            except (OSError, ValueError):
                continue
        self._kafka_ok = (now, ok)
        return ok

    # ------------------------------------------------------------------ feedback records
    def remember_feedback(self, event_id: str, message_id: str, reporter: str, source: str) -> None:
        """Keep what a retraction of this flag needs, in its source's share of the records."""
        self.feedback_records.remember(event_id, message_id, reporter, source)

    def feedback_record(self, event_id: str, source: str | None = None) -> dict[str, Any] | None:
        return self.feedback_records.event(event_id, source)

    def last_feedback(self, reporter: str, message_id: str, source: str | None = None) -> dict[str, Any] | None:
        return self.feedback_records.last(reporter, message_id, source)

    def forget_last_feedback(self, reporter: str, message_id: str, source: str | None = None) -> None:
        self.feedback_records.forget_last(reporter, message_id, source)


@contextlib.contextmanager
def rules_lock(path: Path) -> Iterator[None]:
    """Cross-process lock around read-modify-write of the rules file (replicas sharing a state dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class NoChampion(RuntimeError):
    """The registry holds no model to serve: serving never trains one (``flywheel setup`` does)."""


def require_champion(settings: Settings, registry: Registry | None = None) -> str:
    """The champion's version, or :class:`NoChampion` naming the registry and the command that fills it.

    Training belongs to set-up (``flywheel setup``, ``flywheel models seed``) and the worker: an API replica that
    trained its own seed would load torch and the corpus into the serving path, and two replicas starting on an
    empty registry would each train one."""
    from models.registry import Registry

    reg = registry or Registry(settings.registry)
    version = reg.champion()
    if not version and settings.model_source == "kafka":
        raise NoChampion(f"no champion on the models topic within {settings.model_bootstrap_timeout_s:.0f} s "
                         "(model_source=kafka): is a worker with publish_models running on these brokers?")
    if not version:
        raise NoChampion(f"no champion in the model registry {settings.registry}: run `flywheel setup` (or "
                         "`flywheel models seed`) first, or point FLYWHEEL_REGISTRY_DIR at a registry that has one")
    return version
