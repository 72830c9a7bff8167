"""One decode step as a pure function of the cached state: read-only caches in, next-token logits and the
new cache entries out. The eager decoder writes the entries into its slots afterwards (inside the same
CUDA graph); the exported ONNX decode graph returns them to its caller.

Semantics (the reference's cached step, per sequence): a local layer attends to the current and `before`
previous chunks of cached keys; an LSH layer attends, per hash round, to the window of
`chunk * (1 + before + after)` tokens around the new token in (bucket, position) order, ranks modulo the
length, with the self-mask only, and combines the rounds through their log-sum-exp; before a sequence has
reached the LSH chunk length it attends to all of its tokens instead (the reference's empty bucket cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import bucket_index
from .attention import hash_vectors, logsumexp, mask_values, normalize_keys, softmax_with_lse
from .reformer import ReformerLM


@dataclass
class StepCaches:
    """What a step reads: per layer the key/value cache (a local layer's ring per slot (slots, H, W, 2d), an
    LSH layer's blocks (blocks, H, block size, 2d) found through `block_table` (slots, blocks per slot)), for
    LSH layers the bucket index's sorted keys (slots, H, R, L) and tails (slots, H, R, T); fused projection
    weights per layer."""

    kv: list[Tensor]
    main: list[Tensor | None]
    tail: list[Tensor | None]
    projections: list[Tensor]
    block_table: Tensor


@dataclass
class StepOutput:
    logits: Tensor  # (B, vocab) fp32
    new_kv: list[Tensor]  # per layer (B, H, 2d): the new token's key and value
    new_bucket_keys: list[Tensor | None]  # per LSH layer (B, H, R): the new token's sort key


@dataclass
class _Rows:
    """Per-step index tensors shared by every layer."""

    positions: Tensor  # (B,) the new token's position (= cached length before the step)
    main_length: Tensor  # (B,)
    tail_length: Tensor  # (B,) tail entries before the new token
    hashed: Tensor  # (B, 1, 1, 1) bool
    slots: Tensor  # (B,)
    heads: Tensor  # (H,) arange
    index_rows: Tensor  # (B, H, R): row of each (slot, head, round) in a bucket index


def fused_projections(model: ReformerLM) -> list[Tensor]:
    """One weight per layer: [qk; v] for LSH layers, [q; k; v] for local ones (one matmul per step)."""
    return [torch.cat([p.weight for p in ((b.attn.qk, b.attn.v) if b.kind == "lsh" else (b.attn.q, b.attn.k, b.attn.v))])
            for b in model.layers]


def decode_step(model: ReformerLM, caches: StepCaches, tokens: Tensor, slots: Tensor, positions: Tensor,
                main_length: Tensor, tail_length: Tensor, hashed: Tensor, arange) -> StepOutput:
    """All (B,) int64 tensors on the model's device; `arange(n)` gives arange(n) there (cached by the caller,
    since every arange launched inside a CUDA graph replay costs a kernel)."""
    config = model.config
    heads, rounds = config.num_attention_heads, config.num_hashes
    rows = _Rows(
        positions=positions, main_length=main_length, tail_length=tail_length, hashed=hashed.bool().view(-1, 1, 1, 1),
        slots=slots, heads=arange(heads),
        index_rows=(slots.view(-1, 1, 1) * heads + arange(heads).view(1, -1, 1)) * rounds + arange(rounds))
    x1 = x2 = model.embed(tokens.unsqueeze(1), positions.unsqueeze(1))  # (B, 1, hidden)
    new_kv, new_keys = [], []
    for layer, block in enumerate(model.layers):
        h = block.attn_norm(x2)[:, 0]
        if block.kind == "lsh":
            context, kv, key = _lsh(block.attn, h, caches, layer, rows, arange)
        else:
            (context, kv), key = _local(block.attn, h, caches, layer, rows, arange), None
        new_kv.append(kv)
        new_keys.append(key)
        x1 = x1 + block.attn.out(context).unsqueeze(1)
        x2 = x2 + block.ff(x1)
    return StepOutput(model.logits(model.final_hidden(x1, x2)[:, 0]).float(), new_kv, new_keys)


def _gather(cache: Tensor, rows: _Rows, positions: Tensor, new_kv: Tensor, cells: Tensor, where: Tensor
            ) -> tuple[Tensor, Tensor]:
    """Keys and values (B, H, ..., W, d) at window positions (B, H, ..., W), read from `cache[cells, head,
    where]` (a slot and a ring index, or a block and an offset in it); the new position (not yet in the
    cache) reads the new token's entry."""
    size, heads, length = cache.shape[-1], cache.shape[1], cache.shape[2]
    head = rows.heads.view(1, -1, *([1] * (positions.dim() - 2)))
    entries = cache.reshape(-1, size)[(cells * heads + head) * length + where]
    is_new = (positions == rows.positions.view(-1, *([1] * (positions.dim() - 1)))).unsqueeze(-1)
    fresh = new_kv.view(*new_kv.shape[:2], *([1] * (positions.dim() - 2)), size)
    entries = torch.where(is_new, fresh, entries)
    return entries[..., : size // 2], entries[..., size // 2:]


def _local(attn, h: Tensor, caches: StepCaches, layer: int, rows: _Rows, arange) -> tuple[Tensor, Tensor]:
    batch, heads, size = h.shape[0], attn.heads, attn.head_size
    q, k, v = (h @ caches.projections[layer].t()).view(batch, 3, heads, size).unbind(1)
    new_kv = torch.cat([k / math.sqrt(size), v], dim=-1)
    width = attn.chunk * (attn.before + 1)
    start = (torch.div(rows.positions, attn.chunk, rounding_mode="floor") - attn.before).clamp(min=0) * attn.chunk
    window = start.view(-1, 1) + arange(width)  # (B, W)
    valid = window <= rows.positions.view(-1, 1)
    window = window.unsqueeze(1).expand(-1, heads, -1)
    # The cache is a ring of at least the valid part of the window (Decoder.cache_length): position p is
    # stored at p % its length; the positions past the new token that wrap onto older ones are masked.
    ring = caches.kv[layer].shape[2]
    keys, values = _gather(caches.kv[layer], rows, window, new_kv, rows.slots.view(-1, 1, 1), window % ring)
    masked, _ = mask_values(keys.dtype)
    scores = (keys @ q.unsqueeze(-1)).squeeze(-1).float()
    scores = scores.masked_fill(~valid.unsqueeze(1), masked)
    probs, _ = softmax_with_lse(scores)
    return (probs.to(values.dtype).unsqueeze(-2) @ values).reshape(batch, -1), new_kv


def _lsh(attn, h: Tensor, caches: StepCaches, layer: int, rows: _Rows, arange) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, size = h.shape[0], attn.heads, attn.head_size
    qk, v = (h @ caches.projections[layer].t()).view(batch, 2, heads, size).unbind(1)
    new_kv = torch.cat([normalize_keys(qk), v], dim=-1)
    max_length = caches.main[layer].shape[-1]
    buckets = hash_vectors(qk.unsqueeze(2), attn.rotations, attn.num_buckets)[..., 0]  # (B, H, R)
    new_key = bucket_index.bucket_keys(buckets, rows.positions.view(-1, 1, 1))
    width = attn.chunk * (1 + attn.before + attn.after)
    window = bucket_index.window(caches.main[layer], caches.tail[layer], rows.index_rows, rows.main_length,
                                 rows.tail_length, new_key, arange, attn.chunk, attn.before, attn.after)
    # Before the sequence reaches the chunk length the reference attends to every token (one round).
    full = max(width, attn.chunk + 1)
    everything = arange(full)
    if full > width:
        window = torch.cat([window, window.new_zeros(*window.shape[:3], full - width)], dim=-1)
    window = torch.where(rows.hashed, window, everything.clamp(max=max_length - 1))
    # (logical operators rather than a boolean where, which onnxruntime does not implement)
    valid = (rows.hashed & (everything < width)) | (~rows.hashed & (everything <= rows.positions.view(-1, 1, 1, 1)))
    # Each position's block through the sequence's row of the block table, then its offset in the block.
    block_size, per_slot = caches.kv[layer].shape[2], caches.block_table.shape[1]
    table_row = rows.slots.view(-1, 1, 1, 1) * per_slot
    blocks = caches.block_table.reshape(-1)[table_row + torch.div(window, block_size, rounding_mode="floor")]
    keys, values = _gather(caches.kv[layer], rows, window, new_kv, blocks, window % block_size)  # (B, H, R, W, d)
    masked, self_value = mask_values(keys.dtype)
    scores = (keys @ qk.view(batch, heads, 1, size, 1)).squeeze(-1).float()  # (B, H, R, W)
    scores = scores.masked_fill(window == rows.positions.view(-1, 1, 1, 1), self_value)
    scores = scores.masked_fill(~valid, masked)
    probs, lse = softmax_with_lse(scores)
    per_round = (probs.to(values.dtype).unsqueeze(-2) @ values).squeeze(-2).float()  # (B, H, R, d)
    if attn.rounds > 1:
        lse = lse.unsqueeze(-1)
        weights = torch.exp(lse - logsumexp(lse, 2))
        combined = torch.sum(per_round * weights, dim=2)
        context = torch.where(rows.hashed.view(-1, 1, 1), combined, per_round[:, :, 0])
    else:
        context = per_round[:, :, 0]
    return context.to(values.dtype).reshape(batch, -1), new_kv, new_key
