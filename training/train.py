"""Train a byte-level Reformer on the standard library's source (`training.corpus`) with reversible backprop.

    python -m training.train --preset cpu --out runs/cpu              # or --preset gpu on a CUDA machine
    python -m training.train --preset cpu --out runs/cpu --resume     # continue from runs/cpu/checkpoint
    python -m training.train ... --export model/default               # also write the fp16 serving checkpoint

Training windows are random slices of the train stream (files joined by end-of-sequence), the length of the
model's context, so every position embedding is trained. AdamW with linear warm-up and cosine decay,
gradient clipping, bf16 autocast on CUDA, periodic evaluation on fixed validation windows, and checkpoints
(safetensors weights and optimizer state, JSON progress) that `--resume` continues exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
from model.tokenizer import ByteTokenizer

from . import corpus
from .reversible import reversible_stack

LN2 = math.log(2)


def model_config(context: int, hidden: int, layers: tuple[str, ...], heads: int, ff: int, chunk: int,
                 **changes) -> ReformerConfig:
    """A byte-level decoder whose axial position grid covers exactly `context` positions."""
    rows = 2 ** (int(math.log2(context)) // 2)
    columns = context // rows
    buckets = max(2, 2 * context // chunk)  # the paper's rule: about two buckets per chunk
    num_buckets = buckets if buckets <= 128 else (16, buckets // 16)
    axial_dims = (hidden // 4, hidden - hidden // 4)
    config = ReformerConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=hidden, num_attention_heads=heads,
        attention_head_size=hidden // heads, attn_layers=layers, feed_forward_size=ff, hidden_act="gelu",
        axial_pos_shape=(rows, columns), axial_pos_embds_dim=axial_dims, max_position_embeddings=context,
        lsh_attn_chunk_length=chunk, local_attn_chunk_length=chunk, num_buckets=num_buckets, num_hashes=1,
        lsh_num_chunks_before=1, local_num_chunks_before=1, pad_token_id=0, eos_token_id=2,
        lm_head_bias=True, axial_norm_std=0.02, chunk_size_feed_forward=4096)
    return dataclasses.replace(config, **changes)


@dataclass
class TrainSettings:
    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 8
    checkpoint_every: int = 100
    seed: int = 1234


# What each kind of machine trains. cpu: sized for about two hours on 2 cores at the measured ~5,400 tokens/s
# (the shipped model); gpu: sized for about 20 minutes of one H100 at an assumed ~120K tokens/s, not yet
# run; tiny: the tests.
PRESETS = {
    "cpu": (lambda: model_config(16384, 256, ("local", "lsh", "local", "lsh"), 4, 768, 64),
            TrainSettings(steps=2200, batch=1, lr=2e-3, warmup=80, eval_every=200)),
    "gpu": (lambda: model_config(65536, 512, ("local", "lsh") * 3, 8, 2048, 128),
            TrainSettings(steps=1100, batch=2, lr=1e-3, warmup=60, eval_every=200, checkpoint_every=100)),
    "tiny": (lambda: model_config(1024, 64, ("local", "lsh"), 2, 128, 32),
             TrainSettings(steps=40, batch=2, lr=3e-3, warmup=4, eval_every=20, eval_windows=2,
                           checkpoint_every=20)),
}


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

    def __init__(self, ids: np.ndarray, length: int, seed: int):
        if len(ids) <= length + 1:
            raise ValueError(f"stream of {len(ids)} tokens is too short for windows of {length}")
        self.ids, self.length = torch.from_numpy(ids), length
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch: int) -> Tensor:
        starts = torch.randint(0, len(self.ids) - self.length - 1, (batch,), generator=self.generator)
        return torch.stack([self.ids[s: s + self.length + 1] for s in starts.tolist()])

    def evenly_spaced(self, count: int) -> Tensor:
        """Fixed windows spread over the whole stream (validation)."""
        starts = np.linspace(0, len(self.ids) - self.length - 1, count).astype(np.int64)
        return torch.stack([self.ids[s: s + self.length + 1] for s in starts])


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: ReformerLM, settings: TrainSettings) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases, embeddings or position tables)."""
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        matrix = parameter.ndim == 2 and not name.startswith("embed.")
        (decay if matrix else plain).append(parameter)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: ReformerLM, windows: Tensor, device: torch.device, autocast: bool) -> float:
    """Bits per byte of the validation windows."""
    model.eval()
    total = 0.0
    for row in windows:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            total += language_model_loss(model, row[None].to(device), reversible=False).item()
    model.train()
    return total / len(windows) / LN2


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


