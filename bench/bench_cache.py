"""Decode-cache memory: what one sequence holds, and how many sequences one budget serves.

    python -m bench.bench_cache

Computed from the decoder's own sizing (`Decoder.bytes_per_slot`, which allocates exactly that) for the
benchmark model and an enwik8-shaped model, beside what the cache held before local layers kept rings of
their window (every layer, every position). No device is needed: this is the arithmetic the server's
start-up plan (`server.capacity`) runs.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from bench import RESULTS
from bench.bench_core import BENCH_MODEL
from model.config import ReformerConfig
from model.decode import Decoder

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


def mixed_capacity(bytes_for, budget: int) -> int:
    """Sequences of the mix that fit: every slot spans the longest request (the pool reserves max length)."""
    longest = max(tokens for _, tokens in MIX)
    return budget // bytes_for(longest) - 1  # the spare slot


def measure() -> dict:
    models = {"benchmark model (6 layers, 3 local)": ReformerConfig.from_hf_dict(BENCH_MODEL),
              "enwik8 shape (12 layers, 9 local)": ReformerConfig(**ENWIK8_SHAPE)}
    rows = []
    for name, config in models.items():
        for dtype in (torch.float32, torch.float16):
            before = every_position_bytes(config, 65536, dtype)
            after = Decoder.bytes_per_slot(config, 65536, dtype)
            rows.append({
                "model": name, "dtype": str(dtype).removeprefix("torch."), "layers": list(config.attn_layers),
                "bytes_before": before, "bytes_after": after, "ratio": before / after,
                "mixed_sequences_before": mixed_capacity(lambda n: every_position_bytes(config, n, dtype), BUDGET),
                "mixed_sequences_after": mixed_capacity(lambda n: Decoder.bytes_per_slot(config, n, dtype), BUDGET),
            })
    return {"benchmark": "cache", "device_type": "any",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sequence_tokens": 65536, "budget_bytes": BUDGET, "mix": [list(m) for m in MIX], "rows": rows}


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m bench.bench_cache", description=__doc__.splitlines()[0]).parse_args(argv)
    result = measure()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cache.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(f"{row['model']}, {row['dtype']}: {row['bytes_before'] / 2**30:.2f} -> {row['bytes_after'] / 2**30:.2f} "
              f"GiB per 64K sequence ({row['ratio']:.2f}x)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
