"""Clients nobody here wrote, used as their users use them, against a real server on 127.0.0.1: the openai SDK
(sync and async), LangChain's OpenAI LLM and embeddings, litellm, a benchmark-style SSE reader; and the API
surface they rely on (prompt arrays, n and best_of, vLLM's sampling parameters, logprobs, chat, errors,
/openapi.json, metrics)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import numpy as np
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model import ByteTokenizer, SamplingParams, generate, load_model
from server import error_bodies
from server.request_ids import RequestIdMiddleware
from server.generation import ChoiceState, Prompt, best_of
from server.protocol import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, EmbeddingResponse
from tests.server_harness import API_KEY, RunningServer, tiny_checkpoint

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch a price list at import

CONTEXT = 8192
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("clients") / "tiny", context=CONTEXT)


@pytest.fixture(scope="module")
def server(checkpoint):
    template = checkpoint.parent / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    running = RunningServer(checkpoint, "--max-running", "8", "--chat-template", str(template))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local_model(checkpoint):
    return load_model(checkpoint)


def greedy_text(server, prompt, max_tokens: int) -> str:
    with server.client() as client:
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                        "temperature": 0})
    return response.json()["choices"][0]["text"]


def strict_sse(response: httpx.Response) -> list:
    """How vLLM's and similar benchmark clients read a stream: strip each network read, split it on blank
    lines, drop messages that start with ':', parse the rest after 'data: '."""
    events = []
    for read in response.iter_raw():
        text = read.decode().strip()
        for message in filter(None, text.split("\n\n")):
            if message.startswith(":"):
                continue
            data = message.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- the openai SDK --------------------------------------------------------------------------------------
def test_openai_sdk_prompt_arrays_n_and_usage(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    result = client.completions.create(model="tiny", prompt=["first prompt", "second"], max_tokens=6, temperature=0,
                                       n=2)
    CompletionResponse.model_validate(result.model_dump())
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(["first prompt", "second"]):
        expected = greedy_text(server, prompt, 6)
        assert result.choices[2 * i].text == result.choices[2 * i + 1].text == expected
    assert result.usage.prompt_tokens == len("first prompt") + len("second")
    assert result.usage.completion_tokens == 4 * 6


def test_openai_async_sdk_streams_chat_and_completions(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        stream = await client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=5, temperature=0,
                                                 stream=True)
        texts, finishes = {0: "", 1: ""}, {}
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        chat = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=5, temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in chat:
            ChatCompletionChunk.model_validate(chunk.model_dump())
            pieces += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        return texts, finishes, "".join(pieces), usage

    texts, finishes, chat_text, usage = asyncio.run(run())
    assert texts == {0: greedy_text(server, "a", 5), 1: greedy_text(server, "b", 5)}
    assert finishes == {0: "length", 1: "length"}
    rendered = "<user>hi\n<assistant>"
    assert chat_text == greedy_text(server, rendered, 5) and usage.prompt_tokens == len(rendered)


def test_chat_completion_matches_the_rendered_prompt(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text",
                                                                                       "text": "hello"}]}]
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2)
    ChatCompletionResponse.model_validate(result.model_dump())
    rendered = "<system>be brief\n<user>hello\n<assistant>"
    assert result.choices[0].message.content == greedy_text(server, rendered, 8)
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason == "length"
    assert len(result.choices[0].logprobs.content) == 8
    assert all(len(t.top_logprobs) == 2 for t in result.choices[0].logprobs.content)


def test_chat_text_parts_are_joined_by_new_lines_and_token_ids_are_returned_when_asked(server):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    payload = {"messages": [{"role": "user", "content": parts}], "max_tokens": 6, "temperature": 0,
               "return_token_ids": True}
    with server.client() as client:
        body = client.post("/v1/chat/completions", json=payload).json()
        stream = client.post("/v1/chat/completions", json={**payload, "stream": True})
    rendered = "<user>first\nsecond\n<assistant>"  # as vLLM joins them
    assert body["prompt_token_ids"] == ByteTokenizer().encode(rendered)
    assert body["choices"][0]["message"]["content"] == greedy_text(server, rendered, 6)
    assert ByteTokenizer().decode(body["choices"][0]["token_ids"]) == body["choices"][0]["message"]["content"]
    chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert chunks[0]["prompt_token_ids"] == body["prompt_token_ids"]
    assert all("prompt_token_ids" not in chunk for chunk in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == body["choices"][0]["token_ids"]


def test_chat_logprobs_show_exactly_top_logprobs_and_each_tokens_bytes(server):
    """Chat shows the top_logprobs likeliest tokens, no more (the sampled one is not added, unlike the legacy
    completions form), none when only logprobs is asked; each token's bytes are the bytes it stands for."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    hot = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, temperature=2.0, seed=1,
                                         logprobs=True, top_logprobs=1).choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 1 for t in hot)
    assert any(t.top_logprobs[0].token != t.token for t in hot)  # sampled tokens that were not the likeliest
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True).choices[0].logprobs.content
    assert len(plain) == 5 and all(t.top_logprobs == [] for t in plain)
    for entry in hot:  # the tiny model's tokens are bytes
        assert len(entry.bytes) == 1 and (entry.token == chr(entry.bytes[0]) if entry.bytes[0] < 128
                                          else entry.token == f"bytes:\\x{entry.bytes[0]:02x}")


