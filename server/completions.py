"""POST /v1/completions: prompts (one, or a list of strings or of token-id lists) become engine requests of n
choices each; `serve` (shared with chat completions) answers with one body or with Server-Sent Events.

What a request holds (its admission, its place in the engine) is let go when the route's `ExitStack`
closes: at the end of `collect`, or when the streaming response ends however it ends (`OwnedStream`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import ExitStack

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from model.blocks import never_lendable
from model.messages import GenerateRequest

from . import protocol
from .generation import Generation, Prompt, TextShape
from .protocol import APIError, CompletionRequest, SamplingFields

log = logging.getLogger(__name__)


class OwnedStream(StreamingResponse):
    """A streaming response that lets go of what its request holds however it ends: finished, client gone
    before or during the stream, or cancelled at shutdown (the release is synchronous, so cancellation
    cannot interrupt it)."""

    def __init__(self, content, release: ExitStack):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release.close()


def engine_requests(spec, body: SamplingFields, generation: Generation, *, logprobs: int | None,
                    prompt_logprobs: bool, timeout: float) -> list[GenerateRequest]:
    """One engine request per prompt, checked against the context and the decode cache; n choices each."""
    maximum = spec.info.max_context
    max_tokens = body.completion_limit()
    cache = spec.info.cache
    if generation.n > cache["slots"]:
        raise APIError(400, f"{generation.n} choices need as many decode slots; this server has "
                            f"{cache['slots']} (--max-running, --kv-cache-bytes).", param="n", code="invalid_value")
    stop = tuple(body.stop_strings())
    requests = []
    for i, prompt in enumerate(generation.prompts):
        if len(prompt.ids) > maximum:
            raise protocol.context_error(maximum, len(prompt.ids), max_tokens or 0)
        room = maximum - len(prompt.ids)
        tokens = min(room, spec.info.default_max_tokens or room) if max_tokens is None else max_tokens
        if tokens == 0 and max_tokens is None and not generation.echo:  # an implicit 0 would answer nothing
            raise APIError(400, f"This model's maximum context length is {maximum} tokens, and the prompt's "
                                f"{len(prompt.ids)} tokens fill it: no room is left for the completion. Please reduce "
                                "the length of the prompt.", param="prompt", code="context_length_exceeded")
        if len(prompt.ids) + tokens > maximum:
            raise protocol.context_error(maximum, len(prompt.ids), tokens, param="max_tokens")
        _check_cache_blocks(cache, generation.n, len(prompt.ids) + tokens)
        params = body.sampling_params(tokens, logprobs, spec.info.vocab_size, spec.info.sampling_defaults,
                                      spec.info.eos_token_id)
        requests.append(GenerateRequest(
            uid=generation.part(i), prompt_ids=tuple(prompt.ids), params=params, stop=stop,
            prompt_logprobs=prompt_logprobs, progress=body.stream, timeout=timeout, route=spec.engine.route,
            n=generation.n, include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens))
    return requests


def _check_cache_blocks(cache: dict, sequences: int, tokens: int) -> None:
    """Refused here, before a stream starts, what the engine would refuse because even its empty cache could
    not lend the blocks: n sequences of prompt + max_tokens each."""
    refusal = never_lendable(sequences, tokens, cache["blocks"], cache["block_size"])
    if refusal:
        raise APIError(400, f"{refusal}.", param="max_tokens", code="context_length_exceeded")


async def serve(spec, request: Request, generation: Generation, messages: list[GenerateRequest],
                stream: bool) -> Response:
    """Admit, send to the engine, answer; everything held is released when the response ends."""
    held = ExitStack()
    try:
        held.enter_context(spec.admission.admit(sum(len(p.ids) for p in generation.prompts), "prompt"))
    except APIError as error:
        return spec.refuse(error)
    try:
        held.callback(generation.count_if_abandoned)
        engine_stream = held.enter_context(spec.engine.open(generation.uid, messages))
        if stream:
            return OwnedStream(generation.stream(engine_stream), held)
        with held:
            return await generation.collect(engine_stream, request)
    except BaseException:
        held.close()
        raise


class GenerationRoute:
    """What completions and chat completions do alike; each says how its body becomes a `Generation`."""

    schema: type[SamplingFields]

    def __init__(self, spec):
        self.spec = spec

    async def handle(self, request: Request) -> Response:
        spec = self.spec
        arrival = time.monotonic()
        try:
            body, timeout = await spec.accept(request, self.schema)
            body.check_stream_options()
            # Off the event loop: a long prompt takes seconds to encode, and every stream of this process
            # would wait for it.
            generation, messages = await asyncio.to_thread(self._generation, body, timeout, arrival)
        except APIError as error:
            return spec.refuse(error)
        return await serve(spec, request, generation, messages, body.stream)

    def _generation(self, body, timeout: float, arrival: float) -> tuple[Generation, list[GenerateRequest]]:
        raise NotImplementedError


class CompletionsRoute(GenerationRoute):
    schema = CompletionRequest

    def _generation(self, body: CompletionRequest, timeout: float, arrival: float):
        spec = self.spec
        if body.suffix:
            raise protocol.unsupported("suffix", "insertion is not implemented")
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise APIError(400, f"'best_of' ({best_of}) must be at least 'n' ({body.n}).", param="best_of",
                           code="invalid_value")
        if body.stream and best_of > body.n:
            raise APIError(400, "'best_of' larger than 'n' cannot stream (the best are known only at the end).",
                           param="best_of", code="invalid_value")
        if body.completion_limit() == 0 and not body.echo:
            raise APIError(400, "'max_tokens' 0 is only useful with 'echo' (scoring a text).", param="max_tokens",
                           code="invalid_value")
        if body.user:
            log.info("completion for user %.80r", body.user)  # the field has no length limit
        generation = Generation(
            spec, f"cmpl-{uuid.uuid4().hex}", self._prompts(body), n=best_of, keep=body.n, shape=TextShape(),
            echo=body.echo, logprobs=body.logprobs is not None,
            stream_options=body.stream_options, return_token_ids=body.return_token_ids,
            skip_special_tokens=body.skip_special_tokens, arrival=arrival)
        messages = engine_requests(spec, body, generation, logprobs=body.logprobs,
                                   prompt_logprobs=body.echo and body.logprobs is not None, timeout=timeout)
        return generation, messages

    def _prompts(self, body: CompletionRequest) -> list[Prompt]:
        """A string, a list of token ids, or a list of either (one choice set per prompt)."""
        spec = self.spec
        raw = body.prompt
        items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items:
            raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                ids = spec.encode_prompt(item, "prompt", truncating=body.truncate_prompt_tokens is not None)
            else:
                ids = list(item)
                spec.check_token_ids(ids, "prompt")
            if body.truncate_prompt_tokens is not None:
                ids = ids[-body.truncate_prompt_tokens:]
            if not ids:
                raise APIError(400, "The prompt is empty (or encodes to no tokens).", param="prompt",
                               code="empty_prompt")
            text = item if isinstance(item, str) and body.truncate_prompt_tokens is None else spec.tokenizer.decode(ids)
            prompts.append(Prompt(ids, text))
        return prompts
