"""A real Flower deployment on 127.0.0.1: one SuperLink, one SuperNode per partition, `flwr run`.

For trying a deployment on one machine, for tests and for measuring what a round costs. Every
process runs in its own process group and is stopped on exit, also after an error. The insecure
flags are used here only because everything listens on the loopback interface; outside a lab
use TLS and SuperNode authentication (see the README's "Beyond one machine").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .experiment import offline_environment

LOOPBACK = "127.0.0.1"
CONNECTION = "loopback"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class LoopbackDeployment:
    """``with LoopbackDeployment(folder, 4) as deployment: deployment.run(app_folder)``."""

    def __init__(self, folder: str | Path, num_supernodes: int, start_timeout: float = 60.0):
        self.folder = Path(folder)
        self.num_supernodes = num_supernodes
        self.start_timeout = start_timeout
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, object] = {}
        home = self.folder / "home"
        flwr_home = self.folder / "flwr-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        home.mkdir(exist_ok=True)
        (flwr_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "{LOOPBACK}:{self.port}"\ninsecure = true\n'
        )
        bin_dir = str(Path(sys.executable).parent)
        self.environment = {
            **os.environ,
            **offline_environment(flwr_home),
            "HOME": str(home),  # nothing may fall back to the user's ~/.flwr
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
        }

    # --- processes --------------------------------------------------------------------------

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self._logs[name] = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment,
            cwd=self.folder,
            start_new_session=True,  # its own process group, so its children stop with it
        )
        self.processes[name] = process
        return process

    def __enter__(self) -> LoopbackDeployment:
        try:
            self._start(
                "superlink",
                [
                    "flower-superlink",
                    "--insecure",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(self.port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            self._wait_for_port()
            for partition in range(self.num_supernodes):
                self.start_supernode(partition)
        except BaseException:
            self.stop()
            raise
        return self

    def start_supernode(self, partition: int) -> subprocess.Popen:
        return self._start(
            f"supernode-{partition}",
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"{LOOPBACK}:{self.port}",
                "--host",
                LOOPBACK,
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={partition} num-partitions={self.num_supernodes}",
            ],
        )

    def run(self, app: str | Path) -> subprocess.Popen:
        """``flwr run APP loopback --stream``, started (wait on the returned process)."""
        return self._start("flwr-run", ["flwr", "run", str(app), CONNECTION, "--stream"])

    def kill(self, partition: int) -> None:
        """SIGKILL a SuperNode and its ClientApp, as a crashed machine would vanish."""
        os.killpg(self.processes[f"supernode-{partition}"].pid, signal.SIGKILL)

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_for_port(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink exited:\n{self.log('superlink')[-2000:]}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the SuperLink did not listen on port {self.port} in time")

    def stop(self) -> None:
        """SIGTERM every process group (SuperNodes first), SIGKILL what is left after 15 s."""
        order = sorted(self.processes, key=lambda name: name == "superlink")
        for name in order:
            _signal(self.processes[name], signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name in order:
            process = self.processes[name]
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal(process, signal.SIGKILL)  # the group may hold children that outlived it
            process.wait()
            self._logs[name].close()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal(process: subprocess.Popen, signal_number: int) -> None:
    try:
        os.killpg(process.pid, signal_number)
    except ProcessLookupError:
        pass
