"""Loading and saving weights.

Two formats:
- a Hugging Face Reformer checkpoint directory: `config.json` plus `model.safetensors` or
  `pytorch_model.bin` (read with `torch.load(weights_only=True)`, which refuses pickled code), plus
  `spiece.model` when the checkpoint has a SentencePiece vocabulary;
- our own: `reformer.json` (config, tokenizer kind) plus `model.safetensors` (weights, hash rotations included).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ReformerConfig
from .reformer import ReformerLM
from .sampling import InvalidParameter, SamplingParams

OUR_CONFIG = "reformer.json"
WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "pytorch_model.bin"

_LAYER = re.compile(r"^reformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.layer_norm.weight": "attn_norm.weight",
    "attention.layer_norm.bias": "attn_norm.bias",
    "attention.self_attention.query_key.weight": "attn.qk.weight",
    "attention.self_attention.query.weight": "attn.q.weight",
    "attention.self_attention.key.weight": "attn.k.weight",
    "attention.self_attention.value.weight": "attn.v.weight",
    "attention.output.dense.weight": "attn.out.weight",
    "feed_forward.layer_norm.weight": "ff.norm.weight",
    "feed_forward.layer_norm.bias": "ff.norm.bias",
    "feed_forward.dense.dense.weight": "ff.fc_in.weight",
    "feed_forward.dense.dense.bias": "ff.fc_in.bias",
    "feed_forward.output.dense.weight": "ff.fc_out.weight",
    "feed_forward.output.dense.bias": "ff.fc_out.bias",
}
_TOP_NAMES = {
    "reformer.embeddings.word_embeddings.weight": "embed.tokens.weight",
    "reformer.embeddings.position_embeddings.embedding.weight": "embed.positions.table.weight",
    "reformer.encoder.layer_norm.weight": "final_norm.weight",
    "reformer.encoder.layer_norm.bias": "final_norm.bias",
    "lm_head.decoder.weight": "lm_head.weight",
}


class CheckpointError(ValueError):
    pass


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: ReformerConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers `ReformerModelWithLMHead` (or `ReformerModel`) state dict to ours."""
    ours: dict[str, torch.Tensor] = {}
    bias = None
    for name, tensor in state.items():
        if name.startswith("embeddings.") or name.startswith("encoder."):
            name = "reformer." + name  # a bare ReformerModel
        if name in _TOP_NAMES:
            ours[_TOP_NAMES[name]] = tensor
        elif name == "reformer.embeddings.position_embeddings.weights.0":
            ours["embed.positions.row"] = tensor.reshape(tensor.shape[0], tensor.shape[-1])
        elif name == "reformer.embeddings.position_embeddings.weights.1":
            ours["embed.positions.col"] = tensor.reshape(tensor.shape[1], tensor.shape[-1])
        elif name in ("lm_head.bias", "lm_head.decoder.bias"):
            # transformers 4.x tied both names to one tensor; converted trax checkpoints carry a trained one
            if bias is None or torch.any(tensor != 0):
                bias = tensor
        elif match := _LAYER.match(name):
            index, rest = match.groups()
            if rest not in _LAYER_NAMES:
                raise CheckpointError(f"unexpected weight {name!r}")
            ours[f"layers.{index}.{_LAYER_NAMES[rest]}"] = tensor
        elif name.endswith("mask_value_float16") or name.endswith("mask_value_float32"):
            continue  # non-persistent constants of old versions
        else:
            raise CheckpointError(f"unexpected weight {name!r}")
    ours["lm_head_bias"] = bias if bias is not None else torch.zeros(config.vocab_size)
    return ours


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS).exists():
        return load_file(str(directory / WEIGHTS))
    if (directory / LEGACY_WEIGHTS).exists():
        # weights_only refuses to run any pickled code: only tensors and plain containers load.
        return torch.load(directory / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory} has neither {WEIGHTS} nor {LEGACY_WEIGHTS}")


def read_config(directory: str | Path) -> ReformerConfig:
    """A checkpoint directory's config, without its weights: ours (`reformer.json`) or HF's (`config.json`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if (directory / OUR_CONFIG).exists():
        return ReformerConfig.from_dict(json.loads((directory / OUR_CONFIG).read_text())["config"])
    if (directory / "config.json").exists():
        return ReformerConfig.from_hf_dict(json.loads((directory / "config.json").read_text()))
    raise CheckpointError(f"{directory} has neither {OUR_CONFIG} nor config.json")


# Sampling fields a checkpoint's generation_config.json may set as its defaults (vLLM reads the same file).
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                       "frequency_penalty")


def _generation_config(directory: str | Path | None) -> tuple[Path | None, dict]:
    """A checkpoint's `generation_config.json` and what it holds ({} when there is none)."""
    path = Path(directory) / "generation_config.json" if directory is not None else None
    if path is None or not path.exists():
        return path, {}
    return path, json.loads(path.read_text())


def read_default_max_tokens(directory: str | Path | None) -> int | None:
    """`max_new_tokens` of `generation_config.json`: how many tokens a request that names no limit may get
    (vLLM reads it the same way), or None (up to the context)."""
    path, document = _generation_config(directory)
    value = document.get("max_new_tokens")
    if value is not None and (type(value) is not int or value < 1):
        raise CheckpointError(f"{path}: max_new_tokens must be a whole number of at least 1, not {value!r}")
    return value


def read_generation_defaults(directory: str | Path | None) -> dict[str, float]:
    """The sampling defaults a checkpoint ships in `generation_config.json` (other keys there are ignored)."""
    path, document = _generation_config(directory)
    defaults = {key: document[key] for key in GENERATION_DEFAULTS if key in document}
    try:  # the same checks a request's values get (top_k -1 means off there too), so a default is never refused
        SamplingParams(**dict(defaults, top_k=0 if defaults.get("top_k") == -1 else defaults.get("top_k", 0)))
    except InvalidParameter as error:
        raise CheckpointError(f"{path}: {error}") from None
    return defaults


def load_model(path: str | Path, *, lm_head_bias: bool | None = None) -> ReformerLM:
    """Load our format or an HF Reformer checkpoint directory (decided by the files present).

    lm_head_bias: None applies the output bias only when the checkpoint carries a non-zero one (what the
    model was trained with); False reproduces transformers 5.x, which never adds it.
    """
    directory = Path(path)
    config = read_config(directory)
    if (directory / OUR_CONFIG).exists():
        if lm_head_bias is not None:
            config.lm_head_bias = lm_head_bias
        state = load_file(str(directory / WEIGHTS))
    else:
        state = convert_hf_state_dict(_read_hf_weights(directory), config)
        trained_bias = bool(torch.any(state["lm_head_bias"] != 0))
        config.lm_head_bias = trained_bias if lm_head_bias is None else lm_head_bias
    model = ReformerLM(config)
    state = {name: tensor.to(torch.float32) for name, tensor in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"weights do not match the config: {error}") from None
    missing = [name for name in missing if not name.endswith("rotations")]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_model(model: ReformerLM, path: str | Path, *, tokenizer: str = "bytes",
               dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
    """Save config + weights (rotations included) in our format; `dtype` casts floating weights."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if dtype is not None and tensor.is_floating_point() and not name.endswith("rotations"):
            tensor = tensor.to(dtype)
        state[name] = tensor
    save_file(state, str(directory / WEIGHTS), metadata=metadata or {})
    document = {"format": "reformer-server/1", "tokenizer": tokenizer, "config": model.config.to_dict()}
    (directory / OUR_CONFIG).write_text(json.dumps(document, indent=2) + "\n")
