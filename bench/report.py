"""Regenerate BENCHMARKS.md from the JSON files in bench/results/ (never edit BENCHMARKS.md by hand).

    python -m bench.report
"""

from __future__ import annotations

import argparse
import json

from bench import RESULTS, ROOT
from bench.loadtest.summary import runs_table
from bench.targets import core_targets, server_targets


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def _heading(result: dict) -> list[str]:
    """A result's sub-heading: where and when it was measured."""
    return [f"### {result['device']} — {result['date'][:10]}", ""]


def _verdict(ok: bool) -> str:
    return "reached" if ok else "**missed**"


def core_section(result: dict) -> list[str]:
    lines = [
        *_heading(result),
        f"{result['dtype']}, torch {result['torch']}, transformers {result.get('transformers', '?')} (the reference). "
        f"Model: {len(result['model']['attn_layers'])} layers {result['model']['attn_layers']}, "
        f"d={result['model']['hidden_size']}, {result['model']['num_attention_heads']} heads, "
        f"{result['model']['num_hashes']} hash rounds, {result['model']['num_buckets']} buckets, "
        f"LSH chunk {result['model']['lsh_attn_chunk_length']}, local chunk "
        f"{result['model']['local_attn_chunk_length']}; {result['parameters'] / 1e6:.1f}M parameters, random weights.",
        "",
        "**Decode step** (one new token per sequence, synchronised; median over the steps, mean includes the "
        "amortised bucket-index merges):",
        "",
    ]
    steps = result["steps"]
    batch_key = next(k for k in steps[0] if k.startswith("ours_batch") and k.removeprefix("ours_batch").isdigit()
                     and k != "ours_batch1")
    batch = int(batch_key.removeprefix("ours_batch"))
    eager = "ours_batch1_eager" in steps[0]
    lines += [
        f"| context | ours, batch 1 |{' ours without CUDA graphs |' if eager else ''} ours, batch {batch} "
        "(tokens/s) | reference cached step, batch 1 | reference ÷ ours | ours ÷ ours at the shortest context |",
        "|---:|---:|" + ("---:|" if eager else "") + "---:|---:|---:|---:|",
    ]
    base = steps[0]["ours_batch1"]["median_ms"]
    for entry in steps:
        ours, many, ref = entry["ours_batch1"], entry[batch_key], entry["reference_batch1"]
        extra = f" {entry['ours_batch1_eager']['median_ms']:.2f} ms |" if eager else ""
        lines.append(
            f"| {entry['context']:,} | {ours['median_ms']:.2f} ms (mean {ours['mean_ms']:.2f}) |{extra} "
            f"{many['median_ms']:.2f} ms ({1e3 * batch / many['median_ms']:,.0f}) | {ref['median_ms']:.2f} ms | "
            f"{_ratio(ref['median_ms'], ours['median_ms'])} | {_ratio(ours['median_ms'], base)} |")
    graphs = steps[0]["ours_batch1"].get("cuda_graphs")
    forward_note = f" (measured {result['forward_date']}, in an earlier run)" if "forward_date" in result else ""
    lines += ["", f"CUDA graphs: {'on' if graphs else 'off'}.", "",
              f"**Full forward** (batch 1, all logits){forward_note}:", "",
              "| length | ours | reference | ours ÷ reference | ours peak | reference peak | peak ratio |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in result["forward"]:
        ours, ref = entry["ours"], entry["reference"]
        if "median_ms" not in ours:
            lines.append(f"| {entry['length']:,} | {ours.get('error', 'failed')} | | | | | |")
            continue
        reference = f"{ref['median_ms']:,.1f} ms" if "median_ms" in ref else ref.get("skipped", ref.get("error", "—"))
        time_ratio = _ratio(ours["median_ms"], ref["median_ms"]) if "median_ms" in ref else "—"
        ours_peak = f"{ours['peak_mib']:,.0f} MiB" if "peak_mib" in ours else "n/a"
        ref_peak = f"{ref['peak_mib']:,.0f} MiB" if "peak_mib" in ref else "n/a"
        peak_ratio = _ratio(ours["peak_mib"], ref["peak_mib"]) if "peak_mib" in ours and "peak_mib" in ref else "n/a"
        lines.append(f"| {entry['length']:,} | {ours['median_ms']:,.1f} ms | {reference} | {time_ratio} | "
                     f"{ours_peak} | {ref_peak} | {peak_ratio} |")
    lines += ["", "Targets (`bench.targets`, judged at the sizes this run measured):", ""]
    lines += [f"- {t['name']}: {t['figure']} — {_target_verdict(t['verdict'])}" for t in core_targets(result)]
    return lines + [""]


def _target_verdict(verdict: str) -> str:
    return {"reached": "reached", "missed": "**missed**"}.get(verdict, verdict)


def _ms_or_dash(seconds: float | None) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds is not None else "—"


def server_section(result: dict) -> list[str]:
    lines = [
        *_heading(result),
        f"torch {result['torch']}; the core benchmark's model (random weights, "
        f"{result.get('positions', 65536):,} positions); {result['tokens_per_stream']} tokens generated per "
        "stream, greedy.",
        "",
        "| streams | prompt tokens | engine alone | streamed over HTTP (SSE) | streamed ÷ engine | mean time to first "
        "token | inter-token p50 | p95 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["streams"]:
        engine, streamed = entry["engine"], entry["streamed"]
        lines.append(f"| {entry['streams']} | {entry.get('prompt_tokens', result.get('prompt_tokens')):,} | "
                     f"{engine['tokens_per_second']:,.1f} tokens/s | {streamed['tokens_per_second']:,.1f} tokens/s | "
                     f"{_ratio(streamed['tokens_per_second'], engine['tokens_per_second'])} | "
                     f"{streamed['mean_first_token'] * 1e3:,.0f} ms | {_ms_or_dash(streamed.get('itl_p50'))} | "
                     f"{_ms_or_dash(streamed.get('itl_p95'))} |")
    lines += ["", "| prompt tokens | streams decoding meanwhile | first byte | first token |", "|---:|---:|---:|---:|"]
    for entry in result["first_token"]:
        lines.append(f"| {entry['prompt_tokens']:,} | {entry.get('under_load', 0)} | "
                     f"{entry['first_byte'] * 1e3:,.0f} ms | {entry['first_token'] * 1e3:,.0f} ms |")
    if result.get("embeddings"):
        lines += ["", "| embedding of | documents | documents/s | tokens/s |", "|---:|---:|---:|---:|"]
        for entry in result["embeddings"]:
            lines.append(f"| {entry['tokens']:,} tokens | {entry['documents']} | "
                         f"{entry['documents_per_second']:,.2f} | {entry['tokens_per_second']:,.0f} |")
    lines += ["", "Targets:", ""]
    lines += [f"- {t['name']}: {t['figure']} — {_target_verdict(t['verdict'])}" for t in server_targets(result)]
    return lines + [""]


def recipes_section(result: dict) -> list[str]:
    lines = [*_heading(result),
             f"Each recipe trained from scratch for {result['minutes_each']:g} minutes of this machine, one after "
             "another; validation bits per byte on the same bytes (the beginnings of 8 validation files).", "",
             "| recipe | tokens | layers × width | windows | steps | tokens seen | validation bits per byte |",
             "|---|---|---:|---|---:|---:|---:|"]
    best = min(r["validation_bpb"] for r in result["recipes"])
    for r in result["recipes"]:
        windows = (f"{r['short_context']:,}-token windows, every {r['long_every']}th step the whole context"
                   if r["short_context"] else "the whole context")
        bpb = f"**{r['validation_bpb']:.3f}**" if r["validation_bpb"] == best else f"{r['validation_bpb']:.3f}"
        lines.append(f"| `{r['preset']}` | {r['tokenizer']} ({r['vocab']:,}) | {r['layers']} × {r['hidden']} | "
                     f"{windows} | {r['steps']:,} | {r['tokens']:,} | {bpb} |")
    return lines + [""]


def campaign_section(result: dict) -> list[str]:
    kind = "smoke run (tiny sizes, CPU)" if result["smoke"] else "GPU run"
    lines = [f"### {kind} — {result['date'][:10]}", "", "| stage | seconds (limit) | exit | verdict |",
             "|---|---:|---:|---|"]
    for stage in result["stages"]:
        verdict = "ok" if stage["ok"] else "**timed out**" if stage["timed_out"] else "**failed**"
        lines.append(f"| {stage['stage']} | {stage['seconds']:.0f} ({stage['limit_s']}) | {stage['exit_code']} | "
                     f"{verdict} |")
    lines += ["", "| target | figure | verdict |", "|---|---|---|"]
    lines += [f"| {t['name']} | {t['figure']} | {_target_verdict(t['verdict'])} |" for t in result.get("targets", [])]
    return lines + [""]


def choices_section(result: dict) -> list[str]:
    one, separate = result["one_request"], result["separate_requests"]
    n = result["n"]
    lines = [
        *_heading(result),
        f"torch {result['torch']}, {result['dtype']}; the core benchmark's model (random weights); a "
        f"{result['prompt_tokens']:,}-token prompt, {result['tokens_per_choice']} tokens per choice, sampled.",
        "",
        "| | prompt tokens computed | prefill forwards | every choice's first token | all done |",
        "|---|---:|---:|---:|---:|",
        f"| one request, n = {n} | {result['prompt_tokens']:,} | {one['prefill_forwards']} | "
        f"{one['all_first_tokens']:,.2f} s | {one['seconds']:,.2f} s |",
        f"| {n} requests, n = 1 | {separate['prompt_tokens_computed']:,} | {separate['prefill_forwards']} | "
        f"{separate['all_first_tokens']:,.2f} s | {separate['seconds']:,.2f} s |",
        "",
        f"n = {n} from one prefill: first tokens {_ratio(separate['all_first_tokens'], one['all_first_tokens'])} "
        f"sooner, done {_ratio(separate['seconds'], one['seconds'])} sooner.",
    ]
    return lines + [""]


def fuzz_section(result: dict) -> list[str]:
    statuses = ", ".join(f"{status}: {count:,}" for status, count in result["statuses"].items())
    routes = ", ".join(f"`{route}` {count:,}" for route, count in result["routes"].items())
    verdict = "none" if result["server_errors"] == 0 else f"**{result['server_errors']}**"
    lines = [
        *_heading(result),
        f"{result['tool']}, {result['examples_per_operation']} examples per operation and phase, seed "
        f"{result['seed']}, server `{result['server_args']}`: **{result['requests']:,} requests** in "
        f"{result['seconds']:,.0f} s. Server errors (5xx): "
        f"{verdict}. A normal completion afterwards: {result['normal_request_after']}.",
        "",
        f"Statuses: {statuses}.",
        "",
        f"Requests per route: {routes}.",
    ]
    if result["failures"]:
        lines += ["", f"schemathesis reported: {result['failures']}"]
    return lines + [""]


def image_section(result: dict) -> list[str]:
    checks = ", ".join(f"{name.replace('_', ' ')} {'pass' if ok else '**FAIL**'}" for name, ok in result["checks"].items())
    return [f"### {result['variant'].upper()} image — {result['date'][:10]}", "",
            f"{result['engine']} {result['engine_version']}, base `{result['base']}`, Python {result['python']}, torch "
            f"{result['torch']}: **{result['size_bytes'] / 1e9:.2f} GB**, built in {result['build_seconds']:.0f} s, "
            f"ready {result['ready_seconds']:.0f} s after start. Run as: {result['run']}. A SIGTERM during a "
            f"{result['drain_request_tokens']}-token stream: the stream ended with `{result['drain_stream_finish_reason']}`"
            f" and the container exited {result['exit_code_after_sigterm']} after {result['drain_seconds']:.1f} s "
            f"(drain timeout {result['drain_timeout_seconds']} s).", "", f"Checks: {checks}.", ""]


def cache_section(result: dict) -> list[str]:
    mix = " and ".join(f"{share:.0%} of {tokens:,} tokens" for share, tokens in result["mix"])
    lines = [f"Computed {result['date'][:10]}. Bytes one sequence of {result['sequence_tokens']:,} tokens holds:", "",
             "| model | dtype | every position | local rings | before ÷ after |", "|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['dtype']} | {row['bytes_before'] / 2**30:.2f} GiB | "
                     f"{row['bytes_after'] / 2**30:.2f} GiB | {row['ratio']:.2f}× |")
    lines += ["", f"Sequences of a mix ({mix}) that decode at once in {result['budget_bytes'] / 2**30:.0f} GiB: "
              "every slot reserving the longest length, before and with local rings; then with the LSH layers' "
              f"positions in blocks of {result['block_size']} lent for each request's own length (the slot count "
              "that serves the most; a slot still holds its rings and its LSH bucket indexes at the longest length):",
              "", "| model | dtype | before | local rings | rings and blocks (slots) |", "|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['dtype']} | {row['mixed_sequences_before']} | "
                     f"{row['mixed_sequences_rings']} | {row['mixed_sequences_blocks']} ({row['mixed_slots_blocks']}) |")
    steps = result.get("steps")
    if steps:
        ratio = steps["ours_ms"] / steps["baseline_ms"]
        lines += ["", f"A decode step at a full pool ({steps['sequences']} sequences of {steps['context']:,} tokens, "
                      f"the benchmark model, {steps['device']}, median of three alternating runs): "
                      f"{steps['ours_ms']:.1f} ms through the block table, {steps['baseline_ms']:.1f} ms with "
                      f"contiguous slots ({steps['baseline']}): {ratio:.2f}× (target ≤ 1.10×: "
                      f"{_verdict(ratio <= 1.10)})."]
    return lines + [""]


def loadtest_section(result: dict) -> list[str]:
    gates = ", ".join(f"{k.removeprefix('sla_').replace('_', ' ')} ≤ {v}" for k, v in result["gates"].items())
    lines = [f"### {result['device'].upper()} ({result['machine']}) — {result['date'][:10]}", "",
             f"Model: {result['model']} (random weights: the load's compute, not its text). Server arguments "
             f"`{' '.join(result['server_args'])}`, locust arguments `{' '.join(result.get('locust_args', []))}`; "
             f"{result['run_time']} per step; gates: {gates} (latencies in ms).", "",
             *runs_table(result["runs"])]
    passing = [run for run in result["runs"] if run["gate_passed"]]
    if passing:
        best = passing[-1]
        lines += ["", f"Capacity: {best['users']} users at {best['streamed_tokens_per_second']:.1f} streamed tokens/s "
                      "with every gate met" + ("." if len(passing) < len(result["runs"]) else
                                                 " (the largest step tried; the gate did not fail).")]
    lines += ["", f"![latency and throughput against users](bench/results/{result['plot']})", ""]
    return lines


def export_section(result: dict) -> list[str]:
    lines = [*_heading(result),
             f"onnxruntime provider `{result['provider']}`, torch {result['torch']}; export of the three graphs took "
             f"{result['export_seconds']:.0f} s.", "",
             "| embedding of | PyTorch eager | onnxruntime | onnxruntime ÷ PyTorch |", "|---:|---:|---:|---:|"]
    for entry in result["embeddings"]:
        lines.append(f"| {entry['tokens']:,} tokens | {entry['torch_ms']:,.0f} ms | {entry['onnx_ms']:,.0f} ms | "
                     f"{_ratio(entry['onnx_ms'], entry['torch_ms'])} |")
    lines += ["", "| decode step | PyTorch eager | onnxruntime | onnxruntime ÷ PyTorch |", "|---|---:|---:|---:|"]
    for entry in result["steps"]:
        lines.append(f"| context {entry['context']:,}, batch {entry['batch']} | {entry['torch_ms']:.1f} ms | "
                     f"{entry['onnx_ms']:.1f} ms | {_ratio(entry['onnx_ms'], entry['torch_ms'])} |")
    if "parity" in result:
        largest = max(e["max_difference"] for e in result["embeddings"] + result["steps"])
        lines += ["", f"Parity: largest difference {largest:.2g} (tolerance {result['tolerance']:g}) — "
                      f"{'pass' if result['parity'] else '**FAIL**'}."]
    return lines + [""]


def gpu_tests_section(result: dict) -> list[str]:
    lines = [f"### {result['device']}, torch {result['torch']}, {result['date'][:10]}", "",
             "| check | measured | tolerance | verdict |", "|---|---:|---:|---|"]
    for check in result["checks"]:
        lines.append(f"| {check['check']} | {check['value']:.3g} | {check['tolerance']:.3g} | "
                     f"{'pass' if check['passed'] else '**FAIL**'} |")
    return lines + [""]


def eval_section(result: dict) -> list[str]:
    xz = result["compressors_bpb"]["xz -9e"]
    lines = [*_heading(result),
             f"{result['parameters'] / 1e6:.1f}M parameters, {result.get('tokenizer', 'bytes')} tokens, context "
             f"{result['model']['max_position_embeddings']:,}; "
             f"test split of Python {result['python']}'s standard library: {result['test_split']['files']} files, "
             f"{result['test_split']['bytes']:,} bytes.", "",
             "| coder | bits per byte | ÷ xz -9e |", "|---|---:|---:|",
             f"| default model | {result['model_bpb']:.3f} | {_ratio(result['model_bpb'], xz)} |"]
    for name, value in result["compressors_bpb"].items():
        lines.append(f"| {name} | {value:.3f} | {_ratio(value, xz)} |")
    buckets = result["position_buckets_bpb"]
    first, last = buckets["0K-1K"], buckets["16K+"]
    bz2 = result["compressors_bpb"]["bz2 -9"]
    lines += ["", f"Targets: trained on a CPU, at most bz2 -9 ({bz2:.3f}) — {result['model_bpb']:.3f}, "
                  f"{_verdict(result['model_bpb'] <= bz2)}; trained on a GPU, at most 0.85 × xz -9e ({0.85 * xz:.3f}).",
              "", f"By position in the {result['long_files']} test files longer than 16K bytes:", "",
              "| " + " | ".join(buckets) + " |", "|" + "---:|" * len(buckets),
              "| " + " | ".join(f"{v:.3f}" for v in buckets.values()) + " |", "",
              f"Target: 16K+ below 0–1K — {last:.3f} vs {first:.3f}, {_verdict(last < first)}.", ""]
    judged = result.get("python_lines")
    if judged:
        # "mostly valid-looking Python": at least half of every kind's non-blank lines are code before the first
        # error (a docstring that runs on compiles but is not Python written)
        mostly = all(entry["lines"] and 2 * entry["code"] >= entry["lines"] for entry in judged.values())
        lines += ["Generated lines that Python's compiler accepts before the first syntax error, and of those the "
                  "lines that hold code, not only docstring or comment text (non-blank lines, three prompts): "
                  + "; ".join(f"{kind} {entry['valid']} of {entry['lines']} ({entry['code']} code)"
                              for kind, entry in judged.items()) + ".", "",
                  f"Target: mostly valid Python code in every kind of continuation — {_verdict(mostly)}.", ""]
    lines += [f"![bits per byte by position](bench/results/{result['plot']})", ""]
    return lines


def sampling_section(result: dict) -> list[str]:
    def shown(setting: dict) -> str:
        return ", ".join(f"{key} {value:g}" for key, value in setting.items())

    lines = [*_heading(result),
             f"Model `{result['model']}`; {result['prompts']} validation-file beginnings, {result['tokens']} tokens "
             f"each; in all {result['seconds']:.0f} s. Lines are the continuations' complete non-blank lines.", "",
             "| setting | lines | valid before the first error | code | new code (score) |", "|---|---:|---:|---:|---:|"]
    for entry in result["tried"]:
        name = shown(entry["setting"])
        name = f"**{name}**" if entry["setting"] == result["best"] else name
        lines.append(f"| {name} | {entry['lines']} | {entry['valid']} | {entry['code']} | "
                     f"{entry['new_code']} ({entry['score']:.2f}) |")
    return lines + ["", f"Chosen: {shown(result['best'])} (before: {shown(result['previous']) or 'none'}).", ""]


def train_memory_section(result: dict) -> list[str]:
    lines = [*_heading(result),
             f"`{result['preset']}` training preset, and the same with its layer pattern repeated to more layers; "
             f"{result['measure']}.", "",
             "| layers | tokens | reversible | ordinary residual | reversible ÷ ordinary |", "|---:|---:|---:|---:|---:|"]

    def shown(entry: dict) -> str:
        return f"{entry['peak_bytes'] / 2**20:,.0f} MiB" if entry["fits"] else "does not fit"

    for row in result["rows"]:
        rev, plain = row["reversible"], row["ordinary"]
        ratio = _ratio(rev["peak_bytes"], plain["peak_bytes"]) if rev["fits"] and plain["fits"] else "n/a"
        lines.append(f"| {row['layers']} | {row['tokens']:,} | {shown(rev)} | {shown(plain)} | {ratio} |")
    return lines + [""]


def _section(results: list[dict], render, title: str, intro: str, *, gpu: bool = True) -> list[str]:
    lines = [title, "", intro, ""]
    if gpu and not any(r.get("device_type", r.get("device")) == "cuda" for r in results):
        lines += ["GPU numbers: pending (no GPU run recorded yet).", ""]
    for result in results:
        lines += render(result)
    return lines


# (benchmark name in the JSON, renderer, title, introduction, whether a GPU result is expected)
SECTIONS = [
    ("gpu_tests", gpu_tests_section,
     "## Correctness on the GPU",
     "`REFORMER_GPU_RESULTS=bench/results/gpu-tests-cuda.json python -m pytest -m gpu tests/test_gpu.py`: the fused "
     "kernel against the plain-torch path, the forward against the reference, half precision with and without the "
     "kernel, CUDA graphs against eager steps, each with its tolerance (`tests/test_gpu.py`).",
     True),
    ("gpu_campaign", campaign_section,
     "## The GPU campaign",
     "`python -m bench.gpu_campaign OUT` runs every GPU measurement below in one command within about 9 minutes of "
     "one H100/H200, and judges the speed targets (`bench.targets`); `--smoke` runs it at tiny sizes on a CPU, as "
     "the test suite does.",
     True),
    ("recipes", recipes_section,
     "## Default model: training recipes at equal wall time",
     "`python -m training.compare`: the candidate recipes for the default model (`training.train.PRESETS`), each "
     "trained from scratch for the same minutes on the same machine.",
     False),
    ("eval_default", eval_section,
     "## Default model: bits per byte against the compressors",
     "`python -m training.evaluate` (see `model/default/MODEL_CARD.md`): the embedded model and gzip, bz2 and "
     "xz on exactly the same bytes, computed in the same run.",
     False),
    ("sampling_default", sampling_section,
     "## Default model: sampling defaults chosen by what it writes",
     "`python -m training.choose_sampling --apply`: each candidate setting continues the same prompts; the share of "
     "lines that are valid, new lines of code (not docstring or comment text, not a repeat) picks the defaults in "
     "`model/default/generation_config.json`.",
     False),
    ("train_memory", train_memory_section,
     "## Training memory: reversible layers vs ordinary residual layers",
     "`python -m bench.bench_train_memory`: one training step (forward and backward) of the same model on the "
     "same tokens, each in a fresh process (the paper's claim: activations stored once, not per layer; the "
     "issue's target at 64K tokens on a GPU: reversible ≤ 1/3 of ordinary).",
     True),
    ("server", server_section,
     "## Server: the engine alone vs streamed end to end",
     "`python -m bench.bench_server`: the same engine driven in-process and through a real server on 127.0.0.1 "
     "with concurrent SSE clients; the first byte of a stream is its first prefill-progress comment "
     "(`stream_options.include_progress`; results before 2026-12-01 counted an `: accepted` comment sent at once).",
     True),
    ("choices", choices_section,
     "## n choices from one prefill vs n separate requests",
     "`python -m bench.bench_choices`: the server's engine in-process; `n` copies the prompt's cache (keys, "
     "values, LSH bucket indexes) into n decode slots instead of computing the prompt n times.",
     True),
    ("fuzz", fuzz_section,
     "## Schema-driven fuzzing of the HTTP API",
     "`python -m bench.fuzz_server`: schemathesis generates bodies for every POST route from `/openapi.json` "
     "(valid and invalid ones) against the embedded default model on 127.0.0.1; a server error (5xx) fails.",
     False),
    ("export", export_section,
     "## ONNX: onnxruntime vs PyTorch eager",
     "`python -m bench.bench_export`: the core benchmark's model exported (`python -m export`) and run by "
     "onnxruntime beside the same model in PyTorch eager (no CUDA graphs), same process.",
     True),
    ("cache", cache_section,
     "## Decode cache: memory per sequence",
     "`python -m bench.bench_cache`: the decoder's own sizing, before and after local layers kept only the window "
     "their step reads (a ring of `local_attn_chunk_length × (local_num_chunks_before + 1)` positions) and LSH "
     "layers' positions moved into blocks each request borrows for its prompt and `max_tokens` (`model.blocks`).",
     False),
    ("image", image_section,
     "## The container image",
     "`deploy/check_image.sh --result bench/results/image-cpu.json`: builds the image with docker or podman, runs it "
     "read-only with every capability dropped, and checks it over HTTP (`../shared/docs/container-build.md` says how "
     "it runs on a machine without a Docker engine). The GPU image needs the `nvidia/cuda` base from a registry.",
     True),
    ("loadtest", loadtest_section,
     "## Load test: capacity under a latency gate",
     "`python -m bench.loadtest.run --sweep ...`: locust (mixed streaming, non-streaming and 1K-to-context embedding "
     "users) at increasing user counts until a gate fails.",
     True),
]


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0]).parse_args(argv)
    results = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    core = [r for r in results if r.get("benchmark") == "core"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json`; do not edit by hand. "
        "Each JSON file is written by a benchmark script that runs our code and the competitor in the same run "
        "on the same device.",
        "",
        "## Model core: decoding with cached LSH buckets and the full forward",
        "",
        "`python -m bench.bench_core` (competitor: transformers' `ReformerModelWithLMHead`, its "
        "`past_buckets_states` cache for decoding).",
        "",
    ]
    if not any(r["device_type"] == "cuda" for r in core):
        lines += ["GPU numbers: pending (no GPU run recorded yet).", ""]
    for result in sorted(core, key=lambda r: r["device_type"] != "cuda"):
        lines += core_section(result)
    for benchmark, render, title, intro, gpu in SECTIONS:
        lines += _section([r for r in results if r.get("benchmark") == benchmark], render, title, intro, gpu=gpu)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
