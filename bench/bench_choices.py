"""Benchmark of n choices from one prefill against n separate requests for the same long prompt.

    python -m bench.bench_choices [--device cpu|cuda] [--prompt-tokens 16384] [--n 8] [--tokens 16]

Both run on the same engine (the server's, driven in this process) with the core benchmark's model:
`n` = 8 reads the prompt once and copies its cache into 8 decode slots; 8 requests of `n` = 1 read it 8
times (batched as the engine batches them). Reported: prompt tokens computed, time until every choice has
its first token, and until all are done. Writes bench/results/choices-<device>.json; `python -m
bench.report` puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from bench import RESULTS
from bench.bench_core import BENCH_MODEL, prompt
from model.config import ReformerConfig
from model.engine import Engine
from model.messages import Finished, GenerateRequest, Token
from model.reformer import ReformerLM
from model.sampling import SamplingParams


def run(engine: Engine, requests: list[GenerateRequest]) -> dict:
    prefilled = engine.prefills
    start = time.perf_counter()
    for request in requests:
        engine.submit(request)
    first: dict[tuple[str, int], float] = {}
    tokens = 0
    while engine.has_work():
        for _, output in engine.iteration():
            if isinstance(output, Token):
                tokens += 1
                first.setdefault((output.uid, output.index), time.perf_counter() - start)
            elif not isinstance(output, Finished):
                raise RuntimeError(f"unexpected output {output}")
    return {"seconds": time.perf_counter() - start, "all_first_tokens": max(first.values()), "tokens": tokens,
            "prefill_forwards": engine.prefills - prefilled,
            "prompt_tokens_computed": sum(len(r.prompt_ids) for r in requests)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_choices", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-tokens", type=int, default=16384)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig.from_hf_dict(dict(BENCH_MODEL))).eval().to(device=device, dtype=dtype)
    engine = Engine(model, max_running=args.n, max_length=args.prompt_tokens + args.tokens)
    ids = tuple(prompt(args.prompt_tokens))
    params = SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=1, ignore_eos=True)
    run(engine, [GenerateRequest("warm-up", ids[:1024], params)])
    together = run(engine, [GenerateRequest("one", ids, params, n=args.n)])
    print(json.dumps({"one request, n": together}), flush=True)
    separate = run(engine, [GenerateRequest(str(i), ids, params.for_choice(i)) for i in range(args.n)])
    print(json.dumps({"separate requests": separate}), flush=True)
    result = {
        "benchmark": "choices", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "device_type": device.type, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens, "n": args.n, "tokens_per_choice": args.tokens,
        "one_request": together, "separate_requests": separate}
    path = RESULTS / f"choices-{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
