"""The deployment artefacts of deploy/, validated offline: no Docker engine or Kubernetes cluster runs here, so what
can be checked without one is checked with the tools that own each format.

* The images (deploy/Dockerfile, deploy/Dockerfile.worker): hadolint, and their contract read from the files: a
  numeric non-root USER, health checks on /healthz and /readyz (serving) and on the worker's page, keys from the
  mounted secret, no torch in what the serving image installs.
* The compose file (deploy/compose.yaml): the compose-spec schema that check-jsonschema vendors, and its shape:
  three KRaft nodes of the official Kafka image, two API replicas behind nginx, the worker and its standby on one
  state volume, Prometheus with the project's rules, Grafana with its dashboards, settings that exist.
* The Helm chart (deploy/helm/flywheel): ``helm lint --strict`` and ``helm template`` with the default values and
  with the GPU, Secret and ServiceMonitor flags, every rendered manifest through kubernetes-validate (strict) for
  the oldest and the newest Kubernetes the chart and the validator know.

Each validator is also shown a broken input and must refuse it, so a pass means something. helm and hadolint come
from deploy/validation-tools.sh (built or fetched once per machine into ~/.cache/flywheel/deploy-tools).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.bench.manifests import (
    CHART,
    COMPOSE,
    DEPLOY,
    KUBE_VERSIONS,
    install_tools,
    validate_manifests,
    versions,
)
from services.settings import REPO_ROOT, Settings

HELM_VERSION = "v4.3.2"
HADOLINT_VERSION = "2.15.1"
# the first run builds helm from source (about 7 minutes on 2 cores with an empty Go cache), within the first test
pytestmark = pytest.mark.timeout(1800)


def run(cmd: list[str], *, ok: bool = True, timeout_s: float = 300, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=cwd, check=False)
    if ok:
        assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    """helm and hadolint, installed by the project's own script (idempotent; the first helm build takes minutes)."""
    found = install_tools()
    for name, path in found.items():
        assert Path(path).is_file(), f"{name}: {path} missing"
    return found


@pytest.mark.integration
def test_the_benchmark_finds_every_check_valid(tools: dict[str, str]) -> None:
    """What `flywheel bench scale` reports as manifests_valid: the same validators, all passing here."""
    report = validate_manifests(tools)
    assert report["valid"], {k: c["detail"] for k, c in report["checks"].items() if not c["ok"]}
    assert len(report["checks"]) == 2 + 2 * (2 + len(KUBE_VERSIONS)) and report["versions"] == versions(tools)


# ------------------------------------------------------------------------------------------------ the images
def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


@pytest.mark.integration
def test_dockerfiles_pass_hadolint(tools: dict[str, str], tmp_path: Path) -> None:
    files = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.worker"]
    out = run([tools["hadolint"], "--no-color", *map(str, files)], ok=False)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim\nRUN cd /app && apt-get install curl\nUSER root\n")
    refused = run([tools["hadolint"], "--no-color", str(broken)], ok=False)
    assert refused.returncode != 0 and "DL3003" in refused.stdout, refused.stdout


@pytest.mark.unit
def test_serving_image_contract() -> None:
    steps = dockerfile(DEPLOY / "Dockerfile")
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert args["LOCK"] == "requirements-serve.lock"
    serve_lock = (REPO_ROOT / args["LOCK"]).read_text()
    gpu_lock = (REPO_ROOT / "requirements-serve-gpu.lock").read_text()
    for lock in (serve_lock, gpu_lock):
        assert not re.search(r"^(torch|scikit-learn|faust-streaming)==", lock, re.MULTILINE), "training package in a serving lock"
    assert re.search(r"^nvidia-cudnn", gpu_lock, re.MULTILINE), "the GPU variant's lock carries no CUDA runtime"
    assert not re.search(r"^nvidia-", serve_lock, re.MULTILINE)
    user = [a for op, a in steps if op == "USER"][-1]
    assert user.isdigit() and int(user) != 0, f"USER {user}: the image must run as a numeric non-root user"
    (health,) = [a for op, a in steps if op == "HEALTHCHECK"]
    assert "/healthz" in health and "/readyz" in health
    env = " ".join(a for op, a in steps if op == "ENV")
    assert "FLYWHEEL_API_KEYS_FILE=/run/secrets/" in env and "FLYWHEEL_API_HOST=0.0.0.0" in env
    assert [a for op, a in steps if op == "CMD"][-1] == '["flywheel", "serve"]'


