"""The main job on the real stack, as a new user meets it: ``flywheel run --quick --json`` brings up its own broker,
Prometheus, API and worker, replays the corpus as users and an operator would, reports both improvement curves and
keeps serving. While it serves, the README's "Try it" commands run verbatim (on this run's ports) and each
succeeds, ``flywheel status`` names the champion ``/readyz`` serves, and every dashboard panel query and every
recording and alert rule returns data from the Prometheus that scraped it; the operator page is drawn in a real
browser. Ctrl-C then stops it all, and the whole run wrote at most 100 lines to the console."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import DOWNLOADS, free_ports

from services.settings import REPO_ROOT

pytestmark = pytest.mark.e2e

CONSOLE_LINES_MAX = 100


@dataclass
class Served:
    """The running ``flywheel run --quick``: its result, environment, ports and console."""

    proc: subprocess.Popen[bytes]
    result: dict[str, Any]
    env: dict[str, str]
    root: Path
    log: Path
    ports: dict[str, int]
    stopped: list[int] = field(default_factory=list)

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Ctrl-C, as a person would; the exit status (once)."""
        if not self.stopped:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                self.stopped.append(self.proc.wait(timeout=120))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.stopped.append(self.proc.wait())
        return self.stopped[0]


def _wait_serving(proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "Press Ctrl-C to stop everything." in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("replay")
    kafka, controller, prom, api, spamd, worker = free_ports(6)
    ports = {"api": api, "spamd": spamd, "worker": worker, "prometheus": prom, "kafka": kafka}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")},
           "FLYWHEEL_STATE_DIR": str(root / "state"), "FLYWHEEL_DOWNLOADS_DIR": str(DOWNLOADS),
           "FLYWHEEL_KAFKA_PORT": str(kafka), "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(controller),
           "FLYWHEEL_PROMETHEUS_PORT": str(prom), "FLYWHEEL_API_PORT": str(api), "FLYWHEEL_SPAMD_PORT": str(spamd),
           "FLYWHEEL_WORKER_PORT": str(worker), "PYTHONUNBUFFERED": "1",
           # the README's commands call `flywheel` by name
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = root / "replay.json"
    log = root / "console.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "--quick", "--json", str(out)],
                                cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    served = Served(proc, {}, env, root, log, ports)
    try:
        up = _wait_serving(proc, log, 900)
        assert up, f"exit {proc.poll()}; console:\n{served.console()[-4000:]}"
        served.result = json.loads(out.read_text())
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def replay(served: Served) -> dict[str, Any]:
    return served.result


def test_both_curves_are_drawn_by_the_running_system(replay: dict) -> None:
    rules, model = replay["rules_curve"], replay["model_curve"]
    # The operator enabled the rules one at a time, from none to all; the worker measures the rule set it finds
    # each time it looks, so rules enabled while it is busy with a refit share one point (23 points on a quiet
    # machine, 17-19 at a load average of 4-16): a curve of many points, not one per rule.
    assert len(rules) >= 12 and rules[0][0] <= 1 and rules[-1][0] == max(r[0] for r in rules)
    assert [r[0] for r in rules] == sorted(r[0] for r in rules)
    assert replay["rules_fit"]["kind"] == "line" and replay["rules_fit"]["b"] > 0
    # The model started from nothing and learned from the flags: its last champion beats its first.
    flagged = [m for m in model if m[0] > 0]
    assert model[0][0] == 0 and len(flagged) >= 2
    assert flagged[-1][2] > flagged[0][2] and flagged[-1][2] > 0.8, model
    assert replay["model_fit"]["kind"] == "log" and replay["model_fit"]["b"] > 0
    assert replay["crossing_flags"] is None or 0 < replay["crossing_flags"] <= flagged[-1][0]
    assert Path(replay["report"]).is_file()


def test_every_dashboard_and_rule_query_returns_data(replay: dict) -> None:
    assert replay["queries_total"] >= 50
    assert replay["queries_empty"] == 0, replay["queries_empty_list"]


def test_the_operator_page_is_drawn(replay: dict) -> None:
    from PIL import Image

    shot = Path(replay["screenshot"])
    assert shot.is_file()
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # charts, tables and text: not a blank page


# --------------------------------------------------------------------------------------------- the README's "Try it"
def readme_try_it() -> list[str]:
    """The commands of the README's "Try it" block, continuation lines joined, comments kept (bash ignores them)."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"\nTry it[^\n]*\n\n```bash\n(.*?)```", text, re.S)
    assert block, "the README has no 'Try it' bash block"
    commands: list[str] = []
    pending = ""
    for line in block[1].splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    return [c for c in commands if c.strip()]


def _run_block(commands: list[str], served: Served, cwd: Path) -> list[tuple[str, int, str, str]]:
    """Run the commands in one bash (so ``id=$(...)`` carries over), each one's status and output kept; the
    README's default ports replaced by this run's."""
    script = []
    for i, cmd in enumerate(commands):
        cmd = cmd.replace("localhost:8000", f"localhost:{served.ports['api']}")
        cmd = cmd.replace("-p 7830", f"-p {served.ports['spamd']}")
        script.append(f"{{ {cmd}\n}} > out.{i} 2> err.{i}; echo $? > rc.{i}")
    (cwd / "try.sh").write_text("\n".join(script) + "\n")
    subprocess.run(["bash", "try.sh"], cwd=cwd, env=served.env, timeout=120, check=False)
    return [(cmd, int((cwd / f"rc.{i}").read_text()), (cwd / f"out.{i}").read_text(), (cwd / f"err.{i}").read_text())
            for i, cmd in enumerate(commands)]


def test_the_readme_try_it_commands_work_verbatim(served: Served, corpus: list, tmp_path: Path) -> None:
    commands = readme_try_it()
    kinds = ["classify", "spamc", "id", "feedback", "status"]
    assert len(commands) == len(kinds), commands
    spam = next(m for m in corpus if m.is_spam and len(m.raw) < 20_000)
    (tmp_path / "some.eml").write_bytes(spam.raw)
    ran = _run_block(commands, served, tmp_path)
    shown = "\n".join(f"$ {c}\n  exit {rc}\n  out: {out[-600:]}\n  err: {err[-600:]}" for c, rc, out, err in ran)
    by_kind = dict(zip(kinds, ran, strict=True))

    _, rc, out, _ = by_kind["classify"]
    assert rc == 0 and re.fullmatch(r"[0-9a-f]+", json.loads(out)["message_id"]), shown
    _, rc, out, _ = by_kind["spamc"]
    score = re.fullmatch(r"(-?[\d.]+)/([\d.]+)\s*", out)
    assert rc in (0, 1) and score and float(score[2]) > 0, shown  # 0/0 would be spamc's fallback: no answer
    assert by_kind["id"][1] == 0, shown
    _, rc, out, _ = by_kind["feedback"]  # the development user key, accepted on the replay's stack
    accepted = json.loads(out)
    assert rc == 0 and accepted.get("event_id") and accepted.get("label") == "spam", shown
    assert accepted["message_id"] == json.loads(by_kind["classify"][2])["message_id"], shown

    _, rc, out, err = by_kind["status"]
    assert rc == 0, shown
    with urllib.request.urlopen(f"http://127.0.0.1:{served.ports['api']}/readyz", timeout=5) as r:
        serving = json.load(r)["model"]
    # the champion line names what /readyz serves: the replay's registry, followed from the configured state dir
    assert re.search(rf"^champion  {re.escape(serving)}\s", out, re.M), shown
    assert str(served.root / "state" / "replay") in err, shown


def test_the_operator_page_opens_with_the_documented_key(served: Served) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{served.ports['api']}/operator/data",
                                 headers={"X-API-Key": "dev-admin-key"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and json.load(r)


def test_the_banner_lists_every_address_with_what_it_needs(served: Served) -> None:
    text = served.console()
    banner = text[text.rindex("Flywheel is running:"):]
    api = f"http://127.0.0.1:{served.ports['api']}"
    for needed in (f"{api}/docs", f"{api}/operator", "dev-admin-key", "k-replay-operator", "dev-user-key",
                   f"spamc -p {served.ports['spamd']}", f"http://127.0.0.1:{served.ports['worker']}/metrics",
                   f"http://127.0.0.1:{served.ports['prometheus']}", str(served.root / "state" / "replay"),
                   "logs"):
        assert needed in banner, (needed, banner)


# --------------------------------------------------------------------------------------------- stopping, console
def test_ctrl_c_stops_it_all_and_the_console_stayed_short(served: Served) -> None:
    """Last in this file: stops the stack. The console held progress and results, not a line per request."""
    live = served.root / "state" / "live-stack.json"
    assert live.is_file()
    assert served.stop() == 0, served.console()[-3000:]
    assert not live.exists()  # status no longer follows a stack that is gone
    text = served.console()
    lines = text.splitlines()
    assert len(lines) <= CONSOLE_LINES_MAX, f"{len(lines)} console lines:\n{text[-6000:]}"
    assert "[error" not in text and "GroupCoordinator" not in text and "Traceback" not in text, text[-6000:]
    assert text.count("onnx_cuda_unavailable") <= 1
    # per-request and per-event logs went to the state directory, as JSON lines
    logs = served.root / "state" / "replay" / "logs"
    api_lines = (logs / "api.jsonl").read_text().splitlines()
    assert len(api_lines) > 100 and all(json.loads(ln)["event"] for ln in api_lines[:50])
    assert (logs / "worker.jsonl").is_file() and (logs / "stack.jsonl").is_file()
    # faust's data directory lives in the state directory, not in the directory the run started from
    assert list((served.root / "state" / "replay").glob("*-worker-data"))
    assert not list(REPO_ROOT.glob("*-worker-data"))
