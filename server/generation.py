"""A generation on its way back: engine outputs of one HTTP request (one engine request per prompt, n choices
each) become OpenAI chunks (Server-Sent Events) or one body, in the shape of a completion or a chat
completion (`TextShape`, `ChatShape`).

SSE as OpenAI and vLLM send it: `data:` events only, `finish_reason` on a choice's last chunk, `[DONE]`
last; an error after the stream started is a `data: {"error": ...}` event before `[DONE]`. Comments only
on request (`stream_options.include_progress`) or after KEEPALIVE_SECONDS of silence (a long prefill).
"""

from __future__ import annotations

import codecs
import json
import time
from dataclasses import dataclass, field

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from model.messages import Failed, Finished, FinishReason, Progress, PromptLogprobs, Token

from .protocol import APIError, StreamOptions

KEEPALIVE_SECONDS = 15.0


@dataclass
class Prompt:
    ids: list[int]
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprobs entry: its text (`Tokenizer.token_text`), the bytes it stands for, its logprob, the
    likeliest tokens as (text, bytes, logprob), and where its text starts."""
    text: str
    bytes: bytes
    logprob: float | None
    top: list[tuple[str, bytes, float]] | None
    offset: int


class TextOffsets:
    """Each token's `text_offset`: where in the text the character holding its first byte begins. The count is
    of characters decoded so far, so the byte tokens of one character (`bytes:\\xc3`, `bytes:\\xa9`) share its
    place. A special token adds no text, or, when the text keeps special tokens, its name after what came
    before (an unfinished character then ends as a replacement character), as `model.detokenize` writes it."""

    def __init__(self, tokenizer, start: int = 0, skip_special: bool = True):
        self.tokenizer, self.next, self.skip_special = tokenizer, start, skip_special
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token: int) -> int:
        if not self.tokenizer.is_special(token):
            data = self.tokenizer.token_bytes(token)
            offset = self.next
            pending = self.decoder.getstate()[0]
            if pending and data and not _continues(pending, data[0]):
                offset += len(pending.decode("utf-8", errors="replace"))  # they end as replacement characters
            self.next += len(self.decoder.decode(data))
            return offset
        if not self.skip_special:
            self.next += len(self.decoder.decode(b"", final=True))
            self.decoder.reset()
            offset = self.next
            self.next += len(self.tokenizer.token_text(token))
            return offset
        return self.next


def _continues(pending: bytes, byte: int) -> bool:
    """Whether `byte` carries on the unfinished UTF-8 character `pending` began."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + bytes([byte]))
        return True
    except UnicodeDecodeError:
        return False


@dataclass
class ChoiceState:
    index: int  # in the response
    prompt: Prompt
    offsets: TextOffsets  # of its tokens in the text it answers (after the prompt when echoed)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    echoed: bool = False  # the prompt went out (echo)
    announced: bool = False  # the role went out (chat)
    last_token_at: float | None = None  # inter-token latency is per sequence, as vLLM's


