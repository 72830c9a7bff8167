"""Prometheus metrics shared by the HTTP processes and the engine worker (multiprocess mode).

Names follow vLLM where a metric exists there, so existing dashboards work; ours are `reformer:*`.
PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is first imported (server.app does it),
which is why the import happens here, lazily.
"""

from __future__ import annotations

import os
import tempfile

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0, 160.0, 640.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def prepare_directory(path: str | None = None) -> tuple[str, bool]:
    """Choose (and empty) the directory where every process writes its metric files; whether it was made
    here (and is the caller's to remove at exit)."""
    path = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = path is None
    path = path or tempfile.mkdtemp(prefix="reformer-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path, made


class Metrics:
    """vLLM's metrics carry the label `model_name` (dashboards filter on it); ours are `reformer:*`."""

    def __init__(self, model_name: str):
        from prometheus_client import Counter, Gauge, Histogram

        def vllm(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, ["model_name"], **kwargs).labels(model_name=model_name)

        self.ttft = vllm(Histogram, "vllm:time_to_first_token_seconds", "Time to first token (arrival to first "
                         "text).", buckets=LATENCY_BUCKETS)
        self.itl = vllm(Histogram, "vllm:inter_token_latency_seconds", "Time between streamed tokens.",
                        buckets=LATENCY_BUCKETS)
        self.e2e = vllm(Histogram, "vllm:e2e_request_latency_seconds", "Arrival to last byte.", buckets=LATENCY_BUCKETS)
        self.queue = vllm(Histogram, "vllm:request_queue_time_seconds", "Engine arrival to the start of its prefill.",
                          buckets=LATENCY_BUCKETS)
        self.running = vllm(Gauge, "vllm:num_requests_running", "Sequences in a prefill or decoding (an embedding "
                            "request in its forward counts one).", multiprocess_mode="livesum")
        self.waiting = vllm(Gauge, "vllm:num_requests_waiting", "Requests waiting for the engine.",
                            multiprocess_mode="livesum")
        self.prompt_tokens = vllm(Counter, "vllm:prompt_tokens", "Prompt (and embedded) tokens processed.")
        self.generation_tokens = vllm(Counter, "vllm:generation_tokens", "Tokens generated (cancelled requests' "
                                      "too).")
        self.finished = _Bound(Counter("vllm:request_success", "Finished requests by reason.",
                                       ["model_name", "finished_reason"]), model_name)
        self.batch = Histogram("reformer:decode_batch_size", "Sequences in one decode step.", buckets=BATCH_BUCKETS)
        self.prefill_rate = Gauge("reformer:prefill_tokens_per_second", "Throughput of the last prefill or "
                                  "embedding forward.", multiprocess_mode="livesum")
        self.prefill_tokens = Counter("reformer:prefill_tokens", "Tokens through prefill and embedding forwards.")
        self.failed = Counter("reformer:requests_failed", "Admitted requests ended by an error (deadline, engine "
                              "failure, shutdown), by error code.", ["code"])
        self.rejected = Counter("reformer:requests_rejected", "Requests refused before the engine, by status and "
                                "error code (a 429 for requests or tokens, a 503 for draining or loading).",
                                ["status", "code"])
        self.cache_usage = vllm(Gauge, "vllm:kv_cache_usage_perc", "Fraction of the decode cache lent out (1 = full): "
                                "LSH layers' blocks, or slots for a model without LSH layers.",
                                multiprocess_mode="livesum")
        self.cache_blocks = Gauge("reformer:kv_cache_blocks", "Cache blocks of the LSH layers (model.blocks).",
                                  multiprocess_mode="livesum")
        self.cache_slots = Gauge("reformer:kv_cache_slots", "Decode slots (sequences that can decode at once).",
                                 multiprocess_mode="livesum")
        self.cache_bytes = Gauge("reformer:kv_cache_bytes", "Memory reserved for the decode cache.",
                                 multiprocess_mode="livesum")
        self.info = Gauge("reformer:info", "What serves: backend, device, model.", ["backend", "device", "model"],
                          multiprocess_mode="livesum")

    # engine side
    def engine_state(self, *, running: int, waiting: int, cache_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.cache_usage.set(cache_usage)

    def cache_plan(self, *, slots: int, blocks: int, total_bytes: int) -> None:
        self.cache_slots.set(slots)
        self.cache_blocks.set(blocks)
        self.cache_bytes.set(total_bytes)

    def queue_time(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def decode_batch(self, size: int) -> None:
        self.batch.observe(size)

    def prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_tokens.inc(tokens)
        if seconds > 0:
            self.prefill_rate.set(tokens / seconds)


class _Bound:
    """A labelled metric with `model_name` already given: `.labels(finished_reason=...)` as usual."""

    def __init__(self, metric, model_name: str):
        self._metric, self._model_name = metric, model_name

    def labels(self, **labels):
        return self._metric.labels(model_name=self._model_name, **labels)


def exposition() -> tuple[bytes, str]:
    """The text format of every process's metrics, merged."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
