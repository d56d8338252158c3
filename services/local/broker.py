"""The local Apache Kafka broker: jars from Maven Central, one KRaft node on loopback, the project's topics.

Why this shape: no Docker and no tarball mirror is needed. Maven resolves ``org.apache.kafka:kafka_2.13`` and
its runtime dependencies once into ``<downloads>/kafka-<version>/libs`` (about 45 MB); the broker is then a
plain ``java -cp libs/* kafka.Kafka server.properties`` started detached (its own session, a pidfile and a log
under ``<state_dir>/kafka/``). One process is broker and controller at once; the controller quorum is the
static voter ``1@127.0.0.1:<controller port>`` so changing a port later needs no re-format (a dynamic quorum
would store the endpoint in the metadata log).

The logging backend is ``log4j-slf4j-impl`` + ``log4j-core`` 2.24.3: Kafka 4.x pins slf4j-api 1.7.36, for
which the slf4j2 binding is invisible and the broker would log nothing. ``-Dlog4j2.shutdownHookEnabled=false``
keeps log4j alive until the broker's own shutdown hook has logged its last lines.

When ``config.kafka_bootstrap`` names an existing cluster, nothing is fetched, started or stopped: start and
stop only check that it answers.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.local.daemon import Daemon, DaemonError, rss_bytes, wait_for
from services.local.preflight import port_free
from streams.admin import BrokerError, answers_metadata, brokers_answering

if TYPE_CHECKING:
    from streams.config import StreamsConfig

log = structlog.get_logger(__name__)

LOG4J_VERSION = "2.24.3"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
"""Pinned: without a version Maven picks its own default (2.8 on Maven 3.8), so fetches differ by machine."""
MIN_JAVA = 17
STOP_TIMEOUT_S = 30.0



def _progress(message: str) -> None:
    """One progress line for the person at the terminal (library logs go through structlog)."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- paths
def kafka_dir(config: StreamsConfig, node: int = 0) -> Path:
    """Where a node keeps its config, data, pidfile and log: ``<state_dir>/kafka`` (the first or only node),
    ``<state_dir>/kafka/node-<i>`` (the others of a three-node cluster)."""
    return config.state_dir / "kafka" if node == 0 else config.state_dir / "kafka" / f"node-{node}"


def jars_dir(config: StreamsConfig) -> Path:
    return config.downloads / f"kafka-{config.kafka_version}" / "libs"


def node_daemon(config: StreamsConfig, node: int = 0) -> Daemon:
    """The pidfile, log and process of one node (the tests kill one to show nothing acknowledged is lost)."""
    d = kafka_dir(config, node)
    return Daemon(
        name="kafka" if node == 0 else f"kafka-{node}",
        pidfile=d / "kafka.pid",
        logfile=d / "kafka.log",
        marker=str(d / "server.properties"),
    )


def _nodes(config: StreamsConfig) -> range:
    return range(max(1, config.kafka_nodes))


# ------------------------------------------------------------------------------------------------- jars
_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>flywheel.local</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_UNREACHABLE = re.compile(
    r"Could not transfer|Unknown host|UnknownHost|Connection refused|Connect to .* failed|Network is unreachable"
    r"|timed out|No route to host|Could not resolve|PKIX path|Temporary failure in name resolution"
    r"|No plugin found for prefix|Plugin .* could not be resolved|Non-resolvable",
    re.IGNORECASE,
)


def _kafka_jar_present(libs: Path, version: str) -> bool:
    return (libs / f"kafka_2.13-{version}.jar").is_file() and (libs / f"log4j-core-{LOG4J_VERSION}.jar").is_file()