class Generation:
    def __init__(self, spec, uid: str, prompts: list[Prompt], *, n: int, keep: int, shape, echo: bool,
                 logprobs: bool, stream_options: StreamOptions | None = None, return_token_ids: bool = False,
                 skip_special_tokens: bool = True, arrival: float):
        """`n` choices per prompt are generated, the `keep` with the highest cumulative logprob are answered
        (best_of); `uid` names the response, and its engine requests are `part(i)`."""
        self.spec, self.uid, self.prompts, self.shape = spec, uid, prompts, shape
        self.n, self.keep, self.echo, self.want_logprobs = n, keep, echo, logprobs
        options = stream_options or StreamOptions()
        self.include_usage, self.include_progress = options.include_usage, options.include_progress
        self.continuous_usage = options.include_usage and options.continuous_usage_stats  # as vLLM: both asked
        self.return_token_ids = return_token_ids
        self.arrival = arrival
        self.created = int(time.time())
        self.choices: dict[tuple[str, int], ChoiceState] = {}
        for i, prompt in enumerate(prompts):
            for j in range(n):
                offsets = TextOffsets(spec.tokenizer, start=len(prompt.text) if echo else 0,
                                      skip_special=skip_special_tokens)
                self.choices[(self.part(i), j)] = ChoiceState(i * keep + j, prompt, offsets)
        self.first_token_at: float | None = None
        self.prefilled: set[str] = set()  # parts whose prompt the engine has read (counted as prompt tokens)
        self.outcome: Finished | Failed | None = None

    def part(self, i: int) -> str:
        return f"{self.uid}-{i}"

    @property
    def parts(self) -> list[str]:
        return [self.part(i) for i in range(len(self.prompts))]

    # engine outputs -> state ------------------------------------------------------------------------------
    def _on_prompt(self, output: PromptLogprobs) -> None:
        """The prompt's logprob entries, made once and shared by its n choices (they only read them)."""
        prompt = self.prompts[self.parts.index(output.uid)]
        self.prefilled.add(output.uid)
        offsets = TextOffsets(self.spec.tokenizer)
        entries = [self._entry(token, logprob, top, offsets.advance(token))
                   for token, logprob, top in zip(prompt.ids, output.token_logprobs, output.top_logprobs)]
        for (uid, _), choice in self.choices.items():
            if uid == output.uid:
                choice.prompt_logprobs = entries

    def _entry(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None,
               offset: int) -> TokenLogprob:
        tokenizer = self.spec.tokenizer
        return TokenLogprob(tokenizer.token_text(token), tokenizer.token_bytes(token), logprob,
                            None if top is None else [(tokenizer.token_text(t), tokenizer.token_bytes(t), lp)
                                                      for t, lp in top], offset)

    def _on_token(self, output: Token) -> ChoiceState:
        now = time.monotonic()
        metrics = self.spec.metrics
        choice = self.choices[(output.uid, output.index)]
        self.prefilled.add(output.uid)
        if self.first_token_at is None:
            metrics.ttft.observe(now - self.arrival)
            self.first_token_at = now
        if choice.last_token_at is not None:  # not across choices: their tokens come in the same message
            metrics.itl.observe(now - choice.last_token_at)
        choice.last_token_at = now
        metrics.generation_tokens.inc()  # as they come: a long stream's tokens show in the rate while it runs
        choice.text += output.text
        choice.token_ids.append(output.token)
        choice.cumulative_logprob += output.logprob
        if self.want_logprobs:
            offset = choice.offsets.advance(output.token)
            choice.logprobs.append(self._entry(output.token, output.logprob, output.top_logprobs, offset))
        if output.finish is not None:
            choice.finish_reason = output.finish.value
        return choice

    def _on_finished(self, output: Finished) -> list[ChoiceState]:
        """Choices that ended without a last token (max_tokens 0): their reason comes with the request's."""
        if output.reason is not FinishReason.ABORT:
            self.prefilled.add(output.uid)
        ended = []
        for (uid, _), choice in self.choices.items():
            if uid == output.uid and choice.finish_reason is None and output.reason is not FinishReason.ABORT:
                choice.finish_reason = output.reason.value
                ended.append(choice)
        return ended

    def _end(self, outcome: Finished | Failed) -> None:
        """Metrics, once: at the end, or when the client left (`count_if_abandoned`)."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        metrics = self.spec.metrics
        # as vLLM counts them: prompts the engine read, not those that timed out or were cancelled in the queue
        read = [prompt for i, prompt in enumerate(self.prompts) if self.part(i) in self.prefilled]
        metrics.prompt_tokens.inc(sum(len(prompt.ids) for prompt in read))
        if isinstance(outcome, Finished):
            metrics.finished.labels(finished_reason=outcome.reason.value).inc()
            metrics.e2e.observe(time.monotonic() - self.arrival)
        else:
            metrics.failed.labels(code=outcome.code.value).inc()

    def count_if_abandoned(self) -> None:
        self._end(Finished(self.uid, FinishReason.ABORT, 0, 0))

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices.values())

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    # streaming ------------------------------------------------------------------------------------------
    def _event(self, body: dict) -> str:
        # json.dumps writes ASCII: SSE splits lines at CR/LF alone, but common clients (requests' iter_lines)
        # also split at U+0085, U+2028, U+001C..1E, which could otherwise appear raw inside generated text.
        return f"data: {json.dumps(body)}\n\n"

    def _chunk(self, choice: ChoiceState, text: str, logprobs: list | None, echo: bool = False) -> str:
        body = self.shape.chunk(self, choice, text, logprobs, echo)
        if self.continuous_usage:
            body["usage"] = self.usage()
        elif self.include_usage:  # OpenAI: every chunk but the last (the usage chunk) says "usage": null
            body["usage"] = None
        return self._event(body)

    def _echo(self, choice: ChoiceState) -> str | None:
        if not self.echo or choice.echoed:
            return None
        choice.echoed = True
        return self._chunk(choice, choice.prompt.text, choice.prompt_logprobs if self.want_logprobs else None, True)

    async def stream(self, stream):
        last, sent = None, time.monotonic()
        async for output in stream.outputs(tick=KEEPALIVE_SECONDS):
            pieces: list[str | None] = []
            if isinstance(output, Progress):
                if self.include_progress:
                    pieces.append(f": prefill {output.layers_done}/{output.layers} layers, "
                                  f"{output.prompt_tokens} prompt tokens\n\n")
            elif isinstance(output, PromptLogprobs):
                self._on_prompt(output)
            elif isinstance(output, Token):
                choice = self._on_token(output)
                pieces.append(self._echo(choice))
                piece = [choice.logprobs[-1]] if self.want_logprobs else None
                pieces.append(self._chunk(choice, output.text, piece))
            elif isinstance(output, Finished):
                for choice in self._on_finished(output):
                    pieces.append(self._echo(choice) or self._chunk(choice, "", None))
                last = output
            elif isinstance(output, Failed):  # as vLLM does: an error event, then [DONE]
                last = output
                pieces.append(self._event(APIError.from_failure(output).body()))
            # Silence is measured from the last byte sent, not the last engine output: a long prefill reports
            # every layer, which is not sent unless asked for, and a proxy would cut a stream quiet that long.
            if not any(pieces) and (output is None or time.monotonic() - sent >= KEEPALIVE_SECONDS):
                pieces.append(": keep-alive\n\n")
            for piece in pieces:
                if piece:
                    yield piece
                    sent = time.monotonic()
            if isinstance(last, Failed):
                break
        if last is not None:
            self._end(last)
        if self.include_usage and isinstance(last, Finished):
            body = self.shape.usage_chunk(self)
            yield self._event(body)
        yield "data: [DONE]\n\n"

    # one body ---------------------------------------------------------------------------------------------
    async def collect(self, stream, request: Request) -> Response:
        final = None
        abandoned = Finished(self.uid, FinishReason.ABORT, 0, 0)
        async with self.spec.watch_disconnect(request, stream, abandoned):
            async for output in stream.outputs():
                if isinstance(output, PromptLogprobs):
                    self._on_prompt(output)
                elif isinstance(output, Token):
                    self._on_token(output)
                elif isinstance(output, Finished):
                    if output.reason is FinishReason.ABORT:
                        final = output
                        break
                    self._on_finished(output)
                    final = output
                elif isinstance(output, Failed):
                    final = output
                    break
        if isinstance(final, Failed):
            self._end(final)
            return APIError.from_failure(final).response()
        if final is None or final.reason is FinishReason.ABORT:  # the client is gone; nobody reads this
            return APIError(499, "The request was cancelled.", code="cancelled").response()
        self._end(final)
        return JSONResponse(self.shape.body(self, self._answered()))

    def _answered(self) -> list[ChoiceState]:
        """The choices to answer: per prompt, the `keep` best of its n (best_of)."""
        answered = []
        for i in range(len(self.prompts)):
            mine = [c for (uid, _), c in self.choices.items() if uid == self.part(i)]
            if self.keep < self.n:
                mine = best_of(mine, self.keep)
            for rank, choice in enumerate(mine):
                choice.index = i * self.keep + rank
            answered += mine
        return answered


def best_of(choices: list[ChoiceState], keep: int) -> list[ChoiceState]:
    """The `keep` choices with the highest log probability per token, as OpenAI defines best_of (a sum would
    favour the shorter ones)."""
    return sorted(choices, key=lambda c: c.cumulative_logprob / max(1, len(c.token_ids)), reverse=True)[:keep]


# ---- the two response shapes -----------------------------------------------------------------------------
class TextShape:
    """/v1/completions: `text_completion` objects, OpenAI's legacy logprobs."""

    def chunk(self, generation: Generation, choice: ChoiceState, text: str, logprobs: list | None,
              echo: bool) -> dict:
        # The prompt's chunk ends its choice only when nothing was generated (max_tokens 0).
        finish = None if echo and choice.token_ids else choice.finish_reason
        item = {"index": choice.index, "text": text, "logprobs": _text_logprobs(logprobs), "finish_reason": finish}
        if generation.return_token_ids:
            if echo:
                item["prompt_token_ids"] = choice.prompt.ids
            elif choice.token_ids:
                item["token_ids"] = choice.token_ids[-1:]
                if len(choice.token_ids) == 1 and not generation.echo:
                    item["prompt_token_ids"] = choice.prompt.ids
        return self._object(generation, [item], "text_completion")

    def usage_chunk(self, generation: Generation) -> dict:
        return {**self._object(generation, [], "text_completion"), "usage": generation.usage()}

    def body(self, generation: Generation, choices: list[ChoiceState]) -> dict:
        items = []
        for choice in choices:
            logprobs = None
            if generation.want_logprobs:
                logprobs = _text_logprobs((choice.prompt_logprobs if generation.echo else []) + choice.logprobs)
            item = {"index": choice.index, "text": (choice.prompt.text if generation.echo else "") + choice.text,
                    "logprobs": logprobs, "finish_reason": choice.finish_reason}
            if generation.return_token_ids:
                item.update(prompt_token_ids=choice.prompt.ids, token_ids=choice.token_ids)
            items.append(item)
        return {**self._object(generation, items, "text_completion"), "usage": generation.usage()}

    @staticmethod
    def _object(generation: Generation, choices: list, kind: str) -> dict:
        return {"id": generation.uid, "object": kind, "created": generation.created,
                "model": generation.spec.info.name, "choices": choices}


