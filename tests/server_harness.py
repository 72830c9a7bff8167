"""A real server for tests: `python -m server` in its own process group on 127.0.0.1, a tiny model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from model import ReformerConfig, ReformerLM, save_model

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"


def tiny_checkpoint(directory: Path, context: int = 512) -> Path:
    """A small byte-level model (random weights: the server tests check plumbing, not quality)."""
    config = ReformerConfig(
        vocab_size=258, hidden_size=32, num_attention_heads=2, attention_head_size=16,
        attn_layers=("local", "lsh", "local", "lsh"), feed_forward_size=64, lsh_attn_chunk_length=16,
        local_attn_chunk_length=16, num_buckets=4, num_hashes=2, axial_pos_shape=(16, context // 16),
        axial_pos_embds_dim=(16, 16), max_position_embeddings=context, eos_token_id=None)
    torch.manual_seed(1234)
    save_model(ReformerLM(config).eval(), directory)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, model: Path, *args: str, api_key: str | None = API_KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "server", "--model", str(model), "--port", str(self.port),
                   "--host", "127.0.0.1", "--log-level", "warning", *args]
        if api_key:
            command += ["--api-key", api_key]
        self.log = open(model.parent / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.wait_ready()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def wait_ready(self, timeout: float = 120) -> None:
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
        raise RuntimeError(f"the server was not ready in {timeout} s: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def metric(self, name: str) -> float:
        """Sum of a metric's samples in /metrics (all label sets)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the drain path); a process group kill only if that fails."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode
