"""``flywheel bench scale``: API replicas that share nothing with the worker but Kafka.

On the real broker: a worker (a :class:`~services.bench.harness.LocalStack`, its registry on its own disk) and two
API replicas started with ``model_source=kafka``, each with a state directory of its own (no registry directory in
common with anyone). The replicas bootstrap the champion from the models topic; then a new version is promoted on
the worker's registry, as the gate or an operator does, ``repeats`` times:

* ``replica_converge_s``: from the promotion until both replicas answer ``/classify`` with the new version (worst
  of the repeats; target <= 10 s);
* ``replica_bootstrap_s``: from a replica's start on an empty disk until it serves (the champion read from Kafka).

Then the worker image's lease (``deploy/worker/flywheel-worker-leased``) run twice on one state directory, a worker
and its standby, with flags streaming through the API: the active worker is SIGKILLed. ``takeover_s`` is the time
until the standby has applied a flag acknowledged after the kill (target <= 30 s), ``takeover_lost_flags`` the
acknowledged flags the store does not hold once the standby caught up (target 0), and the flags stored twice.

Then a three-node local KRaft cluster (``kafka_nodes = 3``: every topic on three nodes, min.insync.replicas 2) with
a worker and an API on it: flags stream through ``POST /feedback`` while one node is SIGKILLed and, later,
restarted. ``broker_kill_lost_flags`` counts the flags the API acknowledged (202, with their partition and offset)
that the worker's store does not hold once it has caught up (target 0); flags answered 503 while the cluster
elected new leaders were never acknowledged and are counted apart. ``broker_kill_replicas``: the fewest replicas of
any partition of the project's topics on that cluster (3).

Last, ``manifests_valid``: compose file, Dockerfiles, Helm chart and its rendered manifests validated offline
(``services.bench.manifests``), with the validators' versions.

After the takeover, the standby stops and a worker on an empty disk rebuilds its store from the log
(``rebuild_equal``: every table equal to the standby's; ``services.worker.journal``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from services.bench.api_process import ApiProcess
from services.bench.harness import LocalStack, reporter_keys
from services.bench.manifests import install_tools, validate_manifests
from services.local import broker
from services.local.daemon import Child, free_port, free_port_run, wait_until
from services.settings import REPO_ROOT
from streams import admin
from streams.topics import Topics, topic_specs

if TYPE_CHECKING:
    from services.settings import Settings

log = structlog.get_logger(__name__)

__all__ = ["TARGETS", "run_scale_bench"]

TARGETS = {"replica_converge_s": 10.0, "takeover_s": 30.0, "takeover_lost_flags": 0, "broker_kill_lost_flags": 0}
PROBE = b"Subject: which model answers?\r\nFrom: probe@example.com\r\n\r\nA message to ask the replicas their version.\r\n"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _served_version(http: httpx.Client) -> str | None:
    try:
        r = http.post("/classify", content=PROBE, headers={"Content-Type": "message/rfc822"})
    except httpx.HTTPError:
        return None
    return str(r.json()["model"]["version"]) if r.status_code == 200 else None


class FlagStream:
    """Flags sent through ``POST /feedback`` by a thread, one after another, until stopped: what the API
    acknowledged (202: partition and offset) and what it refused (by status), as a mail client would see it.

    With ``mail`` ((raw, is spam) pairs), each message is flagged by two users in turn, one label in ten wrong:
    labels by consensus and reputations that move (the models judge corpus mail with confidence); past it (or
    without it), every flag is a new synthetic message (a user flagging a message twice stores one vote)."""

    def __init__(self, stack: LocalStack, users: list[str], mail: list[tuple[bytes, bool]] | None = None) -> None:
        self.stack = stack
        self.users = users
        self.mail = mail or []
        self.acked: list[tuple[int, int]] = []
        self.refused: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True, name="flag-stream")

    def __enter__(self) -> FlagStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _send(self) -> None:
        i = 0
        while not self._stop.is_set():
            if i // 2 < len(self.mail):
                raw, spam = self.mail[i // 2]
                label = "spam" if spam != (i % 10 == 3) else "ham"
            else:
                raw = f"Subject: scale flag {i} {time.time_ns()}\r\nFrom: s{i}@example.com\r\n\r\nbody {i}\r\n".encode()
                label = "spam"
            try:
                r = self.stack.flag(label, self.users[i % len(self.users)], raw=raw)
            except httpx.HTTPError as exc:
                self.refused[type(exc).__name__] = self.refused.get(type(exc).__name__, 0) + 1
            else:
                if r.status_code == 202:
                    body = r.json()
                    self.acked.append((int(body["partition"]), int(body["offset"])))
                else:
                    self.refused[f"HTTP {r.status_code}"] = self.refused.get(f"HTTP {r.status_code}", 0) + 1
            i += 1

    def wait_for(self, more: int, timeout_s: float, what: str) -> None:
        """Until ``more`` flags beyond those acknowledged now are acknowledged."""
        target = len(self.acked) + more
        wait_until(lambda: len(self.acked) >= target, timeout_s, what, 0.05)

    def stored(self, timeout_s: float = 300.0) -> tuple[int, int]:
        """Once the worker applied every acknowledged offset: (acknowledged but not stored, stored twice)."""
        topic = Topics.from_config(self.stack.settings.streams()).feedback
        last: dict[int, int] = {}
        for p, o in self.acked:
            last[p] = max(o, last.get(p, -1))
        wait_until(lambda: all(self.stack.applied_offsets(topic).get(p, -1) >= o for p, o in last.items()),
                   timeout_s, "the worker to store every acknowledged flag", 0.5)
        with self.stack.db() as db:
            rows = [(int(p), int(o)) for t, p, o in db.execute("SELECT topic, partition, offset FROM votes")
                    if t == topic]
        return len(set(self.acked) - set(rows)), len(rows) - len(set(rows))


def _users() -> tuple[dict[str, str], list[str]]:
    keys = reporter_keys(10, prefix="k-scale")
    return keys, [k for k in keys if k != "dev-admin-key"]


def broker_kill(settings: Settings, root: Path, *, flags: int = 300) -> dict[str, Any]:
    """Flags through the API on a three-node cluster while a node is killed and restarted (module docstring)."""
    port = free_port_run(3)
    cport = free_port_run(3, avoid=range(port, port + 3))
    keys, users = _users()
    cluster = settings.model_copy(update={"kafka_nodes": 3, "kafka_port": port, "kafka_controller_port": cport,
                                          "kafka_bootstrap": None})
    third = max(1, flags // 3)
    _say("==> three-node cluster, a worker and an API; flags stream in while node 2 of 3 is killed and restarted")
    with LocalStack(cluster, root, api_keys=keys, neural_retrain=False, linear_refit_s=86400.0,
                    campaign_memory=False) as stack:
        streams = stack.settings.streams()
        assert streams.kafka_nodes == 3 and streams.bootstrap_servers.count(",") == 2
        replicas = min(admin.topic_replicas(streams, [name for name, _ in topic_specs(streams)]).values())
        with FlagStream(stack, users) as stream:
            stream.wait_for(third, 120, "flags before the kill")
            pid = broker.node_daemon(streams, 1).pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            t_kill = time.monotonic()
            stream.wait_for(third, 180, "flags with a node down")
            broker.start(streams)  # the killed node only; back once all three are in the metadata again
            down_s = time.monotonic() - t_kill
            stream.wait_for(third, 120, "flags after the restart")
        lost, doubled = stream.stored()
    _say(f"    {len(stream.acked)} flags acknowledged ({down_s:.1f} s with a node down), "
         f"{sum(stream.refused.values())} refused {stream.refused}; acknowledged but not stored: {lost}")
    return {"broker_kill_lost_flags": lost, "broker_kill_doubled_flags": doubled,
            "broker_kill_acknowledged": len(stream.acked), "broker_kill_refused": stream.refused,
            "broker_kill_replicas": replicas,
            "broker_kill_node_down_s": round(down_s, 1)}


def takeover(settings: Settings, root: Path, *, flags: int = 200) -> dict[str, Any]:
    """The worker image's lease (``deploy/worker/flywheel-worker-leased``) run twice on one state directory: the
    active worker is SIGKILLed while flags stream in; ``takeover_s`` is the time until the standby has applied a
    flag acknowledged after the kill, ``takeover_lost_flags`` the acknowledged flags never stored.

    Then the standby stops and a worker on an empty disk rebuilds its store from the log (the feedback topic and
    the worker's journal, which the killed worker left mid-transaction): ``rebuild_equal`` says whether every
    table of the rebuilt store (labels, votes, reputations, their evidence, counters, live tallies, offsets, the
    kept mail) equals the standby's."""
    from models.corpus import load_corpus, split_p1
    from services.worker.journal import rebuild_store
    from services.worker.store import LabelStore

    train, _ = split_p1(load_corpus(settings.downloads, settings.corpus_dir))
    mail = [(m.raw, m.is_spam) for m in train if m.raw.isascii()]
    random.Random(0).shuffle(mail)  # spam and ham mixed, as users flag them
    keys, users = _users()
    lease = REPO_ROOT / "deploy" / "worker" / "flywheel-worker-leased"
    half = max(1, flags // 2)
    _say("==> a worker and its standby on one state directory (the image's lease); the active one is SIGKILLed")
    stack = LocalStack(settings, root, api_keys=keys, neural_retrain=False, linear_refit_s=86400.0,
                       campaign_memory=False)
    workers: list[Child] = []
    try:
        stack.start(worker=False)
        topic = Topics.from_config(stack.settings.streams()).feedback
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        for name in ("a", "b"):
            (root / name).mkdir(parents=True, exist_ok=True)
            env = {**stack.settings.child_env(), "PATH": path, "TMPDIR": str(root / name), "PYTHONUNBUFFERED": "1",
                   "FLYWHEEL_WORKER_PORT": str(stack.settings.worker_port if name == "a" else free_port())}
            workers.append(Child(f"worker-{name}", ["sh", str(lease)], extra_env=env, logfile=root / f"worker-{name}.log",
                                 cwd=REPO_ROOT).start())
            if name == "a":  # the first takes the lease and runs; the second waits for it
                wait_until(lambda: stack.worker_up() or not workers[0].alive(), 300, "the active worker", 0.2)
        wait_until(lambda: (root / "b" / "flywheel-standby").exists() or not workers[1].alive(), 60, "the standby", 0.1)
        assert workers[0].alive() and workers[1].alive(), workers[0].log_tail(20) + workers[1].log_tail(20)
        with FlagStream(stack, users, mail) as stream:
            stream.wait_for(half, 120, "flags to the active worker")
            wait_until(lambda: stack.applied_offsets(topic), 60, "the active worker to apply flags", 0.2)
            workers[0].stop(signal.SIGKILL)
            t_kill = time.monotonic()
            after = len(stream.acked)
            stream.wait_for(1, 60, "a flag acknowledged after the kill")
            first_after = stream.acked[after]
            wait_until(lambda: stack.applied_offsets(topic).get(first_after[0], -1) >= first_after[1], 300,
                       "the standby to apply a flag sent after the kill", 0.1)
            takeover_s = time.monotonic() - t_kill
            stream.wait_for(half, 120, "flags to the standby")
        lost, doubled = stream.stored()
        for w in workers:
            w.stop()

        def contents(settings_: Settings, rebuild: bool) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, int]]:
            store = LabelStore(settings_.state_dir / "worker" / "labels.db")
            try:
                applied_ = rebuild_store(settings_, store) if rebuild else {}
                return store.contents(), applied_
            finally:
                store.close()

        ran, _ = contents(stack.settings, rebuild=False)
        t0 = time.monotonic()
        again, applied = contents(stack.settings.model_copy(update={"state_dir": root / "rebuilt"}), rebuild=True)
        rebuild_s = time.monotonic() - t0
    finally:
        for w in workers:
            w.stop()
        stack.stop()
    differ = sorted(t for t in set(ran) | set(again) if ran.get(t) != again.get(t))
    reporters = ran.get("reporters", [])
    _say(f"    the standby applied flags {takeover_s:.1f} s after the active worker's SIGKILL; {len(stream.acked)} "
         f"acknowledged, {lost} not stored, {doubled} stored twice")
    _say(f"    rebuilt from the log on an empty disk in {rebuild_s:.1f} s ({applied['batches']} batches, "
         f"{applied['evidence']} evidence entries): {len(ran.get('labels', []))} labels, {len(reporters)} reporters, "
         + ("every table equal" if not differ else f"tables that differ: {differ}"))
    return {"takeover_s": round(takeover_s, 1), "takeover_lost_flags": lost, "takeover_doubled_flags": doubled,
            "takeover_acknowledged": len(stream.acked), "rebuild_equal": not differ, "rebuild_differs": differ,
            "rebuild_s": round(rebuild_s, 1), "rebuild_applied": applied,
            "rebuild_compared": {t: len(rows) for t, rows in ran.items()}}


