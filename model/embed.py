"""Document embeddings: pooled final hidden states of one full forward per document."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reformer import ReformerLM, drain, pad_batch, run_layers

POOLINGS = ("mean", "first", "last", "max")


def pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """hidden (B, L, D), mask (B, L) bool of the tokens to pool (at least one per row) -> (B, D)."""
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "first":
        return hidden[rows, mask.long().argmax(1)]
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        return hidden[rows, torch.where(mask, positions, -1).amax(1)]
    if pooling == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    raise ValueError(f"'pooling' must be one of {POOLINGS}, got {pooling!r}")


def pooled_tokens(mask: Tensor, contexts: Sequence[int] | None) -> Tensor:
    """The real tokens (mask) less each row's first `contexts[row]`: those are there to be attended to (a
    chunk's overlap with the one before it), not pooled."""
    if contexts is None:
        return mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    return mask & (positions >= torch.as_tensor(list(contexts), device=mask.device).unsqueeze(1))


def check_documents(documents: Sequence[Sequence[int]], contexts: Sequence[int] | None, pooling: str,
                    max_length: int) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"'pooling' must be one of {POOLINGS}, got {pooling!r}")
    for document in documents:
        if not 1 <= len(document) <= max_length:
            raise ValueError(f"a document of {len(document)} tokens is outside 1..{max_length}")
    if contexts is not None and (len(contexts) != len(documents) or
                                 not all(0 <= c < len(d) for c, d in zip(contexts, documents))):
        raise ValueError("each document needs a context length that leaves it at least one token to pool")


def embed(model: ReformerLM, documents: Sequence[Sequence[int]], *, pooling: str = "mean",
          normalize: bool = False, max_batch_tokens: int = 65536, contexts: Sequence[int] | None = None) -> Tensor:
    """Embed token-id documents (each up to the model's maximum length) -> (n, 2*hidden) fp32 on the CPU;
    `contexts` (one per document) leaves each document's first tokens out of its pooling.

    Documents are grouped by padded length and packed under `max_batch_tokens`, so each is computed
    exactly as it would be alone.
    """
    return drain(embed_steps(model, documents, pooling=pooling, normalize=normalize, max_batch_tokens=max_batch_tokens,
                             contexts=contexts))


def embed_steps(model: ReformerLM, documents: Sequence[Sequence[int]], *, pooling: str = "mean",
                normalize: bool = False, max_batch_tokens: int = 65536,
                contexts: Sequence[int] | None = None) -> Iterator[None]:
    """Generator form of `embed`: yields after every layer, returns the embeddings."""
    config = model.config
    check_documents(documents, contexts, pooling, config.max_length)
    out = torch.empty(len(documents), 2 * config.hidden_size)
    for members, padded in length_groups([len(d) for d in documents], config.padded_length, max_batch_tokens):
        ids, mask = pad_batch([documents[i] for i in members], padded, config.pad_token_id, model.device)
        x1 = x2 = None
        for _, x1, x2, _ in run_layers(model, ids, mask):
            yield
        with torch.inference_mode():
            pooled = pooled_tokens(mask, None if contexts is None else [contexts[i] for i in members])
            out[members] = pool(model.final_hidden(x1, x2).float(), pooled, pooling).cpu()
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
