"""The SSE stream of one generation, fed engine outputs through a real RequestStream (no server, no model)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest

import server.generation as generation
from model import ByteTokenizer
from model.messages import ErrorCode, Failed, Finished, FinishReason, Progress, Token
from server.engine_client import RequestStream
from server.generation import Generation, Prompt, TextShape
from server.protocol import StreamOptions

KEEPALIVE = ": keep-alive\n\n"


def streamed(layers: int, layer_seconds: float, **options) -> list[str]:
    """What the client is sent while the engine reports a prefill of `layers` layers, then one token."""
    spec = SimpleNamespace(tokenizer=ByteTokenizer(), metrics=MagicMock(), info=SimpleNamespace(name="m"))
    answer = Generation(spec, "cmpl-1", [Prompt([5, 6], "ab")], n=1, keep=1, shape=TextShape(), echo=False,
                        logprobs=False, stream_options=StreamOptions(**options),
                        arrival=time.monotonic())
    part = answer.part(0)
    stream = RequestStream("cmpl-1", [part], deadline=time.monotonic() + 60, engine_pid=0)

    async def engine():
        for layer in range(1, layers + 1):
            await asyncio.sleep(layer_seconds)
            stream.deliver(Progress(part, layer, layers, 2))
        stream.deliver(Token(part, 70, "x", -0.1, [], finish=FinishReason.LENGTH))
        stream.deliver(Finished(part, FinishReason.LENGTH, 2, 1))

    async def client():
        task = asyncio.create_task(engine())
        pieces = [piece async for piece in answer.stream(stream)]
        await task
        return pieces

    return asyncio.run(client())


def test_a_long_prefill_whose_progress_is_not_sent_still_keeps_the_stream_alive(monkeypatch):
    # Each layer reports well within the keep-alive interval, so the engine is never silent that long; the
    # client is, unless the stream counts silence from the last byte it sent.
    monkeypatch.setattr(generation, "KEEPALIVE_SECONDS", 0.2)
    started = time.monotonic()
    pieces = streamed(layers=20, layer_seconds=0.05)
    took = time.monotonic() - started  # about a second of prefill (more on a busy machine)
    assert 3 <= pieces.count(KEEPALIVE) <= took / 0.2 + 1, (took, pieces)  # one per 0.2 s of silence
    assert pieces[-1] == "data: [DONE]\n\n" and any('"text": "x"' in piece for piece in pieces)


@pytest.mark.parametrize("include_progress", [True, False])
def test_no_keep_alive_while_the_stream_is_not_quiet(monkeypatch, include_progress):
    monkeypatch.setattr(generation, "KEEPALIVE_SECONDS", 0.5)
    pieces = streamed(layers=4, layer_seconds=0.05, include_progress=include_progress)
    assert KEEPALIVE not in pieces
    assert sum(piece.startswith(": prefill") for piece in pieces) == (4 if include_progress else 0)


@pytest.mark.parametrize("include_usage", [True, False])
def test_usage_on_every_chunk_only_when_the_usage_is_asked_for_too(include_usage):
    """vLLM's rule: continuous_usage_stats adds to include_usage, it does not stand alone."""
    pieces = streamed(layers=1, layer_seconds=0, include_usage=include_usage, continuous_usage_stats=True)
    chunks = [json.loads(piece[6:]) for piece in pieces if piece.startswith("data: {")]
    with_choices = [chunk for chunk in chunks if chunk["choices"]]
    if include_usage:
        assert [chunk["usage"]["completion_tokens"] for chunk in with_choices] == [1] * len(with_choices)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 3
    else:
        assert all("usage" not in chunk for chunk in chunks)


def test_inter_token_latency_is_measured_per_choice():
    """n choices' tokens come together each step: the gap between steps is the latency, not the gap between
    one choice's token and its sibling's (nearly zero), nor a sibling's first token."""
    spec = SimpleNamespace(tokenizer=ByteTokenizer(), metrics=MagicMock(), info=SimpleNamespace(name="m"))
    answer = Generation(spec, "cmpl-1", [Prompt([5, 6], "ab")], n=2, keep=2, shape=TextShape(), echo=False,
                        logprobs=False, arrival=time.monotonic())
    part = answer.part(0)
    for step in range(3):
        for index in (0, 1):
            answer._on_token(Token(part, 70, "x", -0.1, [], index=index))
        time.sleep(0.05)
    gaps = [call.args[0] for call in spec.metrics.itl.observe.call_args_list]
    assert len(gaps) == 4 and all(gap >= 0.04 for gap in gaps), gaps  # two later steps of two choices
    assert spec.metrics.ttft.observe.call_count == 1


def test_generated_tokens_are_counted_as_they_come_not_when_the_request_ends():
    spec = SimpleNamespace(tokenizer=ByteTokenizer(), metrics=MagicMock(), info=SimpleNamespace(name="m"))
    answer = Generation(spec, "cmpl-1", [Prompt([5, 6], "ab")], n=1, keep=1, shape=TextShape(), echo=False,
                        logprobs=False, arrival=time.monotonic())
    for _ in range(3):
        answer._on_token(Token(answer.part(0), 70, "x", -0.1, []))
    assert spec.metrics.generation_tokens.inc.call_count == 3  # a long stream shows in the rate while it runs
    answer._end(Finished(answer.part(0), FinishReason.LENGTH, 2, 3))
    assert sum(call.args[0] if call.args else 1 for call in spec.metrics.generation_tokens.inc.call_args_list) == 3


def test_prompt_tokens_count_the_prompts_the_engine_read():
    """Not those of a request that timed out or was cancelled while it waited in the queue (vLLM's count)."""
    spec = SimpleNamespace(tokenizer=ByteTokenizer(), metrics=MagicMock(), info=SimpleNamespace(name="m"))
    answer = Generation(spec, "cmpl-1", [Prompt([5, 6], "ab"), Prompt([7, 8, 9], "cde")], n=1, keep=1,
                        shape=TextShape(), echo=False, logprobs=False, arrival=time.monotonic())
    answer._on_token(Token(answer.part(0), 70, "x", -0.1, []))  # the first prompt was read, the second waited
    answer._end(Failed(answer.part(1), 504, "The request deadline passed.", ErrorCode.TIMEOUT))
    spec.metrics.prompt_tokens.inc.assert_called_once_with(2)
