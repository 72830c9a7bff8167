"""Benchmark of the model core against the reference (transformers' Reformer), in one run on one device.

    python -m bench.bench_core [--device cuda|cpu] [--quick]

Times, for a 6-layer, d=512, 8-head Reformer (fp16 on a GPU, fp32 on a CPU; random weights):
- one decode step of ours vs the reference's cached step, batch 1, at several contexts; ours at batch 16 (and
  64 on a GPU);
- a full forward (all logits) of ours vs the reference at several lengths, with peak memory; on a GPU also ours
  alone at 256K and 1M tokens, with the same model's position grid widened to reach them (the reference's
  dense-chunk attention is not run there).
Writes bench/results/core-<device>.json; `python -m bench.report` turns all results into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from bench import RESULTS, ROOT
from model.checkpoint import convert_hf_state_dict
from model.config import ReformerConfig
from model.decode import Decoder
from model.reformer import ReformerLM

BENCH_MODEL = dict(
    vocab_size=258, hidden_size=512, num_attention_heads=8, attention_head_size=64,
    attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"], feed_forward_size=2048, hidden_act="relu",
    lsh_attn_chunk_length=256, local_attn_chunk_length=128, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
    local_num_chunks_before=1, local_num_chunks_after=0, num_buckets=512, num_hashes=2, hash_seed=0,
    axial_pos_embds=True, axial_pos_shape=[256, 256], axial_pos_embds_dim=[128, 384],
    max_position_embeddings=65536, is_decoder=True, pad_token_id=0, eos_token_id=None,
    hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
)


# `--smoke`: the same kinds of layers at toy sizes, so that the whole script runs in seconds on a CPU.
SMOKE_MODEL = dict(BENCH_MODEL, hidden_size=64, num_attention_heads=2, attention_head_size=32,
                   attn_layers=["local", "lsh"], feed_forward_size=128, lsh_attn_chunk_length=64,
                   local_attn_chunk_length=64, num_buckets=8, axial_pos_shape=[32, 32], axial_pos_embds_dim=[16, 48],
                   max_position_embeddings=1024)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_models(device: torch.device, dtype: torch.dtype, shape: dict = BENCH_MODEL):
    from transformers import ReformerConfig as HFConfig
    from transformers import ReformerModelWithLMHead

    torch.manual_seed(0)
    hf_config = HFConfig(**shape)
    reference = ReformerModelWithLMHead(hf_config).eval()
    config = ReformerConfig.from_hf_dict(hf_config.to_dict())
    ours = ReformerLM(config).eval()
    ours.load_state_dict(convert_hf_state_dict(reference.state_dict(), config), strict=False)
    return reference.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)


def long_model(ours: ReformerLM, positions: int, shape: dict = BENCH_MODEL) -> ReformerLM:
    """Our model with its axial position grid widened to `positions` (a power of two); weights otherwise random."""
    rows = 2 ** (int(math.log2(positions)) // 2)
    config = ReformerConfig.from_hf_dict(dict(shape, max_position_embeddings=positions,
                                              axial_pos_shape=[rows, positions // rows]))
    torch.manual_seed(0)
    parameter = next(ours.parameters())
    return ReformerLM(config).eval().to(device=parameter.device, dtype=parameter.dtype)


def prompt(length: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 258, (length,), generator=generator).tolist()


def fitting(context: int, steps: int, shape: dict = BENCH_MODEL) -> int:
    """The longest context that leaves room for the timed steps (the model addresses 65536 positions)."""
    return min(context, shape["max_position_embeddings"] - steps - 8)


def time_ours_step(ours: ReformerLM, context: int, batch: int, steps: int, device, graphs: bool | None = None) -> dict:
    decoder = Decoder(ours, num_slots=batch, max_length=context + steps + 8, cuda_graphs=graphs)
    slots = [decoder.allocate() for _ in range(batch)]
    decoder.prefill([(slots[0], prompt(context))])
    for slot in slots[1:]:
        decoder.copy_slot(slots[0], slot)
    tokens = prompt(steps + 4, seed=1)
    times = []
    for i, token in enumerate(tokens):
        sync(device)
        start = time.perf_counter()
        decoder.step(slots, [token] * batch)
        sync(device)
        if i >= 4:  # warm-up (and graph capture) first
            times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times),
            "max_ms": 1e3 * max(times), "steps": len(times), "cuda_graphs": decoder._graphs is not None
            and not decoder._graphs.failed}


def time_reference_step(reference, context: int, steps: int, device) -> dict:
    ids = torch.tensor([prompt(context)], device=device)
    tokens = prompt(steps + 2, seed=1)
    times = []
    with torch.no_grad():
        cache = reference(ids, use_cache=True).past_buckets_states
        for i, token in enumerate(tokens):
            sync(device)
            start = time.perf_counter()
            out = reference(torch.tensor([[token]], device=device), past_buckets_states=cache, use_cache=True)
            cache = out.past_buckets_states
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times),
            "steps": len(times)}


def time_forward(model, length: int, repeats: int, device, reference: bool) -> dict:
    ids = torch.tensor([prompt(length)], device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync(device)
            start = time.perf_counter()
            out = model(ids).logits if reference else model(ids)
            sync(device)
            if i:
                times.append(time.perf_counter() - start)
            del out
    result = {"median_ms": 1e3 * statistics.median(times), "repeats": repeats}
    if device.type == "cuda":
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def forward_in_child(impl: str, length: int, repeats: int, smoke: bool) -> dict:
    """CPU peak memory needs a fresh process: peak RSS growth over the loaded model is the forward's."""
    command = [sys.executable, "-m", "bench.bench_core", "--child-forward", impl, str(length), str(repeats)]
    command += ["--smoke"] if smoke else []
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_forward(impl: str, length: int, repeats: int, shape: dict) -> None:
    """Peak resident memory above the loaded model, sampled every millisecond during the forwards."""
    import threading

    device = torch.device("cpu")
    reference, ours = build_models(device, torch.float32, shape)
    model = reference if impl == "reference" else ours
    del reference, ours
    baseline = peak = _resident_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, _resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = time_forward(model, length, repeats, device, reference=impl == "reference")
    done.set()
    sampler.join()
    result["peak_mib"] = (peak - baseline) / 2**20
    print(json.dumps(result))


