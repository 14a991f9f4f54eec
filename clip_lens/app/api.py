"""The five CLIP-InterpreT analyses as JSON functions: a request dict in, a response dict out.

Every user mistake raises [`InputError`][clip_lens.InputError] (the server answers 400 with its
message); the analyses come from the registry (``analyses.get``), never from a plugin import.

Request fields (``POST /api/<name>``):

=========================  =================================================================
``property_neighbors``     ``images``, ``property``, ``k`` (10), ``metric`` ("dot"), ``texts`` (concepts / subspace texts)
``topic_segmentation``     ``images``, ``text``, ``head`` ("all" or "L{l}H{h}")
``contrastive_segmentation``  ``images``, ``text_a``, ``text_b``, ``head`` ("all")
``image_neighbors``        ``images``, ``head``, ``k`` (8)
``text_neighbors``         ``text``, ``head``, ``k`` (3)
``sae_features``           ``sae``, ``order`` ("frequency"), ``text`` (search), ``start``, ``count`` (the Features tab,
                           `clip_lens.app.features`)
``sae_feature``            ``sae``, ``feature``, ``k`` (9)
``sae_image``              ``sae``, ``images``, ``k`` (8)
``neuron_image``           ``images``, ``k`` (8) (the Neurons tab, `clip_lens.app.neurons`)
``neuron_search``          ``text``, ``k`` (8)
=========================  =================================================================

``images`` is a list of 1..``max_images`` items, each a data URL (``"data:image/png;base64,…"``,
PNG/JPEG/GIF/WebP/BMP), ``{"store_row": N}`` or ``{"scene": N, "seed": S}`` (a shapes-world scene,
seed 1000 by default); the optional ``names`` (one string per image, e.g. the uploaded files' names)
titles the uploads in the figures, whose query images are otherwise titled by what they are ("store
image #3", "scene 5 (seed 1000)", "uploaded image"). Every response holds ``figure`` (a PNG data URL,
every heatmap with its colour bar) and the numbers behind it.

Budgets inside the analyses: text fields hold at most `MAX_TEXT` characters (``texts`` at most
`MAX_TEXTS` of them), every image at most `MAX_SIDE` pixels a side and `MAX_ASPECT` times longer than
wide (the preprocessing scales the short side up to the model's size), and each request gets
``compute_timeout`` seconds: the wait for the model and every step (each image decoded, the analysis,
its figure) are checked against them, and a request past them stops with `OverBudget`, releasing the
model. Text drawn in figures goes through `clip_lens.figures.plain` (never read as mathtext).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, UInt8
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from clip_lens import analyses
from clip_lens.app.guard import MAX_TEXT, OverBudget
from clip_lens.collect import Store, store_images, store_thumbnails
from clip_lens.errors import InputError, close_matches
from clip_lens.figures import figure_data_url, plain, png_data_url

if TYPE_CHECKING:
    from clip_lens import HookedCLIP
    from clip_lens.sae import SAE

MAX_K = 32
"""Most neighbours per query: the figure has one thumbnail per neighbour."""
MAX_PIXELS = 4096 * 4096
"""Largest uploaded image (width × height), checked from the header before decoding (decompression bombs)."""
MAX_REQUEST_PIXELS = 32 * 2**20
"""Default of ``max_pixels``: most decoded pixels summed over one request's images (two 4096 × 4096 images)."""
MAX_SIDE = 16384
"""Longest side of an uploaded image, in pixels."""
MAX_ASPECT = 20
"""Most times an image's long side may exceed its short side: the model's preprocessing scales the short side
up to the model's size, so a 1 × 60,000 PNG of 0.4 KB would become 64 × 3,840,000 pixels (1.15 GB)."""
MAX_TEXTS = 256
"""Most texts in a ``texts`` field (each one is encoded by the model)."""
COMPUTE_SECONDS = 60.0
"""Default of ``compute_timeout``: seconds one request's analysis may take, waiting for the model included."""
MAX_NAME = 120
"""Longest query image name (``names``) shown in a figure (longer ones are shortened with an ellipsis)."""
MAX_THUMBNAILS = 64
"""Most store thumbnails per ``GET /api/thumbnails``."""
QUERY_SEED = 1000
"""Default world seed of ``{"scene": N}`` queries: held out from the bundled model's training (seed 0)."""
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
_DATA_URL = re.compile(r"data:image/[a-z.+-]+;base64,", re.IGNORECASE)


