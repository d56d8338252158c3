"""Flywheel's Grafana dashboard as code (grafana-foundation-sdk), and the generator of its checked-in JSON.

    python monitoring/grafana/flywheel_dashboard.py [OUT_DIR]     # `make dashboards`; OUT_DIR defaults to dashboards/

The JSON under ``dashboards/`` is what Grafana's file provider loads (``provisioning/dashboards/flywheel.yaml``)
and what ``services.bench.observability`` reads to run every panel's query against Prometheus; a test regenerates it
and compares, so the two never drift. The output is deterministic: panel ids, query refIds and grid positions are
assigned in order, keys are sorted.

Every panel reads a series a running stack produces: after ``flywheel replay --quick`` each query returns data
(``services.bench.observability.run_monitoring_queries`` checks it). The series are defined in
``services/api/metrics.py``, ``services/worker/metrics.py`` and ``monitoring/rules/recording.yml``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from grafana_foundation_sdk.builders import (
    bargauge,
    prometheus,
    stat,
    statetimeline,
    timeseries,
    xychart,
)
from grafana_foundation_sdk.builders.common import (
    ColorDimensionConfig,
    LineStyle,
    ReduceDataOptions,
    ScaleDistributionConfig,
    StackingConfig,
    VizLegendOptions,
    VizTooltipOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DatasourceVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.common import (
    AxisPlacement,
    BigValueColorMode,
    BigValueGraphMode,
    BigValueTextMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    ScaleDistribution,
    SortOrder,
    StackingMode,
    TimeZoneBrowser,
    TooltipDisplayMode,
    VisibilityMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.xychart import ScatterShow, SeriesMapping

__all__ = ["DASHBOARDS", "build_flywheel", "render", "write"]

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

# Panels query through a datasource variable, so the dashboard imports into any Grafana; its default is the
# provisioned datasource (provisioning/datasources/flywheel.yaml, uid flywheel-prometheus).
DATASOURCE_UID = "flywheel-prometheus"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

API = 'job="flywheel-api"'
WORKER = 'job="flywheel-worker"'

P = TypeVar("P", timeseries.Panel, stat.Panel, bargauge.Panel, statetimeline.Panel, xychart.Panel)


# ------------------------------------------------------------------------------------------------ helpers
def q(expr: str, legend: str = "__auto", *, instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus query of the panel's datasource (range, or instant for bar gauges of current values)."""
    b = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DS)
    return b.instant() if instant else b.range()


def _targets(panel: P, targets: Iterable[prometheus.Dataquery]) -> P:
    for i, t in enumerate(targets):
        panel = panel.with_target(t.ref_id(chr(ord("A") + i)))
    return panel


def _legend(*calcs: str) -> VizLegendOptions:
    table = len(calcs) > 1
    return (VizLegendOptions().show_legend(True).placement(LegendPlacement.BOTTOM)
            .display_mode(LegendDisplayMode.TABLE if table else LegendDisplayMode.LIST).calcs(list(calcs)))


def _tooltip() -> VizTooltipOptions:
    return VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)


