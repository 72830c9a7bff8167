"""Offline generation: submit every prompt to an engine, run it until it is idle, collect the outputs.

The engine (`model.engine`) is the one the server runs; this wrapper adds nothing to its rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .decode import Decoder
from .engine import Engine
from .messages import Failed, Finished, GenerateRequest, Token
from .reformer import ReformerLM
from .sampling import SamplingParams, TokenChoice


@dataclass
class GenerationOutput:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    choices: list[TokenChoice] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length"


def generate(model: ReformerLM, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, num_slots: int = 8, decoder: Decoder | None = None) -> list[GenerationOutput]:
    """Generate for every prompt; at most `num_slots` sequences decode together, the rest wait for a slot.

    Raises ValueError (before anything runs) for a prompt that does not fit or an invalid parameter."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    decoder = decoder or Decoder(model, num_slots)
    for prompt, p in zip(prompts, params, strict=True):
        p.validate(model.config.vocab_size, model.config.eos_token_id)
        decoder.check_fits(len(prompt), p.max_tokens)
    engine = Engine(model, decoder=decoder, prefill_batch_tokens=decoder.prefill_batch_tokens)
    outputs = {str(i): GenerationOutput(list(prompt)) for i, prompt in enumerate(prompts)}
    for uid, p in zip(outputs, params):
        engine.submit(GenerateRequest(uid, tuple(outputs[uid].prompt_ids), p))
    while engine.has_work():
        for _, event in engine.iteration():
            out = outputs[event.uid]
            if isinstance(event, Token):
                out.token_ids.append(event.token)
                out.choices.append(TokenChoice(event.token, event.logprob, event.top_logprobs))
            elif isinstance(event, Finished):
                out.finish_reason = event.reason.value
            elif isinstance(event, Failed):
                raise RuntimeError(f"generation {event.uid} failed: {event.message}")
    return list(outputs.values())
