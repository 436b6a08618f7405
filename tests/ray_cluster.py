"""A Ray cluster on this machine for the tests: its nodes (`ray start`, each with a temporary folder
of its own and a small object store), killed whole at the end, pass or fail. tests/test_ray.py
starts two nodes; the model-based test (tests/test_model_based.py) and tests/soak.py a head alone."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import wait_until

RAY = Path(sys.executable).with_name("ray")
# Usage statistics off (these machines reach no outside service), and no token: Ray 2.60's head
# writes one to ~/.ray/auth_token, and the test cluster is this machine's alone.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Node:
    """One `ray start --block` in a session of its own: killing its process group ends the node
    and every worker process it started."""

    def __init__(self, arguments: list[str], env: dict, within: tuple[str, ...] = ()) -> None:
        # Short: Ray's sockets live below it, and a Unix socket's path has at most 107 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.log = open(self.temp / "start.log", "w")  # noqa: SIM115 - closed by stop()
        command = [str(RAY), "start", *arguments, f"--temp-dir={self.temp}", "--num-cpus=2"]
        command += ["--object-store-memory=80000000", "--node-ip-address=127.0.0.1", "--block"]
        command += [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]
        self.process = subprocess.Popen(
            [*within, *command],
            env={**os.environ, **RAY_ENV, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def workers(self) -> list[int]:
        """The pids of the run's worker processes on this node (Ray titles them ray::Worker)."""
        return [pid for pid, title in self.processes() if title.startswith(b"ray::Worker")]

    def processes(self) -> list[tuple[int, bytes]]:
        """The processes the node's own started (its worker processes lead groups of their own)."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit():
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if os.getpgid(parent) == self.process.pid:
                        found.append((int(entry.name), (entry / "cmdline").read_bytes()))
            except (OSError, ValueError, IndexError):
                pass
        return found

    def stop(self) -> None:
        for pid, _ in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


def socket_answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def driver_env(address: str) -> dict:
    return {**os.environ, **RAY_ENV, "RAY_ADDRESS": address}


# The processes of a run's Ray actors on a node (Ray titles each by its class): the workers that
# prepare and send (ray::Worker, ray::Worker.caption while one sends) and the run's TurnJudge.
RUN_ACTORS = (b"ray::Worker", b"ray::TurnJudge")


class Head:
    """A cluster of one node, a head alone, started for the tests and ready to join: runs reach it
    with --ray ADDRESS (and RAY_ENV in their environment)."""

    def __init__(self) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        options = [f"--port={port}", f"--ray-client-server-port={free_port()}", "--include-dashboard=false"]
        # Unbuffered: its output is a file, where it would hold the line the node is waited for.
        self.node = Node(["--head", *options], {"PYTHONUNBUFFERED": "1"})
        try:
            # Said once its raylet has registered (ray/_private/node.py waits for that): joinable.
            wait_until(lambda: "Ray runtime started." in (self.node.temp / "start.log").read_text(), 150)
        except BaseException:
            self.node.stop()
            raise

    def run_actors(self) -> list[int]:
        """The pids of the processes of every run's actors still on the node."""
        return [pid for pid, title in self.node.processes() if title.startswith(RUN_ACTORS)]

    def stop(self) -> None:
        self.node.stop()
