"""The default model's card and its position plot, rendered from an evaluation (`training.evaluate`) and the
training record (`training.json`)."""

from __future__ import annotations

import math
from pathlib import Path


def plot(bins: list[dict], baselines: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    middles = [max(1, (b["from"] + b["to"]) / 2) for b in bins]
    axes.plot(middles, [b["bpb"] for b in bins], marker="o", label="default model")
    for name, value in baselines.items():
        axes.axhline(value, linestyle="--", linewidth=1, color="gray")
        axes.annotate(name, (middles[0], value), textcoords="offset points", xytext=(2, 3), fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("byte position in the file")
    axes.set_ylabel("bits per byte")
    axes.set_title("Test files longer than 16K bytes: bits per byte by position")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _versus_xz(below: float) -> str:
    return f"{100 * below:.1f}% below xz -9e" if below >= 0 else f"{-100 * below:.1f}% above xz -9e"


def _subwords(result: dict) -> bool:
    return result.get("tokenizer", "bytes") != "bytes"


def _kind(result: dict) -> str:
    return "subword (SentencePiece)" if _subwords(result) else "byte-level"


def _vocabulary(result: dict) -> str:
    if _subwords(result):
        return (f"a SentencePiece BPE vocabulary of {result['model']['vocab_size']:,} pieces learned from the train "
                f"split (`spiece.model`; byte fallback, so any text encodes; 0 padding, 2 end of sequence; "
                f"{result['bytes_per_token']:.2f} bytes per token on the test split)")
    return f"vocabulary {result['model']['vocab_size']} (byte + 2; 0 padding, 2 end of sequence)"


def _windows(training: dict) -> str:
    plan = training.get("windows")
    if not plan or not plan.get("short_context"):
        return "each step reads windows of the whole context"
    return (f"most steps read {plan['short_batch']} windows of {plan['short_context']:,} tokens from as many places, "
            f"every {plan['long_every']}th step {plan['batch']} of the whole context, so long positions train too")


def _buckets(num_buckets) -> str:
    if isinstance(num_buckets, list):
        return f"{math.prod(num_buckets)} ({' x '.join(map(str, num_buckets))} factorised)"
    return str(num_buckets)


def schedule_changes(history: list[dict], fresh_starts: list[int] = ()) -> list[tuple[int, float, float]]:
    """(step, rate before, rate at that step) wherever the learning rate jumped: a run whose schedule was
    shortened or restarted part-way. A jump is a change ten times larger than the steps on either side of it,
    so the warm-up's even climb and the cosine's smooth fall are not jumps; the steps where a run went on with a
    fresh optimizer (`--from`, whose rate warms up again from near zero) are told apart, not counted here."""
    rates = [record["lr"] for record in history]
    changes = []
    for i in range(1, len(rates)):
        neighbours = [abs(rates[j] - rates[j - 1]) for j in (i - 1, i + 1) if 1 <= j < len(rates)]
        jumped = abs(rates[i] - rates[i - 1]) > 10 * max(neighbours, default=0.0) + 1e-9
        if jumped and history[i - 1]["step"] not in fresh_starts:
            changes.append((history[i]["step"], rates[i - 1], rates[i]))
    return changes


def _schedule(training: dict) -> str:
    history, fresh_starts = training.get("history", []), training.get("restarts", [])
    rates = [record["lr"] for record in history]
    if not rates:
        return "linear warm-up then cosine decay"
    told = [f"{'restarted' if after > before else 'shortened'} at step {step:,} ({before:.1e} to {after:.1e})"
            for step, before, after in schedule_changes(history, fresh_starts)]
    told += [f"warmed up again after step {step:,}, where it went on with a fresh optimizer" for step in fresh_starts]
    changed = f"; the schedule was changed part-way: {', '.join(told)}" if told else ""
    return (f"linear warm-up to {max(rates):.1e} then cosine decay, ending at {rates[-1]:.1e}{changed} (every "
            "step's rate is in `training.json`)")


def _continued(training: dict) -> str:
    history, fresh_starts = training.get("history", []), training.get("restarts", [])
    resumed = sum(after > before for _, before, after in schedule_changes(history, fresh_starts))
    told = [f"{'once' if resumed == 1 else f'{resumed} times'} with `--resume` and a longer `--minutes`"] \
        if resumed else []
    told += [f"from its served checkpoint at step {step:,} with `--from` (the run directory with the optimizer's "
             "state was lost)" for step in fresh_starts]
    return f", continued {' and '.join(told)}" if told else ""


def _target(result: dict, training: dict) -> str:
    """The issue's target for where the model was trained (CPU: bz2 -9; GPU: 0.85 of xz -9e), met or by how much
    it is missed."""
    compressors = result["compressors_bpb"]
    gpu = str(training.get("device", "")).startswith("cuda")
    name, target = ("0.85 of xz -9e's", 0.85 * compressors["xz -9e"]) if gpu else ("bz2 -9's", compressors["bz2 -9"])
    gap = result["model_bpb"] - target
    verdict = "met" if gap <= 0 else f"**missed by {gap:.3f}**"
    return (f"The target for a model trained on a {'GPU' if gpu else 'CPU'}, at most {name} figure "
            f"({target:.3f}): {verdict}.")


def _python_lines(result: dict) -> str:
    judged = result.get("python_lines")
    if not judged:
        return ""
    counts = "; ".join(f"{kind}: {entry['valid']} of {entry['lines']}, {entry['code']} of them code"
                       for kind, entry in judged.items())
    return ("Non-blank generated lines that Python's compiler accepts before the first syntax error (`codeop`: an "
            "unfinished block, bracket or string counts as valid so far), over the three prompts, and how many of "
            f"those hold code rather than only docstring or comment text: {counts}.\n\n")


def model_card(result: dict, training: dict, size_bytes: int) -> str:
    config = result["model"]
    history = training["history"]
    validations = [h for h in history if "validation_bpb" in h]
    buckets = result["position_buckets_bpb"]
    compressors = " · ".join(f"{name} {value:.3f}" for name, value in result["compressors_bpb"].items())
    samples = "\n\n".join(
        f"Prompt:\n```python\n{s['prompt']}```\n" + "\n".join(
            f"{kind}:\n```python\n{s['prompt']}{text}\n```" for kind, text in s.items() if kind != "prompt")
        for s in result["samples"])
    return f"""# Model card: the embedded default model (`model/default`)

Generated by `python -m training.evaluate` from the training record and the evaluation; do not edit by hand.

A {_kind(result)} Reformer language model trained from scratch on the Python standard library's source, so that
`python -m server` serves a real model on a fresh machine with no download.

## Data
- The `.py` files of the standard library of Python {training.get('python', '?')} (installed third-party packages
  excluded), gathered by `python -m training.corpus`.
- Split by a hash of each file's path relative to the stdlib root: sha256(path) mod 100 < 90 train, < 95
  validation, else test. Test split here: {result['test_split']['files']} files, {result['test_split']['bytes']:,}
  bytes (sha256 of the stream {result['test_split']['sha256'][:16]}…).
- Training windows are random slices of the train files joined by end-of-sequence tokens: {_windows(training)}.
  The recipe won a comparison at equal wall time (`python -m training.compare`, in BENCHMARKS.md).

## Model
{len(config['attn_layers'])} layers `{', '.join(config['attn_layers'])}`, d={config['hidden_size']},
{config['num_attention_heads']} heads of {config['attention_head_size']}, feed-forward {config['feed_forward_size']}
({config['hidden_act']}), chunks of {config['lsh_attn_chunk_length']} with one chunk of look-back,
{config['num_hashes']} hash round over {_buckets(config['num_buckets'])} buckets, axial positions
{config['axial_pos_shape']} (context {config['max_position_embeddings']:,} tokens), {_vocabulary(result)}.
{result['parameters']:,} parameters; shipped in fp16 ({size_bytes / 1e6:.1f} MB, the hash rotations in fp32).

## Training
`python -m training.train --preset {training.get('preset', 'cpu')}`{_continued(training)}: reversible backprop (block inputs recomputed in
the backward pass with the forward's LSH buckets), chunked feed-forward, AdamW (β 0.9/0.95, weight decay 0.1 on
matrices), {_schedule(training)}, gradient clipping at 1. {training['step']:,} steps,
{training['tokens']:,} tokens ({training['tokens'] * result.get('bytes_per_token', 1) / result['model_train_bytes']:.2f} passes over the train split),
{training['seconds'] / 60:.0f} minutes on {training['device']} ({training.get('threads', '?')} threads).
Final validation: {validations[-1]['validation_bpb'] if validations else float('nan'):.3f} bits per byte.

## Evaluation (test split, {result['date'][:10]}, {result['device']})
- **{result['model_bpb']:.3f} bits per byte**; on the same bytes {compressors}; the model is
  {_versus_xz(result['below_xz'])}. {_target(result, training)} A uniform guess over the vocabulary:
  {result['uniform_bpb']:.2f}.
- By position in the {result['long_files']} test files longer than 16K bytes:
  {' · '.join(f'{k}: {v:.3f}' for k, v in buckets.items())}.

![bits per byte by position](../../bench/results/eval-default.png)

## Samples
{_python_lines(result)}{samples}

## Limitations
- Trained on one corpus (standard-library Python) for a short time: it imitates the stdlib's layout and names,
  and how much of what it writes is even valid Python is counted under Samples; it writes no correct programs
  and knows nothing else. Do not use it for anything but trying the server.
- Text longer than the context cannot be continued beyond it (the server refuses prompts that do not fit).
  Positions far into the context were trained on fewer steps than the first thousand when most steps read
  short windows (see Data).
- LSH buckets were sized for windows of the whole context (about 32 tokens a bucket); in a short text most buckets
  hold a token or two, so a chunk of sorted tokens mixes unrelated buckets. Quality at the start of a text is
  what the 0-1K column above shows.
"""
