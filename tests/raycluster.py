"""A real Ray head on loopback for tests: ``ray start --head`` in the foreground, ended by pid.

``RayHead`` runs ``ray start --head --block`` as a child process with every port chosen free (so
it never meets another Ray on this machine), waits for the dashboard's job API, and on exit
ends exactly the processes it started. ``ray stop`` is not used: it stops every Ray of this
user on the machine, other tests' clusters included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence

import psutil

from tests.conftest import free_ports

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never upload these with --working-dir (the venv alone is gigabytes).
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    ".cache",
    "outputs",
    "runs",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
]


def ray_env() -> dict[str, str]:
    """This process's environment plus what Ray needs on loopback."""
    return {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def signal_all(procs: Sequence[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_gone(procs: Sequence[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    """Wait until each process has exited (a zombie counts: this container's init may never
    reap orphans, and psutil's own wait would then sit out its timeout); returns the living."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        still = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.NoSuchProcess:
                pass
        alive = still
        if alive:
            time.sleep(0.05)  # not our children: nothing to wait() on, so poll
    return alive


# every port of the head explicit and distinct: other tests may run their own Ray on this machine
RAY_HEAD_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


class RayHead:
    """``with RayHead(num_cpus=2) as head:`` -> ``head.gcs_address``, ``head.dashboard_url``."""

    def __init__(self, num_cpus: int = 2, start_timeout: float = 120.0) -> None:
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        # short: Ray's unix socket paths under it must stay below 108 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
        self.ports = dict(
            zip(RAY_HEAD_PORT_FLAGS, free_ports(len(RAY_HEAD_PORT_FLAGS)), strict=True)
        )
        self.port, self.dashboard_port = self.ports["--port"], self.ports["--dashboard-port"]
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")

    def __enter__(self) -> RayHead:
        cmd = [
            RAY, "start", "--head", "--block",
            "--num-cpus", str(self.num_cpus),
            "--dashboard-host", "127.0.0.1",
            "--include-dashboard", "true",
            "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1",
            "--object-store-memory", str(256 << 20),
            *(a for k, v in self.ports.items() for a in (k, str(v))),
        ]  # fmt: skip
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the job API answers (the head is usable), or fail with ray start's output."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read()).get("ray_version"):
                        return
            except OSError:
                pass
            time.sleep(0.2)  # polling a server coming up: there is nothing to wait on
        raise TimeoutError(f"Ray head not ready in {self.start_timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    def submit(
        self, entrypoint: Sequence[str], env_vars: dict[str, str], timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <repo>`` and wait for the job; returns its outcome."""
        runtime_env = {"env_vars": env_vars, "excludes": WORKING_DIR_EXCLUDES}
        cmd = [
            RAY, "job", "submit",
            "--address", self.dashboard_url,
            "--working-dir", ROOT,
            "--runtime-env-json", json.dumps(runtime_env),
            "--", *entrypoint,
        ]  # fmt: skip
        return subprocess.run(
            cmd, cwd=ROOT, env=ray_env(), capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        """End the head and every process it started (by pid), then remove its temp dir."""
        if self.proc is not None:
            try:
                procs = [psutil.Process(self.proc.pid)]
                procs += procs[0].children(recursive=True)
            except psutil.NoSuchProcess:
                procs = []
            signal_all(procs, signal.SIGTERM)
            signal_all(wait_gone(procs, timeout=3), signal.SIGKILL)
            wait_gone(procs, timeout=10)
            self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()
