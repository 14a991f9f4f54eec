"""The app's HTTP/1.1 connections: uvicorn's h11 protocol with three connection-level rules.

1. **Every refusal is JSON.** A request that cannot be parsed (garbage, an HTTP/0.9 line, a request
   line or headers longer than 16 KiB, a bad header) gets h11's status (400, or 431 for too long) as
   ``{"error": …, "status": …}`` with the security headers, instead of uvicorn's plain-text 400.
   h11 bounds only a header block that is still arriving; one that arrives whole (64 KiB in one
   packet) is measured here before h11 parses it (`MAX_HEADER_BYTES`, 431).
2. **A deadline per request.** The request line, headers and body must all arrive within
   ``Limits.request_timeout`` seconds of the request's first byte (the first request of a connection:
   of the connection's opening, so no idle connection is held); otherwise the answer is 408 and the
   connection is closed. uvicorn
   itself has no such deadline: a client trickling one byte every few seconds would hold the request
   open forever. The time the answer takes to compute is not limited.
3. **Lingering close.** When the server closes a connection whose client is still sending (a body refused
   unread with 413/415/403/404, a malformed or timed-out request), it first half-closes (FIN after the
   answer), then reads and discards for up to ``Limits.linger`` seconds, and only then closes. Closing at
   once with unread bytes makes the kernel send a reset, and the client may lose the answer.

Imported only when a server is made (uvicorn is not needed to start ``clip-lens``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from clip_lens.app.guard import MAX_HEADER_BYTES, Limits, raw_error_response

logger = logging.getLogger("clip_lens.app")

_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \x00-\x1f\x7f]+ HTTP/[0-9]\.[0-9]\r?")
"""``METHOD target HTTP/x.y`` (RFC 9112); h11 checks the same, but only once the whole header block is in."""
_HEAD_END = re.compile(rb"\n\r?\n")
"""The blank line that ends a header block (h11 accepts bare ``\n`` line ends too)."""


class AppProtocol(H11Protocol):
    """uvicorn's ``H11Protocol`` plus JSON refusals, a per-request deadline and a lingering close.

    uvicorn builds one per connection through ``functools.partial(AppProtocol, limits=…)``.
    """

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.lingering = False
        self._deadline: Optional[asyncio.TimerHandle] = None

    # --- connection life ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm_deadline()  # the first request must arrive in time too (no idle connection is held)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the answer is sent and the connection half-closed: discard the rest
            return
        if self.conn.their_state is h11.IDLE and self._head_too_long(data):
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._check_request_line()
        self._update_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_deadline()

    def peer_still_sending(self) -> bool:
        """Whether the client is (or may be) in the middle of sending a request."""
        state = self.conn.their_state
        return state is h11.SEND_BODY or state is h11.ERROR or (state is h11.IDLE and bool(self.conn.trailing_data[0]))

    # --- rule 1: JSON refusals of what h11 cannot parse -----------------------------------
    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn inside its ``except h11.RemoteProtocolError``: answer with h11's status hint."""
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        reason = str(error) if error is not None else msg
        logger.info("%s: malformed request → %d: %s", _peer(self.client), status, reason)
        message = (f"malformed HTTP request ({reason}); send HTTP/1.1 or HTTP/1.0 with a request line and "
                   "headers of at most 16 KiB")
        self._refuse(status, message)

    def _check_request_line(self) -> None:
        """Refuse at once a first line that is no HTTP/1.x request line (garbage, TLS, ``GET /`` of
        HTTP/0.9): h11 would wait for the end of a header block that such a client never sends."""
        pending = self.conn.trailing_data[0].lstrip(b"\r\n")
        end = pending.find(b"\n")
        if end >= 0 and not _REQUEST_LINE.fullmatch(pending[:end]):
            line = pending[:min(end, 60)].decode("ascii", "backslashreplace")
            logger.info("%s: not an HTTP/1.x request line → 400: %s", _peer(self.client), line)
            self._refuse(400, f"malformed HTTP request: the first line ({line!r}) is not 'METHOD /path HTTP/1.1'")

    def _head_too_long(self, data: bytes) -> bool:
        """Refuse (431) a request line and headers over `MAX_HEADER_BYTES` that arrived whole: h11 would
        parse them, as it bounds only a header block that is still incomplete."""
        pending = (self.conn.trailing_data[0] + data).lstrip(b"\r\n")
        end = _HEAD_END.search(pending)
        if end is None or end.end() <= MAX_HEADER_BYTES:  # fits, or still arriving (h11 bounds it)
            return False
        self.conn.receive_data(data)  # unparsed: only so that the close lingers while the client still sends
        logger.info("%s: request line and headers of %d bytes → 431", _peer(self.client), end.end())
        self._refuse(431, f"the request line and headers are {end.end():,} bytes; the limit is "
                          f"{MAX_HEADER_BYTES:,} bytes (16 KiB): send fewer or shorter headers")
        return True

    def _refuse(self, status: int, message: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(raw_error_response(status, message))
            self.transport.close()  # lingers while the client still sends

    # --- rule 2: the per-request deadline -------------------------------------------------
    def _update_deadline(self) -> None:
        """Arm the deadline when a request starts arriving; disarm it once the whole request is in."""
        if self.transport is None or self.transport.is_closing():
            self._disarm_deadline()
        elif self.peer_still_sending():
            self._arm_deadline()
        else:
            self._disarm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.request_timeout, self._deadline_passed)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        timeout = self.limits.request_timeout
        logger.info("%s: the request did not arrive within %g s → 408", _peer(self.client), timeout)
        cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        if cycle is not None:
            if cycle.response_started:  # the app answers already (it did not wait for the body): stop
                self.transport.close()
                return
            # the app is waiting for the body: it now reads a disconnect, and whatever it sends is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        elif self.conn.their_state is h11.SEND_BODY:  # answered already (a refusal); the body never finished
            self.transport.close()
            return
        self._refuse(408, f"the request did not arrive within {timeout:g} seconds of its first byte")


class _LingeringTransport:
    """A transport whose ``close()`` lingers while the client still sends (rule 3); all else is the transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: AppProtocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def close(self) -> None:
        transport, protocol = self._transport, self._protocol
        if protocol.lingering or transport.is_closing():
            return
        if not protocol.peer_still_sending() or not transport.can_write_eof():
            transport.close()
            return
        protocol.lingering = True
        try:
            transport.write_eof()  # FIN once the answer is flushed: the client reads it, then end of stream
            transport.resume_reading()
        except (OSError, RuntimeError):
            transport.close()
            return
        protocol.loop.call_later(protocol.limits.linger, transport.close)


def _peer(client: Optional[tuple[str, int]]) -> str:
    return "%s:%d" % client if client else "client"
