"""The main job on the real stack: ``flywheel replay --quick --json`` brings up its own broker, Prometheus, API and
worker, replays the corpus as users and an operator would, and reports both improvement curves; every dashboard
panel query and every recording and alert rule then returns data from the Prometheus that scraped it, and the
operator page is drawn in a real browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DOWNLOADS, free_ports

from services.settings import REPO_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("replay")
    kafka, controller, prom, api, spamd, worker = free_ports(6)
    env = {**os.environ, "FLYWHEEL_STATE_DIR": str(root / "state"), "FLYWHEEL_DOWNLOADS_DIR": str(DOWNLOADS),
           "FLYWHEEL_KAFKA_PORT": str(kafka), "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(controller),
           "FLYWHEEL_PROMETHEUS_PORT": str(prom), "FLYWHEEL_API_PORT": str(api), "FLYWHEEL_SPAMD_PORT": str(spamd),
           "FLYWHEEL_WORKER_PORT": str(worker), "PYTHONUNBUFFERED": "1"}
    out = root / "replay.json"
    log = root / "replay.log"
    with log.open("wb") as f:
        proc = subprocess.run([sys.executable, "-m", "services.cli", "replay", "--quick", "--json", str(out)],
                              cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=900, check=False)
    tail = log.read_text(errors="replace")[-4000:]
    assert proc.returncode == 0, tail
    result = json.loads(out.read_text())
    result["_log"] = tail
    return result


def test_both_curves_are_drawn_by_the_running_system(replay: dict) -> None:
    rules, model = replay["rules_curve"], replay["model_curve"]
    # The operator enabled the rules one at a time: one point per rule set, from none to all.
    assert len(rules) >= 20 and rules[0][0] <= 1 and rules[-1][0] == max(r[0] for r in rules)
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
