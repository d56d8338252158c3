"""The `flywheel` command: every command and subcommand has help, refuses bad usage with 2, and runs for real here
or in the test named for it; errors are one line with exit 1; progress is live on a terminal and plain in logs;
`flywheel status` says what answers and what is missing."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from services.cli import friendly_errors, main
from services.cli.progress import EvalSink, Progress, on_terminal
from services.settings import REPO_ROOT, Settings, get_settings

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --------------------------------------------------------------------------------------------- helpers
def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path, groups included (the root is ``()``)."""
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += all_commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


def leaf_commands() -> list[tuple[str, ...]]:
    """The commands that do something (not groups)."""
    return [p for p in all_commands(main) if not isinstance(command_at(p), click.Group)]


def cli_env(s: Settings) -> dict[str, str | None]:
    """The environment that makes ``get_settings()`` inside the CLI equal ``s`` (other FLYWHEEL_* unset)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FLYWHEEL_")}
    for name in ("state_dir", "downloads_dir", "kafka_port", "kafka_controller_port", "prometheus_port", "api_port",
                 "spamd_port", "worker_port", "topic_prefix", "api_host"):
        env[f"FLYWHEEL_{name.upper()}"] = str(getattr(s, name))
    return env


def invoke(s: Settings, *args: str) -> Result:
    """Run ``flywheel ARGS`` in-process against the settings ``s``; the root logger is restored afterwards (the
    commands point it at the runner's stderr, which is gone once the runner returns)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(main, list(args), env=cli_env(s))
    finally:
        get_settings.cache_clear()
        root.handlers[:] = handlers
        root.setLevel(level)


def expect(result: Result, code: int) -> Result:
    """``result`` exited with ``code`` (and not with a traceback); the output is shown when it did not."""
    shown = f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(shown) from result.exception
    assert result.exit_code == code, shown
    assert "Traceback" not in result.output, shown
    return result


@dataclass
class Flywheel:
    """A state dir with a registry of three versions (v1 then v2 promoted, v3 a rejected challenger), on ports
    where nothing listens."""

    settings: Settings
    v1: str
    v2: str
    v3: str

    def __call__(self, *args: str) -> Result:
        return invoke(self.settings, *args)

    def registry(self) -> Any:
        from models.registry import Registry

        return Registry(self.settings.registry)


@pytest.fixture(scope="module")
def flywheel(tmp_path_factory: pytest.TempPathFactory, corpus: list) -> Flywheel:
    from conftest import make_settings

    from models.rules import Rule, RuleEngine
    from services.bench.api import train_quick_version

    s = make_settings(tmp_path_factory.mktemp("cli"))
    rng = random.Random(7)
    spam = rng.sample([m for m in corpus if m.is_spam], 20)
    ham = rng.sample([m for m in corpus if not m.is_spam], 20)
    raws, labels = [m.raw for m in spam + ham], [True] * 20 + [False] * 20
    engine = RuleEngine([Rule(name="MAKE_MONEY", kind="body", pattern="/make money/i", weight=2.0)])
    v1 = train_quick_version(s.registry, raws, labels, seed=1, promote=True, engine=engine, reason="first")
    v2 = train_quick_version(s.registry, raws, labels, seed=2, promote=True, engine=engine, reason="second")
    v3 = train_quick_version(s.registry, raws, labels, seed=3, promote=False, engine=engine)
    fw = Flywheel(s, v1, v2, v3)
    fw.registry().record_decision(
        challenger=v3, decision="rejected", reason="not better: AUC 0.95 -> 0.94",
        challenger_metrics={"one_minus_auc": 0.06}, champion=v2, champion_metrics={"one_minus_auc": 0.05},
        extra={"kind": "linear", "test": "better"})
    return fw


# --------------------------------------------------------------------------------------------- every command
def command_at(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.unit
def test_every_command_has_help() -> None:
    runner = CliRunner()
    commands = all_commands(main)
    assert len(commands) > 25
    for path in commands:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert result.output.startswith(f"Usage: {' '.join(('main', *path))}"), (path, result.output)
        words = (command_at(path).help or "").split()
        assert len(words) >= 3, f"{path} has no description"
        assert " ".join(words[:4]) in " ".join(result.output.split()), path


@pytest.mark.unit
def test_every_command_refuses_bad_usage_with_2() -> None:
    runner = CliRunner()
    for path in all_commands(main):
        result = runner.invoke(main, [*path, "--no-such-option"])
        assert result.exit_code == 2, (path, result.output)
        assert "No such option: --no-such-option" in result.output, path
    for group in [p for p in all_commands(main) if p not in leaf_commands()]:  # a group alone is usage too
        assert runner.invoke(main, list(group)).exit_code == 2, group
    result = runner.invoke(main, ["eval", "--protocol", "P9"])
    assert result.exit_code == 2 and "P9" in result.output


# Every command that does something is either run for real by ``test_command_runs_for_real`` below (RUN_HERE) or
# is too long for this file and is run by the test named here (a path and test function, or None while no test
# runs it). A new command that is in neither fails ``test_every_command_is_run_by_a_test``.
RUN_ELSEWHERE: dict[tuple[str, ...], tuple[str, ...] | None] = {
    ("eval",): ("tests/models/test_evaluate.py::test_eval_p1_on_a_real_subsample",
                "tests/services/cli/test_cli.py::test_eval_reports_its_steps_to_the_bar"),
    ("kafka", "start"): ("tests/services/local/test_broker.py::test_restart_keeps_data_and_committed_offsets",
                         "tests/services/cli/test_cli.py::test_status_is_0_when_every_part_answers"),
    ("serve",): ("tests/services/test_api_hostile.py::test_serve_refuses_the_development_keys_on_0_0_0_0",
                 "tests/services/test_api.py::test_health_ready_and_multiprocess_metrics"),
    ("worker",): ("tests/test_e2e_loop.py::test_flags_on_new_mail_improve_the_mail_nobody_flagged",),
    ("bench", "hostile"): ("tests/services/bench/test_hostilebench.py::test_bench_hostile_reports_every_figure",),
    ("bench", "models"): ("tests/services/bench/test_benches.py::test_models_bench_on_a_sample",),
    ("bench", "api"): ("tests/services/bench/test_benches.py::test_api_bench_briefly",),
    ("bench", "loop"): ("tests/services/bench/test_benches.py::test_loop_bench_briefly",),
    ("bench", "flywheel"): ("tests/services/bench/test_benches.py::test_flywheel_bench_on_a_quarter_of_the_later_mail",),
    ("bench", "campaign"): ("tests/services/bench/test_campaignbench.py::test_bench_campaign_runs_on_a_sample",),
    ("bench", "abuse"): ("tests/services/bench/test_benches.py::test_abuse_bench_briefly",),
    ("bench", "scale"): ("tests/services/bench/test_scalebench.py::test_replicas_sharing_only_kafka_follow_a_promotion",),
    ("bench", "gpu"): ("tests/services/bench/test_gpubench.py::test_both_families_are_checked_on_every_provider_offered",),
    ("bench", "speed"): ("tests/services/bench/test_speedbench.py::"
                         "test_flywheel_and_rspamd_classify_the_same_messages_side_by_side",),
    # `run` is the replay below that then keeps serving, on the stack run_stack keeps until Ctrl-C
    ("run",): ("tests/test_e2e_replay.py::test_both_curves_are_drawn_by_the_running_system",
               "tests/services/local/test_stack.py::test_run_stack_starts_everything_and_ctrl_c_stops_it_in_reverse_order"),
    ("replay",): ("tests/test_e2e_replay.py::test_both_curves_are_drawn_by_the_running_system",),
}


def _run_status_with_nothing_up(fw: Flywheel) -> None:
    result = expect(fw("status"), 1)
    missing = [ln for ln in result.stderr.splitlines() if ln.startswith("missing: ")]
    names = ("kafka", "prometheus", "api", "api ready", "spamd", "worker")
    assert {ln.split(": ")[1] for ln in missing} == set(names), result.stderr
    assert all("refused" in ln or "no broker" in ln for ln in missing), missing
    for name in names:
        assert re.search(rf"DOWN\s+{name}\s", result.stdout), (name, result.stdout)
    champion = fw.registry().champion()
    assert f"champion  {champion}" in result.stdout and "train_quick_version" in result.stdout
    assert "lag ? records" in result.stdout
    assert re.search(r"rejected\s+linear\s+better\s+not better: AUC 0.95 -> 0.94", result.stdout), result.stdout

    data = json.loads(expect(fw("status", "--json", "--decisions", "1"), 1).stdout)
    assert data["ok"] is False and len(data["missing"]) == len(names)
    assert data["champion"]["version"] == champion and data["worker"]["lag_records"] is None
    assert [d["challenger"] for d in data["decisions"]] == [fw.v3]
    expect(fw("status", "--decisions", "-1"), 2)


def _run_kafka_status(fw: Flywheel) -> None:
    data = json.loads(expect(fw("kafka", "status"), 1).stdout)
    assert data["reachable"] is False and data["running"] is False and data["managed"] is True
    assert data["bootstrap"] == f"127.0.0.1:{fw.settings.kafka_port}"


def _run_kafka_stop(fw: Flywheel) -> None:
    expect(fw("kafka", "stop"), 0)  # nothing running: a no-op, not an error
    expect(fw("kafka", "status"), 1)


def _run_prometheus_cycle(fw: Flywheel) -> None:
    """start -> status 0 (ready) -> stop -> status 1; the real Prometheus on the fixture's port."""
    from services.local.stack import prometheus_stop

    try:
        started = expect(fw("prometheus", "start"), 0)
        assert f"prometheus ready at http://127.0.0.1:{fw.settings.prometheus_port}" in started.stdout
        assert "==> Prometheus on port" in started.stderr  # the plain progress line (stderr is no terminal)
        status = json.loads(expect(fw("prometheus", "status"), 0).stdout)
        assert status["ready"] is True and status["running"] is True and status["pid"]
        expect(fw("prometheus", "stop"), 0)
        status = json.loads(expect(fw("prometheus", "status"), 1).stdout)
        assert status["ready"] is False and status["running"] is False
    finally:
        prometheus_stop(fw.settings)


def _run_corpus_fetch(fw: Flywheel) -> None:
    from models.corpus import GROUPS

    root = Path(expect(fw("corpus", "fetch"), 0).stdout.strip())
    assert all((root / g).is_dir() for g in GROUPS), root


def _run_corpus_info(fw: Flywheel) -> None:
    from models.corpus import GROUPS

    data = json.loads(expect(fw("corpus", "info"), 0).stdout)
    assert set(data["groups"]) == set(GROUPS) and sum(data["groups"].values()) == data["messages"]
    assert 0 < data["spam"] < data["messages"] and data["messages"] > 5000


def _run_models_list(fw: Flywheel) -> None:
    reg = fw.registry()
    champion = reg.champion()
    out = expect(fw("models", "list"), 0).stdout.splitlines()
    rows = {m[1]: ln for ln in out if (m := re.match(r"[* ] (\d{8}T\S+)", ln))}
    assert set(rows) >= {fw.v1, fw.v2, fw.v3}, out
    assert rows[champion].startswith("* ") and all(not r.startswith("*") for v, r in rows.items() if v != champion)
    assert re.search(r"0\.94000\s+rejected\s+better", rows[fw.v3]), rows[fw.v3]  # AUC from the gate's decision
    assert out[-1] == f"{len(reg.list())} versions; champion {champion}"
    newest = expect(fw("models", "list", "--limit", "1"), 0).stdout.splitlines()
    assert sum(1 for ln in newest if ln[2:3].isdigit()) == 1
    expect(fw("models", "list", "--limit", "-1"), 2)


def _run_models_show(fw: Flywheel) -> None:
    champion = fw.registry().champion()
    shown = json.loads(expect(fw("models", "show"), 0).stdout)
    assert shown["version"] == champion and shown["champion"] is True and shown["lineage"]["source"]
    assert shown["metrics"]["train_rows"] == 40
    other = next(v for v in (fw.v1, fw.v2, fw.v3) if v != champion)
    assert json.loads(expect(fw("models", "show", other), 0).stdout)["champion"] is False
    judged = json.loads(expect(fw("models", "show", fw.v3), 0).stdout)
    assert judged["gate_decision"]["decision"] == "rejected" and judged["gate_decision"]["champion"] == fw.v2
    assert shown["gate_decision"] is None or shown["version"] == fw.v3  # no decision recorded for the others
    unknown = expect(fw("models", "show", "20990101T000000000000Z-linear-000000"), 1)
    assert unknown.stderr.startswith("error: unknown version") and len(unknown.stderr.splitlines()) == 1


def _run_models_promote(fw: Flywheel) -> None:
    import shutil

    from models.registry import new_version_id

    reg = fw.registry()
    result = expect(fw("models", "promote", fw.v3, "--reason", "operator's choice"), 0)
    assert result.stdout.strip() == f"champion is now {fw.v3}" and reg.champion() == fw.v3
    assert reg.history()[-1]["reason"] == "operator's choice"
    broken = new_version_id("linear")  # a copy of v1 whose graph was altered on disk
    shutil.copytree(reg.versions_dir / fw.v1, reg.versions_dir / broken)
    model = reg.versions_dir / broken / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 0xFF]))
    refused = expect(fw("models", "promote", broken), 1)
    assert refused.stderr.startswith(f"error: model {broken} rejected") and reg.champion() == fw.v3
    shutil.rmtree(reg.versions_dir / broken)


