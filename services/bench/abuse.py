"""``flywheel bench abuse``: the attacks of an abusive client or an unlucky operator, run from outside against a
running stack (a :class:`~services.bench.harness.LocalStack`: the real broker, API and worker), each with its figure.

What it measures (JSON keys in brackets; each has a target in ``TARGETS`` and a line in ``checks``):

* **a JSON request that stalls the API**: ``POST /classify`` with structured fields whose one header value (then
  ``to``) is one "é" and 400,000 ASCII letters, and one within the caps (a 10,000-character non-ASCII subject),
  while another process polls ``/healthz`` every 10 ms: the worst poll [json_stall_healthz_worst_ms], the answers'
  statuses and times [json_stall_requests];
* **batches that starve single messages**: four clients post ``/classify/batch`` with 1,000 real messages each,
  over and over (from another process), while one client sends single ``/classify`` requests: their p50/p99
  [batch_starvation_p99_ms], alone first for reference, and the 503s [batch_starvation_*];
* **one spamd peer holding every connection**: 70 idle connections from 127.0.0.2, then a real ``spamc -c`` from
  127.0.0.1: whether it got a verdict [spamd_peer_flood_verdict] (spamc's fallback answer is ``0/0``);
* **trust bought by repetition**: one key flags one obvious spam and retracts the flag, 15 times, each applied
  by the worker; the reporter's reliability from the worker's store against a newcomer's
  [farm_rounds_reliability, newcomer_reliability];
* **acknowledged flags lost when the store errs**: the worker's ``labels.db`` held under an exclusive SQLite lock
  for 12 s while 100 flags are sent; flags answered 202 and not stored 60 s after the release
  [store_locked_lost_flags];
* **a store without a bound**: one key flags unique 500 KB messages for 60 s; the store's size on disk once the
  worker applied them, against the configured ``store_quota_bytes`` [store_bytes_after_flood, store_quota_bytes];
* **a rollback undone by the gate**: an administrator rolls the champion back while the worker's gate judges a
  challenger; kept unless a later promotion replaced a champion other than the one its gate judged
  [rollback_kept; rollback_exercised: a rollback did fall inside a gate decision].

Each attack is measured whether or not the defence is in place: a figure over its target is reported as such
(and the command exits 0; the JSON says which checks were met).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.bench.harness import LocalStack
from services.bench.hostile import _pct, _poll_healthz
from services.local.daemon import wait_until

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import httpx

    from services.settings import Settings

log = structlog.get_logger(__name__)

ATTACKS = ("json_stall", "batch_starvation", "spamd_peer_flood", "farm_rounds", "rollback", "store_locked",
           "store_flood")
TARGETS: dict[str, Any] = {
    "json_stall_healthz_worst_ms": 100.0,
    "batch_starvation_p99_ms": 250.0,
    "spamd_peer_flood_verdict": True,
    "farm_rounds_reliability": 0.9,  # below it, and no higher than a newcomer's
    "store_locked_lost_flags": 0,
    "store_bytes_after_flood": "store_quota_bytes",
    "rollback_kept": True,
}
_NEEDS_WORKER = frozenset({"farm_rounds", "rollback", "store_locked", "store_flood"})
_KEYS_OF = {"farm_rounds": ("farm_rounds_reliability", "newcomer_reliability"), "rollback": ("rollback_kept",),
            "store_locked": ("store_locked_lost_flags",), "store_flood": ("store_bytes_after_flood", "store_quota_bytes")}
KEYS = {
    "k-abuse-admin": "admin", "k-abuse-farmer": "farmer", "k-abuse-locker": "locker",
    "k-abuse-flooder": "flooder", "k-abuse-trainer-0": "trainer0", "k-abuse-trainer-1": "trainer1",
}
FLOOD_QUOTA_BYTES = 64 * 1024 * 1024
"""The store quota the stack runs with (when the worker has one): small enough that 60 s of flooding exceeds it."""


def _say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- helpers
def _mail(settings: Settings) -> tuple[list[bytes], list[bytes]]:
    """Real spam and ham of the corpus, small ones first (a batch of 1,000 fits the request limit)."""
    from models.corpus import load_corpus

    corpus = load_corpus(settings.downloads, settings.corpus_dir)

    def utf8(raw: bytes) -> bytes:  # JSON carries text: bytes that are not UTF-8 would make the body invalid
        return raw.decode("utf-8", "replace").encode("utf-8")

    spam = sorted((utf8(m.raw) for m in corpus if m.is_spam), key=len)
    ham = sorted((utf8(m.raw) for m in corpus if not m.is_spam), key=len)
    return spam, ham


def _admin() -> dict[str, str]:
    return {"X-API-Key": "k-abuse-admin"}


def _key(name: str) -> dict[str, str]:
    return {"X-API-Key": f"k-abuse-{name}"}


def _healthz_poller(port: int) -> tuple[Any, Connection]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_poll_healthz, args=(port, child, 0.01), daemon=True)
    proc.start()
    if not parent.poll(60):
        proc.terminate()
        raise RuntimeError("the /healthz poller did not start")
    parent.recv()
    return proc, parent


def _stop_poller(proc: Any, conn: Connection) -> tuple[list[float], int]:
    conn.send("stop")
    lat, failed = conn.recv() if conn.poll(60) else ([], -1)
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
    return lat, failed


def _stored(stack: LocalStack, event_ids: list[str]) -> int:
    """How many of ``event_ids`` the worker's store holds as votes (read-only)."""
    if not event_ids:
        return 0
    try:
        with stack.db() as c:
            marks = ",".join("?" * len(event_ids))
            return int(c.execute(f"SELECT COUNT(*) FROM votes WHERE event_id IN ({marks})",  # noqa: S608
                                 event_ids).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def _store_file_bytes(stack: LocalStack) -> int:
    db = stack.settings.state_dir / "worker" / "labels.db"
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"))
               if p.exists())


