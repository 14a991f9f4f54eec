"""The app's HTTP layer: a Starlette application over [`Api`][clip_lens.app.Api].

Routing, the JSON body (size, type, strict parse), the answer and every error as
``{"error": message, "status": code}``; the analyses themselves run in daemon threads (`DaemonThreads`),
one [`Api`][clip_lens.app.Api] method per endpoint, and an analysis out of time (`OverBudget`) answers
504, or 503 with ``Retry-After``. `Guard`, outside the router, refuses foreign ``Host`` names and ports,
HTTP versions other than 1.0/1.1, over-long URLs and header blocks, adds the security headers to every
answer and turns anything that still escapes into a JSON 500 (never a traceback to the client, never a
dropped connection).

Imported only when a server is made (Starlette is not needed to start ``clip-lens``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from importlib import resources
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_lens.app.api import Api
from clip_lens.app.guard import (
    MAX_HEADER_BYTES, MAX_URL_BYTES, SECURITY_HEADERS, SERVER_NAME, ByteBudget, Limits, OverBudget, error_json, parse_json,
)
from clip_lens.errors import ClipLensError, InputError

logger = logging.getLogger("clip_lens.app")

STATIC = {"/": ("index.html", "text/html"), "/static/app.js": ("app.js", "text/javascript"),
          "/static/app.css": ("app.css", "text/css")}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
GET_ENDPOINTS = ("info", "thumbnails", "sae_status")
INTERNAL_ERROR = "internal error in the analysis; see the server log"
WORKERS = 40
"""Most analyses computing at once (as many as Starlette's thread pool ran); the others wait their turn."""
RETRY_AFTER = "2"
"""Seconds a 503 answer asks the client to wait before trying again."""


class DaemonThreads:
    """Runs blocking calls (the analyses) in daemon threads, at most ``size`` at once.

    Starlette's thread pool has no daemon threads: an analysis still running when the server stopped
    kept the process alive until it returned (13 minutes for a 1 MB title). A daemon thread ends with
    the process; the analyses write nothing, so nothing is left half done."""

    def __init__(self, size: int = WORKERS):
        self.slots = asyncio.Semaphore(size)

    async def run(self, function: Callable[[], Any]) -> Any:
        async with self.slots:
            loop = asyncio.get_running_loop()
            future = loop.create_future()

            def work() -> None:
                try:
                    outcome = (function(), None)
                except BaseException as exc:  # handed to the awaiting task, which raises it
                    outcome = (None, exc)
                try:
                    loop.call_soon_threadsafe(_settle, future, *outcome)
                except RuntimeError:  # the loop has closed (the server stopped): nobody waits for the answer
                    pass

            threading.Thread(target=work, name="clip-lens analysis", daemon=True).start()
            return await future


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def json_response(status: int, body: bytes, close: bool = False) -> Response:
    return Response(body, status, headers={"Connection": "close"} if close else None, media_type="application/json")


def json_error(request: Optional[Request], status: int, message: str, close: bool = False) -> Response:
    """An error answer; ``close`` for refusals made before the body was read (the connection cannot be reused)."""
    if request is not None:
        logger.info("%s %s → %d: %s", request.method, request.url.path, status, message)
    return json_response(status, error_json(status, message), close)


def build_app(api: Api, limits: Limits, info: Callable[[], dict], loopback_only: bool) -> ASGIApp:
    """The ASGI application of one server: `Guard` around a Starlette router."""
    budget = ByteBudget(limits.pending_bytes)
    threads = DaemonThreads()
    files = resources.files("clip_lens.app").joinpath("static")
    pages = {path: (files.joinpath(name).read_bytes(), f"{kind}; charset=utf-8") for path, (name, kind) in STATIC.items()}

    async def page(request: Request) -> Response:
        body, kind = pages[request.url.path]
        return Response(body, media_type=kind)

    async def endpoint(request: Request) -> Response:
        name = request.path_params["name"]
        if request.method in ("GET", "HEAD"):
            if name == "info":
                return await answer(request, info)
            if name == "thumbnails":
                query = request.url.query
                return await answer(request, lambda: api.thumbnails(*_query_ints(query, start=0, count=24)))
            if name == "sae_status":
                return await answer(request, api.sae_status)
            if name in Api.ENDPOINTS:
                return json_error(request, 405, f"POST to /api/{name} with a JSON body")
        elif name in Api.ENDPOINTS:
            return await post(request, getattr(api, name))
        elif name in GET_ENDPOINTS:
            return json_error(request, 405, f"GET /api/{name}; it takes no body", close=True)
        return json_error(request, 404, f"no endpoint {request.url.path}; GET /api/{{{','.join(GET_ENDPOINTS)}}} or "
                          f"POST to /api/{{{','.join(Api.ENDPOINTS)}}}", close=request.method == "POST")

    async def post(request: Request, method: Callable[[Any], dict]) -> Response:
        """Check size and type from the headers, reserve the bytes, read the body (cut off past the limit), answer."""
        headers, limit = request.headers, limits.max_upload_bytes
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length: Optional[int] = None
        if not chunked:
            if "content-length" not in headers:
                return json_error(request, 411, "send the JSON body with a Content-Length", close=True)
            length = int(headers["content-length"])  # h11 has checked that it is a number
        if (length or 0) > limit:
            return json_error(request, 413, f"request body of {length:,} bytes is over the limit of {limit:,} bytes "
                              f"({limit / 2**20:.1f} MiB); send smaller or fewer images", close=True)
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return json_error(request, 415, "send the body as Content-Type: application/json", close=True)
        reserved = length if length is not None else limit
        if not await budget.acquire(reserved, limits.request_timeout):
            response = json_error(request, 503, f"the server is busy reading other uploads ({limits.pending_bytes:,} "
                                  "bytes at most at once); try again", close=True)
            response.headers["Retry-After"] = RETRY_AFTER
            return response
        try:
            raw = bytearray()
            try:
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limit:
                        return json_error(request, 413, f"the request body is over the limit of {limit:,} bytes "
                                          f"({limit / 2**20:.1f} MiB); send smaller or fewer images", close=True)
            except ClientDisconnect:  # gone, or timed out (the protocol has answered 408): nobody reads this
                return json_response(400, error_json(400, "the client disconnected"), close=True)

            def compute() -> dict:
                body = parse_json(raw)
                raw.clear()  # the parsed copy is enough
                return method(body)

            return await answer(request, compute)
        finally:
            budget.release(reserved)

    async def answer(request: Request, compute: Callable[[], dict]) -> Response:
        status, body = await threads.run(lambda: _json_answer(request.method, request.url.path, compute))
        if status != 200:
            logger.info("%s %s → %d: %s", request.method, request.url.path, status, json.loads(body)["error"])
        response = json_response(status, body, close=status >= 500)
        if status == 503:
            response.headers["Retry-After"] = RETRY_AFTER
        return response

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return json_error(request, 404, f"no page or endpoint {request.url.path}", close=request.method == "POST")
        if exc.status_code == 405:
            return json_error(request, 405, f"{request.method} is not allowed on {request.url.path}", close=True)
        return json_error(request, exc.status_code, exc.detail, close=True)

    routes = [Route(path, page, methods=["GET"]) for path in STATIC]
    routes.append(Route("/api/{name}", endpoint, methods=["GET", "POST"]))
    return Guard(Starlette(routes=routes, exception_handlers={HTTPException: http_error}), loopback_only)


def _json_answer(method: str, path: str, compute: Callable[[], dict]) -> tuple[int, bytes]:
    """``(status, JSON body)`` of ``compute()``: 200, 400 for the library's errors, 503/504 for an analysis
    out of time, 500 (logged) for anything else."""
    try:
        return 200, json.dumps(compute()).encode()
    except OverBudget as exc:
        return exc.status, error_json(exc.status, str(exc))
    except ClipLensError as exc:
        return 400, error_json(400, " ".join(str(exc).split()))
    except Exception:  # the client gets a short message; the traceback stays in the server's log
        logger.exception("error in %s %s", method, path)
        return 500, error_json(500, INTERNAL_ERROR)


def _query_ints(query: str, **defaults: int) -> list[int]:
    """Whole-number query parameters (``?start=0&count=24``) in the order of ``defaults``."""
    values = parse_qs(query)
    try:
        return [int(values[key][0]) if key in values else default for key, default in defaults.items()]
    except ValueError as exc:
        raise InputError(f"query parameters {', '.join(defaults)} must be whole numbers ({exc}).") from exc


class Guard:
    """ASGI middleware in front of the router: refusals that need only the request line and headers,
    the security headers on every answer, and a last-resort JSON 500.

    - ``Host`` not a loopback name, with a port other than the one served or with no valid port
      (``127.0.0.1:99999``), while the server is on a loopback address: 403 (DNS rebinding:
      evil.example → 127.0.0.1 would otherwise let a web page call the API);
    - HTTP versions other than 1.0 and 1.1 (h11 parses ``HTTP/9.9`` as a version): 400;
    - a request target over `MAX_URL_BYTES`: 414;
    - a request line and headers over `MAX_HEADER_BYTES`: 431 (the protocol refuses most such requests
      before parsing them; this catches those that were pipelined behind another request).
    """

    def __init__(self, app: ASGIApp, loopback_only: bool):
        self.app, self.loopback_only = app, loopback_only
        self.headers = [(b"server", SERVER_NAME.encode())] + [
            (key.lower().encode(), value.encode()) for key, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        refusal = self.refusal(scope)
        try:
            if refusal is not None:
                status, message = refusal
                logger.info("%s %s → %d: %s", scope["method"], scope.get("path", ""), status, message)
                await json_response(status, error_json(status, message), close=True)(scope, receive, send_secured)
            else:
                await self.app(scope, receive, send_secured)
        except asyncio.CancelledError:  # the server is stopping and its grace period is over
            if not started:
                message = "the server is shutting down; try again when it is back"
                await json_response(503, error_json(503, message), close=True)(scope, receive, send_secured)
        except Exception:  # a bug in this layer: log it, answer JSON if still possible, never pass it to uvicorn
            logger.exception("error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await json_response(500, error_json(500, INTERNAL_ERROR), close=True)(scope, receive, send_secured)

    def refusal(self, scope: Scope) -> Optional[tuple[int, str]]:
        if scope.get("http_version") not in ("1.0", "1.1"):
            return 400, f"HTTP/{scope.get('http_version')} is not supported; send HTTP/1.1 or HTTP/1.0"
        target = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        if target > MAX_URL_BYTES:
            return 414, f"the URL is {target:,} bytes long; the limit is {MAX_URL_BYTES:,}"
        head = len(scope.get("method", "")) + target + 12 + sum(len(key) + len(value) + 4 for key, value in scope["headers"])
        if head > MAX_HEADER_BYTES:
            return 431, f"the request line and headers are {head:,} bytes; the limit is {MAX_HEADER_BYTES:,} bytes (16 KiB)"
        if self.loopback_only:
            return self.host_refusal(scope)
        return None

    @staticmethod
    def host_refusal(scope: Scope) -> Optional[tuple[int, str]]:
        """A refusal of the ``Host`` header unless it is a loopback name with no port or the served port."""
        host = ""
        for key, value in scope["headers"]:
            if key == b"host":
                host = value.decode("latin-1")
        try:
            parts = urlsplit(f"//{host}")
            name, port = parts.hostname or "", parts.port
        except ValueError:  # "[::1" (an unclosed IPv6 bracket), "127.0.0.1:99999", "127.0.0.1:abc"
            return 403, (f"Host '{host[:80]}' refused: it is not a host name with an optional port of 1 to 65535; "
                         "this server answers only to localhost/127.0.0.1")
        if name not in LOOPBACK_NAMES:
            return 403, f"Host '{name[:80]}' refused: this server answers only to localhost/127.0.0.1"
        served = (scope.get("server") or (None, None))[1]
        if port is not None and served is not None and port != served:
            return 403, f"Host '{host[:80]}' refused: this server answers on port {served}, not {port}"
        return None
