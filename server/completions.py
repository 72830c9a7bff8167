"""POST /v1/completions: validate a request into an engine `GenerateRequest`, then answer with one body or
with Server-Sent Events.

What a request holds (its admission, its place in the engine) is let go when the route's `ExitStack`
closes: at the end of `collect`, or when the streaming response ends however it ends (`OwnedStream`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import ExitStack

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from model.messages import Failed, Finished, FinishReason, GenerateRequest, Progress, PromptLogprobs, Token

from . import protocol
from .protocol import APIError, CompletionRequest

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 0.5


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


class CompletionsRoute:
    def __init__(self, spec):
        self.spec = spec

    async def handle(self, request: Request) -> Response:
        spec = self.spec
        arrival = time.monotonic()
        held = ExitStack()
        try:
            body, timeout = await spec.accept(request, CompletionRequest)
            message, prompt_text = self._engine_request(body, timeout)
            held.enter_context(spec.admission.admit(len(message.prompt_ids), "prompt"))
        except APIError as error:
            return spec.refuse(error)
        try:
            call = _Completion(spec, message, body, prompt_text, arrival)
            held.callback(call.count_if_abandoned)
            stream = held.enter_context(spec.engine.open(message))
            if body.stream:
                return OwnedStream(call.stream(stream), held)
            with held:
                return await call.collect(stream, request)
        except BaseException:
            held.close()
            raise

    def _engine_request(self, body: CompletionRequest, timeout: float) -> tuple[GenerateRequest, str]:
        spec = self.spec
        spec.check_model(body.model)
        for name, value, default in (("n", body.n, 1), ("best_of", body.best_of, None),
                                     ("presence_penalty", body.presence_penalty, 0),
                                     ("frequency_penalty", body.frequency_penalty, 0)):
            if value != default and not (name == "best_of" and value == 1):
                raise protocol.unsupported(name, f"only {default} is implemented")
        if body.logit_bias:
            raise protocol.unsupported("logit_bias", "biases are not implemented")
        if body.suffix:
            raise protocol.unsupported("suffix", "insertion is not implemented")
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
            prompt_ids, prompt_text = spec.tokenizer.encode(body.prompt), body.prompt
        elif body.prompt and all(isinstance(t, int) for t in body.prompt):
            prompt_ids = list(body.prompt)
            spec.check_token_ids(prompt_ids, "prompt")
            prompt_text = spec.tokenizer.decode(prompt_ids)
        elif not body.prompt:
            raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
        else:
            raise protocol.unsupported("prompt", "send one prompt (a string or a list of token ids) per request")
        if not prompt_ids:
            raise APIError(400, "The prompt encodes to no tokens.", param="prompt", code="empty_prompt")
        maximum = spec.info.max_context
        if len(prompt_ids) > maximum:
            raise protocol.context_error(maximum, len(prompt_ids), body.max_tokens or 0)
        max_tokens = maximum - len(prompt_ids) if body.max_tokens is None else body.max_tokens
        if len(prompt_ids) + max_tokens > maximum:
            raise protocol.context_error(maximum, len(prompt_ids), max_tokens, param="max_tokens")
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "'max_tokens' 0 is only useful with 'echo' (scoring a text).", param="max_tokens",
                           code="invalid_value")
        stop = body.stop_strings()
        spec.check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        if body.user:
            log.info("completion for user %r", body.user)
        message = GenerateRequest(
            uid=f"cmpl-{uuid.uuid4().hex}", prompt_ids=tuple(prompt_ids), params=body.sampling_params(max_tokens),
            stop=tuple(stop), prompt_logprobs=body.echo and body.logprobs is not None, progress=body.stream,
            timeout=timeout, route=spec.engine.route)
        return message, prompt_text


class _Completion:
    """One completion on its way back: engine outputs become OpenAI chunks or one body."""

    def __init__(self, spec, message: GenerateRequest, body: CompletionRequest, prompt_text: str, arrival: float):
        self.spec, self.body = spec, body
        self.uid = message.uid
        self.prompt_ids = list(message.prompt_ids)
        self.prompt_text, self.arrival = prompt_text, arrival
        self.created = int(time.time())
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.echo_sent = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.outcome: Finished | Failed | None = None

    # engine outputs -> state ------------------------------------------------------------------------
    def _on_prompt(self, output: PromptLogprobs) -> None:
        token_text = self.spec.tokenizer.token_text
        offset = 0
        for token, logprob, top in zip(self.prompt_ids, output.token_logprobs, output.top_logprobs):
            self._add_logprob(token_text(token), logprob, top, offset)
            offset += len(token_text(token))

    def _add_logprob(self, token: str, logprob, top, offset: int) -> dict | None:
        token_text = self.spec.tokenizer.token_text
        top = {token_text(t): lp for t, lp in top} if top else None
        for key, value in (("tokens", token), ("token_logprobs", logprob), ("top_logprobs", top),
                           ("text_offset", offset)):
            self.logprobs[key].append(value)
        return top

    def _on_token(self, output: Token) -> dict | None:
        now = time.monotonic()
        metrics = self.spec.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.arrival)
        else:
            metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now
        offset = len(self.prompt_text) * self.body.echo + len(self.text)
        self.text += output.text
        self.token_ids.append(output.token)
        if self.body.logprobs is None:
            return None
        token = self.spec.tokenizer.token_text(output.token)
        top = self._add_logprob(token, output.logprob, output.top_logprobs, offset)
        return {"tokens": [token], "token_logprobs": [output.logprob], "top_logprobs": [top or {}],
                "text_offset": [offset]}

    def _on_end(self, output: Finished | Failed) -> None:
        self.outcome = output
        metrics = self.spec.metrics
        metrics.prompt_tokens.inc(len(self.prompt_ids))
        metrics.generation_tokens.inc(len(self.token_ids))
        if isinstance(output, Finished):
            metrics.finished.labels(finished_reason=output.reason.value).inc()
            metrics.e2e.observe(time.monotonic() - self.arrival)
        else:
            metrics.failed.labels(code=output.code.value).inc()

    def count_if_abandoned(self) -> None:
        """At release: a request that got no terminal output was abandoned by its client."""
        if self.outcome is None:
            self._on_end(Finished(self.uid, FinishReason.ABORT, len(self.prompt_ids), len(self.token_ids)))

    def _usage(self) -> dict:
        prompt, completion = len(self.prompt_ids), len(self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, text: str, logprobs, finish_reason, **extra) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **extra}

    def _chunk(self, choices: list, **extra) -> str:
        body = {"id": self.uid, "object": "text_completion", "created": self.created,
                "model": self.spec.info.name, "choices": choices, **extra}
        return f"data: {_json(body)}\n\n"

    def _echo_chunk(self) -> str | None:
        """The prompt as the first chunk when echo is on (with its logprobs once the prefill has them)."""
        if not self.body.echo or self.echo_sent:
            return None
        self.echo_sent = True
        extra = {"prompt_token_ids": self.prompt_ids} if self.body.return_token_ids else {}
        logprobs = dict(self.logprobs) if self.body.logprobs is not None else None
        return self._chunk([self._choice(self.prompt_text, logprobs, None, **extra)])

    # streaming -------------------------------------------------------------------------------------
    async def stream(self, stream):
        body = self.body
        yield ": accepted\n\n"
        async for output in stream.outputs(tick=KEEPALIVE_SECONDS):
            if output is None:
                yield ": keep-alive\n\n"
            elif isinstance(output, Progress):
                yield (f": prefill {output.layers_done}/{output.layers} layers, "
                       f"{output.prompt_tokens} prompt tokens\n\n")
            elif isinstance(output, PromptLogprobs):
                self._on_prompt(output)
                yield self._echo_chunk()
            elif isinstance(output, Token):
                echo = self._echo_chunk()
                if echo:
                    yield echo
                logprobs = self._on_token(output)
                extra = {"token_ids": [output.token]} if body.return_token_ids else {}
                if body.return_token_ids and not body.echo and len(self.token_ids) == 1:
                    extra["prompt_token_ids"] = self.prompt_ids
                yield self._chunk([self._choice(output.text, logprobs, None, **extra)])
            elif isinstance(output, Finished):
                self._on_end(output)
                echo = self._echo_chunk()
                if echo:
                    yield echo
                yield self._chunk([self._choice("", None, output.reason.value)])
                if body.stream_options and body.stream_options.include_usage:
                    yield self._chunk([], usage=self._usage())
            elif isinstance(output, Failed):  # as vLLM does: an error event, then [DONE]
                self._on_end(output)
                yield f"data: {_json(APIError.from_failure(output).body())}\n\n"
        yield "data: [DONE]\n\n"

    # one body --------------------------------------------------------------------------------------
    async def collect(self, stream, request: Request) -> Response:
        final = None
        async with self.spec.watch_disconnect(request, stream, Finished(self.uid, FinishReason.ABORT, 0, 0)):
            async for output in stream.outputs():
                if isinstance(output, PromptLogprobs):
                    self._on_prompt(output)
                elif isinstance(output, Token):
                    self._on_token(output)
                elif isinstance(output, Finished | Failed):
                    final = output
        if isinstance(final, Failed):
            self._on_end(final)
            return APIError.from_failure(final).response()
        if final.reason is FinishReason.ABORT:  # the client is gone; nobody reads this
            return APIError(499, "The request was cancelled.", code="cancelled").response()
        self._on_end(final)
        extra = {}
        if self.body.return_token_ids:
            extra = {"prompt_token_ids": self.prompt_ids, "token_ids": self.token_ids}
        text = (self.prompt_text if self.body.echo else "") + self.text
        logprobs = self.logprobs if self.body.logprobs is not None else None
        return JSONResponse({"id": self.uid, "object": "text_completion", "created": self.created,
                             "model": self.spec.info.name,
                             "choices": [self._choice(text, logprobs, final.reason.value, **extra)],
                             "usage": self._usage()})


def _json(value) -> str:
    # ASCII only: SSE splits lines at CR/LF alone, but common clients (requests' iter_lines) also split at
    # U+0085, U+2028, U+001C..1E, which json.dumps would otherwise write raw inside generated text.
    return json.dumps(value)
