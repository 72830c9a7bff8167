"""The inference worker: a LitAPI that owns the engine, and the continuous-batching loop that drives it.

LitServe spawns one worker per device; requests arrive on its request queue. Our loop moves them into the
engine's inbox (`schedule_task`) and runs engine iterations on its main thread (`run`). The outputs of one
iteration go back as one message per HTTP process (not one per token), which keeps LitServe's
inter-process queue out of the per-token cost. The message layout is `server.engine_client`'s.
"""

from __future__ import annotations

import asyncio
import logging

import litserve as ls
import torch
from litserve.loops import ContinuousBatchingLoop

from model.checkpoint import load_model
from model.engine import Engine
from model.messages import EmbedRequest, Failed, GenerateRequest
from model.sampling import SamplingParams
from model.tokenizer import load_tokenizer

from .capacity import CachePlan, serving_dtype
from .engine_client import is_shutdown_sentinel, message_of, outputs_by_route
from .lifecycle import SharedState, worker_signals
from .settings import ServerSettings, configure_logging

log = logging.getLogger(__name__)



class EngineLoop(ContinuousBatchingLoop):
    def __init__(self):
        super().__init__()
        self._wake: asyncio.Event | None = None

    def pre_setup(self, lit_api, spec=None):
        if not lit_api.stream:
            raise ValueError("the engine loop streams: the LitAPI needs stream=True")

    def _event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    async def schedule_task(self, lit_api, lit_spec, request_queue, transport):
        """Move requests (and cancellations) from LitServe's queue into the engine's inbox."""
        wake = self._event()
        while True:
            item = await asyncio.to_thread(self.get_request, request_queue, True, 0.1)
            if item is None:
                continue
            if is_shutdown_sentinel(item):
                return
            try:
                lit_api.engine.submit(message_of(item))
            except TypeError:
                log.error("not an engine message: %r", item)
            wake.set()

    async def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        engine = lit_api.engine
        lit_api.shared.loop_beat()
        wake = self._event()
        if not engine.has_work():
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout=0.05)
            except TimeoutError:
                pass
            return
        # On the worker's main thread, blocking the event loop for one iteration (the request intake waits at
        # most that long): torch's CPU kernels ran at half speed from any other thread (measured: 8.7 ms vs
        # 15.9 ms per decode step on 2 cores; OpenMP's parallel regions only paid off on the main thread).
        for route, message in outputs_by_route(engine.iteration(), worker_id):
            transport.send(message, consumer_id=route)
        await asyncio.sleep(0)  # let the request intake run between iterations


