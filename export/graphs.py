"""The two graphs the server needs, as torch modules that export to ONNX.

- `PrefillGraph`: token ids (B, L) and a mask of real tokens -> final hidden states and each layer's cache
  entries (keys and values side by side; raw LSH buckets). No logits: a prefill needs them at one position
  per prompt (all of them only for prompt logprobs) and an embedding at none, so the caller applies the LM
  head in torch to the rows it wants, as the torch decoder does. B and L are
  dynamic; L must be a multiple of the chunk lengths and longer than the longest chunk (the caller pads,
  as the reference does), which takes the bucketed path in every layer.
- `DecodeGraph`: one decode step for B sequences (B dynamic) of a slot pool of fixed size: the block table
  and the caches are inputs (never modified), the outputs are the logits and the new token's cache entries, which the caller
  writes into its pool. The same function as the torch decoder (`model.step.decode_step`).
Rotations are initializers; nothing random, nothing specialised to an example's batch or length.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.reformer import ReformerLM
from model.step import StepCaches, decode_step, fused_projections


class PrefillGraph(nn.Module):
    def __init__(self, model: ReformerLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x1 = x2 = model.embed(input_ids, positions)
        kv, buckets = [], []
        for block in model.layers:
            x1, x2, layer = block(x1, x2, attention_mask, want_kv=True)
            kv.append(torch.cat([layer.keys, layer.values], dim=-1))
            if layer.buckets is not None:
                buckets.append(layer.buckets)
        return (model.final_hidden(x1, x2), *kv, *buckets)


class DecodeGraph(nn.Module):
    def __init__(self, model: ReformerLM):
        super().__init__()
        self.model = model
        self.lsh_layers = [i for i, kind in enumerate(model.config.attn_layers) if kind == "lsh"]
        for index, weight in enumerate(fused_projections(model)):
            self.register_buffer(f"projection_{index}", weight.detach().clone())

    def forward(self, tokens: Tensor, slots: Tensor, positions: Tensor, main_length: Tensor, tail_length: Tensor,
                hashed: Tensor, block_table: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        layers, lsh = self.model.config.num_layers, self.lsh_layers
        kv = list(caches[:layers])
        main, tail = [None] * layers, [None] * layers
        for position, layer in enumerate(lsh):
            main[layer] = caches[layers + position]
            tail[layer] = caches[layers + len(lsh) + position]
        projections = [getattr(self, f"projection_{i}") for i in range(layers)]
        step = decode_step(self.model, StepCaches(kv, main, tail, projections, block_table), tokens, slots, positions,
                           main_length, tail_length, hashed, lambda n: torch.arange(n, device=tokens.device))
        return (step.logits, *step.new_kv, *[step.new_bucket_keys[layer] for layer in lsh])
