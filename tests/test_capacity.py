"""The decode cache's plan: slots from the budget, windowed local layers, and a start-up that fails in one line."""

import subprocess
import sys

import pytest
import torch

from bench.bench_cache import ENWIK8_SHAPE
from bench.launcher import free_port
from model.config import ReformerConfig
from model.decode import Decoder
from server.capacity import GIB, CacheTooSmall, plan_cache
from server.settings import ServerSettings
from tests.server_harness import RunningServer, tiny_checkpoint

ENWIK8 = ReformerConfig(**ENWIK8_SHAPE)


def test_slots_and_blocks_follow_the_budget(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny")  # local, lsh, local, lsh; chunks of 16, one before; 2 x 16
    settings = ServerSettings(model=str(checkpoint), max_running=16, kv_cache_bytes=4 << 20, device="cpu")
    kv = 2 * 2 * 16 * 4  # heads x (key + value) x head size x fp32, per position
    slot = 2 * 32 * kv + 2 * 2 * 2 * 512 * 8  # local layers' rings of 32; LSH layers' bucket keys, 512 positions
    block = 2 * 256 * kv  # both LSH layers' keys and values for 256 positions
    plan = plan_cache(settings, settings.model_config())
    assert (plan.slot_bytes, plan.block_bytes, plan.block_size) == (slot, block, 256)
    # 16 slots, their spare and the scratch block leave room for 24 blocks: 12 requests of 512 tokens at once,
    # or 16 shorter ones (a slot per sequence alone would have held 12 of any length).
    assert plan.slots == 16 and plan.blocks == ((4 << 20) - 17 * slot) // block - 1 == 24
    assert plan.full_length_sequences == 12 and plan.total_bytes == 17 * slot + 25 * block <= 4 << 20
    assert plan.lsh_layer_bytes_per_token == kv + 2 * 2 * 8 and plan.local_layer_bytes_per_sequence == 32 * kv
    settings.kv_cache_bytes = 1 << 30
    plan = plan_cache(settings, settings.model_config())
    assert plan.slots == 16 and plan.blocks == 32  # never more than every slot at the full length needs


def test_a_budget_that_holds_no_request_names_what_fits(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    settings = ServerSettings(model=str(checkpoint), kv_cache_bytes=300_000, device="cpu")
    config = settings.model_config()
    with pytest.raises(CacheTooSmall) as refused:
        plan_cache(settings, config)
    message = str(refused.value)
    assert "\n" not in message and "--kv-cache-bytes" in message
    fits = int(message.split("--max-model-len ")[1].split()[0])
    assert plan_cache(ServerSettings(model=str(checkpoint), kv_cache_bytes=300_000, device="cpu",
                                     max_model_len=fits), config).slots == 1
    with pytest.raises(CacheTooSmall):
        plan_cache(ServerSettings(model=str(checkpoint), kv_cache_bytes=300_000, device="cpu",
                                  max_model_len=fits + config.padding_multiple), config)


def test_an_enwik8_shaped_model_fits_its_full_context_on_a_24_gb_machine():
    """A quarter of 24 GB, the CPU default: every layer at 65,536 positions needed 6.0 GiB a slot; the local
    layers' rings leave the three LSH layers' 1.6 GiB."""
    budget = 24 * 10**9 // 4
    every_position = 12 * 8 * 65536 * 2 * 128 * 4 + 3 * 8 * 4 * 65536 * 8
    assert every_position > budget / 2  # what the cache was: not one slot and its spare
    plan = plan_cache(ServerSettings(kv_cache_bytes=budget, device="cpu"), ENWIK8)
    assert plan.max_length == 65536 and plan.slots >= 1
    assert every_position / Decoder.bytes_per_slot(ENWIK8, 65536, torch.float32) > 3.5


def test_the_gpu_budget_leaves_room_for_the_weights(monkeypatch):
    monkeypatch.setattr(ServerSettings, "resolved_device", lambda self: "cuda")  # no GPU needed: free memory is given
    settings = ServerSettings(device="cuda")
    plan = plan_cache(settings, ENWIK8, free_gpu_bytes=40 * GIB)
    weights = 149_182_722 * 2  # fp16
    half = (40 * GIB - weights) // 2
    assert half - GIB // 4 < plan.budget_bytes <= half and plan.dtype == "float16"
    # a few MiB more or less free at the next start plan the same pool (the same ONNX graphs)
    for free in (40 * GIB - (3 << 20), 40 * GIB + (5 << 20)):
        assert plan_cache(settings, ENWIK8, free_gpu_bytes=free) == plan


def test_start_up_fails_in_one_line_when_no_request_fits():
    command = [sys.executable, "-m", "server", "--port", str(free_port()), "--kv-cache-bytes", str(20 << 20)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output
    lines = [line for line in output.splitlines() if "decode cache" in line]
    assert len(lines) == 1 and "--max-model-len" in lines[0] and "--kv-cache-bytes" in lines[0]


def test_choices_the_cache_could_never_hold_are_a_400_before_any_stream(tmp_path):
    """16 slots but 24 blocks (the plan above): 16 choices of 512 tokens need 32 blocks. The engine would
    refuse them, but only after a stream had answered 200; the API server knows the plan and says so first."""
    server = RunningServer(tiny_checkpoint(tmp_path / "tiny"), "--max-running", "16", "--kv-cache-bytes",
                           str(4 << 20), "--device", "cpu")
    try:
        with server.client() as client:
            payload = {"prompt": "abc", "n": 16, "max_tokens": 509, "stream": True}
            with client.stream("POST", "/v1/completions", json=payload) as refused:
                refused.read()
            fits = client.post("/v1/completions", json={**payload, "max_tokens": 20, "stream": False})
            too_many = client.post("/v1/completions", json={"prompt": "abc", "n": 17, "max_tokens": 1})
    finally:
        server.stop()
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and "32 cache blocks" in error["message"]
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 16  # 16 x 1 block
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] in ("n", "best_of")
