"""Train a Reformer on the standard library's source (`training.corpus`) with reversible backprop.

    python -m training.train --preset cpu --out runs/cpu              # or --preset gpu on a CUDA machine
    python -m training.train --preset cpu --out runs/cpu --resume     # continue from runs/cpu/checkpoint
    python -m training.train ... --export model/default               # the fp16 serving checkpoint (else OUT/export)
    python -m training.train --preset cpu-v1 --out runs/a --minutes 9 # a recipe for a fixed wall time
    python -m training.train --preset cpu-long --out runs/b --from model/default --minutes 600  # see below

A recipe (`PRESETS`) is a model shape, a tokenizer (bytes, or a SentencePiece vocabulary learned from the train
split, `training.subwords`) and a batch plan. Training windows are random slices of the train stream (files
joined by end-of-sequence). A step reads either `batch` windows of the whole context, so every position
embedding trains, or, with `short_context`, `short_batch` short windows from as many places in the corpus,
which averages each gradient over more files for fewer tokens; every `long_every`-th step is a long one. AdamW
with linear warm-up and cosine decay (over steps, or over wall time with `--minutes`), gradient clipping, bf16
autocast on CUDA, evaluation in bits per byte on the beginnings of fixed validation files (the same bytes
whatever the tokenizer), and checkpoints (safetensors weights and optimizer state, JSON progress) that
`--resume` continues exactly. `--from MODEL_DIR` continues a serving checkpoint whose run directory is gone: its
fp16 weights upcast, its training record, and a fresh optimizer whose rate warms up again over the preset's
warm-up steps (new Adam moments would otherwise take full-rate steps of one sign per weight).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from model.checkpoint import load_model, save_model
from model.config import ReformerConfig
from model.reformer import ReformerLM
from model.tokenizer import ByteTokenizer, Tokenizer

from . import corpus
from .reversible import reversible_stack
from .subwords import SPIECE, encode_files, make_tokenizer, source_text, token_bytes

LN2 = math.log(2)


def model_config(context: int, hidden: int, layers: tuple[str, ...], heads: int, ff: int, chunk: int,
                 vocab_size: int = ByteTokenizer.vocab_size, **changes) -> ReformerConfig:
    """A decoder whose axial position grid covers exactly `context` positions."""
    rows = 2 ** (int(math.log2(context)) // 2)
    columns = context // rows
    buckets = max(2, 2 * context // chunk)  # the paper's rule: about two buckets per chunk
    num_buckets = buckets if buckets <= 128 else (16, buckets // 16)
    axial_dims = (hidden // 4, hidden - hidden // 4)
    config = ReformerConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_attention_heads=heads,
        attention_head_size=hidden // heads, attn_layers=layers, feed_forward_size=ff, hidden_act="gelu",
        axial_pos_shape=(rows, columns), axial_pos_embds_dim=axial_dims, max_position_embeddings=context,
        lsh_attn_chunk_length=chunk, local_attn_chunk_length=chunk, num_buckets=num_buckets, num_hashes=1,
        lsh_num_chunks_before=1, local_num_chunks_before=1, pad_token_id=0, eos_token_id=2,
        lm_head_bias=True, axial_norm_std=0.02, chunk_size_feed_forward=4096)
    return dataclasses.replace(config, **changes)


@dataclass
class TrainSettings:
    steps: int
    batch: int  # windows of the whole context in a long step
    lr: float
    warmup: int
    tokenizer: str = "bytes"  # or "sentencepiece:N"
    short_context: int | None = None  # if set, short steps read short_batch windows of this length
    short_batch: int = 8
    long_every: int = 8  # with short_context: every long_every-th step reads whole-context windows
    minutes: float | None = None  # a wall-time budget: the schedule follows whichever of steps and time is further
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_files: int = 8
    eval_bytes: int = 16000  # each validation file is scored from its start up to about this many bytes
    checkpoint_every: int = 100
    seed: int = 1234


FOUR_LAYERS = ("local", "lsh", "local", "lsh")
SUBWORDS = "sentencepiece:4096"

# What each kind of machine trains, as (config for a vocabulary size, settings).
# cpu-v1: the first shipped model (2,200 steps of one 16K window, 114 minutes on 2 cores). cpu-mixed, cpu-sp and
# cpu-sp-deep: what `training.compare` measured against it at equal wall time (warm-up shortened to 10 steps for
# runs of minutes). cpu: the winner, for 55 minutes by the clock. gpu: 7 minutes of one H100/H200 by the
# clock (its schedule follows the time, so it fits a lent GPU's minutes at whatever speed), not yet run. tiny: the
# tests.
V1_MODEL = (16384, 256, FOUR_LAYERS, 4, 768, 64)
DEEP_MODEL = (16384, 192, ("local", "lsh") * 3, 4, 576, 64)
V1 = TrainSettings(steps=2200, batch=1, lr=2e-3, warmup=80, eval_every=200)
COMPARED = dataclasses.replace(V1, warmup=10, eval_every=25)
MIXED = dataclasses.replace(COMPARED, short_context=1024, short_batch=8)
PRESETS = {
    "cpu-v1": (lambda vocab: model_config(*V1_MODEL, vocab), V1),
    "cpu-v1-short-warmup": (lambda vocab: model_config(*V1_MODEL, vocab), COMPARED),
    "cpu-mixed": (lambda vocab: model_config(*V1_MODEL, vocab), MIXED),
    "cpu-sp": (lambda vocab: model_config(*V1_MODEL, vocab), dataclasses.replace(MIXED, tokenizer=SUBWORDS)),
    "cpu-sp-deep": (lambda vocab: model_config(*DEEP_MODEL, vocab), dataclasses.replace(MIXED, tokenizer=SUBWORDS)),
    "gpu": (lambda vocab: model_config(65536, 512, ("local", "lsh") * 3, 8, 2048, 128, vocab),
            TrainSettings(steps=1_000_000, minutes=7.0, batch=2, lr=1e-3, warmup=60, eval_every=200,
                          checkpoint_every=100, short_context=4096, short_batch=32, tokenizer=SUBWORDS,
                          eval_bytes=200_000)),
    "tiny": (lambda vocab: model_config(1024, 64, ("local", "lsh"), 2, 128, 32, vocab),
             TrainSettings(steps=40, batch=2, lr=3e-3, warmup=4, eval_every=20, eval_files=2, eval_bytes=1000,
                           checkpoint_every=20)),
}
# The winner of the comparison (bench/results/recipes.json), for 55 minutes of this machine by the clock; and the
# same recipe over about two and a half hours of it (~7 s a step), run a session at a time with --until and
# --resume. (v3 ran 500 steps on a 1,500-step schedule, 200 on this one, and its last 250 with --steps 950 when its
# second session ran short of time; the schedule is per step, so each change only bent the learning-rate curve.
# v4 continued v3's checkpoint with `--resume --minutes 280`: the schedule then follows the clock from v3's 152
# recorded minutes, so the rate restarted at about half the peak and fell to a tenth of it by minute 280; v5
# continued v4's the same way with `--minutes 385`, restarting at a quarter of the peak; v6 continued v5's with
# `--minutes 490`, restarting at a fifth; v7 continued the served v6 with `--from model/default --minutes 605`,
# its run directory having been lost, with a fresh optimizer warmed up again to about a sixth of the peak.)
PRESETS["cpu"] = (PRESETS["cpu-sp"][0], dataclasses.replace(PRESETS["cpu-sp"][1], minutes=55.0, steps=1_000_000,
                                                            warmup=20, eval_every=100))
PRESETS["cpu-long"] = (PRESETS["cpu-sp"][0], dataclasses.replace(PRESETS["cpu-sp"][1], steps=1300, warmup=40,
                                                                 eval_every=100))


def language_model_loss(model: ReformerLM, ids: Tensor, *, reversible: bool = True) -> Tensor:
    """Mean next-token cross-entropy (nats) of (B, T+1) ids; reversible=False keeps every activation."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(inputs.shape[1], device=ids.device)
    x = model.embed(inputs, positions)
    if reversible:
        x1, x2 = reversible_stack(x, model.layers)
    else:
        x1 = x2 = x
        for block in model.layers:
            x1, x2, _ = block(x1, x2)
    logits = model.logits(model.final_hidden(x1, x2))
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class Windows:
    """Random (B, T+1) slices of a token stream; the generator's state is part of the checkpoint."""

    def __init__(self, ids: np.ndarray, seed: int):
        self.ids = torch.from_numpy(ids)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch: int, length: int) -> Tensor:
        if len(self.ids) <= length + 1:
            raise ValueError(f"stream of {len(self.ids)} tokens is too short for windows of {length}")
        starts = torch.randint(0, len(self.ids) - length - 1, (batch,), generator=self.generator)
        return torch.stack([self.ids[s: s + length + 1] for s in starts.tolist()])


