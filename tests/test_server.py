"""The HTTP server end to end: a real `python -m server` on 127.0.0.1, real clients (httpx, openai)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from model import ByteTokenizer, SamplingParams, embed, generate, load_model
from server.protocol import ChatCompletionRequest, parse
from tests.server_harness import API_KEY, RunningServer, tiny_checkpoint

MAX_RUNNING = 8
MAX_QUEUED = 24
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="module")
def server(checkpoint):
    running = RunningServer(checkpoint, "--max-running", str(MAX_RUNNING), "--max-queued-requests", str(MAX_QUEUED),
                            "--max-body-bytes", str(MAX_BODY))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """A model with 8K positions, two decode slots, room for three requests: long requests stay in flight."""
    running = RunningServer(tiny_checkpoint(tmp_path_factory.mktemp("long") / "long", context=8192),
                            "--max-running", "2", "--max-queued-requests", "3")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local_model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def sse_events(response: httpx.Response) -> list[dict]:
    """The data events of an SSE stream, [DONE] last; comment lines are ignored as clients do."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append("[DONE]" if data == "[DONE]" else json.loads(data))
    return events


# ---- completions ----------------------------------------------------------------------------------------
def test_non_streaming_completion_equals_the_core_greedy_generation(server, local_model):
    prompt = "The Reformer"
    with server.client() as client:
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                        "return_token_ids": True})
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    expected = generate(local_model, [ByteTokenizer().encode(prompt)], SamplingParams(max_tokens=24, temperature=0))
    assert choice["token_ids"] == expected[0].token_ids
    assert choice["prompt_token_ids"] == ByteTokenizer().encode(prompt)
    assert choice["finish_reason"] == "length" and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 24, "total_tokens": len(prompt) + 24}


def test_streaming_completion_over_httpx_has_openai_chunks_usage_and_done(server):
    payload = {"prompt": "abc", "max_tokens": 10, "stream": True, "temperature": 0, "return_token_ids": True,
               "stream_options": {"include_usage": True}}
    with server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all("usage" in e and e["usage"] is None for e in events[:-2])  # OpenAI: null on every other chunk
    final = events[-3]["choices"][0]
    assert final["finish_reason"] == "length"
    tokens = [e["choices"][0]["token_ids"][0] for e in events[:-2]]
    assert len(tokens) == 10  # finish_reason came with the last token's chunk, as vLLM sends it
    with server.client() as client:
        whole = client.post("/v1/completions", json={**payload, "stream": False, "stream_options": None}).json()
    whole = whole["choices"][0]
    assert whole["token_ids"] == tokens
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == whole["text"]


def test_openai_client_streams_and_completes(oai, server):
    stream = oai.completions.create(model="tiny", prompt="Hello", max_tokens=8, stream=True, temperature=0, seed=3)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    whole = oai.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, seed=3)
    assert "".join(pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens == 8
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_seeded_sampling_is_reproducible(oai):
    kwargs = dict(model="tiny", prompt="seed", max_tokens=16, temperature=1.0, top_p=0.9, extra_body={"top_k": 40})
    first = oai.completions.create(seed=7, **kwargs).choices[0].text
    assert oai.completions.create(seed=7, **kwargs).choices[0].text == first


def test_stop_strings_end_the_text_before_the_stop(server, local_model):
    with server.client() as client:
        free = client.post("/v1/completions", json={"prompt": "stop test", "max_tokens": 30, "temperature": 0}).json()
        text = free["choices"][0]["text"]
        stop = next(c for c in text[3:] if c.isprintable() and c != "\ufffd")
        stopped = client.post("/v1/completions", json={"prompt": "stop test", "max_tokens": 30, "temperature": 0,
                                                       "stop": [stop]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[: text.index(stop)]


def test_echo_with_logprobs_scores_a_text(server, local_model):
    prompt = "score me"
    with server.client() as client:
        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True,
                                                    "logprobs": 2}).json()
    choice = body["choices"][0]
    ids = ByteTokenizer().encode(prompt)
    assert choice["text"] == prompt and body["usage"]["completion_tokens"] == 0
    with torch.no_grad():
        logprobs = torch.log_softmax(local_model(torch.tensor([ids]))[0], -1)
    expected = [None] + [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and np.allclose(got[1:], expected[1:], atol=1e-4)
    assert choice["logprobs"]["tokens"] == list(prompt)
    for token, top in zip(prompt[1:], choice["logprobs"]["top_logprobs"][1:]):  # the 2 likeliest and the read one
        assert token in top and len(top) in (2, 3)


def test_logprobs_of_generated_tokens(oai):
    result = oai.completions.create(model="tiny", prompt="lp", max_tokens=5, temperature=0, logprobs=3)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == 5 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(lp, abs=1e-5)
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))


