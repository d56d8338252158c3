"""Schema-driven fuzzing: schemathesis generates requests from the served OpenAPI spec (valid and invalid
bodies, parameters, headers, with and without credentials) against a running API; no answer may be a 5xx."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.bench.api_process import ApiProcess
from services.local.daemon import free_port
from services.settings import REPO_ROOT, Settings


@pytest.fixture(scope="module")
def fuzz_api(kafka: Settings, corpus: list, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    from services.bench.api import train_quick_version

    s = kafka.model_copy(update={
        "state_dir": tmp_path_factory.mktemp("fuzz-state"), "downloads_dir": kafka.downloads,
        "api_port": free_port(), "spamd_port": free_port(), "workers": 1, "client_timeout_s": 5.0,
        "api_keys": {"fuzz-admin-key": "admin"}, "admin_identities": ["admin"], "max_message_bytes": 512 * 1024,
    })
    import random

    sub = random.Random(9).sample(corpus, 600)
    train_quick_version(s.registry, [m.raw for m in sub], [m.is_spam for m in sub], seed=3, promote=True)
    with ApiProcess(s, tmp_path_factory.mktemp("fuzz-logs") / "api.log").start() as proc:
        yield proc


@pytest.mark.integration
def test_openapi_fuzz_finds_no_server_error(fuzz_api: ApiProcess, tmp_path: Path) -> None:
    spec = httpx.get(fuzz_api.base_url + "/openapi.json", timeout=10).json()
    assert {"/classify", "/classify/batch", "/feedback", "/models", "/rules"} <= set(spec["paths"])
    junit = tmp_path / "junit.xml"
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")), "run", fuzz_api.base_url + "/openapi.json",
        "--checks", "not_a_server_error",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "25",
        "--seed", "20261123",
        "--request-timeout", "30",
        "--header", "X-API-Key: fuzz-admin-key",
        "--report", "junit", "--report-junit-path", str(junit),
    ]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    summary = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, summary
    report = junit.read_text()
    assert "testcase" in report and "/classify" in report, report[:2000]
    # The server logged no unhandled exception while being fuzzed.
    assert "Traceback" not in fuzz_api.tail(5000), fuzz_api.tail(200)