def series(title: str, description: str, *targets: prometheus.Dataquery, unit: str = "short", w: int = 12,
           h: int = 8, stack: bool = False, bars: bool = False, log: bool = False, lo: float | None = None,
           hi: float | None = None, calcs: tuple[str, ...] = ("lastNotNull",),
           right: tuple[str, str] | None = None) -> timeseries.Panel:
    """A time series; ``bars`` for counts per interval, ``log`` for error rates that span decades, ``right``:
    (refId, unit) of a query drawn on a right-hand axis of its own."""
    p = (timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
         .legend(_legend(*calcs)).tooltip(_tooltip()).line_width(1 if bars else 2)
         .fill_opacity(80 if bars else 10).show_points(VisibilityMode.NEVER))
    if bars:
        p = p.draw_style(GraphDrawStyle.BARS)
    if stack:
        p = p.stacking(StackingConfig().mode(StackingMode.NORMAL))
    if log:
        p = p.scale_distribution(ScaleDistributionConfig().type(ScaleDistribution.LOG).log(10))
    if lo is not None:
        p = p.min(lo)
    if hi is not None:
        p = p.max(hi)
    if right is not None:
        ref, right_unit = right
        p = p.override_by_query(ref, [dm.DynamicConfigValue(id_val="unit", value=right_unit),
                                      dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right")])
    return _targets(p, targets)


def single(title: str, description: str, *targets: prometheus.Dataquery, unit: str = "short", w: int = 4,
           h: int = 4, name: bool = False) -> stat.Panel:
    """A stat; ``name``: show the series' name (a version, from the legend) instead of its value."""
    p = (stat.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
         .graph_mode(BigValueGraphMode.NONE).color_mode(BigValueColorMode.NONE)
         .text_mode(BigValueTextMode.NAME if name else BigValueTextMode.VALUE)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return _targets(p, targets)


def gauges(title: str, description: str, *targets: prometheus.Dataquery, unit: str = "short", w: int = 8,
           h: int = 8, hi: float | None = None) -> bargauge.Panel:
    """Horizontal bars of current values (one per series)."""
    p = (bargauge.Panel().title(title).description(description).datasource(DS).unit(unit).span(w).height(h)
         .orientation(VizOrientation.HORIZONTAL).min(0)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if hi is not None:
        p = p.max(hi)
    return _targets(p, targets)


def states(title: str, description: str, *targets: prometheus.Dataquery, w: int = 12,
           h: int = 6) -> statetimeline.Panel:
    """On/off over time (1 coloured, 0 blank)."""
    p = (statetimeline.Panel().title(title).description(description).datasource(DS).span(w).height(h)
         .show_value(VisibilityMode.NEVER).merge_values(True).fill_opacity(80)
         .thresholds(ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
             dm.Threshold(value=None, color="transparent"), dm.Threshold(value=0.5, color="orange")])))
    return _targets(p, targets)


def _numbered(board: Dashboard) -> dm.Dashboard:
    """Build, giving every panel (rows included) an id in layout order: Grafana would invent them on load."""
    built = board.build()
    for i, panel in enumerate(built.panels or [], start=1):
        panel.id_val = i
    return built


# ------------------------------------------------------------------------------------------------ the curves
RULES_COLOR, MODEL_COLOR = "blue", "orange"


def seeds_picture() -> xychart.Panel:
    """The headline: both improvement curves on one chart. Each side's recall at 1% FPR on the fixed quality set
    (solid) and at 0.1% (dashed) against its own effort: the rules' against the number of active rules (human
    effort: expected linear), the model's against the labelled flags behind the champion (data: expected
    logarithmic). The four series of a side are scraped from the worker together, so joining them on time pairs
    each recall with the effort of the same moment."""
    names = {
        "rules_r1": "rules: recall at 1% FPR", "rules_r01": "rules: recall at 0.1% FPR", "rules_x": "active rules",
        "model_r1": "model: recall at 1% FPR", "model_r01": "model: recall at 0.1% FPR",
        "model_x": "labelled flags behind the champion",
    }
    targets = [
        q(f'max(flywheel_quality_recall{{{WORKER}, side="rules", fpr="0.01"}})', names["rules_r1"]),
        q(f'max(flywheel_quality_recall{{{WORKER}, side="rules", fpr="0.001"}})', names["rules_r01"]),
        q(f"max(flywheel_rules_active{{{WORKER}}})", names["rules_x"]),
        q(f'max(flywheel_quality_recall{{{WORKER}, side="model", fpr="0.01"}})', names["model_r1"]),
        q(f'max(flywheel_quality_recall{{{WORKER}, side="model", fpr="0.001"}})', names["model_r01"]),
        q(f'max(flywheel_training_examples{{{WORKER}, source="flags"}})', names["model_x"]),
    ]

    def line(x: str, y: str, color: str, dashed: bool) -> xychart.ScatterSeriesConfig:
        s = (xychart.ScatterSeriesConfig().x(names[x]).y(names[y]).name(names[y]).show(ScatterShow.POINTS_AND_LINES)
             .line_color(_fixed(color)).point_color(_fixed(color)).line_width(1 if dashed else 2))
        if dashed:
            s = s.line_style(LineStyle().fill("dash").dash([10, 10]))
        return s

    p = (xychart.Panel().title("The seed's picture: recall against effort, rules (per rule) and model (per flag)")
         .description(" ".join((seeds_picture.__doc__ or "").split())).datasource(DS).span(12).height(12).unit("percentunit")
         .min(0).max(1).axis_label("spam recall on the quality set").axis_placement(AxisPlacement.LEFT)
         .series_mapping(SeriesMapping.MANUAL)
         .series([line("rules_x", "rules_r1", RULES_COLOR, False), line("rules_x", "rules_r01", RULES_COLOR, True),
                  line("model_x", "model_r1", MODEL_COLOR, False), line("model_x", "model_r01", MODEL_COLOR, True)])
         .legend(_legend()).tooltip(_tooltip())
         .with_transformation(dm.DataTransformerConfig(id_val="joinByField",
                                                       options={"byField": "Time", "mode": "outer"})))
    return _targets(p, targets)


def _fixed(color: str) -> ColorDimensionConfig:
    return ColorDimensionConfig().fixed(color)


# ------------------------------------------------------------------------------------------------ the dashboard
def build_flywheel() -> dm.Dashboard:
    rate = "$__rate_interval"
    board = (
        Dashboard("Flywheel").uid("flywheel").description(
            "A spam filter that improves from its users' flags: the two improvement curves, the champion and its "
            "gate, live quality, traffic, feedback and the worker.")
        .tags(["flywheel", "generated"]).editable().timezone(TimeZoneBrowser).time("now-1h", "now")
        .refresh("10s").tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus")
                       .current(dm.VariableOption(selected=True, text="Prometheus", value=DATASOURCE_UID)))
        # A promotion marks the chart from the first evaluation after it for 60 s: Grafana evaluates Prometheus
        # annotations every 60 s (their default step), so each promotion shows once, labelled with its version.
        .annotation(AnnotationQuery().name("Promotions").datasource(DS).enable(True).icon_color("green")
                    .expr(f"(time() - flywheel_champion_promoted_timestamp_seconds{{{WORKER}}} < 60)"
                          f" * on (instance, job) group_left (version, kind) flywheel_champion_info{{{WORKER}}}"))
    )

    # -- the two curves --------------------------------------------------------------------------------------
    board = board.with_row(Row("The two improvement curves (fixed quality set: the corpus's held-out part)"))
    board = board.with_panel(seeds_picture())
    board = board.with_panel(series(
        "Recall on the quality set over time, by side and FPR",
        "Spam recall at 0.1% and 1% false-positive rate on the fixed quality set, re-scored when the champion or "
        "the rules change: rules alone, the champion model alone, and the served blend.",
        q(f"flywheel_quality_recall{{{WORKER}}}", "{{side}} at {{fpr}} FPR"), unit="percentunit", h=12, lo=0, hi=1))
    board = board.with_panel(series(
        "Effort behind each side: active rules, labelled examples behind the champion",
        "x of the curves: the rules' effort (rules the operator enabled) and the model's (labelled examples of the "
        "current champion, by source).",
        q(f"flywheel_rules_active{{{WORKER}}}", "active rules"),
        q(f"flywheel_training_examples{{{WORKER}}}", "examples: {{source}}"), h=7, right=("B", "short")))
    board = board.with_panel(series(
        "1 - AUC on the quality set, by side",
        "Ranking error of each side on the fixed quality set (log scale: lower is better).",
        q(f"flywheel_quality_one_minus_auc{{{WORKER}}}", "{{side}}"), unit="percentunit", log=True, w=8, h=7))
    board = board.with_panel(gauges(
        "Quality set composition",
        "Messages in the fixed quality set (never trained on, the hard ham included).",
        q(f"flywheel_quality_messages{{{WORKER}}}", "{{label}}", instant=True), w=4, h=7))

    # -- champion and gate -----------------------------------------------------------------------------------
    board = board.with_row(Row("Champion and promotion gate"))
    board = board.with_panel(single(
        "Champion (worker)", "The registry's champion as the worker sees it.",
        q(f"max by (version, kind) (flywheel_champion_info{{{WORKER}}})", "{{version}} ({{kind}})"), name=True, w=8))
    board = board.with_panel(single(
        "Served by the API", "The version each API process serves, its kind and ONNX provider.",
        q(f"max by (version, kind, provider) (flywheel_model_info{{{API}}})", "{{version}} ({{kind}}, {{provider}})"),
        name=True, w=8))
    board = board.with_panel(single(
        "Champion age", "Time since the current champion was promoted.",
        q(f"time() - max(flywheel_champion_promoted_timestamp_seconds{{{WORKER}}})", "age"), unit="s"))
    board = board.with_panel(single(
        "Promotions", "Champions promoted by the gate since the worker started, all kinds.",
        q(f"sum(flywheel_promotions_total{{{WORKER}}})", "promotions"), w=4))
    board = board.with_panel(series(
        "Gate decisions by kind (promoted / rejected)",
        "Decisions of the promotion gate per interval; promotions are also the green annotations on every chart.",
        q(f"sum by (decision, kind) (increase(flywheel_gate_decisions_total{{{WORKER}}}[{rate}]))",
          "{{decision}} {{kind}}"), bars=True, stack=True, w=8, calcs=("sum",)))
    board = board.with_panel(series(
        "Gate decisions in the last hour",
        "Recording rule flywheel:gate_decisions:increase1h: how often the gate promotes and rejects, per kind.",
        q("flywheel:gate_decisions:increase1h", "{{decision}} {{kind}}"), w=8))
    board = board.with_panel(series(
        "1 - AUC on the gate's evaluation set: champion vs challenger",
        "The gate's last comparison (the set changes with each decision; the quality set above does not).",
        q(f"flywheel_model_one_minus_auc{{{WORKER}}}", "{{role}} {{kind}}"), unit="percentunit", log=True, w=8))
    board = board.with_panel(gauges(
        "Gate evaluation set composition",
        "Messages of the gate's last evaluation set by source (flags, corpus) and label.",
        q(f"sum by (source, label) (flywheel_gate_eval_messages{{{WORKER}}})", "{{source}} {{label}}", instant=True),
        w=8, h=7))
    board = board.with_panel(series(
        "API model reloads by outcome (15 min)",
        "Reloads of the champion by the API: ok, or rejected by the artifact's self-check (the replica keeps "
        "serving the previous one).",
        q("flywheel:model_reloads:increase15m", "{{outcome}}"),
        q("flywheel:model_reloads_rejected:increase15m", "rejected"), w=8, h=7))
    board = board.with_panel(series(
        "Active rules served and rule changes",
        "Rules the API serves, and rule changes made through the API per interval.",
        q(f"max(flywheel_rules_active{{{API}}})", "active rules (API)"),
        q(f"sum by (action) (increase(flywheel_rule_changes_total{{{API}}}[{rate}]))", "changes: {{action}}"),
        w=8, h=7))

    # -- live quality ----------------------------------------------------------------------------------------
    board = board.with_row(Row("Live quality (prequential: users' later flags judge the verdict that was served)"))
    board = board.with_panel(series(
        "Live FPR and FNR per served version (since the worker started)",
        "Every flag on a message the API classified judges the verdict served then, by the version that served "
        "it: FPR = fp / (fp + tn), ham called spam; FNR = fn / (fn + tp), spam let through.",
        q("flywheel:live_fpr:ratio", "FPR {{version}}"), q("flywheel:live_fnr:ratio", "FNR {{version}}"),
        unit="percentunit", lo=0, w=12, h=8))
    board = board.with_panel(series(
        "Live FPR and FNR over the last hour (the rollback alert's window)",
        "The same over one hour (recording rules flywheel:live_fpr:ratio1h, flywheel:live_fnr:ratio1h); the "
        "alert FlywheelChampionLiveFalsePositives fires above 2% with at least 50 ham judgements.",
        q("flywheel:live_fpr:ratio1h", "FPR {{version}}"), q("flywheel:live_fnr:ratio1h", "FNR {{version}}"),
        unit="percentunit", lo=0, w=12, h=8))
    board = board.with_panel(series(
        "Judged verdicts per interval by outcome",
        "tp: spam caught, tn: ham delivered, fp: ham called spam, fn: spam let through (all served versions).",
        q(f"sum by (outcome) (increase(flywheel_live_verdicts_total{{{WORKER}}}[{rate}]))", "{{outcome}}"),
        bars=True, stack=True, w=24, h=6, calcs=("sum",)))

    # -- traffic ---------------------------------------------------------------------------------------------
    board = board.with_row(Row("Traffic and latency"))
    board = board.with_panel(series(
        "Requests per second by endpoint", "HTTP requests of the API, all statuses.",
        q(f"sum by (endpoint) (rate(flywheel_http_requests_total{{{API}}}[{rate}]))", "{{endpoint}}"),
        unit="reqps", w=8))
    board = board.with_panel(series(
        "Latency p50 / p99 by endpoint", "From the request-duration histogram.",
        q(f"histogram_quantile(0.50, sum by (endpoint, le) "
          f"(rate(flywheel_http_request_duration_seconds_bucket{{{API}}}[{rate}])))", "p50 {{endpoint}}"),
        q(f"histogram_quantile(0.99, sum by (endpoint, le) "
          f"(rate(flywheel_http_request_duration_seconds_bucket{{{API}}}[{rate}])))", "p99 {{endpoint}}"),
        unit="s", log=True, w=8))
    board = board.with_panel(series(
        "Responses by status, and the 5xx share",
        "Responses per second by status code; the share of 5xx per endpoint (flywheel:http_errors:ratio_rate1m).",
        q(f"sum by (status) (rate(flywheel_http_requests_total{{{API}}}[{rate}]))", "{{status}}"),
        q("flywheel:http_errors:ratio_rate1m", "5xx share {{endpoint}}"), unit="reqps", w=8,
        right=("B", "percentunit")))

    # -- verdicts --------------------------------------------------------------------------------------------
    board = board.with_row(Row("Verdicts"))
    board = board.with_panel(series(
        "Verdicts per second by side",
        "Every answer shows both deciders: the rules, the model, and the served (combined) verdict.",
        q(f"sum by (side, verdict) (rate(flywheel_verdicts_total{{{API}}}[{rate}]))", "{{side}} {{verdict}}"),
        unit="reqps", w=6))
    board = board.with_panel(series(
        "Spam ratio per side (share of messages called spam)",
        "What each side calls spam on live traffic, over 5 minutes (recording rule flywheel:spam_ratio:rate5m).",
        q("flywheel:spam_ratio:rate5m", "{{side}}"), unit="percentunit", w=6, h=8, lo=0, hi=1))
    board = board.with_panel(series(
        "Spam probability p50 / p90 by side", "From the spam-probability histogram of each side.",
        q(f"histogram_quantile(0.5, sum by (side, le) (rate(flywheel_spam_probability_bucket{{{API}}}[{rate}])))",
          "p50 {{side}}"),
        q(f"histogram_quantile(0.9, sum by (side, le) (rate(flywheel_spam_probability_bucket{{{API}}}[{rate}])))",
          "p90 {{side}}"), unit="percentunit", lo=0, hi=1, w=6))
    board = board.with_panel(gauges(
        "Top rule hits (last hour)", "The ten rules that fired most on classified mail in the last hour.",
        q(f"topk(10, sum by (rule) (increase(flywheel_rule_hits_total{{{API}}}[1h])))", "{{rule}}", instant=True),
        w=6))

    # -- feedback and reporters ------------------------------------------------------------------------------
    board = board.with_row(Row("Feedback and reporters"))
    board = board.with_panel(series(
        "Feedback per second by outcome and reason",
        "Flags accepted, retracted, and refused with their reason (rate_limited, new_reporter_limit, "
        "limiter_unavailable, kafka_unavailable, invalid, unknown_message, idempotency_conflict).",
        q(f"sum by (outcome, reason) (rate(flywheel_feedback_total{{{API}}}[{rate}]))", "{{outcome}} {{reason}}"),
        unit="reqps", w=8))
    board = board.with_panel(series(
        "Refused share of flags by cause",
        "rate_limit: the limits at work (a flood, or limits too tight); unavailable: flags lost to a 503 (Kafka or "
        "the limiter unreachable); client: invalid or unknown messages (flywheel:feedback_refused:ratio_rate5m).",
        q("flywheel:feedback_refused:ratio_rate5m", "{{cause}}"), unit="percentunit", lo=0, w=8))
    board = board.with_panel(series(
        "Labels accepted by consensus",
        "Labels the worker derives from reputation-weighted flags, per second by label.",
        q(f"sum by (label) (rate(flywheel_labels_total{{{WORKER}}}[{rate}]))", "{{label}}"), unit="short", w=8))
    board = board.with_panel(series(
        "Reporters by reputation band", "How many reporters are distrusted, newcomers, or trusted.",
        q(f"sum by (band) (flywheel_reporters{{{WORKER}}})", "{{band}}"), stack=True, w=12))
    board = board.with_panel(gauges(
        "Reporter weight: most and least trusted",
        "Reputation of the reporters at both ends (the worker shows a bounded number of them).",
        q(f"flywheel_reporter_weight{{{WORKER}}}", "{{reporter}}", instant=True), w=12))

    # -- worker ----------------------------------------------------------------------------------------------
    board = board.with_row(Row("Retraining worker"))
    board = board.with_panel(series(
        "Worker lag (feedback records not yet processed)", "Alert FlywheelWorkerLag above 1000 for 10 minutes.",
        q(f"max(flywheel_worker_lag_records{{{WORKER}}})", "lag"), w=8))
    board = board.with_panel(series(
        "Worker events by type and outcome", "Feedback-topic records the worker handled, per second.",
        q(f"sum by (type, outcome) (rate(flywheel_worker_events_total{{{WORKER}}}[{rate}]))", "{{type}} {{outcome}}"),
        w=8))
    board = board.with_panel(series(
        "Data version vs the last judged refit",
        "The worker's data version (changes to what a model would learn) and the data version of the last linear "
        "refit the gate judged: caught up when equal.",
        q(f"max(flywheel_worker_data_version{{{WORKER}}})", "data version"),
        q(f"max(flywheel_worker_judged_data_version{{{WORKER}}})", "judged"), w=8))
    board = board.with_panel(states(
        "Training in progress by kind", "When a model of each kind trains (alert FlywheelTrainingStuck after 30 min).",
        q(f"max by (kind) (flywheel_training_in_progress{{{WORKER}}})", "{{kind}}")))
    board = board.with_panel(series(
        "Duration of the last training by kind", "Seconds the last refit of each kind took.",
        q(f"max by (kind) (flywheel_refit_seconds{{{WORKER}}})", "{{kind}}"), unit="s", w=12, h=6))
    board = board.with_panel(states(
        "Scrape targets up", "1 while Prometheus reaches the target (alerts FlywheelApiDown, FlywheelWorkerDown).",
        q('up{job=~"flywheel-.*"}', "{{job}}"), w=24, h=4))
    return _numbered(board)


DASHBOARDS: dict[str, Callable[[], dm.Dashboard]] = {"flywheel.json": build_flywheel}


def render(board: dm.Dashboard) -> str:
    """Deterministic JSON: sorted keys, two-space indent, a final newline."""
    return json.dumps(board, cls=JSONEncoder, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    """Write every dashboard into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in DASHBOARDS.items():
        path = out_dir / name
        path.write_text(render(build()))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(written)