def _run_models_rollback(fw: Flywheel) -> None:
    reg = fw.registry()
    before = reg.champion()
    other = fw.v1 if before != fw.v1 else fw.v2
    reg.promote(other, "to roll back")
    result = expect(fw("models", "rollback", "--reason", "bad day"), 0)
    assert result.stdout.strip() == f"champion is now {before}" and reg.champion() == before
    assert reg.history()[-1]["action"] == "rollback" and reg.history()[-1]["reason"] == "bad day"
    fresh = fw.settings.model_copy(update={"state_dir": fw.settings.state_dir / "fresh"})
    nothing = expect(invoke(fresh, "models", "rollback"), 1)
    assert nothing.stderr == "error: no previous champion to roll back to\n"


def _run_models_seed(fw: Flywheel) -> None:
    champion = fw.registry().champion()
    result = expect(fw("models", "seed"), 0)  # a servable champion exists: checked, kept, nothing trained
    assert result.stdout.strip() == champion and "passes its self-check" in result.stderr
    assert fw.registry().champion() == champion and len(fw.registry().list()) == 3


def _run_rules_list(fw: Flywheel) -> None:
    out = expect(fw("rules", "list"), 0).stdout.splitlines()
    m = re.fullmatch(r"(\d+) active of (\d+); threshold ([\d.]+)", out[-1])
    assert m and 0 < int(m[1]) <= int(m[2]) == len(out) - 1, out[-1]
    assert sum(ln.startswith("+ ") for ln in out[:-1]) == int(m[1])


