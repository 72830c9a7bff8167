"""The onnxruntime backend: the torch decoder's slot pool and scheduling, with the exported graphs computing.

`OnnxDecoder` keeps the same slots, caches and bucket index as `model.decode.Decoder` (they are plain
tensors, bound to the sessions without copies); only the two forward computations differ: a prefill group
runs its exported graph in one call (so it interleaves with decode steps per group, not per layer), and a
decode step runs the decode graph and writes the entries it returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from model.decode import Decoder
from model.embed import check_documents, length_groups, pool, pooled_tokens
from model.reformer import ReformerLM, pad_batch

from .runtime import ExportedModel


class OnnxDecoder(Decoder):
    def __init__(self, model: ReformerLM, exported: ExportedModel, *, prefill_batch_tokens: int = 65536):
        pool_shape = exported.manifest["pool"]
        super().__init__(model, pool_shape["slots"], pool_shape["max_length"], tail_capacity=pool_shape["tail_capacity"],
                         cuda_graphs=False, prefill_batch_tokens=prefill_batch_tokens,
                         cache_blocks=pool_shape["cache_blocks"], block_size=pool_shape["block_size"])
        self.exported = exported
        self.lsh = [i for i, kind in enumerate(self.config.attn_layers) if kind == "lsh"]
        self._graph_caches = [self.blocks.table, *self.kv, *[self.index[i].main for i in self.lsh],
                              *[self.index[i].tail for i in self.lsh]]

    def _group_forward(self, ids: Tensor, mask: Tensor):
        hidden, *outputs = run_prefill(self.exported, self.config, ids, mask)
        layers = self.config.num_layers
        for layer in range(layers):
            kv = outputs[layer]
            half = kv.shape[-1] // 2
            buckets = outputs[layers + self.lsh.index(layer)] if layer in self.lsh else None
            yield layer, kv[..., :half], kv[..., half:], buckets
        return lambda row, positions: self.model.logits(hidden[row, positions])

    def step_tensors(self, tokens: Tensor, slots: Tensor, positions: Tensor, main_length: Tensor,
                     tail_length: Tensor, hashed: Tensor) -> Tensor:
        config = self.config
        batch, heads = tokens.shape[0], config.num_attention_heads
        shapes = [(batch, config.vocab_size)]
        shapes += [(batch, heads, 2 * config.attention_head_size)] * config.num_layers
        shapes += [(batch, heads, config.num_hashes)] * len(self.lsh)
        inputs = [t.to(self.device) for t in (tokens, slots, positions, main_length, tail_length, hashed)]
        outputs = self.exported.graphs["decode"].run([*inputs, *self._graph_caches], shapes)
        new_keys = [None] * config.num_layers
        for position, layer in enumerate(self.lsh):
            new_keys[layer] = outputs[1 + config.num_layers + position]
        self._write_step(inputs[1], inputs[2], inputs[4], outputs[1: 1 + config.num_layers], new_keys)
        return outputs[0]


def run_prefill(exported: ExportedModel, config, ids: Tensor, mask: Tensor) -> list[Tensor]:
    """One padded group through the prefill graph for its length: hidden, kv..., buckets..."""
    batch, length = ids.shape
    heads, size, hidden = config.num_attention_heads, config.attention_head_size, 2 * config.hidden_size
    shapes = [(batch, length, hidden)]
    shapes += [(batch, heads, length, 2 * size)] * config.num_layers
    shapes += [(batch, heads, config.num_hashes, length)] * sum(kind == "lsh" for kind in config.attn_layers)
    return exported.prefill_graph(length).run([ids, mask], shapes)


def embed_steps(exported: ExportedModel, config, device: torch.device, documents: Sequence[Sequence[int]], *,
                pooling: str = "mean", max_batch_tokens: int = 65536,
                contexts: Sequence[int] | None = None) -> Iterator[None]:
    """`model.embed.embed_steps` with the prefill graphs: yields after each group, returns (n, 2*hidden)."""
    check_documents(documents, contexts, pooling, config.max_length)
    out = torch.empty(len(documents), 2 * config.hidden_size)
    for members, padded in length_groups([len(d) for d in documents], config.padded_length, max_batch_tokens):
        ids, mask = pad_batch([documents[i] for i in members], padded, config.pad_token_id, device)
        hidden = run_prefill(exported, config, ids, mask)[0]
        pooled = pooled_tokens(mask, None if contexts is None else [contexts[i] for i in members])
        out[members] = pool(hidden.float(), pooled, pooling).cpu()
        yield
    return out
