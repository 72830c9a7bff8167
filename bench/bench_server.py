"""Benchmark of the server: the engine alone vs streamed end to end through HTTP, in one run on one device.

    python -m bench.bench_server [--device cpu|cuda] [--tokens 32]

- engine tokens/s (the engine driven in this process) vs end-to-end streamed tokens/s (a real server on
  127.0.0.1, concurrent SSE clients) at 1, 8 and 32 streams; the gap is the cost of HTTP, LitServe's
  inter-process queues and SSE per token;
- time to first byte and to first token for a 1K- and a 16K-token prompt (asked with
  `stream_options.include_progress`, so the prefill's progress comments count as bytes).
Writes bench/results/server-<device>.json; `python -m bench.report` puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench import RESULTS
from bench.bench_core import BENCH_MODEL, prompt
from model import (
    ByteTokenizer,
    ReformerConfig,
    ReformerLM,
    SamplingParams,
    load_model,
    save_model,
)
from model.engine import Engine
from model.messages import GenerateRequest, Token
from bench.launcher import ServerProcess

STREAMS = (1, 8, 32)
PROMPT_TOKENS = 64
MAX_MODEL_LEN = 16384 + 1024  # room for the 16K-token prompt; caches are sized to it


def bench_checkpoint(directory: Path) -> Path:
    """The benchmark model (bench_core's shape, random weights) in our format."""
    torch.manual_seed(0)
    save_model(ReformerLM(ReformerConfig.from_hf_dict(dict(BENCH_MODEL))).eval(), directory)
    return directory


def engine_rate(engine: Engine, streams: int, tokens: int) -> dict:
    """Generate `tokens` for `streams` prompts at once with the engine in this process."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i in range(streams):
        engine.submit(GenerateRequest(str(i), tuple(prompt(PROMPT_TOKENS, seed=i)), params))
    generated = 0
    while engine.has_work():
        generated += sum(isinstance(output, Token) for _, output in engine.iteration())
    seconds = time.perf_counter() - start
    return {"tokens": generated, "seconds": seconds, "tokens_per_second": generated / seconds}


async def _stream(client: httpx.AsyncClient, payload: dict) -> dict:
    start = time.perf_counter()
    first_byte = first_token = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if first_byte is None and line:
                first_byte = now - start
            if line.startswith("data: {") and '"choices": [{' in line:
                tokens += 1  # one chunk per token (the last one carries the finish_reason)
                if first_token is None:
                    first_token = now - start
    return {"tokens": tokens, "first_byte": first_byte, "first_token": first_token,
            "seconds": time.perf_counter() - start}


async def streamed_rate(url: str, streams: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        payloads = [{"prompt": prompt(PROMPT_TOKENS, seed=i), "max_tokens": tokens, "temperature": 0,
                     "ignore_eos": True, "stream": True} for i in range(streams)]
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream(client, p) for p in payloads))
        seconds = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)
    return {"tokens": generated, "seconds": seconds, "tokens_per_second": generated / seconds,
            "mean_first_token": sum(r["first_token"] for r in results) / streams}


async def first_token_times(url: str, length: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        result = await _stream(client, {"prompt": prompt(length, seed=99), "max_tokens": 1, "stream": True,
                                        "stream_options": {"include_progress": True}})
    return {"prompt_tokens": length, "first_byte": result["first_byte"], "first_token": result["first_token"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_server", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per stream")
    args = parser.parse_args()
    device = args.device
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = bench_checkpoint(Path(scratch) / "bench-model")
        result = {
            "benchmark": "server", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "device_type": device, "torch": torch.__version__, "tokens_per_stream": args.tokens,
            "prompt_tokens": PROMPT_TOKENS, "streams": [], "first_token": []}
        dtype = torch.float16 if device == "cuda" else torch.float32
        engine = Engine(load_model(checkpoint).to(device=device, dtype=dtype), ByteTokenizer(),
                        max_running=max(STREAMS), max_length=MAX_MODEL_LEN)
        for streams in STREAMS:
            engine_rate(engine, streams, args.tokens)  # warm-up: CPU allocators and kernels settle on a first pass
            result["streams"].append({"streams": streams, "engine": engine_rate(engine, streams, args.tokens)})
            print(json.dumps(result["streams"][-1]), flush=True)
        del engine
        server = ServerProcess(checkpoint, "--device", device, "--max-running", str(max(STREAMS)),
                               "--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning",
                               log_path=Path(scratch) / "server.log")
        try:
            for entry in result["streams"]:
                asyncio.run(streamed_rate(server.url, entry["streams"], args.tokens))  # warm-up, as for the engine
                entry["streamed"] = asyncio.run(streamed_rate(server.url, entry["streams"], args.tokens))
                print(json.dumps(entry), flush=True)
            for length in (1024, 16384):
                result["first_token"].append(asyncio.run(first_token_times(server.url, length)))
                print(json.dumps(result["first_token"][-1]), flush=True)
        finally:
            server.stop()
    path = RESULTS / f"server-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
