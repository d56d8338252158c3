"""The operators' page: ``GET /operator`` (a static page) and ``GET /operator/data`` (what it draws).

A glance without Grafana: both improvement curves with their fits and where they cross, the champion and its
lineage, recent gate decisions with both sides' metrics, the feedback flow and reporter reputation, and the rules
with their hit counts. The page polls ``/operator/data`` every few seconds and redraws, so a new champion shows
without a reload.

**Who may see it.** The data names reporters (relay users are e-mail-like names) with their reputation, the
champion's lineage (Kafka offsets, data versions) and the gate's statistics: what a hostile flagger would like to
watch while it tunes its attack. So ``/operator/data`` needs a key whose identity is an administrator
(``admin_identities``) or a read-only operator (``operator_identities``); any other key gets 403, no key 401.
The page itself (HTML, script, style) holds no data and is served to anyone. It asks for the key and keeps it in
the tab's ``sessionStorage`` only, sending it as ``X-API-Key`` on its own requests. A key in the query string is
deliberately not accepted (it would land in access logs, browser history and proxies); for automation (a
headless browser) the page takes ``/operator#key=...``: a fragment never leaves the browser, and the page
removes it from the address bar at once. A strict Content-Security-Policy (scripts and styles from this origin
only, requests to this origin only) and text-only rendering of every string keep a name such as a rule
description or a reporter from running as code.

**Several workers and replicas.** Everything but the rule hits comes from the shared registry (``curves.jsonl``,
``decisions.jsonl``, ``history.jsonl``, ``worker.json``, version metadata), which the worker writes and every
API process reads. The append-only files are followed: each process reads only the bytes appended since its
last look and keeps a bounded tail (the curves file is read whole once per process, the others from their last
megabyte), so a poll costs the same after a year of promotions as after a day. Rule
hits are this API server's counters (all its worker processes, through prometheus-client's multiprocess files)
since it started: the page says so. The answer is built at most once a second per process and is bounded in
size (``MAX_DATA_BYTES``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from services.api import metrics
from services.api.deps import get_state, require_operator
from services.api.state import ServingState

log = structlog.get_logger(__name__)
router = APIRouter(tags=["operator"])

STATIC_DIR = Path(__file__).resolve().parent / "static"
POLL_S = 3.0
"""How often the page asks for new data."""
MAX_DATA_BYTES = 512 * 1024
"""Upper bound of one ``/operator/data`` answer."""
CACHE_S = 1.0
"""One answer per process per second, however many pages are open."""
CURVE_POINTS_KEPT = 20_000
"""Curve points a process keeps per side (the fits use all of them; the chart gets at most ``CURVE_POINTS_DRAWN``)."""
CURVE_POINTS_DRAWN = 400
DECISIONS_SHOWN = 12
HISTORY_SHOWN = 15
ANCESTRY_DEPTH = 8
RULES_SHOWN = 500

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_PAGE_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8"}


# --------------------------------------------------------------------------------------------- the page
def _load_static() -> dict[str, tuple[bytes, str]]:
    """The page's three files, read once. An install without them (package data left out) still serves the API;
    only the page answers 503."""
    out: dict[str, tuple[bytes, str]] = {}
    for name in ("operator.html", "operator.js", "operator.css"):
        path = STATIC_DIR / name
        try:
            out[name] = (path.read_bytes(), _STATIC_TYPES[path.suffix])
        except OSError as exc:
            log.warning("operator page file missing", path=str(path), error=str(exc))
    return out


_STATIC = _load_static()


@router.get("/operator", response_class=Response, include_in_schema=True, summary="The operators' page (HTML)",
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}},
                       503: {"description": "the page's files are not installed"}})
async def operator_page() -> Response:
    """A static page (no data in it): it asks for an admin or operator key and polls ``/operator/data``."""
    if "operator.html" not in _STATIC:
        raise HTTPException(503, f"the operator page's files are not installed ({STATIC_DIR}: package data)")
    body, ctype = _STATIC["operator.html"]
    return Response(body, media_type=ctype, headers=_PAGE_HEADERS)


@router.get("/operator/static/{name}", response_class=Response, include_in_schema=False)
async def operator_static(name: str) -> Response:
    if name not in _STATIC or name.endswith(".html"):
        raise HTTPException(404, f"no such file {name!r}")
    body, ctype = _STATIC[name]
    return Response(body, media_type=ctype, headers=_PAGE_HEADERS)


@router.get("/operator/data", response_class=Response, summary="What the operators' page draws (JSON)",
            responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}},
                       401: {"description": "no valid key"}, 403: {"description": "not an admin or operator"}})
async def operator_data(request: Request, _: Annotated[str, Depends(require_operator)]) -> Response:
    """Curves and fits, champion and lineage, gate decisions, feedback flow, reporters, rules and hits;
    bounded in size, at most one build per second per process."""
    state: ServingState = get_state(request)
    body = await run_in_threadpool(_cached_payload, state)
    return Response(body, media_type="application/json",
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


# --------------------------------------------------------------------------------------------- following files
class JsonlTail:
    """The last ``keep`` records of an append-only JSONL file, each read once.

    Each call reads only the bytes appended since the last one (complete lines only: a line still being
    written waits for the next call). A file replaced or truncated is read again from its start, or from its
    last ``first_read_bytes`` when given (then its first, partial, line is skipped).
    """

    def __init__(self, path: Path, keep: int, shape: Callable[[dict[str, Any]], Any] | None = None,
                 first_read_bytes: int | None = None) -> None:
        self.path = path
        self.keep = keep
        self.shape = shape
        self.first_read_bytes = first_read_bytes
        self._records: deque[Any] = deque(maxlen=keep)
        self._ino: int | None = None
        self._offset = 0
        self._lock = threading.Lock()

    def read(self) -> list[Any]:
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._reset()
                self._ino, self._offset = None, 0
                return []
            skip_partial = False
            if st.st_ino != self._ino or st.st_size < self._offset:
                self._reset()
                self._ino = st.st_ino
                self._offset = 0
                if self.first_read_bytes is not None and st.st_size > self.first_read_bytes:
                    self._offset = st.st_size - self.first_read_bytes
                    skip_partial = True
            if st.st_size > self._offset:
                self._follow(st.st_size, skip_partial)
            return list(self._records)

    def _follow(self, size: int, skip_partial: bool) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            carry = b""
            while self._offset + len(carry) < size:
                block = f.read(min(1 << 20, size - self._offset - len(carry)))
                if not block:
                    break
                data = carry + block
                end = data.rfind(b"\n")
                if end < 0:
                    carry = data
                    continue
                lines = data[: end + 1].splitlines()
                if skip_partial:
                    lines, skip_partial = lines[1:], False
                for line in lines:
                    self._take(line)
                self._offset += end + 1
                carry = data[end + 1 :]

    def _take(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if not isinstance(rec, dict):
            return
        shaped = self.shape(rec) if self.shape is not None else rec
        if shaped is not None:
            self._keep(shaped)

    def _keep(self, shaped: Any) -> None:
        self._records.append(shaped)

    def _reset(self) -> None:
        self._records.clear()


class CurveTail(JsonlTail):
    """The curve points, the last ``keep`` of each side (promotions come every few seconds, rule changes seldom:
    one bound for both would soon push every rules point out), merged back in file order."""

    def __init__(self, path: Path, keep: int) -> None:
        super().__init__(path, keep, _curve_point)
        self._seq = 0
        self._sides: dict[str, deque[tuple[int, tuple[Any, ...]]]] = {
            "rules": deque(maxlen=keep), "model": deque(maxlen=keep)}

    def _keep(self, shaped: Any) -> None:
        self._seq += 1
        self._sides[shaped[1]].append((self._seq, shaped))

    def _reset(self) -> None:
        for d in self._sides.values():
            d.clear()

    def read(self) -> list[Any]:
        super().read()
        with self._lock:
            merged = sorted([*self._sides["rules"], *self._sides["model"]], key=lambda t: t[0])
        return [p for _, p in merged]


def _curve_point(p: dict[str, Any]) -> tuple[Any, ...] | None:
    """A curve point, compact: (time ms, side, x, recall@0.1%, recall@1%, 1-AUC, version, kind, served recall@1%)."""
    side = p.get("side")
    if side not in ("model", "rules"):
        return None
    x = _num(p.get("x"))
    if x is None:
        return None
    raw_served = p.get("served")
    served: dict[str, Any] = raw_served if isinstance(raw_served, dict) else {}
    return (_ms(p.get("at")), side, x, _num(p.get("recall_at_fpr_0_1pct")), _num(p.get("recall_at_fpr_1pct")),
            _num(p.get("one_minus_auc")), _text(p.get("version"), 128), _text(p.get("kind"), 32),
            _num(served.get("recall_at_fpr_1pct")))


class _Follower:
    """One process's view of one registry directory."""

    def __init__(self, root: Path) -> None:
        self.curves = CurveTail(root / "curves.jsonl", CURVE_POINTS_KEPT)
        self.decisions = JsonlTail(root / "decisions.jsonl", DECISIONS_SHOWN, first_read_bytes=1 << 20)
        self.history = JsonlTail(root / "history.jsonl", HISTORY_SHOWN, first_read_bytes=1 << 20)
        self.versions: dict[str, dict[str, Any]] = {}  # immutable once written: cached by id
        self.lock = threading.Lock()
        self.cached: tuple[float, bytes] | None = None


