"""``flywheel bench api``: the API over loopback HTTP and the spamd port, load generated from another process.

What it measures (JSON keys in brackets), all against a real ``flywheel serve`` subprocess
(uvicorn + httptools + uvloop, ``max(2, settings.workers)`` workers, its own temporary state dir):

* /classify, one message per request, closed loop with many connections: requests/s [classify_rps];
* /classify at a fixed open-loop rate of 500 req/s: p99 latency [p99_ms_at_500rps], measured from each
  request's scheduled send time (no coordinated omission), and the same at 100 req/s [p99_ms_at_100rps];
* GET /healthz closed loop: the HTTP stack's own ceiling without the spam pipeline [healthz_rps];
* /classify/batch with 100 messages per call: messages/s [batch_msgs_per_s];
* the spamd port through concurrent real ``spamc`` processes: requests/s [spamd_rps];
* a model promotion under load (500 req/s, or 60% of the measured capacity when that is lower) of /classify:
  failed requests [swap_failed_requests] and p99 during the swap window [swap_p99_ms];
* the ratio of classify_rps to the in-process figure of ``flywheel bench models`` [inprocess_ratio].

The load generator is a raw asyncio HTTP/1.1 keep-alive client (no httpx overhead) running in its own
process, so its CPU shows up as what it is: a competitor for the same 2 cores, as a real client would be.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from services.local.daemon import free_port

if TYPE_CHECKING:
    from models.rules import RuleEngine
    from services.settings import Settings

log = structlog.get_logger(__name__)

TARGETS = {
    "classify_rps": 1000.0,
    "p99_ms_at_500rps": 10.0,
    "batch_msgs_per_s": 3000.0,
}


# --------------------------------------------------------------------------------------------- test models
def train_quick_version(
    registry_dir: Path,
    raws: Sequence[bytes],
    labels: Sequence[bool],
    *,
    seed: int = 0,
    promote: bool = False,
    engine: RuleEngine | None = None,
    reason: str = "quick version",
) -> str:
    """Train a small linear model on ``raws`` and store it as a registry version (tests and the swap bench).

    Uses the project's own feature pipeline, trainer, ONNX export and registry, so what is stored is a real
    servable version with real self-check vectors.
    """
    from models.features import FeatureConfig, featurize
    from models.linear import LinearConfig, LinearModel
    from models.message import parse
    from models.registry import Registry, SelfCheckVector
    from models.rules import RuleEngine

    engine = engine or RuleEngine.default()
    msgs = [parse(r) for r in raws]
    results = [engine.evaluate(m) for m in msgs]
    features = FeatureConfig(n_buckets=1 << 16)
    batch = featurize(msgs, results, features)
    y = np.asarray([1 if s else 0 for s in labels], dtype=np.int64)
    model = LinearModel(features, LinearConfig(seed=seed)).fit(batch, y)
    probs = model.predict_proba(batch)
    picks = sorted({0, len(raws) // 2, len(raws) - 1})
    vectors = [SelfCheckVector(raw=raws[i], rule_result=results[i], expected=float(probs[i])) for i in picks]
    reg = Registry(registry_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.export_onnx(Path(tmp) / "model.onnx")
        version = reg.save(
            kind="linear",
            model_path=path,
            features=features,
            self_check=vectors,
            metrics={"train_rows": len(raws)},
            lineage={"source": "train_quick_version", "seed": seed},
            hyperparameters={"seed": seed},
        )
    if promote:
        reg.promote(version, reason)
    return version


def sample_corpus(settings: Settings, n: int, seed: int = 0) -> tuple[list[bytes], list[bool]]:
    """``n`` corpus messages, both classes, in a reproducible random order."""
    from models.corpus import load_corpus

    msgs = load_corpus(settings.downloads, settings.corpus_dir)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(msgs))[:n]
    return [msgs[i].raw for i in idx], [msgs[i].is_spam for i in idx]


# --------------------------------------------------------------------------------------------- load generator
def build_request(path: str, body: bytes, content_type: str, host: str, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    body = await reader.readexactly(length) if length else b""
    return status, body


KEEPALIVE_EXPIRY_S = 2.0
"""A pooled connection idle this long is closed, not reused: the server drops idle keep-alive connections after
5 s, and a request written into one it has just closed fails on the client's side, not the server's (the
expiry HTTP clients such as httpcore apply for the same reason)."""


class _Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.idle_since = time.perf_counter()

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.reader is not None
        try:
            self.writer.write(data)
            return await _read_response(self.reader)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _closed_loop(host: str, port: int, requests: list[bytes], connections: int, duration_s: float,
                       per_request_items: int) -> dict[str, Any]:
    stop = time.perf_counter() + duration_s
    lat: list[float] = []
    failed = 0

    async def one(k: int) -> None:
        nonlocal failed
        conn = _Conn(host, port)
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                status, _ = await conn.request(requests[i % len(requests)])
                if status != 200:
                    failed += 1
            except (OSError, asyncio.IncompleteReadError, ValueError):
                failed += 1
            lat.append(time.perf_counter() - t0)
            i += connections
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(connections)))
    elapsed = time.perf_counter() - t0
    arr = np.asarray(lat) * 1000
    return {
        "requests": len(lat), "failed": failed, "seconds": elapsed, "rps": len(lat) / elapsed,
        "items_per_s": len(lat) * per_request_items / elapsed,
        "p50_ms": float(np.percentile(arr, 50)) if len(arr) else None,
        "p99_ms": float(np.percentile(arr, 99)) if len(arr) else None,
    }


async def _open_loop(host: str, port: int, requests: list[bytes], rate: float, duration_s: float,
                     warmup_s: float = 1.0) -> dict[str, Any]:
    """Requests at a fixed schedule; latency from the SCHEDULED time (no coordinated omission)."""
    idle: list[_Conn] = []
    samples: list[tuple[float, float, bool]] = []  # (scheduled offset s, latency s, ok)
    failures: Counter[str] = Counter()  # why the requests that were not ok failed

    def take() -> _Conn:
        while idle:
            conn = idle.pop()
            if time.perf_counter() - conn.idle_since < KEEPALIVE_EXPIRY_S:
                return conn
            conn.close()
        return _Conn(host, port)

    n = int(rate * (duration_s + warmup_s))
    start = time.perf_counter() + 0.05
    tasks = []

    async def fire(i: int, at: float) -> None:
        conn = take()
        ok = False
        try:
            status, _ = await conn.request(requests[i % len(requests)])
            ok = status == 200
            if not ok:
                failures[f"HTTP {status}"] += 1
            conn.idle_since = time.perf_counter()
            idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            failures[type(exc).__name__] += 1
            conn.close()
        samples.append((at - start, time.perf_counter() - at, ok))

    for i in range(n):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(fire(i, at)))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    return {"samples": [s for s in samples if s[0] >= warmup_s], "warmup_s": warmup_s, "rate": rate,
            "failures": dict(failures)}


def _loadgen_entry(kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Runs in the load-generator process."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if kind == "closed":
        return asyncio.run(_closed_loop(**kwargs))
    return asyncio.run(_open_loop(**kwargs))


def run_load(kind: str, **kwargs: Any) -> dict[str, Any]:
    """Run one load pattern in a separate process (spawned: no state shared with this one)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_loadgen_entry, (kind, kwargs))


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