def test_chat_without_a_template_is_a_clear_400(checkpoint, tmp_path):
    bare = RunningServer(tiny_checkpoint(tmp_path / "bare"), api_key=None)
    try:
        response = httpx.post(f"{bare.url}/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    finally:
        bare.stop()
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "chat_template_missing"


def test_a_chat_template_refuses_or_fails_with_a_400_that_says_why(tmp_path):
    """Hugging Face templates refuse a conversation with raise_exception(message); kwargs that break the
    template (a number added to text) are the request's fault; a kwarg named like render's own arguments
    ("self") is one more variable."""
    template = tmp_path / "strict.jinja"
    template.write_text("{% if messages[0].role != 'user' %}{{ raise_exception('Start with a user message.') }}"
                        "{% endif %}{{ greeting + messages[0].content }}\n<assistant>")
    strict = RunningServer(tiny_checkpoint(tmp_path / "strict"), "--chat-template", str(template), api_key=None)

    def chat(messages, **kwargs):
        return httpx.post(f"{strict.url}/v1/chat/completions", timeout=30, json={
            "messages": messages, "max_tokens": 2, "chat_template_kwargs": kwargs})

    try:
        fine = chat([{"role": "user", "content": "hi"}], greeting="hello ", self=1)
        refused = chat([{"role": "system", "content": "hi"}], greeting="hello ")
        broken = chat([{"role": "user", "content": "hi"}], greeting=5)
    finally:
        strict.stop()
    assert fine.status_code == 200, fine.text
    assert refused.status_code == 400 and "Start with a user message." in refused.json()["error"]["message"]
    assert broken.status_code == 400 and "TypeError" in broken.json()["error"]["message"]
    assert refused.json()["error"]["param"] == broken.json()["error"]["param"] == "messages"


def test_a_defect_still_answers_an_openai_error_body():
    """No request should reach it; one that does gets JSON a client can read, not a text/plain 500."""
    app = FastAPI()
    error_bodies.install(app)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/broken")
    def broken():
        raise RuntimeError("a defect")

    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/broken")
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert response.json()["error"]["type"] == "server_error"
    assert response.headers["x-request-id"].startswith("req_")  # so the report can name the logged failure
    assert client.get("/broken", headers={"X-Request-Id": "mine-42"}).headers["x-request-id"] == "mine-42"


def test_benchmark_clients_may_send_both_names_of_the_completion_limit(server):
    """guidellm sends max_tokens and max_completion_tokens together, to both routes."""
    limits = {"max_tokens": 4, "max_completion_tokens": 4, "ignore_eos": True, "temperature": 0}
    with server.client() as client:
        text = client.post("/v1/completions", json={"prompt": "abc", **limits})
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **limits})
        newer = client.post("/v1/completions", json={"prompt": "abc", "max_completion_tokens": 3, "temperature": 0})
        differ = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 4, "max_completion_tokens": 5})
    assert text.status_code == 200 and text.json()["usage"]["completion_tokens"] == 4
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 4
    assert newer.status_code == 200 and newer.json()["usage"]["completion_tokens"] == 3
    assert differ.status_code == 400 and differ.json()["error"]["param"] == "max_completion_tokens"


