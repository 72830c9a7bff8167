"""Document embeddings: pooled final hidden states of one full forward per document."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reformer import ReformerLM, drain, pad_batch, run_layers

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


def embed(model: ReformerLM, documents: Sequence[Sequence[int]], *, pooling: str = "mean",
          normalize: bool = False, max_batch_tokens: int = 65536) -> Tensor:
    """Embed token-id documents (each up to the model's maximum length) -> (n, 2*hidden) fp32 on the CPU.

    Documents are grouped by padded length and packed under `max_batch_tokens`, so each is computed
    exactly as it would be alone.
    """
    return drain(embed_steps(model, documents, pooling=pooling, normalize=normalize, max_batch_tokens=max_batch_tokens))


def embed_steps(model: ReformerLM, documents: Sequence[Sequence[int]], *, pooling: str = "mean",
                normalize: bool = False, max_batch_tokens: int = 65536) -> Iterator[None]:
    """Generator form of `embed`: yields after every layer, returns the embeddings."""
    if pooling not in POOLINGS:
        raise ValueError(f"'pooling' must be one of {POOLINGS}, got {pooling!r}")
    config = model.config
    for document in documents:
        if not 1 <= len(document) <= config.max_positions:
            raise ValueError(f"a document of {len(document)} tokens is outside 1..{config.max_positions}")
    out = torch.empty(len(documents), 2 * config.hidden_size)
    for members, padded in length_groups([len(d) for d in documents], config.padded_length, max_batch_tokens):
        ids, mask = pad_batch([documents[i] for i in members], padded, config.pad_token_id, model.device)
        x1 = x2 = None
        for _, x1, x2, _ in run_layers(model, ids, mask):
            yield
        with torch.inference_mode():
            out[members] = pool(model.final_hidden(x1, x2).float(), mask, pooling).cpu()
    return F.normalize(out, dim=-1) if normalize else out


def length_groups(lengths: Sequence[int], padded_length, max_batch_tokens: int) -> list[tuple[list[int], int]]:
    """Indices grouped by padded length (a group computes what each member would alone), each group
    holding at most `max_batch_tokens` padded tokens (but always at least one member)."""
    groups: list[tuple[list[int], int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: padded_length(lengths[i])):
        padded = padded_length(lengths[i])
        if groups and groups[-1][1] == padded and (len(groups[-1][0]) + 1) * padded <= max_batch_tokens:
            groups[-1][0].append(i)
        else:
            groups.append(([i], padded))
    return groups
