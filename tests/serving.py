"""Running a real `parrot-edge serve` process on a free loopback port, for the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from parrot_edge.bench.serving import free_port

PARROT_EDGE = [sys.executable, "-m", "parrot_edge"]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None,
               host: str = "127.0.0.1", wait: bool = True, timeout: float = 90):
    port = port or free_port()
    log_path = tmp_path / f"server-{port}.log"
    full_env = {**os.environ, "PARROT_EDGE_DATA_DIR": str(tmp_path / "data"), **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([*PARROT_EDGE, "serve", "--host", host, "--port", str(port), *args],
                                   stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        if wait:
            wait_healthy(server, timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Wait for a state (never for a time): the bound is only there to turn a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def wait_healthy(server: RunningServer, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"server not healthy after {timeout}s:\n{server.log()}")
