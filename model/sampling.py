"""Choosing the next token: greedy, temperature, top-k, top-p, with a private random generator per sequence.

Sampling runs on the host in fp32 (vocabularies here are small), so a seeded request gives the same tokens
whatever else is batched with it and whichever device computed the logits.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor


# Value ranges, named once: the server's request schemas declare the same ones.
MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy: logits / 1e-300 overflow to inf (vLLM's floor too)
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1


class InvalidParameter(ValueError):
    """A sampling parameter out of its range; `param` names it."""

    def __init__(self, param: str, expected: str, value: object):
        super().__init__(f"'{param}' must be {expected}, got {value!r}")
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens; checked when made, so a value that exists is a value the sampler can use."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # how many most likely alternatives to report with each token

    def __post_init__(self):
        checks = (
            ("max_tokens", _integer(self.max_tokens) and self.max_tokens >= 0, "an integer >= 0"),
            ("temperature", _number(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE,
             f"a number in [0, {MAX_TEMPERATURE:g}]"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 disables it)"),
            ("top_p", _number(self.top_p) and 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
            ("seed", self.seed is None or (_integer(self.seed) and 0 <= self.seed <= MAX_SEED),
             "an integer in [0, 2**63)"),
            ("stop_token_ids", all(_integer(t) and t >= 0 for t in self.stop_token_ids), "token ids"),
            ("logprobs", self.logprobs is None or (_integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"an integer in [0, {MAX_LOGPROBS}]"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise InvalidParameter(name, expected, getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self, vocab_size: int) -> None:
        """What depends on the model: token ids inside its vocabulary."""
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids", f"token ids in [0, {vocab_size})", self.stop_token_ids)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        if params.greedy:
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
