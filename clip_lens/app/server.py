"""The web app's HTTP server: the standard library's ``ThreadingHTTPServer``, one static page, JSON endpoints.

==========================================  =====================================================
``GET /``, ``/static/app.js|app.css``        the page
``GET /api/info``                            model, heads (with labels), properties, metrics, store size, limits
``GET /api/thumbnails?start=0&count=24``     store images as PNG data URLs (the page's image picker)
``GET /api/sae_status``                      per SAE: store-wide feature activations idle / computing (images done) / ready
``POST /api/<analysis>``                     the five analyses and the Features tab (:mod:`clip_lens.app.api`), JSON in and out
==========================================  =====================================================

Bad input and safety: bound to 127.0.0.1 by default, and while on a loopback address it answers only
requests whose ``Host`` is a loopback name (a web page cannot reach it through DNS rebinding); POSTs
must be ``application/json`` (a cross-site form cannot send that without a CORS preflight, which
is never granted); a body over ``max_upload_bytes`` is refused with 413 from its ``Content-Length``
before any of it is read; ``InputError`` → 400 with its message; anything else → 500 with a short
message, the traceback going to the ``clip_lens.app`` logger only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import parse_qs, urlsplit

import numpy as np
from jaxtyping import UInt8

from clip_lens.app.api import Api
from clip_lens.collect import Store
from clip_lens.errors import ClipLensError, InputError

if TYPE_CHECKING:
    from clip_lens import HookedCLIP
    from clip_lens.sae import SAE

logger = logging.getLogger("clip_lens.app")

STATIC = {"/": ("index.html", "text/html"), "/static/app.js": ("app.js", "text/javascript"),
          "/static/app.css": ("app.css", "text/css")}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # everything from this server; images also as data URLs (figures, uploads)
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
}
LINGER_SECONDS = 2.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AppServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` holding the app's :class:`~clip_lens.app.api.Api` and limits."""

    daemon_threads = True  # a hung client never keeps the process alive

    def __init__(self, address: tuple[str, int], api: Api, max_upload_bytes: int):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.api, self.max_upload_bytes = api, max_upload_bytes
        self.loopback_only = is_loopback(address[0])

    def info(self) -> dict[str, Any]:
        """:meth:`Api.info <clip_lens.app.api.Api.info>` plus the upload limit (the page checks files against it)."""
        info = self.api.info()
        info["limits"]["max_upload_bytes"] = self.max_upload_bytes
        return info

    @property
    def url(self) -> str:
        """Where to open the app on this machine (the loopback address when bound to all interfaces)."""
        host, port = self.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the page and to :class:`~clip_lens.app.api.Api`; every error is JSON.

    ``protocol_version`` stays HTTP/1.0: one request per connection, so a body left unread after an
    early refusal can never be parsed as the next request.
    """

    server: AppServer
    server_version = "clip-lens-app"
    timeout = 60  # seconds a client may stall mid-request before its thread is freed

    # --- routing ------------------------------------------------------------------------
    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        url = urlsplit(self.path)
        if url.path in STATIC:
            name, kind = STATIC[url.path]
            body = resources.files("clip_lens.app").joinpath("static", name).read_bytes()
            self._send(HTTPStatus.OK, body, f"{kind}; charset=utf-8")
        elif url.path == "/api/info":
            self._answer(self.server.info)
        elif url.path == "/api/thumbnails":
            self._answer(lambda: self.server.api.thumbnails(*_query_ints(url.query, start=0, count=24)))
        elif url.path == "/api/sae_status":
            self._answer(self.server.api.sae_status)
        else:
            self.send_error(HTTPStatus.NOT_FOUND, f"no page or endpoint {url.path}")

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        name = urlsplit(self.path).path.removeprefix("/api/")
        if name not in Api.ENDPOINTS:
            self.send_error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}; POST to /api/{{{','.join(Api.ENDPOINTS)}}}")
            return
        body = self._read_body()
        if body is not None:
            self._answer(lambda: getattr(self.server.api, name)(body))

    # --- requests -----------------------------------------------------------------------
    def _host_allowed(self) -> bool:
        """Refuse other ``Host`` names on a loopback server (DNS rebinding: evil.example → 127.0.0.1)."""
        if not self.server.loopback_only:
            return True
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        if host in LOOPBACK_NAMES:
            return True
        self.send_error(HTTPStatus.FORBIDDEN, f"Host '{host}' refused: this server answers only to localhost/127.0.0.1")
        return False

    def _read_body(self) -> Optional[Any]:
        """The JSON body, or None after an error answer. Size and type are checked before reading."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            self.send_error(HTTPStatus.LENGTH_REQUIRED, "send the JSON body with a Content-Length")
            return None
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            self.send_error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {self.headers['Content-Length']!r}")
            return None
        if length > self.server.max_upload_bytes:
            limit = self.server.max_upload_bytes
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"request body of {length:,} bytes is over the limit of {limit:,} bytes "
                            f"({limit / 2**20:.1f} MiB); send smaller or fewer images")
            self._linger()
            return None
        if self.headers.get_content_type() != "application/json":
            self.send_error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as Content-Type: application/json")
            return None
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, "the request body did not arrive in time")
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.send_error(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}")
            return None

    def _linger(self) -> None:
        """After refusing a body unread: stop sending, then discard what the client still sends for a
        moment (bounded in time, never stored), so that it reads the refusal instead of a connection reset."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    # --- responses ----------------------------------------------------------------------
    def _answer(self, compute: Callable[[], dict]) -> None:
        try:
            result = compute()
        except ClipLensError as exc:
            self.send_error(HTTPStatus.BAD_REQUEST, " ".join(str(exc).split()))
            return
        except Exception:  # the client gets a short message; the traceback stays in the server's log
            logger.exception("error in %s %s", self.command, self.path)
            self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error in the analysis; see the server log")
            return
        self._send(HTTPStatus.OK, json.dumps(result).encode(), "application/json")

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Every error as JSON ``{"error": message, "status": code}`` (also http.server's own, e.g. 501)."""
        status = HTTPStatus(code)
        if code >= 400:
            logger.info("%s %s → %d: %s", self.command, self.path, code, message)
        body = json.dumps({"error": message or status.phrase, "status": int(code)}).encode()
        self._send(status, body, "application/json", close=code >= 500 or code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.info("%s %s", self.address_string(), format % args)


def _query_ints(query: str, **defaults: int) -> list[int]:
    """Whole-number query parameters (``?start=0&count=24``) in the order of ``defaults``."""
    values = parse_qs(query)
    try:
        return [int(values[key][0]) if key in values else default for key, default in defaults.items()]
    except ValueError as exc:
        raise InputError(f"query parameters {', '.join(defaults)} must be whole numbers ({exc}).") from exc


def make_server(
    model: "HookedCLIP",
    store: Union[Store, str, Path],
    labels: Any = None,
    host: str = "127.0.0.1",
    port: int = 0,
    max_upload_bytes: int = 8 * 2**20,
    max_images: int = 16,
    thumbnails: Optional[Callable[[Sequence[int]], UInt8[np.ndarray, "n H W 3"]]] = None,
    saes: Union[Mapping[str, "SAE"], Sequence["SAE"], None] = None,
) -> AppServer:
    """A server of the app, bound (not yet serving): call ``serve_forever()`` (e.g. in a thread) and ``shutdown()``.

    Args:
        model: the HookedCLIP the store was collected with.
        store: a store (or its folder) with per-head terms, e.g. from :func:`~clip_lens.app.demo_workspace`.
        labels: ``HeadLabelsResult`` of the store's heads (the head_labels analysis); None: no property search.
        host: address to bind; keep the loopback default unless every machine that can reach it is trusted.
        port: 0 picks a free port (read it from ``server.server_address`` or ``server.url``).
        max_upload_bytes: largest request body; larger ones get 413 before being read.
        max_images: most images in one request.
        thumbnails: store rows → ``uint8 [n, H, W, 3]`` for figures and the image picker (default: the store's images).
        saes: SAEs for the Features tab, by name (e.g. ``{"resid3": load_sae(folder)}``; a list is named ``sae0``, …).

    Raises:
        InputError: bad limits, a store of another model, a model without image size or preprocess, an
            SAE that does not fit the model (hook, width), an address that cannot be bound (e.g. the port is taken).
    """
    if isinstance(max_upload_bytes, bool) or not isinstance(max_upload_bytes, int) or max_upload_bytes < 1:
        raise InputError(f"max_upload_bytes must be a positive number of bytes, got {max_upload_bytes!r}.")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise InputError(f"max_images must be a positive whole number, got {max_images!r}.")
    store = store if isinstance(store, Store) else Store.open(store)
    api = Api(model, store, labels, thumbnails, max_images, saes)
    try:
        return AppServer((host, port), api, max_upload_bytes)
    except OSError as exc:  # port taken, address not on this machine, …
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port or host.") from exc


def serve(model: "HookedCLIP", store: Union[Store, str, Path], labels: Any = None, *, port: int = 8765, **options: Any) -> None:
    """Serve the app until Ctrl-C, printing its URL (``options``: ``host``, ``max_upload_bytes``,
    ``max_images``, ``thumbnails``, ``saes`` of :func:`make_server`)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = make_server(model, store, labels, port=port, **options)
    if not server.loopback_only:
        logger.warning("serving on %s, which other machines can reach: anyone who can connect can run the model "
                       "and see the store's images", server.server_address[0])
    print(f"clip-lens app: {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
