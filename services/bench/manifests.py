"""``manifests_valid`` of ``flywheel bench scale``: deploy/ validated offline with the tools that own each format.

No Docker engine or Kubernetes cluster runs here, so the compose file is checked against the compose-spec schema
(check-jsonschema's vendored copy), the Dockerfiles with hadolint, the Helm chart with ``helm lint --strict`` and
``helm template`` (default values, and GPU + Secret + ServiceMonitor), and every rendered manifest with
kubernetes-validate (strict) for the oldest and the newest Kubernetes the chart and the validator know. helm and
hadolint come from ``deploy/validation-tools.sh``, built or fetched once per machine into the user's cache
(``~/.cache/flywheel/deploy-tools``, like Go's and uv's own caches), so a fresh clone does not build helm again;
``tests/deploy/test_manifests.py`` runs the same checks and shows each validator a broken input it must refuse.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from services.settings import REPO_ROOT

__all__ = ["CHART", "COMPOSE", "DEPLOY", "KUBE_VERSIONS", "install_tools", "validate_manifests", "versions"]

DEPLOY = REPO_ROOT / "deploy"
CHART = DEPLOY / "helm" / "flywheel"
COMPOSE = DEPLOY / "compose.yaml"
KUBE_VERSIONS = ("1.25.0", "1.37.0")
"""The chart's kubeVersion floor and the newest schema kubernetes-validate ships."""
TOOLS_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flywheel" / "deploy-tools"
"""Where helm and hadolint live: versioned binaries, independent of any clone or state directory."""
CHART_VALUES: tuple[tuple[str, ...], ...] = (
    (), ("gpu.enabled=true", "metrics.serviceMonitor.enabled=true", "apiKeys.keys.k1=alice"))


def _run(cmd: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, check=False)  # noqa: S603 - argv built here


def install_tools(tools_dir: Path = TOOLS_CACHE) -> dict[str, str]:
    """Paths of helm, hadolint, check-jsonschema and kubernetes-validate (the first two installed once)."""
    out = _run(["bash", str(DEPLOY / "validation-tools.sh"), str(tools_dir)], timeout_s=1500)
    if out.returncode != 0:
        raise RuntimeError(f"deploy/validation-tools.sh exited {out.returncode}:\n{out.stderr[-2000:]}")
    found = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    bin_dir = Path(sys.executable).parent
    found["check-jsonschema"] = str(bin_dir / "check-jsonschema")
    found["kubernetes-validate"] = str(bin_dir / "kubernetes-validate")
    return found


def versions(tools: dict[str, str]) -> dict[str, str]:
    """Each validator's own report of its version."""
    return {
        "helm": _run([tools["helm"], "version", "--template", "{{.Version}}"]).stdout.strip(),
        "hadolint": _run([tools["hadolint"], "--version"]).stdout.strip(),
        "check-jsonschema": _run([tools["check-jsonschema"], "--version"]).stdout.strip(),
        "kubernetes-validate": _run([tools["kubernetes-validate"], "--version"]).stdout.strip(),
    }


def validate_manifests(tools: dict[str, str]) -> dict[str, Any]:
    """Every check: ``{"valid": all passed, "checks": {name: {"ok", "detail"}}, "versions": ...}``."""
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, out: subprocess.CompletedProcess[str], ok: bool | None = None) -> None:
        passed = out.returncode == 0 if ok is None else ok and out.returncode == 0
        checks[name] = {"ok": passed, "detail": "" if passed else (out.stdout + out.stderr)[-1500:]}

    check("compose-spec", _run([tools["check-jsonschema"], "--builtin-schema", "vendor.compose-spec", str(COMPOSE)]))
    check("hadolint", _run([tools["hadolint"], "--no-color", str(DEPLOY / "Dockerfile"),
                            str(DEPLOY / "Dockerfile.worker")]))
    with tempfile.TemporaryDirectory(prefix="flywheel-manifests-") as tmp:
        for i, values in enumerate(CHART_VALUES):
            sets = [a for v in values for a in ("--set", v)]
            tag = "default" if not values else "gpu+secret+servicemonitor"
            lint = _run([tools["helm"], "lint", "--strict", str(CHART), *sets])
            check(f"helm lint ({tag})", lint, "0 chart(s) failed" in lint.stdout)
            rendered = _run([tools["helm"], "template", "flywheel", str(CHART), *sets])
            check(f"helm template ({tag})", rendered)
            path = Path(tmp) / f"rendered-{i}.yaml"
            path.write_text(rendered.stdout)
            for version in KUBE_VERSIONS:
                out = _run([tools["kubernetes-validate"], "--strict", "--kubernetes-version", version, str(path)])
                # an object without a schema is skipped with a warning: only the Prometheus Operator's
                # ServiceMonitor (a CRD) may be
                skipped = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("WARN")]
                check(f"kubernetes-validate {version} ({tag})", out, all("ServiceMonitor" in ln for ln in skipped))
    return {"valid": all(c["ok"] for c in checks.values()), "checks": checks, "versions": versions(tools)}
