"""``flywheel status``: which servers of the stack answer, the champion and its data, the worker's lag and the last
gate decisions, probed from outside the way an operator would (each probe bounded by ``STATUS_TIMEOUT_S``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from services.settings import Settings

__all__ = ["STATUS_TIMEOUT_S", "print_status", "stack_status"]


STATUS_TIMEOUT_S = 2.0
"""Each server gets this long to answer: a stack under load still answers its health checks within it."""


def _loopback(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine (a wildcard bind answers on loopback)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - recognises a wildcard bind to reach it on loopback; binds nothing
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _http_get(url: str, timeout_s: float = STATUS_TIMEOUT_S) -> tuple[int, bytes]:
    """(status, body) of a GET; an HTTP error status is an answer too. Raises OSError when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a loopback URL built here
            return int(resp.status), resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(1 << 20)
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise reason if isinstance(reason, OSError) else OSError(str(reason)) from None


def _why(exc: BaseException) -> str:
    """A short reason for a failed connection (``connection refused``, ``timed out``)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {STATUS_TIMEOUT_S:g}s"
    return str(exc) or type(exc).__name__


def _check_kafka(s: Settings) -> dict[str, Any]:
    """A TCP connect first (a refused port is known at once, without the Kafka client's timeout), then a
    metadata request: a port that accepts is not yet a broker that answers."""
    import socket

    hint = "flywheel kafka start" if s.manages_kafka else "the Kafka that FLYWHEEL_KAFKA_BOOTSTRAP names"
    refusal: OSError | None = None
    for server in s.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=STATUS_TIMEOUT_S):
                refusal = None
                break
        except (OSError, ValueError) as exc:
            refusal = exc if isinstance(exc, OSError) else OSError(str(exc))
    if refusal is not None:
        return {"ok": False, "address": s.bootstrap_servers, "detail": f"{_why(refusal)} (start it: {hint})"}
    from streams.admin import answers_metadata

    ok = answers_metadata(s.streams(), timeout_s=STATUS_TIMEOUT_S)
    return {"ok": ok, "address": s.bootstrap_servers,
            "detail": "answers metadata" if ok else f"accepts connections but answers no metadata request ({hint})"}


def _check_prometheus(s: Settings) -> dict[str, Any]:
    url = f"http://127.0.0.1:{s.prometheus_port}/-/ready"
    try:
        code, _ = _http_get(url)
    except OSError as exc:
        return {"ok": False, "address": url, "detail": f"{_why(exc)} (start it: flywheel prometheus start)"}
    return {"ok": code == 200, "address": url, "detail": "ready" if code == 200 else f"HTTP {code}: not ready"}


def _check_healthz(s: Settings) -> dict[str, Any]:
    url = f"http://{_loopback(s.api_host)}:{s.api_port}/healthz"
    try:
        code, body = _http_get(url)
    except OSError as exc:
        return {"ok": False, "address": url, "detail": f"{_why(exc)} (start it: flywheel serve)"}
    try:
        ok = code == 200 and json.loads(body).get("status") == "ok"
    except (ValueError, AttributeError):
        ok = False
    return {"ok": ok, "address": url, "detail": "ok" if ok else f"HTTP {code}: {body[:120].decode(errors='replace')}"}


def _check_readyz(s: Settings) -> dict[str, Any]:
    url = f"http://{_loopback(s.api_host)}:{s.api_port}/readyz"
    try:
        code, body = _http_get(url)
    except OSError as exc:
        return {"ok": False, "address": url, "detail": _why(exc)}
    try:
        ready = json.loads(body)
    except ValueError:
        return {"ok": False, "address": url, "detail": f"HTTP {code}: not JSON"}
    if not isinstance(ready, dict):
        return {"ok": False, "address": url, "detail": f"HTTP {code}: unexpected answer"}
    ok = code == 200 and ready.get("ready") is True
    parts = [f"model {ready.get('model') or 'none'}", f"kafka {'reachable' if ready.get('kafka') else 'unreachable'}"]
    return {"ok": ok, "address": url, "detail": ("ready: " if ok else "not ready: ") + ", ".join(parts),
            "model": ready.get("model")}


def _check_spamd(s: Settings) -> dict[str, Any]:
    import socket

    host = _loopback(s.api_host).strip("[]")
    address = f"{host}:{s.spamd_port}"
    try:
        with socket.create_connection((host, s.spamd_port), timeout=STATUS_TIMEOUT_S) as sock:
            sock.settimeout(STATUS_TIMEOUT_S)
            sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
            answer = sock.recv(256).decode("ascii", "replace").strip()
    except OSError as exc:
        return {"ok": False, "address": address, "detail": f"{_why(exc)} (the API process serves it)"}
    ok = answer.endswith("PONG")
    return {"ok": ok, "address": address, "detail": "PONG" if ok else f"unexpected answer {answer[:60]!r}"}


def _check_worker(s: Settings) -> dict[str, Any]:
    """The worker's metrics page, and from it the lag and the data version it has learned up to."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{s.worker_port}/metrics"
    try:
        code, body = _http_get(url)
    except OSError as exc:
        return {"ok": False, "address": url, "detail": f"{_why(exc)} (start it: flywheel worker)"}
    if code != 200:
        return {"ok": False, "address": url, "detail": f"HTTP {code}"}
    values: dict[str, float] = {}
    wanted = {"flywheel_worker_lag_records", "flywheel_worker_data_version"}
    try:
        for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
            for sample in family.samples:
                if sample.name in wanted:
                    values[sample.name] = float(sample.value)
    except ValueError as exc:
        return {"ok": False, "address": url, "detail": f"unreadable metrics page: {exc}"}
    if "flywheel_worker_lag_records" not in values:
        return {"ok": False, "address": url, "detail": "answers, but not with the worker's metrics (another server?)"}
    lag = int(values["flywheel_worker_lag_records"])
    version = values.get("flywheel_worker_data_version")
    return {"ok": True, "address": url, "detail": f"lag {lag} records", "lag_records": lag,
            "data_version": int(version) if version is not None else None}


_CHECKS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "kafka": _check_kafka,
    "prometheus": _check_prometheus,
    "api": _check_healthz,
    "api ready": _check_readyz,
    "spamd": _check_spamd,
    "worker": _check_worker,
}


