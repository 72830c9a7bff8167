"""Decode-cache memory: what one sequence holds, and how many sequences one budget serves.

    python -m bench.bench_cache

Computed from the decoder's own sizing (`Decoder.slot_bytes` and `block_bytes`, which it allocates exactly;
tests/test_decode_parity.py checks) for the benchmark model and an enwik8-shaped model, in three stages:
every layer caching every position with a slot reserving the longest length (before); local layers keeping
rings of their window; and LSH layers' positions in blocks lent for what each request needs. No device is
needed: this is the arithmetic the server's start-up plan (`server.capacity`) runs.

`--baseline REV` also times decode steps at a full pool (16 sequences of 4K tokens, the benchmark model) with
this tree and with REV (checked out in a temporary git worktree), alternating in one run: what the block
table's extra lookup costs a step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import torch

from bench import RESULTS, ROOT
from bench.bench_core import BENCH_MODEL
from model.config import ReformerConfig
from model.blocks import blocks_for
from model.decode import BLOCK_SIZE, Decoder

# google/reformer-enwik8's shape (../shared/docs/reformer-reference.md, section 7): 9 local and 3 LSH layers.
ENWIK8_SHAPE = dict(
    vocab_size=258, hidden_size=1024, num_attention_heads=8, attention_head_size=128, feed_forward_size=4096,
    attn_layers=("local", "local", "lsh", "local", "local", "local", "lsh", "local", "local", "local", "lsh", "local"),
    lsh_attn_chunk_length=256, local_attn_chunk_length=128, lsh_num_chunks_before=1, local_num_chunks_before=1,
    num_buckets=512, num_hashes=4, axial_pos_shape=(128, 512), axial_pos_embds_dim=(256, 768),
    max_position_embeddings=65536)
BUDGET = 16 * 2**30
MIX = ((0.9, 1024), (0.1, 65536))  # share of requests, tokens each


def every_position_bytes(config: ReformerConfig, length: int, dtype: torch.dtype) -> int:
    """The cache before: keys and values of every layer at every position, plus the LSH bucket indexes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    heads = config.num_attention_heads
    kv = config.num_layers * heads * length * 2 * config.attention_head_size * itemsize
    return kv + config.attn_layers.count("lsh") * heads * config.num_hashes * length * 8


def reserved_capacity(bytes_for, budget: int) -> int:
    """Sequences of the mix that fit when every slot reserves the longest request."""
    longest = max(tokens for _, tokens in MIX)
    return budget // bytes_for(longest) - 1  # the spare slot


def lent_capacity(config: ReformerConfig, dtype: torch.dtype, budget: int) -> tuple[int, int]:
    """(sequences of the mix that fit, slots for them) when each borrows blocks for its own length: the
    slot count that serves the most, each slot costing its rings and bucket indexes."""
    longest = max(tokens for _, tokens in MIX)
    slot, block = Decoder.slot_bytes(config, longest, dtype), Decoder.block_bytes(config, BLOCK_SIZE, dtype)
    per_sequence = sum(share * blocks_for(tokens, BLOCK_SIZE) for share, tokens in MIX)  # blocks, on average
    best = (0, 0)
    for slots in range(1, budget // slot):
        blocks = (budget - (slots + 1) * slot) // block - 1
        best = max(best, (min(slots, int(blocks / per_sequence)), slots))
    return best


def measure() -> dict:
    models = {"benchmark model (6 layers, 3 local)": ReformerConfig.from_hf_dict(BENCH_MODEL),
              "enwik8 shape (12 layers, 9 local)": ReformerConfig(**ENWIK8_SHAPE)}
    rows = []
    for name, config in models.items():
        for dtype in (torch.float32, torch.float16):
            before = every_position_bytes(config, 65536, dtype)
            after = Decoder.bytes_per_slot(config, 65536, dtype)
            lent, slots = lent_capacity(config, dtype, BUDGET)
            rows.append({
                "model": name, "dtype": str(dtype).removeprefix("torch."), "layers": list(config.attn_layers),
                "bytes_before": before, "bytes_after": after, "ratio": before / after,
                "mixed_sequences_before": reserved_capacity(lambda n: every_position_bytes(config, n, dtype), BUDGET),
                "mixed_sequences_rings": reserved_capacity(lambda n: Decoder.bytes_per_slot(config, n, dtype), BUDGET),
                "mixed_sequences_blocks": lent, "mixed_slots_blocks": slots,
            })
    return {"benchmark": "cache", "device_type": "any",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sequence_tokens": 65536, "budget_bytes": BUDGET, "block_size": BLOCK_SIZE, "mix": [list(m) for m in MIX],
            "rows": rows}


# Runs in a fresh interpreter on either tree (only APIs both have): median ms of a decode step at a full pool.
TIME_STEPS = """
import json, statistics, sys, time, torch
from bench.bench_core import BENCH_MODEL, prompt
from model.config import ReformerConfig
from model.decode import Decoder
from model.reformer import ReformerLM
batch, context, steps = map(int, sys.argv[1:4])
torch.manual_seed(0)
model = ReformerLM(ReformerConfig.from_hf_dict(BENCH_MODEL)).eval()
decoder = Decoder(model, num_slots=batch, max_length=context + steps + 8)
slots = [decoder.allocate() for _ in range(batch)]
decoder.prefill([(slots[0], prompt(context))])
for slot in slots[1:]:
    decoder.copy_slot(slots[0], slot)
times = []
for token in prompt(steps + 3, seed=1):
    started = time.perf_counter()
    decoder.step(slots, [token] * batch)
    times.append(time.perf_counter() - started)
print(json.dumps(statistics.median(times[3:]) * 1000))
"""
STEP_POOL = (16, 4096, 24)  # sequences, context, timed steps


def time_steps(tree: str, rounds: int = 3) -> list[float]:
    command = [sys.executable, "-c", TIME_STEPS, *map(str, STEP_POOL)]
    env = dict(os.environ, PYTHONPATH=tree)
    return [float(subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True).stdout)
            for _ in range(rounds)]


def compare_steps(baseline: str) -> dict:
    """Step times of this tree and of `baseline` (a git revision), alternating, three rounds each."""
    with tempfile.TemporaryDirectory() as folder:
        tree = os.path.join(folder, "baseline")
        subprocess.run(["git", "worktree", "add", "--detach", tree, baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            ours, theirs = [], []
            for _ in range(3):
                ours += time_steps(str(ROOT), 1)
                theirs += time_steps(tree, 1)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT, check=True, capture_output=True)
    revision = subprocess.run(["git", "rev-parse", "--short", baseline], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    return {"baseline": revision, "sequences": STEP_POOL[0], "context": STEP_POOL[1],
            "device": f"CPU ({os.cpu_count()} cores)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "ours_ms": sorted(ours)[1], "baseline_ms": sorted(theirs)[1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="also time decode steps against this git revision")
    args = parser.parse_args(argv)
    result = measure()
    if args.baseline:
        result["steps"] = compare_steps(args.baseline)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cache.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(f"{row['model']}, {row['dtype']}: {row['bytes_before'] / 2**30:.2f} -> {row['bytes_after'] / 2**30:.2f} "
              f"GiB per 64K sequence ({row['ratio']:.2f}x)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