def _applied(stack: LocalStack, timeout_s: float) -> bool:
    try:
        wait_until(lambda: stack.backlog() == 0, timeout_s, "the worker to apply every flag", 0.5)
    except TimeoutError:
        return False
    return True


# --------------------------------------------------------------------------------------------- attacks
def json_stall(stack: LocalStack) -> dict[str, Any]:
    """Long non-ASCII structured fields while /healthz is polled every 10 ms."""
    long_value = "é" + "a" * 400_000
    bodies = {
        "header_value": {"subject": "hello", "headers": {"X-Long": long_value}, "text": "hi"},
        "to": {"subject": "hello", "to": long_value, "text": "hi"},
        "subject_at_the_cap": {"subject": "é" + "a" * 9_999, "text": "hi"},
    }
    proc, conn = _healthz_poller(stack.settings.api_port)
    requests: dict[str, Any] = {}
    try:
        time.sleep(0.3)  # a few polls before, as a reference for the machine's own noise
        for name, body in bodies.items():
            t0 = time.perf_counter()
            r = stack.http.post("/classify", json=body, timeout=120.0)
            requests[name] = {"status": r.status_code, "ms": (time.perf_counter() - t0) * 1000.0,
                              "detail": r.json().get("detail") if r.status_code != 200 else None}
        time.sleep(0.3)
    finally:
        lat, failed = _stop_poller(proc, conn)
    worst = max(lat, default=None)
    _say(f"    /healthz worst {worst or 0:.1f} ms over {len(lat)} polls ({failed} failed); "
         + "; ".join(f"{k}: {v['status']} in {v['ms']:.0f} ms" for k, v in requests.items()))
    return {"json_stall_healthz_worst_ms": worst, "json_stall_healthz_p99_ms": _pct(lat, 99),
            "json_stall_healthz_polls": len(lat), "json_stall_healthz_failed": failed,
            "json_stall_requests": requests}


def _batch_clients(port: int, body: bytes, clients: int, seconds: float, conn: Connection) -> None:
    """Child process: ``clients`` threads post the batch over and over for ``seconds``; send back statuses."""
    import httpx

    statuses: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300.0) as c:
            while time.monotonic() < deadline:
                try:
                    st = c.post("/classify/batch", content=body,
                                headers={"Content-Type": "application/json"}).status_code
                except httpx.HTTPError:
                    st = -1
                with lock:
                    statuses.append(st)
                if st == 503:
                    time.sleep(1.0)  # as Retry-After says

    conn.send("ready")
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.send(statuses)