@pytest.mark.unit
def test_worker_image_contract() -> None:
    steps = dockerfile(DEPLOY / "Dockerfile.worker")
    user = [a for op, a in steps if op == "USER"][-1]
    assert user.isdigit() and int(user) != 0
    (health,) = [a for op, a in steps if op == "HEALTHCHECK"]
    assert "flywheel-worker-health" in health
    assert any("requirements.lock" in a and ".[worker]" in a for op, a in steps if op == "RUN"), \
        "the worker image installs the worker extra at the full lock's versions"
    copied = " ".join(a for op, a in steps if op == "COPY")
    for script in ("flywheel-worker-leased", "flywheel-worker-health"):
        assert f"deploy/worker/{script}" in copied and (DEPLOY / "worker" / script).stat().st_mode & 0o111
    assert [a for op, a in steps if op == "CMD"][-1] == '["flywheel-worker-leased"]'
    env = " ".join(a for op, a in steps if op == "ENV")
    assert "FLYWHEEL_WORKER_HOST=0.0.0.0" in env


# ---------------------------------------------------------------------------------------------- compose
@pytest.mark.integration
def test_compose_matches_the_compose_spec(tools: dict[str, str], tmp_path: Path) -> None:
    cmd = [tools["check-jsonschema"], "--builtin-schema", "vendor.compose-spec"]
    run([*cmd, str(COMPOSE)])
    broken = tmp_path / "compose.yaml"
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["api-1"]["restart_policy"] = "always"  # not a service key (it belongs under deploy:)
    broken.write_text(yaml.safe_dump(doc))
    refused = run([*cmd, str(broken)], ok=False)
    assert refused.returncode != 0 and "restart_policy" in refused.stdout + refused.stderr


