"""How the HTTP processes and the engine worker talk: the one module that knows LitServe's queue layout (the
worker's few helpers first, then the HTTP process's `EngineClient`).

Requests go into LitServe's request queue as `(response_queue_id, uid, time, message)`; the worker sends the
outputs of each engine iteration back as one message per HTTP process under the response-buffer key
`ENGINE_UID`, which a dispatcher task fans out to the open `RequestStream`s.

Every stream ends with exactly one terminal output, from the engine or decided here: the request's deadline
passed with no word from the engine, the engine died (no heartbeat, or a new worker since the request was
sent), or the server is stopping. Closing a stream the engine has not finished cancels it in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem

from model.messages import (TERMINAL, Cancel, EmbedRequest, EngineInput, EngineOutput, ErrorCode, Failed,
                            GenerateRequest)

from .lifecycle import SharedState

log = logging.getLogger(__name__)

ENGINE_UID = "__engine__"  # the response-buffer key under which each HTTP process receives engine outputs
WATCH_SECONDS = 0.25  # how often streams are checked against the engine's heartbeat and the phase
DEADLINE_GRACE = 5.0  # seconds past a deadline before the stream stops waiting for the engine to say so


# ---- the worker's side of the layout ------------------------------------------------------------------------
def is_shutdown_sentinel(item: tuple) -> bool:
    """LitServe puts this into the request queue when it shuts down."""
    return item == (None, None, None, None)


def message_of(item: tuple) -> EngineInput:
    return item[3]


def outputs_by_route(outputs: list[tuple[int, EngineOutput]], worker_id: int) -> list[tuple[int, tuple]]:
    """One iteration's outputs as one transport message per HTTP process (not one per token)."""
    by_route: dict[int, list] = defaultdict(list)
    for route, output in outputs:
        by_route[route].append(output)
    return [(route, (ENGINE_UID, (batch, LitAPIStatus.OK, LoopResponseType.STREAMING, worker_id)))
            for route, batch in by_route.items()]


# ---- the HTTP process's side -----------------------------------------------------------------------------------
class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt), in order. It ends when each has
    had its terminal output, or at once with a terminal output decided in this process."""

    def __init__(self, uid: str, parts: list[str], deadline: float, engine_pid: int):
        self.uid = uid  # the HTTP request's id
        self.deadline = deadline
        self.engine_pid = engine_pid  # the worker that has them: a restarted worker does not
        self.unanswered = set(parts)  # its engine requests without a terminal output yet (cancelled if closed early)
        self.ended = False
        self._queue: asyncio.Queue[tuple[EngineOutput, bool]] = asyncio.Queue()

    def deliver(self, output: EngineOutput) -> None:
        """From the engine."""
        if not self.ended:
            if isinstance(output, TERMINAL):
                self.unanswered.discard(output.uid)
            self._queue.put_nowait((output, False))

    def end(self, output: EngineOutput) -> None:
        """A terminal output decided in this process; the engine may still hold the requests."""
        if not self.ended:
            self._queue.put_nowait((output, True))
            self.ended = True

    async def outputs(self, tick: float | None = None) -> AsyncIterator[EngineOutput | None]:
        """Outputs up to the last terminal one; None after each `tick` seconds of silence."""
        while self.unanswered or not self._queue.empty():  # terminal outputs may still wait in the queue
            late = self.deadline + DEADLINE_GRACE - time.monotonic()
            try:
                output, local = await asyncio.wait_for(self._queue.get(), timeout=max(0.0, min(tick or math.inf, late)))
            except TimeoutError:
                if time.monotonic() < self.deadline + DEADLINE_GRACE:
                    yield None
                    continue
                output, local = Failed(self.uid, 504, "The request deadline passed.", ErrorCode.TIMEOUT), True
            yield output
            if local:
                self.ended = True
                return
        self.ended = True


class EngineClient:
    def __init__(self, spec, shared: SharedState):
        self._spec = spec  # LitServe gives it the request queue, this process's queue id and response buffer
        self.shared = shared
        self._streams: dict[str, RequestStream] = {}
        self._tasks: list[asyncio.Task] = []

    @property
    def route(self) -> int:
        """Which HTTP process this is, for the engine to send outputs back to."""
        return self._spec.response_queue_id

    def alive(self) -> bool:
        return self.shared.engine_alive()

    @contextmanager
    def open(self, uid: str, messages: list[GenerateRequest | EmbedRequest]) -> Iterator[RequestStream]:
        """Send an HTTP request's engine requests; the stream is registered first, so no output can be
        missed. Leaving the block before the engine finished them (client gone, an error, one prompt of
        several failed) cancels what is left in the engine."""
        self._start()
        timeout = max(m.timeout if m.timeout is not None else math.inf for m in messages)
        stream = RequestStream(uid, [m.uid for m in messages], time.monotonic() + timeout, self.shared.engine_pid)
        for message in messages:
            self._streams[message.uid] = stream
        try:
            for message in messages:
                self._put(message.uid, message)
            yield stream
        finally:
            for message in messages:
                del self._streams[message.uid]
            for part in stream.unanswered:
                self._cancel(part)

    def _put(self, uid: str, message) -> None:
        # Synchronous on purpose: a request and its cancellation reach the engine in order.
        self._spec.request_queue.put((self._spec.response_queue_id, uid, time.monotonic(), message))

    def _cancel(self, uid: str) -> None:
        try:
            self._put(uid, Cancel(uid))
        except Exception:  # noqa: BLE001 - the queues are gone at the very end of a shutdown
            log.debug("could not send the cancellation of %s", uid)

    # ---- this process's background tasks ------------------------------------------------------------------
    def _start(self) -> None:
        if self._tasks and not any(task.done() for task in self._tasks):
            return
        for task in self._tasks:
            task.cancel()
        item = ResponseBufferItem(event=asyncio.Event(), response_queue=deque())
        self._spec.response_buffer[ENGINE_UID] = item
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._dispatch(item)), loop.create_task(self._watch())]

    async def _dispatch(self, item: ResponseBufferItem) -> None:
        """Fan engine messages (one per engine iteration) out to the requests they are for."""
        while True:
            await item.event.wait()
            item.event.clear()
            while item.response_queue:
                batch, _ = item.response_queue.popleft()
                for output in batch:
                    stream = self._streams.get(output.uid)
                    if stream is not None:
                        stream.deliver(output)

    async def _watch(self) -> None:
        """End streams the engine can no longer answer: it died, or the server is stopping."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            if not self._streams:
                continue
            if self.shared.stopping:
                self._end_all(503, "The server is shutting down.", ErrorCode.SHUTTING_DOWN)
            elif not self.alive():
                self._end_all(503, "The inference engine stopped; the server is restarting it. Retry shortly.",
                              ErrorCode.ENGINE_DIED)
            else:
                pid = self.shared.engine_pid
                self._end_all(503, "The inference engine was restarted and lost this request. Retry it.",
                              ErrorCode.ENGINE_DIED, only=lambda stream: stream.engine_pid != pid)

    def _end_all(self, status: int, message: str, code: ErrorCode, only=lambda stream: True) -> None:
        for stream in set(self._streams.values()):
            if only(stream) and not stream.ended:
                stream.end(Failed(stream.uid, status, message, code))
