"""The install sized by role: each lock builds the environment its role needs, and no more.

* The serving-only environment (``requirements-serve.lock``, what ``deploy/Dockerfile`` installs) stays under
  500 MB, has none of the training or evaluation packages installed, imports none of them, and really serves:
  ``flywheel serve`` from it classifies and takes feedback through a real broker.
* With the ``gpu`` extra, after ``onnxruntime.preload_dlls()`` (through ``models.runtime``) every shared library
  that ``libonnxruntime_providers_cuda.so`` links against resolves except the driver ``libcuda.so.1``, which only
  a GPU host has. Checked in the full environment and in the serving GPU environment (``requirements-serve-gpu.lock``,
  the GPU image), where torch is absent and so cannot have loaded them first.
* The locks are what ``make lock`` writes from ``pyproject.toml``, and every declared package is used.

The environments are built the way the Dockerfile builds its image (the lock, then the project without
dependencies from a copy of its packages), with uv linking from its cache: seconds each once ``make venv`` has
filled the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.local.daemon import free_port, wait_until
from services.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SERVE_LIMIT_BYTES = 500 * 1000 * 1000
# Top-level modules of the training, evaluation and worker packages (and their heavy dependencies).
NOT_FOR_SERVING = ("torch", "sklearn", "scipy", "matplotlib", "faust", "mode", "aiokafka", "onnx", "onnxscript",
                   "PIL", "joblib")
# The serving code path: `flywheel serve` and what its workers import.
SERVING_MODULES = (
    "services.cli", "services.settings", "services.logging", "services.api", "services.api.app",
    "services.api.routes", "services.api.state", "services.api.deps", "services.api.middleware",
    "services.api.schemas", "services.spamd", "models.classifier", "models.registry", "models.runtime",
    "models.features", "models.message", "models.rules", "streams.events", "streams.topics",
)
PROJECT_FILES = ("pyproject.toml", "README.md", "models", "services", "streams")


def _uv() -> str:
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        pytest.fail("uv not found beside this Python or on PATH (`make venv` installs it)")
    return found


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of what the Dockerfile copies (pyproject, README, the packages)."""
    src = tmp_path_factory.mktemp("project-src")
    for name in PROJECT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("project-wheel")
    _run([_uv(), "build", "-q", "--wheel", "--out-dir", str(out), str(src)])
    (wheel,) = out.glob("flywheel-*.whl")
    return wheel