def name_neighbour_queries(fig: Any, names: Sequence[str]) -> Any:
    """Title the query column of a neighbours figure (one row per query) with the queries' names."""
    rows = [ax for ax in fig.axes if ax.get_subplotspec() is not None and ax.get_subplotspec().colspan.start == 0]
    for ax, name in zip(rows, names):
        ax.set_title(plain(name, MAX_NAME), fontsize=8)
    return fig


def name_map_rows(fig: Any, names: Sequence[str], label: str) -> Any:
    """Title the image column of a segmentation figure (one row per image, maps in [0, 1] drawn with
    ``jet``) with the images' names, and add the maps' colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    axes = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    first = [ax for ax in axes if ax.get_subplotspec().colspan.start == 0]
    for ax, name in zip(first, names):
        ax.set_title(plain(name, MAX_NAME), fontsize=8)
    bar = getattr(fig, "map_colour_bar", None) or fig.colorbar(  # the plugin's figures draw their own
        ScalarMappable(Normalize(0, 1), "jet"), ax=axes, shrink=0.9, aspect=25, pad=0.02)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return fig


def _bounded(key: str, value: str) -> str:
    """``value`` if it holds at most `MAX_TEXT` characters (a longer one is refused, naming the limit)."""
    if len(value) > MAX_TEXT:
        raise InputError(f"{key} is {len(value):,} characters long; the limit is {MAX_TEXT} characters.")
    return value


class Fields:
    """A request body's fields, checked by type and length (`MAX_TEXT`); unknown fields are refused
    (a typo is not ignored)."""

    def __init__(self, body: Any, allowed: Sequence[str]):
        if not isinstance(body, dict):
            raise InputError(f"the request body must be a JSON object with fields {', '.join(allowed)}.")
        unknown = [key for key in body if key not in allowed]
        if unknown:
            raise InputError(
                f"unknown field '{unknown[0]}'.{close_matches(unknown[0], allowed)} Fields: {', '.join(allowed)}."
            )
        self.body = body

    def text(self, key: str) -> str:
        value = self.body.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{key} must be a non-empty string, got {_shown(value)}.")
        return _bounded(key, value.strip())

    def string(self, key: str, default: Optional[str] = None) -> str:
        value = self.body.get(key, default)
        if not isinstance(value, str) or not value:
            raise InputError(f"{key} must be a string, got {_shown(value)}.")
        return _bounded(key, value)

    def texts(self, key: str = "texts") -> Optional[list[str]]:
        """An optional list of non-empty strings (None when absent or empty: the analysis's default)."""
        value = self.body.get(key)
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
            raise InputError(f"{key} must be a list of non-empty strings, got {_shown(value)}.")
        if len(value) > MAX_TEXTS:
            raise InputError(f"{key} holds {len(value):,} texts; the limit is {MAX_TEXTS}.")
        return [_bounded(f"{key}[{i}]", t.strip()) for i, t in enumerate(value)]

    def integer(self, key: str, default: Optional[int], low: int, high: int) -> int:
        """A whole number in ``low..high`` (``default`` None: the field is required)."""
        value = self.body.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InputError(f"{key} must be a whole number from {low} to {high}, got {_shown(value)}.")
        return value

    def k(self, default: int) -> int:
        value = self.body.get("k", default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
            raise InputError(f"k must be a whole number from 1 to {MAX_K}, got {_shown(value)}.")
        return value


def _shown(value: Any) -> str:
    """A field's value for an error message, cut short (a refused value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def budgeted(method: Callable[..., dict]) -> Callable[..., dict]:
    """An `Api` endpoint under the compute budget: its clock starts when it is called (the request's body
    has arrived), and `Api.model`, `Api.check_time` measure against it in this thread."""

    @functools.wraps(method)
    def run(self: "Api", *args: Any) -> dict:
        self._local.deadline = time.monotonic() + self.compute_timeout
        try:
            return method(self, *args)
        finally:
            self._local.deadline = None

    return run


class Api:
    """The app's analyses over one model, store and label table; thread-safe.

    Args:
        model: the HookedCLIP the store was collected with.
        store: a finished (or partly finished: only finished rows are searched) store with per-head terms.
        labels: ``HeadLabelsResult`` of the store's heads (None: no property search).
        thumbnails: store rows → ``uint8 [n, H, W, 3]`` (default: the store's own images, grey
            squares when it does not record them).
        max_images: most images per request.
        max_pixels: most decoded pixels (width × height) summed over one request's images, checked from
            their headers before any is decoded.
        compute_timeout: seconds one request may take from its call (waiting for the model included),
            checked between its steps; past them it stops with `OverBudget` (504).
        saes: SAEs on image-tower hooks of ``model`` for the Features tab, by name (a list: named
            ``sae0``, ``sae1``, …); each is checked against the model (`check_sae_fits`).
    """

    ENDPOINTS = ("property_neighbors", "topic_segmentation", "contrastive_segmentation", "image_neighbors", "text_neighbors",
                 "sae_features", "sae_feature", "sae_image", "neuron_image", "neuron_search")
    """The analyses, by the name of their method and of their ``POST /api/<name>`` endpoint."""

    def __init__(
        self,
        model: "HookedCLIP",
        store: Store,
        labels: Any = None,
        thumbnails: Optional[Callable[[Sequence[int]], UInt8[np.ndarray, "n H W 3"]]] = None,
        max_images: int = 16,
        saes: Union[Mapping[str, "SAE"], Sequence["SAE"], None] = None,
        max_pixels: int = MAX_REQUEST_PIXELS,
        compute_timeout: float = COMPUTE_SECONDS,
    ):
        from clip_lens.app.features import Features
        from clip_lens.app.neurons import NeuronsTab

        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise InputError(f"max_pixels must be a positive whole number, got {max_pixels!r}.")
        if isinstance(compute_timeout, bool) or not isinstance(compute_timeout, (int, float)) or not 0 < compute_timeout < 86400:
            raise InputError(f"compute_timeout must be a number of seconds above 0, got {compute_timeout!r}.")

        if model.cfg.image_size is None:
            raise InputError("the app needs a model with a fixed image size (its maps and thumbnails are drawn at it).")
        if model.preprocess is None:
            raise InputError("the app needs a model with a preprocess transform to read uploaded images.")
        store.check_model(model, model.pretrained)
        self.model, self.store, self.labels, self.max_images, self.max_pixels = model, store, labels, max_images, max_pixels
        self.image_size: tuple[int, int] = tuple(model.cfg.image_size)
        try:
            self._store_images = store_images(store, self.image_size[0])
            default_thumbnails = store_thumbnails(store, self.image_size[0])
        except InputError:  # a store collected from tensors: searchable, but its images cannot be shown
            self._store_images = None
            default_thumbnails = self._grey
        self.thumbnail_loader = thumbnails or default_thumbnails
        self.neighbors = analyses.get("neighbors")
        self.ids = store.ids()
        self.n_rows = store.n_done
        """Rows the store's reads return: its images without those skipped at decode time (`Store.skipped`)."""
        self.compute_timeout = compute_timeout
        self._local = threading.local()  # this thread's request deadline (`budgeted`)
        self._stopping = threading.Event()
        # Models are not safe for concurrent forward passes, nor is matplotlib for concurrent figures.
        self.lock = threading.Lock()
        # Uploads are decoded one request at a time: at most one request's pixels are in memory at full size.
        self.decode_lock = threading.Lock()
        self.features = Features(self, saes)
        self.neuron_tab = NeuronsTab(self)

    # --- the compute budget -------------------------------------------------------------
    def stop(self) -> None:
        """The server is shutting down: running analyses stop at their next step, new ones are refused (503)."""
        self._stopping.set()

    def check_time(self, step: str, budget: bool = True) -> None:
        """Raise `OverBudget` if the server is stopping (503) or (with ``budget``) this request is past its
        budget (504); ``step`` says how far it got, for the message."""
        if self._stopping.is_set():
            raise OverBudget(503, "the server is shutting down; try again when it is back.")
        deadline = getattr(self._local, "deadline", None)
        if budget and deadline is not None and time.monotonic() > deadline:
            raise OverBudget(504, f"the analysis took longer than its budget of {self.compute_timeout:g} s and was "
                             f"stopped {step}; send fewer or smaller images, or try again when the server is less busy.")

    @contextlib.contextmanager
    def hold(self, lock: Optional[threading.Lock] = None) -> Iterator[None]:
        """Hold ``lock`` (default: the model lock) for this request, waiting at most until its deadline
        (then `OverBudget` 503: others hold it)."""
        lock = self.lock if lock is None else lock
        self.check_time("before it started")
        deadline = getattr(self._local, "deadline", None)
        if not lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise OverBudget(503, f"the server is busy with other analyses and this one could not start within "
                             f"{self.compute_timeout:g} s; try again.")
        try:
            self.check_time("before it started")  # the server may have begun stopping while this one waited
            yield
        finally:
            lock.release()

    def _grey(self, rows: Sequence[int]) -> UInt8[np.ndarray, "n H W 3"]:
        return np.full((len(rows), *self.image_size, 3), 200, np.uint8)

    # --- GET ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the page fills its controls with."""
        cfg = self.model.cfg
        by_head = self.labels.by_head() if self.labels is not None else {}
        labelled = {h.label for h in by_head.values() if h.label is not None}
        properties = [p for p in (self.labels.properties if self.labels is not None else []) if p in labelled]
        return {
            "model": self.model.model_name, "pretrained": self.model.pretrained, "image_size": list(self.image_size),
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "heads": [
                {"key": f"L{layer}H{head}", "label": getattr(by_head.get(f"L{layer}H{head}"), "label", None),
                 "in_store": layer in self.store.head_layers}
                for layer in range(cfg.n_layers) for head in range(cfg.n_heads)
            ],
            "properties": properties + sorted(labelled - set(properties)),
            "metrics": list(getattr(self.neighbors, "metrics", ("dot",))),
            "store": {"path": str(self.store.path), "n_images": self.n_rows, "source": self.store.meta.get("source", ""),
                      "has_images": self._store_images is not None},
            "limits": {"max_images": self.max_images, "max_k": MAX_K, "max_pixels": self.max_pixels},
            "saes": self.features.info(),
            "neurons": self.neuron_tab.info(),
        }

    def sae_status(self) -> dict[str, Any]:
        """Per SAE: whether its store-wide feature activations are computed, and how far (no lock: answers while computing)."""
        return self.features.status()

    @budgeted
    def thumbnails(self, start: int, count: int) -> dict[str, Any]:
        """Data URLs of store rows ``start .. start + count`` (clipped to the store's `n_rows`), for the image picker."""
        if start < 0 or not 1 <= count <= MAX_THUMBNAILS:
            raise InputError(f"start must be ≥ 0 and count 1..{MAX_THUMBNAILS}, got start={start}, count={count}.")
        rows = list(range(start, min(start + count, self.n_rows)))
        with self.hold():
            pictures = self.thumbnail_loader(rows) if rows else []
        return {"rows": rows, "images": [png_data_url(_png(picture)) for picture in pictures]}

    # --- the five analyses --------------------------------------------------------------
    @budgeted
    def property_neighbors(self, body: Any) -> dict[str, Any]:
        """Nearest store images by the summed terms of the heads labelled with a property."""
        fields = Fields(body, ("images", "names", "property", "k", "metric", "texts"))
        prop, k, metric, texts = fields.string("property"), fields.k(10), fields.string("metric", "dot"), fields.texts()
        if self.labels is None:
            raise InputError("this server has no head labels, so there is no property search; start it with labels.")
        names = self.query_names(fields)
        pixels, shown = self.images(fields)
        with self.hold():
            result = self.neighbors(self.model).run(self.store, query_images=pixels, property=prop, labels=self.labels,
                                                    k=k, metric=metric, texts=texts)
            self.check_time("after the search, before its figure")
            figure = figure_data_url(name_neighbour_queries(result.plot(self.thumbnail_loader, shown), names))
        return {**self._neighbours(result), "figure": figure}

    @budgeted
    def topic_segmentation(self, body: Any) -> dict[str, Any]:
        """Per-patch shares of the chosen heads' contributions along a text (one map per image)."""
        fields = Fields(body, ("images", "names", "text", "head"))
        text, head, names = fields.text("text"), fields.string("head", "all"), self.query_names(fields)
        pixels, _ = self.images(fields)
        with self.hold():
            result = analyses.get("segmentation")(self.model).run(pixels, text, head=head)
            self.check_time("after the maps, before their figure")
            figure = figure_data_url(name_map_rows(result.plot(pixels, max_images=len(pixels)), names,
                                               "share of the image–text similarity (per image, min to max)"))
        return {"text": result.text, "heads": result.heads, "grid": result.grid.tolist(), "prefix": result.prefix.tolist(),
                "figure": figure}

    @budgeted
    def contrastive_segmentation(self, body: Any) -> dict[str, Any]:
        """Where the chosen heads write text A more than text B, and the reverse."""
        fields = Fields(body, ("images", "names", "text_a", "text_b", "head"))
        text_a, text_b, head = fields.text("text_a"), fields.text("text_b"), fields.string("head", "all")
        names = self.query_names(fields)
        pixels, _ = self.images(fields)
        with self.hold():
            result = analyses.get("contrastive_segmentation")(self.model).run(pixels, text_a, text_b, heads=head)
            self.check_time("after the maps, before their figure")
            figure = figure_data_url(name_map_rows(result.plot(pixels, max_images=len(pixels)), names,
                                               "A − B and B − A on one scale per image (min to max)"))
        return {"text_a": text_a, "text_b": text_b, "heads": result.heads, "a_minus_b": result.a_minus_b.tolist(),
                "b_minus_a": result.b_minus_a.tolist(), "figure": figure}

    @budgeted
    def image_neighbors(self, body: Any) -> dict[str, Any]:
        """Nearest store images by one head's term."""
        fields = Fields(body, ("images", "names", "head", "k"))
        head, k, names = fields.string("head"), fields.k(8), self.query_names(fields)
        pixels, shown = self.images(fields)
        with self.hold():
            result = self.neighbors(self.model).run(self.store, query_images=pixels, head=head, k=k)
            self.check_time("after the search, before its figure")
            figure = figure_data_url(name_neighbour_queries(result.plot(self.thumbnail_loader, shown), names))
        return {**self._neighbours(result), "figure": figure}

    @budgeted
    def text_neighbors(self, body: Any) -> dict[str, Any]:
        """Store images whose term of one head points most along a text."""
        fields = Fields(body, ("text", "head", "k"))
        text, head, k = fields.text("text"), fields.string("head"), fields.k(3)
        with self.hold():
            result = self.neighbors(self.model).run(self.store, query_texts=[text], head=head, k=k)
            self.check_time("after the search, before its figure")
            figure = figure_data_url(result.plot(self.thumbnail_loader))
        return {**self._neighbours(result), "figure": figure}

    # --- the Features tab (SAEs; clip_lens.app.features) --------------------------------------
    @budgeted
    def sae_features(self, body: Any) -> dict[str, Any]:
        """The SAE's features ranked by ``order`` (or by the cosine of their carried decoder direction with
        ``text``), with their firing frequency on the store, largest activation and text name."""
        return self.features.feature_list(Fields(body, ("sae", "order", "text", "start", "count")))

    @budgeted
    def sae_feature(self, body: Any) -> dict[str, Any]:
        """One feature: its names with scores and its top store images with their patch maps."""
        return self.features.feature(Fields(body, ("sae", "feature", "k")))

    @budgeted
    def sae_image(self, body: Any) -> dict[str, Any]:
        """The features that fire most on each query image, with their patch maps on it."""
        return self.features.image(Fields(body, ("sae", "images", "names", "k")))

    # --- the Neurons tab (second-order effects of MLP neurons; clip_lens.app.neurons) -----------
    @budgeted
    def neuron_image(self, body: Any) -> dict[str, Any]:
        """Per query image, the MLP neurons with the largest second-order effect on it: codes, patch maps."""
        return self.neuron_tab.image(Fields(body, ("images", "names", "k")))

    @budgeted
    def neuron_search(self, body: Any) -> dict[str, Any]:
        """The MLP neurons whose rank-1 direction has the largest cosine with the text's embedding."""
        return self.neuron_tab.search(Fields(body, ("text", "k")))

    def _neighbours(self, result) -> dict[str, Any]:
        """Rows, store ids and scores of each query's neighbours, best first."""
        return {
            "heads": result.heads, "metric": result.metric, "property": result.property,
            "neighbours": [
                [{"row": row, "id": self.ids[row] if self.ids else str(row), "score": score}
                 for row, score in zip(rows, scores)]
                for rows, scores in zip(result.indices.tolist(), result.scores.tolist())
            ],
        }

    # --- query images -------------------------------------------------------------------
    def images(self, fields: Fields) -> tuple[Float[Tensor, "q 3 H W"], UInt8[np.ndarray, "q H W 3"]]:
        """The request's images preprocessed for the model, and as the model sees them (for figures).

        Every image's size is read from its header and checked (`_check_size`: pixels, sides, aspect ratio),
        and the request refused if their pixels sum to more than ``max_pixels``, before any is decoded; then
        they are decoded one at a time, under ``decode_lock`` (one request at a time; the compute budget is
        checked before each), each dropped at full size once preprocessed.
        """
        items = fields.body.get("images")
        if not isinstance(items, list) or not items:
            raise InputError('images must be a non-empty list of data URLs, {"store_row": N} or {"scene": N, "seed": S}.')
        if len(items) > self.max_images:
            raise InputError(f"at most {self.max_images} images per request, got {len(items)}.")
        pictures: list[Optional[Image.Image]] = [self._image(item, i) for i, item in enumerate(items)]  # headers only
        total = sum(picture.width * picture.height for picture in pictures)
        if total > self.max_pixels:
            sizes = ", ".join(f"{p.width}×{p.height}" for p in pictures[:4]) + (", …" if len(pictures) > 4 else "")
            raise InputError(f"the request's images hold {total:,} pixels ({sizes}); the limit is {self.max_pixels:,} "
                             "pixels per request. Send fewer or smaller images.")
        pixels, shown = [], []
        with self.hold(self.decode_lock):
            for i, picture in enumerate(pictures):
                self.check_time(f"after decoding {i} of {len(pictures)} images")
                picture = _rgb(picture, f"images[{i}]")  # decodes
                pixels.append(self.model.preprocess(picture))
                # the geometry of a resize-and-centre-crop preprocess, for display
                shown.append(np.asarray(ImageOps.fit(picture, self.image_size[::-1])))
                pictures[i] = picture = None  # free the full-size image
        return torch.stack(pixels), np.stack(shown)

    def query_names(self, fields: Fields) -> list[str]:
        """What each query image is, for the figures: "store image #N", "scene N (seed S)", or an upload's
        name from ``names`` ("uploaded image" without one), each at most `MAX_TEXT` characters (drawn
        shortened to `MAX_NAME`)."""
        items = fields.body.get("images")
        items = items if isinstance(items, list) else []  # `images` refuses anything else
        given = fields.body.get("names")
        if given is not None and (not isinstance(given, list) or len(given) != len(items)
                                  or not all(isinstance(n, str) or n is None for n in given)):
            raise InputError(f"names must be a list of {len(items)} strings (one per image), got {_shown(given)}.")
        uploads = sum(isinstance(item, str) for item in items)
        names = []
        for i, item in enumerate(items):
            name = " ".join(_bounded(f"names[{i}]", given[i] or "").split()) if given is not None else ""
            if isinstance(item, dict) and "store_row" in item:
                names.append(f"store image #{item['store_row']}")
            elif isinstance(item, dict) and "scene" in item:
                names.append(name or f"scene {item['scene']} (seed {item.get('seed', QUERY_SEED)})")
            else:
                names.append(name or ("uploaded image" if uploads == 1 else f"uploaded image {i + 1}"))
        return names

    def _image(self, item: Any, i: int) -> Image.Image:
        if isinstance(item, str):
            return open_data_url(item, f"images[{i}]")
        if isinstance(item, dict) and set(item) == {"store_row"}:
            row = item["store_row"]
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.n_rows:
                raise InputError(f"images[{i}]: store_row must be a row 0..{self.n_rows - 1}, got {_shown(row)}.")
            if self._store_images is None:
                raise InputError(f"store {self.store.path} does not record its images; upload the image instead.")
            return _check_size(self._store_images([row])[0], f"images[{i}] (store image #{row})")
        if isinstance(item, dict) and "scene" in item and set(item) <= {"scene", "seed"}:
            scene, seed = item["scene"], item.get("seed", QUERY_SEED)
            if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in (scene, seed)):
                raise InputError(f"images[{i}]: scene and seed must be whole numbers in 0..2**31 - 1, got {_shown(item)}.")
            from clip_lens.loading import bundled_world
            from clip_lens.toy.world import ShapesWorld

            version, camouflage = bundled_world(self.model)  # the scenes of the world the model was trained on
            world = ShapesWorld(seed=seed, image_size=self.image_size[0], version=version or 1, camouflage=camouflage)
            return Image.fromarray(world.scene(scene).image)
        raise InputError(
            f'images[{i}] must be a data URL ("data:image/png;base64,..."), {{"store_row": N}} or {{"scene": N, "seed": S}}.'
        )


def decode_data_url(url: str, what: str = "image") -> Image.Image:
    """An RGB PIL image from a base64 data URL; refuses other formats and sizes `_check_size` refuses."""
    return _rgb(open_data_url(url, what), what)


def open_data_url(url: str, what: str = "image") -> Image.Image:
    """A PIL image of a base64 data URL with only its header read (not decoded yet: ``.convert()`` decodes);
    refuses other formats and sizes `_check_size` refuses."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InputError(f"{what} is not a base64 image data URL ('data:image/png;base64,...'), it starts {url[:30]!r}.")
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except binascii.Error as exc:
        raise InputError(f"{what}: the base64 data cannot be decoded ({exc}).") from exc
    unreadable = (OSError, ValueError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except UnidentifiedImageError as exc:
        raise InputError(f"{what} is not a {'/'.join(IMAGE_FORMATS)} image (its bytes are no known image format).") from exc
    except unreadable as exc:
        raise InputError(f"{what} is not a readable {'/'.join(IMAGE_FORMATS)} image: {exc}.") from exc
    return _check_size(image, what)


def _check_size(image: Image.Image, what: str) -> Image.Image:
    """``image`` if its size (from its header) is within the per-image budget: at most `MAX_PIXELS`
    pixels, `MAX_SIDE` a side, and a long side at most `MAX_ASPECT` times the short one (the model's
    preprocessing scales the short side up to its input size: the long side grows by the same factor)."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InputError(f"{what} is {width}×{height} pixels; the limit is {MAX_PIXELS:,} pixels.")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(
            f"{what} is {width}×{height} pixels: its long side is {max(width, height) / max(1, min(width, height)):,.0f} "
            f"times its short side, over the limit of {MAX_ASPECT} (the model's preprocessing scales the short side up "
            "to its input size, and the long side with it); crop the image.")
    if max(width, height) > MAX_SIDE:
        raise InputError(f"{what} is {width}×{height} pixels; the limit is {MAX_SIDE:,} pixels a side.")
    return image


def _rgb(image: Image.Image, what: str) -> Image.Image:
    """``image`` decoded (if it is not yet) as RGB (no copy when it already is)."""
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{what} cannot be decoded: {exc}.") from exc


def _png(picture: UInt8[np.ndarray, "H W 3"]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(picture, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
