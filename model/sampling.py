"""Choosing the next token: greedy, temperature, top-k, top-p, with a private random generator per sequence.

Sampling runs on the host in fp32 (vocabularies here are small), so a seeded request gives the same tokens
whatever else is batched with it and whichever device computed the logits.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor


# Value ranges, named once: the server's request schemas declare the same ones.
MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy: logits / 1e-300 overflow to inf (vLLM's floor too)
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value


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
    logprobs: int | None = None  # how many most likely alternatives to report with each token (0: only the chosen)
    # vLLM's parameters: the penalties and biases change the logits the token is drawn from, not the logprobs.
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be drawn
    min_p: float = 0.0  # drop tokens below min_p times the likeliest's probability
    min_tokens: int = 0  # end tokens (EOS, stop_token_ids) are not drawn before this many tokens

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
            ("presence_penalty", _number(self.presence_penalty) and abs(self.presence_penalty) <= MAX_PENALTY,
             f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            ("frequency_penalty", _number(self.frequency_penalty) and abs(self.frequency_penalty) <= MAX_PENALTY,
             f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
            ("repetition_penalty", _number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= MAX_PENALTY,
             f"a number in (0, {MAX_PENALTY:g}]"),
            ("logit_bias", all(_integer(t) and t >= 0 and _number(b) and abs(b) <= MAX_LOGIT_BIAS
                               for t, b in self.logit_bias), f"token ids with biases in [-{MAX_LOGIT_BIAS:g}, "
                                                             f"{MAX_LOGIT_BIAS:g}]"),
            ("allowed_token_ids", self.allowed_token_ids is None or (
                len(self.allowed_token_ids) > 0 and all(_integer(t) and t >= 0 for t in self.allowed_token_ids)),
             "a non-empty list of token ids"),
            ("min_p", _number(self.min_p) and 0.0 <= self.min_p <= 1.0, "a number in [0, 1]"),
            ("min_tokens", _integer(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             "an integer in [0, max_tokens]"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise InvalidParameter(name, expected, getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        """Whether the batched logits processor has anything to do for this sequence."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids is not None or self.min_tokens)

    def validate(self, vocab_size: int, eos_token_id: int | None = None) -> None:
        """What depends on the model: token ids inside its vocabulary, and a token left to draw while
        min_tokens holds the end tokens (its end of sequence and the stop tokens) back."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias]),
                          ("allowed_token_ids", self.allowed_token_ids or ())):
            if any(t >= vocab_size for t in ids):
                raise InvalidParameter(name, f"token ids in [0, {vocab_size})", getattr(self, name))
        if not self.min_tokens:
            return
        ends = set(self.end_tokens(eos_token_id))
        if self.allowed_token_ids is not None and set(self.allowed_token_ids) <= ends:
            raise InvalidParameter("allowed_token_ids", "a list with a token that is not an end token (end of "
                                   "sequence, stop_token_ids) while min_tokens holds those back",
                                   self.allowed_token_ids)
        if self.allowed_token_ids is None and len(ends) >= vocab_size:  # every id is below vocab_size (above)
            raise InvalidParameter("stop_token_ids", "a list that leaves a token other than the end tokens to draw "
                                   "while min_tokens holds those back", f"all {vocab_size} tokens")

    def end_tokens(self, eos_token_id: int | None) -> list[int]:
        """The tokens that end this sequence: its stop tokens, and the model's end of sequence unless ignored."""
        return [*self.stop_token_ids, *([eos_token_id] if eos_token_id is not None and not self.ignore_eos else [])]

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of n: the same, with its own seed (so n seeded choices differ
        from each other and repeat from run to run)."""
        if index == 0 or self.seed is None:
            return self
        return dataclasses.replace(self, seed=(self.seed + index) % (MAX_SEED + 1))


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

    def choose(self, logits: Tensor, adjusted: Tensor | None = None) -> TokenChoice:
        """logits: (vocab,) fp32 on the CPU, the model's; `adjusted`: the same after penalties and biases,
        which the token is drawn from (logprobs stay the model's, as in vLLM)."""
        params = self.params
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = logits if adjusted is None else adjusted
        if not torch.isfinite(scores.max()):
            raise ValueError("no token can be drawn: the penalties, biases and allowed tokens exclude them all")
        if params.greedy:
            token = int(torch.argmax(scores))
        else:
            scores = (scores - scores.max()) / params.temperature  # shifted first: no overflow to inf
            if params.top_k and params.top_k < scores.shape[-1]:
                kth = torch.topk(scores, params.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if params.top_p < 1.0:
                scores = _top_p(scores, params.top_p)
            probs = torch.softmax(scores, dim=-1)
            if params.min_p > 0.0:
                probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        top: list[tuple[int, float]] = []
        if params.logprobs is not None:
            values, ids = torch.topk(logprobs, min(params.logprobs, logprobs.shape[-1]))
            top = with_chosen(ids.tolist(), values.tolist(), token, float(logprobs[token]))
        return TokenChoice(token, float(logprobs[token]), top)


def with_chosen(ids: list[int], logprobs: list[float], token: int, logprob: float) -> list[tuple[int, float]]:
    """The likeliest tokens' (id, logprob), and the token that was chosen (or read) always, as vLLM reports."""
    top = list(zip(ids, logprobs))
    if token not in ids:
        top.append((token, logprob))
    return top


def _top_p(scores: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_scores, order = torch.sort(scores, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability mass strictly ahead of each token
    drop = before >= top_p
    drop[0] = False
    return scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