def _text_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's legacy form: top_logprobs maps text to logprob, and holds the sampled token too (so up to
    logprobs + 1 entries)."""
    if entries is None:
        return None
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {text: lp for text, _, lp in e.top} for e in entries],
            "text_offset": [e.offset for e in entries]}


class ChatShape:
    """/v1/chat/completions: `chat.completion(.chunk)` objects with messages and deltas."""

    def __init__(self, top_logprobs: int = 0):
        self.top_logprobs = top_logprobs

    def chunk(self, generation: Generation, choice: ChoiceState, text: str, logprobs: list | None,
              echo: bool) -> dict:
        delta = {"content": text}
        if not choice.announced:  # the first chunk of a choice names the role
            choice.announced = True
            delta = {"role": "assistant", **delta}
        item = {"index": choice.index, "delta": delta, "logprobs": _chat_logprobs(logprobs, self.top_logprobs),
                "finish_reason": choice.finish_reason}
        body = TextShape._object(generation, [item], "chat.completion.chunk")
        if generation.return_token_ids:  # vLLM's places: the prompt's on the response, a choice's on the choice
            if "role" in delta:
                body["prompt_token_ids"] = choice.prompt.ids
            if choice.token_ids:
                item["token_ids"] = choice.token_ids[-1:]
        return body

    def usage_chunk(self, generation: Generation) -> dict:
        return {**TextShape._object(generation, [], "chat.completion.chunk"), "usage": generation.usage()}

    def body(self, generation: Generation, choices: list[ChoiceState]) -> dict:
        items = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                  "logprobs": _chat_logprobs(c.logprobs, self.top_logprobs) if generation.want_logprobs else None,
                  "finish_reason": c.finish_reason} for c in choices]
        body = {**TextShape._object(generation, items, "chat.completion"), "usage": generation.usage()}
        if generation.return_token_ids:
            body["prompt_token_ids"] = generation.prompts[0].ids  # a chat has one prompt
            for item, choice in zip(items, choices):
                item["token_ids"] = choice.token_ids
        return body


def _chat_logprobs(entries: list[TokenLogprob] | None, top_logprobs: int) -> dict | None:
    """Chat's form: each token with its bytes, and exactly the `top_logprobs` likeliest tokens (the sampler
    appends the sampled one when it is not among them, which chat does not show)."""
    if entries is None:
        return None

    def item(text: str, raw: bytes, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**item(e.text, e.bytes, e.logprob),
                         "top_logprobs": [item(*top) for top in (e.top or [])[:top_logprobs]]} for e in entries]}
