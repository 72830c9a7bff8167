"""Connection-level limits for a server that may face clients directly, with no proxy in front.

uvicorn's h11 protocol, with:
- a cap on request headers (`--max-header-bytes`; h11 answers 400 and closes beyond it), where the
  httptools parser would read a 60 MB header whole before anything could refuse it;
- a deadline for a request's headers (`--header-timeout`), counted from the connection or from its first
  byte after the previous response: a client that opens connections and never finishes a request
  (slowloris) has them closed instead of holding them for good;
- a cap on open connections (`--max-connections`): one more is closed at once.
The body has its own deadline, checked where it is read (`OpenAISpec.read_body`).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def guarded_protocol(*, header_timeout: float, max_connections: int) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("%d connections open, more than --max-connections %d: closing a new one",
                            len(self.connections), max_connections)
                transport.close()
                return
            self._expect_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still reading a request's headers
                self._expect_headers()
            else:
                self._headers_arrived()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timeout for the idle connection
            self._headers_arrived()

        def connection_lost(self, exc) -> None:
            self._headers_arrived()
            super().connection_lost(exc)

        def _expect_headers(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _headers_arrived(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request headers in %.0f s", header_timeout)
                self.transport.close()

    return GuardedH11Protocol
