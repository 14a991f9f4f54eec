"""The web app's request budget and strict JSON, shared by the ASGI app and the connection protocol.

Nothing here imports the server stack (Starlette, uvicorn): `clip_lens.app.server` imports those
only when a server is made, so that ``clip-lens`` starts without them.

Per request (`Limits`):

- **bytes**: a ``Content-Length`` over ``max_upload_bytes`` gets 413 before any of the body is read; a
  chunked body is cut off with 413 as soon as it passes the limit; all request bodies held at once
  (read or being read, until their answer is sent) share ``pending_bytes`` (`ByteBudget`);
- **images and pixels**: at most ``max_images`` images whose decoded pixels sum to at most
  ``max_pixels``, checked from the image headers before anything is decoded
  ([`Api.images`][clip_lens.app.Api.images], which also decodes one request at a time);
- **time**: the whole request (line, headers and body) must arrive within ``request_timeout`` seconds
  of its first byte, else 408 (`clip_lens.app.protocol`);
- **headers**: the request line and headers together at most `MAX_HEADER_BYTES` (431);
- **shape**: the body must be strict JSON (`parse_json`), its strings at most `MAX_TEXT` characters
  where they are texts (`clip_lens.app.api.Fields`);
- **compute**: an analysis gets ``compute_timeout`` seconds, counted from when its body has arrived;
  it checks them between its steps and, past them, stops with `OverBudget` (504; 503 while the server
  is busy or stopping), releasing the model.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Optional

from clip_lens.errors import InputError

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # everything from this server; images also as data URLs (figures, uploads); no inline script or style
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "Cache-Control": "no-store",
}
SERVER_NAME = "clip-lens-app"

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects in a request body (the app's own requests nest 3 deep)."""
MAX_JSON_DIGITS = 64
"""Longest integer literal in a request body (Python refuses to parse 4,300+ digits, and a few thousand
digits already cost quadratic time)."""
MAX_URL_BYTES = 8192
"""Longest request target (path and query)."""
MAX_HEADER_BYTES = 16 * 1024
"""Most bytes of a request line and its headers together."""
MAX_TEXT = 300
"""Longest text field of a request body (a query, a label, a head name), in characters: a figure lays
out its query text, and a 1 MB title held the model lock for 13 minutes."""


class OverBudget(Exception):
    """An analysis stopped for lack of time: over its compute budget (504), or the server busy with
    other analyses or shutting down (503). The server answers ``status`` with the message (and
    ``Retry-After`` for 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """One server's per-request budget (see the module docstring).

    Args:
        max_upload_bytes: largest request body.
        max_images: most images in one request.
        max_pixels: most decoded pixels (width × height) summed over one request's images.
        request_timeout: seconds from a request's first byte until all of it (line, headers, body) has arrived.
        pending_bytes: most request-body bytes held at once over all requests (at least ``max_upload_bytes``).
        linger: seconds to keep reading (and discarding) a body that was refused unread, so that the
            client reads the refusal instead of a connection reset.
        compute_timeout: seconds an analysis may take, from the arrival of its body (waiting for the
            model included); past them it stops at its next step with 504.
    """

    max_upload_bytes: int = 8 * 2**20
    max_images: int = 16
    max_pixels: int = 32 * 2**20
    request_timeout: float = 30.0
    pending_bytes: int = 32 * 2**20
    linger: float = 2.0
    compute_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_images", "max_pixels", "pending_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                what = "a positive number of bytes" if name.endswith("bytes") else "a positive whole number"
                raise InputError(f"{name} must be {what}, got {value!r}.")
        for name in ("request_timeout", "linger", "compute_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
                raise InputError(f"{name} must be a number of seconds above 0, got {value!r}.")
        if self.pending_bytes < self.max_upload_bytes:
            object.__setattr__(self, "pending_bytes", self.max_upload_bytes)


def error_json(status: int, message: Optional[str] = None) -> bytes:
    """The body of every error answer: ``{"error": message, "status": code}`` (ASCII JSON)."""
    return json.dumps({"error": message or HTTPStatus(status).phrase, "status": int(status)}).encode()


def raw_error_response(status: int, message: str) -> bytes:
    """A complete ``HTTP/1.1`` error answer that closes the connection, for refusals made before any
    request could be parsed (malformed request line or headers, headers too slow)."""
    body = error_json(status, message)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
               "Server": SERVER_NAME, **SECURITY_HEADERS}
    head = f"HTTP/1.1 {status} {phrase}\r\n" + "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    return head.encode("ascii") + b"\r\n" + body


class _Refused(ValueError):
    pass


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-')):,} digits is longer than the limit of {MAX_JSON_DIGITS}")
    return int(text)


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: with a repeated key, which value counts depends on
    the parser (Python keeps the last, others the first), so the request is ambiguous."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _Refused(f"the key {key[:60]!r} appears more than once in one object")
        seen.add(key)
    return dict(pairs)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, strictly: UTF-8, no ``NaN``/``Infinity``, integers of at most
    `MAX_JSON_DIGITS` digits, nesting at most `MAX_JSON_DEPTH` deep, no lone surrogates
    (``"\\ud800"``, which no UTF-8 answer can carry), no key twice in one object.

    Raises:
        InputError: what is wrong, for a 400 answer.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the body is not valid JSON: it is not UTF-8 ({exc.reason} at byte {exc.start}).") from exc
    try:
        value = json.loads(text, parse_int=_integer, parse_constant=_constant, object_pairs_hook=_object)
    except _Refused as exc:
        raise InputError(f"the body is not valid JSON for this server: {exc}.") from None
    except RecursionError:
        raise InputError(f"the body is not valid JSON for this server: it nests deeper than {MAX_JSON_DEPTH} levels.") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise InputError(f"the body is not valid JSON: {exc}") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Depth and string check without recursion (a hostile body cannot exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise InputError(f"the body is not valid JSON for this server: it nests deeper than {MAX_JSON_DEPTH} levels.")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"the body is not valid JSON for this server: a string holds a lone surrogate "
                             f"({text[exc.start]!r}), which is not a character.") from None


class ByteBudget:
    """Request-body bytes held at once, over all requests (an asyncio semaphore weighted by bytes).

    A request reserves its ``Content-Length`` (a chunked one: the upload limit) before reading its body
    and gives it back once its answer is computed; requests that do not fit wait, unread, in arrival order.
    """

    def __init__(self, total: int):
        self.total, self.free = total, total
        self._waiters: list[tuple[int, asyncio.Future]] = []

    async def acquire(self, amount: int, timeout: float) -> bool:
        """Reserve ``amount`` bytes (at most ``total``); False if they were not free within ``timeout`` seconds."""
        amount = min(amount, self.total)
        if not self._waiters and amount <= self.free:
            self.free -= amount
            return True
        entry = (amount, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), timeout)
            return True
        except asyncio.TimeoutError:
            return self._withdraw(entry)  # True: granted just as the time ran out
        except asyncio.CancelledError:
            if self._withdraw(entry):
                self.release(amount)
            raise

    def _withdraw(self, entry: tuple[int, asyncio.Future]) -> bool:
        """Leave the queue; True if the bytes had been granted meanwhile."""
        if entry[1].done():
            return True
        self._waiters.remove(entry)
        entry[1].cancel()
        self._wake()  # a large request at the head may have held back smaller ones
        return False

    def release(self, amount: int) -> None:
        self.free += min(amount, self.total)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            amount, waiter = self._waiters.pop(0)
            self.free -= amount
            waiter.set_result(None)