CF = """\
header   LOCAL_SUBJ_FREE   Subject =~ /\\bfree\\b/i
describe LOCAL_SUBJ_FREE   Subject says free
score    LOCAL_SUBJ_FREE   1.5
body     LOCAL_BODY_MONEY  /make money fast/i
score    LOCAL_BODY_MONEY  2.5
meta     LOCAL_BOTH        LOCAL_SUBJ_FREE && LOCAL_BODY_MONEY
header   LOCAL_EVAL        eval:check_for_something()
meta     LOCAL_NEEDS_EVAL  LOCAL_EVAL && LOCAL_BODY_MONEY
"""


def _run_rules_import_sa(fw: Flywheel) -> None:
    from models.rules import RuleEngine

    cf = fw.settings.state_dir / "local.cf"
    cf.write_text(CF)
    out = fw.settings.state_dir / "imported.yaml"
    result = expect(fw("rules", "import-sa", str(cf), "--out", str(out)), 0)
    assert result.stdout.splitlines()[0] == "imported 3 rules, skipped 2"
    assert "eval rule needs SpamAssassin plugin code" in result.stdout and "meta depends on skipped" in result.stdout
    engine = RuleEngine.load(out)
    assert [r.name for r in engine.rules] == ["LOCAL_SUBJ_FREE", "LOCAL_BODY_MONEY", "LOCAL_BOTH"]
    assert "==> importing 1 rule files" in result.stderr and "3 imported, 2 skipped" in result.stderr
    expect(fw("rules", "import-sa", str(fw.settings.state_dir / "missing.cf")), 2)


