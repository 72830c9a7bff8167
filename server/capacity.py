"""The decode cache's size, decided once in the main process before anything starts: how many sequences of
`--max-model-len` tokens the budget holds, or one line that says why none does and which flag to change.

The worker builds its slot pool from this plan; /info and /metrics report it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from model.config import ReformerConfig
from model.blocks import blocks_for
from model.decode import BLOCK_SIZE, Decoder
from model.reformer import ReformerLM

from .settings import ServerSettings

GIB = 2**30


class CacheTooSmall(Exception):
    """Not even one request of the longest length fits: the message says what fits and which flag to change."""


@dataclass(frozen=True)
class CachePlan:
    slots: int  # sequences decoding at once, at most
    blocks: int  # cache blocks of the LSH layers, lent to each sequence for prompt + max_tokens (model.blocks)
    block_size: int
    max_length: int  # the longest prompt + completion
    dtype: str
    budget_bytes: int
    budget_source: str
    slot_bytes: int  # what a slot holds whatever its length: local layers' rings, LSH layers' bucket indexes
    block_bytes: int
    # What one layer of each kind costs: an LSH layer per position (keys, values, bucket keys), a local layer
    # per sequence (a ring of the window its step reads, whatever the length).
    lsh_layer_bytes_per_token: int
    local_layer_bytes_per_sequence: int

    @property
    def full_length_sequences(self) -> int:
        """Requests of `max_length` tokens that can decode at once."""
        if not self.block_bytes:
            return self.slots
        return min(self.slots, self.blocks // blocks_for(self.max_length, self.block_size))

    @property
    def total_bytes(self) -> int:
        # one spare slot pads CUDA-graph batches; block 0 is scratch
        return (self.slots + 1) * self.slot_bytes + (self.blocks + 1) * self.block_bytes

    def describe(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def serving_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def plan_cache(settings: ServerSettings, config: ReformerConfig, *, free_gpu_bytes: int | None = None) -> CachePlan:
    """`settings.max_running` slots and blocks enough for each to reach the longest length, or as many of
    both as the budget holds with room for at least one request of the longest length."""
    device = settings.resolved_device()
    dtype = serving_dtype(device)
    max_length = settings.max_context(config)
    budget, source = _budget(settings, config, device, dtype, free_gpu_bytes)
    slot_bytes = Decoder.slot_bytes(config, max_length, dtype)
    block_bytes = Decoder.block_bytes(config, BLOCK_SIZE, dtype)
    longest = blocks_for(max_length, BLOCK_SIZE) if block_bytes else 0  # the blocks of one longest request
    # Slots first (they are small), as many as asked for while one longest request's blocks still fit.
    slots = min(settings.max_running, (budget - (longest + 1) * block_bytes) // slot_bytes - 1)
    if slots < 1:
        fits = _longest_that_fits(config, dtype, budget)
        shorter = f"--max-model-len {fits} or less" if fits else "a smaller model"
        needed = _one_request_bytes(config, dtype, max_length)
        raise CacheTooSmall(
            f"the decode cache cannot hold one request of {max_length} tokens: that needs {needed / GIB:.2f} GiB "
            f"({_name(dtype)}; with the spare slot and scratch block) and the budget is {budget / GIB:.2f} GiB "
            f"({source}); pass {shorter}, or --kv-cache-bytes {needed} or more")
    blocks = 0
    if block_bytes:
        blocks = min(slots * longest, (budget - (slots + 1) * slot_bytes) // block_bytes - 1)
    return CachePlan(
        slots=slots, blocks=blocks, block_size=BLOCK_SIZE, max_length=max_length, dtype=_name(dtype),
        budget_bytes=budget, budget_source=source, slot_bytes=slot_bytes, block_bytes=block_bytes,
        lsh_layer_bytes_per_token=Decoder.layer_bytes(config, "lsh", 1, dtype),
        local_layer_bytes_per_sequence=Decoder.layer_bytes(config, "local", max_length, dtype))


def _one_request_bytes(config: ReformerConfig, dtype: torch.dtype, length: int) -> int:
    """A pool with one slot and the blocks of one request of `length` tokens (spare slot, scratch block)."""
    block_bytes = Decoder.block_bytes(config, BLOCK_SIZE, dtype)
    blocks = blocks_for(length, BLOCK_SIZE) if block_bytes else 0
    return 2 * Decoder.slot_bytes(config, length, dtype) + (blocks + 1) * block_bytes


def _budget(settings: ServerSettings, config: ReformerConfig, device: str, dtype: torch.dtype,
            free_gpu_bytes: int | None) -> tuple[int, str]:
    if settings.kv_cache_bytes is not None:
        return settings.kv_cache_bytes, "--kv-cache-bytes"
    if device.startswith("cuda"):
        free = free_gpu_bytes if free_gpu_bytes is not None else _free_gpu_bytes(device)
        weights = _parameter_count(config) * torch.empty((), dtype=dtype).element_size()
        half = max(0, free - weights) // 2
        # In whole quarter-GiB steps: the free memory differs by some MiB from start to start, and a pool of
        # other blocks needs other ONNX graphs (minutes of exporting, and replicas would disagree).
        return (half - half % STEP if half >= STEP else half), "half the GPU memory free beside the weights"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4, "a quarter of this machine's memory"


STEP = GIB // 4


def _free_gpu_bytes(device: str) -> int:
    """Asked from a short-lived process: a CUDA context in the server's main process would hold GPU memory
    for as long as the server runs."""
    index = torch.device(device).index or 0
    probe = f"import torch; print(torch.cuda.mem_get_info({index})[0])"
    return int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)


def _parameter_count(config: ReformerConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return ReformerLM(config).num_parameters()


def _longest_that_fits(config: ReformerConfig, dtype: torch.dtype, budget: int) -> int:
    """The longest context (a multiple of the padding, as the model pads) one request of which fits."""
    step = config.padding_multiple
    low, high = 0, config.max_positions // step
    while low < high:
        middle = (low + high + 1) // 2
        if _one_request_bytes(config, dtype, middle * step) <= budget:
            low = middle
        else:
            high = middle - 1
    return low * step


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
