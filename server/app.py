"""Assemble and run the server: LitServe (one engine worker per device) on uvicorn, with a graceful drain.

SIGTERM or SIGINT, to the main process or to its whole process group: new requests get 503 and /ready
fails, requests in flight finish within --drain-timeout, what is left then gets an error event, and the
processes exit 0 a few seconds later (`server.lifecycle`). A dead engine worker is restarted; one that keeps
dying ends the server with exit code 1.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from contextlib import asynccontextmanager

from . import __version__, error_bodies, lifecycle, metrics, openapi, security
from .capacity import CacheTooSmall, plan_cache
from .http_limits import guarded_protocol
from .request_ids import RequestIdMiddleware
from .settings import ServerSettings, configure_logging

log = logging.getLogger("server")


def build_server(settings: ServerSettings):
    """The LitServer, the state its processes share, and the metrics directory to remove at exit (if it
    was made here). Raises CacheTooSmall when not one request of the longest length fits."""
    config = settings.model_config()
    cache = plan_cache(settings, config)
    if cache.full_length_sequences < settings.max_running:
        log.warning("the decode cache (%.1f GiB: %s) holds %d slots of the %d asked for, and %d requests of the "
                    "full %d tokens at once (shorter ones borrow fewer blocks)", cache.budget_bytes / 2**30,
                    cache.budget_source, cache.slots, settings.max_running, cache.full_length_sequences,
                    cache.max_length)
    device, sampling_defaults = settings.resolved_device(), settings.sampling_defaults()  # exit early if bad
    metrics_dir, made = metrics.prepare_directory()  # before prometheus_client is imported
    import litserve as ls

    from .spec import ModelInfo, OpenAISpec
    from .worker import ReformerAPI

    info = ModelInfo(name=settings.model_name, max_context=settings.max_context(config), vocab_size=config.vocab_size,
                     eos_token_id=config.eos_token_id,
                     embedding_size=2 * config.hidden_size, causal=config.is_decoder, created=int(time.time()), cache=cache.describe(),
                     sampling_defaults=sampling_defaults, default_max_tokens=settings.completion_default())
    shared = lifecycle.SharedState()
    spec = OpenAISpec(settings, info, shared)
    api = ReformerAPI(settings, spec, shared, cache)
    server = ls.LitServer(
        api, accelerator=device, devices=1, workers_per_device=1, timeout=False, restart_workers=True,
        healthcheck_path="/litserve/health", info_path="/litserve/info",
        model_metadata={"model": info.name, "backend": settings.backend, "device": device,
                        "max_context": info.max_context})
    server.uvicorn_graceful_timeout = lifecycle.UVICORN_GRACE  # LitServe's 30 s would outlast any drain budget
    server.monitor_internal = 0.5  # how often LitServe looks for a dead worker to restart (its default: 2 s)
    _take_signals_in_http_processes(server, shared)
    _keep_http_processes(server)
    error_bodies.install(server.app)
    openapi.document(server.app, title="Reformer inference server", version=__version__)
    security.secure(server.app, settings.api_key, settings.cors_allow_origin or [])
    server.app.add_middleware(RequestIdMiddleware)  # added last, so it runs first: refusals carry the id too
    return server, shared, metrics_dir if made else None


def _take_signals_in_http_processes(server, shared: lifecycle.SharedState) -> None:
    """Each HTTP process runs the app's lifespan at startup, after uvicorn installed its signal handlers."""
    litserve_lifespan = server.app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app):
        lifecycle.http_signals(shared)
        async with litserve_lifespan(app) as state:
            yield state

    server.app.router.lifespan_context = lifespan


def _keep_http_processes(server) -> None:
    """LitServe keeps its HTTP processes to itself; the supervisor watches them (`lifecycle`)."""
    start_server = server._start_server

    def start_and_keep(*args, **kwargs):
        server.http_processes = start_server(*args, **kwargs)
        return server.http_processes

    server._start_server = start_and_keep


def run(settings: ServerSettings) -> None:
    configure_logging(settings.log_level)
    try:
        server, shared, temporary_metrics = build_server(settings)
    except CacheTooSmall as error:  # one line that says what to change, not a traceback from the worker
        log.error("%s", error)
        sys.exit(2)
    log.info("serving %s from %s on %s with the %s backend at http://%s:%d", settings.model_name,
             settings.model_path, settings.resolved_device(), settings.backend, settings.host, settings.port)
    supervisor = lifecycle.Supervisor(server, shared, settings.drain_timeout)
    supervisor.install()
    protocol = guarded_protocol(header_timeout=settings.header_timeout, max_connections=settings.max_connections,
                                max_header_bytes=settings.max_header_bytes)
    try:
        server.run(host=settings.host, port=settings.port, num_api_servers=settings.api_servers,
                   generate_client_file=False, log_level=settings.log_level.lower(), timeout_keep_alive=30,
                   http=protocol, h11_max_incomplete_event_size=settings.max_header_bytes)
    except RuntimeError as error:
        if not str(error).startswith("One or more workers failed to start"):
            raise
        if shared.stopping and supervisor.exit_code == 0:  # a signal came while the model loaded
            log.info("stopped before the model was loaded")
            sys.exit(0)
        log.error("the engine worker did not start (the lines above say why)")  # not LitServe's traceback
        sys.exit(1)
    finally:
        if temporary_metrics:  # each start made one in /tmp: they piled up
            shutil.rmtree(temporary_metrics, ignore_errors=True)
    log.info("stopped")
    sys.exit(supervisor.exit_code)