def _run_setup(fw: Flywheel) -> None:
    """Every part is in place (jars and corpus in the shared downloads, Prometheus installed, a champion): setup
    checks each and says so, quickly."""
    champion = fw.registry().champion()
    result = expect(fw("setup"), 0)
    assert result.stdout.strip() == f"setup complete; champion {champion}"
    for step in ("Kafka jars", "Prometheus", "corpus", f"seed model: checking champion {champion}"):
        assert f"==> {step}" in result.stderr, step
    assert result.stderr.count("    done in ") == 4 and "failed" not in result.stderr


RUN_HERE: dict[tuple[str, ...], Callable[[Flywheel], None]] = {
    ("status",): _run_status_with_nothing_up,
    ("kafka", "status"): _run_kafka_status,
    ("kafka", "stop"): _run_kafka_stop,
    ("prometheus", "start"): _run_prometheus_cycle,
    ("prometheus", "status"): _run_prometheus_cycle,
    ("prometheus", "stop"): _run_prometheus_cycle,
    ("corpus", "fetch"): _run_corpus_fetch,
    ("corpus", "info"): _run_corpus_info,
    ("models", "list"): _run_models_list,
    ("models", "show"): _run_models_show,
    ("models", "promote"): _run_models_promote,
    ("models", "rollback"): _run_models_rollback,
    ("models", "seed"): _run_models_seed,
    ("rules", "list"): _run_rules_list,
    ("rules", "import-sa"): _run_rules_import_sa,
    ("setup",): _run_setup,
}