def vocabulary_size(tokenizer: str) -> int:
    """The vocabulary a recipe's tokenizer will have: 258 for bytes, N for "sentencepiece:N"."""
    return ByteTokenizer.vocab_size if tokenizer == "bytes" else int(tokenizer.partition(":")[2])


def step_windows(step: int, settings: TrainSettings, context: int) -> tuple[int, int]:
    """(windows, length) that step `step` reads: a long step, or as many tokens in short windows."""
    short = settings.short_context
    if short is None or step % settings.long_every == settings.long_every - 1:
        return settings.batch, context
    return settings.short_batch, short


def schedule_fraction(step: int, seconds: float, settings: TrainSettings) -> float:
    """How far the run is: by steps, or by wall time when it has a budget, whichever is further."""
    fraction = step / settings.steps
    return max(fraction, seconds / (60 * settings.minutes)) if settings.minutes else fraction


def learning_rate(step: int, settings: TrainSettings, seconds: float = 0.0, rewarm_from: int | None = None) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the end of the schedule; a run continued with
    a fresh optimizer at step `rewarm_from` warms up again from there to the schedule's rate."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    warm = settings.warmup / settings.steps
    progress = (schedule_fraction(step, seconds, settings) - warm) / max(1e-9, 1 - warm)
    rate = settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress)))))
    if rewarm_from is not None and step - rewarm_from < settings.warmup:
        rate *= (step - rewarm_from + 1) / settings.warmup
    return rate