# ---- the loop ----------------------------------------------------------------------------------------
def train(config: ReformerConfig, settings: TrainSettings, out: Path, *, device: torch.device,
          resume: bool = False, reversible: bool = True, log_every: int = 10, until: int | None = None) -> ReformerLM:
    """Train (or continue) to `settings.steps`; `until` pauses after that step (resume continues exactly)."""
    torch.manual_seed(settings.seed)
    context = config.max_positions
    train_windows = Windows(corpus.stream_ids(corpus.stream(corpus.source_files("train"))), context, settings.seed)
    validation = Windows(corpus.stream_ids(corpus.stream(corpus.source_files("validation"))), context, 0)
    validation_windows = validation.evenly_spaced(settings.eval_windows)
    autocast = device.type == "cuda"
    checkpoint = out / "checkpoint"

    if resume and (checkpoint / "progress.json").exists():
        model, optimizer, progress = load_checkpoint(checkpoint, settings, train_windows, device)
        print(f"resumed at step {progress['step']}")
    else:
        model = ReformerLM(config).to(device).train()
        optimizer = make_optimizer(model, settings)
        progress = {"step": 0, "tokens": 0, "seconds": 0.0, "history": []}

    started = time.perf_counter() - progress["seconds"]
    bar = tqdm(range(progress["step"], settings.steps), initial=progress["step"], total=settings.steps,
               unit="step", dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    for step in bar:
        if until is not None and step >= until:
            break
        rate = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = train_windows.sample(settings.batch).to(device)
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
        train_bpb = loss.item() / LN2  # one host synchronisation per step
        if done % log_every == 0 or done == settings.steps:
            speed = window_tokens / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{train_bpb:.3f} bpb", tok_s=f"{speed:,.0f}", grad=f"{norm.item():.2f}")
            window_tokens, window_start = 0, time.perf_counter()
        record = {"step": done, "train_bpb": round(train_bpb, 4), "lr": rate}
        if done % settings.eval_every == 0 or done == settings.steps:
            record["validation_bpb"] = round(evaluate(model, validation_windows, device, autocast), 4)
            bar.write(f"step {done}: validation {record['validation_bpb']:.4f} bits/byte")
        progress["history"].append(record)
        progress["step"] = done
        progress["seconds"] = time.perf_counter() - started
        if done % settings.checkpoint_every == 0 or done in (settings.steps, until):
            save_checkpoint(checkpoint, model, optimizer, progress, train_windows)
    bar.close()
    return model


def export(model: ReformerLM, directory: Path, out: Path, device: torch.device, preset: str) -> None:
    """The serving checkpoint: fp16 weights (hash rotations stay fp32) and the training record."""
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    summary = {key: progress[key] for key in ("step", "tokens", "seconds")}
    summary["preset"] = preset
    summary.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   threads=torch.get_num_threads(), python=sys.version.split()[0])
    save_model(model.eval(), directory, dtype=torch.float16, metadata={"training": json.dumps(summary)})
    (directory / "training.json").write_text(json.dumps(dict(summary, history=progress["history"])) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoint/ inside)")
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    parser.add_argument("--until", type=int, help="pause after this step (to split a run over sessions)")
    parser.add_argument("--ordinary", action="store_true", help="plain autograd instead of reversible backprop")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--export", type=Path, help="write the fp16 serving checkpoint here at the end")
    args = parser.parse_args(argv)
    make_config, settings = PRESETS[args.preset]
    if args.steps:
        settings = dataclasses.replace(settings, steps=args.steps)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    config = make_config()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{args.preset} preset on {device}: context {config.max_positions}, "
          f"{ReformerLM(config).num_parameters():,} parameters, {settings.steps} steps of "
          f"{settings.batch} x {config.max_positions} tokens, {'ordinary' if args.ordinary else 'reversible'} backprop")
    model = train(config, settings, args.out, device=device, resume=args.resume, reversible=not args.ordinary,
                  until=args.until)
    if args.export:
        export(model, args.export, args.out, device, args.preset)
        print(f"serving checkpoint written to {args.export}")


if __name__ == "__main__":
    main()