STARTS_SERVERS = {_run_prometheus_cycle}


@pytest.mark.parametrize("scenario", [
    pytest.param(f, id=f.__name__.removeprefix("_run_"),
                 marks=pytest.mark.integration if f in STARTS_SERVERS else pytest.mark.unit)
    for f in sorted(set(RUN_HERE.values()), key=lambda f: f.__name__)])
def test_command_runs_for_real(scenario: Callable[[Flywheel], None], flywheel: Flywheel) -> None:
    scenario(flywheel)


@pytest.mark.unit
def test_every_command_is_run_by_a_test() -> None:
    leaves = set(leaf_commands())
    assert not set(RUN_HERE) & set(RUN_ELSEWHERE), "a command is listed twice"
    assert leaves == set(RUN_HERE) | set(RUN_ELSEWHERE), (
        f"commands with no test: {sorted(leaves - set(RUN_HERE) - set(RUN_ELSEWHERE))}; "
        f"listed but no such command: {sorted((set(RUN_HERE) | set(RUN_ELSEWHERE)) - leaves)}")


def _test_exists(node: str) -> bool:
    path, _, name = node.partition("::")
    file = REPO_ROOT / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


@pytest.mark.unit
def test_long_commands_are_run_by_their_own_tests() -> None:
    """The commands too long for this file name the tests that run them, and those tests exist."""
    gone = {" ".join(cmd): [n for n in nodes if not _test_exists(n)] for cmd, nodes in RUN_ELSEWHERE.items() if nodes}
    assert not any(gone.values()), f"named tests that do not exist: { {k: v for k, v in gone.items() if v} }"
    untested = sorted(" ".join(cmd) for cmd, nodes in RUN_ELSEWHERE.items() if not nodes)
    assert not untested, f"commands no test runs yet: {untested}"


