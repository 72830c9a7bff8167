"""Start `python -m server` as a child process and wait until it is ready (tests, benchmarks, load tests).

The child runs in its own process group on 127.0.0.1; `stop()` sends SIGTERM (the graceful drain) and
only kills the group if that does not end it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str | Path | None, *args: str, api_key: str | None = None, log_path: Path | None = None,
                 ready_timeout: float | None = 180):
        """Start the server; wait until it is ready unless `ready_timeout` is None."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "server", "--port", str(self.port), "--host", "127.0.0.1", *args]
        if model is not None:
            command += ["--model", str(model)]
        if api_key:
            command += ["--api-key", api_key]
        self.log_path = log_path or Path(os.devnull)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if ready_timeout is not None:
            self.wait_ready(ready_timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.log_text()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not ready in {timeout} s: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return "" if self.log_path == Path(os.devnull) else self.log_path.read_text()[-4000:]

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in /metrics: every label set, or those that have the labels written in
        `name` (`vllm:request_success_total{finished_reason="abort"}`)."""
        wanted_name, _, wanted = name.partition("{")
        wanted_labels = set(filter(None, wanted.rstrip("}").split(",")))
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            sample, _, value = line.rpartition(" ")
            metric, _, labels = sample.partition("{")
            if metric == wanted_name and wanted_labels <= set(labels.rstrip("}").split(",")):
                total += float(value)
        return total

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode
