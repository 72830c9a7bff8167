"""The README's first command: `python -m server` with no --model serves the embedded default model, with its
tokenizer and the sampling defaults it ships (`generation_config.json`)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bench.launcher import ServerProcess
from model import SamplingParams, generate, load_model
from model.checkpoint import read_generation_defaults
from model.tokenizer import load_tokenizer
from server.settings import DEFAULT_MODEL


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ServerProcess(None, "--max-running", "2", "--log-level", "warning",
                            log_path=tmp_path_factory.mktemp("default") / "server.log")
    yield running
    running.stop()


def test_server_without_a_model_option_serves_the_default_model(server):
    models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
    assert [entry["id"] for entry in models["data"]] == ["reformer-default"]
    defaults = read_generation_defaults(DEFAULT_MODEL)
    assert httpx.get(f"{server.url}/info", timeout=30).json()["sampling_defaults"] == defaults
    tokenizer, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL)
    prompt = "def fibonacci(n):\n"
    # greedy, said explicitly; whatever else the checkpoint sets (a repetition penalty, say) still applies
    reply = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "reformer-default", "prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert reply.status_code == 200, reply.text
    expected = generate(model, [tokenizer.encode(prompt)],
                        SamplingParams(max_tokens=24, **dict(defaults, temperature=0)), num_slots=1)[0]
    assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected.token_ids)
    # a request that sets nothing samples with the checkpoint's defaults: the same seed gives the same text
    seeded = {"model": "reformer-default", "prompt": prompt, "max_tokens": 24, "seed": 7}
    reply = httpx.post(f"{server.url}/v1/completions", timeout=120, json=seeded)
    expected = generate(model, [tokenizer.encode(prompt)],
                        SamplingParams(max_tokens=24, seed=7, **defaults), num_slots=1)[0]
    assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected.token_ids)
    # only the end of sequence allowed while min_tokens holds it back: nothing could be drawn, a 400 not a 500
    refused = httpx.post(f"{server.url}/v1/completions", timeout=30, json={
        "prompt": prompt, "max_tokens": 4, "min_tokens": 1, "allowed_token_ids": [model.config.eos_token_id]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "allowed_token_ids", refused.text


def test_a_long_prompt_is_encoded_without_stalling_the_other_requests(server):
    """Encoding 8 MB of text takes this tokenizer seconds; the HTTP process answers others meanwhile."""
    prompt = ("    value = compute(x, y)  # note\n" * 240_000)[: 7_900_000]
    result = {}

    def post_long_prompt():
        started = time.monotonic()
        result["response"] = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "prompt": prompt, "truncate_prompt_tokens": 64, "max_tokens": 1})  # so the whole text is encoded
        result["seconds"] = time.monotonic() - started

    sender = threading.Thread(target=post_long_prompt)
    sender.start()
    waits = []
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        waits.append(time.monotonic() - started)
        time.sleep(0.05)
    sender.join()
    assert result["response"].json()["usage"]["prompt_tokens"] == 64
    assert result["seconds"] > 1.0  # the encoding was real work (about 3.4M tokens)
    assert max(waits) < result["seconds"] / 3, (max(waits), result["seconds"])
    # not asked to truncate, the same text is refused on its length alone: 16 characters at most per token
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt}, timeout=120).json()["error"]
    assert refused["code"] == "context_length_exceeded" and "at least 493,750 tokens" in refused["message"]
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 1}).json()["error"]
    assert chat["param"] == "messages" and "is at least" in chat["message"]