_followers: dict[Path, _Follower] = {}
_followers_lock = threading.Lock()


def _follower(root: Path) -> _Follower:
    with _followers_lock:
        f = _followers.get(root)
        if f is None:
            f = _followers[root] = _Follower(root)
        return f


# --------------------------------------------------------------------------------------------- the data
def _cached_payload(state: ServingState) -> bytes:
    f = _follower(state.registry.root)
    with f.lock:
        now = time.monotonic()
        if f.cached is not None and now - f.cached[0] < CACHE_S:
            return f.cached[1]
        body = encode_bounded(build_payload(state, f))
        f.cached = (now, body)
        return body


def encode_bounded(payload: dict[str, Any]) -> bytes:
    """JSON of the payload, never above ``MAX_DATA_BYTES``: the heaviest optional parts go first."""
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    for trim in (_trim_statistics, _trim_rules, _trim_curves):
        if len(body) <= MAX_DATA_BYTES:
            break
        trim(payload)
        payload.setdefault("trimmed", []).append(trim.__name__.removeprefix("_trim_"))
        body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    if len(body) > MAX_DATA_BYTES:
        log.warning("operator data over its bound even trimmed", size=len(body))
        body = orjson.dumps({"at": payload.get("at"), "error": "the operator data is too large to show",
                             "trimmed": payload.get("trimmed")})
    return body


