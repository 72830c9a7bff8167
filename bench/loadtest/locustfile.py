"""Locust users for the Reformer server, per-token latency events, and an SLA gate.

    locust -f bench/loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --host http://127.0.0.1:8000 \
        --sla-ttft-p95 2000 --sla-itl-p95 500 --sla-embedding-p95 10000 --sla-failure-ratio 0.01

Locust times a streamed request only to its headers, so streams report their own events (request type
"SSE"): `ttft` (request sent to first token), `itl` (between tokens) and `stream` (whole stream). A stream
that ends without `data: [DONE]`, or stalls, is a failure. At the end the gate sets a non-zero exit code
when the failure ratio or a p95 exceeds its threshold (given on the command line or in --sla-config, a
JSON file with the same keys).
"""

from __future__ import annotations

import json
import random
import time

from locust import HttpUser, between, events, task

ALPHABET = "abcdefghijklmnopqrstuvwxyz     \n_().=:,0123456789"
GATES = {  # option -> (stats entry, what it limits)
    "sla_ttft_p95": (("SSE", "ttft"), "p95 time to first token (ms)"),
    "sla_itl_p95": (("SSE", "itl"), "p95 inter-token latency (ms)"),
    "sla_embedding_p95": (("POST", "/v1/embeddings"), "p95 embedding latency (ms)"),
}


@events.init_command_line_parser.add_listener
def _options(parser):
    parser.add_argument("--sla-ttft-p95", type=float, default=None, help="ms; fail the run above it")
    parser.add_argument("--sla-itl-p95", type=float, default=None, help="ms; fail the run above it")
    parser.add_argument("--sla-embedding-p95", type=float, default=None, help="ms; fail the run above it")
    parser.add_argument("--sla-failure-ratio", type=float, default=None, help="0..1; fail the run above it")
    parser.add_argument("--sla-config", default=None, help="JSON file with any of the sla_* keys")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per completion")
    parser.add_argument("--prompt-chars", type=int, default=256, help="characters in a completion prompt")
    parser.add_argument("--doc-min", type=int, default=1024, help="shortest embedded document (characters)")
    parser.add_argument("--doc-max", type=int, default=0, help="longest document (0: the model's context)")
    parser.add_argument("--api-key", default="", help="sent as 'Authorization: Bearer KEY'")


def text(length: int) -> str:
    return "".join(random.choices(ALPHABET, k=length))


class _ReformerUser(HttpUser):
    abstract = True
    wait_time = between(0.05, 0.5)
    network_timeout = 600.0

    def on_start(self):
        options = self.environment.parsed_options
        if options.api_key:
            self.client.headers["Authorization"] = f"Bearer {options.api_key}"


class StreamingCompletionUser(_ReformerUser):
    weight = 6

    @task
    def stream(self):
        options = self.environment.parsed_options
        payload = {"prompt": text(options.prompt_chars), "max_tokens": options.max_tokens, "temperature": 0.8,
                   "stream": True}
        fire = self.environment.events.request.fire
        start = last = time.perf_counter()
        tokens, done, error = 0, False, None
        try:
            with self.client.post("/v1/completions", json=payload, stream=True, catch_response=True,
                                  name="/v1/completions (stream)", timeout=(10, 60)) as response:
                if response.status_code != 200:
                    response.failure(f"status {response.status_code}: {response.text[:200]}")
                    return
                for line in response.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data: "):
                        continue  # blank lines between events, and comments (keep-alive)
                    if line == "data: [DONE]":
                        done = True
                        break
                    body = json.loads(line[6:])
                    if "error" in body:
                        error = body["error"]["message"]
                        continue
                    if not body["choices"]:
                        continue  # the usage chunk
                    # Every chunk carries a token (the last one its finish_reason too).
                    now = time.perf_counter()
                    name, elapsed = ("ttft", now - start) if tokens == 0 else ("itl", now - last)
                    fire(request_type="SSE", name=name, response_time=elapsed * 1000, response_length=0,
                         exception=None, context={})
                    tokens, last = tokens + 1, now
                response.success()
        except Exception as exc:  # noqa: BLE001 - a broken or stalled stream is a failed request
            error = f"{type(exc).__name__}: {exc}"
        if error is None and not done:
            error = "the stream ended without [DONE]"
        fire(request_type="SSE", name="stream", response_time=(time.perf_counter() - start) * 1000,
             response_length=tokens, exception=RuntimeError(error) if error else None, context={})


class CompletionUser(_ReformerUser):
    weight = 2

    @task
    def complete(self):
        options = self.environment.parsed_options
        payload = {"prompt": text(options.prompt_chars), "max_tokens": options.max_tokens, "temperature": 0.8}
        with self.client.post("/v1/completions", json=payload, catch_response=True) as response:
            if response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("length", "stop"):
                response.success()
            else:
                response.failure(f"status {response.status_code}: {response.text[:200]}")


class EmbeddingUser(_ReformerUser):
    weight = 2

    def on_start(self):
        super().on_start()
        options = self.environment.parsed_options
        limit = self.client.get("/v1/models").json()["data"][0]["max_model_len"]
        self.doc_max = min(options.doc_max or limit, limit)
        self.doc_min = min(options.doc_min, self.doc_max)

    @task
    def embed(self):
        # During a shape's burst (bench/loadtest/shape_ramp_burst.py) every document has the longest length.
        burst = getattr(self.environment, "long_document_burst", False)
        document = text(self.doc_max if burst else random.randint(self.doc_min, self.doc_max))
        with self.client.post("/v1/embeddings", json={"input": document}, catch_response=True) as response:
            if response.status_code == 200 and len(response.json()["data"]) == 1:
                response.success()
            else:
                response.failure(f"status {response.status_code}: {response.text[:200]}")


def _limits(environment) -> dict:
    options = environment.parsed_options
    limits = {}
    if options.sla_config:
        with open(options.sla_config) as config:
            limits.update(json.load(config))
    limits.update({key: getattr(options, key) for key in (*GATES, "sla_failure_ratio")
                   if getattr(options, key) is not None})
    return limits


def gate_results(environment) -> list[str]:
    """The SLA thresholds that the run exceeded, as readable lines (empty: the run passes)."""
    limits = _limits(environment)
    stats, failures = environment.stats, []
    for key, ((method, name), what) in GATES.items():
        if limits.get(key) is None:
            continue
        entry = stats.get(name, method)
        if entry.num_requests == 0:
            print(f"SLA note: {what}: no samples (no such user ran); hung requests count as failures")
            continue
        value = entry.get_response_time_percentile(0.95)
        if value > limits[key]:
            failures.append(f"{what} = {value:.0f} > {limits[key]:.0f}")
    ratio = stats.total.fail_ratio
    if limits.get("sla_failure_ratio") is not None and ratio > limits["sla_failure_ratio"]:
        failures.append(f"failure ratio = {ratio:.3f} > {limits['sla_failure_ratio']}")
    return failures


@events.quitting.add_listener
def _gate(environment, **kwargs):
    failures = gate_results(environment)
    for line in failures:
        print(f"SLA FAILED: {line}")
    if failures:
        environment.process_exit_code = 3
    elif _limits(environment).get("sla_failure_ratio") is not None:
        environment.process_exit_code = 0  # failures within the allowed ratio do not fail the run
        print("SLA passed")
