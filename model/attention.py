"""LSH and local self-attention over a whole sequence (the full forward used by prefill and embeddings).

The arithmetic follows the reference (transformers' `LSHSelfAttention` / `LocalSelfAttention`) step by step:
shared query-key vectors, keys normalised to unit length and divided by sqrt(d), masked scores *replaced*
(not offset) by large negative constants, a token allowed to attend to itself only as a last resort, and
hash rounds combined through their log-sum-exp. What differs is how it is computed: chunks are processed in
blocks so that the score tensor never exceeds a memory budget, and no mask tensor is ever stored whole.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ReformerConfig

# Scores are processed in blocks of chunks of at most this many elements: small blocks stay in a CPU's
# caches (a 4K forward ran 30% faster with 2**20 than with 2**25); a GPU wants fewer, larger launches.
BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}

# "auto": the fused Triton kernel for inference on CUDA when it applies, else torch; "torch": always torch;
# "triton": always the kernel (on a CPU only under TRITON_INTERPRET=1, which the tests use).
ATTENTION_BACKEND = os.environ.get("REFORMER_ATTENTION", "auto")


def _use_kernel(queries: Tensor, dropout: float, backend: str) -> bool:
    if backend == "torch" or dropout or (torch.is_grad_enabled() and queries.requires_grad):
        return False
    if backend == "auto" and not queries.is_cuda:
        return False
    try:
        from . import chunk_kernel
    except ImportError:
        if backend == "triton":
            raise
        return False
    return chunk_kernel.supported(queries)


def mask_values(dtype: torch.dtype) -> tuple[float, float]:
    """(masked score, self score) for a dtype, chosen at call time so that any cast order is safe."""
    if dtype == torch.float16:
        return -1e4, -1e3
    return -1e9, -1e5


def normalize_keys(qk: Tensor) -> Tensor:
    """Unit-length keys divided by sqrt(d), in the reference's operation order."""
    variance = torch.mean(qk**2, -1, keepdim=True)
    return qk * torch.rsqrt(variance + 1e-6) / math.sqrt(qk.shape[-1])


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, H*d) -> (B, H, T, d)"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H*d)"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def logsumexp(x: Tensor, dim: int) -> Tensor:
    """torch.logsumexp's arithmetic (max, then log of the sum of shifted exponentials) in fewer kernels:
    scores here are always finite (masks are finite constants), so its infinity handling is not needed."""
    top = x.amax(dim, keepdim=True)
    return torch.log(torch.exp(x - top).sum(dim, keepdim=True)).add_(top)


def softmax_with_lse(scores: Tensor) -> tuple[Tensor, Tensor]:
    """exp(scores - lse) with lse = logsumexp(scores): the reference's formula, kept so that results agree
    to rounding (torch.softmax rounds differently, which sharp models amplify past 1e-5)."""
    lse = logsumexp(scores, -1)
    return torch.exp(scores - lse), lse.squeeze(-1)


@dataclass
class LayerKV:
    """What one attention layer contributes to the decoding cache for a whole sequence."""

    keys: Tensor  # (B, H, T, d): normalised keys (LSH) or keys / sqrt(d) (local)
    values: Tensor  # (B, H, T, d)
    buckets: Tensor | None = None  # (B, H, rounds, T) raw buckets (LSH only)


# Tokens hashed at once: bounds the (tokens x rounds x rotation) fp32 temporary of long inputs.
HASH_BLOCK = 8192


