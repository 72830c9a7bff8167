"""Admission control in one HTTP process: how many requests and tokens are admitted and not yet finished.

A request is admitted by entering `Admission.admit(...)` and let go when that block exits, however it
exits (answered, failed, client gone, deadline, engine death, shutdown): one owner, one `finally`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .lifecycle import SharedState
from .protocol import APIError


class Admission:
    def __init__(self, *, max_requests: int, max_tokens: int, max_running: int, shared: SharedState):
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.max_running = max_running
        self.shared = shared
        self.requests = 0
        self.tokens = 0
        self._service_seconds = 1.0  # moving average of request time, for Retry-After

    @contextmanager
    def admit(self, tokens: int, param: str) -> Iterator[None]:
        """Hold a place for a request of `tokens` tokens for the duration of the block.

        400 for a request larger than the queue could ever hold (retrying cannot help), 429 with
        Retry-After while the queue is full."""
        if tokens > self.max_tokens:
            raise APIError(400, f"This request holds {tokens} tokens; this server admits at most {self.max_tokens} "
                                "tokens at once (--max-queued-tokens), so it can never be served. Send less.",
                           param=param, code="exceeds_queue_limit")
        if self.requests + 1 > self.max_requests or self.tokens + tokens > self.max_tokens:
            wait = self._service_seconds * (self.requests + 1) / max(1, self.max_running)
            retry = str(min(60, max(1, math.ceil(wait))))
            raise APIError(429, f"The server is overloaded ({self.requests} requests, {self.tokens} tokens "
                                "queued); retry later.", code="rate_limit_exceeded", headers={"Retry-After": retry})
        self.requests += 1
        self.tokens += tokens
        self.shared.add_inflight(1)
        start = time.monotonic()
        try:
            yield
        finally:
            self.requests -= 1
            self.tokens -= tokens
            self.shared.add_inflight(-1)
            self._service_seconds = 0.9 * self._service_seconds + 0.1 * (time.monotonic() - start)