def test_chat_refuses_by_name_what_it_cannot_read_or_do(server):
    """Image parts, unknown roles, missing content and a demanded tool call are 400s that say which; a text
    part's extra keys (cache_control), tool_choice "auto" without tools and store/metadata change nothing."""
    def chat(messages, **extra):
        with server.client() as client:
            return client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4,
                                                             "temperature": 0, **extra})

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    looked = chat([{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}])
    assert looked.status_code == 400 and looked.json()["error"]["param"] == "messages[0].content[1]"
    assert "image_url" in looked.json()["error"]["message"]
    assert looked.json()["error"]["code"] == "unsupported_parameter"
    bogus = chat([{"role": "user", "content": "hi"}, {"role": "bogus", "content": "hi"}])
    assert bogus.status_code == 400 and bogus.json()["error"]["param"] == "messages[1].role"
    required = chat([{"role": "user", "content": "hi"}], tool_choice="required")
    assert required.status_code == 400 and required.json()["error"]["param"] == "tool_choice"
    missing = chat([{"role": "user"}])
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages[0].content"
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    called = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                   {"role": "tool", "tool_call_id": "call_1", "content": "42"}])
    assert called.status_code == 200, called.text
    # the older form of a call (OpenAI: content may be left out "unless tool_calls or function_call")
    called = chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                        "function_call": {"name": "f", "arguments": "{}"}},
                   {"role": "function", "name": "f", "content": "42"}])
    assert called.status_code == 200, called.text
    # nested parameters are named as OpenAI names them, not by pydantic's internal branch names
    untyped = chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}])
    assert untyped.status_code == 400 and untyped.json()["error"]["param"] == "messages[0].content[1].type"
    roleless = chat([{"role": "user", "content": "hi"}, {"content": "x"}])
    assert roleless.status_code == 400 and roleless.json()["error"]["param"] == "messages[1].role"
    hints = chat([{"role": "user", "content": "hi"}], service_tier="fast", prompt_cache_retention="24h",
                 prompt_cache_options={"ttl": "1h"}, add_special_tokens=False)
    assert hints.status_code == 200, hints.text
    plain = chat([{"role": "developer", "content": "hi"}])
    cached = chat([{"role": "developer", "content": [{"type": "text", "text": "hi",
                                                     "cache_control": {"type": "ephemeral"}}]}], tool_choice="auto")
    bookkept = chat([{"role": "developer", "content": "hi"}], store=False, metadata={"app": "demo"},
                    service_tier="flex", prompt_cache_key="k", safety_identifier="u1", reasoning_effort="low",
                    verbosity="low", prediction={"type": "content", "content": "hello"}, modalities=["text"],
                    function_call="auto", stream_options=None)  # OpenAI's fields that ask for nothing visible
    obfuscated = chat([{"role": "developer", "content": "hi"}], stream=True,
                      stream_options={"include_usage": True, "include_obfuscation": False})
    assert plain.status_code == cached.status_code == bookkept.status_code == obfuscated.status_code == 200, \
        bookkept.text
    assert bookkept.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    refusals = {"functions": {"functions": [{"name": "f", "parameters": {}}]},
                "function_call": {"function_call": {"name": "f"}}, "audio": {"audio": {"voice": "alloy"}},
                "modalities": {"modalities": ["text", "audio"]}, "web_search_options": {"web_search_options": {}}}
    for param, fields in refusals.items():
        refused = chat([{"role": "user", "content": "hi"}], **fields)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    assert cached.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_tokenize_counts_a_chat_as_the_template_renders_it(server):
    """vLLM's /tokenize takes messages too: how a client learns what a conversation costs before sending it."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    with server.client() as client:
        chat = client.post("/tokenize", json={"messages": messages}).json()
        text = client.post("/tokenize", json={"prompt": "<system>be brief\n<user>hello\n<assistant>",
                                              "add_special_tokens": True}).json()
        neither = client.post("/tokenize", json={"model": "tiny"})
        both = client.post("/tokenize", json={"prompt": "x", "messages": messages})
        bad_role = client.post("/tokenize", json={"messages": [{"role": "bogus", "content": "x"}]})
    assert chat["tokens"] == text["tokens"] and chat["count"] == len(text["tokens"])
    assert neither.status_code == both.status_code == 400 and neither.json()["error"]["param"] == "prompt"
    assert bad_role.status_code == 400 and bad_role.json()["error"]["param"] == "messages[0].role"


def test_a_prompt_that_fills_the_context_without_max_tokens_is_refused_unless_it_is_scored(server):
    """With max_tokens null (or unsaid, in chat) the completion gets what the context leaves: none is a 400 (as
    vLLM answers), not a 200 with nothing generated; with echo and logprobs it is a scoring request, answered."""
    full = [97] * CONTEXT
    with server.client() as client:
        null = client.post("/v1/completions", json={"prompt": full, "max_tokens": None, "stream": True})
        template = client.post("/tokenize", json={"prompt": "<user>\n<assistant>"}).json()["count"]
        chat = client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "a" * (CONTEXT - template)}]})
        scored = client.post("/v1/completions", json={"prompt": full, "max_tokens": None, "echo": True,
                                                        "logprobs": 0})
    for refused in (null, chat):
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert scored.status_code == 200, scored.text
    assert len(scored.json()["choices"][0]["logprobs"]["tokens"]) == CONTEXT


def test_any_int64_seed_is_a_seed_and_models_retrieve_names_the_model(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    texts = [client.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=1.0, seed=seed)
             .choices[0].text for seed in (-1, -1, 2**63 - 1)]
    assert texts[0] == texts[1] == texts[2]  # seeds are taken modulo 2**63, as one seed per value
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


# ---- LangChain and litellm ----------------------------------------------------------------------------------
def test_langchain_openai_llm_and_embeddings(server):
    from langchain_openai import OpenAI, OpenAIEmbeddings

    llm = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, model="tiny", max_tokens=6, temperature=0,
                 max_retries=0)
    assert llm.invoke("hello") == greedy_text(server, "hello", 6)  # sent as "prompt": ["hello"]
    assert llm.batch(["one", "two"]) == [greedy_text(server, "one", 6), greedy_text(server, "two", 6)]
    assert "".join(llm.stream("hello")) == greedy_text(server, "hello", 6)
    embeddings = OpenAIEmbeddings(base_url=f"{server.url}/v1", api_key=API_KEY, model="tiny",
                                  check_embedding_ctx_length=False, max_retries=0)  # base64 on the wire
    vectors = embeddings.embed_documents(["a document", "another"])
    many = embeddings.embed_documents([f"document {i}" for i in range(1000)])  # LangChain's batch: 1,000 texts
    assert len(many) == 1000 and np.allclose(many[0], embeddings.embed_query("document 0"), atol=1e-5)
    with server.client() as client:
        plain = client.post("/v1/embeddings", json={"input": ["a document", "another"]}).json()
    EmbeddingResponse.model_validate(plain)
    assert np.allclose(vectors, [d["embedding"] for d in plain["data"]], atol=1e-6)


def test_litellm_text_completion_streaming_and_embeddings(server):
    import litellm

    common = dict(model="hosted_vllm/tiny", api_base=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    result = litellm.text_completion(prompt=["one", "two"], max_tokens=5, temperature=0, **common)
    assert [c.text for c in result.choices] == [greedy_text(server, "one", 5), greedy_text(server, "two", 5)]
    pieces = [chunk.choices[0].text or "" for chunk in
              litellm.text_completion(prompt="one", max_tokens=5, temperature=0, stream=True, **common)]
    assert "".join(pieces) == greedy_text(server, "one", 5)
    vectors = litellm.embedding(input=["a", "b"], **{**common, "model": "openai/tiny"})
    assert len(vectors.data) == 2 and len(vectors.data[0]["embedding"]) == 64


# ---- a benchmark client's strict stream reader -------------------------------------------------------------
def test_strict_sse_readers_see_every_event_over_long_prompts(server):
    """vLLM's benchmark payload (it always sends repetition_penalty), prompts long enough for a multi-layer
    prefill: every stream's text is the greedy text, and every token arrived."""
    prompts = ["w" * 3000, "q" * 2500, "short"]
    for prompt in prompts:
        payload = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "stream": True,
                   "repetition_penalty": 1.0, "ignore_eos": True, "stream_options": {"include_usage": True,
                                                                                     "continuous_usage_stats": True}}
        with server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
            events = strict_sse(response)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        assert len(chunks) == 8 and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert [c["usage"]["completion_tokens"] for c in chunks] == list(range(1, 9))
        assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text(server, prompt, 8)