@pytest.mark.unit
def test_compose_stack_shape() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the x- anchors and << merges
    services: dict[str, Any] = doc["services"]

    kafka = {n: s for n, s in services.items() if s.get("image", "").startswith("apache/kafka:")}
    assert sorted(kafka) == ["kafka-1", "kafka-2", "kafka-3"]
    for s in kafka.values():
        env = s["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
        assert len(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == 3
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3" and env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    assert len({s["environment"]["KAFKA_NODE_ID"] for s in kafka.values()}) == 3
    # kafka-storage format takes a cluster id only as a UUID in url-safe base64 without padding
    (cluster_id,) = {s["environment"]["CLUSTER_ID"] for s in kafka.values()}
    assert len(cluster_id) == 22 and len(base64.urlsafe_b64decode(cluster_id + "==")) == 16

    apis = [n for n, s in services.items() if s.get("image") == "flywheel-api"]
    assert sorted(apis) == ["api-1", "api-2"]
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    for api in apis:
        assert f"server {api}:8000" in nginx and f"server {api}:7830" in nginx
        assert "flywheel-api-keys.json" in services[api]["secrets"]
        assert services[api]["environment"]["FLYWHEEL_API_KEYS_FILE"] == "/run/secrets/flywheel-api-keys.json"
    assert services["lb"]["image"].startswith("nginx:")

    worker, standby = services["worker"], services["worker-standby"]
    assert worker["image"] == standby["image"] == "flywheel-worker"
    assert "worker-state:/var/lib/flywheel" in worker["volumes"] and worker["volumes"] == standby["volumes"]
    assert services["seed"]["command"] == ["flywheel", "models", "seed"]

    prom = services["prometheus"]
    assert "../monitoring/rules:/etc/prometheus/rules:ro" in prom["volumes"]
    prom_cfg = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    for rule_file in prom_cfg["rule_files"]:
        assert (REPO_ROOT / "monitoring" / "rules" / Path(rule_file).name).is_file()
    targets = {c["job_name"]: c["static_configs"][0]["targets"] for c in prom_cfg["scrape_configs"]}
    assert targets["flywheel-api"] == ["api-1:8000", "api-2:8000"]
    assert targets["flywheel-worker"] == ["worker:6066", "worker-standby:6066"]
    grafana_mounts = " ".join(services["grafana"]["volumes"])
    assert "../monitoring/grafana/provisioning/dashboards:" in grafana_mounts
    assert "../monitoring/grafana/dashboards:/var/lib/grafana/dashboards/flywheel" in grafana_mounts
    provider = yaml.safe_load((REPO_ROOT / "monitoring/grafana/provisioning/dashboards/flywheel.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/flywheel"

    # every bind mount names a file or folder of the repository, every setting one that Settings reads
    for name, s in services.items():
        for vol in s.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
        for key in s.get("environment", {}):
            if key.startswith("FLYWHEEL_"):
                assert key[len("FLYWHEEL_"):].lower() in Settings.model_fields, f"{name}: {key} is no setting"


# ------------------------------------------------------------------------------------------------- the chart
def render(tools: dict[str, str], *values: str) -> list[dict[str, Any]]:
    out = run([tools["helm"], "template", "flywheel", str(CHART), *(a for v in values for a in ("--set", v))])
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kube_validate(tools: dict[str, str], docs: list[dict[str, Any]], path: Path) -> str:
    path.write_text(yaml.safe_dump_all(docs))
    report = ""
    for version in KUBE_VERSIONS:
        out = run([tools["kubernetes-validate"], "--strict", "--kubernetes-version", version, str(path)], ok=False)
        assert out.returncode == 0, out.stdout + out.stderr
        report += out.stdout + out.stderr
    return report


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


@pytest.mark.integration
def test_chart_lints(tools: dict[str, str], tmp_path: Path) -> None:
    for values in ([], ["gpu.enabled=true", "metrics.serviceMonitor.enabled=true", "apiKeys.keys.k1=alice"]):
        out = run([tools["helm"], "lint", "--strict", str(CHART), *(a for v in values for a in ("--set", v))])
        assert "0 chart(s) failed" in out.stdout
    broken = tmp_path / "flywheel"
    shutil.copytree(CHART, broken)
    api = broken / "templates" / "api.yaml"
    api.write_text(api.read_text() + "{{- if .Values.api.replicas }}\n")  # an unclosed action
    refused = run([tools["helm"], "lint", "--strict", str(broken)], ok=False)
    assert refused.returncode != 0 and "[ERROR] templates/: parse error" in refused.stdout, refused.stdout
    # a value the chart cannot do without stops the rendering with its name
    refused = run([tools["helm"], "template", "flywheel", str(CHART), "--set", "kafka.bootstrap="], ok=False)
    assert refused.returncode != 0 and "kafka.bootstrap must be set" in refused.stderr


@pytest.mark.integration
def test_chart_renders_valid_manifests_with_and_without_gpu(tools: dict[str, str], tmp_path: Path) -> None:
    cpu = render(tools)
    report = kube_validate(tools, cpu, tmp_path / "cpu.yaml")
    assert "WARN" not in report, report  # every object had a schema and passed it
    kinds = by_kind(cpu)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim",
            "Job"} <= kinds.keys()
    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    api = deployments["flywheel-api"]["spec"]["template"]
    (container,) = api["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert api["spec"]["securityContext"]["runAsNonRoot"] is True
    keys = next(v for v in api["spec"]["volumes"] if v["name"] == "api-keys")
    assert keys["secret"]["secretName"] == "flywheel-api-keys"  # the operator's Secret by default
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "flywheel-api" and "replicas" not in deployments["flywheel-api"]["spec"]
    worker = deployments["flywheel-worker"]["spec"]
    assert worker["replicas"] == 2 and worker["strategy"]["type"] == "Recreate"  # the worker and its standby
    assert worker["template"]["spec"]["containers"][0]["args"] == ["flywheel-worker-leased"]

    gpu = render(tools, "gpu.enabled=true", "apiKeys.keys.k1=alice", "metrics.serviceMonitor.enabled=true")
    report = kube_validate(tools, gpu, tmp_path / "gpu.yaml")
    # the ServiceMonitor is the Prometheus Operator's CRD, which kubernetes-validate has no schema for: it may be
    # the only object skipped
    skipped = [ln for ln in report.splitlines() if ln.startswith("WARN")]
    assert skipped and all("ServiceMonitor" in ln for ln in skipped), report
    kinds = by_kind(gpu)
    api_gpu = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "flywheel-api")
    (container,) = api_gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu")
    (secret,) = kinds["Secret"]
    assert json.loads(secret["stringData"]["api-keys.json"]) == {"k1": "alice"}
    monitors = {m["metadata"]["name"]: m for m in kinds["ServiceMonitor"]}
    assert sorted(monitors) == ["flywheel-api", "flywheel-worker"]
    assert monitors["flywheel-worker"]["spec"]["endpoints"][0]["relabelings"][0]["replacement"] == "flywheel-worker"


@pytest.mark.integration
def test_kubernetes_validate_refuses_a_broken_manifest(tools: dict[str, str], tmp_path: Path) -> None:
    docs = render(tools)
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "flywheel-api")
    api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"name": "http"}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(api))
    out = run([tools["kubernetes-validate"], "--strict", str(path)], ok=False)
    assert out.returncode != 0, out.stdout