# --------------------------------------------------------------------------------------------- status, all up
@pytest.mark.integration
def test_status_is_0_when_every_part_answers(kafka: Settings, prometheus: Settings, flywheel: Flywheel,
                                             tmp_path: Path) -> None:
    """The session's broker and Prometheus, a real API process on a registry with a champion, the worker's real
    metrics page: every server answers, and the lag and data version come from that page."""
    import shutil

    from conftest import free_ports
    from prometheus_client import start_http_server

    from services.bench.api_process import ApiProcess
    from services.worker.metrics import WorkerMetrics

    api_port, spamd_port, worker_port = free_ports(3)
    s = kafka.model_copy(update={"state_dir": tmp_path, "api_port": api_port, "spamd_port": spamd_port,
                                 "worker_port": worker_port})
    shutil.copytree(flywheel.settings.registry, s.registry)
    metrics = WorkerMetrics()
    metrics.lag.set(3)
    metrics.data_version.set(42)
    server, thread = start_http_server(worker_port, addr="127.0.0.1", registry=metrics.registry)
    try:
        with ApiProcess(s, tmp_path / "api.log").start():
            result = expect(invoke(s, "status"), 0)
            data = json.loads(expect(invoke(s, "status", "--json"), 0).stdout)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert "missing" not in result.stderr and "DOWN" not in result.stdout, result.output
    assert "lag 3 records, data version 42" in result.stdout
    assert all(r["ok"] for r in data["servers"].values()) and data["missing"] == []
    champion = flywheel.registry().champion()
    assert data["servers"]["api ready"]["model"] == champion == data["champion"]["version"]
    assert data["worker"] == {"lag_records": 3, "data_version": 42}


@pytest.mark.integration
def test_status_reads_lag_from_the_worker_page_and_names_what_is_down(flywheel: Flywheel) -> None:
    """Only the worker's page answers: its figures are shown, and exactly the other parts are missing."""
    from prometheus_client import start_http_server

    from services.worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.lag.set(1234)
    metrics.data_version.set(7)
    server, thread = start_http_server(flywheel.settings.worker_port, addr="127.0.0.1", registry=metrics.registry)
    try:
        result = expect(flywheel("status"), 1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert re.search(r"ok\s+worker\s", result.stdout) and "lag 1234 records, data version 7" in result.stdout
    missing = {ln.split(": ")[1] for ln in result.stderr.splitlines() if ln.startswith("missing: ")}
    assert missing == {"kafka", "prometheus", "api", "api ready", "spamd"}


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.unit
def test_user_facing_errors_are_one_line_exit_1() -> None:
    class SetupError(Exception):
        pass

    @click.command()
    @friendly_errors
    def broken() -> None:
        raise SetupError("java not found: install openjdk-17-jre-headless")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1
    assert result.stderr == "error: java not found: install openjdk-17-jre-headless\n"
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_unexpected_errors_are_not_swallowed() -> None:
    @click.command()
    @friendly_errors
    def broken() -> None:
        raise ZeroDivisionError("bug")

    result = CliRunner().invoke(broken, [])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)


@pytest.mark.unit
def test_console_script_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "services.cli", "--help"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0
    assert "self-improving spam filter" in out.stdout


