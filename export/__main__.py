"""python -m export --model DIR --out DIR [--slots 16] [--max-length N] [--tail-capacity 64] [--cache-blocks N]
[--dtype float32]

The graphs serve one slot pool: a server started with `--backend onnx --onnx-dir DIR` uses them when its own
plan (`/info`'s cache: slots, max_length, blocks) and dtype (float16 on CUDA, float32 on CPU) are these, and
exports its own otherwise."""

import argparse
import time

import torch

from model.checkpoint import load_model

from .exporter import export_model
from .runtime import directory_lock


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export a Reformer to ONNX graphs.")
    parser.add_argument("--model", required=True, help="checkpoint directory (ours or a Hugging Face Reformer)")
    parser.add_argument("--out", required=True, help="directory for the graphs and manifest.json")
    parser.add_argument("--slots", type=int, default=16, help="decode slots of the pool the decode graph serves")
    parser.add_argument("--max-length", type=int, help="tokens per slot (default: the model's positions)")
    parser.add_argument("--tail-capacity", type=int, default=64)
    parser.add_argument("--cache-blocks", type=int,
                        help="LSH cache blocks of the pool (default: enough for every slot at --max-length; a server "
                             "whose budget holds fewer reports its number in /info's cache.blocks)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = parser.parse_args()
    started = time.perf_counter()
    model = load_model(args.model).to(getattr(torch, args.dtype))
    max_length = min(args.max_length or model.config.max_length, model.config.max_length)
    with directory_lock(args.out):  # not while a server reads or writes the same directory
        manifest = export_model(model, args.out, slots=args.slots, max_length=max_length,
                                tail_capacity=args.tail_capacity, cache_blocks=args.cache_blocks, source=args.model,
                                progress=lambda line: print(f"[{time.perf_counter() - started:6.1f} s] {line}",
                                                            flush=True))
    print(f"wrote {len(manifest['graphs'])} graphs and manifest.json to {args.out}")


if __name__ == "__main__":
    main()
