"""What scoring off the event loop costs on normal mail: the pool against inline scoring, side by side.

``python -m services.api.bench_offload [--json FILE] [--rounds N] [--seconds S]`` starts two real API servers
(``flywheel serve`` code path, 2 workers each, one registry): one with the classification pool
(``classify_threads`` from the settings, default 2) and one scoring inline (``classify_threads=0``). Rounds
alternate between them so both see the same machine load. Each round measures, with the benchmark's own load
generator in a separate process (services.bench):

* /classify closed loop, 32 connections: requests/s, p99, and the CPU seconds the server's workers spent per
  request (user + system from /proc: the figure least disturbed by other load on a shared machine);
* /classify open loop at a fixed rate (60% of the lower measured capacity, at most 500 req/s): p50/p99 from
  each request's scheduled send time.

Output: the figures of each side (medians over rounds) and the ratios pool/inline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from services.settings import Settings
from streams.daemon import free_port


def _p(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far."""
    import os

    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run(settings: Settings, rounds: int = 3, seconds: float = 6.0) -> dict[str, Any]:
    from services.api.testing import ApiProcess
    from services.bench import build_request, run_load, sample_corpus, train_quick_version

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-offload-"))
    raws, labels = sample_corpus(settings, 1500, seed=11)
    registry = work / "registry"
    train_quick_version(registry, raws[:1000], labels[:1000], seed=1, promote=True)
    msgs = [r for r in raws[1000:] if len(r) <= 64 * 1024][:400]
    host = "127.0.0.1"
    reqs = [build_request("/classify", r, "message/rfc822", host) for r in msgs]
    sides = {"pool": max(1, settings.classify_threads), "inline": 0}
    procs: dict[str, ApiProcess] = {}
    out: dict[str, Any] = {"workers": 2, "messages": len(msgs), "rounds": rounds, "seconds": seconds,
                           "classify_threads": sides["pool"], "classify_queue": settings.classify_queue}
    try:
        for name, threads in sides.items():
            s = settings.model_copy(update={
                "state_dir": work / name, "downloads_dir": settings.downloads, "registry_dir": registry,
                "api_port": free_port(), "spamd_port": free_port(), "workers": 2, "classify_threads": threads,
                "api_keys": {"bench-offload-admin": "admin"}, "model_poll_s": 60.0,
                "kafka_bootstrap": f"127.0.0.1:{free_port()}",  # scoring needs no broker; none is touched
            })
            procs[name] = ApiProcess(s, work / f"{name}.log").start()
            print(f"==> {name}: {procs[name].base_url} (classify_threads={threads})", flush=True)
        for p in procs.values():  # warm-up
            run_load("closed", host=host, port=p.settings.api_port, requests=reqs, connections=8, duration_s=2.0,
                     per_request_items=1)
        closed: dict[str, list[dict[str, Any]]] = {n: [] for n in procs}
        for r in range(rounds):
            for name, p in procs.items():
                pids = p.worker_pids()
                c0 = _cpu_s(pids)
                res = run_load("closed", host=host, port=p.settings.api_port, requests=reqs, connections=32,
                               duration_s=seconds, per_request_items=1)
                res["cpu_ms_per_request"] = (_cpu_s(pids) - c0) / max(1, res["requests"]) * 1000
                closed[name].append(res)
                print(f"    round {r} {name}: {res['rps']:.0f} req/s, p99 {res['p99_ms']:.1f} ms, "
                      f"{res['cpu_ms_per_request']:.3f} CPU ms/request, failed {res['failed']}", flush=True)
        rps = {n: statistics.median(x["rps"] for x in v) for n, v in closed.items()}
        rate = min(500.0, 0.6 * min(rps.values()))
        opened: dict[str, list[float]] = {n: [] for n in procs}
        failed_open = dict.fromkeys(procs, 0)
        for _ in range(rounds):
            for name, p in procs.items():
                o = run_load("open", host=host, port=p.settings.api_port, requests=reqs, rate=rate,
                             duration_s=seconds)
                opened[name] += [x[1] * 1000 for x in o["samples"]]
                failed_open[name] += sum(1 for x in o["samples"] if not x[2])
        for name in procs:
            out[name] = {
                "classify_rps": rps[name],
                "closed_p99_ms": statistics.median(x["p99_ms"] for x in closed[name]),
                "cpu_ms_per_request": statistics.median(x["cpu_ms_per_request"] for x in closed[name]),
                "closed_failed": sum(x["failed"] for x in closed[name]),
                "open_rate": rate,
                "open_p50_ms": _p(opened[name], 50),
                "open_p99_ms": _p(opened[name], 99),
                "open_failed": failed_open[name],
            }
        pool, inline = out["pool"], out["inline"]
        out["ratio_rps_pool_over_inline"] = pool["classify_rps"] / inline["classify_rps"]
        out["ratio_cpu_per_request_pool_over_inline"] = pool["cpu_ms_per_request"] / inline["cpu_ms_per_request"]
        out["ratio_open_p99_pool_over_inline"] = pool["open_p99_ms"] / inline["open_p99_ms"]
        out["ratio_closed_p99_pool_over_inline"] = pool["closed_p99_ms"] / inline["closed_p99_ms"]
    finally:
        for p in procs.values():
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    for name in sides:
        o = out.get(name, {})
        if o:
            print(f"==> {name}: {o['classify_rps']:.0f} req/s (closed p99 {o['closed_p99_ms']:.1f} ms, "
                  f"{o['cpu_ms_per_request']:.3f} CPU ms/request); at "
                  f"{o['open_rate']:.0f} req/s p50 {o['open_p50_ms']:.2f} ms, p99 {o['open_p99_ms']:.2f} ms")
    if "ratio_rps_pool_over_inline" in out:
        print(f"==> pool/inline: throughput {out['ratio_rps_pool_over_inline']:.3f}, CPU per request "
              f"{out['ratio_cpu_per_request_pool_over_inline']:.3f}, open-loop p99 "
              f"{out['ratio_open_p99_pool_over_inline']:.3f}, closed-loop p99 "
              f"{out['ratio_closed_p99_pool_over_inline']:.3f}")
    return out


def main() -> None:
    from services.logging import configure

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    settings = Settings()
    configure("WARNING", False)
    result = run(settings, rounds=args.rounds, seconds=args.seconds)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