def _trim_statistics(p: dict[str, Any]) -> None:
    for d in p.get("decisions", []):
        d.pop("statistics", None)
    if p.get("champion"):
        p["champion"].pop("hyperparameters", None)


def _trim_rules(p: dict[str, Any]) -> None:
    rules = p.get("rules")
    if isinstance(rules, dict) and isinstance(rules.get("rows"), list):
        rules["rows"] = rules["rows"][:100]
        rules["shown"] = len(rules["rows"])


def _trim_curves(p: dict[str, Any]) -> None:
    curves = p.get("curves")
    if isinstance(curves, dict):
        for side in ("rules", "model"):
            if isinstance(curves.get(side), list):
                curves[side] = _decimate(curves[side], 100)


def build_payload(state: ServingState, f: _Follower) -> dict[str, Any]:
    """Everything the page shows, from the shared registry plus this server's served version and rule hits."""
    reg = state.registry
    served = state.current()
    champion = reg.champion()
    now = datetime.now().astimezone()
    return {
        "at": now.isoformat(timespec="seconds"),
        "at_ms": int(now.timestamp() * 1000),
        "poll_s": POLL_S,
        "served_here": {"version": served.version, "kind": served.model.kind, "provider": served.model.provider,
                        "pid": os.getpid(), "workers": state.settings.workers},
        "champion": _version(reg, f, champion) if champion else None,
        "ancestry": _ancestry(reg, f, champion),
        "history": [_clip(h) for h in reversed(f.history.read())],
        "decisions": [_decision(d) for d in reversed(f.decisions.read())],
        "curves": curves_payload(f.curves.read()),
        "worker": _worker(reg.worker_status()),
        "rules": _rules(served.engine, rule_hits()),
    }