def _singles(http: httpx.Client, raw: bytes, seconds: float, until: Callable[[], bool] | None = None
             ) -> tuple[list[float], int]:
    lat: list[float] = []
    busy = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (until is None or not until()):
        t0 = time.perf_counter()
        r = http.post("/classify", content=raw, headers={"Content-Type": "message/rfc822"})
        dt = (time.perf_counter() - t0) * 1000.0
        if r.status_code == 200:
            lat.append(dt)
        elif r.status_code == 503:
            busy += 1
        time.sleep(0.05)
    return lat, busy


def batch_starvation(stack: LocalStack, spam: list[bytes], ham: list[bytes], *, batch_size: int = 1000,
                     clients: int = 4, seconds: float = 20.0) -> dict[str, Any]:
    """Four clients post batches of ``batch_size`` real messages while single messages are timed."""
    pool = [m for pair in zip(spam, ham, strict=False) for m in pair]
    limit = stack.settings.max_message_bytes
    msgs: list[dict[str, str]] = []
    size = 0
    for raw in pool:
        text = raw.decode("utf-8")
        size += len(json.dumps(text)) + 16
        if size > 0.9 * limit or len(msgs) >= batch_size:
            break
        msgs.append({"raw": text})
    body = json.dumps({"messages": msgs}).encode("utf-8")
    single = ham[len(ham) // 2]
    alone, _ = _singles(stack.http, single, 3.0)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_batch_clients, args=(stack.settings.api_port, body, clients, seconds, child),
                       daemon=True)
    proc.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the batch clients did not start")
        parent.recv()
        time.sleep(1.0)  # the first batches are being scored
        lat, busy = _singles(stack.http, single, seconds - 1.0, until=lambda: parent.poll(0))
        statuses = parent.recv() if parent.poll(seconds + 300) else []
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
    out = {
        "batch_starvation_p99_ms": _pct(lat, 99), "batch_starvation_p50_ms": _pct(lat, 50),
        "batch_starvation_singles": len(lat), "batch_starvation_singles_503": busy,
        "batch_starvation_alone_p50_ms": _pct(alone, 50), "batch_starvation_alone_p99_ms": _pct(alone, 99),
        "batch_starvation_batch_size": len(msgs), "batch_starvation_batches_200": statuses.count(200),
        "batch_starvation_batches_503": statuses.count(503),
        "batch_starvation_batches_other": len(statuses) - statuses.count(200) - statuses.count(503),
    }
    _say(f"    single /classify while {clients} clients post batches of {len(msgs)}: p50 "
         f"{out['batch_starvation_p50_ms'] or 0:.0f} ms, p99 {out['batch_starvation_p99_ms'] or 0:.0f} ms over "
         f"{len(lat)} ({busy} answered 503); alone p50 {out['batch_starvation_alone_p50_ms'] or 0:.1f} ms; "
         f"batches answered 200: {out['batch_starvation_batches_200']}, 503: {out['batch_starvation_batches_503']}")
    return out


def spamd_peer_flood(stack: LocalStack, spam: bytes, *, idle: int = 70) -> dict[str, Any]:
    """``idle`` connections from 127.0.0.2 that send nothing, then a real spamc from 127.0.0.1."""
    port = stack.settings.spamd_port
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(idle):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            except OSError:
                refused += 1
                continue
            held.append(sock)
        time.sleep(0.5)  # the server has accepted (or turned away) them all
        spamc = shutil.which("spamc")
        if spamc is not None:
            r = subprocess.run([spamc, "-d", "127.0.0.1", "-p", str(port), "-t", "20", "-c"],  # noqa: S603
                               input=spam, capture_output=True, timeout=60)
            answer = r.stdout.decode(errors="replace").strip()
            verdict = answer != "0/0" and "/" in answer
            client = "spamc"
        else:  # the same request spamc sends
            head = f"CHECK SPAMC/1.5\r\nContent-length: {len(spam)}\r\n\r\n".encode()
            with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
                sock.sendall(head + spam)
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            answer = data.decode(errors="replace").splitlines()[0] if data else ""
            verdict = "EX_OK" in answer
            client = "raw socket (spamc not installed)"
    finally:
        for sock in held:
            sock.close()
    _say(f"    {len(held)} idle connections from 127.0.0.2 ({refused} not connected), then {client} from "
         f"127.0.0.1: {answer!r} -> {'a verdict' if verdict else 'no verdict'}")
    return {"spamd_peer_flood_verdict": verdict, "spamd_peer_flood_answer": answer, "spamd_peer_flood_idle": len(held),
            "spamd_peer_flood_client": client}


