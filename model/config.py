"""Model configuration: one dataclass that reads Hugging Face Reformer configs and our own."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu", "swish", "tanh")

# Keys of HF configs that do not change what the model computes at inference (or that we derive).
_IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "tie_word_embeddings", "classifier_dropout", "bos_token_id", "num_hidden_layers", "output_hidden_states",
    "output_attentions", "return_dict", "chunk_size_lm_head", "id2label", "label2id", "problem_type",
    "tokenizer_class", "decoder_start_token_id", "sep_token_id", "task_specific_params", "_name_or_path",
    "sinusoidal_pos_embds", "attention_probs_dropout_prob", "num_labels", "add_cross_attention",
}


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"config field '{field_name}': {message}")
        self.field = field_name


@dataclass
class ReformerConfig:
    vocab_size: int = 320
    hidden_size: int = 256
    num_attention_heads: int = 2
    attention_head_size: int = 64
    attn_layers: tuple[str, ...] = ("local", "lsh", "local", "lsh", "local", "lsh")
    feed_forward_size: int = 512
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-12
    # positions
    axial_pos_embds: bool = True
    axial_pos_shape: tuple[int, int] = (64, 64)
    axial_pos_embds_dim: tuple[int, int] = (64, 192)
    max_position_embeddings: int = 4096
    # LSH attention
    lsh_attn_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    num_buckets: int | tuple[int, ...] = 64
    num_hashes: int = 1
    hash_seed: int = 0
    # local attention
    local_attn_chunk_length: int = 64
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    # heads, tokens
    is_decoder: bool = True
    pad_token_id: int = 0
    eos_token_id: int | None = 2
    # LM head bias: transformers 5.x never adds it; trax-converted checkpoints (and HF 4.x) do.
    lm_head_bias: bool = True
    # memory-only knobs: chunk the feed-forward over the sequence (0 = library default)
    chunk_size_feed_forward: int = 0
    # training-only
    hidden_dropout_prob: float = 0.0
    lsh_attention_probs_dropout_prob: float = 0.0
    local_attention_probs_dropout_prob: float = 0.0
    axial_norm_std: float = 1.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attn_layers = tuple(self.attn_layers)
        self.axial_pos_shape = tuple(self.axial_pos_shape)
        self.axial_pos_embds_dim = tuple(self.axial_pos_embds_dim)
        if isinstance(self.num_buckets, list | tuple):
            self.num_buckets = tuple(int(f) for f in self.num_buckets)
            if len(self.num_buckets) == 1:
                self.num_buckets = self.num_buckets[0]
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.attn_layers)

    @property
    def all_head_size(self) -> int:
        return self.num_attention_heads * self.attention_head_size

    @property
    def total_buckets(self) -> int:
        """Number of LSH buckets per hash round (the product of the factors when factorised)."""
        return math.prod(self.num_buckets) if isinstance(self.num_buckets, tuple) else self.num_buckets

    @property
    def rotation_size(self) -> int:
        return sum(self.num_buckets) if isinstance(self.num_buckets, tuple) else self.num_buckets

    @property
    def max_positions(self) -> int:
        """The longest sequence the position embeddings can address."""
        if self.axial_pos_embds:
            return min(self.max_position_embeddings, math.prod(self.axial_pos_shape))
        return self.max_position_embeddings

    @property
    def max_length(self) -> int:
        """The longest input the model can run: the reference pads one longer than the smallest chunk to a
        multiple of every chunk length, and the padded input must fit the positions."""
        top = self.max_positions
        if top > self.min_chunk_length and top % self.padding_multiple:
            top = max(self.min_chunk_length, top - top % self.padding_multiple)
        return top

    @property
    def padding_multiple(self) -> int:
        """Inputs longer than the smallest chunk are padded to a multiple of this (the reference's rule)."""
        return math.lcm(*self._chunk_lengths())

    @property
    def min_chunk_length(self) -> int:
        return min(self._chunk_lengths())

    def _chunk_lengths(self) -> list[int]:
        kinds = set(self.attn_layers)
        lengths = []
        if "lsh" in kinds:
            lengths.append(self.lsh_attn_chunk_length)
        if "local" in kinds:
            lengths.append(self.local_attn_chunk_length)
        return lengths

    def padded_length(self, length: int) -> int:
        """Length after the reference's automatic padding of an input of `length` tokens."""
        multiple = self.padding_multiple
        if length > self.min_chunk_length and length % multiple:
            return length + multiple - length % multiple
        return length

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")

        def non_negative(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_attention_heads", "attention_head_size",
                     "feed_forward_size", "max_position_embeddings", "lsh_attn_chunk_length",
                     "local_attn_chunk_length", "num_hashes"):
            positive(name)
        for name in ("lsh_num_chunks_before", "lsh_num_chunks_after", "local_num_chunks_before",
                     "local_num_chunks_after", "chunk_size_feed_forward", "pad_token_id"):
            non_negative(name)
        if not self.attn_layers:
            raise ConfigError("attn_layers", "must list at least one layer")
        bad = [kind for kind in self.attn_layers if kind not in ("lsh", "local")]
        if bad:
            raise ConfigError("attn_layers", f"only 'lsh' and 'local' exist, got {bad}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError("hidden_act", f"{self.hidden_act!r} is not one of {SUPPORTED_ACTIVATIONS}")
        factors = self.num_buckets if isinstance(self.num_buckets, tuple) else (self.num_buckets,)
        for factor in factors:
            if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2 or factor % 2:
                raise ConfigError("num_buckets", f"every bucket count must be an even integer >= 2, got {self.num_buckets!r}")
        if self.total_buckets >= 2**15:
            raise ConfigError("num_buckets", f"at most 32767 buckets per round are supported, got {self.total_buckets}")
        if self.axial_pos_embds:
            if len(self.axial_pos_shape) != 2 or any(not isinstance(n, int) or n <= 0 for n in self.axial_pos_shape):
                raise ConfigError("axial_pos_shape", f"must be two positive integers, got {self.axial_pos_shape!r}")
            if len(self.axial_pos_embds_dim) != 2 or any(
                    not isinstance(n, int) or n <= 0 for n in self.axial_pos_embds_dim):
                raise ConfigError("axial_pos_embds_dim", f"must be two positive integers, got {self.axial_pos_embds_dim!r}")
            if sum(self.axial_pos_embds_dim) != self.hidden_size:
                raise ConfigError("axial_pos_embds_dim",
                                  f"{self.axial_pos_embds_dim} must sum to hidden_size {self.hidden_size}")
        if self.max_positions >= 2**21:
            raise ConfigError("max_position_embeddings", "at most 2**21 - 1 positions are supported")
        if self.is_decoder:
            for name in ("lsh_num_chunks_after", "local_num_chunks_after"):
                if getattr(self, name) != 0:
                    raise ConfigError(name, "must be 0 for a causal (is_decoder) model: "
                                            "look-ahead chunks would see the future")
        if self.eos_token_id is not None and not (0 <= self.eos_token_id < self.vocab_size):
            raise ConfigError("eos_token_id", f"{self.eos_token_id} is outside the vocabulary of {self.vocab_size}")
        if not (0 <= self.pad_token_id < self.vocab_size):
            raise ConfigError("pad_token_id", f"{self.pad_token_id} is outside the vocabulary of {self.vocab_size}")
        if not isinstance(self.hash_seed, int) or isinstance(self.hash_seed, bool):
            raise ConfigError("hash_seed", f"must be an integer, got {self.hash_seed!r}")

    # ---- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReformerConfig:
        """Our own saved config: every key must be a field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], "unknown field in a saved model config")
        return cls(**data)

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], *, lm_head_bias: bool = True) -> ReformerConfig:
        """Read a transformers `ReformerConfig` dict (config.json), legacy keys included."""
        data = dict(data)
        model_type = data.pop("model_type", "reformer")
        if model_type != "reformer":
            raise ConfigError("model_type", f"expected 'reformer', got {model_type!r}")
        # Legacy single keys applied to both attention kinds (the crime-and-punishment config uses them).
        for legacy, targets in (("num_chunks_before", ("lsh_num_chunks_before", "local_num_chunks_before")),
                                ("num_chunks_after", ("lsh_num_chunks_after", "local_num_chunks_after"))):
            if legacy in data:
                value = data.pop(legacy)
                for target in targets:
                    if data.get(target) is None:
                        data[target] = value
        if data.get("sinusoidal_pos_embds"):
            raise ConfigError("sinusoidal_pos_embds", "sinusoidal position embeddings are not supported")
        if data.get("lsh_attn_chunk_length") is None:
            data.pop("lsh_attn_chunk_length", None)
        for key in ("lsh_num_chunks_before", "lsh_num_chunks_after", "lsh_attention_probs_dropout_prob"):
            if key in data and data[key] is None:
                data.pop(key)
        if data.get("hash_seed") is None:
            # The reference then draws new rotations on every call; we fix them once (seed 0).
            data["hash_seed"] = 0
        if isinstance(data.get("eos_token_id"), list):
            data["eos_token_id"] = data["eos_token_id"][0] if data["eos_token_id"] else None
        if data.get("pad_token_id") is None:
            data["pad_token_id"] = 0
        if data.get("num_buckets") is None:
            data["num_buckets"] = _auto_num_buckets(data)
            log.warning("config has no num_buckets; using %s (the reference's rule for the longest input)",
                        data["num_buckets"])
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "lm_head_bias"}
        kwargs = {key: data.pop(key) for key in list(data) if key in known}
        extra = {key: value for key, value in data.items() if key not in _IGNORED_HF_KEYS}
        if "chunk_size_feed_forward" in kwargs and kwargs["chunk_size_feed_forward"] is None:
            kwargs["chunk_size_feed_forward"] = 0
        for key in ("hidden_dropout_prob", "lsh_attention_probs_dropout_prob", "local_attention_probs_dropout_prob"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key] or 0.0)
        return cls(**kwargs, lm_head_bias=lm_head_bias, extra=extra)


def _auto_num_buckets(data: dict[str, Any]) -> int | list[int]:
    """The reference's automatic bucket count, evaluated once for the longest possible input."""
    chunk = data.get("lsh_attn_chunk_length") or 64
    max_pos = data.get("max_position_embeddings") or 4096
    power = (2 * (max_pos // chunk)).bit_length() - 1
    buckets = 2**power
    limit = 2 * max(int((max_pos // chunk) ** 0.5), chunk)
    if buckets > limit:
        return [2 ** (power // 2), 2 ** (power - power // 2)]
    return max(buckets, 2)