# ---- n, best_of -----------------------------------------------------------------------------------------------
def test_n_choices_share_one_prefill_of_a_long_prompt(server):
    prompt = "p" * 4000
    before = server.metric("reformer:prefill_tokens_total")
    with server.client() as client:
        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                    "n": 4}).json()
    assert server.metric("reformer:prefill_tokens_total") - before == 4000  # read once, not four times
    texts = [c["text"] for c in body["choices"]]
    assert texts == [greedy_text(server, prompt, 6)] * 4


def test_seeded_choices_differ_and_repeat_and_best_of_keeps_the_likeliest(server):
    request = {"prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "seed": 5, "logprobs": 0}
    with server.client() as client:
        three = client.post("/v1/completions", json={**request, "n": 3}).json()["choices"]
        again = client.post("/v1/completions", json={**request, "n": 3}).json()["choices"]
        best = client.post("/v1/completions", json={**request, "n": 1, "best_of": 3}).json()["choices"]
    assert [c["text"] for c in three] == [c["text"] for c in again]
    assert len({c["text"] for c in three}) > 1
    likeliest = max(three, key=lambda c: sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["tokens"]))
    assert len(best) == 1 and best[0]["text"] == likeliest["text"] and best[0]["index"] == 0


def test_best_of_ranks_by_log_probability_per_token_not_in_all():
    """OpenAI's best_of is "the highest log probability per token": a sum would prefer a short choice."""
    short = ChoiceState(0, Prompt([1], "p"), 0, token_ids=[5, 6], cumulative_logprob=-2.0)  # -1 a token
    long = ChoiceState(1, Prompt([1], "p"), 0, token_ids=[5] * 8, cumulative_logprob=-4.0)  # -0.5 a token
    assert best_of([short, long], 1) == [long]