def farm_rounds(stack: LocalStack, spam: bytes, *, rounds: int = 15) -> dict[str, Any]:
    """One key flags one obvious spam and retracts the flag, ``rounds`` times, each applied by the worker."""
    from models.consensus import reliability

    mid = stack.classify(spam)["message_id"]
    failures: list[str] = []
    for i in range(rounds):
        if not stack.worker.alive():
            failures.append(f"round {i}: the worker exited")
            break
        r = stack.http.post("/feedback", json={"message_id": mid, "label": "spam"}, headers=_key("farmer"))
        if r.status_code != 202:
            failures.append(f"flag {i}: {r.status_code} {r.text[:100]}")
            continue
        event_id = r.json()["event_id"]
        _applied(stack, 60)
        d = stack.http.delete(f"/feedback/{event_id}", headers=_key("farmer"))
        if d.status_code != 202:
            failures.append(f"retraction {i}: {d.status_code} {d.text[:100]}")
        _applied(stack, 60)
    row = None
    with contextlib.suppress(sqlite3.OperationalError), stack.db() as c:
        row = c.execute("SELECT agree, disagree FROM reporters WHERE reporter = ?", ("farmer",)).fetchone()
    newcomer = reliability(0.0, 0.0)
    value = reliability(float(row[0]), float(row[1])) if row else newcomer
    _say(f"    reliability after {rounds} flag-and-retract rounds: {value:.3f} (a newcomer's {newcomer:.3f}; "
         f"record {row}); {len(failures)} requests refused")
    return {"farm_rounds_reliability": value, "newcomer_reliability": newcomer, "farm_rounds_record": row,
            "farm_rounds_refused": failures}


def store_locked(stack: LocalStack, spam: list[bytes], *, flags: int = 100, lock_s: float = 12.0,
                 wait_s: float = 60.0) -> dict[str, Any]:
    """The worker's labels.db under an exclusive lock for ``lock_s`` while ``flags`` flags are sent."""
    db = stack.settings.state_dir / "worker" / "labels.db"
    event_ids: list[str] = []
    refused = 0
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        t0 = time.monotonic()
        for i in range(flags):
            raw = spam[i % len(spam)].replace(b"Subject:", f"Subject: [locked {i}]".encode(), 1)
            r = stack.flag("spam", "k-abuse-locker", raw=raw)
            if r.status_code == 202:
                event_ids.append(r.json()["event_id"])
            else:
                refused += 1
        held = time.monotonic() - t0
        if held < lock_s:
            time.sleep(lock_s - held)
        locked_for = time.monotonic() - t0
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()
    released = time.monotonic()
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: _stored(stack, event_ids) >= len(event_ids), wait_s, "every acknowledged flag stored", 0.5)
    stored = _stored(stack, event_ids)
    errors = None
    with contextlib.suppress(Exception):
        errors = stack.worker_metric("flywheel_worker_store_errors_total")
    out = {"store_locked_lost_flags": len(event_ids) - stored, "store_locked_acknowledged": len(event_ids),
           "store_locked_refused": refused, "store_locked_held_s": locked_for,
           "store_locked_stored_within_s": time.monotonic() - released, "store_locked_worker_alive": stack.worker.alive(),
           "store_locked_worker_store_errors": errors}
    _say(f"    {len(event_ids)} flags answered 202 while labels.db was locked for {locked_for:.1f} s; "
         f"{stored} stored, {out['store_locked_lost_flags']} lost {wait_s:.0f} s after the release "
         f"(worker alive: {out['store_locked_worker_alive']}, store errors counted: {errors})")
    return out


