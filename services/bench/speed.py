"""``flywheel bench speed``: Flywheel and rspamd side by side, as a mail server calls each.

Both run on this machine with one worker each and are called by one sequential HTTP client (keep-alive), with
the same messages (a seeded sample of the corpus, both classes), in alternating rounds so that the machine's
noise falls on both alike:

* **Flywheel**: ``flywheel serve``'s code path (:class:`~services.bench.api_process.ApiProcess`, one uvicorn
  worker) with the seed a fresh install ships, ``POST /classify``;
* **rspamd**: Debian's rspamd (3.4 on bookworm) with one normal worker, its stock rules and local modules only:
  the modules that ask the network (DNS lists, SPF, DKIM, DMARC, ARC, fuzzy storage, update maps) or need Redis
  (Bayes, neural, reputation, rate limits) are disabled, and its resolver is :class:`NxResolver`, which answers
  every other lookup at once; ``POST /checkv2``. That is the setup of the rules-only row of ``../shared/reference/peer-filters.md``.

``vs_rspamd`` is Flywheel's msgs/s over rspamd's, the median over the rounds (each round's ratio is measured
minutes, not hours, apart), with its worst round beside it. rspamd is installed by ``deploy/system-deps.sh``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from services.bench.api import sample_corpus
from services.bench.api_process import ApiProcess
from services.bench.harness import seed_registry
from services.local.daemon import Child, free_port, wait_until

if TYPE_CHECKING:
    from services.settings import Settings

__all__ = ["TARGET_VS_RSPAMD", "rspamd_config", "run_speed_bench"]

TARGET_VS_RSPAMD = 3.0
RSPAMD_OFF = (
    "rbl", "surbl", "emails", "dkim", "spf", "dmarc", "arc", "asn", "fuzzy_check", "phishing", "url_reputation",
    "neural", "ratelimit", "greylist", "replies", "history_redis", "mx_check", "dcc", "reputation", "rspamd_update",
    "metadata_exporter", "clickhouse", "elastic", "dkim_signing", "antivirus", "external_services", "p0f", "bimi",
    "spamtrap", "url_redirector", "maps_stats", "metric_exporter", "whitelist", "classifier-bayes", "once_received",
)
"""rspamd modules that would ask the network or Redis: disabled, so rspamd runs on its local rules alone."""


def _say(msg: str) -> None:
    print(msg, flush=True)


class NxResolver:
    """A DNS server on a loopback UDP port that answers every query at once with NXDOMAIN: rspamd's modules that
    look names up (received headers, HELO, URLs) get their answer in microseconds, as from a warm local resolver,
    instead of waiting for a timeout on a machine without network (which made rspamd 20 times slower here)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True, name="nx-resolver")

    def start(self) -> NxResolver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.sock.close()
        if self._thread.is_alive():
            self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            if len(query) < 12:
                continue
            # the query's id and question, flags QR|RD|RA with RCODE 3 (NXDOMAIN), no answers (RFC 1035 4.1.1)
            flags = 0x8180 | (query[2] & 0x01) << 8 | 0x0003
            reply = query[:2] + flags.to_bytes(2, "big") + query[4:6] + b"\x00\x00\x00\x00\x00\x00" + query[12:]
            with contextlib.suppress(OSError):
                self.sock.sendto(reply, peer)


def rspamd_config(root: Path, port: int, dns_port: int, binary: str = "rspamd") -> list[str]:
    """Write a one-worker, local-only rspamd configuration under ``root``; returns the command that runs it in
    the foreground (as root too: ``--insecure``; the bench's own directories for pid, data and log)."""
    local = root / "local.d"
    local.mkdir(parents=True, exist_ok=True)
    for d in ("run", "db", "log"):
        (root / d).mkdir(exist_ok=True)
    (root / "rspamd.conf").write_text(f"""\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "error";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{port}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
""")
    (local / "options.inc").write_text(f'dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 1s; }}\n')
    for module in RSPAMD_OFF:
        (local / f"{module}.conf").write_text("enabled = false;\n")
    return [binary, "-f", "-i", "-c", str(root / "rspamd.conf"), f"--var=LOCAL_CONFDIR={root}",
            f"--var=RUNDIR={root / 'run'}", f"--var=DBDIR={root / 'db'}", f"--var=LOGDIR={root / 'log'}"]


def _sequential(client: httpx.Client, path: str, messages: list[bytes], check: str) -> tuple[float, int]:
    """(msgs/s, failed) for one pass: each message posted and its answer read before the next."""
    failed = 0
    t0 = time.perf_counter()
    for raw in messages:
        r = client.post(path, content=raw)
        if r.status_code != 200 or check not in r.text:
            failed += 1
    return len(messages) / (time.perf_counter() - t0), failed


