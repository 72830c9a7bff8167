"""Offline generation over the slot decoder: prefill, batched decode steps, stopping rules.

This is the whole generation contract in one place (the server's engine schedules the same pieces with
deadlines, cancellation and streaming on top).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .decode import Decoder
from .reformer import ReformerLM
from .sampling import Sampler, SamplingParams, TokenChoice, choose_batch


@dataclass
class GenerationOutput:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    choices: list[TokenChoice] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"


def finish_reason(params: SamplingParams, eos_token_id: int | None, token: int, generated: int) -> str | None:
    """Why a sequence ends after emitting `token` as its `generated`-th token, or None to go on."""
    if token in params.stop_token_ids or (token == eos_token_id and not params.ignore_eos):
        return "stop"
    if generated >= params.max_tokens:
        return "length"
    return None


def generate(model: ReformerLM, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, num_slots: int = 8, decoder: Decoder | None = None) -> list[GenerationOutput]:
    """Generate for every prompt; at most `num_slots` sequences decode together, the rest wait for a slot."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    decoder = decoder or Decoder(model, num_slots)
    eos = model.config.eos_token_id
    for prompt, p in zip(prompts, params):
        p.validate(model.config.vocab_size)
        decoder.check_fits(len(prompt), p.max_tokens)
    outputs = [GenerationOutput(list(prompt)) for prompt in prompts]
    samplers = [Sampler(p) for p in params]
    waiting = deque(i for i in range(len(prompts)) if params[i].max_tokens > 0)
    for i in range(len(prompts)):
        if params[i].max_tokens == 0:
            outputs[i].finish_reason = "length"
    running: dict[int, int] = {}  # slot -> request index
    next_token: dict[int, int] = {}  # slot -> token to feed at the next step
    while waiting or running:
        admitted = []
        while waiting and decoder.free_slots:
            admitted.append((decoder.allocate(), waiting.popleft()))
        if admitted:
            result = decoder.prefill([(slot, prompts[i]) for slot, i in admitted])
            _accept(decoder, outputs, samplers, params, eos, running, next_token,
                    [slot for slot, _ in admitted], [i for _, i in admitted], result.last_logits)
        if running:
            slots = list(running)
            logits = decoder.step(slots, [next_token[s] for s in slots])
            _accept(decoder, outputs, samplers, params, eos, running, next_token, slots,
                    [running[s] for s in slots], logits)
    return outputs


def _accept(decoder, outputs, samplers, params, eos, running, next_token, slots, requests, logits) -> None:
    choices = choose_batch(logits, [samplers[i] for i in requests])
    for slot, i, choice in zip(slots, requests, choices):
        out = outputs[i]
        out.token_ids.append(choice.token)
        out.choices.append(choice)
        out.finish_reason = finish_reason(params[i], eos, choice.token, len(out.token_ids))
        if out.finish_reason is None:
            running[slot] = i
            next_token[slot] = choice.token
        else:
            running.pop(slot, None)
            next_token.pop(slot, None)
            decoder.free(slot)