@pytest.mark.integration
def test_validator_versions(tools: dict[str, str]) -> None:
    """The versions the README reports are the ones that ran."""
    found = versions(tools)
    print(json.dumps(found))
    assert found["helm"] == HELM_VERSION
    assert HADOLINT_VERSION in found["hadolint"]
    readme = (DEPLOY / "README.md").read_text()
    for name, text in found.items():
        (number,) = re.findall(r"v?\d+\.\d+\.\d+", text)
        assert f"{name} {number}" in readme, f"deploy/README.md does not say {name} {number}"


@pytest.mark.integration
def test_chart_passes_kafka_security_from_secrets(tools: dict[str, str], tmp_path: Path) -> None:
    """SASL over TLS: the protocol and user as settings, the password and the CA from Secrets, in every pod."""
    docs = render(tools, "kafka.securityProtocol=SASL_SSL", "kafka.sasl.username=svc",
                  "kafka.sasl.passwordSecret.name=kafka-login", "kafka.tls.caSecret.name=kafka-ca")
    assert "WARN" not in kube_validate(tools, docs, tmp_path / "sasl.yaml")
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 3  # the API, the worker, the seed
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["FLYWHEEL_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
        assert env["FLYWHEEL_KAFKA_SASL_USERNAME"]["value"] == "svc"
        assert env["FLYWHEEL_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kafka-login", "key": "password"}
        cafile = env["FLYWHEEL_KAFKA_SSL_CAFILE"]["value"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "kafka-ca"]
        assert cafile == f"{mount['mountPath']}/ca.pem"
        assert any(v["name"] == "kafka-ca" and v["secret"]["secretName"] == "kafka-ca" for v in pod["volumes"])
        assert all(name in Settings.model_fields for name in (n[len("FLYWHEEL_"):].lower() for n in env))
    refused = run([tools["helm"], "template", "flywheel", str(CHART), "--set", "kafka.securityProtocol=SASL_SSL"], ok=False)
    assert refused.returncode != 0 and "kafka.sasl.username must be set" in refused.stderr


@pytest.mark.integration
def test_compose_kafka_nodes_pass_kafkas_own_config_check(tmp_path: Path) -> None:
    """Each node's KAFKA_* variables, turned into server.properties the way the apache/kafka image does (KAFKA_FOO_BAR
    is foo.bar), are accepted by `kafka-storage format` of the same Kafka version, from the project's own jars: it
    parses and checks the whole KRaft configuration and the cluster id, which no schema does."""
    from services.local import broker

    doc = yaml.safe_load(COMPOSE.read_text())
    nodes = {n: s for n, s in doc["services"].items() if s.get("image", "").startswith("apache/kafka:")}
    version = {s["image"].split(":", 1)[1] for s in nodes.values()}
    config = Settings(_env_file=None, state_dir=tmp_path, downloads_dir=REPO_ROOT / "var" / "downloads",
                      kafka_version=version.pop()).streams()
    libs = broker.ensure_jars(config)
    java = broker.find_java()
    for name, service in nodes.items():
        env = service["environment"]
        props = {k[len("KAFKA_"):].lower().replace("_", "."): v for k, v in env.items()
                 if k.startswith("KAFKA_") and k != "KAFKA_HEAP_OPTS"}
        props["log.dirs"] = str(tmp_path / name / "data")
        path = tmp_path / f"{name}.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        out = run([java, "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format", "-t", env["CLUSTER_ID"],
                   "-c", str(path)], ok=False, timeout_s=180)
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"
        assert (tmp_path / name / "data" / "meta.properties").is_file()
        assert f"node.id={env['KAFKA_NODE_ID']}" in (tmp_path / name / "data" / "meta.properties").read_text()