# --------------------------------------------------------------------------------------------- progress
@pytest.mark.unit
def test_progress_without_a_terminal_is_a_few_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """What CI logs get: a line per step, a count at each tenth, the time it took; never a redraw."""
    assert on_terminal() is False  # pytest's stderr is no terminal: the same as CI's
    with Progress() as progress:
        assert progress.bars is None
        with progress.stage("reading", total=100, unit="files") as step:
            for _ in range(100):
                step.advance()
        with progress.stage("waiting") as step:
            step.status("halfway there")
            step.done("all good")
        with pytest.raises(RuntimeError), progress.stage("breaking"):
            raise RuntimeError("boom")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "==> reading"
    counts = [ln for ln in lines if re.fullmatch(r"    \d+/100 files", ln)]
    assert counts == [f"    {n}/100 files" for n in range(10, 101, 10)]
    assert "==> waiting" in lines and "    halfway there" in lines
    assert any(ln.startswith("    done in ") and ln.endswith(": all good") for ln in lines)
    assert lines[-2] == "==> breaking" and lines[-1].startswith("    failed after ")
    assert not any("\r" in ln or "\x1b" in ln for ln in lines)


@pytest.mark.unit
def test_progress_on_a_terminal_draws_bars_and_keeps_other_output_above_them() -> None:
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140, color_system=None)
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with Progress(live=None, console=console) as progress:
            assert progress.bars is not None  # a terminal console: live bars
            with progress.stage("reading", total=3, unit="files") as step:
                for _ in range(3):
                    step.advance()
            print("a library's own line", file=sys.stderr)
            logging.getLogger("flywheel.test").warning("a log record")
            with progress.stage("training") as step:
                step.done("champion v42")
            with pytest.raises(RuntimeError), progress.stage("breaking"):
                raise RuntimeError("boom")
        assert handler.stream is sys.stderr  # the log handler has its stream back
    finally:
        root.removeHandler(handler)
    text = ANSI.sub("", buf.getvalue())
    final = text.split("\r")[-1]
    assert "a library's own line" in text and "a log record" in text
    assert re.search(r"reading\s.*3/3 files", final) and re.search(r"training\s.*champion v42", final)
    assert re.search(r"breaking\s.*failed", final)


@pytest.mark.unit
def test_live_needs_a_terminal_console() -> None:
    """``on_terminal`` is what chooses: forced off here, the bars stay off whatever the command."""
    with Progress(live=False) as progress:
        assert progress.bars is None


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["P1", "P2"])
def test_eval_reports_its_steps_to_the_bar(protocol: str, corpus: list, tmp_path: Path) -> None:
    """``flywheel eval``'s bar: the evaluation plans its steps and finishes each, so the bar ends full and never
    runs past its total; its stage lines become the bar's status."""
    from models.evaluate import run_eval

    rng = random.Random(3)
    small = [m for g in sorted({m.group for m in corpus}) for m in rng.sample([x for x in corpus if x.group == g], 25)]
    seen: list[tuple[float, float | None]] = []
    statuses: list[str] = []

    with Progress(live=False) as progress:
        step = progress.stage(f"eval {protocol}", unit="steps")
        original = step.update

        def record(**kw: Any) -> None:
            original(**kw)
            if kw.get("status"):
                statuses.append(kw["status"])
            if "completed" in kw:
                seen.append((step.completed, step.total))

        step.update = record  # type: ignore[method-assign]
        run_eval(protocol, downloads_dir=tmp_path, corpus_dir=None, out_dir=tmp_path / "out",
                 json_path=tmp_path / "r.json", curves=False, seeds=1, corpus=small, ablation=False,
                 sa_rules_dir=None, neural_retrain_every=50, progress=EvalSink(step))
        step.done()
    assert seen and all(done <= (total or 0) for done, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # never goes back
    done, total = seen[-1]
    assert done == total and total >= (7 if protocol == "P1" else 4), seen
    assert any(f"{protocol}: parsing and rules" in st for st in statuses)
    assert any("JSON written" in st for st in statuses)


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Commands read ``get_settings()`` (cached); no test may leave another's settings behind."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --------------------------------------------------------------------------------------------- ports taken
@pytest.mark.integration
@pytest.mark.parametrize(("args", "taken", "says"), [
    (("serve", "--port", "{port}"), "api_port", "--port or FLYWHEEL_API_PORT"),
    (("serve",), "spamd_port", "--spamd-port or FLYWHEEL_SPAMD_PORT"),
    (("worker",), "worker_port", "FLYWHEEL_WORKER_PORT"),
    (("kafka", "start"), "kafka_port", "FLYWHEEL_KAFKA_PORT"),
    (("prometheus", "start"), "prometheus_port", "FLYWHEEL_PROMETHEUS_PORT"),
    (("run", "--serve-only"), "api_port", "FLYWHEEL_API_PORT"),
    (("run", "--quick"), "worker_port", "FLYWHEEL_WORKER_PORT"),
], ids=["serve", "serve-spamd", "worker", "kafka-start", "prometheus-start", "run-serve-only", "run"])
def test_a_server_command_on_a_taken_port_exits_1_at_once_with_one_line(
        tmp_path: Path, args: tuple[str, ...], taken: str, says: str) -> None:
    """Before anything starts (no broker, no Prometheus, no replay state wiped): one line naming the setting or
    option to change, exit 1, within 5 s."""
    import socket
    import time

    from conftest import make_settings

    s = make_settings(tmp_path / "state")
    port = int(getattr(s, taken))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}, **cli_env(s)}
    (s.state_dir / "replay").mkdir(parents=True)
    (s.state_dir / "replay" / "keep").write_text("the last replay's state")
    with socket.socket() as other:  # another program listening there
        other.bind(("127.0.0.1", port))
        other.listen()
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "services.cli", *(a.format(port=port) for a in args)],
                                cwd=tmp_path, env={k: v for k, v in env.items() if v is not None},
                                capture_output=True, text=True, timeout=60, check=False)
        elapsed = time.monotonic() - started
    shown = f"exit {result.returncode} after {elapsed:.1f}s\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1 and elapsed < 5.0, shown
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, shown
    assert result.stderr.startswith(f"error: port {port} is in use by another program") and says in result.stderr
    assert (s.state_dir / "replay" / "keep").is_file()  # nothing half-done
    assert not list(s.state_dir.rglob("*.pid")) and not list(s.state_dir.rglob("live-stack.json"))


