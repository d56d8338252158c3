"""The query runner: which queries it finds in the dashboards and rules, how it turns alerts into measures, and
that against a real Prometheus it reports an empty result as a failure (the end-to-end proof, zero empty queries
after a replay, is the replay's own test)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import make_settings

from services.bench.observability import (
    DASHBOARDS_DIR,
    RULES_DIR,
    alert_measures,
    panel_queries,
    rule_queries,
    run_monitoring_queries,
    substitute_variables,
)
from services.local import stack
from services.local.daemon import wait_until
from services.settings import Settings


def _count_dashboard_exprs() -> int:
    n = 0
    for path in DASHBOARDS_DIR.glob("*.json"):
        board = json.loads(path.read_text())
        n += sum(1 for p in board["panels"] for t in p.get("targets") or [] if t.get("expr"))
        n += sum(1 for a in board["annotations"]["list"] if a.get("expr"))
    return n


def _rules() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    rules = [r for f in sorted(RULES_DIR.glob("*.yml")) for g in yaml.safe_load(f.read_text())["groups"]
             for r in g["rules"]]
    return [r for r in rules if "record" in r], [r for r in rules if "alert" in r]


@pytest.mark.unit
def test_panel_queries_are_every_expression_without_template_variables() -> None:
    queries = panel_queries()
    assert len(queries) == _count_dashboard_exprs() >= 40
    assert {q.source for q in queries} == {"panel", "annotation"}
    raw = "".join((DASHBOARDS_DIR / "flywheel.json").read_text())
    assert "$__rate_interval" in raw  # the dashboards do use Grafana's variables ...
    for q in queries:  # ... and none is left in what is run
        assert "$" not in q.expr and "[[" not in q.expr, q
    assert any("[1m]" in q.expr for q in queries)
    names = [q.name for q in queries]
    assert len(set(names)) == len(names)


@pytest.mark.unit
def test_rule_queries_cover_every_recording_rule_twice_and_every_alert() -> None:
    records, alerts = _rules()
    queries = rule_queries()
    recorded = [q for q in queries if q.source == "record"]
    assert len(recorded) == 2 * len(records)
    # the recorded series, with the rule's static labels, is queried too
    assert 'flywheel:feedback_refused:ratio_rate5m{cause="unavailable"}' in {q.expr for q in recorded}
    measured = {q.name.split(" ")[0] for q in queries if q.source == "alert"}
    assert measured == {a["alert"] for a in alerts}
    for q in queries:
        assert "$" not in q.expr
        if q.source == "alert":  # no comparison left at the top level: a measure returns data when healthy
            assert not re.search(r"(==|!=|>=|<=|\s>\s|\s<\s|\band\b|\bunless\b|\bor\b)",
                                 re.sub(r"\([^()]*\)|\{[^{}]*\}", "", q.expr)), q


@pytest.mark.unit
@pytest.mark.parametrize(("expr", "measures"), [
    ('up{job="a"} == 0 or absent(up{job="a"})', ['up{job="a"}']),
    ("x > 0.2 and on () sum(rate(y[5m])) > 0.05", ["x", "sum(rate(y[5m]))"]),
    ("(a > 0.02) and on (version) (b >= 50) and on (version) max by (version) (c) == 1",
     ["a", "b", "max by (version) (c)"]),
    ('s{side="served"} < ignoring (side) s{side="rules"} - 0.02', ['s{side="served"}', 's{side="rules"} - 0.02']),
    ("sum(increase(d[6h])) >= 10 unless sum(increase(d{x=\"p\"}[6h])) > 0",
     ["sum(increase(d[6h]))", 'sum(increase(d{x="p"}[6h]))']),
    ('absent_over_time(up{job="a"}[5m])', ['up{job="a"}']),
    ('count(x{l=~"a|b>c"}) > bool 3', ['count(x{l=~"a|b>c"})']),
    ("error_ratio > 1", ["error_ratio"]),  # 'or' inside a name is not an operator
])
def test_alert_measures(expr: str, measures: list[str]) -> None:
    assert alert_measures(expr) == measures


@pytest.mark.unit
def test_unknown_grafana_variables_are_refused() -> None:
    assert substitute_variables("rate(x[$__rate_interval]) + rate(x[${__interval}])") == "rate(x[1m]) + rate(x[15s])"
    with pytest.raises(ValueError, match="instance"):
        substitute_variables('up{instance="$instance"}')


@pytest.fixture()
def prometheus_without_targets(tmp_path: Path) -> Iterator[Settings]:
    """A real Prometheus (the project's config and rules) on free ports, whose API and worker do not exist."""
    settings = make_settings(tmp_path / "state")
    stack.prometheus_start(settings)
    try:
        wait_until(lambda: bool(stack.prometheus_query(settings, 'up{job="flywheel-api"}')), 30,
                   "the first scrape of the (absent) API", 0.5)
        yield settings
    finally:
        stack.prometheus_stop(settings)


@pytest.mark.integration
def test_empty_results_are_reported_by_source(prometheus_without_targets: Settings) -> None:
    """Every query is run and counted; against a Prometheus whose flywheel targets are down, ``up`` exists (0) and
    the rest is empty: the empty ones are listed with where they come from."""
    result = run_monitoring_queries(prometheus_without_targets)
    total = len(panel_queries()) + len(rule_queries())
    assert result["total"] == total
    assert result["empty"] == len(result["empty_list"]) and 0 < result["empty"] < total
    listed = "\n".join(result["empty_list"])
    assert "panel: Flywheel / The seed's picture" in listed and "record: flywheel:live_fpr:ratio" in listed
    assert 'alert: FlywheelApiDown (measure 1): up{job="flywheel-api"}' not in listed  # up = 0 is data
    assert "Scrape targets up" not in listed
