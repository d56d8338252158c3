"""Serving a learned model: one onnxruntime session over an exported graph (never imports torch).

The CUDA provider is asked for first when this onnxruntime build lists it; whether the session really got it is
read back from ``session.get_providers()`` (onnxruntime-gpu silently falls back to the CPU when the CUDA
libraries are missing). The fallback is reported once per process in Flywheel's own log, and onnxruntime's own
``[E:onnxruntime]`` complaint about the missing CUDA libraries is silenced by raising its log severity before any
session exists. Sessions default to one intra-op thread: a one-message call is a few dozen microseconds of
work, where extra threads only add wake-up latency (and the API runs several processes anyway).

The CUDA runtime the ``gpu`` extra installs (NVIDIA's pip wheels: cuBLAS, cudart, cuRAND, cuFFT, cuDNN) lands under
``site-packages/nvidia/``, on no loader path, so the CUDA provider would find none of it; before the first CUDA
session :func:`preload_cuda_libraries` loads it by absolute path (``onnxruntime.preload_dlls()``), after which the
provider's lookups by name resolve to those copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from models.features import FeatureBatch

__all__ = ["CPU", "CUDA", "OnnxModel", "available_providers", "preload_cuda_libraries"]

log = structlog.get_logger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_fallback_reported = False
_lock = threading.Lock()
_cuda_preloaded = False
_preload_lock = threading.Lock()
# Severity 3 keeps onnxruntime's errors visible in general; while a session is being created it is raised to 4
# (fatal only), because the CUDA provider's failure to load libcublasLt is logged at ERROR and then handled.
_ORT_SEVERITY = 3
ort.set_default_logger_severity(_ORT_SEVERITY)


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (not necessarily usable on this machine)."""
    return list(ort.get_available_providers())


def _nvidia_wheel_dir() -> Path | None:
    """``site-packages/nvidia`` when NVIDIA's CUDA runtime wheels are installed beside onnxruntime, else None.

    The same place ``onnxruntime.preload_dlls()`` looks (relative to the onnxruntime package)."""
    d = Path(ort.__file__).resolve().parent.parent / "nvidia"
    return d if d.is_dir() else None


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def preload_cuda_libraries(*, need_driver: bool = True) -> bool:
    """Load the CUDA runtime libraries of the ``gpu`` extra so the CUDA provider can start; True when it ran.

    Free where it cannot help, so a CPU-only host or build pays nothing but a failed ``dlopen``: skipped when this
    onnxruntime offers no CUDA provider, when no NVIDIA wheels are installed (a system CUDA is then on the loader
    path, or there is none) and, unless ``need_driver`` is False, when the driver ``libcuda.so.1`` is missing
    (only a GPU host has it, and without it the provider cannot start anyway). Loads at most once per process.
    ``onnxruntime.preload_dlls()`` reports a library it cannot load with ``print``; that goes to the debug log
    instead of stdout, and a provider that still cannot start is reported by ``onnx_cuda_unavailable``.
    """
    global _cuda_preloaded
    with _preload_lock:
        if _cuda_preloaded:
            return True
        preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
        if (
            preload is None
            or CUDA not in ort.get_available_providers()
            or _nvidia_wheel_dir() is None
            or (need_driver and not _driver_present())
        ):
            return False
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            preload()
        log.debug("onnx_cuda_libraries_preloaded", said=said.getvalue().strip() or None)
        _cuda_preloaded = True
        return True


def _report_fallback(path: Path, got: str) -> None:
    global _fallback_reported
    if _fallback_reported:
        return
    _fallback_reported = True
    log.warning("onnx_cuda_unavailable", provider=got, model=str(path), reason="CUDA provider could not start")


class OnnxModel:
    """An exported Flywheel model (linear or neural): FeatureBatch in, spam probability per row out."""

    def __init__(self, path: Path | str, *, use_cuda: bool = True, intra_op_threads: int = 1) -> None:
        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(intra_op_threads))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = _ORT_SEVERITY
        wanted = [CUDA, CPU] if use_cuda and CUDA in ort.get_available_providers() else [CPU]
        if CUDA in wanted:
            preload_cuda_libraries()
        with _lock:
            ort.set_default_logger_severity(4)
            try:
                self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
            finally:
                ort.set_default_logger_severity(_ORT_SEVERITY)
        got = self.session.get_providers()
        self.provider: str = got[0] if got else CPU
        if CUDA in wanted and self.provider != CUDA:
            _report_fallback(self.path, self.provider)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.kind: str = meta.get("kind", "unknown")
        self.metadata: dict[str, str] = dict(meta)
        self._outputs = [o.name for o in self.session.get_outputs()]

    def run(self, batch: FeatureBatch) -> dict[str, np.ndarray]:
        """Every graph output by name (``prob``, ``logit``) for ``batch``."""
        if batch.rows == 0:
            return {name: np.zeros(0, dtype=np.float32) for name in self._outputs}
        outs = self.session.run(None, batch.onnx_inputs())
        return dict(zip(self._outputs, outs, strict=True))

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        """Spam probability per row, float32[rows]."""
        if batch.rows == 0:
            return np.zeros(0, dtype=np.float32)
        return self.session.run(["prob"], batch.onnx_inputs())[0]

    def decision_function(self, batch: FeatureBatch) -> np.ndarray:
        """Logit per row (unsaturated, so ranking survives where probabilities round to 1.0)."""
        if batch.rows == 0:
            return np.zeros(0, dtype=np.float32)
        return self.session.run(["logit"], batch.onnx_inputs())[0]