# ---- vLLM's sampling parameters ---------------------------------------------------------------------------------
def reference_next_token(logits, prompt, generated, presence, frequency, repetition, bias):
    """vLLM's rules written out one token at a time (the bias first, then the repetition penalty on prompt
    and generated tokens, then frequency and presence on generated ones), then greedy."""
    scores = logits.tolist()
    for token in range(len(scores)):
        scores[token] += bias.get(token, 0.0)
        if token in prompt or token in generated:
            scores[token] = scores[token] / repetition if scores[token] > 0 else scores[token] * repetition
        count = generated.count(token)
        scores[token] -= frequency * count + presence * (count > 0)
    return max(range(len(scores)), key=scores.__getitem__)


def test_penalties_and_logit_bias_follow_a_reference(server, local_model):
    import torch

    prompt = ByteTokenizer().encode("penalise repeats")
    bias = {ord("e") + 2: 3.0, ord(" ") + 2: -4.0}
    request = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "presence_penalty": 0.7,
               "frequency_penalty": 0.4, "repetition_penalty": 1.3, "logit_bias": {str(k): v for k, v in bias.items()},
               "return_token_ids": True}
    with server.client() as client:
        tokens = client.post("/v1/completions", json=request).json()["choices"][0]["token_ids"]
    generated = []
    for token in tokens:
        with torch.no_grad():
            logits = local_model(torch.tensor([prompt + generated]))[0, -1]
        assert token == reference_next_token(logits, prompt, generated, 0.7, 0.4, 1.3, bias)
        generated.append(token)
    plain = generate(local_model, [prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    assert tokens != plain  # the penalties changed something


def test_min_tokens_allowed_tokens_and_stop_strings_in_output(server):
    allowed = [ord(c) + 2 for c in "ab"]
    with server.client() as client:
        only_ab = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "temperature": 1.0,
                                                       "seed": 3, "allowed_token_ids": allowed}).json()
        free = greedy_text(server, "stop here", 20)
        stop = free[5:7]
        kept = client.post("/v1/completions", json={"prompt": "stop here", "max_tokens": 20, "temperature": 0,
                                                     "stop": [stop], "include_stop_str_in_output": True}).json()
        # Token 4 is favoured by +100 and is a stop token: without min_tokens it would end the text at once.
        favoured = {"prompt": [5], "max_tokens": 6, "temperature": 0, "stop_token_ids": [4], "logit_bias": {"4": 100},
                    "allowed_token_ids": [4, 9], "return_token_ids": True}
        at_once = client.post("/v1/completions", json=favoured).json()["choices"][0]
        later = client.post("/v1/completions", json={**favoured, "min_tokens": 3}).json()["choices"][0]
    assert set(only_ab["choices"][0]["text"]) <= set("ab")
    assert kept["choices"][0]["text"] == free[: free.index(stop) + len(stop)]
    assert kept["choices"][0]["finish_reason"] == "stop"
    assert at_once["token_ids"] == [4] and at_once["finish_reason"] == "stop"
    assert later["token_ids"] == [9, 9, 9, 4] and later["finish_reason"] == "stop"


