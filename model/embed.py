"""Document embeddings: pooled final hidden states of one full forward per document."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reformer import ReformerLM

POOLINGS = ("mean", "first", "last", "max")


def pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """hidden (B, L, D), mask (B, L) bool of real tokens -> (B, D)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    raise ValueError(f"'pooling' must be one of {POOLINGS}, got {pooling!r}")


@torch.inference_mode()
def embed(model: ReformerLM, documents: Sequence[Sequence[int]], *, pooling: str = "mean",
          normalize: bool = False, max_batch_tokens: int = 65536) -> Tensor:
    """Embed token-id documents (each up to the model's maximum length) -> (n, 2*hidden) fp32 on the CPU.

    Documents are grouped by padded length and packed under `max_batch_tokens`, so each is computed
    exactly as it would be alone.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"'pooling' must be one of {POOLINGS}, got {pooling!r}")
    config = model.config
    for document in documents:
        if not 1 <= len(document) <= config.max_positions:
            raise ValueError(f"a document of {len(document)} tokens is outside 1..{config.max_positions}")
    out = torch.empty(len(documents), 2 * config.hidden_size)
    order = sorted(range(len(documents)), key=lambda i: config.padded_length(len(documents[i])))
    batch: list[int] = []
    for position, i in enumerate(order):
        batch.append(i)
        padded = config.padded_length(len(documents[i]))
        following = order[position + 1] if position + 1 < len(order) else None
        same_next = following is not None and config.padded_length(len(documents[following])) == padded
        if not same_next or (len(batch) + 1) * padded > max_batch_tokens:
            out[batch] = _embed_group(model, [documents[j] for j in batch], padded, pooling).float().cpu()
            batch = []
    return F.normalize(out, dim=-1) if normalize else out


def _embed_group(model: ReformerLM, documents: list[Sequence[int]], padded: int, pooling: str) -> Tensor:
    ids = torch.full((len(documents), padded), model.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(documents), padded, dtype=torch.bool)
    for row, document in enumerate(documents):
        ids[row, : len(document)] = torch.as_tensor(list(document), dtype=torch.long)
        mask[row, : len(document)] = True
    ids, mask = ids.to(model.device), mask.to(model.device)
    hidden = model.hidden_states(ids, None if bool(mask.all()) else mask)
    return pool(hidden.float(), mask, pooling)