class ReformerAPI(ls.LitAPI):
    """Loads the model on the worker's device and serves it through one engine (one copy of the weights)."""

    def __init__(self, settings: ServerSettings, spec, shared: SharedState, cache: CachePlan):
        super().__init__(stream=True, spec=spec, loop=EngineLoop(), max_batch_size=settings.max_running)
        self.settings = settings
        self.shared = shared
        self.cache = cache  # planned in the main process (server.capacity)
        self.engine: Engine | None = None

    def setup(self, device: str) -> None:
        from .metrics import Metrics

        self.shared.start_heartbeat()
        worker_signals(self.shared)
        settings = self.settings
        configure_logging(settings.log_level)
        if device == "cpu":
            torch.set_num_threads(settings.model_threads)  # onnxruntime's CPU sessions take the same
        model = load_model(settings.model_path)
        dtype = serving_dtype(device)
        model = model.to(device=device, dtype=dtype).eval()
        metrics = Metrics(settings.model_name)
        metrics.info.labels(backend=settings.backend, device=settings.execution_provider or device,
                            model=settings.model_name).set(1)
        slots, max_length = self.cache.slots, self.cache.max_length
        metrics.cache_plan(slots=slots, blocks=self.cache.blocks, total_bytes=self.cache.total_bytes)
        decoder = embedder = None
        if settings.backend == "onnx":
            decoder, embedder = self._onnx_backend(model, slots, max_length, device)
        self.engine = Engine(model, load_tokenizer(settings.model_path), max_running=slots, max_length=max_length,
                             prefill_batch_tokens=settings.prefill_batch_tokens,
                             tail_capacity=settings.tail_capacity, cache_blocks=self.cache.blocks, metrics=metrics,
                             decoder=decoder, embedder=embedder)
        self._warm_up()
        log.info("engine ready: %s on %s (%s%s), backend %s%s, %d decode slots of %d tokens", settings.model_name,
                 device, str(dtype).removeprefix("torch."),
                 f", {torch.get_num_threads()} threads" if device == "cpu" else "", settings.backend,
                 f" ({settings.execution_provider})" if settings.execution_provider else "", slots, max_length)

    def _onnx_backend(self, model, slots: int, max_length: int, device: str):
        """Graphs exported for this pool and these weights (once; reused from the directory when its manifest
        says they are the ones)."""
        import functools
        from pathlib import Path

        from export.backend import OnnxDecoder, embed_steps
        from export.runtime import (FORMAT, DamagedGraph, ExportedModel, directory_lock, graphs_mismatch,
                                    model_digest)

        settings = self.settings
        pool = {"slots": slots, "max_length": max_length, "tail_capacity": settings.tail_capacity,
                "cache_blocks": self.cache.blocks, "block_size": self.cache.block_size}
        dtype = str(model.dtype).removeprefix("torch.")
        directory = Path(settings.onnx_dir or Path.home() / ".cache" / "reformer-server" / "onnx" /
                         f"{settings.model_name}-{slots}x{max_length}-{dtype}")
        with directory_lock(directory):  # another server may be exporting into it (a shared volume)
            found = graphs_mismatch(directory, pool, dtype, model_digest(model))
            exported = None
            if found is None:
                try:
                    exported = ExportedModel(directory, device)
                except DamagedGraph as error:  # a graph file deleted or cut short
                    found = f"graphs that do not load ({error})"
            if exported is None:
                wanted = f"this server needs graphs of {settings.model_path} for {pool} in {dtype} ({FORMAT})"
                self._export(model, directory, f"{directory} holds {found}; {wanted}", pool, device)
                exported = ExportedModel(directory, device)
        decoder = OnnxDecoder(model, exported, prefill_batch_tokens=settings.prefill_batch_tokens)
        return decoder, functools.partial(embed_steps, exported, model.config, torch.device(device))

    def _export(self, model, directory, why: str, pool: dict, device: str) -> None:
        advice = ("write them with python -m export (its --slots, --max-length, --cache-blocks, --dtype) and pass "
                  "--onnx-dir")
        try:  # the exporter is an extra: serving exported graphs needs onnxruntime only
            from export.exporter import export_model
        except ImportError as missing:
            raise RuntimeError(f"{why}, and the exporter is not installed ({missing}): pip install -e '.[export]', "
                               f"or {advice}") from None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / ".writable"  # before minutes of exporting, not after
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise RuntimeError(f"{why}, and it cannot be written ({error}): pass a writable --onnx-dir, or "
                               f"{advice}") from None
        log.info("exporting ONNX graphs: %s", why)
        export_model(model.cpu() if device != "cpu" else model, directory, source=self.settings.model_path,
                     progress=log.info, **pool)
        model.to(device)

    def _warm_up(self) -> None:
        """One prefill, a few steps and one embedding before reporting ready (first CUDA kernels, graph
        capture). The engine turns a failure into an answer to its request: here that answer stops the start,
        or a backend that cannot run (graphs of other code, a CUDA error) would be ready and fail every request."""
        engine = self.engine
        engine.submit(GenerateRequest("warm-up", (3, 4, 5), SamplingParams(max_tokens=4, temperature=0.0), route=-1))
        engine.submit(EmbedRequest("warm-up-embedding", ((3, 4, 5),), route=-1))
        while engine.has_work():
            for _, output in engine.iteration():
                if isinstance(output, Failed):
                    raise RuntimeError(f"the engine failed its warm-up ({output.uid}): {output.message}")

    def has_active_requests(self) -> bool:
        return self.engine is not None and self.engine.has_work()

    def has_capacity(self) -> bool:
        return True  # admission is the HTTP processes' job; the engine queues what it is given

    def predict(self, x, **kwargs):  # the engine loop never calls it
        raise NotImplementedError("requests are served by the engine loop")