def _data_behind(lineage: dict[str, Any]) -> str:
    """The labelled data a version learned from, in words (seed: corpus counts; worker: flags and corpus)."""
    counts = lineage.get("counts") or {}
    parts = []
    for source in ("flags", "corpus"):
        c = counts.get(source)
        if isinstance(c, dict) and (c.get("ham") or c.get("spam")):
            parts.append(f"{source}: {c.get('ham', 0)} ham + {c.get('spam', 0)} spam")
    if not parts and ("ham" in counts or "spam" in counts):
        parts.append(f"{lineage.get('source', 'corpus')}: {counts.get('ham', 0)} ham + {counts.get('spam', 0)} spam")
    if lineage.get("data_version") is not None:
        parts.append(f"data version {lineage['data_version']}")
    return "; ".join(parts) or str(lineage.get("source") or "(no lineage recorded)")


def stack_status(s: Settings, decisions: int = 5) -> dict[str, Any]:
    """Every server's answer (checked side by side), the champion, the worker's lag and the last gate
    decisions; ``missing`` has one line per part that does not answer (empty when all is well)."""
    from concurrent.futures import ThreadPoolExecutor

    from models.registry import Registry, RegistryError

    with ThreadPoolExecutor(max_workers=len(_CHECKS)) as pool:
        futures = {name: pool.submit(check, s) for name, check in _CHECKS.items()}
        servers = {name: f.result() for name, f in futures.items()}
    missing = [f"{name}: {r['address']}: {r['detail']}" for name, r in servers.items() if not r["ok"]]

    reg = Registry(s.registry)
    champion: dict[str, Any] | None = None
    version = reg.champion()
    if version is None:
        missing.append(f"champion: the registry {s.registry} has none (run `flywheel setup`)")
    else:
        try:
            info = reg.get(version)
        except RegistryError as exc:
            missing.append(f"champion: {version} is unreadable: {exc}")
        else:
            promoted: dict[str, Any] = next((h for h in reversed(reg.history()) if h.get("version") == version), {})
            champion = {"version": version, "kind": info.kind, "created_at": info.created_at,
                        "promoted_at": promoted.get("at"), "reason": promoted.get("reason"),
                        "data": _data_behind(info.lineage), "lineage": info.lineage}
    w = servers["worker"]
    worker = {"lag_records": w.get("lag_records"), "data_version": w.get("data_version")}
    summary = reg.worker_status()
    if summary:
        worker.update(status_at=summary.get("at"), labels=summary.get("labels"))
    recent = [{k: d.get(k) for k in ("at", "challenger", "decision", "kind", "test", "reason")}
              for d in reversed(reg.decisions(limit=decisions))] if decisions else []
    return {"ok": not missing, "servers": servers, "champion": champion, "worker": worker, "decisions": recent,
            "missing": missing}


def print_status(st: dict[str, Any]) -> None:
    click.echo("servers")
    for name, r in st["servers"].items():
        mark = click.style("ok  ", fg="green") if r["ok"] else click.style("DOWN", fg="red")
        click.echo(f"  {mark}  {name:10}  {r['address']:38}  {r['detail']}")
    c = st["champion"]
    if c:
        when = (c.get("promoted_at") or c["created_at"] or "")[:19].replace("T", " ")
        click.echo(f"champion  {c['version']}  ({c['kind']}, promoted {when})")
        click.echo(f"          trained on {c['data']}")
    else:
        click.echo("champion  (none)")
    w = st["worker"]
    lag = "?" if w.get("lag_records") is None else w["lag_records"]
    line = f"worker    lag {lag} records, data version {'?' if w.get('data_version') is None else w['data_version']}"
    if w.get("labels"):
        line += "; labels " + ", ".join(f"{k} {v}" for k, v in sorted(w["labels"].items()))
    click.echo(line)
    n = len(st["decisions"])
    click.echo(f"gate decisions (newest first, {n})" if n else "gate decisions: none yet")
    for d in st["decisions"]:
        when = (d.get("at") or "")[:19].replace("T", " ")
        click.echo(f"  {when}  {d.get('decision') or '?':9} {d.get('kind') or '?':7} {d.get('test') or '-':10} "
                   f"{d.get('reason') or ''}")