@dataclass
class ValidationText:
    """The beginning of a validation file as the model reads it: end of sequence, then its tokens."""
    ids: Tensor  # (T+1,)
    bytes: int  # bytes of text the T predicted tokens stand for


def validation_texts(tokenizer: Tokenizer, settings: TrainSettings, context: int) -> list[ValidationText]:
    """The first ~eval_bytes (whole lines) of eval_files validation files spread over the split: the same bytes
    for every tokenizer, so recipes compare in bits per byte."""
    files = corpus.source_files("validation")
    long_enough = [f for f in files if len(f.data) >= settings.eval_bytes // 2]
    if len(long_enough) < settings.eval_files:  # long windows (the GPU preset): the longest files there are
        long_enough = sorted(sorted(files, key=lambda f: -len(f.data))[: settings.eval_files], key=lambda f: f.path)
    picks = np.linspace(0, len(long_enough) - 1, settings.eval_files).round().astype(int)
    texts = []
    for index in picks:
        text = source_text(long_enough[index].data)
        end = text.find("\n", settings.eval_bytes - 200)
        text = text[: end + 1] if 0 <= end < settings.eval_bytes else text[: settings.eval_bytes]
        ids = tokenizer.encode(text)[: context]
        texts.append(ValidationText(torch.tensor([tokenizer.eos_id] + ids), int(token_bytes(tokenizer, ids).sum())))
    return texts


def make_optimizer(model: ReformerLM, settings: TrainSettings) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases, embeddings or position tables)."""
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        matrix = parameter.ndim == 2 and not name.startswith("embed.")
        (decay if matrix else plain).append(parameter)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: ReformerLM, texts: list[ValidationText], device: torch.device, autocast: bool) -> float:
    """Bits per byte of the validation texts: all their tokens' bits over all their bytes."""
    model.eval()
    nats = 0.0
    for text in texts:
        ids = text.ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids[None, :-1])[0]  # the full forward pads to whole chunks
        nats += F.cross_entropy(logits.float(), ids[1:], reduction="sum").item()
    model.train()
    return nats / sum(text.bytes for text in texts) / LN2


# ---- checkpoints -------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, model: ReformerLM, optimizer: torch.optim.Optimizer, progress: dict,
                    windows: Windows) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory)
    tensors, layout = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value.detach().cpu().reshape(-1) if value.ndim == 0 else value.detach().cpu()
            layout[f"{index}.{key}"] = list(value.shape)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    cuda_rng = torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None
    progress = dict(progress, optimizer_layout=layout, data_rng=windows.generator.get_state().tolist(),
                    torch_rng=torch.get_rng_state().tolist(), cuda_rng=cuda_rng)
    (directory / "progress.json").write_text(json.dumps(progress) + "\n")