# ---- logprobs ---------------------------------------------------------------------------------------------------
def test_logprobs_offsets_count_with_stop_and_echo(server):
    with server.client() as client:
        plain = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0,
                                                     "logprobs": 1}).json()["choices"][0]
        stopped = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0,
                                                       "logprobs": 1, "stop": "\x7f never"}).json()
        echoed = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0,
                                                      "logprobs": 1, "echo": True}).json()["choices"][0]["logprobs"]
    expected = plain["logprobs"]["text_offset"]
    assert len(expected) == 8 and expected[0] == 0 and expected == sorted(expected)
    for token, offset in zip(plain["logprobs"]["tokens"], expected):  # a whole-character token is found there
        assert offset <= len(plain["text"]) and (token.startswith("bytes:") or plain["text"][offset] == token)
    assert stopped["choices"][0]["logprobs"]["text_offset"] == expected
    assert echoed["text_offset"] == [0, 1, 2] + [3 + o for o in expected]
    with server.client() as client:
        two = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 8, "temperature": 0,
                                                   "logprobs": 1, "echo": True, "n": 2}).json()["choices"]
    assert [c["logprobs"] for c in two] == [echoed, echoed]  # each choice carries the prompt's entries


def test_text_offsets_count_characters_so_byte_tokens_of_one_character_share_its_place(server):
    prompt = "aé€b"  # a, two bytes, three bytes, b: seven byte tokens
    with server.client() as client:
        echoed = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True,
                                                      "logprobs": 0}).json()["choices"][0]
    assert echoed["text"] == prompt
    assert echoed["logprobs"]["tokens"][1:3] == ["bytes:\\xc3", "bytes:\\xa9"]
    assert echoed["logprobs"]["text_offset"] == [0, 1, 1, 2, 2, 2, 3]
    assert [prompt[offset] for offset in echoed["logprobs"]["text_offset"]] == list("aéé€€€b")
    with server.client() as client:  # token 2 is the end of sequence, shown as </s> when specials are kept
        kept = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "temperature": 0,
                                                    "logit_bias": {"2": 100}, "skip_special_tokens": False,
                                                    "logprobs": 0}).json()["choices"][0]
    assert kept["text"] == "</s>" * 3 and kept["logprobs"]["text_offset"] == [0, 4, 8]
    # Token ids with broken UTF-8: the lead byte of '€' cut short by 'i', then '€' whole after a lone lead
    # byte. Each byte that cannot go on becomes its replacement character; what follows starts after it.
    broken = [0xE2 + 2, ord("i") + 2, ord("j") + 2, 0xC3 + 2, 0xE2 + 2, 0x82 + 2, 0xAC + 2, ord("k") + 2]
    with server.client() as client:
        echoed = client.post("/v1/completions", json={"prompt": broken, "max_tokens": 0, "echo": True,
                                                      "logprobs": 0}).json()["choices"][0]
    assert echoed["text"] == "\ufffdij\ufffd€k"
    assert echoed["logprobs"]["text_offset"] == [0, 1, 2, 3, 4, 4, 4, 5]


