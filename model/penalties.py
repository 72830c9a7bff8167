"""Penalties and biases for a batch of decode slots, as tensor operations on the logits' device.

Each slot keeps its sequence's parameters as rows of small tensors (set once when the sequence starts) and
a count of each token it generated (one scatter per step), so adjusting a batch's logits is a few batched
gathers and element-wise operations whatever the history's length: no Python loop over past tokens.
The rules are vLLM's: end tokens masked before `min_tokens`, then `logit_bias` and `allowed_token_ids`,
then the repetition penalty (prompt and generated tokens), then frequency and presence penalties
(generated tokens only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .sampling import SamplingParams


class LogitsAdjuster:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device | str = "cpu"):
        def rows(dtype, fill=0):
            return torch.full((num_slots, vocab_size), fill, dtype=dtype, device=device)

        def values(fill=0.0):
            return torch.full((num_slots,), fill, dtype=torch.float32, device=device)

        self.device = torch.device(device)
        self.counts = rows(torch.int32)  # how often each slot generated each token
        self.in_prompt = rows(torch.bool, False)
        self.bias = rows(torch.float32)
        self.allowed = rows(torch.bool, True)
        self.end_tokens = rows(torch.bool, False)
        self.min_tokens = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.presence, self.frequency, self.repetition = values(), values(), values(1.0)
        self.active: set[int] = set()  # slots whose sequence adjusts its logits

    def start(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams, eos_token_id: int | None) -> None:
        """A new sequence in `slot` (after its prefill)."""
        self._neutral(slot)
        if not params.adjusts_logits:
            return
        self.active.add(slot)
        if params.repetition_penalty != 1.0:
            self.in_prompt[slot, torch.tensor(list(prompt_ids), device=self.device)] = True
        for token, bias in params.logit_bias:
            self.bias[slot, token] = bias
        if params.allowed_token_ids is not None:
            self.allowed[slot] = False
            self.allowed[slot, torch.tensor(params.allowed_token_ids, device=self.device)] = True
        ends = params.end_tokens(eos_token_id)
        if ends:
            self.end_tokens[slot, torch.tensor(ends, device=self.device)] = True
        self.min_tokens[slot] = params.min_tokens
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        self.repetition[slot] = params.repetition_penalty

    def _neutral(self, slot: int) -> None:
        """Rows that change nothing: a slot beside adjusted ones in a batch must not keep an old sequence's."""
        self.active.discard(slot)
        for table, value in ((self.counts, 0), (self.in_prompt, False), (self.bias, 0.0), (self.allowed, True),
                             (self.end_tokens, False), (self.min_tokens, 0), (self.presence, 0.0),
                             (self.frequency, 0.0), (self.repetition, 1.0)):
            table[slot] = value

    def copy(self, source: int, target: int) -> None:
        """`target` continues the same sequence as `source` (one of n choices from one prefill)."""
        self._neutral(target)
        if source in self.active:
            for table in (self.counts, self.in_prompt, self.bias, self.allowed, self.end_tokens, self.min_tokens,
                          self.presence, self.frequency, self.repetition):
                table[target] = table[source]
            self.active.add(target)

    def free(self, slot: int) -> None:
        self.active.discard(slot)

    def record(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """Count the tokens just chosen for these slots."""
        rows = [(s, t) for s, t in zip(slots, tokens) if s in self.active]
        if rows:
            index = torch.tensor(rows, device=self.device).T
            self.counts.index_put_((index[0], index[1]), torch.ones(len(rows), dtype=torch.int32,
                                                                     device=self.device), accumulate=True)

    def apply(self, logits: Tensor, slots: Sequence[int]) -> Tensor | None:
        """The adjusted fp32 logits of a batch (rows in the order of `slots`), or None if no slot adjusts."""
        if not self.active.intersection(slots):
            return None
        index = torch.tensor(list(slots), device=self.device)
        x = logits.float().to(self.device)
        counts = self.counts[index]
        early = counts.sum(-1) < self.min_tokens[index]
        x = x.masked_fill(early[:, None] & self.end_tokens[index], float("-inf"))
        x = (x + self.bias[index]).masked_fill(~self.allowed[index], float("-inf"))
        repetition = self.repetition[index][:, None]
        seen = self.in_prompt[index] | (counts > 0)
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
        x = x - self.frequency[index][:, None] * counts - self.presence[index][:, None] * (counts > 0)
        # A tiny repetition penalty divides a logit into +inf; the likeliest stays the likeliest, finite. A masked
        # token stays -inf: never drawn, and the sampler sees when nothing is left to draw.
        return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))
