"""The web app's server: the Starlette application of `clip_lens.app.asgi` on uvicorn.

==========================================  =====================================================
``GET /``, ``/static/app.js|app.css``        the page
``GET /api/info``                            model, heads (with labels), properties, metrics, store size, limits
``GET /api/thumbnails?start=0&count=24``     store images as PNG data URLs (the page's image picker)
``GET /api/sae_status``                      per SAE: store-wide feature activations idle / computing (images done) / ready
``POST /api/<analysis>``                     the five analyses and the Features tab (`clip_lens.app.api`), JSON in and out
==========================================  =====================================================

Bad input and safety: bound to 127.0.0.1 by default, and while on a loopback address it answers only
requests whose ``Host`` is a loopback name (a web page cannot reach it through DNS rebinding); POSTs
must be ``application/json`` (a cross-site form cannot send that without a CORS preflight, which
is never granted); each request has a budget (`Limits`: body bytes, image
count, decoded pixels and sides, text lengths, header bytes, time to arrive, time to compute); a
malformed request gets a 4xx; ``InputError`` → 400 with its message; an analysis out of time → 504
(503 while busy or stopping); anything else → 500 with a short message, the traceback going to the
``clip_lens.app`` logger only. Every error is ``{"error": message, "status": code}``.

Starlette and uvicorn are imported when a server is made, not when ``clip_lens.app`` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from jaxtyping import UInt8

from clip_lens.app.api import Api
from clip_lens.app.guard import MAX_HEADER_BYTES, Limits
from clip_lens.collect import Store
from clip_lens.errors import InputError

if TYPE_CHECKING:
    from clip_lens import HookedCLIP
    from clip_lens.sae import SAE

logger = logging.getLogger("clip_lens.app")

BACKLOG = 1024
"""Connections the kernel queues before the server accepts them (the standard library's server: 5)."""
KEEP_ALIVE_SECONDS = 5.0
"""How long an idle keep-alive connection stays open between requests."""
GRACE_SECONDS = 2.0
"""How long a stopping server waits for open requests (running analyses stop at their next step) before
it ends them with 503; the analyses run in daemon threads, so none keeps the process alive after that."""


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM (or SIGHUP) inside `exit_on_signals`: unlike the default
    action (the process dies at once), it unwinds the stack, so ``with`` blocks and ``finally`` clauses
    run (the demo's temporary folder is removed). Its exit status is 128 + the signal number."""


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """While inside (main thread only; elsewhere nothing changes): SIGTERM and SIGHUP raise
    `Terminated`, as Ctrl-C (SIGINT) raises ``KeyboardInterrupt``. The previous handlers come back
    on leaving. uvicorn captures these signals while it serves and raises them again once it has stopped,
    so a server stopped by SIGTERM shuts down gracefully and then unwinds through this handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(128 + signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AppServer:
    """The app bound to its address, not yet serving: ``serve_forever()`` (e.g. in a thread) until
    ``shutdown()``, then ``server_close()`` (the ``socketserver`` interface, on uvicorn).

    Attributes:
        api: the [`Api`][clip_lens.app.Api] it serves.
        limits: the per-request budget.
        server_address: ``(host, port)`` it is bound to.
        loopback_only: whether it is bound to a loopback address (then only loopback ``Host`` names are answered).
    """

    def __init__(self, sock: socket.socket, api: Api, limits: Limits):
        self.socket, self.api, self.limits = sock, api, limits
        self.server_address: tuple = sock.getsockname()
        self.loopback_only = is_loopback(self.server_address[0])
        self._server: Any = None
        self._lock = threading.Lock()
        self._exit_requested = False
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def max_upload_bytes(self) -> int:
        return self.limits.max_upload_bytes

    def info(self) -> dict[str, Any]:
        """[`Api.info`][clip_lens.app.Api.info] plus the upload limit (the page checks files against it)."""
        info = self.api.info()
        info["limits"]["max_upload_bytes"] = self.limits.max_upload_bytes
        return info

    @property
    def url(self) -> str:
        """Where to open the app on this machine (the loopback address when bound to all interfaces)."""
        host, port = self.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def asgi_app(self) -> Any:
        """The ASGI application (e.g. for Starlette's ``TestClient``, or another ASGI server)."""
        from clip_lens.app.asgi import build_app

        return build_app(self.api, self.limits, self.info, self.loopback_only)

    def serve_forever(self, on_ready: Optional[Callable[[], None]] = None) -> None:
        """Serve in this thread until `shutdown` (or Ctrl-C in the main thread). uvicorn closes the
        socket when it stops, so a server serves once; make another to serve again.

        ``on_ready`` is called (from a helper thread) once uvicorn serves, which is after it has taken
        over SIGINT/SIGTERM: a signal sent by whoever reads what ``on_ready`` prints stops the server.
        A signal sent earlier could reach asyncio's own SIGINT handler, which only cancels the task."""
        import uvicorn

        from clip_lens.app.protocol import AppProtocol

        api = self.api

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                api.stop()  # SIGINT/SIGTERM: running analyses stop at their next step
                super().handle_exit(sig, frame)

        config = uvicorn.Config(
            self.asgi_app(), http=functools.partial(AppProtocol, limits=self.limits), ws="none", lifespan="off",
            loop="asyncio", log_config=None, server_header=False, proxy_headers=False,  # logging: the caller's
            backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE_SECONDS, timeout_graceful_shutdown=GRACE_SECONDS,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,  # headers still arriving; complete ones: AppProtocol
        )
        server = Server(config)
        with self._lock:
            if self._exit_requested:  # shutdown() came first
                self._exit_requested = False
                return
            self._server = server
            self._stopped.clear()
        if on_ready is not None:
            threading.Thread(target=self._when_started, args=(server, on_ready), daemon=True).start()
        try:
            asyncio.run(server.serve(sockets=[self.socket]))
        finally:
            with self._lock:
                self._server, self._exit_requested = None, False
                self._stopped.set()

    def _when_started(self, server: Any, on_ready: Callable[[], None]) -> None:
        while not server.started and not self._stopped.wait(0.01):
            pass
        if server.started:
            on_ready()

    def shutdown(self) -> None:
        """Stop `serve_forever` (from another thread) and wait until it has returned; running analyses
        stop at their next step."""
        self.api.stop()
        with self._lock:
            if self._server is None:
                self._exit_requested = True  # serve_forever() has not started yet: it will return at once
                return
            self._server.should_exit = True
        self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once; a listening port still refuses
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


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
    max_pixels: int = Limits.max_pixels,
    request_timeout: float = Limits.request_timeout,
    compute_timeout: float = Limits.compute_timeout,
) -> AppServer:
    """A server of the app, bound (not yet serving): call ``serve_forever()`` (e.g. in a thread) and ``shutdown()``.

    Args:
        model: the HookedCLIP the store was collected with.
        store: a store (or its folder) with per-head terms, e.g. from [`demo_workspace`][clip_lens.app.demo_workspace].
        labels: ``HeadLabelsResult`` of the store's heads (the head_labels analysis); None: no property search.
        host: address to bind; keep the loopback default unless every machine that can reach it is trusted.
        port: 0 picks a free port (read it from ``server.server_address`` or ``server.url``).
        max_upload_bytes: largest request body; larger ones get 413 before being read. At most four
            times this many body bytes are held at once over all requests.
        max_images: most images in one request.
        thumbnails: store rows → ``uint8 [n, H, W, 3]`` for figures and the image picker (default: the store's images).
        saes: SAEs for the Features tab, by name (e.g. ``{"resid3": load_sae(folder)}``; a list is named ``sae0``, …).
        max_pixels: most decoded pixels summed over one request's images (default 32 Mi: two 4096 × 4096
            images), checked from the image headers before decoding.
        request_timeout: seconds a request (line, headers, body) may take to arrive; slower ones get 408.
        compute_timeout: seconds an analysis may take once its request has arrived, waiting for the model
            included; it is checked between the analysis's steps, and a request past it gets 504.

    Raises:
        InputError: bad limits, a store of another model, a model without image size or preprocess, an
            SAE that does not fit the model (hook, width), an address that cannot be bound (e.g. the port is taken).
    """
    limits = Limits(max_upload_bytes=max_upload_bytes, max_images=max_images, max_pixels=max_pixels,
                    request_timeout=request_timeout, compute_timeout=compute_timeout, pending_bytes=4 * max_upload_bytes
                    if isinstance(max_upload_bytes, int) else Limits.pending_bytes)
    store = store if isinstance(store, Store) else Store.open(store)
    api = Api(model, store, labels, thumbnails, max_images, saes, max_pixels=max_pixels, compute_timeout=compute_timeout)
    try:
        sock = _bind(host, port)
    except OSError as exc:  # port taken, address not on this machine, …
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port or host.") from exc
    return AppServer(sock, api, limits)


def serve(model: "HookedCLIP", store: Union[Store, str, Path], labels: Any = None, *, port: int = 8765, **options: Any) -> None:
    """Serve the app until Ctrl-C, SIGTERM or SIGHUP, printing its URL (``options``: ``host``, ``max_upload_bytes``,
    ``max_images``, ``thumbnails``, ``saes``, ``max_pixels``, ``request_timeout``, ``compute_timeout`` of
    [`make_server`][clip_lens.app.make_server]).

    Each of those signals stops the server gracefully (running analyses stop at their next step, open
    requests get `GRACE_SECONDS` to finish, the socket is closed) and returns normally, so the caller's
    ``with`` blocks clean up (``clip-lens app``'s temporary demo folder); an analysis that is still
    running then runs in a daemon thread, which does not keep the process alive."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = make_server(model, store, labels, port=port, **options)
    if not server.loopback_only:
        logger.warning("serving on %s, which other machines can reach: anyone who can connect can run the model "
                       "and see the store's images", server.server_address[0])
    try:
        with exit_on_signals():  # before the URL is printed: whoever reads it may signal at once
            server.serve_forever(on_ready=lambda: print(f"clip-lens app: {server.url}  (Ctrl-C to stop)", flush=True))
    except (KeyboardInterrupt, Terminated):
        print("clip-lens app: stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()
