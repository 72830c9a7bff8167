"""Assemble and run the server: LitServe (one engine worker per device) on uvicorn, with a graceful drain.

SIGTERM (and SIGINT) to the main process: the HTTP processes stop admitting (503, /ready fails), requests
in flight finish within --drain-timeout, then LitServe's own shutdown stops uvicorn and the worker. Without
this, SIGTERM to LitServe's main process leaves its children running and bound to the port.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time

from . import metrics
from .settings import ServerSettings

log = logging.getLogger("server")


def build_server(settings: ServerSettings):
    """The LitServer and the shared drain state (an Event and an in-flight counter inherited by children)."""
    metrics.prepare_directory(settings.extra.get("metrics_dir"))  # before prometheus_client is imported
    import litserve as ls

    from .spec import ModelInfo, OpenAISpec
    from .worker import ReformerAPI

    config = settings.model_config()
    device = settings.resolved_device()
    info = ModelInfo(name=settings.model_name, max_context=settings.max_context(config), vocab_size=config.vocab_size,
                     embedding_size=2 * config.hidden_size, created=int(time.time()))
    draining, inflight = mp.Event(), mp.Value("i", 0)
    spec = OpenAISpec(settings, info, draining, inflight)
    api = ReformerAPI(settings, spec)
    server = ls.LitServer(
        api, accelerator=device, devices=1, workers_per_device=1, timeout=False,
        healthcheck_path="/litserve/health", info_path="/litserve/info",
        model_metadata={"model": info.name, "backend": settings.backend, "device": device,
                        "max_context": info.max_context})
    return server, draining, inflight


def run(settings: ServerSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server, draining, inflight = build_server(settings)
    log.info("serving %s from %s on %s with the %s backend at http://%s:%d", settings.model_name,
             settings.model_path, settings.resolved_device(), settings.backend, settings.host, settings.port)

    def drain(signum, frame):
        if draining.is_set():
            return
        draining.set()
        log.info("signal %d: draining %d request(s), up to %.0f s", signum, inflight.value, settings.drain_timeout)

        def wait_then_stop():
            deadline = time.monotonic() + settings.drain_timeout
            while inflight.value > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            log.info("drained (%d left); stopping", inflight.value)
            try:
                server._shutdown_event.set()  # LitServe's own shutdown: uvicorn, the worker, its manager
            except Exception:  # noqa: BLE001 - its manager process is gone (killed with the group)
                log.warning("LitServe's manager is gone; ending the child processes directly")
                for child in mp.active_children():
                    child.terminate()
                os._exit(0)

        threading.Thread(target=wait_then_stop, daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    server.run(host=settings.host, port=settings.port, num_api_servers=settings.api_servers,
               generate_client_file=False, log_level=settings.log_level.lower(), timeout_keep_alive=30)
