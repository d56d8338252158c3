"""``flywheel bench gpu``: the CUDA path of ONNX Runtime, checked and timed on the machine it runs on.

For a host with an NVIDIA GPU (``make setup`` with the ``gpu`` extra: onnxruntime-gpu and NVIDIA's CUDA runtime
wheels). Both served model families are exported to ONNX (the linear seed a fresh install ships, and a PyTorch
model trained on a corpus sample for this check), and each is opened twice, on the CPU provider and with CUDA
asked for first, exactly as serving opens it (:class:`models.runtime.OnnxModel`). Reported:

* what this machine offers: onnxruntime's version and providers, whether the CUDA driver and runtime wheels are
  there, and which provider each session really got (onnxruntime falls back to the CPU silently);
* **parity**: the largest difference between the CPU's and CUDA's logits on 1,024 corpus messages (target
  <= 1e-5; the verdicts are thresholds on these);
* **throughput** of the model alone (features computed once) at batches of 1, 64 and 1,024 rows, on each provider.

Without CUDA the command says why and exits 1 (``--cpu-ok`` reports the CPU figures and exits 0), so that a GPU
host that silently serves on the CPU is caught.
"""

from __future__ import annotations

import ctypes
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.features import FeatureBatch
    from services.settings import Settings

__all__ = ["BATCHES", "PARITY_BOUND", "run_gpu_bench"]

BATCHES = (1, 64, 1024)
PARITY_BOUND = 1e-5


def _say(msg: str) -> None:
    print(msg, flush=True)


def _throughput(model: Any, batch: FeatureBatch, rows: int, min_s: float = 0.5) -> float:
    """Rows per second scoring ``rows``-row slices of ``batch`` (repeated for at least ``min_s``)."""
    part = batch.take(np.arange(rows) % batch.rows)
    model.decision_function(part)  # first run: kernels, allocations
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s or n < 3:
        model.decision_function(part)
        n += 1
    return rows * n / elapsed


@dataclass(frozen=True, slots=True)
class _Sample:
    raw: bytes
    is_spam: bool


def _models(settings: Settings, work: Path, batch: FeatureBatch, labels: np.ndarray) -> dict[str, Path]:
    """ONNX files of both families: the shipped seed (linear) and a PyTorch model trained on the sample."""
    from models.features import FeatureConfig
    from models.neural import NeuralModel
    from models.registry import Registry
    from services.bench.harness import seed_registry

    reg_settings = settings.model_copy(update={"state_dir": work, "registry_dir": None})
    reg_settings.registry.mkdir(parents=True, exist_ok=True)
    seed_registry(reg_settings)
    registry = Registry(reg_settings.registry)
    champion = registry.champion()
    assert champion is not None
    neural = NeuralModel(FeatureConfig()).fit(batch, labels)
    return {"linear": registry.versions_dir / champion / "model.onnx",
            "neural": Path(neural.export_onnx(work / "neural.onnx"))}


def run_gpu_bench(settings: Settings, json_path: Path | None, *, cpu_ok: bool = False) -> dict[str, Any]:
    """Run the check (module docstring); returns its figures (also written to ``json_path``)."""
    import onnxruntime as ort

    from models.evaluate import prepare
    from models.features import FeatureConfig
    from models.rules import RuleEngine
    from models.runtime import CPU, CUDA, OnnxModel, available_providers, preload_cuda_libraries
    from services.bench.api import sample_corpus

    started = time.monotonic()
    try:
        ctypes.CDLL("libcuda.so.1")
        driver = True
    except OSError:
        driver = False
    result: dict[str, Any] = {"onnxruntime": ort.__version__, "providers_offered": available_providers(),
                              "cuda_driver": driver, "cuda_wheels_loaded": preload_cuda_libraries(),
                              "parity_bound": PARITY_BOUND, "batches": list(BATCHES)}
    _say(f"==> onnxruntime {ort.__version__}: providers {result['providers_offered']}; CUDA driver "
         f"{'found' if driver else 'not found'}")
    raws, labels = sample_corpus(settings, 1024, seed=1024)
    prep = prepare([_Sample(r, s) for r, s in zip(raws, labels, strict=True)], RuleEngine.default())
    batch = prep.batch(FeatureConfig())
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-gpu-") as tmp:
        paths = _models(settings, Path(tmp), batch, prep.labels)
        result["models"] = {}
        for kind, path in paths.items():
            cpu = OnnxModel(path, use_cuda=False)
            gpu = OnnxModel(path, use_cuda=True)
            row: dict[str, Any] = {"cpu_provider": cpu.provider, "cuda_provider": gpu.provider,
                                   "cuda_started": gpu.provider == CUDA}
            z_cpu = np.asarray(cpu.decision_function(batch), dtype=np.float64)
            z_gpu = np.asarray(gpu.decision_function(batch), dtype=np.float64)
            row["parity_max_abs_logit"] = float(np.max(np.abs(z_cpu - z_gpu)))
            row["parity_ok"] = row["parity_max_abs_logit"] <= PARITY_BOUND
            sessions = {"cpu": cpu, **({"cuda": gpu} if row["cuda_started"] else {})}
            row["msgs_per_s"] = {name: {str(b): round(_throughput(m, batch, b), 1) for b in BATCHES}
                                 for name, m in sessions.items()}
            result["models"][kind] = row
            _say(f"    {kind}: sessions on {cpu.provider} and {gpu.provider}; parity max |dlogit| "
                 f"{row['parity_max_abs_logit']:.2e}; msgs/s " + "; ".join(
                     f"{n} " + ", ".join(f"{b}: {v:,.0f}" for b, v in t.items()) for n, t in row["msgs_per_s"].items()))
    result["cuda_started"] = all(r["cuda_started"] for r in result["models"].values())
    result["parity_ok"] = all(r["parity_ok"] for r in result["models"].values())
    if not result["cuda_started"]:
        why = ("onnxruntime offers no CUDA provider (install the gpu extra: onnxruntime-gpu)"
               if CUDA not in result["providers_offered"] else
               "no CUDA driver (libcuda.so.1) on this machine" if not driver else
               "the CUDA provider did not start (see onnx_cuda_unavailable in the log)")
        result["cuda_missing_because"] = why
        _say(f"    CUDA not used: {why}; the sessions ran on {CPU}")
    result["wall_s"] = round(time.monotonic() - started, 1)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    if not result["cuda_started"] and not cpu_ok:
        raise SystemExit(f"CUDA was not used: {result['cuda_missing_because']} (--cpu-ok to accept the CPU)")
    if result["cuda_started"] and not result["parity_ok"]:
        raise SystemExit(f"CPU and CUDA disagree by more than {PARITY_BOUND:g} (see {json_path or 'the output'})")
    return result