def ensure_jars(
    config: StreamsConfig,
    *,
    maven_settings: Path | None = None,
    local_repo: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Fetch Kafka and its runtime dependencies once; returns the directory of jars (the class path).

    ``maven_settings`` / ``local_repo`` pass ``-s`` / ``-Dmaven.repo.local`` to Maven (a mirror, a proxy, an
    isolated cache). A completed fetch leaves a ``.complete`` stamp: a half-finished one is redone. ``progress``
    gets the fetch's progress lines (default: stderr).
    """
    libs = jars_dir(config)
    stamp = libs.parent / ".complete"
    if stamp.is_file() and _kafka_jar_present(libs, config.kafka_version):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "Maven ('mvn') is not installed; it fetches the Kafka jars from Maven Central. "
            "Install it (Debian/Ubuntu: apt-get install maven) or set FLYWHEEL_KAFKA_BOOTSTRAP to use an "
            "existing Kafka."
        )
    build = libs.parent / "build"
    build.mkdir(parents=True, exist_ok=True)
    (build / "pom.xml").write_text(_POM.format(kafka=config.kafka_version, log4j=LOG4J_VERSION))
    tmp_libs = libs.parent / "libs.partial"
    shutil.rmtree(tmp_libs, ignore_errors=True)
    argv = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(build / "pom.xml"),
        "-Dstyle.color=never",
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        f"-DoutputDirectory={tmp_libs}",
        "-DincludeScope=runtime",
    ]
    if maven_settings is not None:
        argv[1:1] = ["-s", str(maven_settings)]
    if local_repo is not None:
        argv.append(f"-Dmaven.repo.local={local_repo}")
    say = progress or _progress
    say(f"fetching Apache Kafka {config.kafka_version} from Maven Central into {libs.parent} (once, about 45 MB)")
    started = time.monotonic()
    output = _run_with_progress(argv, tmp_libs, say)
    if output.returncode != 0:
        shutil.rmtree(tmp_libs, ignore_errors=True)
        text = re.sub(r"\x1b\[[0-9;]*m", "", output.stdout or "")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        detail = "\n".join(lines[-8:])
        if _UNREACHABLE.search(text):
            raise BrokerError(
                "Maven could not reach Maven Central (https://repo.maven.apache.org) to fetch the Kafka jars. "
                "Check the network or proxy (Maven's ~/.m2/settings.xml), or set FLYWHEEL_KAFKA_BOOTSTRAP to "
                f"use an existing Kafka.\n{detail}"
            )
        raise BrokerError(f"Maven failed to fetch org.apache.kafka:kafka_2.13:{config.kafka_version}:\n{detail}")
    if not _kafka_jar_present(tmp_libs, config.kafka_version):
        raise BrokerError(f"Maven finished but {tmp_libs} lacks kafka_2.13-{config.kafka_version}.jar")
    shutil.rmtree(libs, ignore_errors=True)
    os.replace(tmp_libs, libs)
    stamp.write_text(f"kafka {config.kafka_version} log4j {LOG4J_VERSION}\n")
    size = sum(p.stat().st_size for p in libs.iterdir()) / 1e6
    elapsed = time.monotonic() - started
    say(f"{len(list(libs.iterdir()))} jars, {size:.0f} MB in {elapsed:.1f}s")
    log.info("kafka jars fetched", version=config.kafka_version, mb=round(size, 1), seconds=round(elapsed, 1))
    return libs


def _run_with_progress(
    argv: list[str], watch: Path, say: Callable[[str], None] = _progress
) -> subprocess.CompletedProcess[str]:
    """Run Maven quietly, reporting the growing size of the output directory every few seconds."""
    done = threading.Event()

    started = time.monotonic()

    def report() -> None:
        while not done.wait(3.0):
            try:
                mb = sum(p.stat().st_size for p in watch.iterdir()) / 1e6 if watch.is_dir() else 0.0
            except FileNotFoundError:
                mb = 0.0
            elapsed = time.monotonic() - started
            say(f"{mb:.0f} MB copied ({elapsed:.0f}s)" if mb else f"downloading and resolving ({elapsed:.0f}s)")

    reporter = threading.Thread(target=report, name="mvn-progress", daemon=True)
    reporter.start()
    try:
        return subprocess.run(  # noqa: S603 - fixed argv
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, timeout=900
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError("Maven did not finish fetching the Kafka jars within 15 minutes") from exc
    finally:
        done.set()
        reporter.join()


# ------------------------------------------------------------------------------------------------- java
def find_java() -> str:
    """The java binary ($JAVA_HOME/bin/java first, then PATH), checked to be Java 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not candidate or not os.access(candidate, os.X_OK):
        where = f"$JAVA_HOME/bin/java ({home})" if home else "PATH"
        raise BrokerError(
            f"Java was not found on {where}; Kafka needs Java {MIN_JAVA}+. Install it (Debian/Ubuntu: "
            "apt-get install openjdk-17-jre-headless) or set FLYWHEEL_KAFKA_BOOTSTRAP to use an existing Kafka."
        )
    try:
        out = subprocess.run(  # noqa: S603 - the java found above, fixed arguments
            [candidate, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"Java at {candidate} does not run: {exc}") from exc
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        raise BrokerError(f"could not read the version of {candidate}: {(out.stderr or out.stdout).strip()[:200]}")
    major = int(m.group(1)) if m.group(1) != "1" else int(m.group(2) or 0)
    if major < MIN_JAVA:
        raise BrokerError(f"Kafka {MIN_JAVA}+ needs Java {MIN_JAVA} or newer; {candidate} is Java {major}")
    return candidate


# ------------------------------------------------------------------------------------------------- config
def _check_security(config: StreamsConfig) -> None:
    """The local broker speaks any of the four protocols: SASL with a SCRAM user, TLS with the certificate and key
    it is given (and the CA file, which it trusts for its own connections to itself)."""
    if config.uses_tls and not (config.broker_ssl_certfile and config.broker_ssl_keyfile and config.ssl_cafile):
        raise BrokerError(
            f"the local broker does not speak {config.security_protocol} without a certificate: set "
            "FLYWHEEL_KAFKA_SSL_CERTFILE, FLYWHEEL_KAFKA_SSL_KEYFILE and FLYWHEEL_KAFKA_SSL_CAFILE, or point "
            "FLYWHEEL_KAFKA_BOOTSTRAP at a cluster with TLS"
        )
    if config.uses_sasl and not config.sasl_mechanism.startswith("SCRAM-"):
        raise BrokerError(f"the local broker's SASL listener uses SCRAM (FLYWHEEL_KAFKA_SASL_MECHANISM="
                          f"SCRAM-SHA-256 or SCRAM-SHA-512), not {config.sasl_mechanism}")
    # the credentials go into a JAAS line of server.properties and kafka-storage's [name=...,password=...]
    if config.uses_sasl and any(re.search(r'[\s"\\,=\[\]]', v or "") for v in (config.sasl_username, config.sasl_password)):
        raise BrokerError("the local broker's SCRAM user and password may not contain spaces, quotes, backslashes, "
                          "commas, '=' or brackets (FLYWHEEL_KAFKA_SASL_USERNAME, FLYWHEEL_KAFKA_SASL_PASSWORD)")


def _server_properties(config: StreamsConfig, node: int = 0) -> str:
    d = kafka_dir(config, node)
    port, cport = config.kafka_port + node, config.kafka_controller_port + node
    n = max(1, config.kafka_nodes)
    voters = ",".join(f"{i + 1}@127.0.0.1:{config.kafka_controller_port + i}" for i in range(n))
    isr = str(min(2, n))  # three nodes: a write is acknowledged once two hold it, so one may die
    # The client listener is named after its protocol (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL): with SASL a client
    # that does not log in is refused, with TLS one that does not speak it. The broker reaches itself over it too,
    # as the same SCRAM user, which `kafka-storage format --add-scram` creates before the first start
    # (_format_storage), and trusting the same CA as the clients.
    listener = config.security_protocol
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node + 1),
        "controller.quorum.voters": voters,
        "listeners": f"{listener}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
        "advertised.listeners": f"{listener}://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": listener,
        "listener.security.protocol.map": f"{listener}:{listener},CONTROLLER:PLAINTEXT",
        "log.dirs": str(d / "data"),
        "num.partitions": "1",
        "default.replication.factor": str(n),
        "min.insync.replicas": isr,
        # Internal topics default to RF 3: on one node they could never be created.
        "offsets.topic.replication.factor": str(n),
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": str(n),
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": str(n),
        "share.coordinator.state.topic.min.isr": isr,
        # Local nodes start together: a new group need not wait 3 s for members.
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": "168",
        "log.segment.bytes": str(256 * 1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    if config.uses_tls:
        # PEM throughout: the key and chain in one file the broker reads (written by _write_config), the CA as the
        # broker's own trust store for its connections to itself; host names are checked (127.0.0.1 in the cert)
        props.update({
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(d / "broker-keystore.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(config.ssl_cafile),
            "ssl.client.auth": "none",
        })
    if config.uses_sasl:
        mech = config.sasl_mechanism
        props.update({
            "sasl.enabled.mechanisms": mech,
            "sasl.mechanism.inter.broker.protocol": mech,
            f"listener.name.{listener.lower()}.{mech.lower()}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{config.sasl_username}" password="{config.sasl_password}";',
        })
    head = "# Written by Flywheel at every start from its settings; edits here are overwritten.\n"
    return head + "".join(f"{k}={v}\n" for k, v in props.items())


_LOG4J2 = """# Written by Flywheel: the broker logs to stdout, which the launcher appends to kafka.log.
status = warn
name = flywheel-kafka
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d{ISO8601}] %p %m (%c{1})%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = warn
logger.controller.name = org.apache.kafka.controller
logger.controller.level = warn
logger.raft.name = org.apache.kafka.raft
logger.raft.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.coordinator.name = org.apache.kafka.coordinator
logger.coordinator.level = warn
"""


def _cluster_id(d: Path) -> str:
    """The cluster id kept next to the data (Kafka's Uuid: 22 url-safe base64 chars, not starting with '-')."""
    f = d / "cluster.id"
    if f.is_file():
        return f.read_text().strip()
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            break
    f.write_text(cid + "\n")
    return cid


def _write_config(config: StreamsConfig, node: int = 0) -> Path:
    d = kafka_dir(config, node)
    (d / "data").mkdir(parents=True, exist_ok=True)
    props = d / "server.properties"
    # it may hold the SCRAM password: readable by its owner only, from the moment it exists
    props.touch(mode=0o600, exist_ok=True)
    props.chmod(0o600)
    props.write_text(_server_properties(config, node))
    if config.uses_tls and config.broker_ssl_keyfile and config.broker_ssl_certfile:
        keystore = d / "broker-keystore.pem"
        keystore.touch(mode=0o600, exist_ok=True)
        keystore.chmod(0o600)
        keystore.write_text(config.broker_ssl_keyfile.read_text().strip() + "\n"
                            + config.broker_ssl_certfile.read_text().strip() + "\n")
    (d / "log4j2.properties").write_text(_LOG4J2)
    return props


def _java_argv(config: StreamsConfig, java: str, libs: Path, main: str, *args: str, node: int = 0) -> list[str]:
    d = kafka_dir(config, node)
    return [
        java,
        f"-Xmx{config.kafka_heap}",
        f"-Xms{min(_mb(config.kafka_heap), 256)}m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        *shlex.split(config.kafka_jvm_options),
        "-Djava.awt.headless=true",
        "-Dlog4j2.shutdownHookEnabled=false",
        f"-Dlog4j2.configurationFile={d / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={d}",
        "-cp",
        f"{libs}/*",
        main,
        *args,
    ]


def _mb(heap: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", heap.strip())
    if not m:
        raise BrokerError(f"FLYWHEEL_KAFKA_HEAP={heap!r} is not a Java heap size like 512m or 1g")
    n, unit = int(m.group(1)), m.group(2).lower()
    return {"k": n // 1024, "m": n, "g": n * 1024, "": n // (1024 * 1024)}[unit]


def _format_storage(config: StreamsConfig, java: str, libs: Path, props: Path, node: int = 0) -> None:
    """Format the metadata log once (a data dir with meta.properties is already formatted); every node of a
    cluster with the first node's cluster id."""
    d = kafka_dir(config, node)
    if (d / "data" / "meta.properties").is_file():
        return
    cid = _cluster_id(kafka_dir(config))
    argv = _java_argv(config, java, libs, "kafka.tools.StorageTool", "format", "-t", cid, "-c", str(props),
                      node=node)
    if config.uses_sasl:
        # the SCRAM user every client (and the broker itself) logs in as, stored in the metadata log at format
        argv += ["--add-scram", f"{config.sasl_mechanism}=[name={config.sasl_username},"
                                f"password={config.sasl_password}]"]
    _progress(f"==> formatting Kafka storage in {d / 'data'} (cluster {cid})")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603 - argv built here, no shell
    if out.returncode != 0:
        detail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-10:])
        raise BrokerError(f"formatting Kafka storage failed (exit {out.returncode}):\n{detail}")


# ------------------------------------------------------------------------------------------------- lifecycle
def start(config: StreamsConfig) -> None:
    """Start the local broker and wait until it answers metadata; a no-op when it already runs.

    With ``kafka_bootstrap`` set, only checks that the existing cluster answers.
    """
    if not config.manages_kafka:
        if not answers_metadata(config, timeout_s=min(10.0, config.kafka_start_timeout_s)):
            raise BrokerError(
                f"the Kafka at FLYWHEEL_KAFKA_BOOTSTRAP={config.kafka_bootstrap} does not answer; "
                "start it, or unset FLYWHEEL_KAFKA_BOOTSTRAP to let Flywheel run its own broker"
            )
        log.info("using existing kafka", bootstrap=config.bootstrap_servers)
        return
    daemons = [node_daemon(config, i) for i in _nodes(config)]
    if all(d.running() for d in daemons):
        _wait_ready(config, daemons, started_at=None, started=daemons)
        log.info("kafka already running", pids=[d.pid() for d in daemons], bootstrap=config.bootstrap_servers)
        return
    _check_security(config)
    java = find_java()
    libs = ensure_jars(config)
    down = [i for i, d in enumerate(daemons) if not d.running()]
    for i in down:
        for setting, port in (("kafka_port", config.kafka_port + i),
                              ("kafka_controller_port", config.kafka_controller_port + i)):
            if not port_free(port):
                raise BrokerError(
                    f"port {port} on 127.0.0.1 is already in use by another program, so the broker cannot listen "
                    f"there; stop that program or choose another port (FLYWHEEL_{setting.upper()}"
                    + (f" + {i}, node {i}" if i else "") + "), or point FLYWHEEL_KAFKA_BOOTSTRAP at a Kafka you "
                    "already run"
                )
    kafka_dir(config).mkdir(parents=True, exist_ok=True)
    _cluster_id(kafka_dir(config))  # before any node formats: they share it
    props = {i: _write_config(config, i) for i in down}
    for i in down:
        _format_storage(config, java, libs, props[i], i)
    where = ", ".join(f"127.0.0.1:{config.kafka_port + i}" for i in down)
    _progress(f"==> starting Kafka {config.kafka_version} on {where}")
    started_at = time.monotonic()
    for i in down:
        try:
            daemons[i].start(_java_argv(config, java, libs, "kafka.Kafka", str(props[i]), node=i),
                             cwd=kafka_dir(config, i))
        except DaemonError as exc:
            raise BrokerError(str(exc)) from exc
    _wait_ready(config, daemons, started_at=started_at, started=[daemons[i] for i in down])


def _wait_ready(config: StreamsConfig, daemons: list[Daemon], started_at: float | None,
                started: list[Daemon]) -> None:
    """Until every node is in the cluster's metadata (one node: until it answers); when they are not by the
    deadline, the ``started`` nodes are stopped (a node restarted into a running cluster: that node only)."""
    deadline_s = config.kafka_start_timeout_s
    want = len(daemons)
    ok = wait_for(
        lambda: brokers_answering(config, timeout_s=1.0) >= want,
        deadline_s,
        interval_s=0.25,
        abort=lambda: not all(d.running() for d in daemons),
    )
    if ok:
        if started_at is not None:
            elapsed = time.monotonic() - started_at
            pids = [d.pid() for d in daemons]
            rss = [rss_bytes(p) if p else None for p in pids]
            _progress(f"    kafka ready in {elapsed:.1f}s (pid {', '.join(str(p) for p in pids)})")
            log.info("kafka ready", seconds=round(elapsed, 2), pids=pids, rss_mb=[r and round(r / 1e6) for r in rss])
        return
    dead = [d for d in daemons if not d.running()]
    daemon = dead[0] if dead else started[0]
    tail = daemon.log_tail(30)
    for d in started:
        d.stop(timeout_s=10.0)
    if dead:
        raise BrokerError(f"the broker exited during start-up; last lines of {daemon.logfile}:\n{tail}")
    raise BrokerError(
        f"the broker did not answer a metadata request within {deadline_s:.0f}s "
        f"(FLYWHEEL_KAFKA_START_TIMEOUT_S) and was stopped; last lines of {daemon.logfile}:\n{tail}"
    )


def stop(config: StreamsConfig) -> None:
    """Stop the local broker, every node of it (SIGTERM, then SIGKILL after 30 s); a no-op when none runs."""
    if not config.manages_kafka:
        reachable = answers_metadata(config, timeout_s=2.0)
        log.info("external kafka is not managed by flywheel; nothing stopped",
                 bootstrap=config.bootstrap_servers, reachable=reachable)
        return
    daemons = [d for d in (node_daemon(config, i) for i in _nodes(config)) if d.pid() is not None]
    if not daemons:
        log.info("kafka not running")
        return
    _progress(f"==> stopping Kafka (pid {', '.join(str(d.pid()) for d in daemons)})")
    started = time.monotonic()
    # All nodes at once: stopped one by one, the last ones would wait out their shutdown for a controller quorum
    # that left with the first ones.
    with ThreadPoolExecutor(max_workers=len(daemons)) as pool:
        futures = [pool.submit(d.stop, timeout_s=STOP_TIMEOUT_S) for d in daemons]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise BrokerError(str(errors[0])) from errors[0]
    log.info("kafka stopped", seconds=round(time.monotonic() - started, 2))


def is_running(config: StreamsConfig) -> bool:
    """True when a node of the broker Flywheel manages for this config has a live process (says nothing of
    readiness)."""
    return config.manages_kafka and any(node_daemon(config, i).running() for i in _nodes(config))


def status(config: StreamsConfig) -> dict[str, Any]:
    """The broker's state: managed?, pid, memory, reachable?, where its files are."""
    st: dict[str, Any] = {
        "managed": config.manages_kafka,
        "bootstrap": config.bootstrap_servers,
        "version": config.kafka_version if config.manages_kafka else None,
    }
    if config.manages_kafka:
        daemon = node_daemon(config)
        pid = daemon.pid()
        rss = rss_bytes(pid) if pid else None
        st.update(
            running=pid is not None,
            pid=pid,
            rss_mb=round(rss / 1e6, 1) if rss else None,
            log=str(daemon.logfile),
            data_dir=str(kafka_dir(config) / "data"),
            jars=str(jars_dir(config)),
        )
    st["reachable"] = answers_metadata(config, timeout_s=2.0)
    return st


__all__ = [
    "BrokerError",
    "ensure_jars",
    "find_java",
    "is_running",
    "jars_dir",
    "kafka_dir",
    "node_daemon",
    "start",
    "status",
    "stop",
]
