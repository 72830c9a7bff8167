"""The Reformer language model: embeddings, a reversible two-stream stack of attention and feed-forward
blocks, a LayerNorm over both streams and an LM head.

Parameter names are our own; `checkpoint.py` maps the reference's names onto them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import LayerKV, LocalSelfAttention, LSHSelfAttention
from .config import ReformerConfig

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

# Feed-forward rows processed at once when the config does not say (memory only: results are identical).
DEFAULT_FF_CHUNK = 8192


class AxialPositions(nn.Module):
    """Position p = i * n2 + j is embedded as concat(row[i], col[j]) (the reference's row-major order)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        (n1, n2), (d1, d2) = config.axial_pos_shape, config.axial_pos_embds_dim
        self.columns = n2
        self.row = nn.Parameter(torch.empty(n1, d1).normal_(std=config.axial_norm_std))
        self.col = nn.Parameter(torch.empty(n2, d2).normal_(std=config.axial_norm_std))

    def forward(self, positions: Tensor) -> Tensor:
        return torch.cat([self.row[positions // self.columns], self.col[positions % self.columns]], dim=-1)


class LearnedPositions(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.table = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table(positions)


class Embeddings(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = AxialPositions(config) if config.axial_pos_embds else LearnedPositions(config)
        self.dropout = config.hidden_dropout_prob

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = F.dropout(self.tokens(input_ids), self.dropout, self.training)
        return x + self.positions(positions)


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> dropout -> activation -> Linear -> dropout, applied in row chunks."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(config.hidden_size, config.feed_forward_size)
        self.fc_out = nn.Linear(config.feed_forward_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = config.hidden_dropout_prob
        self.chunk = config.chunk_size_feed_forward or DEFAULT_FF_CHUNK

    def _rows(self, x: Tensor) -> Tensor:
        h = F.dropout(self.fc_in(self.norm(x)), self.dropout, self.training)
        return F.dropout(self.fc_out(self.act(h)), self.dropout, self.training)

    def row_chunks(self, length: int) -> list[slice]:
        """The row ranges `forward` computes one at a time (reversible training recomputes the same ones,
        so that dropout draws replay in the same order)."""
        if torch.compiler.is_exporting() or length <= self.chunk:
            return [slice(0, length)]
        return [slice(start, min(start + self.chunk, length)) for start in range(0, length, self.chunk)]

    def forward(self, x: Tensor) -> Tensor:
        chunks = self.row_chunks(x.shape[1])
        if len(chunks) == 1:
            return self._rows(x)
        return torch.cat([self._rows(x[:, rows]) for rows in chunks], dim=1)


class ReformerBlock(nn.Module):
    """One reversible block: y1 = x1 + Attention(LN(x2)); y2 = x2 + FeedForward(y1)."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = LSHSelfAttention(config) if kind == "lsh" else LocalSelfAttention(config)
        self.ff = FeedForward(config)
        self.dropout = config.hidden_dropout_prob

    def attention(self, x2: Tensor, mask: Tensor | None, want_kv: bool = False,
                  buckets: Tensor | None = None) -> tuple[Tensor, LayerKV | None]:
        out, kv = self.attn(self.attn_norm(x2), mask, want_kv=want_kv, buckets=buckets)
        return F.dropout(out, self.dropout, self.training), kv

    def forward(self, x1: Tensor, x2: Tensor, mask: Tensor | None = None,
                want_kv: bool = False) -> tuple[Tensor, Tensor, LayerKV | None]:
        attended, kv = self.attention(x2, mask, want_kv)
        y1 = x1 + attended
        y2 = x2 + self.ff(y1)
        return y1, y2, kv


def pad_batch(sequences: list, length: int, pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-pad token-id sequences to `length`: ids (B, length) and a mask of real tokens (B, length)."""
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = True
    return ids.to(device), mask.to(device)


def drain(job):
    """Run a stepwise job (a generator that yields between pieces of work) to the end; its return value."""
    while True:
        try:
            next(job)
        except StopIteration as done:
            return done.value


def run_layers(model: ReformerLM, ids: Tensor, mask: Tensor, *, want_kv: bool = False):
    """Advance a full forward one block per `next()`, each under inference mode.

    Generators that yield between blocks may be resumed on another thread, where a `with` block opened
    before the yield would not be in force (grad modes are thread-local): so each step enters its own.
    Yields (layer, x1, x2, kv) like `ReformerLM.layer_states`.
    """
    states = model.layer_states(ids, None if bool(mask.all()) else mask, want_kv=want_kv)
    while True:
        with torch.inference_mode():
            try:
                item = next(states)
            except StopIteration:
                return
        yield item


@dataclass
class PaddedInput:
    """Input ids padded the way the reference pads them, and what to cut back afterwards."""

    input_ids: Tensor  # (B, L_padded)
    mask: Tensor | None  # (B, L_padded) bool, None when nothing is padded
    length: int  # L before padding


class ReformerLM(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(ReformerBlock(config, kind) for kind in config.attn_layers)
        self.final_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(2 * config.hidden_size, config.vocab_size, bias=False)
        self.lm_head_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ---- pieces shared by the full forward and the decoder -----------------------------------------
    def logits(self, hidden: Tensor) -> Tensor:
        """hidden: (..., 2*hidden) after the final LayerNorm."""
        logits = self.lm_head(hidden)
        if self.config.lm_head_bias:
            logits = logits + self.lm_head_bias
        return logits

    def pad(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> PaddedInput:
        """Pad to a multiple of the chunk lengths as the reference does (only when longer than a chunk)."""
        length = input_ids.shape[1]
        target = self.config.padded_length(length)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if target != length:
            extra = target - length
            input_ids = F.pad(input_ids, (0, extra), value=self.config.pad_token_id)
            if mask is None:
                mask = torch.ones(input_ids.shape[0], length, dtype=torch.bool, device=input_ids.device)
            mask = F.pad(mask, (0, extra), value=False)
        return PaddedInput(input_ids, mask, length)

    def layer_states(self, input_ids: Tensor, mask: Tensor | None = None, *,
                     want_kv: bool = False) -> Iterator[tuple[int, Tensor, Tensor, LayerKV | None]]:
        """Run the stack one block at a time, yielding (layer index, x1, x2, cache contribution).

        Lets a caller interleave other work between the blocks of a long prefill.
        """
        length = input_ids.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"sequence of {length} tokens exceeds the model's {self.config.max_positions} positions")
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed(input_ids, positions)
        x1 = x2 = x
        for index, block in enumerate(self.layers):
            x1, x2, kv = block(x1, x2, mask, want_kv)
            yield index, x1, x2, kv

    def final_hidden(self, x1: Tensor, x2: Tensor) -> Tensor:
        hidden = self.final_norm(torch.cat([x1, x2], dim=-1))
        return F.dropout(hidden, self.config.hidden_dropout_prob, self.training)

    # ---- full forward ---------------------------------------------------------------------------------
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states (B, L, 2*hidden) of a full forward, with the reference's padding rule."""
        padded = self.pad(input_ids, attention_mask)
        x1 = x2 = None
        for _, x1, x2, _ in self.layer_states(padded.input_ids, padded.mask):
            pass
        return self.final_hidden(x1, x2)[:, : padded.length]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, L, vocab) of a full forward."""
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