# ---- batching, latency, cancellation ----------------------------------------------------------------
def test_sixteen_concurrent_streams_complete_in_shared_batches(server):
    batches_before = server.metric("reformer:decode_batch_size_count")
    singles_before = server.metric('reformer:decode_batch_size_bucket{le="1.0"}')
    results = [None] * 16

    def run(i):
        payload = {"prompt": f"stream {i}", "max_tokens": 40, "stream": True, "temperature": 0.8, "seed": i}
        with server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
            results[i] = sse_events(response)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(r is not None and r[-1] == "[DONE]" and r[-2]["choices"][0]["finish_reason"] == "length"
               for r in results)
    steps = server.metric("reformer:decode_batch_size_count") - batches_before
    single = server.metric('reformer:decode_batch_size_bucket{le="1.0"}') - singles_before
    assert steps > 0 and single < steps  # some decode steps carried more than one sequence


def test_a_late_request_streams_before_an_earlier_long_one_ends(long_server):
    """The short request must finish while the long one still streams. The long client leaves as soon as that
    is proven, so the test's time does not depend on how fast this machine decodes 6000 tokens."""
    marks = {}

    def long_request():
        payload = {"prompt": "long", "max_tokens": 6000, "stream": True, "temperature": 0}
        with long_server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    marks.setdefault("long_first", time.monotonic())
                if "short_end" in marks:
                    break
            else:
                marks["long_end"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    while "long_first" not in marks and thread.is_alive():
        time.sleep(0.01)
    with long_server.client() as client:
        response = client.post("/v1/completions", json={"prompt": "short", "max_tokens": 3})
        marks["short_end"] = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert response.status_code == 200
    assert marks["short_end"] < marks.get("long_end", float("inf"))
    left = time.monotonic()  # the abandoned stream's abort is counted before the next test counts its own
    while long_server.metric("vllm:num_requests_running") > 0 and time.monotonic() - left < 10:
        time.sleep(0.05)


def test_disconnecting_client_frees_its_slot(long_server):
    """A stream of 6000 tokens takes many seconds; its slot must be free within a few of the client leaving
    (an engine that ignored the cancellation would keep decoding it)."""
    aborted = long_server.metric('vllm:request_success_total{finished_reason="abort"}')
    payload = {"prompt": "abandon", "max_tokens": 6000, "stream": True, "temperature": 0}
    with long_server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leave mid-stream: the connection closes with the block
    left = time.monotonic()
    while long_server.metric("vllm:num_requests_running") > 0 and time.monotonic() - left < 3:
        time.sleep(0.05)
    assert long_server.metric("vllm:num_requests_running") == 0
    assert long_server.metric('vllm:request_success_total{finished_reason="abort"}') == aborted + 1


def test_overload_answers_429_with_retry_after(long_server):
    """Three long requests fill the queue limit; the fourth is refused at once, and the server recovers."""
    started, release = [], threading.Event()

    def long_request():
        payload = {"prompt": "load", "max_tokens": 6000, "stream": True}
        with long_server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
            assert response.status_code == 200  # the headers come at once, even for a request waiting for a slot
            started.append(1)
            release.wait(30)  # leaving cancels it

    threads = [threading.Thread(target=long_request) for _ in range(3)]
    with long_server.client() as client:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(started) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = client.post("/v1/completions", json={"prompt": "one too many", "max_tokens": 2})
        release.set()
        for thread in threads:
            thread.join(timeout=60)
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        deadline = time.monotonic() + 10
        while client.post("/v1/completions", json={"prompt": "again", "max_tokens": 2}).status_code != 200:
            assert time.monotonic() < deadline, "the queue did not empty after the clients left"
            time.sleep(0.1)


def test_deadline_header_times_out_a_long_request(server):
    with server.client() as client:
        response = client.post("/v1/completions", json={"prompt": "slow", "max_tokens": 480},
                               headers={"X-Request-Timeout": "0.3"})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert response.headers["x-should-retry"] == "false"  # it would only time out again


# ---- embeddings -------------------------------------------------------------------------------------
def test_embeddings_match_the_core_and_encode_as_base64(server, oai, local_model):
    texts = ["first document", "a second, longer document " * 5]
    succeeded = server.metric('vllm:request_success_total{finished_reason="stop"}')
    result = oai.embeddings.create(model="tiny", input=texts)
    assert server.metric('vllm:request_success_total{finished_reason="stop"}') == succeeded + 1  # as vLLM counts
    vectors = np.array([d.embedding for d in result.data])
    expected = embed(local_model, [ByteTokenizer().encode(t) for t in texts], normalize=True).numpy()
    assert np.allclose(vectors, expected, atol=1e-5)
    assert result.usage.prompt_tokens == sum(len(t) for t in texts)
    with server.client() as client:
        body = client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, expected[0], atol=1e-5)


