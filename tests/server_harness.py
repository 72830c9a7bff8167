"""A real server for tests: `python -m server` on 127.0.0.1 with a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model import ReformerConfig, ReformerLM, save_model
from bench.launcher import ServerProcess

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


def server_processes(server: ServerProcess) -> dict[int, str]:
    """pid -> command line of every live process in the server's process group."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != server.process.pid:
                continue
            state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
            command = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except (OSError, ProcessLookupError):
            continue
        if state != "Z":
            found[int(entry)] = command
    return found


def engine_pid(server: ServerProcess) -> int | None:
    """The engine worker: the process LitServe spawned (the resource tracker is spawned too, but differently)."""
    workers = [pid for pid, command in server_processes(server).items() if "spawn_main" in command]
    return workers[0] if len(workers) == 1 else None


def http_pids(server: ServerProcess) -> list[int]:
    """The HTTP (uvicorn) processes: forked from the main process after its manager, so they run its command
    line and started last."""
    main = server.process.pid
    command = open(f"/proc/{main}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    forked = []
    for pid, line in server_processes(server).items():
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        if pid != main and line == command and int(stat[1]) == main:  # stat[1]: the parent
            forked.append((int(stat[19]), pid))  # stat[19]: start time
    return [pid for _, pid in sorted(forked)[1:]]  # the first is LitServe's manager


class RunningServer(ServerProcess):
    """The server with the tests' API key (unless told otherwise) and its log beside the model."""

    def __init__(self, model: Path, *args: str, api_key: str | None = API_KEY, ready_timeout: float | None = 180):
        super().__init__(model, "--log-level", "warning", *args, api_key=api_key,  # args may set another level
                         log_path=model.parent / f"server-{model.name}.log", ready_timeout=ready_timeout)