def test_top_logprobs_hold_the_sampled_token_and_zero_means_it_alone(server):
    with server.client() as client:
        sampled = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 30, "temperature": 2.0,
                                                       "seed": 1, "logprobs": 1}).json()["choices"][0]["logprobs"]
        zero = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0,
                                                    "logprobs": 0}).json()["choices"][0]["logprobs"]
        # echoed prompt tokens follow the same rule (vLLM's prompt logprobs): the read token is always there
        echoed = {count: client.post("/v1/completions", json={
            "prompt": "a quiet zebra", "max_tokens": 0, "echo": True, "logprobs": count}).json()["choices"][0]
            ["logprobs"] for count in (0, 1)}
    for token, top in zip(sampled["tokens"], sampled["top_logprobs"]):
        assert token in top and 1 <= len(top) <= 2
    assert any(len(top) == 2 for top in sampled["top_logprobs"])  # a token that was not the likeliest
    assert all(list(top) == [token] for token, top in zip(zero["tokens"], zero["top_logprobs"]))
    assert echoed[0]["top_logprobs"][0] is None  # the first token has nothing before it
    assert all(list(top) == [token] for token, top in zip(echoed[0]["tokens"][1:], echoed[0]["top_logprobs"][1:]))
    for token, top in zip(echoed[1]["tokens"][1:], echoed[1]["top_logprobs"][1:]):
        assert token in top and 1 <= len(top) <= 2
    assert any(len(top) == 2 for top in echoed[1]["top_logprobs"][1:])


# ---- the API surface ---------------------------------------------------------------------------------------------
def test_unknown_routes_and_methods_answer_openai_errors(server):
    missing = httpx.get(f"{server.url}/v1/nothing", headers=server.headers, timeout=10)
    wrong = httpx.get(f"{server.url}/v1/completions", headers=server.headers, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
    for path in ("/health", "/ready", "/v1/models", "/metrics"):  # probes and load balancers send HEAD
        head = httpx.head(f"{server.url}{path}", headers=server.headers, timeout=10)
        assert head.status_code == 200 and head.content == b"", path
    allowed = httpx.post(f"{server.url}/health", timeout=10).headers["allow"]
    assert set(allowed.split(", ")) == {"GET", "HEAD"}


def test_openapi_documents_every_post_body_and_docs_need_no_internet(server):
    schema = httpx.get(f"{server.url}/openapi.json", headers=server.headers, timeout=10).json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"):
        operation = schema["paths"][path]["post"]
        request = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        response = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert schema["components"]["schemas"][request]["properties"]
        assert schema["components"]["schemas"][response]["properties"]
    assert "temperature" in schema["components"]["schemas"]["CompletionRequest"]["properties"]
    for path, name in (("/v1/models", "ModelList"), ("/v1/models/{model_id}", "ModelObject")):  # what clients list
        answer = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer["$ref"].endswith(f"/{name}") and schema["components"]["schemas"][name]["properties"]
    assert "id" in schema["components"]["schemas"]["ModelObject"]["required"]
    operations = [operation["operationId"] for methods in schema["paths"].values() for operation in methods.values()]
    assert len(operations) == len(set(operations))  # code generators name a method after each
    for name in ("CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest", "StreamOptions"):
        request = schema["components"]["schemas"][name]  # null asks for the default, as in OpenAI's schema
        optional = set(request["properties"]) - set(request.get("required", ()))
        assert optional and all({"type": "null"} in request["properties"][field]["anyOf"] for field in optional)
    assert httpx.get(f"{server.url}/docs", headers=server.headers, timeout=10).status_code == 404  # CDN scripts


def test_metrics_name_the_model_and_count_tokens_of_abandoned_streams(server):
    before = server.metric('vllm:generation_tokens_total{model_name="tiny"}')
    payload = {"prompt": "abandon", "max_tokens": 2000, "temperature": 0, "stream": True}
    with server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: {")
            if received == 5:
                break
    deadline = time.monotonic() + 10
    while server.metric('vllm:generation_tokens_total{model_name="tiny"}') - before < 5:
        assert time.monotonic() < deadline, "the abandoned stream's tokens were not counted"
        time.sleep(0.1)
    assert server.metric('vllm:request_success_total{model_name="tiny",finished_reason="abort"}') >= 1