def test_embeddings_of_token_ids_pooling_and_chunking(server, local_model):
    ids = ByteTokenizer().encode("x" * 700)  # longer than the 512-token context
    with server.client() as client:
        too_long = client.post("/v1/embeddings", json={"input": ids})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
        chunked = client.post("/v1/embeddings", json={
            "input": [ids], "normalize": False, "pooling": "mean",
            "chunking": {"size": 256, "overlap": 32, "return_chunks": True}}).json()["data"][0]
        maxed = client.post("/v1/embeddings", json={"input": [ids[:100]], "pooling": "max", "normalize": False}).json()
        last = client.post("/v1/embeddings", json={"input": [ids], "pooling": "last", "normalize": False,
                                                   "chunking": {"size": 256, "overlap": 32}}).json()
        first = client.post("/v1/embeddings", json={"input": [ids[:100]], "pooling": "first"})
    # The chunks tile the input; each is computed in a window of 256 tokens that ends with it (the first:
    # begins with it), seeing at least the 32 tokens before it, and the mean counts every token once.
    spans = [(c["start"], c["end"]) for c in chunked["chunks"]]
    assert spans == [(0, 256), (256, 480), (480, 700)]
    windows = [(0, 256), (224, 480), (444, 700)]
    parts = embed(local_model, [ids[b:e] for b, e in windows], contexts=[s - b for (b, _), (s, _) in zip(windows, spans)])
    assert np.allclose([c["embedding"] for c in chunked["chunks"]], parts.numpy(), atol=1e-5)
    pooled = np.array([e - s for s, e in spans], dtype=np.float64)
    assert np.allclose(chunked["embedding"], (parts.numpy() * pooled[:, None]).sum(0) / 700, atol=1e-4)
    assert np.allclose(last["data"][0]["embedding"], embed(local_model, [ids[-256:]], pooling="last")[0], atol=1e-5)
    assert last["usage"]["prompt_tokens"] == 700  # the input's tokens, as OpenAI counts them, not the 768 computed
    assert np.allclose(maxed["data"][0]["embedding"], embed(local_model, [ids[:100]], pooling="max")[0], atol=1e-5)
    assert first.status_code == 400 and first.json()["error"]["param"] == "pooling"  # a causal model


# ---- small routes -----------------------------------------------------------------------------------
def test_tokenize_detokenize_health_metrics(server):
    with server.client() as client:
        tokens = client.post("/tokenize", json={"prompt": "héllo"}).json()
        assert tokens["count"] == 6 and tokens["max_model_len"] == 512
        assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "héllo"
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without a key
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:num_requests_waiting",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "reformer:prefill_tokens_per_second", 'reformer:info{backend="torch"',
                 "vllm:kv_cache_usage_perc", "reformer:kv_cache_slots", "reformer:kv_cache_bytes"):
        assert name in metrics, name
    assert server.metric("reformer:kv_cache_slots") == MAX_RUNNING and server.metric("vllm:kv_cache_usage_perc") == 0
    cache = httpx.get(f"{server.url}/info", headers=server.headers).json()["cache"]
    assert cache["slots"] == MAX_RUNNING and cache["max_length"] == 512
    assert cache["total_bytes"] == (MAX_RUNNING + 1) * cache["slot_bytes"] + (cache["blocks"] + 1) * cache["block_bytes"]
    assert cache["total_bytes"] == server.metric("reformer:kv_cache_bytes")
    assert cache["blocks"] == server.metric("reformer:kv_cache_blocks") == MAX_RUNNING * 512 // cache["block_size"]


# ---- bad input ----------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x" * 600, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [999]}, 400, "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [999]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999": 1}, "stream": True}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),  # not clipped
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": [1, 2, 9999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["one", ""]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/embeddings", {"input": ""}, 400, "input"),
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "chunking": {"size": 0}}, 400, "chunking"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