@pytest.mark.integration
def test_serve_on_an_empty_registry_exits_1_naming_the_command_that_fills_it(tmp_path: Path) -> None:
    """Serving never trains a model (that is set-up's and the worker's work): an empty registry is one line and
    exit 1 before anything binds, not minutes of training inside the API."""
    from conftest import make_settings

    from models.registry import Registry

    s = make_settings(tmp_path / "state")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}, **cli_env(s)}
    result = subprocess.run([sys.executable, "-m", "services.cli", "serve"], cwd=tmp_path,
                            env={k: v for k, v in env.items() if v is not None},
                            capture_output=True, text=True, timeout=60, check=False)
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 1, shown
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no champion in the model registry {s.registry}: run `flywheel setup` (or "
                      "`flywheel models seed`) first, or point FLYWHEEL_REGISTRY_DIR at a registry that has one"], shown
    assert Registry(s.registry).champion() is None


@pytest.mark.unit
def test_the_readme_command_list_matches_help() -> None:
    """Every command and every option ``--help`` shows is in the README's command list (and no command there is
    unknown)."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## The `flywheel` command\n.*?```\n(.*?)```", text, re.S)
    assert block, "the README has no command list"
    lines = [ln.split("#")[0] for ln in block[1].splitlines() if ln.startswith("flywheel ")]
    for path in leaf_commands():
        cmd = command_at(path)
        mine = [ln for ln in lines if ln.split()[1] == path[0] and (len(path) == 1 or re.search(
            rf"(^|[\s|]){re.escape(path[1])}($|[\s|])", " ".join(ln.split()[2:])))]
        assert mine, f"`flywheel {' '.join(path)}` is not in the README's command list"
        for param in cmd.params:
            for opt in (o for o in param.opts if o.startswith("--") and o != "--help"):
                assert any(opt in ln for ln in mine), f"`flywheel {' '.join(path)} {opt}` is not in the README"
    known = {p[0] for p in leaf_commands()}
    assert {ln.split()[1] for ln in lines} <= known, lines