def run_speed_bench(settings: Settings, json_path: Path | None, *, messages: int = 400,
                    rounds: int = 3) -> dict[str, Any]:
    """Run the benchmark (module docstring); returns its figures (also written to ``json_path``)."""
    binary = shutil.which("rspamd")
    if binary is None:
        raise SystemExit("rspamd is not installed: run `make setup` (deploy/system-deps.sh installs Debian's rspamd)")
    started = time.monotonic()
    root = settings.state_dir / "bench-speed" / time.strftime("%Y%m%dT%H%M%S")
    raws, labels = sample_corpus(settings, messages, seed=400)
    s = settings.model_copy(update={
        "state_dir": root / "flywheel", "registry_dir": None, "rules_path": None, "api_port": free_port(),
        "spamd_port": free_port(), "workers": 1, "campaign_memory": False,
        "api_keys": {"bench-speed": "admin"}, "admin_identities": ["admin"],
    })
    s.registry.mkdir(parents=True, exist_ok=True)
    _say("==> Flywheel: one API worker with the seed a fresh install ships")
    seed_registry(s)
    port = free_port()
    resolver = NxResolver()
    rspamd = Child("rspamd", rspamd_config(root / "rspamd", port, resolver.port, binary), port,
                   logfile=root / "rspamd.out")
    api = ApiProcess(s, root / "api.log")
    result: dict[str, Any] = {"messages": len(raws), "spam": int(sum(labels)), "rounds": rounds,
                              "rspamd": rspamd_version(binary), "flywheel_workers": 1, "rspamd_workers": 1}
    runs: list[dict[str, Any]] = []
    try:
        api.start()
        _say("==> rspamd: one normal worker, local rules only (no network, no Redis; every name NXDOMAIN at once)")
        resolver.start()
        rspamd.start()
        with httpx.Client(base_url=api.base_url, timeout=30.0, headers={"Content-Type": "message/rfc822"}) as fw, \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as rs:
            wait_until(lambda: _answers(rs), 120, "rspamd to answer /checkv2", 0.2)
            for client, path, check in ((fw, "/classify", '"is_spam"'), (rs, "/checkv2", '"action"')):
                _sequential(client, path, raws[:50], check)  # warm-up: caches, first-use paths
            for r in range(rounds):
                f_rate, f_failed = _sequential(fw, "/classify", raws, '"is_spam"')
                r_rate, r_failed = _sequential(rs, "/checkv2", raws, '"action"')
                runs.append({"flywheel_msgs_per_s": round(f_rate, 1), "rspamd_msgs_per_s": round(r_rate, 1),
                             "ratio": round(f_rate / r_rate, 3), "flywheel_failed": f_failed,
                             "rspamd_failed": r_failed})
                _say(f"    round {r + 1}/{rounds}: Flywheel /classify {f_rate:.0f} msgs/s, rspamd /checkv2 "
                     f"{r_rate:.0f} msgs/s: {f_rate / r_rate:.2f}x (failed {f_failed} / {r_failed})")
    finally:
        api.stop()
        rspamd.stop()
        resolver.stop()
    result["runs"] = runs
    result["flywheel_msgs_per_s"] = statistics.median(x["flywheel_msgs_per_s"] for x in runs)
    result["rspamd_msgs_per_s"] = statistics.median(x["rspamd_msgs_per_s"] for x in runs)
    result["vs_rspamd"] = statistics.median(x["ratio"] for x in runs)
    result["vs_rspamd_worst"] = min(x["ratio"] for x in runs)
    result["failed"] = sum(x["flywheel_failed"] + x["rspamd_failed"] for x in runs)
    result["checks"] = {"vs_rspamd": {"value": result["vs_rspamd"], "bound": TARGET_VS_RSPAMD,
                                      "met": result["vs_rspamd"] >= TARGET_VS_RSPAMD}}
    result["wall_s"] = round(time.monotonic() - started, 1)
    _say(f"vs_rspamd {result['vs_rspamd']:.2f} (worst round {result['vs_rspamd_worst']:.2f}; target >= "
         f"{TARGET_VS_RSPAMD}): {'met' if result['checks']['vs_rspamd']['met'] else 'SHORT'}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    return result


def _answers(client: httpx.Client) -> bool:
    try:
        return client.post("/checkv2", content=b"Subject: ping\r\n\r\nping\r\n").status_code == 200
    except httpx.HTTPError:
        return False


def rspamd_version(binary: str) -> str:
    """rspamd's version line (``rspamd --version``)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)  # noqa: S603 - the rspamd found on PATH, fixed arguments
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"