def _version(reg: Any, f: _Follower, version: str) -> dict[str, Any]:
    from models.registry import RegistryError

    cached = f.versions.get(version)
    if cached is not None:
        return cached
    try:
        info = reg.get(version).to_dict()
    except (RegistryError, ValueError, OSError) as exc:  # pruned, or unreadable: say so, do not fail the page
        return {"version": version, "missing": str(exc)[:200]}
    out = {k: _clip(v) for k, v in info.items()}
    if len(f.versions) > 256:
        f.versions.clear()
    f.versions[version] = out
    return out


def _ancestry(reg: Any, f: _Follower, version: str | None) -> list[dict[str, Any]]:
    """The champion and its parents, newest first (at most ``ANCESTRY_DEPTH``)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while version and version not in seen and len(out) < ANCESTRY_DEPTH:
        seen.add(version)
        info = _version(reg, f, version)
        lineage = info.get("lineage") or {}
        raw_counts = lineage.get("counts")
        counts: dict[str, Any] = raw_counts if isinstance(raw_counts, dict) else {}
        out.append({"version": version, "kind": info.get("kind"), "created_at": info.get("created_at"),
                    "missing": info.get("missing"), "flags": _count(counts.get("flags")),
                    "corpus": _count(counts.get("corpus")), "data_version": lineage.get("data_version"),
                    "source": _text(lineage.get("source"), 120)})
        version = info.get("parent")
    return out


def _count(v: Any) -> int | None:
    if isinstance(v, dict):
        return int(sum(x for x in v.values() if isinstance(x, int | float)))
    return int(v) if isinstance(v, int | float) else None


def _decision(d: dict[str, Any]) -> dict[str, Any]:
    keep = ("at", "challenger", "champion", "decision", "reason", "kind", "test", "challenger_metrics",
            "champion_metrics", "evaluation_set", "data_version", "statistics")
    return {k: _clip(d.get(k), depth=3 if k == "statistics" else 4) for k in keep if k in d}


def _worker(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    out = {k: _clip(status.get(k), items=60) for k in ("at", "counters", "labels", "reporters", "live_verdicts")}
    at = _ms(status.get("at"))
    out["age_s"] = round(time.time() - at / 1000, 1) if at else None
    return out


# --------------------------------------------------------------------------------------------- curves
def curves_payload(points: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Both curves (decimated for drawing), their fits over every kept point, and where the model passes the
    rules. The fits and the crossing follow the replay's report: a line for the rules' recall at 1% FPR against
    active rules, a logarithm for the model's against the flags behind the champion (x > 0), and the first model
    point whose recall exceeds the rules' recall of the same moment."""
    rules = [p for p in points if p[1] == "rules"]
    model = [p for p in points if p[1] == "model"]

    def row(p: tuple[Any, ...]) -> list[Any]:
        return [p[0], p[2], p[3], p[4], p[5], p[6], p[8]] if p[1] == "model" else [p[0], p[2], p[3], p[4], p[5]]

    out: dict[str, Any] = {
        "columns": {"rules": ["at_ms", "rules", "recall_0_1pct", "recall_1pct", "one_minus_auc"],
                    "model": ["at_ms", "flags", "recall_0_1pct", "recall_1pct", "one_minus_auc", "version",
                              "served_recall_1pct"]},
        "rules": _decimate([row(p) for p in rules], CURVE_POINTS_DRAWN),
        "model": _decimate([row(p) for p in model], CURVE_POINTS_DRAWN),
        "points": {"rules": len(rules), "model": len(model)},
        "fits": {"rules": _fit([(p[2], p[4]) for p in rules], "line"),
                 "model": _fit([(p[2], p[4]) for p in model if p[2] > 0], "log")},
        "crossing": crossing(points),
    }
    return out


