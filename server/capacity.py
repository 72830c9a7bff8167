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
from model.decode import Decoder
from model.reformer import ReformerLM

from .settings import ServerSettings

GIB = 2**30


class CacheTooSmall(Exception):
    """Not even one request of the longest length fits: the message says what fits and which flag to change."""


@dataclass(frozen=True)
class CachePlan:
    slots: int  # sequences decoding at once
    max_length: int  # positions each holds (prompt + completion)
    dtype: str
    budget_bytes: int
    budget_source: str
    bytes_per_slot: int
    # What one layer of each kind costs: an LSH layer per position (keys, values, bucket keys), a local layer
    # per sequence (a ring of the window its step reads, whatever the length).
    lsh_layer_bytes_per_token: int
    local_layer_bytes_per_sequence: int

    @property
    def total_bytes(self) -> int:
        return (self.slots + 1) * self.bytes_per_slot  # one spare slot pads CUDA-graph batches

    def describe(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def serving_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def plan_cache(settings: ServerSettings, config: ReformerConfig, *, free_gpu_bytes: int | None = None) -> CachePlan:
    """Slots for `settings.max_running` sequences of the longest length, or as many as the budget holds."""
    device = settings.resolved_device()
    dtype = serving_dtype(device)
    max_length = settings.max_context(config)
    budget, source = _budget(settings, config, device, dtype, free_gpu_bytes)
    per_slot = Decoder.bytes_per_slot(config, max_length, dtype)
    slots = min(settings.max_running, budget // per_slot - 1)
    if slots < 1:
        fits = _longest_that_fits(config, dtype, budget)
        shorter = f"--max-model-len {fits} or less" if fits else "a smaller model"
        raise CacheTooSmall(
            f"the decode cache cannot hold one request of {max_length} tokens: that needs {2 * per_slot / GIB:.2f} "
            f"GiB ({_name(dtype)}; its slot and the spare one) and the budget is {budget / GIB:.2f} GiB ({source}); "
            f"pass {shorter}, or --kv-cache-bytes {2 * per_slot} or more")
    return CachePlan(
        slots=slots, max_length=max_length, dtype=_name(dtype), budget_bytes=budget, budget_source=source,
        bytes_per_slot=per_slot, lsh_layer_bytes_per_token=Decoder.layer_bytes(config, "lsh", 1, dtype),
        local_layer_bytes_per_sequence=Decoder.layer_bytes(config, "local", max_length, dtype))


def _budget(settings: ServerSettings, config: ReformerConfig, device: str, dtype: torch.dtype,
            free_gpu_bytes: int | None) -> tuple[int, str]:
    if settings.kv_cache_bytes is not None:
        return settings.kv_cache_bytes, "--kv-cache-bytes"
    if device.startswith("cuda"):
        free = free_gpu_bytes if free_gpu_bytes is not None else _free_gpu_bytes(device)
        weights = _parameter_count(config) * torch.empty((), dtype=dtype).element_size()
        return max(0, free - weights) // 2, "half the GPU memory free beside the weights"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4, "a quarter of this machine's memory"


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
    """The longest context (a multiple of the padding, as the model pads) with one slot and the spare."""
    step = config.padding_multiple
    low, high = 0, config.max_positions // step
    while low < high:
        middle = (low + high + 1) // 2
        if 2 * Decoder.bytes_per_slot(config, middle * step, dtype) <= budget:
            low = middle
        else:
            high = middle - 1
    return low * step


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