def load_checkpoint(directory: Path, settings: TrainSettings, windows: Windows,
                    device: torch.device) -> tuple[ReformerLM, torch.optim.Optimizer, dict]:
    """The model, optimizer and progress saved by `save_checkpoint`; random generators are restored too."""
    model = load_model(directory).to(device).train()
    progress = json.loads((directory / "progress.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    optimizer = make_optimizer(model, settings)
    state = optimizer.state_dict()
    for name, shape in progress.pop("optimizer_layout").items():
        index, key = name.split(".", 1)
        state["state"].setdefault(int(index), {})[key] = tensors[name].reshape(shape)  # load_state_dict places them
    optimizer.load_state_dict(state)
    windows.generator.set_state(torch.tensor(progress.pop("data_rng"), dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(progress.pop("torch_rng"), dtype=torch.uint8))
    cuda_rng = progress.pop("cuda_rng", None)
    if cuda_rng is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(cuda_rng, dtype=torch.uint8), device)
    return model, optimizer, progress


def start_from_served(model_dir: Path, config, settings: TrainSettings, windows: Windows,
                      device: torch.device) -> tuple[ReformerLM, torch.optim.Optimizer, dict]:
    """A serving checkpoint (`export`'s) as the start of a continued run: fp32 weights, a fresh optimizer, its
    training record; the data order is reseeded at its step so it does not replay the run's first windows."""
    model = load_model(model_dir)
    if model.config != config:
        raise SystemExit(f"{model_dir} is not a model of this preset (its config differs); pick the preset it was "
                         "trained with (its training.json says which)")
    record = json.loads((model_dir / "training.json").read_text())
    model = model.float().to(device).train()
    windows.generator.manual_seed(settings.seed + record["step"])
    progress = {key: record[key] for key in ("step", "tokens", "seconds", "history")}
    progress["restarts"] = record.get("restarts", []) + [record["step"]]
    return model, make_optimizer(model, settings), progress


# ---- the loop ----------------------------------------------------------------------------------------
def prepare_tokenizer(settings: TrainSettings, out: Path) -> Tokenizer:
    """The recipe's tokenizer; a subword vocabulary is learned from the train split once per run directory."""
    return make_tokenizer(settings.tokenizer, corpus.source_files("train"), out)


def train(make_config, settings: TrainSettings, out: Path, *, device: torch.device,
          resume: bool = False, reversible: bool = True, log_every: int = 10, until: int | None = None,
          start_from: Path | None = None) -> ReformerLM:
    """Train (or continue) to `settings.steps` or its time budget; `until` pauses after that step (resume
    continues exactly; `start_from` continues a serving checkpoint). `make_config(vocab_size)` gives the model's
    shape once the tokenizer is known."""
    torch.manual_seed(settings.seed)
    tokenizer = prepare_tokenizer(settings, out)
    config = make_config(tokenizer.vocab_size)
    context = config.max_positions
    train_windows = Windows(encode_files(corpus.source_files("train"), tokenizer), settings.seed)
    validation_windows = validation_texts(tokenizer, settings, context)
    autocast = device.type == "cuda"
    checkpoint = out / "checkpoint"

    if resume and (checkpoint / "progress.json").exists():
        model, optimizer, progress = load_checkpoint(checkpoint, settings, train_windows, device)
        print(f"resumed at step {progress['step']}")
    elif start_from is not None:
        model, optimizer, progress = start_from_served(start_from, config, settings, train_windows, device)
        print(f"continuing {start_from} from step {progress['step']} with a fresh optimizer")
    else:
        model = ReformerLM(config).to(device).train()
        optimizer = make_optimizer(model, settings)
        progress = {"step": 0, "tokens": 0, "seconds": 0.0, "history": []}

    started = time.perf_counter() - progress["seconds"]
    bar = tqdm(range(progress["step"], settings.steps), initial=progress["step"], unit="step", dynamic_ncols=True,
               total=float("inf") if settings.minutes else settings.steps)  # inf: tqdm shows no end (time ends it)
    window_tokens, window_start = 0, time.perf_counter()
    for step in bar:
        seconds = time.perf_counter() - started
        if until is not None and step >= until or schedule_fraction(step, seconds, settings) >= 1:
            break
        rate = learning_rate(step, settings, seconds, rewarm_from=(progress.get("restarts") or [None])[-1])
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = train_windows.sample(*step_windows(step, settings, context)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = language_model_loss(model, batch, reversible=reversible)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens = batch.shape[0] * (batch.shape[1] - 1)
        progress["tokens"] += tokens
        window_tokens += tokens
        done = step + 1
        train_bits = loss.item() / LN2  # bits per token (per byte only for bytes); one host sync per step
        if done % log_every == 0 or done == settings.steps:
            speed = window_tokens / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{train_bits:.3f} bits/token", tok_s=f"{speed:,.0f}", grad=f"{norm.item():.2f}")
            window_tokens, window_start = 0, time.perf_counter()
        record = {"step": done, "train_bits_per_token": round(train_bits, 4), "lr": rate}
        last = done == settings.steps or schedule_fraction(done, time.perf_counter() - started, settings) >= 1
        if done % settings.eval_every == 0 or last:
            record["validation_bpb"] = round(evaluate(model, validation_windows, device, autocast), 4)
            bar.write(f"step {done}: validation {record['validation_bpb']:.4f} bits/byte")
        progress["history"].append(record)
        progress["step"] = done
        progress["seconds"] = time.perf_counter() - started
        if done % settings.checkpoint_every == 0 or last or done == until:
            save_checkpoint(checkpoint, model, optimizer, progress, train_windows)
    bar.close()
    return model


def export(model: ReformerLM, directory: Path, out: Path, device: torch.device, preset: str) -> None:
    """The serving checkpoint: fp16 weights (hash rotations stay fp32) and the training record."""
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    summary = {key: progress[key] for key in ("step", "tokens", "seconds", "restarts") if key in progress}
    summary["preset"] = preset
    settings = PRESETS[preset][1]
    summary["windows"] = {"batch": settings.batch, "short_context": settings.short_context,
                          "short_batch": settings.short_batch, "long_every": settings.long_every}
    summary.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   threads=torch.get_num_threads(), python=sys.version.split()[0])
    subwords = (out / SPIECE).exists()
    save_model(model.eval(), directory, dtype=torch.float16, metadata={"training": json.dumps(summary)},
               tokenizer="sentencepiece" if subwords else "bytes")
    if subwords:
        shutil.copyfile(out / SPIECE, directory / SPIECE)
    else:
        (directory / SPIECE).unlink(missing_ok=True)  # a byte model must not be read with an old vocabulary
    # runs begun before the key said what it measures called bits per token "train_bpb"
    history = [{("train_bits_per_token" if key == "train_bpb" else key): value for key, value in record.items()}
               for record in progress["history"]]
    (directory / "training.json").write_text(json.dumps(dict(summary, history=history)) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoint/ inside)")
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--minutes", type=float, help="train for this wall time (the schedule follows it)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    parser.add_argument("--from", dest="start_from", type=Path, metavar="MODEL_DIR",
                        help="continue this serving checkpoint (its weights and record, a fresh optimizer)")
    parser.add_argument("--until", type=int, help="pause after this step (to split a run over sessions)")
    parser.add_argument("--ordinary", action="store_true", help="plain autograd instead of reversible backprop")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--export", type=Path,
                        help="write the fp16 serving checkpoint here at the end (default: OUT/export)")
    args = parser.parse_args(argv)
    make_config, settings = PRESETS[args.preset]
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.minutes:
        settings = dataclasses.replace(settings, minutes=args.minutes, steps=args.steps or 10**9)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.start_from and (args.start_from / SPIECE).exists() and not (args.out / SPIECE).exists():
        shutil.copyfile(args.start_from / SPIECE, args.out / SPIECE)  # its vocabulary, not a new one
    config = make_config(prepare_tokenizer(settings, args.out).vocab_size)
    budget = f"{settings.minutes:g} minutes" if settings.minutes else f"{settings.steps} steps"
    print(f"{args.preset} preset on {device}: {settings.tokenizer} tokens, context {config.max_positions}, "
          f"{ReformerLM(config).num_parameters():,} parameters, {budget} of {settings.batch} x "
          f"{config.max_positions} tokens, {'ordinary' if args.ordinary else 'reversible'} backprop")
    model = train(make_config, settings, args.out, device=device, resume=args.resume, reversible=not args.ordinary,
                  until=args.until, start_from=args.start_from)
    # every run ends with its serving checkpoint: a run that forgot to ask for it would otherwise need a second
    # `--resume` call just to write it
    export_to = args.export or args.out / "export"
    export(model, export_to, args.out, device, args.preset)
    print(f"serving checkpoint written to {export_to}")


if __name__ == "__main__":
    main()