def _fit(xy: list[tuple[float, float | None]], kind: str) -> dict[str, Any] | None:
    pts = [(x, y) for x, y in xy if y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    from models.evaluate import fit_line, fit_log

    xs, ys = zip(*pts, strict=True)
    fit = (fit_line if kind == "line" else fit_log)(xs, ys)
    d = fit.to_dict()
    if not all(math.isfinite(d[k]) for k in ("a", "b", "r2")):
        return None
    return {**d, "x_min": min(xs), "x_max": max(xs), "n": len(pts)}


def crossing(points: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    """The first champion (x > 0) whose recall at 1% FPR passes the rules' recall of the same moment."""
    rules_now: tuple[Any, ...] | None = None
    for p in points:
        if p[1] == "rules":
            rules_now = p
        elif rules_now is not None and p[2] > 0 and p[4] is not None and rules_now[4] is not None \
                and p[4] > rules_now[4]:
            return {"flags": int(p[2]), "at_ms": p[0], "rules": int(rules_now[2]), "model_recall_1pct": p[4],
                    "rules_recall_1pct": rules_now[4], "version": p[6]}
    return None


def _decimate(rows: list[Any], n: int) -> list[Any]:
    """At most ``n`` rows, evenly spread, the first and the last always kept."""
    if len(rows) <= n:
        return rows
    step = (len(rows) - 1) / (n - 1)
    return [rows[round(i * step)] for i in range(n)]


# --------------------------------------------------------------------------------------------- rules
def rule_hits() -> dict[str, float]:
    """Hits per rule counted by this API server since it started: this process's counter, or every worker's
    (prometheus-client's multiprocess files) when the server runs several."""
    from prometheus_client import multiprocess

    directory = os.environ.get(metrics.MULTIPROC_ENV)
    if directory:
        files = [str(p) for p in Path(directory).glob("counter_*.db")]
        families = multiprocess.MultiProcessCollector.merge(files, accumulate=True)
    else:
        families = metrics.RULE_HITS.collect()
    hits: dict[str, float] = {}
    for fam in families:
        if fam.name != "flywheel_rule_hits":
            continue
        for s in fam.samples:
            if s.name.endswith("_total") and "rule" in s.labels:
                hits[s.labels["rule"]] = hits.get(s.labels["rule"], 0.0) + float(s.value)
    return hits


def _rules(engine: Any, hits: dict[str, float]) -> dict[str, Any]:
    rules = engine.rules
    rows = [{"name": r.name, "enabled": bool(r.enabled), "weight": float(r.weight), "kind": r.kind,
             "added": r.added, "source": r.source, "description": _text(r.description, 160),
             "hits": int(hits.get(r.name, 0))} for r in rules]
    rows.sort(key=lambda r: (-r["hits"], not r["enabled"], r["name"]))
    return {"threshold": float(engine.threshold), "active": int(engine.active_count), "total": len(rows),
            "hits_total": int(sum(hits.values())),
            "hits_scope": "hits on messages this API server (all its workers) classified since it started",
            "rows": rows[:RULES_SHOWN], "shown": min(len(rows), RULES_SHOWN)}


# --------------------------------------------------------------------------------------------- helpers
def _clip(v: Any, depth: int = 4, items: int = 40, chars: int = 400) -> Any:
    """A bounded copy of JSON-like data: nested ``depth`` levels, ``items`` per dict/list, ``chars`` per string."""
    if isinstance(v, str):
        return v if len(v) <= chars else v[:chars] + "…"
    if isinstance(v, bool) or v is None or isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if depth <= 0:
        return "…"
    if isinstance(v, dict):
        out = {str(k)[:chars]: _clip(x, depth - 1, items, chars) for k, x in list(v.items())[:items]}
        if len(v) > items:
            out["…"] = f"{len(v) - items} more"
        return out
    if isinstance(v, list | tuple):
        lst = [_clip(x, depth - 1, items, chars) for x in list(v)[:items]]
        if len(v) > items:
            lst.append(f"… {len(v) - items} more")
        return lst
    return _text(v, chars)


def _text(v: Any, chars: int) -> str | None:
    if v is None:
        return None
    s = str(v)
    return s if len(s) <= chars else s[:chars] + "…"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _ms(at: Any) -> int | None:
    if not isinstance(at, str):
        return None
    try:
        return int(datetime.fromisoformat(at).timestamp() * 1000)
    except ValueError:
        return None
