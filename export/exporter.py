"""Export a model's prefill and decode graphs to ONNX, check them, and describe them in a manifest.

Prefill lengths fall into up to three regimes, one graph each, because which layers take the reference's
short path (plain attention when the length is at most a layer's chunk) is decided by the length:
- `prefill_short`: 2 .. the smallest chunk (every layer plain; a 1-token prompt too, checked in the tests);
- `prefill_mid`: exactly the largest chunk, when the padding multiple equals it and the chunks differ
  (only the layers with the largest chunk plain);
- `prefill`: multiples of the padding multiple above the largest chunk (every layer bucketed/chunked).
The decode graph is tied to a slot pool (slots, max length, tail capacity): its caches are inputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from model.blocks import blocks_for
from model.checkpoint import WEIGHTS
from model.decode import BLOCK_SIZE, Decoder
from model.reformer import ReformerLM

from .graphs import DecodeGraph, PrefillGraph
from .runtime import FORMAT, code_digest, model_digest

OPSET = 18


def prefill_regimes(config) -> list[dict]:
    """Length regimes of the prefill graphs: name, smallest and largest length, step."""
    smallest, largest, multiple = config.min_chunk_length, max(config._chunk_lengths()), config.padding_multiple
    regimes = [{"name": "prefill_short", "min": 1, "max": smallest, "multiple": 1}]
    if smallest < largest and multiple == largest:
        regimes.append({"name": "prefill_mid", "min": largest, "max": largest, "multiple": largest})
    top = config.max_positions - config.max_positions % multiple
    first = (largest // multiple + 1) * multiple
    if first <= top:
        regimes.append({"name": "prefill", "min": first, "max": top, "multiple": multiple})
    return regimes


def _describe(model: onnx.ModelProto) -> dict:
    def tensors(values):
        return [{"name": v.name, "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": tensors(model.graph.input), "outputs": tensors(model.graph.output)}


def _check(path: Path) -> onnx.ModelProto:
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    random_ops = sorted({n.op_type for n in model.graph.node if n.op_type.startswith("Random")})
    if random_ops:
        raise RuntimeError(f"{path.name} contains random operators {random_ops}: hashing must be deterministic")
    return model


def export_model(model: ReformerLM, out: str | Path, *, slots: int, max_length: int, tail_capacity: int = 64,
                 cache_blocks: int | None = None, block_size: int = BLOCK_SIZE, source: str | Path | None = None,
                 progress: Callable[[str], None] = print) -> dict:
    """Write the graphs and manifest.json into `out`; returns the manifest. Without `cache_blocks`, every slot
    can reach `max_length` at once: the pool a server plans when its cache budget holds that much."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # graphs half rewritten must not pass for the old ones
    model = model.eval()
    config = model.config
    if cache_blocks is None:  # written as a number, as the server's plan writes it, so the two can match
        cache_blocks = slots * blocks_for(max_length, block_size) if "lsh" in config.attn_layers else 0
    manifest = {"format": FORMAT, "opset": OPSET, "dtype": str(model.dtype).removeprefix("torch."),
                "model": model_digest(model), "code": code_digest(), "config": config.to_dict(), "graphs": {},
                "torch": torch.__version__,
                "pool": {"slots": slots, "max_length": max_length, "tail_capacity": tail_capacity,
                         "cache_blocks": cache_blocks, "block_size": block_size}}
    if source is not None and (Path(source) / WEIGHTS).exists():
        digest = hashlib.sha256((Path(source) / WEIGHTS).read_bytes()).hexdigest()
        manifest["source"] = {"path": str(source), "sha256": digest}
    prefill = PrefillGraph(model).eval()
    for regime in prefill_regimes(config):
        started = time.perf_counter()
        progress(f"exporting {regime['name']} (lengths {regime['min']}..{regime['max']}, step {regime['multiple']})")
        example = min(regime["max"], max(2 * regime["multiple"], regime["min"], 2))
        ids = torch.full((2, example), 3, dtype=torch.long)
        mask = torch.ones(2, example, dtype=torch.bool)
        mask[1, -1] = False
        batch = torch.export.Dim("batch", min=1, max=1024)
        if regime["min"] == regime["max"]:
            length = None  # one length: a static dimension
        elif regime["multiple"] == 1:
            length = torch.export.Dim("length", min=2, max=regime["max"])
        else:
            length = regime["multiple"] * torch.export.Dim("n", min=regime["min"] // regime["multiple"],
                                                           max=regime["max"] // regime["multiple"])
        shapes = {"input_ids": {0: batch, **({1: length} if length is not None else {})},
                  "attention_mask": {0: batch, **({1: length} if length is not None else {})}}
        path = out / f"{regime['name']}.onnx"
        with torch.no_grad():
            torch.onnx.export(prefill, (ids, mask), str(path), dynamo=True, dynamic_shapes=shapes, opset_version=OPSET,
                              external_data=False, verbose=False)
        manifest["graphs"][regime["name"]] = {"file": path.name, **regime, **_describe(_check(path))}
        progress(f"  {path.name}: {path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    progress(f"exporting decode (pool of {slots} slots x {max_length} tokens, tail {tail_capacity})")
    decoder = Decoder(model, num_slots=slots, max_length=max_length, tail_capacity=tail_capacity, cuda_graphs=False,
                      cache_blocks=cache_blocks, block_size=block_size)
    lsh = [i for i, kind in enumerate(config.attn_layers) if kind == "lsh"]
    caches = (*decoder.kv, *[decoder.index[i].main for i in lsh], *[decoder.index[i].tail for i in lsh])
    # tokens, slots, positions, main lengths, tail lengths, hashed flags of two example sequences
    step_inputs = tuple(torch.tensor(pair) for pair in ([3, 4], [0, min(1, slots - 1)], [40, 41], [40, 41], [0, 0],
                                                         [1, 1]))
    batch = torch.export.Dim("batch", min=1, max=max(2, slots))  # a dimension needs a range: one slot is 1..2
    with torch.no_grad():
        inputs = (*step_inputs, decoder.blocks.table, *caches)
        program = torch.export.export(DecodeGraph(model).eval(), inputs,
                                      dynamic_shapes=(*[{0: batch}] * 6, None, tuple(None for _ in caches)))
        path = out / "decode.onnx"
        torch.onnx.export(program, inputs, str(path), dynamo=True, opset_version=OPSET,
                          external_data=False, verbose=False)
    manifest["graphs"]["decode"] = {"file": path.name, **_describe(_check(path))}
    progress(f"  {path.name}: {path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - started:.0f} s")
    # Last and whole (a rename): a manifest names graphs that were all written, or there is none.
    (out / "manifest.json.partial").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "manifest.json.partial").replace(out / "manifest.json")
    return manifest