def guarded(measure, *args, **kwargs) -> dict:
    """One failed measurement (out of memory, say) is recorded, not fatal to the rest of the run."""
    try:
        return measure(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - reported in the results
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_core", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes of the benchmark model")
    parser.add_argument("--smoke", action="store_true", help="a toy model at toy sizes (the GPU campaign's --smoke)")
    parser.add_argument("--steps-only", action="store_true",
                        help="re-measure the decode steps (1K and 64K) into the existing result file")
    parser.add_argument("--child-forward", nargs=3, metavar=("IMPL", "LENGTH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_forward:
        impl, length, repeats = args.child_forward
        child_forward(impl, int(length), int(repeats), SMOKE_MODEL if args.smoke else BENCH_MODEL)
        return
    shape = SMOKE_MODEL if args.smoke else BENCH_MODEL
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    # long_lengths: ours alone, with a widened position grid
    long_lengths: list[int] = []
    if args.smoke:
        step_contexts, forward_lengths, batches, steps, ref_steps = [256, 768], [256, 512], [2], 12, 3
        long_lengths = [2048]
    elif args.quick:
        step_contexts, forward_lengths, batches, steps, ref_steps = [1024, 4096], [1024, 2048], [4], 70, 4
        long_lengths = [131072] if gpu else [4096]
    elif args.steps_only:
        step_contexts, forward_lengths, batches, steps, ref_steps = [1024, 65536], [], [16], 160, 12
    elif gpu:
        step_contexts, forward_lengths, batches, steps, ref_steps = [1024, 16384, 65536], [4096, 16384, 65536], \
            [16, 64], 160, 12
        long_lengths = [262144, 1048576]
    else:
        step_contexts, forward_lengths, batches, steps, ref_steps = [1024, 4096, 16384], [1024, 4096, 16384], [16], \
            140, 8
    torch.set_num_threads(os.cpu_count() or 1)
    if gpu:
        faulthandler.dump_traceback_later(300, exit=True)  # a hang shows where it is
    reference, ours = build_models(device, dtype, shape)
    result = {
        "benchmark": "core", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()}, "
                                                                 f"{os.cpu_count()} cores)",
        "device_type": device.type, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "model": {k: shape[k] for k in ("hidden_size", "num_attention_heads", "attn_layers", "num_hashes",
                                              "num_buckets", "lsh_attn_chunk_length", "local_attn_chunk_length")},
        "parameters": ours.num_parameters(), "steps": [], "forward": [],
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    folder = ROOT / "bench" / "out" if (args.quick or args.smoke) and not os.environ.get("BENCH_OUT") else RESULTS
    path = folder / f"core-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every entry, so that an interrupted run keeps what it measured
        path.write_text(json.dumps(result, indent=2) + "\n")

    if args.steps_only:  # keep the earlier full-forward numbers, say when the steps were measured
        earlier = json.loads(path.read_text())
        result["forward"], result["forward_date"] = earlier["forward"], earlier.get("forward_date", earlier["date"])

    for length in forward_lengths:
        if gpu:
            entry = {"length": length, "ours": guarded(time_forward, ours, length, 3, device, reference=False),
                     "reference": guarded(time_forward, reference, length, 3, device, reference=True)}
            torch.cuda.empty_cache()
        else:
            entry = {"length": length, "ours": forward_in_child("ours", length, 2, args.smoke),
                     "reference": forward_in_child("reference", length, 2, args.smoke)}
        result["forward"].append(entry)
        save()
        print(json.dumps(entry), flush=True)
    if long_lengths:
        widened = long_model(ours, max(long_lengths), shape)
        for length in long_lengths:
            entry = {"length": length, "ours": guarded(time_forward, widened, length, 2, device, reference=False),
                     "reference": {"skipped": "beyond the benchmark model's 64K positions"}}
            result["forward"].append(entry)
            save()
            print(json.dumps(entry), flush=True)
        del widened
        if gpu:
            torch.cuda.empty_cache()
    for context in step_contexts:
        context = fitting(context, steps, shape)
        entry = {"context": context}
        if gpu:  # the same step without CUDA graphs, to show what the graphs buy
            entry["ours_batch1_eager"] = guarded(time_ours_step, ours, context, 1, 40, device, graphs=False)
        entry["ours_batch1"] = guarded(time_ours_step, ours, context, 1, steps, device)
        for batch in batches:
            entry[f"ours_batch{batch}"] = guarded(time_ours_step, ours, context, batch, steps, device)
        entry["reference_batch1"] = guarded(time_reference_step, reference, context, ref_steps, device)
        result["steps"].append(entry)
        save()
        print(json.dumps(entry), flush=True)
        if gpu:
            torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
