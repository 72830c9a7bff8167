"""POST /v1/embeddings: inputs (strings or token ids) cut into documents (chunks when asked), embedded by the
engine in packed batches, pooled back into one vector per input."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

import numpy as np
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from model.messages import EmbedRequest, Embeddings, Failed, Finished, FinishReason

from . import protocol
from .protocol import APIError, EmbeddingRequest

# Per input, its chunks as (begin, start, end): each computes tokens begin..end and pools start..end; the
# pooled spans tile the input, and begin..start is the overlap a chunk attends to as context.
Chunks = list[list[tuple[int, int, int]]]


class EmbeddingsRoute:
    def __init__(self, spec):
        self.spec = spec

    async def handle(self, request: Request) -> Response:
        spec = self.spec
        arrival = time.monotonic()
        try:
            body, timeout = await spec.accept(request, EmbeddingRequest)
            chunks, documents = await asyncio.to_thread(self._documents, body)  # encoding: off the event loop
            computed = sum(map(len, documents))  # overlapping chunks compute some tokens more than once
            tokens = sum(pieces[-1][2] for pieces in chunks)  # the inputs' tokens: what usage reports
            contexts = tuple(start - begin for pieces in chunks for begin, start, _ in pieces)
            message = EmbedRequest(uid=f"embd-{uuid.uuid4().hex}", documents=tuple(map(tuple, documents)),
                                   pooling=body.pooling, contexts=contexts if any(contexts) else None,
                                   timeout=timeout, route=spec.engine.route)
            with spec.admission.admit(computed, "input"), spec.engine.open(message.uid, [message]) as stream:
                abandoned = Finished(message.uid, FinishReason.ABORT, computed, 0)
                async with spec.watch_disconnect(request, stream, abandoned):
                    result = [output async for output in stream.outputs()][-1]
        except APIError as error:
            return spec.refuse(error)
        if isinstance(result, Failed):
            spec.metrics.failed.labels(code=result.code.value).inc()
            return APIError.from_failure(result).response()
        if not isinstance(result, Embeddings):  # the client is gone; nobody reads this
            spec.metrics.finished.labels(finished_reason=FinishReason.ABORT.value).inc()
            return APIError(499, "The request was cancelled.", code="cancelled").response()
        spec.metrics.finished.labels(finished_reason=FinishReason.STOP.value).inc()
        spec.metrics.prompt_tokens.inc(tokens)
        spec.metrics.e2e.observe(time.monotonic() - arrival)
        # Thousands of vectors make megabytes of JSON (a second's work): off the event loop, where streams wait
        return await asyncio.to_thread(self._response, body, result.vectors, chunks, tokens)

    def _documents(self, body: EmbeddingRequest) -> tuple[Chunks, list[list[int]]]:
        """For each input its chunks, and the token lists to embed (one per chunk)."""
        spec = self.spec
        if body.dimensions is not None and body.dimensions != spec.info.embedding_size:
            raise protocol.unsupported("dimensions", f"embeddings have {spec.info.embedding_size} dimensions")
        if body.pooling == "first" and spec.info.causal:
            raise APIError(400, "'pooling': 'first' cannot describe an input with this causal model: its first "
                                "position sees the first token only. Use 'mean' or 'last'.", param="pooling",
                           code="invalid_value")
        raw = body.input
        if isinstance(raw, str):
            inputs = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            inputs = [list(raw)]
        else:
            inputs = list(raw)
        if not inputs:
            raise APIError(400, "'input' is empty.", param="input", code="empty_input")
        limit = spec.settings.max_embedding_inputs
        if len(inputs) > limit:
            raise APIError(400, f"'input' holds {len(inputs)} items; at most {limit} per request.", param="input",
                           code="too_many_inputs")
        maximum = spec.info.max_context
        chunking = body.chunking
        if chunking and not (1 <= chunking.size <= maximum and 0 <= chunking.overlap < chunking.size):
            raise APIError(400, f"'chunking.size' must be in 1..{maximum} and 'chunking.overlap' in "
                                "0..size-1.", param="chunking", code="invalid_value")
        encoded = []
        count = computed = 0
        self._refuse_by_length(inputs, chunking is not None)
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                ids = spec.tokenizer.encode(item)
            else:
                ids = list(item)
                spec.check_token_ids(ids, "input")
            if not ids:
                raise APIError(400, f"input {index} is empty.", param="input", code="empty_input")
            if chunking is None and len(ids) > maximum:
                raise APIError(400, f"input {index} has {len(ids)} tokens; this model's maximum context length is "
                                    f"{maximum} tokens. Ask for server-side chunking with 'chunking': "
                                    "{\"size\": N}.", param="input", code="context_length_exceeded")
            chunk_count, chunk_tokens = _chunk_counts(len(ids), chunking)
            count, computed = count + chunk_count, computed + chunk_tokens
            encoded.append(ids)
        # Checked by arithmetic before a single chunk is cut: overlapping chunks multiply the tokens.
        self._check_chunk_limits(body, count, computed)
        chunks = [_chunk(len(ids), chunking) for ids in encoded]
        return chunks, [ids[begin:end] for ids, pieces in zip(encoded, chunks) for begin, _, end in pieces]

    def _refuse_by_length(self, inputs: list, chunked: bool) -> None:
        """Refuses texts whose lengths alone show they cannot be served, before the seconds that encoding
        megabytes takes; what passes is checked again on its exact token counts."""
        least = [self.spec.tokenizer.fewest_tokens(item) if isinstance(item, str) else len(item) for item in inputs]
        maximum, queue = self.spec.info.max_context, self.spec.settings.max_queued_tokens
        for index, item in enumerate(inputs):
            if isinstance(item, str) and not chunked and least[index] > maximum:
                raise protocol.text_too_long(maximum, len(item), least[index], "input",
                                             f"Ask for server-side chunking of input {index} with 'chunking': "
                                             "{\"size\": N}.")
        if sum(least) > queue:
            raise APIError(400, f"These inputs are at least {sum(least):,} tokens; this server admits at most "
                                f"{queue} tokens at once (--max-queued-tokens), so they can never be served.",
                           param="input", code="exceeds_queue_limit")

    def _check_chunk_limits(self, body: EmbeddingRequest, chunks: int, tokens: int) -> None:
        queue = self.spec.settings.max_queued_tokens
        if chunks > protocol.MAX_EMBEDDING_CHUNKS:
            raise APIError(400, f"These inputs make {chunks} chunks; at most {protocol.MAX_EMBEDDING_CHUNKS} per "
                                "request (use a larger 'chunking.size' or a smaller overlap).", param="chunking",
                           code="too_many_chunks")
        if body.chunking and body.chunking.return_chunks and chunks > protocol.MAX_RETURNED_CHUNKS:
            raise APIError(400, f"'return_chunks' would return {chunks} vectors; at most "
                                f"{protocol.MAX_RETURNED_CHUNKS} per request.", param="chunking",
                           code="too_many_chunks")
        if tokens > queue:
            raise APIError(400, f"These inputs make {tokens} tokens after chunking; this server admits at most "
                                f"{queue} tokens at once (--max-queued-tokens), so it can never be served.",
                           param="input", code="exceeds_queue_limit")

    def _response(self, body: EmbeddingRequest, vectors: np.ndarray, chunks: Chunks, tokens: int) -> JSONResponse:
        return JSONResponse(self._body(body, vectors, chunks, tokens))  # renders the JSON as it is made

    def _body(self, body: EmbeddingRequest, vectors: np.ndarray, chunks: Chunks, tokens: int) -> dict:
        data, row = [], 0
        for index, pieces in enumerate(chunks):
            chunk = vectors[row: row + len(pieces)]
            row += len(pieces)
            weights = np.array([end - start for _, start, end in pieces], dtype=np.float64)
            if body.pooling == "max":
                pooled = chunk.max(axis=0)
            elif body.pooling == "first":
                pooled = chunk[0]
            elif body.pooling == "last":
                pooled = chunk[-1]
            else:  # the mean over every token, once each: chunk means weighted by the tokens they pooled
                pooled = (chunk * weights[:, None]).sum(axis=0) / weights.sum()
            item = {"object": "embedding", "index": index,
                    "embedding": _encode_vector(pooled, body.normalize, body.encoding_format)}
            if body.chunking and body.chunking.return_chunks:
                item["chunks"] = [{"start": start, "end": end,
                                   "embedding": _encode_vector(v, body.normalize, body.encoding_format)}
                                  for (_, start, end), v in zip(pieces, chunk)]
            data.append(item)
        return {"object": "list", "data": data, "model": self.spec.info.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _chunk(length: int, chunking) -> list[tuple[int, int, int]]:
    """An input's chunks (begin, start, end): windows of `size` tokens, `overlap` apart, the last one ending
    with the input, so that every token but the first chunk's is computed with at least `overlap` tokens of
    context, and the last token with `size - 1`. A chunk pools the tokens its predecessor did not."""
    if chunking is None or length <= chunking.size:
        return [(0, 0, length)]
    size, step = chunking.size, chunking.size - chunking.overlap
    begins = [*range(0, length - size, step), length - size]
    return [(begin, 0 if i == 0 else begins[i - 1] + size, begin + size) for i, begin in enumerate(begins)]


def _chunk_counts(length: int, chunking) -> tuple[int, int]:
    """How many chunks `_chunk` makes of an input of `length` tokens, and the tokens they compute in all:
    by arithmetic, so that limits are checked before a single chunk is cut."""
    if chunking is None or length <= chunking.size:
        return 1, length
    count = -(-(length - chunking.size) // (chunking.size - chunking.overlap)) + 1
    return count, count * chunking.size


def _encode_vector(vector: np.ndarray, normalize: bool, encoding: str):
    vector = np.asarray(vector, dtype=np.float32)
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
