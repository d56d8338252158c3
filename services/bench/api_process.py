"""Running a real API server in a subprocess (used by the API tests and ``flywheel bench api``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.local.daemon import Child
from services.settings import REPO_ROOT, Settings


class ApiProcess:
    """``python -m services.api`` (the ``flywheel serve`` code path) with ``settings`` passed as FLYWHEEL_* env."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.child = Child("api", [sys.executable, "-m", "services.api"], settings.api_port, logfile=log_path,
                           cwd=REPO_ROOT)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def start(self, timeout_s: float = 180.0) -> ApiProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.child.start({**env, **self.settings.child_env(), **self.extra_env})
        self.wait_ready(timeout_s)
        return self

    def ready_workers(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("api worker ready")
        except FileNotFoundError:
            return 0

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        want = max(1, self.settings.workers)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}; log:\n{self.tail()}")
            if self.ready_workers() >= want:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.base_url + "/healthz", timeout=2.0).status_code == 200:
                        return
            time.sleep(0.2)
        raise RuntimeError(f"API not ready within {timeout_s}s; log:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return self.child.log_tail(n)

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes (children of the server) that are alive."""
        if self.proc is None:
            return []
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes()
                if int(fields[1]) == self.proc.pid and b"resource_tracker" not in cmd and fields[0] != "Z":
                    out.append(int(entry.name))
        return out or [self.proc.pid]

    def stop(self) -> None:
        self.child.stop()

    def __enter__(self) -> ApiProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
