"""The Grafana dashboards as code: the checked-in JSON is exactly what the generator writes, it is a valid dashboard
of grafana-foundation-sdk's schema, the headline XY chart can find its fields, and the provisioning files point at
the dashboards and the local Prometheus."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from services.bench.observability import DASHBOARDS_DIR, MONITORING_DIR

GRAFANA = MONITORING_DIR / "grafana"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flywheel_dashboards", GRAFANA / "flywheel_dashboard.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _board(name: str = "flywheel.json") -> dict[str, Any]:
    return dict(json.loads((DASHBOARDS_DIR / name).read_text()))


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


@pytest.mark.unit
def test_checked_in_json_is_what_the_generator_writes(tmp_path: Path) -> None:
    """`make dashboards` was run after the last change to the generator (and nobody edited the JSON by hand)."""
    written = _generator().write(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in DASHBOARDS_DIR.glob("*.json"))
    for path in written:
        checked_in = (DASHBOARDS_DIR / path.name).read_text()
        assert path.read_text() == checked_in, f"{path.name} drifted from the generator: run `make dashboards`"


@pytest.mark.unit
def test_generation_is_deterministic(tmp_path: Path) -> None:
    gen = _generator()
    first, second = gen.write(tmp_path / "a"), gen.write(tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@pytest.mark.unit
def test_json_round_trips_through_the_sdk_schema() -> None:
    """Decoding into the SDK's typed models and encoding back loses nothing: no key outside the schema."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    for path in DASHBOARDS_DIR.glob("*.json"):
        raw = json.loads(path.read_text())
        assert json.loads(json.dumps(Dashboard.from_json(raw), cls=JSONEncoder)) == raw, path.name


@pytest.mark.unit
def test_panels_are_complete_and_unique() -> None:
    board = _board()
    ids = [p["id"] for p in board["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    assert board["uid"] == "flywheel"
    for p in _panels(board):
        assert p["title"] and p.get("description"), p
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert t["expr"].strip(), p["title"]
    cells: dict[tuple[int, int], str] = {}
    for p in board["panels"]:  # on the 24-column grid, no two panels overlap
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{p['title']} overlaps {cells[cell]}"
            cells[cell] = p["title"]
    titles = " | ".join(p["title"] for p in board["panels"]).lower()
    for wanted in ("seed's picture", "recall", "latency", "verdicts", "feedback", "reporters", "gate",
                   "evaluation set", "live fpr", "lag", "training"):
        assert wanted in titles, wanted


@pytest.mark.unit
def test_the_seeds_picture_draws_both_curves_from_its_own_queries() -> None:
    """The XY chart's series name fields by the queries' legends (after the join on time): a typo there would
    leave the headline chart blank in Grafana."""
    board = _board()
    xy = [p for p in _panels(board) if p["type"] == "xychart"]
    assert len(xy) == 1 and xy[0]["gridPos"]["y"] == 1  # the headline, at the top
    panel = xy[0]
    legends = {t["legendFormat"]: t["expr"] for t in panel["targets"]}
    assert panel["options"]["seriesMapping"] == "manual"
    assert [t["id"] for t in panel["transformations"]] == ["joinByField"]
    pairs = [(s["x"], s["y"]) for s in panel["options"]["series"]]
    assert len(pairs) == 4
    for x, y in pairs:
        assert x in legends and y in legends, (x, y)
    xs = {legends[x] for x, _ in pairs}
    assert any("flywheel_rules_active" in e for e in xs) and any("flywheel_training_examples" in e for e in xs)
    ys = [legends[y] for _, y in pairs]
    assert sum('side="rules"' in e for e in ys) == 2 and sum('side="model"' in e for e in ys) == 2
    # beside it: both sides over time
    beside = [p for p in _panels(board) if p["gridPos"]["y"] == 1 and p["gridPos"]["x"] == 12]
    assert beside and "flywheel_quality_recall" in beside[0]["targets"][0]["expr"]


@pytest.mark.unit
def test_promotions_are_annotations() -> None:
    annotations = _board()["annotations"]["list"]
    promotions = [a for a in annotations if a["name"] == "Promotions"]
    assert promotions and "flywheel_champion_promoted_timestamp_seconds" in promotions[0]["expr"]


@pytest.mark.unit
def test_metric_names_exist_in_the_code_or_the_recording_rules() -> None:
    """Every series a panel reads is defined by the API, the worker, or a recording rule (or is Prometheus' own)."""
    root = MONITORING_DIR.parent
    defined = set(re.findall(r'"(flywheel_[a-z_]+)"', (root / "services/api/metrics.py").read_text()))
    defined |= set(re.findall(r'"(flywheel_[a-z_]+)"', (root / "services/worker/metrics.py").read_text()))
    recorded = {r["record"] for g in yaml.safe_load((MONITORING_DIR / "rules/recording.yml").read_text())["groups"]
                for r in g["rules"]}
    board = _board()
    exprs = [t["expr"] for p in _panels(board) for t in p["targets"]]
    exprs += [a["expr"] for a in board["annotations"]["list"] if a.get("expr")]
    for expr in exprs:
        for name in re.findall(r"\bflywheel[_:][a-z0-9_:]+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in recorded or base in defined, f"{name} (in {expr}) is produced by nothing"


@pytest.mark.unit
def test_provisioning_points_at_the_dashboards_and_the_local_prometheus() -> None:
    gen = _generator()
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/flywheel.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["uid"] == gen.DATASOURCE_UID
    assert ds["url"] == "http://127.0.0.1:9090"
    variable = _board()["templating"]["list"][0]
    assert variable["type"] == "datasource" and variable["current"]["value"] == ds["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/flywheel.yaml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