def hash_vectors(qk: Tensor, rotations: Tensor, num_buckets: int | tuple[int, ...]) -> Tensor:
    """Angular LSH of (B, H, T, d) vectors -> raw buckets (B, H, rounds, T), computed in fp32.

    rotations: (H, d, rounds, rotation_size // 2), a fixed buffer of the layer.
    """
    if qk.shape[2] > HASH_BLOCK and not torch.compiler.is_exporting():
        return torch.cat([hash_vectors(part, rotations, num_buckets) for part in qk.split(HASH_BLOCK, dim=2)], -1)
    rotated = torch.einsum("bhtd,hdnr->bhntr", qk.float(), rotations)
    factors = num_buckets if isinstance(num_buckets, tuple) else (num_buckets,)
    buckets, offset, scale = None, 0, 1
    for factor in factors:
        index = _argmax_of_plus_minus(rotated[..., offset: offset + factor // 2])
        offset += factor // 2
        buckets = index if buckets is None else buckets + scale * index
        scale *= factor
    return buckets


def _argmax_of_plus_minus(x: Tensor) -> Tensor:
    """argmax(cat([x, -x], -1)) without building the concatenation (same first-index tie rule)."""
    high, high_index = torch.max(x, dim=-1)
    low, low_index = torch.min(x, dim=-1)
    return torch.where(high >= -low, high_index, low_index + x.shape[-1])


def _adjacent(chunks: Tensor, index: Tensor, before: int, after: int) -> Tensor:
    """Concatenate, for each chunk in `index`, its chunks -before..+after (circular) along dim 3."""
    if torch.compiler.is_exporting():  # one block of every chunk: rolls, with no modulo of a symbolic size
        return torch.cat([torch.roll(chunks, -offset, dims=2) for offset in range(-before, after + 1)], dim=3)
    count = chunks.shape[2]
    parts = [chunks.index_select(2, (index + offset) % count) for offset in range(-before, after + 1)]
    return torch.cat(parts, dim=3)


def chunked_attention(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    key_valid: Tensor | None,
    *,
    before: int,
    after: int,
    causal: bool,
    self_mask: bool,
    dropout: float = 0.0,
    block_elements: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each chunk to its neighbouring chunks (circular): the fused kernel where it applies
    (`backend`, by default `ATTENTION_BACKEND`), else plain torch in memory-bounded blocks of chunks.

    queries/keys/values: (B, H, N, c, d) chunks; positions: (B, H|1, N, c) absolute positions of the
    chunk entries; key_valid: (B, H|1, N, c) bool or None. Returns out (B, H, N, c, d), lse (B, H, N, c).
    """
    masked, self_value = mask_values(queries.dtype)
    if not torch.compiler.is_exporting() and _use_kernel(queries, dropout, backend or ATTENTION_BACKEND):
        from .chunk_kernel import chunk_attention

        return chunk_attention(queries, keys, values, positions, key_valid, before=before, after=after,
                               causal=causal, self_mask=self_mask, masked=masked, self_value=self_value)
    batch, heads, count, chunk, dim = queries.shape
    window = chunk * (1 + before + after)
    out = queries.new_empty(queries.shape)
    lse = queries.new_empty(queries.shape[:-1])
    per_chunk = max(1, batch * heads * chunk * window)
    budget = block_elements or BLOCK_ELEMENTS.get(queries.device.type, BLOCK_ELEMENTS["cuda"])
    # An exported graph has one block: its length is symbolic, a loop over blocks would freeze it.
    step = count if torch.compiler.is_exporting() else max(1, budget // per_chunk)
    device = queries.device
    for first in range(0, count, step):
        index = torch.arange(first, min(first + step, count), device=device)
        q = queries.index_select(2, index)
        k = _adjacent(keys, index, before, after)
        v = _adjacent(values, index, before, after)
        scores = torch.matmul(q, k.transpose(-1, -2))
        q_pos = positions.index_select(2, index).unsqueeze(-1)
        k_pos = _adjacent(positions, index, before, after).unsqueeze(-2)
        allowed = None
        if causal:
            allowed = q_pos >= k_pos
        if key_valid is not None:
            valid = _adjacent(key_valid, index, before, after).unsqueeze(-2)
            allowed = valid if allowed is None else allowed & valid
        if allowed is not None:
            scores = scores.masked_fill(~allowed, masked)
        if self_mask:
            scores = scores.masked_fill(q_pos == k_pos, self_value)
        probs, block_lse = softmax_with_lse(scores)
        if dropout:
            probs = F.dropout(probs, p=dropout)
        out[:, :, first: first + len(index)] = torch.matmul(probs, v)
        lse[:, :, first: first + len(index)] = block_lse
    return out, lse


def full_attention(queries: Tensor, keys: Tensor, values: Tensor, key_valid: Tensor | None, *,
                   causal: bool, self_mask: bool, dropout: float = 0.0) -> Tensor:
    """Plain attention over the whole (short) sequence: the reference's path for length <= chunk."""
    length = queries.shape[2]
    masked, self_value = mask_values(queries.dtype)
    scores = torch.matmul(queries, keys.transpose(-1, -2))
    position = torch.arange(length, device=queries.device)
    allowed = None
    if causal:
        allowed = position[:, None] >= position[None, :]
    if key_valid is not None:
        valid = key_valid[:, None, None, :]
        allowed = valid if allowed is None else allowed & valid
    if allowed is not None:
        scores = scores.masked_fill(~allowed, masked)
    if self_mask:
        scores = scores.masked_fill(position[:, None] == position[None, :], self_value)
    probs, _ = softmax_with_lse(scores)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, values)


class _ChunkedSelfAttention(nn.Module):
    """What both kinds share: heads, a chunk length with neighbours, the output projection."""

    kind = ""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        prefix = self.kind
        self.heads = config.num_attention_heads
        self.head_size = config.attention_head_size
        self.chunk = getattr(config, f"{prefix}_attn_chunk_length")
        self.before = getattr(config, f"{prefix}_num_chunks_before")
        self.after = getattr(config, f"{prefix}_num_chunks_after")
        self.dropout = getattr(config, f"{prefix}_attention_probs_dropout_prob")
        self.causal = config.is_decoder
        self.out = nn.Linear(config.all_head_size, config.hidden_size, bias=False)

    def _projection(self, config: ReformerConfig) -> nn.Linear:
        return nn.Linear(config.hidden_size, config.all_head_size, bias=False)


class LSHSelfAttention(_ChunkedSelfAttention):
    """Shared-QK attention inside sorted hash buckets (Kitaev et al. 2020, section 3)."""

    kind = "lsh"

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.rounds = config.num_hashes
        self.num_buckets = config.num_buckets
        self.total_buckets = config.total_buckets
        self.qk = self._projection(config)
        self.v = self._projection(config)
        # Fixed random rotations, drawn exactly as the reference draws them from `hash_seed` (CPU, fp32),
        # and kept in fp32 whatever dtype the rest of the model is cast to.
        generator = torch.Generator().manual_seed(config.hash_seed)
        shape = (self.heads, self.head_size, self.rounds, config.rotation_size // 2)
        self.register_buffer("rotations", torch.randn(shape, generator=generator, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Casts follow the weights' device but never change the rotations' dtype (hashing stays fp32).
        rotations = self._buffers.pop("rotations")
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._buffers["rotations"] = rotations.to(device=self.qk.weight.device)
        return result

    def hash(self, qk: Tensor) -> Tensor:
        return hash_vectors(qk, self.rotations, self.num_buckets)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None, *,
                want_kv: bool = False, buckets: Tensor | None = None) -> tuple[Tensor, LayerKV | None]:
        """hidden: (B, L, hidden) normalised input; attention_mask: (B, L) bool, False for padding.

        `buckets` replaces hashing: reversible training's backward pass recomputes a layer with the buckets
        of its forward pass, since a rounding difference in the recomputed input could move a token.
        """
        batch, length, _ = hidden.shape
        qk = split_heads(self.qk(hidden), self.heads)
        v = split_heads(self.v(hidden), self.heads)
        keys = normalize_keys(qk)
        if length <= self.chunk:
            context = full_attention(qk, keys, v, attention_mask, causal=self.causal, self_mask=True,
                                     dropout=self.dropout if self.training else 0.0)
        else:
            if buckets is None:
                buckets = self.hash(qk)
            context = self._bucketed(qk, keys, v, buckets, attention_mask)
        kv = None
        if want_kv:
            kv = LayerKV(keys, v, buckets if buckets is not None else self.hash(qk))
        return self.out(merge_heads(context)), kv

    def _bucketed(self, qk: Tensor, keys: Tensor, v: Tensor, buckets: Tensor, attention_mask: Tensor | None) -> Tensor:
        batch, heads, length, dim = qk.shape
        rounds, chunk = self.rounds, self.chunk
        if attention_mask is not None:
            # Padding goes to an extra bucket that sorts after all others in every round.
            buckets = buckets.masked_fill(~attention_mask[:, None, None, :], self.total_buckets)
        position = torch.arange(length, device=qk.device)
        # Sort by (bucket, position) within each round; keys are unique so the order is exact.
        order = torch.argsort(buckets * length + position, dim=-1)  # (B, H, rounds, L) positions
        flat = order.reshape(batch, heads, rounds * length)
        expand = flat.unsqueeze(-1).expand(-1, -1, -1, dim)
        count = rounds * length // chunk

        def chunks(x: Tensor) -> Tensor:
            return torch.gather(x, 2, expand).view(batch, heads, count, chunk, dim)

        valid = None
        if attention_mask is not None:
            valid = torch.gather(attention_mask[:, None, :].expand(-1, heads, -1), 2, flat)
            valid = valid.view(batch, heads, count, chunk)
        out, lse = chunked_attention(
            chunks(qk), chunks(keys), chunks(v), flat.view(batch, heads, count, chunk), valid,
            before=self.before, after=self.after, causal=self.causal, self_mask=True,
            dropout=self.dropout if self.training else 0.0)
        # Undo the sort, round by round.
        out = out.view(batch, heads, rounds, length, dim)
        lse = lse.view(batch, heads, rounds, length)
        unsorted = torch.empty_like(out).scatter_(3, order.unsqueeze(-1).expand(-1, -1, -1, -1, dim), out)
        unsorted_lse = torch.empty_like(lse).scatter_(3, order, lse)
        if rounds == 1:
            return unsorted[:, :, 0]
        weights = torch.exp(unsorted_lse - logsumexp(unsorted_lse, 2))
        return torch.sum(unsorted * weights.unsqueeze(-1).to(unsorted.dtype), dim=2)


class LocalSelfAttention(_ChunkedSelfAttention):
    """Attention within fixed chunks of the sequence and their neighbours."""

    kind = "local"

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.q = self._projection(config)
        self.k = self._projection(config)
        self.v = self._projection(config)

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None, *,
                want_kv: bool = False, buckets: None = None) -> tuple[Tensor, LayerKV | None]:
        batch, length, _ = hidden.shape
        q = split_heads(self.q(hidden), self.heads)
        k = split_heads(self.k(hidden), self.heads) / math.sqrt(self.head_size)
        v = split_heads(self.v(hidden), self.heads)
        if length <= self.chunk:
            context = full_attention(q, k, v, attention_mask, causal=self.causal, self_mask=False,
                                     dropout=self.dropout if self.training else 0.0)
        else:
            count, chunk = length // self.chunk, self.chunk

            def chunks(x: Tensor) -> Tensor:
                return x.view(batch, self.heads, count, chunk, self.head_size)

            positions = torch.arange(length, device=hidden.device).view(1, 1, count, chunk)
            valid = None if attention_mask is None else attention_mask.view(batch, 1, count, chunk)
            out, _ = chunked_attention(chunks(q), chunks(k), chunks(v), positions, valid, before=self.before,
                                       after=self.after, causal=self.causal, self_mask=False,
                                       dropout=self.dropout if self.training else 0.0)
            context = out.view(batch, self.heads, length, self.head_size)
        kv = LayerKV(k, v) if want_kv else None
        return self.out(merge_heads(context)), kv