# --------------------------------------------------------------------------------------------- spamd load
async def _spamc_load(port: int, messages: list[bytes], concurrency: int, total: int) -> dict[str, Any]:
    spamc = shutil.which("spamc")
    if spamc is None:
        return {"error": "spamc not installed"}
    failed = 0
    done = 0
    lock = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal failed, done
        async with lock:
            proc = await asyncio.create_subprocess_exec(
                spamc, "-d", "127.0.0.1", "-p", str(port), "-c", "-x",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await proc.communicate(messages[i % len(messages)])
            # -c: exit 0 ham / 1 spam with "score/threshold"; -x: any failure is a non-zero other code
            if proc.returncode not in (0, 1) or b"/" not in out:
                failed += 1
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    elapsed = time.perf_counter() - t0
    return {"requests": done, "failed": failed, "seconds": elapsed, "rps": done / elapsed, "concurrency": concurrency}


def _spamc_entry(kwargs: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_spamc_load(**kwargs))


# --------------------------------------------------------------------------------------------- the benchmark
def _inprocess_figure(settings: Settings, raws: list[bytes], models_json: Path | None) -> tuple[float, str]:
    """Messages/s of parse + rules + model, one at a time, in this process (or from bench-models JSON)."""
    models_json = models_json or Path("out/bench-models.json")  # where `make bench` writes it first
    if models_json.exists():
        data = json.loads(models_json.read_text())
        for key in ("pipeline_msgs_per_s", "single_msgs_per_s", "msgs_per_s", "inprocess_msgs_per_s"):
            if isinstance(data.get(key), int | float):
                return float(data[key]), f"{models_json}:{key}"
    from models.classifier import Classifier
    from models.registry import Registry
    from models.rules import RuleEngine

    reg = Registry(settings.registry)
    engine = RuleEngine.load(settings.rules_file) if settings.rules_file.exists() else RuleEngine.default()
    clf = Classifier(engine, reg.load(reg.champion() or ""), policy=settings.policy,
                     max_bytes=settings.analyse_bytes)
    for r in raws[:50]:
        clf.classify(r)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        clf.classify(raws[n % len(raws)])
        n += 1
    return n / (time.perf_counter() - t0), "measured in-process (one core, one message at a time)"


def run_api_bench(settings: Settings, json_path: Path | None, models_json: Path | None = None,
                  duration_s: float = 8.0) -> dict[str, Any]:
    """Start a real API (own state dir, the user's corpus and broker settings) and measure it; see module doc."""
    import httpx

    from services.bench.api_process import ApiProcess
    from services.settings import Settings as _S

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-api-"))
    port, spamd_port = free_port(), free_port()
    s: _S = settings.model_copy(update={
        "state_dir": work, "downloads_dir": settings.downloads, "api_port": port, "spamd_port": spamd_port,
        "workers": max(2, settings.workers), "model_poll_s": 1.0,
        "api_keys": {"bench-admin": "admin"}, "admin_identities": ["admin"],
    })
    raws, labels = sample_corpus(settings, 2000, seed=11)
    print("==> training two model versions for the swap test")
    train_quick_version(s.registry, raws[:1000], labels[:1000], seed=1, promote=True)
    v2 = train_quick_version(s.registry, raws[1000:], labels[1000:], seed=2)
    msgs = [r for r in raws if len(r) <= 64 * 1024][:500]
    host = "127.0.0.1"
    single = [build_request("/classify", r, "message/rfc822", host) for r in msgs]
    batch_reqs = []
    for i in range(0, len(msgs) - 100 + 1, 100):
        body = json.dumps({"messages": [{"raw": r.decode("latin-1")} for r in msgs[i:i + 100]]}).encode()
        batch_reqs.append(build_request("/classify/batch", body, "application/json", host))
    result: dict[str, Any] = {"workers": s.workers, "cores": os.cpu_count(), "messages": len(msgs)}
    proc = ApiProcess(s, work / "api.log")
    try:
        proc.start()
        print(f"==> API up on {proc.base_url} ({s.workers} workers), spamd on {spamd_port}")
        run_load("closed", host=host, port=port, requests=single, connections=8, duration_s=2.0,
                 per_request_items=1)  # warm-up
        r = run_load("closed", host=host, port=port, requests=single, connections=32, duration_s=duration_s,
                     per_request_items=1)
        result["classify"] = r
        result["classify_rps"] = r["rps"]
        print(f"    /classify: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
              f"failed {r['failed']}")
        h = run_load("closed", host=host, port=port, connections=32, duration_s=3.0, per_request_items=1,
                     requests=[f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()])
        result["healthz_rps"] = h["rps"]  # the HTTP stack's own ceiling, without the spam pipeline
        print(f"    /healthz (HTTP stack alone): {h['rps']:.0f} req/s")
        o = run_load("open", host=host, port=port, requests=single, rate=500.0, duration_s=duration_s)
        lat = [x[1] * 1000 for x in o["samples"]]
        result["p99_ms_at_500rps"] = _pct(lat, 99)
        result["p50_ms_at_500rps"] = _pct(lat, 50)
        result["failed_at_500rps"] = sum(1 for x in o["samples"] if not x[2])
        print(f"    /classify at 500 req/s: p50 {result['p50_ms_at_500rps']:.2f} ms, "
              f"p99 {result['p99_ms_at_500rps']:.2f} ms")
        # below saturation on a busy machine: the latency the HTTP layer adds when the server is not queueing
        o = run_load("open", host=host, port=port, requests=single, rate=100.0, duration_s=4.0)
        lat = [x[1] * 1000 for x in o["samples"]]
        result["p99_ms_at_100rps"] = _pct(lat, 99)
        result["p50_ms_at_100rps"] = _pct(lat, 50)
        print(f"    /classify at 100 req/s: p50 {result['p50_ms_at_100rps']:.2f} ms, "
              f"p99 {result['p99_ms_at_100rps']:.2f} ms")
        b = run_load("closed", host=host, port=port, requests=batch_reqs, connections=2, duration_s=duration_s,
                     per_request_items=100)
        result["batch"] = b
        result["batch_msgs_per_s"] = b["items_per_s"]
        print(f"    /classify/batch (100/call): {b['items_per_s']:.0f} msgs/s, failed {b['failed']}")
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            sp = pool.apply(_spamc_entry, ({"port": spamd_port, "messages": msgs[:100], "concurrency": 8,
                                            "total": 400},))
        result["spamd"] = sp
        result["spamd_rps"] = sp.get("rps")
        print(f"    spamd via spamc -c (8 concurrent processes): {sp.get('rps', 0):.0f} req/s, "
              f"failed {sp.get('failed')}")

        # model swap under load: promote v2 2.5 s in. The rate is 500 req/s, or 60% of the capacity when the
        # machine cannot sustain 500 (otherwise the p99 would measure the queue, not the swap). On a shared machine
        # the capacity moves within a minute, so it is measured again just before the swap and the lower figure
        # counts (a swap at 60% of what the machine had a minute ago was refused 503s when it had less).
        again = run_load("closed", host=host, port=port, requests=single, connections=32, duration_s=2.0,
                         per_request_items=1)
        capacity = min(result["classify_rps"], again["rps"])
        swap_rate = min(500.0, 0.6 * capacity)
        result["swap_capacity_rps"] = round(capacity, 1)
        result["swap_rate"] = swap_rate
        with ctx.Pool(1) as pool:
            pending = pool.apply_async(_loadgen_entry, ("open", {
                "host": host, "port": port, "requests": single, "rate": swap_rate, "duration_s": 8.0,
                "warmup_s": 0.0}))
            time.sleep(2.5)
            t_swap = time.time()
            pr = httpx.post(f"{proc.base_url}/models/{v2}/promote", headers={"X-API-Key": "bench-admin"},
                            timeout=30)
            t_promoted = time.time()
            o = pending.get(timeout=120)
        samples = o["samples"]
        # the swap window: from the promotion call (2.5 s into the schedule) until 3 s after it returned, which
        # covers the event, the load + self-check off the request path and the swap in every worker
        window = [x[1] * 1000 for x in samples if 2.5 <= x[0] <= 2.5 + (t_promoted - t_swap) + 3.0]
        result["swap_promote_status"] = pr.status_code
        result["swap_failed_requests"] = sum(1 for x in samples if not x[2])
        result["swap_failures"] = o["failures"]
        result["swap_requests"] = len(samples)
        result["swap_p99_ms"] = _pct(window, 99)
        with httpx.Client(base_url=proc.base_url, timeout=10) as c:
            seen = {c.post("/classify", content=msgs[0], headers={"Content-Type": "message/rfc822"})
                    .json()["model"]["version"] for _ in range(20)}
        result["swap_serving_after"] = sorted(seen)
        result["swap_ok"] = seen == {v2}
        print(f"    model swap under {swap_rate:.0f} req/s: {result['swap_failed_requests']} failed of {len(samples)}, "
              f"p99 in the swap window {result['swap_p99_ms']:.2f} ms, now serving {sorted(seen)}"
              + (f", failures {o['failures']}" if o["failures"] else ""))
    finally:
        proc.stop()
    inproc, source = _inprocess_figure(s, msgs, models_json)
    result["inprocess_msgs_per_s"] = inproc
    result["inprocess_source"] = source
    result["inprocess_ratio"] = result["classify_rps"] / inproc if inproc else None
    result["ratios_to_targets"] = {
        "classify_rps": result["classify_rps"] / TARGETS["classify_rps"],
        "p99_ms_at_500rps": (result["p99_ms_at_500rps"] or 0) / TARGETS["p99_ms_at_500rps"],
        "batch_msgs_per_s": result["batch_msgs_per_s"] / TARGETS["batch_msgs_per_s"],
    }
    result["load_average"] = os.getloadavg()
    print(f"==> in-process pipeline: {inproc:.0f} msgs/s ({source}); HTTP/in-process ratio "
          f"{result['inprocess_ratio']:.2f}")
    for k, v in result["ratios_to_targets"].items():
        print(f"    {k}: {v:.2f} x target")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return result

