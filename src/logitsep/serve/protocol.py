"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request head and JSON for its own 400s.

uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``), but a connection that
sends nothing, or a request head that never ends (a byte now and then), is held for ever: a thousand such
connections hold a thousand file descriptors. Here a request head must arrive whole within ``HEAD_TIMEOUT``
seconds of the connection (or of the previous response), or the connection is closed. The 400 uvicorn sends for
a request it cannot parse (a non-numeric ``Content-Length``, a malformed request line) is ``{"error": ...}`` as
every other error of the service.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT = 5.0  # seconds for a whole request head


class GuardedH11Protocol(H11Protocol):
    """:class:`H11Protocol` with a request-head deadline and JSON 400s."""

    head_timeout = HEAD_TIMEOUT
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection is done with): no deadline
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request's head has the same deadline
            self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"malformed HTTP request ({msg.rstrip('.')})"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-content-type-options", b"nosniff"), (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had begun: nothing more can be said on this connection
            pass
        self.transport.close()