def replica_convergence(settings: Settings, root: Path, *, repeats: int) -> dict[str, Any]:
    """A worker and two API replicas with ``model_source=kafka`` and state directories of their own; ``repeats``
    promotions on the worker's registry, each timed until both replicas answer ``/classify`` with it."""
    from models.corpus import load_corpus, split_p1
    from services.bench.api import train_quick_version

    train, _ = split_p1(load_corpus(settings.downloads, settings.corpus_dir))
    sample = train[:: max(1, len(train) // 300)][:300]
    _say("==> worker (its registry on its own disk) and the broker")
    stack = LocalStack(settings, root / "worker", neural_retrain=False, linear_refit_s=86400.0)
    replicas: list[ApiProcess] = []
    boot: list[float] = []
    converge: list[float] = []
    try:
        stack.start(api=False)  # the worker alone: the replicas are the API
        worker_registry = stack.registry()
        for i in range(2):
            s = stack.settings.model_copy(update={
                "state_dir": root / f"replica-{i}", "registry_dir": None, "rules_path": None,
                "model_source": "kafka", "api_port": free_port(), "spamd_port": free_port(), "workers": 1,
                "campaign_memory": False})
            t0 = time.monotonic()
            replicas.append(ApiProcess(s, root / f"replica-{i}.log").start())
            boot.append(time.monotonic() - t0)
            assert s.registry.resolve() != worker_registry.root.resolve()  # nothing shared but Kafka
        clients = [httpx.Client(base_url=r.base_url, timeout=10.0) for r in replicas]
        champion = worker_registry.champion()
        wait_until(lambda: all(_served_version(c) == champion for c in clients), 60, "both replicas on the seed")
        _say(f"    two replicas serve {champion} from the models topic (start to ready, worst {max(boot):.2f} s)")
        for r in range(repeats):
            version = train_quick_version(worker_registry.root, [m.raw for m in sample],
                                          [m.is_spam for m in sample], seed=100 + r)
            t0 = time.monotonic()
            worker_registry.promote(version, f"bench scale: promotion {r + 1}")
            wait_until(lambda: all(_served_version(c) == version for c in clients),  # noqa: B023 - waited here
                       120, "both replicas to serve the promotion", 0.05)
            converge.append(time.monotonic() - t0)
            _say(f"    promotion {r + 1}/{repeats}: both replicas serve it after {converge[-1]:.2f} s")
        for c in clients:
            c.close()
    finally:
        for p in replicas:
            p.stop()
        stack.stop()
    return {"replica_bootstrap_s": round(max(boot), 2), "replica_converge_s_runs": [round(x, 2) for x in converge],
            "replica_converge_s": round(max(converge), 2)}


def run_scale_bench(settings: Settings, json_path: Path | None, *, repeats: int = 3,
                    flags: int = 300) -> dict[str, Any]:
    """Run the benchmark (module docstring) and return its figures (also written to ``json_path``); ``flags``:
    about how many flags each of the two kill measurements sends."""
    started = time.monotonic()
    root = settings.state_dir / "bench-scale" / time.strftime("%Y%m%dT%H%M%S")
    result: dict[str, Any] = {"repeats": repeats, "replicas": 2}
    result.update(replica_convergence(settings, root, repeats=repeats))
    result.update(takeover(settings, root / "takeover", flags=flags))
    result.update(broker_kill(settings, root / "cluster", flags=flags))
    _say("==> deploy/ validated offline (compose-spec, hadolint, helm lint/template, kubernetes-validate)")
    manifests = validate_manifests(install_tools())
    result["manifests_valid"] = manifests["valid"]
    result["manifests"] = manifests
    for name, c in manifests["checks"].items():
        _say(f"    {'ok  ' if c['ok'] else 'FAIL'} {name}" + (f": {c['detail'][-300:]}" if not c["ok"] else ""))
    _say(f"    validators: {manifests['versions']}")
    result["checks"] = {k: {"value": result[k], "bound": b, "met": result[k] <= b} for k, b in TARGETS.items()}
    for k in ("rebuild_equal", "manifests_valid"):
        result["checks"][k] = {"value": result[k], "bound": True, "met": result[k] is True}
    result["wall_s"] = round(time.monotonic() - started, 1)
    for k, c in result["checks"].items():
        bound = f"<= {c['bound']}" if not isinstance(c["bound"], bool) else str(c["bound"]).lower()
        _say(f"{k} {c['value']} (target {bound}): {'met' if c['met'] else 'SHORT'}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result
