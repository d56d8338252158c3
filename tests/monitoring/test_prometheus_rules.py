"""The Prometheus configuration and rules, checked by Debian's ``promtool`` (the same Prometheus the stack runs):
the rendered config and the rule files load, the alerts' unit tests pass, every alert has a case where it fires
and one where it does not, and the unit tests notice a broken alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_settings

from services.bench.observability import RULES_DIR, panel_queries, rule_queries
from services.local import stack

TESTS_DIR = RULES_DIR / "tests"

def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=120)


def _alerts(rules_dir: Path = RULES_DIR) -> list[dict[str, Any]]:
    doc = yaml.safe_load((rules_dir / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


@pytest.mark.unit
def test_promtool_checks_the_rendered_config_and_the_rules(tmp_path: Path) -> None:
    config = stack.render_prometheus_config(make_settings(tmp_path / "state"), tmp_path / "out")
    out = _promtool("check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 2 rule files found" in out.stdout
    out = _promtool("check", "rules", *sorted(str(p) for p in RULES_DIR.glob("*.yml")))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == 2


@pytest.mark.unit
def test_promtool_unit_tests_pass() -> None:
    files = sorted(str(p) for p in TESTS_DIR.glob("*.yml"))
    assert len(files) >= 2
    out = _promtool("test", "rules", *files)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(files)


@pytest.mark.unit
def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS_DIR.glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test") or []:
                (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert len(names) >= 10
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


@pytest.mark.unit
def test_the_unit_tests_catch_a_broken_alert(tmp_path: Path) -> None:
    """The same tests against rules whose worker-lag threshold was mistyped must fail, naming the alert."""
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    alerts = rules / "alerts.yml"
    text = alerts.read_text()
    assert "flywheel_worker_lag_records > 1000" in text
    alerts.write_text(text.replace("flywheel_worker_lag_records > 1000", "flywheel_worker_lag_records > 100000"))
    out = _promtool("test", "rules", "alerts_test.yml", cwd=rules / "tests")
    assert out.returncode != 0
    assert "FlywheelWorkerLag" in out.stdout + out.stderr


@pytest.mark.unit
def test_every_dashboard_and_rule_query_parses(tmp_path: Path) -> None:
    """Each query (Grafana variables substituted, alert measures cut out) is valid PromQL for this Prometheus:
    written as recording rules, promtool parses them all."""
    queries = panel_queries() + rule_queries()
    doc = {"groups": [{"name": "every-query", "rules": [
        {"record": f"check:query_{i}", "expr": q.expr} for i, q in enumerate(queries)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(doc))
    out = _promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(queries)} rules found" in out.stdout