@pytest.mark.parametrize("path, payload, status, param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, payload, status, param):
    with server.client() as client:
        response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_null_optional_fields_mean_their_defaults(server):
    """OpenAI documents its optional fields as nullable; clients built from its schema send null. A null
    asks for the default (and max_tokens null keeps its own meaning: up to the context)."""
    nulls = {"temperature": None, "top_p": None, "n": None, "presence_penalty": None, "frequency_penalty": None,
             "stream": None, "echo": None, "seed": None, "stop": None, "user": None}
    with server.client() as client:
        plain = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, "temperature": 0})
        nulled = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, **nulls, "temperature": 0})
        embedded = client.post("/v1/embeddings", json={"input": "abc", "encoding_format": None, "dimensions": None})
        refused = client.post("/v1/completions", json={"prompt": None})
    assert nulled.status_code == 200, nulled.text
    assert nulled.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    chat = parse(ChatCompletionRequest, json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": None,
                                                    "top_logprobs": None, "stream_options": None, "n": None}).encode())
    assert chat.logprobs is False and chat.n == 1 and chat.model_fields_set == {"messages", "top_logprobs",
                                                                                 "stream_options"}
    assert embedded.status_code == 200 and isinstance(embedded.json()["data"][0]["embedding"], list)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"


def test_context_overflow_quotes_the_numbers(server):
    with server.client() as client:
        error = client.post("/v1/completions", json={"prompt": "x" * 500, "max_tokens": 20}).json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "512" in error["message"] and "520" in error["message"] and "500 in the prompt" in error["message"]


def test_texts_too_long_whatever_their_tokens_are_refused_before_encoding(server):
    """A byte per token: 600 characters are at least 600 tokens, over the 512-token context whatever they are.
    Only the length check says "at least"; asked to truncate, the server encodes the whole text. (Chat's check:
    tests/test_default_model_server.py, whose model has a chat template.)"""
    with server.client() as client:
        prompt = client.post("/v1/completions", json={"prompt": "é" * 600, "max_tokens": 1}).json()["error"]
        embedding = client.post("/v1/embeddings", json={"input": ["short", "y" * 600]}).json()["error"]
        truncated = client.post("/v1/completions", json={"prompt": "x" * 600, "truncate_prompt_tokens": 100,
                                                         "max_tokens": 1})
        chunked = client.post("/v1/embeddings", json={"input": "y" * 600, "chunking": {"size": 256}})
    assert prompt["param"] == "prompt" and "600 characters is at least 600 tokens" in prompt["message"]
    assert embedding["param"] == "input" and "chunking of input 1" in embedding["message"]
    assert all(e["code"] == "context_length_exceeded" for e in (prompt, embedding))
    assert truncated.status_code == 200 and truncated.json()["usage"]["prompt_tokens"] == 100
    assert chunked.status_code == 200 and chunked.json()["usage"]["prompt_tokens"] == 600


def test_malformed_bodies_keys_and_sizes(server):
    with server.client() as client:
        invalid_utf8 = client.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                                   headers={"content-type": "application/json"})
        truncated = client.post("/v1/completions", content=b'{"prompt": "x"',
                                headers={"content-type": "application/json"})
        oversized = client.post("/v1/completions", json={"prompt": "x" * (MAX_BODY + 10)})
    assert invalid_utf8.status_code == 400 and invalid_utf8.json()["error"]["code"] == "invalid_json"
    assert truncated.status_code == 400
    assert oversized.status_code == 413 and oversized.json()["error"]["code"] == "request_too_large"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    # and the server still serves
    with server.client() as client:
        assert client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2}).status_code == 200
    assert server.metric("vllm:num_requests_running") == 0


