"""The HTTP surface (a LitSpec): OpenAI completions and embeddings, tokenize, models, health, metrics.

Runs in each uvicorn process. It validates and tokenizes, applies admission control (429 with
Retry-After), hands requests to the engine worker through LitServe's request queue, and turns engine events
into JSON bodies or Server-Sent Events. A client that goes away (or a deadline) cancels its request in the
engine; streams send progress comments during long prefills and keep-alives, so bytes flow within a second.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import ResponseBufferItem, WorkerSetupStatus

from model.sampling import SamplingParams
from model.tokenizer import load_tokenizer

from . import protocol
from .protocol import APIError, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from .settings import ServerSettings
from .worker import ENGINE_UID

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 0.5
FINAL = ("done", "error", "embeddings")


@dataclass
class ModelInfo:
    name: str
    max_context: int
    vocab_size: int
    embedding_size: int
    created: int


class OpenAISpec(LitSpec):
    def __init__(self, settings: ServerSettings, info: ModelInfo, draining, inflight):
        super().__init__()
        self.settings = settings
        self.info = info
        self.api_path = "/v1/completions"  # the name of LitServe's request queue for this API
        self._draining = draining  # multiprocessing.Event, set on SIGTERM
        self._inflight = inflight  # multiprocessing.Value: requests in flight in all HTTP processes
        self._reset_process_state()
        for path, handler, methods in [
            ("/v1/completions", self.completions, ["POST"]), ("/v1/embeddings", self.embeddings, ["POST"]),
            ("/v1/models", self.models, ["GET"]), ("/tokenize", self.tokenize, ["POST"]),
            ("/detokenize", self.detokenize, ["POST"]), ("/health", self.health, ["GET"]),
            ("/ready", self.ready, ["GET"]), ("/metrics", self.metrics_route, ["GET"]),
            ("/info", self.info_route, ["GET"])]:
            self.add_endpoint(path, handler, methods)

    def _reset_process_state(self) -> None:
        self._streams: dict[str, asyncio.Queue] = {}
        self._dispatcher: asyncio.Task | None = None
        self._tokenizer = None
        self._metrics = None
        self._queued_requests = 0
        self._queued_tokens = 0
        self._service_seconds = 1.0  # moving average of request time, for Retry-After

    def __getstate__(self):
        state = super().__getstate__()
        # Process-local objects, and the drain state that only the (forked) HTTP processes use: the engine
        # worker is spawned, and fork-made locks cannot travel to it.
        for name in ("_streams", "_dispatcher", "_tokenizer", "_metrics", "_draining", "_inflight"):
            state[name] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._streams = {}

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request, context_kwargs=None):  # requests go to the engine as built here
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    # ---- per-process helpers ----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.settings.model_path)
        return self._tokenizer

    @property
    def metrics(self):
        if self._metrics is None:
            from .metrics import Metrics

            self._metrics = Metrics()
        return self._metrics

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided." if given else "Missing API key: send "
                           "'Authorization: Bearer <key>'.", code="invalid_api_key")

    def _is_ready(self) -> bool:
        status = getattr(self._server, "workers_setup_status", None)
        return bool(status) and all(value == WorkerSetupStatus.READY for value in status.values())

    def _check_open(self) -> None:
        if self._draining.is_set():
            raise APIError(503, "The server is shutting down.", code="server_shutting_down")
        if not self._is_ready():
            raise APIError(503, "The model is still loading.", code="not_ready", headers={"Retry-After": "5"})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"The request body of {declared} bytes exceeds the limit of {limit} bytes.",
                           code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"The request body exceeds the limit of {limit} bytes.", code="request_too_large")
        return bytes(body)

    async def _accept(self, request: Request, schema):
        """The checks every inference request passes first: key, readiness, body, schema, deadline."""
        self._authorize(request)
        self._check_open()
        body = protocol.parse(schema, await self._read_body(request))
        return body, self._deadline(request)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.info.name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.info.name}'.",
                           param="model", code="model_not_found")

    def _admit(self, tokens: int) -> None:
        """429 beyond the queue limits (per HTTP process), with a Retry-After from recent request times."""
        settings = self.settings
        if (self._queued_requests + 1 > settings.max_queued_requests
                or self._queued_tokens + tokens > settings.max_queued_tokens):
            wait = self._service_seconds * (self._queued_requests + 1) / max(1, settings.max_running)
            retry = str(min(60, max(1, math.ceil(wait))))
            raise APIError(429, f"The server is overloaded ({self._queued_requests} requests, {self._queued_tokens} "
                                "tokens queued); retry later.", code="rate_limit_exceeded",
                           headers={"Retry-After": retry})
        self._queued_requests += 1
        self._queued_tokens += tokens
        with self._inflight.get_lock():
            self._inflight.value += 1

    def _leave(self, tokens: int, seconds: float) -> None:
        self._queued_requests -= 1
        self._queued_tokens -= tokens
        self._service_seconds = 0.9 * self._service_seconds + 0.1 * seconds
        with self._inflight.get_lock():
            self._inflight.value -= 1

    def _deadline(self, request: Request) -> float:
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

    # ---- the engine connection --------------------------------------------------------------------------
    def _open(self, uid: str) -> asyncio.Queue:
        """Register a request's event queue (before it is submitted, so no event can be missed)."""
        if self._dispatcher is None or self._dispatcher.done():
            item = ResponseBufferItem(event=asyncio.Event(), response_queue=deque())
            self.response_buffer[ENGINE_UID] = item
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(item))
        events = asyncio.Queue()
        self._streams[uid] = events
        return events

    async def _dispatch(self, item: ResponseBufferItem) -> None:
        """Fan engine messages (one per engine iteration) out to the requests they are for."""
        while True:
            await item.event.wait()
            item.event.clear()
            while item.response_queue:
                batch, _ = item.response_queue.popleft()
                for event in batch:
                    events = self._streams.get(event["uid"])
                    if events is not None:
                        events.put_nowait(event)

    def _submit(self, payload: dict) -> None:
        # Synchronous on purpose: a request and its cancellation must reach the engine in order.
        self.request_queue.put((self.response_queue_id, payload["uid"], time.monotonic(), payload))

    def _cancel(self, uid: str) -> None:
        self._streams.pop(uid, None)
        try:
            self._submit({"kind": "cancel", "uid": uid})
        except Exception:  # noqa: BLE001 - the worker may already be gone at shutdown
            log.debug("could not send the cancellation of %s", uid)

    async def _events(self, events: asyncio.Queue):
        """Engine events, with None whenever nothing came for KEEPALIVE_SECONDS."""
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=KEEPALIVE_SECONDS)
            except TimeoutError:
                yield None
                continue
            yield event
            if event["type"] in FINAL:
                return

    async def _watch_disconnect(self, request: Request, uid: str) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        self._cancel(uid)

    # ---- routes -----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
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
                             "max_context": self.info.max_context, "embedding_size": self.info.embedding_size})

    async def metrics_route(self, request: Request) -> Response:
        from .metrics import exposition

        self.metrics  # noqa: B018 - registers this process's metrics before the first scrape
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except APIError as error:
            return error.response()
        return JSONResponse({"object": "list", "data": [{
            "id": self.info.name, "object": "model", "created": self.info.created, "owned_by": "reformer-server",
            "max_model_len": self.info.max_context}]})

    async def tokenize(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = protocol.parse(TokenizeRequest, await self._read_body(request))
            self._check_model(body.model)
        except APIError as error:
            return error.response()
        tokens = self.tokenizer.encode(body.prompt)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": self.info.max_context})

    async def detokenize(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = protocol.parse(DetokenizeRequest, await self._read_body(request))
            self._check_model(body.model)
            self._check_token_ids(body.tokens, "tokens")
        except APIError as error:
            return error.response()
        return JSONResponse({"prompt": self.tokenizer.decode(body.tokens)})

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", param=param,
                           code="invalid_token_id")

    # ---- completions ------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            body, timeout = await self._accept(request, CompletionRequest)
            payload, prompt_ids, prompt_text = self._completion_payload(body)
            self._admit(len(prompt_ids))
        except APIError as error:
            self.metrics.rejected.labels(status=str(error.status)).inc()
            return error.response()
        uid = f"cmpl-{uuid.uuid4().hex}"
        payload.update(uid=uid, timeout=timeout, progress=body.stream)
        call = _Completion(self, uid, body, prompt_ids, prompt_text, arrival)
        events = self._open(uid)
        self._submit(payload)
        if body.stream:
            return StreamingResponse(call.stream(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await call.collect(events, request)

    def _completion_payload(self, body: CompletionRequest) -> tuple[dict, list[int], str]:
        self._check_model(body.model)
        for name, value, default in (("n", body.n, 1), ("best_of", body.best_of, None),
                                     ("presence_penalty", body.presence_penalty, 0),
                                     ("frequency_penalty", body.frequency_penalty, 0)):
            if value != default and not (name == "best_of" and value == 1):
                raise protocol.unsupported(name, f"only {default} is implemented")
        if body.logit_bias:
            raise protocol.unsupported("logit_bias", "biases are not implemented")
        if body.suffix:
            raise protocol.unsupported("suffix", "insertion is not implemented")
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
            prompt_ids, prompt_text = self.tokenizer.encode(body.prompt), body.prompt
        elif body.prompt and all(isinstance(t, int) for t in body.prompt):
            prompt_ids = list(body.prompt)
            self._check_token_ids(prompt_ids, "prompt")
            prompt_text = self.tokenizer.decode(prompt_ids)
        elif not body.prompt:
            raise APIError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
        else:
            raise protocol.unsupported("prompt", "send one prompt (a string or a list of token ids) per request")
        if not prompt_ids:
            raise APIError(400, "The prompt encodes to no tokens.", param="prompt", code="empty_prompt")
        maximum = self.info.max_context
        if len(prompt_ids) > maximum:
            raise protocol.context_error(maximum, len(prompt_ids), body.max_tokens or 0)
        max_tokens = maximum - len(prompt_ids) if body.max_tokens is None else body.max_tokens
        if max_tokens < 0:
            raise APIError(400, f"'max_tokens' must be at least 0, got {max_tokens}.", param="max_tokens",
                           code="invalid_value")
        if len(prompt_ids) + max_tokens > maximum:
            raise protocol.context_error(maximum, len(prompt_ids), max_tokens, param="max_tokens")
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "'max_tokens' 0 is only useful with 'echo' (scoring a text).", param="max_tokens",
                           code="invalid_value")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > protocol.MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"'stop' takes up to {protocol.MAX_STOP_STRINGS} non-empty strings.", param="stop",
                           code="invalid_value")
        self._check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        checks = [("temperature", 0 <= body.temperature <= 2, "between 0 and 2"),
                  ("top_p", 0 < body.top_p <= 1, "in (0, 1]"),
                  ("top_k", body.top_k == -1 or body.top_k >= 0, "-1, 0 (both: no limit) or positive"),
                  ("seed", body.seed is None or 0 <= body.seed < 2**63, "between 0 and 2**63 - 1"),
                  ("logprobs", body.logprobs is None or 0 <= body.logprobs <= protocol.MAX_LOGPROBS,
                   f"between 0 and {protocol.MAX_LOGPROBS}")]
        for name, ok, expected in checks:
            if not ok:
                raise APIError(400, f"'{name}' must be {expected}, got {getattr(body, name)!r}.", param=name,
                               code="invalid_value")
        params = SamplingParams(max_tokens=max_tokens, temperature=float(body.temperature),
                                top_k=max(0, body.top_k), top_p=float(body.top_p), seed=body.seed,
                                stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                                logprobs=body.logprobs)
        payload = {"kind": "generate", "prompt_ids": prompt_ids, "params": params, "stop": stop,
                   "prompt_logprobs": body.echo and body.logprobs is not None}
        if body.user:
            log.info("completion for user %r", body.user)
        return payload, prompt_ids, prompt_text

    # ---- embeddings -------------------------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            body, timeout = await self._accept(request, EmbeddingRequest)
            documents, spans = self._embedding_documents(body)
            tokens = sum(map(len, documents))
            self._admit(tokens)
        except APIError as error:
            self.metrics.rejected.labels(status=str(error.status)).inc()
            return error.response()
        uid = f"embd-{uuid.uuid4().hex}"
        events = self._open(uid)
        self._submit({"kind": "embed", "uid": uid, "documents": documents, "pooling": body.pooling,
                      "timeout": timeout})
        watcher = asyncio.create_task(self._watch_disconnect(request, uid))
        result = None
        try:
            async for event in self._events(events):
                if event is not None and event["type"] in FINAL:
                    result = event
        finally:
            watcher.cancel()
            self._streams.pop(uid, None)
            self._leave(tokens, time.monotonic() - arrival)
        if result is None or result["type"] == "done":
            error = APIError(504, "The request deadline passed.", code="timeout") if result and result["timeout"] \
                else APIError(499, "The request was cancelled.", code="cancelled")
            return error.response()
        if result["type"] == "error":
            return APIError(result["status"], result["message"]).response()
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.e2e.observe(time.monotonic() - arrival)
        return JSONResponse(self._embedding_body(body, result["vectors"], spans, tokens))

    def _embedding_documents(self, body: EmbeddingRequest) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Token lists to embed, and for each input the (start, end) token span of each of its chunks."""
        self._check_model(body.model)
        if body.dimensions is not None and body.dimensions != self.info.embedding_size:
            raise protocol.unsupported("dimensions", f"embeddings have {self.info.embedding_size} dimensions")
        raw = body.input
        if isinstance(raw, str):
            inputs = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            inputs = [list(raw)]
        else:
            inputs = list(raw)
        if not inputs:
            raise APIError(400, "'input' is empty.", param="input", code="empty_input")
        if len(inputs) > self.settings.max_embedding_inputs:
            raise APIError(400, f"'input' holds {len(inputs)} items; at most {self.settings.max_embedding_inputs} "
                                "per request.", param="input", code="too_many_inputs")
        maximum = self.info.max_context
        chunking = body.chunking
        if chunking and not (1 <= chunking.size <= maximum and 0 <= chunking.overlap < chunking.size):
            raise APIError(400, f"'chunking.size' must be in 1..{maximum} and 'chunking.overlap' in "
                                "0..size-1.", param="chunking", code="invalid_value")
        documents, spans = [], []
        for index, item in enumerate(inputs):
            ids = self.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not isinstance(item, str):
                self._check_token_ids(ids, "input")
            if not ids:
                raise APIError(400, f"input {index} is empty.", param="input", code="empty_input")
            if chunking is None and len(ids) > maximum:
                raise APIError(400, f"input {index} has {len(ids)} tokens; this model's maximum context length is "
                                    f"{maximum} tokens. Ask for server-side chunking with 'chunking': "
                                    "{\"size\": N}.", param="input", code="context_length_exceeded")
            step = (chunking.size - chunking.overlap) if chunking else len(ids)
            size = chunking.size if chunking else len(ids)
            starts = range(0, max(1, len(ids) - size + step), step)
            pieces = [(s, min(s + size, len(ids))) for s in starts]
            spans.append(pieces)
            documents.extend(ids[s:e] for s, e in pieces)
        return documents, spans

    def _embedding_body(self, body: EmbeddingRequest, vectors: np.ndarray, spans, tokens: int) -> dict:
        data, row = [], 0
        for index, pieces in enumerate(spans):
            chunk = vectors[row: row + len(pieces)]
            row += len(pieces)
            weights = np.array([e - s for s, e in pieces], dtype=np.float64)
            if body.pooling == "max":
                pooled = chunk.max(axis=0)
            elif body.pooling == "first":
                pooled = chunk[0]
            elif body.pooling == "last":
                pooled = chunk[-1]
            else:  # mean over every token: chunk means weighted by their token counts
                pooled = (chunk * weights[:, None]).sum(axis=0) / weights.sum()
            item = {"object": "embedding", "index": index,
                    "embedding": self._encode_vector(pooled, body.normalize, body.encoding_format)}
            if body.chunking and body.chunking.return_chunks:
                item["chunks"] = [{"start": s, "end": e,
                                   "embedding": self._encode_vector(v, body.normalize, body.encoding_format)}
                                  for (s, e), v in zip(pieces, chunk)]
            data.append(item)
        return {"object": "list", "data": data, "model": self.info.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @staticmethod
    def _encode_vector(vector: np.ndarray, normalize: bool, encoding: str):
        vector = np.asarray(vector, dtype=np.float32)
        if normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        if encoding == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        return vector.tolist()


class _Completion:
    """One completion request on its way back: accumulates engine events into OpenAI chunks or a body."""

    def __init__(self, spec: OpenAISpec, uid: str, body: CompletionRequest, prompt_ids: list[int],
                 prompt_text: str, arrival: float):
        self.spec, self.uid, self.body = spec, uid, body
        self.prompt_ids, self.prompt_text, self.arrival = prompt_ids, prompt_text, arrival
        self.created = int(time.time())
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.echo_sent = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    # engine events -> state ------------------------------------------------------------------------
    def _on_prompt(self, event: dict) -> None:
        offset = 0
        for token, logprob, top in zip(event["tokens"], event["token_logprobs"], event["top_logprobs"]):
            self._add_logprob(token, logprob, top, offset)
            offset += len(token)

    def _add_logprob(self, token: str, logprob, top, offset: int) -> None:
        self.logprobs["tokens"].append(token)
        self.logprobs["token_logprobs"].append(logprob)
        self.logprobs["top_logprobs"].append(dict(top) if top else None)
        self.logprobs["text_offset"].append(offset)

    def _on_token(self, event: dict) -> dict | None:
        now = time.monotonic()
        metrics = self.spec.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.arrival)
        else:
            metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now
        offset = len(self.prompt_text) * self.body.echo + len(self.text)
        self.text += event["text"]
        self.token_ids.append(event["token"])
        if self.body.logprobs is None:
            return None
        self._add_logprob(event["token_text"], event["logprob"], event["top_logprobs"], offset)
        return {"tokens": [event["token_text"]], "token_logprobs": [event["logprob"]],
                "top_logprobs": [dict(event["top_logprobs"])], "text_offset": [offset]}

    def _on_done(self, event: dict) -> None:
        metrics = self.spec.metrics
        usage = event["usage"]
        metrics.prompt_tokens.inc(usage["prompt_tokens"])
        metrics.generation_tokens.inc(usage["completion_tokens"])
        metrics.finished.labels(finished_reason=event["finish_reason"]).inc()
        metrics.e2e.observe(time.monotonic() - self.arrival)

    def _usage(self, event: dict) -> dict:
        usage = event["usage"]
        return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}

    def _choice(self, text: str, logprobs, finish_reason, **extra) -> dict:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **extra}

    def _chunk(self, choices: list, **extra) -> str:
        body = {"id": self.uid, "object": "text_completion", "created": self.created,
                "model": self.spec.info.name, "choices": choices, **extra}
        return f"data: {_json(body)}\n\n"

    def _echo_chunk(self) -> str | None:
        """The prompt as the first chunk when echo is on (with its logprobs once the prefill has them)."""
        if not self.body.echo or self.echo_sent:
            return None
        self.echo_sent = True
        extra = {"prompt_token_ids": self.prompt_ids} if self.body.return_token_ids else {}
        logprobs = dict(self.logprobs) if self.body.logprobs is not None else None
        return self._chunk([self._choice(self.prompt_text, logprobs, None, **extra)])

    # streaming -------------------------------------------------------------------------------------
    async def stream(self, events: asyncio.Queue):
        spec, body = self.spec, self.body
        finished = False
        try:
            yield ": accepted\n\n"
            async for event in spec._events(events):
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                kind = event["type"]
                if kind == "progress":
                    yield (f": prefill {event['layers_done']}/{event['layers']} layers, "
                           f"{event['prompt_tokens']} prompt tokens\n\n")
                elif kind == "prompt":
                    self._on_prompt(event)
                    yield self._echo_chunk()
                elif kind == "token":
                    echo = self._echo_chunk()
                    if echo:
                        yield echo
                    logprobs = self._on_token(event)
                    extra = {"token_ids": [event["token"]]} if body.return_token_ids else {}
                    if body.return_token_ids and not body.echo and len(self.token_ids) == 1:
                        extra["prompt_token_ids"] = self.prompt_ids
                    yield self._chunk([self._choice(event["text"], logprobs, None, **extra)])
                elif kind == "done":
                    self._on_done(event)
                    echo = self._echo_chunk()
                    if echo:
                        yield echo
                    yield self._chunk([self._choice("", None, event["finish_reason"])])
                    if body.stream_options and body.stream_options.include_usage:
                        yield self._chunk([], usage=self._usage(event))
                elif kind == "error":
                    error = APIError(event["status"], event["message"])
                    yield f"data: {_json(error.body())}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            spec._streams.pop(self.uid, None)
            if not finished:  # the client went away: free the engine's slot now
                spec._cancel(self.uid)
                spec.metrics.finished.labels(finished_reason="cancelled").inc()
            spec._leave(len(self.prompt_ids), time.monotonic() - self.arrival)

    # one body --------------------------------------------------------------------------------------
    async def collect(self, events: asyncio.Queue, request: Request) -> Response:
        spec, body = self.spec, self.body
        watcher = asyncio.create_task(spec._watch_disconnect(request, self.uid))
        final = None
        try:
            async for event in spec._events(events):
                if event is None:
                    continue
                if event["type"] == "prompt":
                    self._on_prompt(event)
                elif event["type"] == "token":
                    self._on_token(event)
                elif event["type"] in FINAL:
                    final = event
        finally:
            watcher.cancel()
            spec._streams.pop(self.uid, None)
            spec._leave(len(self.prompt_ids), time.monotonic() - self.arrival)
        if final is None:
            spec.metrics.finished.labels(finished_reason="cancelled").inc()
            return APIError(499, "The request was cancelled.", code="cancelled").response()
        if final["type"] == "error":
            return APIError(final["status"], final["message"]).response()
        if final["timeout"]:
            return APIError(504, "The request deadline passed before the completion finished.",
                            code="timeout").response()
        self._on_done(final)
        extra = {}
        if body.return_token_ids:
            extra = {"prompt_token_ids": self.prompt_ids, "token_ids": self.token_ids}
        text = (self.prompt_text if body.echo else "") + self.text
        logprobs = self.logprobs if body.logprobs is not None else None
        return JSONResponse({"id": self.uid, "object": "text_completion", "created": self.created,
                             "model": spec.info.name, "choices": [self._choice(text, logprobs,
                                                                               final["finish_reason"], **extra)],
                             "usage": self._usage(final)})


def _json(value) -> str:
    # ASCII only: SSE splits lines at CR/LF alone, but common clients (requests' iter_lines) also split at
    # U+0085, U+2028, U+001C..1E, which json.dumps would otherwise write raw inside generated text.
    return json.dumps(value)
