"""``flywheel bench hostile``: crafted hostile messages, in-process and over HTTP, against real mail's cost.

What it measures (JSON keys in brackets):

* real corpus messages classified in-process one at a time (parse, rules, features, the champion's ONNX model
  through ``models.classifier.Classifier``): the median CPU time per KB [normal_ms_per_kb] and the median over
  the largest tenth of the messages by size [largest_decile_ms_per_kb];
* every case of ``models.hostile`` (look-alike word runs, pathological headers, deep and wide MIME, URL and
  part floods, encoded-word floods, HTML nesting, invisible text, long lines, base64 and quoted-printable
  abuse) at 32 KiB, at the analysed size (``analyse_bytes``: the whole message is hostile content) and at the
  message size limit (``max_message_bytes``), classified the same way: CPU ms on one core and per KB, with a
  per-stage breakdown [cases, worst_case, worst_ms_per_kb, worst_ms, worst_ms_case];
* the same messages over HTTP to a real API process (``python -m services.api`` on free ports, own state dir,
  the champion of the configured registry) while another process polls ``/healthz`` every 10 ms: the latency
  of each /classify [cases[].http_ms] and the p99 of ``/healthz`` during the suite [healthz_p99_ms];
* the ratios to the targets [ratios_to_targets]: no hostile message over 3x the per-KB time of the largest
  decile of real mail, none over 250 ms on one core, ``/healthz`` p99 at most 50 ms during the suite.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.local.daemon import free_port

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from services.settings import Settings

log = structlog.get_logger(__name__)

TARGETS = {"per_kb_ratio_to_largest_decile": 3.0, "worst_ms": 250.0, "healthz_p99_ms": 50.0}


def _say(msg: str) -> None:
    print(msg, flush=True)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = min(len(xs) - 1, max(0, round(q / 100.0 * (len(xs) - 1))))
    return xs[k]


# --------------------------------------------------------------------------------------------- /healthz poller
def _poll_healthz(port: int, conn: Connection, interval_s: float) -> None:
    """Child process: GET /healthz on one keep-alive connection every ``interval_s`` until told to stop; send
    back (latencies in ms, failures)."""
    import httpx

    lat: list[float] = []
    failed = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
        conn.send("ready")
        while not conn.poll(0):
            t0 = time.perf_counter()
            try:
                ok = client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            dt = time.perf_counter() - t0
            if ok:
                lat.append(dt * 1000.0)
            else:
                failed += 1
            time.sleep(max(0.0, interval_s - dt))
    conn.send((lat, failed))


# --------------------------------------------------------------------------------------------- the benchmark
def _classifier(settings: Settings) -> Any:
    from models.classifier import Classifier
    from models.registry import Registry
    from models.rules import RuleEngine

    reg = Registry(settings.registry)
    version = reg.champion()
    if not version:
        raise RuntimeError(f"the registry {settings.registry} has no champion (run `flywheel setup` first)")
    engine = RuleEngine.load(settings.rules_file) if settings.rules_file.exists() else RuleEngine.default()
    return Classifier(engine, reg.load(version, max_bytes=settings.analyse_bytes), policy=settings.policy,
                      max_bytes=settings.analyse_bytes)


def _stages(clf: Any) -> Any:
    """CPU ms of parse, rules, features + model for one message (one pass each, after a warm call)."""
    from models.features import featurize
    from models.message import parse

    def run(raw: bytes) -> dict[str, float]:
        t0 = time.thread_time()
        pm = parse(raw, max_bytes=clf.max_bytes)
        t1 = time.thread_time()
        rr = clf.rules.evaluate(pm)
        t2 = time.thread_time()
        clf.model.model.run(featurize([pm], [rr], clf.model.features))
        t3 = time.thread_time()
        return {"parse": (t1 - t0) * 1e3, "rules": (t2 - t1) * 1e3, "features_model": (t3 - t2) * 1e3,
                "defects": pm.defects[:12], "rules_timed_out": rr.timed_out}

    return run


def _row_line(row: dict[str, Any], limit_per_kb: float) -> str:
    st = row.get("stages_ms") or {}
    http = row.get("http_ms")
    http_s = f"{http:8.1f}" if isinstance(http, (int, float)) else f"{'-':>8}"
    return (
        f"  {row['case']:24} {row['bytes'] / 1024:9.0f} {row['ms']:9.1f} {row['ms_per_kb']:8.3f} "
        f"{row['ms_per_kb'] / limit_per_kb:6.2f} {st.get('parse', 0):7.1f} {st.get('rules', 0):6.1f} "
        f"{st.get('features_model', 0):6.1f} {http_s}  {' '.join(st.get('defects') or [])[:60]}"
    )


_HEADER = (
    f"  {'case':24} {'KiB':>9} {'cpu ms':>9} {'ms/KB':>8} {'xlim':>6} {'parse':>7} {'rules':>6} {'f+m':>6} "
    f"{'http ms':>8}  defects"
)


def run_hostile_bench(
    settings: Settings,
    json_path: Path | None,
    *,
    corpus_messages: int | None = None,
    sizes: list[int] | None = None,
    repeats: int = 3,
    http: bool = True,
    cases: list[str] | None = None,
) -> dict[str, Any]:
    """Run the suite (see the module doc); write and return the JSON result. ``cases``: names of a subset of
    ``models.hostile.CASES`` (default: all)."""
    from models import hostile
    from models.corpus import load_corpus

    clf = _classifier(settings)
    chosen = [c for c in hostile.CASES if cases is None or c.name in cases]
    if not chosen:
        raise ValueError(f"no such hostile cases: {cases}")
    sizes = sizes or [32 * 1024, settings.analyse_bytes, settings.max_message_bytes]
    result: dict[str, Any] = {
        "cores": os.cpu_count(), "analyse_bytes": settings.analyse_bytes,
        "max_message_bytes": settings.max_message_bytes, "sizes": sizes, "repeats": repeats,
        "model_version": clf.model.version, "rules_active": clf.rules.active_count,
        "rules_budget_ms": clf.rules.budget_ms, "targets": TARGETS,
    }

    _say("==> real mail, in-process (parse + rules + features + model, one message at a time, CPU time)")
    corpus = load_corpus(settings.downloads, settings.corpus_dir)
    raws = [m.raw for m in corpus]
    if corpus_messages is not None and corpus_messages < len(raws):
        step = len(raws) / corpus_messages
        raws = [raws[int(i * step)] for i in range(corpus_messages)]
    for raw in raws[:50]:
        clf.classify(raw)
    base = hostile.corpus_baseline(clf.classify, raws)
    result.update(base)
    limit_per_kb = TARGETS["per_kb_ratio_to_largest_decile"] * base["largest_decile_ms_per_kb"]
    _say(f"    {base['messages']} messages: median {base['normal_ms_per_kb']:.3f} ms/KB; largest decile "
         f"(>= {base['largest_decile_min_bytes']} bytes) {base['largest_decile_ms_per_kb']:.3f} ms/KB; "
         f"limit for hostile mail {limit_per_kb:.3f} ms/KB")

    from models.message import configure_trusted_authserv_ids

    configure_trusted_authserv_ids([hostile.AUTHSERV_ID])  # the authentication-results cases' headers are read
    _say(f"==> {len(chosen)} hostile cases x {len(sizes)} sizes, in-process (median of {repeats})")
    _say(_HEADER)
    rows = hostile.run_inprocess(clf.classify, sizes, cases=chosen, repeats=repeats, stages=_stages(clf),
                                 progress=lambda row: _say(_row_line(row, limit_per_kb)))
    result["cases"] = rows

    if http:
        result.update(_http_suite(settings, sizes, chosen, rows))
        _say("==> the same over HTTP")
        _say(_HEADER)
        for row in rows:
            _say(_row_line(row, limit_per_kb))

    worst = max(rows, key=lambda r: r["ms_per_kb"])
    slowest = max(rows, key=lambda r: r["ms"])
    result.update({
        "worst_case": worst["case"], "worst_case_bytes": worst["bytes"], "worst_ms_per_kb": worst["ms_per_kb"],
        "worst_ms": slowest["ms"], "worst_ms_case": slowest["case"], "worst_ms_bytes": slowest["bytes"],
    })
    result["ratios_to_targets"] = {
        "per_kb_ratio_to_largest_decile": worst["ms_per_kb"] / base["largest_decile_ms_per_kb"]
        / TARGETS["per_kb_ratio_to_largest_decile"],
        "worst_ms": slowest["ms"] / TARGETS["worst_ms"],
        "healthz_p99_ms": (result["healthz_p99_ms"] / TARGETS["healthz_p99_ms"])
        if isinstance(result.get("healthz_p99_ms"), (int, float)) else None,
    }
    result["load_average"] = os.getloadavg()
    _say(f"==> worst per KB: {worst['case']} at {worst['bytes']} bytes, {worst['ms_per_kb']:.3f} ms/KB "
         f"({worst['ms_per_kb'] / base['largest_decile_ms_per_kb']:.2f}x the largest decile of real mail)")
    _say(f"    slowest: {slowest['case']} at {slowest['bytes']} bytes, {slowest['ms']:.1f} ms CPU")
    if http:
        p50, p99 = result.get("healthz_p50_ms"), result.get("healthz_p99_ms")
        _say(f"    /healthz during the suite: p50 {p50 or 0:.1f} ms, p99 {p99 or 0:.1f} ms over "
             f"{result.get('healthz_samples')} polls, {result.get('healthz_failed')} failed; "
             f"{result.get('http_non_200')} /classify answers were not 200")
    for k, v in result["ratios_to_targets"].items():
        _say(f"    {k}: {v:.2f} x target" if v is not None else f"    {k}: not measured")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str))
    return result


def _http_suite(settings: Settings, sizes: list[int], cases: list[Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Start an API, poll /healthz from another process, POST every case; fill ``rows[i]["http_ms"]``."""
    import httpx

    from services.bench.api_process import ApiProcess

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-hostile-"))
    port, spamd_port = free_port(), free_port()
    s = settings.model_copy(update={
        "state_dir": work, "downloads_dir": settings.downloads, "registry_dir": settings.registry,
        "rules_path": settings.rules_file if settings.rules_file.exists() else None,
        "api_host": "127.0.0.1", "api_port": port, "spamd_port": spamd_port,
    })
    out: dict[str, Any] = {"http_workers": s.workers}
    proc = ApiProcess(s, work / "api.log")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    poller = ctx.Process(target=_poll_healthz, args=(port, child, 0.01), daemon=True)
    try:
        _say("==> starting an API for the HTTP half")
        proc.start()
        poller.start()
        if not parent.poll(60):
            raise RuntimeError("the /healthz poller did not start")
        parent.recv()
        by_key = {(r["case"], r["bytes"]): r for r in rows}
        with httpx.Client(base_url=proc.base_url, timeout=120.0) as client:
            for _ in rows[:3]:  # warm the server's first-use paths
                client.post("/classify", content=b"Subject: warm\n\nhello\n",
                            headers={"Content-Type": "message/rfc822"})
            t_start = time.perf_counter()
            for size in sizes:
                for case in cases:
                    raw = case.build(size)
                    t0 = time.perf_counter()
                    resp = client.post("/classify", content=raw, headers={"Content-Type": "message/rfc822"})
                    dt = (time.perf_counter() - t0) * 1000.0
                    row = by_key.get((case.name, len(raw)))
                    if row is not None:
                        row["http_ms"] = dt
                        row["http_status"] = resp.status_code
            out["http_suite_s"] = time.perf_counter() - t_start
        parent.send("stop")
        lat, failed = parent.recv() if parent.poll(30) else ([], -1)
        out.update({
            "healthz_samples": len(lat), "healthz_failed": failed,
            "healthz_p50_ms": _pct(lat, 50), "healthz_p99_ms": _pct(lat, 99), "healthz_max_ms": max(lat, default=None),
        })
        statuses = [r.get("http_status") for r in rows]
        out["http_non_200"] = sum(1 for st in statuses if st != 200)
        out["http_ms_max"] = max((r["http_ms"] for r in rows if "http_ms" in r), default=None)
    finally:
        if poller.is_alive():
            poller.terminate()
        poller.join(10)
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    if out.get("healthz_samples"):
        out["healthz_mean_ms"] = statistics.fmean(lat)
    return out
