"""Server settings: one dataclass shared by the HTTP processes and the engine worker, and its CLI."""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from model.checkpoint import CheckpointError, read_config, read_default_max_tokens, read_generation_defaults
from model.config import ReformerConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "model" / "default"
API_KEY_ENV = "REFORMER_API_KEY"  # the same name the environment defaults below give --api-key
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" in microseconds, or "max PERIOD"


def configure_logging(level: str) -> None:
    """In the main process, and again in the engine worker: it is spawned, so it inherits no handlers (and
    its start-up, an ONNX export of minutes among it, went unlogged). `level` is for the server's own
    loggers; other libraries say only warnings (the ONNX exporter's info is hundreds of lines a graph)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("server", "model", "export", "training"):
        logging.getLogger(name).setLevel(level.upper())


def default_cpu_threads(api_servers: int) -> int:
    """The model's threads on CPU: the cores this process may use (its affinity, as a container's cpuset
    sets it, within its cgroup's CPU quota, as `docker --cpus` or a Kubernetes CPU limit sets it), less one
    for each HTTP process. A model that takes every core starves the event loops that answer requests and
    stream its tokens: with both cores of two, requests waited up to 2.7 s behind a stream on CPU, and the
    stream itself was slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux has it
    try:
        quota, period = CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one unlike the kernel's
        pass
    return max(1, cores - api_servers)


@dataclass
class ServerSettings:
    model: str | None = None  # checkpoint directory (ours or HF); None = the embedded default model
    served_model_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "torch"  # torch | onnx (graphs exported at start-up, or read from onnx_dir)
    onnx_dir: str | None = None
    chat_template: str | None = None  # Jinja2 file for /v1/chat/completions (default: the checkpoint's)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_running: int = 16  # decode slots (sequences generating at once), fewer if their cache does not fit
    max_model_len: int | None = None  # longest prompt + completion (default: the model's positions)
    kv_cache_bytes: int | None = None  # memory for the slots' caches (default: a share of the device's)
    max_queued_requests: int = 256  # admitted but unfinished requests; beyond: 429
    max_queued_tokens: int = 1 << 20  # prompt + embedding tokens admitted but unfinished; beyond: 429
    prefill_batch_tokens: int = 65536  # padded tokens in one batched prefill or embedding forward
    request_timeout: float = 600.0  # seconds from arrival; X-Request-Timeout may lower it
    max_body_bytes: int = 8 << 20
    body_timeout: float = 30.0  # seconds to receive a request's whole body
    max_header_bytes: int = 64 << 10
    header_timeout: float = 10.0  # seconds to receive a request's headers
    max_connections: int = 2048  # open connections per HTTP process; one more is closed at once
    cors_allow_origin: list[str] | None = None  # origins a browser may call from; none: no CORS headers
    max_embedding_inputs: int = 2048  # OpenAI's limit; LangChain sends up to 1000 texts a request
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests
    tail_capacity: int = 64
    api_servers: int = 1
    cpu_threads: int | None = None  # the model's threads on CPU (default: `default_cpu_threads`)
    default_max_tokens: int | None = None  # a request that names no limit (default: generation_config's)
    log_level: str = "info"

    @property
    def model_path(self) -> Path:
        return Path(self.model) if self.model else DEFAULT_MODEL

    @property
    def model_name(self) -> str:
        return self.served_model_name or ("reformer-default" if not self.model else self.model_path.name)

    def model_config(self) -> ReformerConfig:
        """The checkpoint's config, read without loading weights (the HTTP processes need only limits)."""
        path = self.model_path
        try:
            return read_config(path)
        except CheckpointError as error:
            if not self.model:
                raise SystemExit(f"no embedded default model at {path} yet: pass --model DIRECTORY") from None
            raise SystemExit(f"--model {path}: {error}") from None

    def sampling_defaults(self) -> dict[str, float]:
        """The checkpoint's generation_config.json defaults; a bad file stops start-up with one line, as a bad
        config does."""
        return self._from_generation_config(read_generation_defaults)

    def completion_default(self) -> int | None:
        """Tokens a request that names no max_tokens may get (None: up to the context). Without a limit every
        such request (chat, by default) borrows cache blocks for the whole context when it is admitted."""
        if self.default_max_tokens is not None:
            return self.default_max_tokens
        return self._from_generation_config(read_default_max_tokens)

    def _from_generation_config(self, read):
        try:
            return read(self.model_path)
        except CheckpointError as error:
            raise SystemExit(f"--model {self.model_path}: {error}") from None

    def max_context(self, config: ReformerConfig) -> int:
        return min(config.max_length, self.max_model_len or config.max_length)

    @property
    def model_threads(self) -> int:
        return self.cpu_threads or default_cpu_threads(self.api_servers)

    @property
    def execution_provider(self) -> str | None:
        """What onnxruntime runs on (the worker refuses to start otherwise), None for the torch backend."""
        if self.backend != "onnx":
            return None
        return "CUDAExecutionProvider" if self.resolved_device().startswith("cuda") else "CPUExecutionProvider"

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but no CUDA device is available")
        return self.device