def test_sigterm_drains_in_flight_streams_and_exits(tmp_path):
    running = RunningServer(tiny_checkpoint(tmp_path / "long", context=8192), "--drain-timeout", "60",
                            api_key=None)
    received, started = [], threading.Event()

    def stream():
        payload = {"prompt": "drain", "max_tokens": 6000, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=payload, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    received.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    running.process.terminate()  # SIGTERM to the main process, mid-stream
    time.sleep(0.5)
    refused = httpx.post(f"{running.url}/v1/completions", json={"prompt": "late"}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert httpx.get(f"{running.url}/ready", timeout=10).status_code == 503
    assert running.process.poll() is None  # still draining
    thread.join(timeout=120)
    assert received[-1] == "[DONE]" and received[-2]["choices"][0]["finish_reason"] == "length"
    assert len(received) == 6000 + 1
    assert running.stop(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{running.url}/health", timeout=2)


def test_stream_lines_survive_clients_that_split_on_unicode_separators(server):
    """Generated text can hold U+0085 or U+2028; each SSE data line must still be one line to any client."""
    ids = [0x85 + 2, 0x1C + 2] + ByteTokenizer().encode("\u2028\u0085 x")  # raw bytes and characters
    payload = {"prompt": ids, "max_tokens": 4, "stream": True, "echo": True}
    with server.client() as client, client.stream("POST", "/v1/completions", json=payload) as response:
        raw = b"".join(response.iter_bytes())
    lines = [line for line in raw.decode().splitlines() if line.startswith("data: {")]
    assert lines and all(json.loads(line[6:]) for line in lines)


# ---- the onnxruntime backend ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_server(checkpoint, tmp_path_factory):
    graphs = tmp_path_factory.mktemp("graphs")
    # One slot: the smallest pool (its export used to fail); the worker's own log lines at info.
    running = RunningServer(checkpoint, "--backend", "onnx", "--max-running", "1", "--max-model-len", "512",
                            "--onnx-dir", str(graphs), "--log-level", "info")
    running.graphs = graphs
    yield running
    running.stop()


def test_onnx_backend_serves_the_same_completions_and_embeddings(onnx_server, local_model):
    prompt = "The Reformer"
    with onnx_server.client() as client:
        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                    "return_token_ids": True}).json()
        stream = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                                      "stream": True})
        vectors = client.post("/v1/embeddings", json={"input": ["one document", "another " * 30]}).json()
        info = client.get("/info").json()
    expected = generate(local_model, [ByteTokenizer().encode(prompt)], SamplingParams(max_tokens=16, temperature=0))
    assert body["choices"][0]["token_ids"] == expected[0].token_ids
    pieces = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert "".join(p["choices"][0]["text"] for p in pieces if p["choices"]) == body["choices"][0]["text"]
    reference = embed(local_model, [ByteTokenizer().encode(t) for t in ("one document", "another " * 30)],
                      normalize=True).numpy()
    assert np.allclose([d["embedding"] for d in vectors["data"]], reference, atol=1e-4)
    assert info["backend"] == "onnx" and info["execution_provider"] == "CPUExecutionProvider"
    log = onnx_server.log_path.read_text()
    assert "exporting ONNX graphs" in log and "engine ready" in log  # the spawned worker logs too
    assert " INFO onnx" not in log  # but not the exporter's libraries, hundreds of lines a graph
    assert 'reformer:info{backend="onnx",device="CPUExecutionProvider"' in httpx.get(f"{onnx_server.url}/metrics").text


def test_graphs_from_python_m_export_are_the_ones_a_server_with_that_pool_uses(onnx_server, checkpoint, tmp_path):
    """The server exported its graphs at start-up; `python -m export` with the same slots and length writes a
    manifest the server's own check accepts (weights, pool, dtype, format), so a server given those graphs
    exports nothing."""
    from export.runtime import graphs_mismatch, model_digest

    subprocess.run([sys.executable, "-m", "export", "--model", str(checkpoint), "--out", str(tmp_path),
                    "--slots", "1", "--max-length", "512"], check=True, capture_output=True, timeout=600)
    served = json.loads((onnx_server.graphs / "manifest.json").read_text())
    digest = model_digest(load_model(checkpoint))
    assert graphs_mismatch(onnx_server.graphs, served["pool"], "float32", digest) is None
    assert graphs_mismatch(tmp_path, served["pool"], "float32", digest) is None


def test_requests_without_a_limit_get_the_models_default_completion_length(tmp_path):
    """generation_config.json's max_new_tokens (as vLLM reads it), or --default-max-tokens, caps what a request
    that names no limit gets: a chat client that never sets max_tokens otherwise borrowed cache blocks for
    the whole context with every request."""
    from server.settings import parse_args

    model = tiny_checkpoint(tmp_path / "capped")
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    assert parse_args(["--model", str(model)]).completion_default() == 7
    assert parse_args(["--model", str(model), "--default-max-tokens", "3"]).completion_default() == 3
    running = RunningServer(model)
    try:
        with running.client() as client:
            assert client.get("/info").json()["default_max_tokens"] == 7
            chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "temperature": 0}).json()
            unbounded = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": None}).json()
            asked = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 12}).json()
        assert chat["usage"]["completion_tokens"] == 7 and chat["choices"][0]["finish_reason"] == "length"
        assert unbounded["usage"]["completion_tokens"] == 7
        assert asked["usage"]["completion_tokens"] == 12  # a limit the request names is its own
    finally:
        running.stop()
