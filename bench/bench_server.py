"""Benchmark of the server: the engine alone vs streamed end to end through HTTP, in one run on one device.

    python -m bench.bench_server [--device cpu|cuda] [--tokens 32]
    python -m bench.bench_server --device cuda --streams 1,16,64 --prompt-tokens 1024,65000 \
        --first-token 1024,65000 --under-load 16 --embed 65536,262144 --positions 262144   # the GPU campaign

- engine tokens/s (the engine driven in this process) vs end-to-end streamed tokens/s (a real server on
  127.0.0.1, concurrent SSE clients) at each number of streams and prompt length; the gap is the cost of
  HTTP, LitServe's inter-process queues and SSE per token; inter-token latency of the streams;
- time to first byte and to first token for each `--first-token` prompt (asked with
  `stream_options.include_progress`, so the prefill's progress comments count as bytes), alone and, with
  `--under-load N`, while N other streams decode;
- with `--embed`, documents per second and tokens per second of /v1/embeddings at each length.
The model is bench_core's shape (6 layers, d=512) with random weights; `--positions` widens its axial position
grid so documents that long fit. Writes bench/results/server-<device>.json (or into $BENCH_OUT);
`python -m bench.report` puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench import RESULTS
from bench.bench_core import BENCH_MODEL, SMOKE_MODEL, prompt
from model import (
    ByteTokenizer,
    ReformerConfig,
    ReformerLM,
    SamplingParams,
    load_model,
    save_model,
)
from model.blocks import blocks_for
from model.decode import BLOCK_SIZE
from model.engine import Engine
from model.messages import GenerateRequest, Token
from bench.launcher import ServerProcess

def bench_checkpoint(directory: Path, positions: int = 65536, model: dict = BENCH_MODEL) -> Path:
    """The benchmark model (bench_core's shape, random weights, `positions` positions) in our format."""
    torch.manual_seed(0)
    rows = 2 ** (int(math.log2(positions)) // 2)
    shape = dict(model, max_position_embeddings=positions, axial_pos_shape=[rows, positions // rows])
    save_model(ReformerLM(ReformerConfig.from_hf_dict(shape)).eval(), directory)
    return directory


def engine_rate(engine: Engine, streams: int, prompt_tokens: int, tokens: int) -> dict:
    """Generate `tokens` for `streams` prompts at once with the engine in this process."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i in range(streams):
        engine.submit(GenerateRequest(str(i), tuple(prompt(prompt_tokens, seed=i)), params))
    generated = 0
    while engine.has_work():
        generated += sum(isinstance(output, Token) for _, output in engine.iteration())
    seconds = time.perf_counter() - start
    return {"tokens": generated, "seconds": seconds, "tokens_per_second": generated / seconds}


async def _stream(client: httpx.AsyncClient, payload: dict) -> dict:
    start = time.perf_counter()
    first_byte = first_token = None
    arrivals = []
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if first_byte is None and line:
                first_byte = now - start
            if line.startswith("data: {") and '"choices": [{' in line:
                arrivals.append(now)  # one chunk per token (the last one carries the finish_reason)
                if first_token is None:
                    first_token = now - start
    return {"tokens": len(arrivals), "first_byte": first_byte, "first_token": first_token,
            "seconds": time.perf_counter() - start, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]}


def _percentile(values: list[float], share: float) -> float | None:
    return statistics.quantiles(values, n=100)[round(100 * share) - 1] if len(values) >= 2 else None


def _payload(length: int, tokens: int, seed: int) -> dict:
    return {"prompt": prompt(length, seed=seed), "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}


async def streamed_rate(url: str, streams: int, prompt_tokens: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        payloads = [_payload(prompt_tokens, tokens, seed=i) for i in range(streams)]
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, p) for p in payloads))
        seconds = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)
    gaps = [gap for r in results for gap in r["gaps"]]
    return {"tokens": generated, "seconds": seconds, "tokens_per_second": generated / seconds,
            "mean_first_token": sum(r["first_token"] for r in results) / streams,
            "itl_p50": _percentile(gaps, 0.5), "itl_p95": _percentile(gaps, 0.95)}


async def first_token_times(url: str, length: int, under_load: int = 0, load_prompt: int = 1024,
                            load_tokens: int = 4096) -> dict:
    """TTFT of one prompt of `length`, alone or once `under_load` other streams (prompts of `load_prompt`, up to
    `load_tokens` each, cancelled once measured) are all decoding."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        decoding = [asyncio.Event() for _ in range(under_load)]
        load = [asyncio.create_task(_decode_until_cancelled(
            client, _payload(load_prompt, load_tokens, seed=1000 + i), decoding[i])) for i in range(under_load)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in decoding)), timeout=1800)
        result = await _stream(client, {"prompt": prompt(length, seed=99), "max_tokens": 1, "stream": True,
                                        "stream_options": {"include_progress": True}})
        for task in load:
            task.cancel()
        await asyncio.gather(*load, return_exceptions=True)
    return {"prompt_tokens": length, "under_load": under_load, "first_byte": result["first_byte"],
            "first_token": result["first_token"]}


async def _decode_until_cancelled(client: httpx.AsyncClient, payload: dict, decoding: asyncio.Event) -> None:
    """A stream that sets `decoding` at its first token and reads on until it is cancelled."""
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                decoding.set()


async def embedding_rate(url: str, length: int, documents: int) -> dict:
    """Documents of `length` tokens embedded one request each, `documents` of them concurrently."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def one(seed: int) -> None:
            response = await client.post("/v1/embeddings", json={"input": [prompt(length, seed=seed)]})
            response.raise_for_status()

        await one(0)  # warm-up: the first document of a length compiles and allocates
        start = time.perf_counter()
        await asyncio.gather(*(one(seed) for seed in range(1, documents + 1)))
        seconds = time.perf_counter() - start
    return {"tokens": length, "documents": documents, "seconds": seconds, "documents_per_second": documents / seconds,
            "tokens_per_second": documents * length / seconds}


def _lengths(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_server", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per stream")
    parser.add_argument("--streams", type=_lengths, default=[1, 8, 32], help="concurrent streams, e.g. 1,16,64")
    parser.add_argument("--prompt-tokens", type=_lengths, default=[64], help="prompt lengths of the streams")
    parser.add_argument("--first-token", type=_lengths, default=[1024, 16384], help="prompt lengths for TTFT")
    parser.add_argument("--under-load", type=int, default=0, help="also TTFT while this many streams decode")
    parser.add_argument("--embed", type=_lengths, default=[], help="document lengths for /v1/embeddings")
    parser.add_argument("--embed-documents", type=int, default=8, help="documents per embedding length")
    parser.add_argument("--positions", type=int, default=65536, help="the model's context (a power of two)")
    parser.add_argument("--smoke", action="store_true", help="bench_core's toy model (the GPU campaign's --smoke)")
    args = parser.parse_args(argv)
    device = args.device
    longest = max(args.prompt_tokens + args.first_token) + args.tokens + 1
    load_prompt, load_tokens = min(1024, args.positions // 4), min(4096, args.positions // 2)
    max_model_len = min(args.positions, max(longest, 16384 + 1024, *args.embed))
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = bench_checkpoint(Path(scratch) / "bench-model", args.positions,
                                      SMOKE_MODEL if args.smoke else BENCH_MODEL)
        result = {
            "benchmark": "server", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "device_type": device, "torch": torch.__version__, "tokens_per_stream": args.tokens,
            "positions": args.positions, "streams": [], "first_token": [], "embeddings": []}
        dtype = torch.float16 if device == "cuda" else torch.float32
        # blocks for the widest stream test only: a pool for every slot at the longest length would not fit
        blocks = max(args.streams) * blocks_for(max(args.prompt_tokens) + args.tokens + 1, BLOCK_SIZE) + 1
        engine = Engine(load_model(checkpoint).to(device=device, dtype=dtype), ByteTokenizer(),
                        max_running=max(args.streams), max_length=max_model_len, cache_blocks=blocks)
        for prompt_tokens in args.prompt_tokens:
            for streams in args.streams:
                engine_rate(engine, streams, prompt_tokens, args.tokens)  # warm-up: allocators and kernels settle
                result["streams"].append({"streams": streams, "prompt_tokens": prompt_tokens,
                                          "engine": engine_rate(engine, streams, prompt_tokens, args.tokens)})
                print(json.dumps(result["streams"][-1]), flush=True)
        del engine
        server = ServerProcess(checkpoint, "--device", device, "--max-running",
                               str(max(args.streams + [args.under_load + 1])), "--max-model-len", str(max_model_len),
                               "--max-body-bytes", str(16 * max(args.embed + [max_model_len]) + (1 << 20)),
                               "--max-queued-tokens", str(2 * max(args.embed_documents * max(args.embed + [0]),
                                                                  max(args.streams) * longest, 1 << 20)),
                               "--log-level", "warning", log_path=Path(scratch) / "server.log")
        try:
            for entry in result["streams"]:
                asyncio.run(streamed_rate(server.url, entry["streams"], entry["prompt_tokens"], args.tokens))
                entry["streamed"] = asyncio.run(streamed_rate(server.url, entry["streams"], entry["prompt_tokens"],
                                                              args.tokens))
                print(json.dumps(entry), flush=True)
            for length in args.first_token:
                for load in sorted({0, args.under_load}):
                    result["first_token"].append(asyncio.run(first_token_times(server.url, length, load,
                                                                               load_prompt, load_tokens)))
                    print(json.dumps(result["first_token"][-1]), flush=True)
            for length in args.embed:
                result["embeddings"].append(asyncio.run(embedding_rate(server.url, length, args.embed_documents)))
                print(json.dumps(result["embeddings"][-1]), flush=True)
        finally:
            server.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"server-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
