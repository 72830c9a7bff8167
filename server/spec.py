"""The HTTP surface (a LitSpec): the route table, what every route checks first, and the small routes.

Runs in each uvicorn process. Completions and embeddings have their own modules; the engine connection is
`engine_client`, admission control `admission`. Requests reach the engine worker through LitServe's queues,
which only `engine_client` knows about.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request, Response
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import WorkerSetupStatus

from model.tokenizer import load_tokenizer

from . import protocol
from .admission import Admission
from .chat import ChatRoute
from .completions import CompletionsRoute
from .embeddings import EmbeddingsRoute
from .engine_client import EngineClient
from .lifecycle import SharedState
from .protocol import APIError, DetokenizeRequest, ModelList, ModelObject, TokenizeRequest
from .settings import ServerSettings

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.2
PARSE_IN_THREAD = 256 << 10  # body bytes from which parsing moves to a thread (about 10 ms of work)


@dataclass
class ModelInfo:
    name: str
    max_context: int
    vocab_size: int
    eos_token_id: int | None  # min_tokens holds it back: a request must leave another token to draw
    embedding_size: int
    causal: bool  # each position sees only those before it (is_decoder): 'first' pooling means nothing
    created: int
    cache: dict  # server.capacity.CachePlan.describe()
    sampling_defaults: dict  # the checkpoint's generation_config.json: what a request that does not say gets
    default_max_tokens: int | None = None  # what a request without max_tokens may get (None: up to the context)


@dataclass
class CountedRoute:
    """A request is in flight for the drain from its arrival, not only once admitted: one whose body is still
    coming or whose prompt is being encoded when the signal comes is waited for, not failed (its admission,
    which counts it from then on, begins before this ends). A class, not a closure: the spec is pickled."""

    handle: Callable[[Request], Awaitable[Response]]
    shared: SharedState

    async def __call__(self, request: Request) -> Response:
        self.shared.add_inflight(1)
        try:
            return await self.handle(request)
        finally:
            self.shared.add_inflight(-1)


class OpenAISpec(LitSpec):
    def __init__(self, settings: ServerSettings, info: ModelInfo, shared: SharedState):
        super().__init__()
        self.settings = settings
        self.info = info
        self.shared = shared
        self.api_path = "/v1/completions"  # the name of LitServe's request queue for this API
        self._process_state = {}
        self.chat = ChatRoute(self)  # its template also renders /tokenize's messages
        READ = ["GET", "HEAD"]  # HTTP: what answers GET answers HEAD (load balancers' probes send it)
        for path, handler, methods in [
            ("/v1/completions", CountedRoute(CompletionsRoute(self).handle, shared), ["POST"]),
            ("/v1/chat/completions", CountedRoute(self.chat.handle, shared), ["POST"]),
            ("/v1/embeddings", CountedRoute(EmbeddingsRoute(self).handle, shared), ["POST"]),
            ("/v1/models", self.models, READ), ("/v1/models/{model_id:path}", self.model, READ),
            ("/tokenize", self.tokenize, ["POST"]),
            ("/detokenize", self.detokenize, ["POST"]), ("/health", self.health, READ),
            ("/ready", self.ready, READ), ("/metrics", self.metrics_route, READ),
            ("/info", self.info_route, READ)]:
            self.add_endpoint(path, handler, methods)

    def __getstate__(self):
        state = super().__getstate__()
        state["_process_state"] = {}  # tokenizer, metrics, engine client, admission: made in each process
        return state

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request, context_kwargs=None):  # requests go to the engine as built here
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # ---- this process's objects (made on first use, after the fork) ----------------------------------------
    def _local(self, name: str, make):
        if name not in self._process_state:
            self._process_state[name] = make()
        return self._process_state[name]

    @property
    def tokenizer(self):
        return self._local("tokenizer", lambda: load_tokenizer(self.settings.model_path))

    @property
    def metrics(self):
        from .metrics import Metrics

        return self._local("metrics", lambda: Metrics(self.info.name))

    @property
    def engine(self) -> EngineClient:
        return self._local("engine", lambda: EngineClient(self, self.shared))

    @property
    def admission(self) -> Admission:
        settings = self.settings
        return self._local("admission", lambda: Admission(
            max_requests=settings.max_queued_requests, max_tokens=settings.max_queued_tokens,
            max_running=settings.max_running, shared=self.shared))

    # ---- what every inference route checks first ------------------------------------------------------------
    def _is_ready(self) -> bool:
        status = getattr(self._server, "workers_setup_status", None)
        return bool(status) and all(value == WorkerSetupStatus.READY for value in status.values())

    def _check_open(self) -> None:
        if self.shared.draining:
            raise APIError(503, "The server is shutting down.", code="server_shutting_down")
        if not self._is_ready() or not self.engine.alive():
            raise APIError(503, "The model is loading (or its engine restarting).", code="not_ready",
                           headers={"Retry-After": "5"})

    async def read_body(self, request: Request) -> bytes:
        """The body, if it is uncompressed JSON, within --max-body-bytes and received within --body-timeout."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # Also what keeps a web page from driving the server through a visitor's browser: a cross-site
            # form or fetch without a CORS preflight can only send text/plain, form or multipart bodies.
            raise APIError(415, f"The body must be application/json, not {content_type or 'unlabelled'}.",
                           code="unsupported_media_type")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # RFC 7694: 415 names the coding; decompressing would also lift the size cap
            raise APIError(415, f"Content-Encoding {encoding} is not supported: send the body uncompressed.",
                           code="unsupported_media_type")
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"The request body of {declared} bytes exceeds the limit of {limit} bytes.",
                           code="request_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                async for part in request.stream():
                    body += part
                    if len(body) > limit:
                        raise APIError(413, f"The request body exceeds the limit of {limit} bytes.",
                                       code="request_too_large")
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.settings.body_timeout:g} s.",
                           code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            log.info("a client left while sending its body")
            raise APIError(499, "The client left while sending its body.", code="client_closed") from None
        return bytes(body)

    async def parse_body(self, request: Request, schema):
        """The body read, parsed into `schema` and checked to name this server's model (or none)."""
        raw = await self.read_body(request)
        # Megabytes of token ids take most of a second to validate: off the event loop, where streams wait
        body = protocol.parse(schema, raw) if len(raw) < PARSE_IN_THREAD else \
            await asyncio.to_thread(protocol.parse, schema, raw)
        self.check_model(body.model)
        return body

    async def accept(self, request: Request, schema):
        """What every inference request passes (the key was checked before: `security`): readiness, then
        `parse_body`; returns the body and the request's timeout in seconds."""
        self._check_open()
        body = await self.parse_body(request, schema)
        return body, self._timeout(request)

    def refuse(self, error: APIError) -> Response:
        self.metrics.rejected.labels(status=str(error.status), code=error.code or "none").inc()  # codes: a fixed set
        return error.response()

    def encode_prompt(self, text: str, param: str, truncating: bool) -> list[int]:
        """A prompt's token ids. One that could never fit is refused on its length first, unless the request
        truncates it: encoding megabytes only to refuse them took seconds."""
        least, maximum = self.tokenizer.fewest_tokens(text), self.info.max_context
        if least > maximum and not truncating:
            raise protocol.text_too_long(maximum, len(text), least, param, f"Please reduce the length of the {param}.")
        return self.tokenizer.encode(text)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.info.name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.info.name}'.",
                           param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", param=param,
                           code="invalid_token_id")

    def _timeout(self, request: Request) -> float:
        timeout = self.settings.request_timeout
        header = request.headers.get("x-request-timeout")
        if header is not None:
            try:
                timeout = min(timeout, float(header))
            except ValueError:
                raise APIError(400, "X-Request-Timeout must be a number of seconds.",
                               param="X-Request-Timeout") from None
            if not timeout > 0:
                raise APIError(400, "X-Request-Timeout must be positive.", param="X-Request-Timeout")
        return timeout

    @asynccontextmanager
    async def watch_disconnect(self, request: Request, stream, abandoned):
        """While the block runs, a client that goes away ends `stream` with `abandoned`."""

        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(DISCONNECT_POLL_SECONDS)
            stream.end(abandoned)

        watcher = asyncio.create_task(watch())
        try:
            yield
        finally:
            watcher.cancel()

    # ---- small routes -----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        """Liveness: this process answers and the engine worker is alive (it may still be loading)."""
        if not self.engine.alive():
            return JSONResponse({"status": "engine unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        try:
            self._check_open()
        except APIError as error:
            return error.response()
        return JSONResponse({"status": "ready", "model": self.info.name})

    async def info_route(self, request: Request) -> Response:
        settings = self.settings
        return JSONResponse({"model": self.info.name, "backend": settings.backend,
                             "device": settings.resolved_device(), "execution_provider": settings.execution_provider,
                             "max_context": self.info.max_context, "embedding_size": self.info.embedding_size,
                             "cache": self.info.cache, "sampling_defaults": self.info.sampling_defaults,
                             "default_max_tokens": self.info.default_max_tokens})

    async def metrics_route(self, request: Request) -> Response:
        from .metrics import exposition

        self.metrics  # noqa: B018 - registers this process's metrics before the first scrape
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    def _model_object(self) -> ModelObject:
        return ModelObject(id=self.info.name, object="model", created=self.info.created, owned_by="reformer-server",
                           max_model_len=self.info.max_context)

    async def models(self, request: Request) -> Response:
        return JSONResponse(ModelList(object="list", data=[self._model_object()]).model_dump())

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{id} (the openai client's models.retrieve); a served name may hold slashes."""
        try:
            self.check_model(request.path_params["model_id"])
        except APIError as error:
            return error.response()
        return JSONResponse(self._model_object().model_dump())

    async def tokenize(self, request: Request) -> Response:
        try:
            body = await self.parse_body(request, TokenizeRequest)
            body.check()
            text = body.prompt if body.messages is None else self.chat.render(body.chat())
        except APIError as error:
            return self.refuse(error)
        tokens = await asyncio.to_thread(self.tokenizer.encode, text)  # long texts: off the event loop
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.info.max_context})

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await self.parse_body(request, DetokenizeRequest)
            self.check_token_ids(body.tokens, "tokens")
        except APIError as error:
            return self.refuse(error)
        return JSONResponse({"prompt": await asyncio.to_thread(self.tokenizer.decode, body.tokens)})
