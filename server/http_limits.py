"""Connection-level limits for a server that may face clients directly, with no proxy in front.

uvicorn's h11 protocol, with:
- a cap on request headers (`--max-header-bytes`: 400 and the connection closed beyond it), counted here
  as the bytes arrive: h11's own cap only looks at headers still incomplete, so a larger block that
  arrived whole passed it (the httptools parser would read a 60 MB header whole before anything refused it);
- a deadline for a request's headers (`--header-timeout`), counted from the connection or from its first
  byte after the previous response: a client that opens connections and never finishes a request
  (slowloris) has them closed instead of holding them for good;
- a cap on open connections (`--max-connections`): one more is closed at once.
The body has its own deadline, checked where it is read (`OpenAISpec.read_body`).
"""

from __future__ import annotations

import asyncio
import logging
import re

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
HEAD_END = re.compile(rb"\r?\n\r?\n")  # h11 accepts bare newlines too
TOO_LARGE = b"Request headers too large."


def guarded_protocol(*, header_timeout: float, max_connections: int, max_header_bytes: int) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None
        _head_bytes = 0  # of the request whose headers are being read
        _head_tail = b""  # its last bytes, in case the blank line that ends the headers is split between reads

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("%d connections open, more than --max-connections %d: closing a new one",
                            len(self.connections), max_connections)
                transport.close()
                return
            self._expect_headers()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE and self._head_too_large(data):
                log.info("closing a connection whose request headers passed --max-header-bytes %d", max_header_bytes)
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(TOO_LARGE), TOO_LARGE))
                self.transport.close()
                return
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still reading a request's headers
                self._expect_headers()
            else:
                self._headers_arrived()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timeout for the idle connection
            self._headers_arrived()
            self._head_bytes, self._head_tail = 0, b""  # the next request's headers count from zero

        def _head_too_large(self, data: bytes) -> bool:
            joined = self._head_tail + data
            end = HEAD_END.search(joined)
            if end is None:
                self._head_bytes += len(data)
                self._head_tail = joined[-3:]
                return self._head_bytes > max_header_bytes
            length = self._head_bytes + end.end() - len(self._head_tail)
            self._head_bytes, self._head_tail = 0, b""  # complete: what follows is the body
            return length > max_header_bytes

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