def build_env(dest: Path, lock: str, wheel: Path) -> float:
    """A venv at ``dest`` holding ``lock`` and then the project without dependencies, as the Dockerfile installs
    them; the seconds it took."""
    uv = _uv()
    started = time.monotonic()
    _run([uv, "venv", "-q", "--python", sys.executable, str(dest)])
    python = str(dest / "bin" / "python")
    _run([uv, "pip", "install", "-q", "--python", python, "-r", str(REPO / lock)])
    _run([uv, "pip", "install", "-q", "--python", python, "--no-deps", str(wheel)])
    return time.monotonic() - started


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root``, each file counted once (what an image layer of it would hold)."""
    seen: set[int] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen and not os.path.islink(os.path.join(dirpath, name)):
                seen.add(st.st_ino)
                total += st.st_size
    return total


@pytest.fixture(scope="module")
def serve_env(tmp_path_factory: pytest.TempPathFactory, project_wheel: Path) -> Iterator[Path]:
    """The serving-only environment from requirements-serve.lock."""
    dest = tmp_path_factory.mktemp("serve-env") / "venv"
    seconds = build_env(dest, "requirements-serve.lock", project_wheel)
    print(f"\nserving environment built in {seconds:.1f}s, {tree_bytes(dest) / 1e6:.0f} MB")
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


@pytest.fixture(scope="module")
def serve_gpu_env(tmp_path_factory: pytest.TempPathFactory, project_wheel: Path) -> Iterator[Path]:
    """The serving GPU environment from requirements-serve-gpu.lock (about 2.4 GB, hard links into uv's cache)."""
    dest = tmp_path_factory.mktemp("serve-gpu-env") / "venv"
    seconds = build_env(dest, "requirements-serve-gpu.lock", project_wheel)
    print(f"\nserving GPU environment built in {seconds:.1f}s, {tree_bytes(dest) / 1e6:.0f} MB")
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


# --------------------------------------------------------------------------------------------- serving only
@pytest.mark.integration
def test_serving_env_is_small_and_holds_no_training_package(serve_env: Path) -> None:
    size = tree_bytes(serve_env)
    assert size <= SERVE_LIMIT_BYTES, f"serving environment is {size / 1e6:.0f} MB, over {SERVE_LIMIT_BYTES / 1e6:.0f}"
    code = ("import importlib.util, json; "
            f"print(json.dumps([m for m in {NOT_FOR_SERVING!r} if importlib.util.find_spec(m) is not None]))")
    out = _run([str(serve_env / "bin" / "python"), "-c", code], cwd=serve_env).stdout
    assert json.loads(out) == [], f"installed in the serving environment: {out}"


_IMPORT_CHECK = """
import json, sys
from pathlib import Path
for name in {modules!r}:
    __import__(name)
from services.api.app import create_app
from services.settings import Settings
create_app(Settings(state_dir=Path(sys.argv[1])))
import services
print(json.dumps({{
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r}),
    "services": services.__file__,
}}))
"""


@pytest.mark.integration
def test_serving_imports_pull_in_no_training_package(serve_env: Path, tmp_path: Path) -> None:
    code = _IMPORT_CHECK.format(modules=SERVING_MODULES, heavy=NOT_FOR_SERVING)
    out = _run([str(serve_env / "bin" / "python"), "-c", code, str(tmp_path / "state")], cwd=tmp_path).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert Path(report["services"]).is_relative_to(serve_env), "imported the checkout, not the installed project"


@pytest.mark.integration
def test_serving_env_serves(serve_env: Path, kafka: Settings, corpus: list[Any], tmp_path: Path) -> None:
    """`flywheel serve` from the serving-only environment, with mounted keys: classify, then a flag into Kafka."""
    from services.bench.api import train_quick_version

    settings = kafka.model_copy(update={
        "state_dir": tmp_path / "state", "downloads_dir": kafka.downloads, "api_host": "127.0.0.1",
        "api_port": free_port(), "spamd_port": free_port(), "workers": 1,
    })
    sample = random.Random(3).sample(corpus, 200)
    champion = train_quick_version(settings.registry, [m.raw for m in sample], [m.is_spam for m in sample],
                                   seed=3, promote=True)
    keys = tmp_path / "api-keys.json"
    keys.write_text(json.dumps({"install-test-user-key": "installer"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(settings.child_env())
    env.pop("FLYWHEEL_API_KEYS", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["FLYWHEEL_API_KEYS_FILE"] = str(keys)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(serve_env / "bin" / "flywheel"), "serve"], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{settings.api_port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flywheel serve exited {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(base + "/readyz", timeout=2.0).status_code == 200
        return False

    try:
        wait_until(ready, 120.0, "the serving-only API to be ready", interval_s=0.3)
        spam = next(m.raw for m in corpus if m.is_spam and 2000 < len(m.raw) < 20000)
        r = httpx.post(base + "/classify", content=spam, headers={"Content-Type": "message/rfc822"}, timeout=30.0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["version"] == champion and body["rules"]["hits"]
        assert body["model"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
        flag = {"message_id": body["message_id"], "label": "spam"}
        assert httpx.post(base + "/feedback", json=flag, headers={"X-API-Key": "dev-user-key"},
                          timeout=30.0).status_code == 401
        r = httpx.post(base + "/feedback", json=flag, headers={"X-API-Key": "install-test-user-key"}, timeout=30.0)
        assert r.status_code == 202, r.text
        assert r.json()["reporter"] == "installer"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------- the GPU extra
_CUDA_CHECK = """
import ctypes, json, re, subprocess, sys
from pathlib import Path
import onnxruntime as ort
from models import runtime
provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
ldd = subprocess.run(["ldd", str(provider)], capture_output=True, text=True, check=True).stdout
needed = [line.split()[0] for line in ldd.splitlines() if "=>" in line]
preloaded = runtime.preload_cuda_libraries(need_driver=False)
unresolved = {}
for name in needed:
    try:
        ctypes.CDLL(name)
    except OSError as exc:
        unresolved[name] = str(exc)
try:
    ctypes.CDLL(str(provider))
    provider_error = None
except OSError as exc:
    provider_error = str(exc)
maps = Path("/proc/self/maps").read_text()
print(json.dumps({
    "preloaded": preloaded, "needed": needed, "unresolved": unresolved, "provider_error": provider_error,
    "runtime_loaded": sorted(set(re.findall(r"/(lib(?:cudnn|cufft|nvrtc)\\.so[.0-9]*)$", maps, re.MULTILINE))),
    "torch": "torch" in sys.modules,
}))
"""


def _cuda_report(python: Path, cwd: Path) -> dict[str, Any]:
    out = _run([str(python), "-c", _CUDA_CHECK], cwd=cwd).stdout
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def _check_cuda_report(report: dict[str, Any]) -> None:
    assert report["preloaded"] is True
    assert {"libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudart.so.13"} <= set(report["needed"])
    assert set(report["unresolved"]) <= {"libcuda.so.1"}, report["unresolved"]
    if report["provider_error"] is not None:  # a host without the driver: that, and only that, is missing
        assert "libcuda.so.1" in report["provider_error"], report["provider_error"]
    assert {"libcudnn.so.9", "libcufft.so.12", "libnvrtc.so.13"} <= set(report["runtime_loaded"])
    assert report["torch"] is False


_PRELOAD_GUARD = """
import json
from pathlib import Path
from models import runtime
ran = runtime.preload_cuda_libraries()
maps = Path("/proc/self/maps").read_text()
print(json.dumps({"ran": ran, "driver": runtime._driver_present(), "cublas": "libcublasLt.so" in maps}))
"""


@pytest.mark.unit
def test_preload_only_where_a_driver_can_use_it() -> None:
    """Serving processes load the 2 GB CUDA runtime only on a GPU host; elsewhere the preload is skipped."""
    out = _run([sys.executable, "-c", _PRELOAD_GUARD], cwd=REPO).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["ran"] == report["driver"] == report["cublas"], report


@pytest.mark.integration
def test_gpu_extra_resolves_the_cuda_provider_libraries_without_torch(serve_gpu_env: Path, tmp_path: Path) -> None:
    _check_cuda_report(_cuda_report(serve_gpu_env / "bin" / "python", tmp_path))


@pytest.mark.unit
def test_full_env_resolves_the_cuda_provider_libraries() -> None:
    """The environment `make` builds carries the gpu extra, so the CUDA provider can start on a GPU host."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("nvidia-curand")
    except PackageNotFoundError:
        pytest.fail("the gpu extra is not installed in this environment (`make venv` installs requirements.lock)")
    _check_cuda_report(_cuda_report(Path(sys.executable), REPO))


# --------------------------------------------------------------------------------------------- the locks
def _pins(text: str) -> dict[str, str]:
    return dict(line.split("==", 1) for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line))


@pytest.mark.unit
def test_role_locks_are_subsets_of_the_full_lock() -> None:
    full = _pins((REPO / "requirements.lock").read_text())
    for lock in ("requirements-serve.lock", "requirements-serve-gpu.lock"):
        pins = _pins((REPO / lock).read_text())
        assert {k: v for k, v in pins.items() if full.get(k) != v} == {}, f"{lock} differs from requirements.lock"
    serve = _pins((REPO / "requirements-serve.lock").read_text())
    assert "onnxruntime-gpu" in serve and "torch" not in serve
    assert not any(name.startswith("nvidia-") for name in serve), "CUDA libraries in the serving lock"


@pytest.mark.integration
def test_locks_are_what_make_lock_writes(tmp_path: Path) -> None:
    """`make lock`'s own commands, run on a copy of pyproject.toml and the locks, change nothing."""
    locks = sorted(p.name for p in REPO.glob("requirements*.lock"))
    for name in ("pyproject.toml", "README.md", *locks):
        shutil.copy2(REPO / name, tmp_path / name)
    uv = _uv()
    commands = _run(["make", "-s", "-n", "-C", str(REPO), "lock", f"UV={uv}"]).stdout.strip().splitlines()
    written = sorted(m.group(1) for c in commands if (m := re.search(r"-o (\S+)", c)))
    assert written == locks, f"make lock writes {written}, the repository has {locks}"
    for command in commands:
        offline = subprocess.run(command, check=False, shell=True, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=300, env={**os.environ, "UV_OFFLINE": "1"})
        if offline.returncode != 0:  # something not in uv's cache yet: ask the index
            _run(["bash", "-c", command], cwd=tmp_path)
    for name in locks:
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), f"{name} is stale: run `make lock`"


# How each declared distribution is used: the module it is imported as, or None for a tool (a command, a pytest
# plugin, type stubs) that nothing imports.
USE = {
    "numpy": "numpy", "onnxruntime-gpu": "onnxruntime", "selectolax": "selectolax", "hyperscan": "hyperscan",
    "google-re2": "re2", "regex": "regex", "rich": "rich", "fastapi": "fastapi", "fastapi-offline": "fastapi_offline", "uvicorn": "uvicorn", "orjson": "orjson", "pydantic": "pydantic",
    "pydantic-settings": "pydantic_settings", "structlog": "structlog", "prometheus-client": "prometheus_client",
    "kafka-python": "kafka", "click": "click", "pyyaml": "yaml", "scikit-learn": "sklearn", "scipy": "scipy",
    "onnx": "onnx", "torch": "torch", "faust-streaming": "faust", "matplotlib": "matplotlib", "httpx": "httpx",
    "pytest": "pytest", "hypothesis": "hypothesis", "testcontainers": "testcontainers",
    "grafana-foundation-sdk": "grafana_foundation_sdk", "playwright": "playwright",
    "pytest-timeout": None, "schemathesis": None, "ruff": None, "mypy": None, "types-pyyaml": None,
    "pytest-xdist": None,  # `make test` runs the tests in parallel with it
    "check-jsonschema": None, "kubernetes-validate": None,  # commands run by tests/deploy/test_manifests.py
}


@pytest.mark.unit
def test_every_declared_dependency_is_used() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    names = {re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower() for req in declared} - {"flywheel"}
    assert names - USE.keys() == set(), "new dependencies: say in USE how each is used"
    imported: set[str] = set()
    for path in [*REPO.glob("models/**/*.py"), *REPO.glob("services/**/*.py"), *REPO.glob("streams/**/*.py"),
                 *REPO.glob("tests/**/*.py")]:
        imported |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z0-9_]+)", path.read_text(), re.MULTILINE))
    unused = sorted(f"{name} ({USE[name]})" for name in names if USE[name] and USE[name] not in imported)
    assert unused == [], f"declared in pyproject.toml but imported nowhere: {', '.join(unused)}"
