"""The README's first command: `python -m server` with no --model serves the embedded default model."""

from __future__ import annotations

import httpx

from model import ByteTokenizer, SamplingParams, generate, load_model
from bench.launcher import ServerProcess
from server.settings import DEFAULT_MODEL


def test_server_without_a_model_option_serves_the_default_model(tmp_path):
    server = ServerProcess(None, "--max-running", "2", "--log-level", "warning", log_path=tmp_path / "server.log")
    try:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        assert [entry["id"] for entry in models["data"]] == ["reformer-default"]
        prompt = "def fibonacci(n):\n"
        reply = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": "reformer-default", "prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert reply.status_code == 200, reply.text
        tokenizer = ByteTokenizer()
        expected = generate(load_model(DEFAULT_MODEL), [tokenizer.encode(prompt)],
                            SamplingParams(max_tokens=24, temperature=0), num_slots=1)[0]
        assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected.token_ids)
    finally:
        server.stop()