ENV_PREFIX = "REFORMER_"


def _defaults_from_environment(parser: argparse.ArgumentParser) -> None:
    """Every option can also come from REFORMER_<OPTION> (e.g. REFORMER_MAX_RUNNING=32), for containers;
    the command line wins."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = os.environ.get(ENV_PREFIX + action.dest.upper())
        if value is not None:
            if isinstance(action, argparse._AppendAction):  # a list: REFORMER_CORS_ALLOW_ORIGIN=https://a,https://b
                parser.set_defaults(**{action.dest: value.split(",")})
                continue
            try:
                parser.set_defaults(**{action.dest: action.type(value) if action.type else value})
            except ValueError:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}={value!r} is not a valid {action.dest}")


def parse_args(argv: list[str] | None = None) -> ServerSettings:
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(prog="python -m server", description="Reformer inference server (OpenAI API).")
    parser.add_argument("--model", help="checkpoint directory (ours or a Hugging Face Reformer); "
                                        "default: the embedded model")
    parser.add_argument("--served-model-name", help="the model id clients use (default: from the directory)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.device)
    parser.add_argument("--backend", choices=["torch", "onnx"], default=defaults.backend,
                        help="onnx: onnxruntime runs graphs exported from the model (CUDA provider on a GPU)")
    parser.add_argument("--onnx-dir", help="where the exported graphs are (or go): default a cache directory")
    parser.add_argument("--chat-template", help="Jinja2 chat template for /v1/chat/completions (default: the "
                                                "checkpoint's chat_template.jinja or tokenizer_config.json)")
    parser.add_argument("--host", default=defaults.host, help="0.0.0.0, 127.0.0.1 or ::")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--max-running", type=int, default=defaults.max_running,
                        help="sequences decoding at once")
    parser.add_argument("--max-model-len", type=int, help="longest prompt + completion (default: the model's)")
    parser.add_argument("--kv-cache-bytes", type=int, help="cache memory for all decode slots (default: half of "
                                                           "the free GPU memory, a quarter of RAM on a CPU)")
    parser.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests)
    parser.add_argument("--max-queued-tokens", type=int, default=defaults.max_queued_tokens)
    parser.add_argument("--prefill-batch-tokens", type=int, default=defaults.prefill_batch_tokens)
    parser.add_argument("--max-embedding-inputs", type=int, default=defaults.max_embedding_inputs,
                        help="inputs in one embeddings request (at most 4096)")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help="seconds to receive a request's body (408 after)")
    parser.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes)
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                        help="seconds to receive a request's headers (the connection is closed after)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections per HTTP process")
    parser.add_argument("--cors-allow-origin", action="append",
                        help="an origin browsers may call from (repeat it; default: no CORS)")
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    parser.add_argument("--api-servers", type=int, default=defaults.api_servers,
                        help="uvicorn processes (limits are enforced per process)")
    parser.add_argument("--cpu-threads", type=int,
                        help="the model's threads when it runs on CPU (default: the cores this server may use, "
                             "less one per uvicorn process)")
    parser.add_argument("--default-max-tokens", type=int,
                        help="tokens a request that sets no max_tokens may get (default: max_new_tokens of the "
                             "model's generation_config.json, else up to the context)")
    parser.add_argument("--log-level", default=defaults.log_level)
    _defaults_from_environment(parser)
    args = parser.parse_args(argv)
    settings = ServerSettings(**{k: v for k, v in vars(args).items() if v is not None})
    settings.api_key = settings.api_key or None
    for name in ("max_running", "max_queued_requests", "max_queued_tokens", "prefill_batch_tokens", "port",
                 "api_servers", "max_model_len", "kv_cache_bytes", "max_header_bytes", "max_connections",
                 "max_embedding_inputs", "cpu_threads", "default_max_tokens"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    from .protocol import MAX_EMBEDDING_CHUNKS

    if settings.max_embedding_inputs > MAX_EMBEDDING_CHUNKS:  # each input is at least one chunk
        parser.error(f"--max-embedding-inputs must be at most {MAX_EMBEDDING_CHUNKS}, the chunks one request may make")
    return settings
