"""The worker image's lease (deploy/worker/flywheel-worker-leased and flywheel-worker-health), run as the image runs
them: two copies on one state directory. The first runs the worker; the second is the standby, which answers
``flywheel_worker_standby 1`` on the worker's port and is healthy while it waits; SIGKILL the active one and the
standby's worker starts. The ``flywheel`` they start is a stand-in that records its start and sleeps (the real
worker needs Kafka and minutes of model loading, and what is tested here is the lease, not the worker).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_ports

from services.local.daemon import port_open, wait_until
from services.settings import REPO_ROOT

SCRIPTS = REPO_ROOT / "deploy" / "worker"
TAKEOVER_DEADLINE_S = 10.0

FAKE_WORKER = """#!/bin/sh
# stands in for the real CLI: `flywheel worker` records which container runs it, then holds the lease by sleeping
echo "$CONTAINER" >> "$STARTS"
exec sleep 600
"""


@pytest.fixture
def box(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of one container of the worker image, less the container: PATH with the stand-in first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flywheel"
    fake.write_text(FAKE_WORKER)
    fake.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{SCRIPTS}:{os.environ['PATH']}",
        "FLYWHEEL_STATE_DIR": str(state),
        "FLYWHEEL_WORKER_HOST": "127.0.0.1",
        "FLYWHEEL_WORKER_PORT": str(port),
        "STARTS": str(tmp_path / "starts"),
    }
    yield env


def start(env: dict[str, str], name: str, tmp: Path) -> subprocess.Popen[bytes]:
    """One container: its own TMPDIR (the standby marker is per container), its own process group."""
    own_tmp = tmp / f"tmp-{name}"
    own_tmp.mkdir()
    with open(tmp / f"{name}.err", "wb") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            ["sh", str(SCRIPTS / "flywheel-worker-leased")],
            env={**env, "TMPDIR": str(own_tmp), "CONTAINER": name},
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )


def healthy(env: dict[str, str], name: str, tmp: Path) -> bool:
    out = subprocess.run(["sh", str(SCRIPTS / "flywheel-worker-health")], env={**env, "TMPDIR": str(tmp / f"tmp-{name}")},
                         capture_output=True, timeout=30, check=False)
    return out.returncode == 0


def starts(env: dict[str, str]) -> list[str]:
    path = Path(env["STARTS"])
    return path.read_text().split() if path.exists() else []


@pytest.mark.integration
def test_the_standby_takes_over_when_the_active_worker_is_killed(box: dict[str, str], tmp_path: Path) -> None:
    port = int(box["FLYWHEEL_WORKER_PORT"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        active = start(box, "active", tmp_path)
        procs.append(active)
        wait_until(lambda: starts(box) == ["active"], 10, "the first worker to take the lease")
        # the stand-in serves no metrics page and holds no standby marker: the probe must call that unhealthy
        # (checked before the standby's page takes the port, which in containers each would have for itself)
        assert not healthy(box, "active", tmp_path)

        standby = start(box, "standby", tmp_path)
        procs.append(standby)
        page = wait_until(lambda: port_open(port) and urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=2).read(), 10, "the standby's page")
        assert b"flywheel_worker_standby 1" in page
        assert healthy(box, "standby", tmp_path)
        assert standby.poll() is None and starts(box) == ["active"]  # the standby waits, its worker not started

        killed_at = time.monotonic()
        os.killpg(active.pid, signal.SIGKILL)
        active.wait(timeout=10)
        wait_until(lambda: starts(box) == ["active", "standby"], TAKEOVER_DEADLINE_S, "the standby's worker to start")
        took_s = time.monotonic() - killed_at
        wait_until(lambda: not port_open(port), 5, "the standby's page to close once it runs the worker")
        err = (tmp_path / "standby.err").read_text()
        assert "worker standby" in err and "worker lease taken" in err
        assert took_s < TAKEOVER_DEADLINE_S
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
