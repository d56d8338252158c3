"""``flywheel bench api``: the API over loopback HTTP and the spamd port, load generated from another process.

What it measures (JSON keys in brackets), all against a real ``flywheel serve`` subprocess
(uvicorn + httptools + uvloop, ``settings.workers`` workers):

* /classify, one message per request, closed loop with many connections: requests/s [classify_rps];
* /classify at a fixed open-loop rate of 500 req/s: p99 latency [p99_ms_at_500rps];
* /classify/batch with 100 messages per call: messages/s [batch_msgs_per_s];
* the spamd port through concurrent real ``spamc`` processes: requests/s [spamd_rps];
* a model promotion under 500 req/s of /classify: failed requests [swap_failed_requests] and p99 during the
  swap window [swap_p99_ms];
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

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


class _Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

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
    n = int(rate * (duration_s + warmup_s))
    start = time.perf_counter() + 0.05
    tasks = []

    async def fire(i: int, at: float) -> None:
        conn = idle.pop() if idle else _Conn(host, port)
        ok = False
        try:
            status, _ = await conn.request(requests[i % len(requests)])
            ok = status == 200
            idle.append(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError):
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
    return {"samples": [s for s in samples if s[0] >= warmup_s], "warmup_s": warmup_s, "rate": rate}


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
