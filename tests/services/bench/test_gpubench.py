"""`flywheel bench gpu`: both model families opened on the CPU and with CUDA asked for, as serving opens them; here
(no GPU) it must say that CUDA was not used and why, and refuse to pass unless told the CPU is fine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.settings import Settings

pytestmark = pytest.mark.integration


def test_both_families_are_checked_on_every_provider_offered(settings: Settings, tmp_path: Path) -> None:
    from services.bench.gpu import BATCHES, run_gpu_bench

    out = tmp_path / "gpu.json"
    raised = None
    try:
        run_gpu_bench(settings.model_copy(update={"state_dir": tmp_path}), out)
    except SystemExit as exc:  # the figures are written before it refuses
        raised = str(exc)
    r = json.loads(out.read_text())
    assert set(r["models"]) == {"linear", "neural"}
    for row in r["models"].values():
        assert row["cpu_provider"] == "CPUExecutionProvider"
        assert set(row["msgs_per_s"]["cpu"]) == {str(b) for b in BATCHES}
        assert all(v > 0 for v in row["msgs_per_s"]["cpu"].values())
        assert row["parity_ok"] == (row["parity_max_abs_logit"] <= 1e-5)
        if not row["cuda_started"]:  # the same provider twice: the same logits
            assert row["parity_max_abs_logit"] == 0.0 and "cuda" not in row["msgs_per_s"]
    if r["cuda_started"]:
        assert raised is None and r["parity_ok"]
    else:
        assert raised is not None and "CUDA was not used" in raised and r["cuda_missing_because"] in raised
