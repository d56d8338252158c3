"""Serving an exported model: no torch, the provider reported, the CUDA fallback quiet and logged once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from structlog.testing import capture_logs

import models.runtime as runtime
from models.features import FeatureBatch, FeatureConfig
from models.linear import LinearModel
from models.runtime import CPU, CUDA, OnnxModel

REPO = Path(__file__).resolve().parents[2]


def _tiny_model(tmp_path: Path) -> Path:
    cfg = FeatureConfig(n_buckets=1 << 10)
    model = LinearModel(cfg)
    batch = FeatureBatch(
        ids=np.array([1, 2, 3, 4], dtype=np.int64),
        vals=np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32),
        seg=np.array([0, 0, 1, 1], dtype=np.int64),
        rows=2,
    )
    for _ in range(20):
        model.partial_fit(batch, [1, 0])
    return model.export_onnx(tmp_path / "tiny.onnx")


@pytest.mark.unit
def test_import_does_not_pull_torch() -> None:
    code = "import models.runtime, models.features, models.linear, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.unit
def test_provider_reported_and_predicts(tmp_path: Path) -> None:
    model = OnnxModel(_tiny_model(tmp_path))
    assert model.provider in (CUDA, CPU)
    assert model.provider == model.session.get_providers()[0]
    batch = FeatureBatch(
        ids=np.array([1, 2, 3, 4, 9], dtype=np.int64),
        vals=np.array([0.7, 0.7, 0.7, 0.7, 1.0], dtype=np.float32),
        seg=np.array([0, 0, 1, 1, 2], dtype=np.int64),
        rows=3,
    )
    p = model.predict_proba(batch)
    assert p.dtype == np.float32 and p.shape == (3,)
    assert p[0] > 0.5 > p[1]
    assert model.predict_proba(FeatureBatch(batch.ids[:0], batch.vals[:0], batch.seg[:0], 0)).shape == (0,)
    out = model.run(batch)
    np.testing.assert_allclose(out["prob"], 1.0 / (1.0 + np.exp(-out["logit"])), atol=1e-6)
    cpu = OnnxModel(model.path, use_cuda=False)
    assert cpu.provider == CPU
    np.testing.assert_allclose(cpu.predict_proba(batch), p, atol=1e-6)


@pytest.mark.unit
def test_cuda_fallback_logged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build offers no CUDA provider, so there is nothing to fall back from")
    path = _tiny_model(tmp_path)
    monkeypatch.setattr(runtime, "_fallback_reported", False)
    with capture_logs() as logs:
        first = OnnxModel(path)
        OnnxModel(path)
    events = [e for e in logs if e["event"] == "onnx_cuda_unavailable"]
    if first.provider == CUDA:
        assert events == []
    else:
        assert len(events) == 1 and events[0]["provider"] == CPU


_CHILD = """
import sys
from models.runtime import OnnxModel
m = OnnxModel(sys.argv[1])
print("PROVIDER", m.provider)
"""


@pytest.mark.unit
def test_onnxruntime_noise_suppressed(tmp_path: Path) -> None:
    path = _tiny_model(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert "PROVIDER" in proc.stdout
    assert "[E:onnxruntime" not in proc.stderr + proc.stdout
    assert "libcublasLt" not in proc.stderr + proc.stdout