def store_flood(stack: LocalStack, *, seconds: float = 60.0, size: int = 500 * 1024) -> dict[str, Any]:
    """One key flags unique ``size``-byte messages for ``seconds``; the store's size once they are applied."""
    before = _store_file_bytes(stack)
    accepted = limited = other = 0
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        filler = (f"line {i} of an unremarkable newsletter with nothing to say\r\n" * (size // 60))[:size]
        raw = f"From: flood{i}@example.org\r\nTo: you@example.com\r\nSubject: issue {i}\r\n\r\n{filler}".encode()
        r = stack.flag("spam", "k-abuse-flooder", raw=raw)
        if r.status_code == 202:
            accepted += 1
        elif r.status_code == 429:
            limited += 1
            time.sleep(float(r.headers.get("retry-after", "1")) if limited % 50 == 0 else 0.05)
        else:
            other += 1
        i += 1
    applied = _applied(stack, 180)
    quota = getattr(stack.settings, "store_quota_bytes", None)
    after = _store_file_bytes(stack)
    metric = None
    with contextlib.suppress(Exception):
        metric = stack.worker_metric("flywheel_worker_store_bytes", {"part": "file"})
    out = {"store_bytes_after_flood": after, "store_bytes_before_flood": before, "store_quota_bytes": quota,
           "store_flood_accepted": accepted, "store_flood_rate_limited": limited, "store_flood_other": other,
           "store_flood_applied": applied, "store_flood_metric_file_bytes": metric}
    _say(f"    {accepted} flags of {size // 1024} KB accepted ({limited} rate limited) in {seconds:.0f} s; store "
         f"{before / 1e6:.1f} -> {after / 1e6:.1f} MB (quota {quota / 1e6 if quota else float('nan'):.1f} MB; "
         f"applied: {applied})")
    return out


def _linear_busy(stack: LocalStack) -> bool:
    with contextlib.suppress(Exception):
        return bool(stack.worker_metric("flywheel_training_in_progress", {"kind": "linear"}))
    return False


def _versions(stack: LocalStack) -> set[str]:
    try:
        with os.scandir(stack.settings.registry / "versions") as it:
            return {e.name for e in it}
    except FileNotFoundError:
        return set()


def rollback(stack: LocalStack, spam: list[bytes], ham: list[bytes], *, timeout_s: float = 300.0) -> dict[str, Any]:
    """Roll the champion back while the worker's gate judges a challenger; was the rollback kept?

    Flags on fresh mail with their true labels make the worker refit and judge challengers. Once there is an
    earlier champion to roll back to, the bench watches the registry's versions during each refit: the worker
    stores its challenger after the gate read the champion and before it promotes, so a rollback made the moment
    a new version appears (on the registry, as ``flywheel models rollback`` does) lands inside the gate's decision. Tried refit after refit until a decision that judged
    the champion of before a rollback comes after it (the race was run: ``rollback_exercised``), or ``timeout_s``.
    Kept: no promotion replaced a champion other than the one its gate judged.
    """
    reg = stack.registry()
    stop = threading.Event()
    sender = threading.Thread(target=_send_training_flags, args=(stack, spam, ham, stop), daemon=True)
    sender.start()
    first_rollback: int | None = None
    attempts: list[dict[str, Any]] = []
    exercised = False
    deadline = time.monotonic() + timeout_s
    try:
        if len(reg.history()) < 2:
            _second_champion(stack, reg, deadline)
        while time.monotonic() < deadline and not exercised and stack.worker.alive():
            try:
                wait_until(lambda: _linear_busy(stack) and len(reg.history()) >= 2,
                           max(1.0, deadline - time.monotonic()), "a refit with a champion to roll back", 0.02)
            except TimeoutError:
                break
            known = _versions(stack)
            before, n_decisions = reg.champion(), len(reg.decisions())
            fresh: set[str] = set()
            end = time.monotonic() + 120.0
            polls = 0
            while time.monotonic() < end:  # a tight loop: the challenger's save and its promotion are milliseconds apart
                fresh = _versions(stack) - known
                polls += 1
                if fresh or (polls % 50 == 0 and not _linear_busy(stack)):
                    break
                time.sleep(0.001)
            if not fresh:
                attempts.append({"rolled_back": False, "why": "the refit stored no challenger"})
                continue
            try:  # what `flywheel models rollback` does (POST /models/rollback adds an HTTP round trip)
                target = reg.rollback("abuse bench: rollback during a gate decision")
            except Exception as exc:  # noqa: BLE001 - a refused rollback is an attempt that did not happen
                attempts.append({"rolled_back": False, "error": str(exc)})
                continue
            history = reg.history()
            at = max(i for i, h in enumerate(history) if h.get("action") == "rollback")
            if first_rollback is None:
                first_rollback = at
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: any(d["challenger"] in fresh for d in reg.decisions()[n_decisions:]),  # noqa: B023
                           120, "the gate's decision", 0.1)
            decided = [d for d in reg.decisions()[n_decisions:] if d["challenger"] in fresh]
            promoted_after = {h.get("version") for h in reg.history()[at + 1:] if h.get("action") == "promote"}
            raced = [d for d in decided if d.get("champion") == before
                     and ("champion changed" in str(d.get("reason")) or d["challenger"] in promoted_after)]
            exercised = bool(raced)
            attempts.append({"rolled_back": True, "from": before, "to": target, "raced": exercised,
                             "decisions": [{k: d.get(k) for k in ("challenger", "champion", "decision", "reason")}
                                           for d in decided]})
    finally:
        stop.set()
        sender.join(60)
    if first_rollback is None:
        _say(f"    no refit to roll back during within {timeout_s:.0f} s (champions so far: {len(reg.history())}, "
             f"worker alive: {stack.worker.alive()})")
        return {"rollback_kept": None, "rollback_exercised": False, "rollback_attempts": attempts}
    with contextlib.suppress(TimeoutError):
        wait_until(stack.settled, 120, "the worker to settle", 1.0)
    judged = {d["challenger"]: d.get("champion") for d in reg.decisions()}
    later = reg.history()[first_rollback:]
    bad = [h for h in later if h.get("action") == "promote" and h.get("version") in judged
           and judged[h["version"]] != h.get("previous")]
    out = {"rollback_kept": not bad, "rollback_exercised": exercised, "rollback_attempts": attempts,
           "rollback_undone_by": bad, "rollback_champion_after": reg.champion()}
    raced_text = ("a gate decision that judged the champion of before a rollback ended after it"
                  if exercised else "no rollback fell inside a gate decision (the race was not run)")
    _say(f"    {sum(a['rolled_back'] for a in attempts)} rollbacks during refits; {raced_text}; promotions that "
         f"replaced a champion their gate did not judge: {len(bad)} -> rollback {'kept' if not bad else 'UNDONE'}")
    return out


def _second_champion(stack: LocalStack, reg: Any, deadline: float) -> None:
    """Something to roll back to: the worker's first promotion, or else (its gate rejecting every refit) its
    newest challenger promoted by the administrator through the API, as an operator trying it out would."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: len(reg.history()) >= 2 or reg.decisions(), max(1.0, deadline - time.monotonic()),
                   "a gate decision", 0.5)
    if len(reg.history()) >= 2 or not reg.decisions():
        return
    version = reg.decisions()[-1]["challenger"]
    r = stack.http.post(f"/models/{version}/promote", headers=_admin(),
                        json={"reason": "abuse bench: a champion to roll back from"})
    _say(f"    promoted the worker's challenger {version} through the API: {r.status_code}")


def _send_training_flags(stack: LocalStack, spam: list[bytes], ham: list[bytes], stop: threading.Event) -> None:
    """Flags with true labels from two keys, a few a second, until ``stop`` (within the keys' rate limits)."""
    i = 0
    while not stop.is_set() and i < min(len(spam), len(ham)) // 2:
        raw, label = (spam[len(spam) // 3 + i], "spam") if i % 2 else (ham[len(ham) // 3 + i], "ham")
        with contextlib.suppress(Exception):
            stack.flag(label, f"k-abuse-trainer-{i % 2}", raw=raw)
        i += 1
        stop.wait(0.3)


# --------------------------------------------------------------------------------------------- the benchmark
def _checks(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def add(key: str, value: Any, bound: Any, met: bool | None) -> None:
        out[key] = {"value": value, "bound": bound, "met": met}

    if "json_stall_healthz_worst_ms" in r:
        v = r["json_stall_healthz_worst_ms"]
        add("json_stall_healthz_worst_ms", v, 100.0, v is not None and v <= 100.0)
    if "batch_starvation_p99_ms" in r:
        v = r["batch_starvation_p99_ms"]
        add("batch_starvation_p99_ms", v, 250.0, v is not None and v <= 250.0)
    if "spamd_peer_flood_verdict" in r:
        add("spamd_peer_flood_verdict", r["spamd_peer_flood_verdict"], True, bool(r["spamd_peer_flood_verdict"]))
    if "farm_rounds_reliability" in r:
        v, newcomer = r["farm_rounds_reliability"], r["newcomer_reliability"]
        add("farm_rounds_reliability", v, None if newcomer is None else min(0.9, newcomer),
            v is not None and newcomer is not None and v < 0.9 and v <= newcomer)
    if "store_locked_lost_flags" in r:
        v = r["store_locked_lost_flags"]
        add("store_locked_lost_flags", v, 0, v == 0 and r.get("store_locked_acknowledged", 0) > 0)
    if "store_bytes_after_flood" in r:
        v, quota = r["store_bytes_after_flood"], r["store_quota_bytes"]
        add("store_bytes_after_flood", v, quota, v is not None and quota is not None and v <= quota)
    if "rollback_kept" in r:
        add("rollback_kept", r["rollback_kept"], True, r["rollback_kept"] is True and bool(r.get("rollback_exercised")))
    return out


def run_abuse_bench(settings: Settings, json_path: Path | None, *, attacks: list[str] | None = None,
                    flood_s: float = 60.0, batch_s: float = 20.0, lock_s: float = 12.0, lock_flags: int = 100,
                    store_wait_s: float = 60.0, farm: int = 15) -> dict[str, Any]:
    """Start a stack, run the chosen attacks (default: all, in ``ATTACKS`` order), print and return the figures."""
    chosen = list(attacks or ATTACKS)
    unknown = set(chosen) - set(ATTACKS)
    if unknown:
        raise ValueError(f"no such attacks: {sorted(unknown)} (choose from {', '.join(ATTACKS)})")
    spam, ham = _mail(settings)
    overrides: dict[str, Any] = {"api_keys": KEYS, "admin_identities": ["admin"]}
    if "store_quota_bytes" in type(settings).model_fields:
        overrides["store_quota_bytes"] = FLOOD_QUOTA_BYTES
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-abuse-"))
    result: dict[str, Any] = {"cores": os.cpu_count(), "attacks": chosen, "targets": TARGETS}
    try:
        with LocalStack(settings, root, **overrides) as stack:
            _say(f"==> stack up (API :{stack.settings.api_port}, spamd :{stack.settings.spamd_port}, "
                 f"state {root})")
            for name in chosen:
                _say(f"==> {name}")
                t0 = time.monotonic()
                if name in _NEEDS_WORKER and not stack.worker.alive():
                    result[f"{name}_error"] = "the worker exited: " + stack.worker.log_tail(5)
                    result.update(dict.fromkeys(_KEYS_OF[name]))
                    _say(f"    not measured: {result[f'{name}_error']}")
                    continue
                if name == "json_stall":
                    result.update(json_stall(stack))
                elif name == "batch_starvation":
                    result.update(batch_starvation(stack, spam, ham, seconds=batch_s))
                elif name == "spamd_peer_flood":
                    result.update(spamd_peer_flood(stack, spam[len(spam) // 2]))
                elif name == "farm_rounds":
                    result.update(farm_rounds(stack, _obvious_spam(stack, spam), rounds=farm))
                elif name == "store_locked":
                    result.update(store_locked(stack, spam, flags=lock_flags, lock_s=lock_s, wait_s=store_wait_s))
                elif name == "store_flood":
                    result.update(store_flood(stack, seconds=flood_s))
                elif name == "rollback":
                    result.update(rollback(stack, spam, ham))
                result[f"{name}_s"] = time.monotonic() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["checks"] = _checks(result)
    result["load_average"] = os.getloadavg()
    _say("==> figures against their targets")
    for key, c in result["checks"].items():
        _say(f"    {key:32} {c['value']!s:>24}  bound {c['bound']!s:>12}  {'met' if c['met'] else 'NOT met'}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str))
    return result


def _obvious_spam(stack: LocalStack, spam: list[bytes]) -> bytes:
    """A spam the served model is very sure of (the kind a farmer flags to look reliable)."""
    best, best_p = spam[-1], -1.0
    for raw in spam[len(spam) // 2: len(spam) // 2 + 40]:
        p = float(stack.classify(raw)["model"]["probability"])
        if p > best_p:
            best, best_p = raw, p
        if p >= 0.999:
            break
    return best
