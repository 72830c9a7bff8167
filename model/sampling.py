"""Choosing the next token: greedy, temperature, top-k, top-p, with a private random generator per sequence.

Sampling runs on the host in fp32 (vocabularies here are small), so a seeded request gives the same tokens
whatever else is batched with it and whichever device computed the logits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # how many most likely alternatives to report with each token (0..20)

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first invalid parameter."""
        checks = (
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 0, "an integer >= 0"),
            ("temperature", _number(self.temperature) and 0.0 <= self.temperature <= 100.0, "a number in [0, 100]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 disables it)"),
            ("top_p", _number(self.top_p) and 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("seed", self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "an integer in [0, 2**63)"),
            ("stop_token_ids", all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
             f"token ids in [0, {vocab_size})"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "an integer in [0, 20]"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"'{name}' must be {expected}, got {getattr(self, name)!r}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


@dataclass
class TokenChoice:
    token: int
    logprob: float  # under the model's unmodified distribution
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Per-sequence token chooser with its own generator (never the global RNG)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)

    def choose(self, logits: Tensor) -> TokenChoice:
        """logits: (vocab,) fp32 on the CPU."""
        params = self.params
        logprobs = torch.log_softmax(logits, dim=-1)
        if params.temperature == 0.0:
            token = int(torch.argmax(logits))
        else:
            scores = logits / params.temperature
            if params.top_k and params.top_k < scores.shape[-1]:
                kth = torch.topk(scores, params.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if params.top_p < 1.0:
                scores = _top_p(scores, params.top_p)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        top: list[tuple[int, float]] = []
        if params.logprobs:
            values, ids = torch.topk(logprobs, min(params.logprobs, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenChoice(token, float(logprobs[token]), top)


def _top_p(scores: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_scores, order = torch.sort(scores, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly ahead of each token
    drop = before >= top_p
    drop[0] = False
    return scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))


def choose_batch(logits: Tensor, samplers: list[Sampler]) -> list[TokenChoice]:
    """One device-to-host copy for the batch, then each row with its own sampler."""
    rows = logits.detach().float().cpu()
    return [sampler.choose(row) for sampler, row in zip(samplers, rows)]
