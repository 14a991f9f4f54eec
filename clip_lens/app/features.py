"""The app's Features tab: the features of sparse autoencoders (SAEs) on the image tower, over the store.

Per SAE, computed once on first use (under the app's model lock, which it yields to other requests
between batches; progress in ``GET /api/sae_status``, and 503 for requests of that SAE meanwhile) and
then cached:

- the store-wide dashboard, `top_activating` over every store image
  (the `TOP_K` top images of every feature, their patch maps and each feature's firing frequency);
  memory ``d_sae × TOP_K × grid_h × grid_w`` floats (e.g. 128 features × 12 × 8 × 8: 0.4 MB;
  49,152 features × 12 × 14 × 14: 460 MB);
- the features' text names, `name_features` on the builtin ``"shapes"``
  bank for the bundled ``toy-shapes`` model and the ``"general"`` bank for any other model. A hook
  whose directions the read-out cannot carry to the embedding (``attn.hook_z``, ``mlp.hook_post``,
  a tower with an attentional pooler) gets no names, and the answers say why.

Endpoints (methods of [`Api`][clip_lens.app.Api], which delegates here):

======================  ==========================================================================
``sae_features``        ``sae``, ``order`` ("frequency"), ``text`` (search), ``start`` (0), ``count`` (100)
``sae_feature``         ``sae``, ``feature``, ``k`` (9)
``sae_image``           ``sae``, ``images``, ``k`` (8)
======================  ==========================================================================
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from clip_lens.app.guard import OverBudget
from clip_lens.errors import ClipLensError, InputError, close_matches
from clip_lens.figures import figure_data_url, heat_rgba, plain
from clip_lens.toy.evaluate import shapes_world_version

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from clip_lens import HookedCLIP
    from clip_lens.app.api import Fields
    from clip_lens.sae import SAE
    from clip_lens.sae.naming import FeatureNames, TopActivations

logger = logging.getLogger("clip_lens.app")

TOP_K = 12
"""Top store images kept per feature (the most ``sae_feature`` shows)."""
MAX_LIST = 500
"""Most features per ``sae_features`` answer (page through the rest with ``start``)."""
NAMES_PER_FEATURE = 5
ORDERS = ("frequency", "rare", "activation", "index")
"""Orders of the feature list: most images first, fewest (but some) images first, largest activation
first, by index."""
NO_SAE = ("this server has no SAE. Train one, e.g. `clip-lens sae train --hook blocks.3.hook_resid_post --positions "
          "patches --d-sae 128 --shapes 2000 --out runs/sae` (see `clip-lens sae train --help`), and start the app with "
          "`clip-lens app --sae runs/sae`.")


def check_sae_fits(model: "HookedCLIP", sae: "SAE", name: str = "the SAE") -> None:
    """Refuse an SAE the Features tab cannot run on ``model``: no or unknown hook, a text-tower hook,
    activations without a ``[batch, (tokens,)] width`` layout, or a width other than ``d_in``.

    Runs the model on one blank image up to the hook and the SAE's encoder on it.

    Raises:
        InputError, HookNameError: with the SAE's ``name`` and the reason.
    """
    hook = sae.cfg.hook_name
    if not hook:
        raise InputError(f"{name} records no hook point (cfg.json metadata.hook_name); the app cannot tell what it reads.")
    if hook.startswith("text."):
        raise InputError(f"{name} reads the text tower ('{hook}'); the Features tab shows image features, so give an "
                         "SAE on an image-tower hook (e.g. blocks.3.hook_resid_post).")
    model.check_hook_name(hook)
    if model.cfg.image_size is None:
        raise InputError("the Features tab needs a model with a fixed image size.")
    probe = torch.zeros(1, 3, *model.cfg.image_size, device=model.device, dtype=model.dtype)
    act = _hook_activation(model, hook, probe)
    shape = tuple(act.shape)
    if sae.cfg.reshape_activations == "hook_z" and act.ndim == 4:
        act = act.flatten(-2)
    if act.ndim not in (2, 3):
        raise InputError(f"{name} reads '{hook}', whose activations have shape {shape}, not [batch, tokens, width] or "
                         "[batch, width]; the Features tab shows SAEs on per-token or pooled hooks.")
    if act.shape[-1] != sae.cfg.d_in:
        raise InputError(f"{name} reads width d_in={sae.cfg.d_in}, but '{hook}' of {model.model_name} has width "
                         f"{act.shape[-1]}; use an SAE trained on this model.")
    if act.ndim == 3 and model.cfg.grid_size is not None:
        gh, gw = model.cfg.grid_size
        if act.shape[1] != model.cfg.n_prefix_tokens + gh * gw:
            raise InputError(f"{name} reads '{hook}' with {act.shape[1]} tokens, not the {gh}×{gw} patches (plus "
                             f"{model.cfg.n_prefix_tokens} prefix tokens) the patch maps need.")
    if sae.device != act.device or sae.dtype != act.dtype:
        sae.to(device=act.device, dtype=act.dtype)  # run where and as the model runs
    try:
        with torch.no_grad():
            sae.encode(act)
    except ClipLensError as exc:
        raise InputError(f"{name} cannot encode '{hook}' of this model: {exc}") from exc
    except RuntimeError as exc:
        raise InputError(f"{name} cannot encode '{hook}' of this model ({exc}).") from exc


@torch.no_grad()
def _hook_activation(model: "HookedCLIP", hook: str, pixels: Tensor) -> Tensor:
    """The activation at ``hook`` (the forward pass stops after its block)."""
    kwargs: dict[str, Any] = {"return_type": None}
    if hook.startswith("blocks."):
        kwargs = {"stop_at_layer": int(hook.split(".")[1]) + 1}
    _, cache = model.run_with_cache(pixels, names_filter=hook, **kwargs)
    return cache[hook]


@dataclass
class SAEView:
    """One SAE of the app and what has been computed for it."""

    name: str
    sae: "SAE"
    state: str = "idle"
    """``"idle"`` (nothing computed yet), ``"computing"`` or ``"ready"`` (store dashboard cached)."""
    done: int = 0
    """Store images read so far while computing."""
    top: Optional["TopActivations"] = field(default=None, repr=False)
    names: Optional["FeatureNames"] = field(default=None, repr=False)
    names_note: Optional[str] = None
    """Why the features have no names, or what kind of names they are."""
    named: bool = False
    carried: Optional[Tensor] = field(default=None, repr=False)
    """Unit decoder directions carried to the embedding ``[d_sae, d_embed]`` (for the text search)."""

    def describe(self, model: "HookedCLIP") -> dict[str, Any]:
        cfg = self.sae.cfg
        return {"name": self.name, "hook_name": cfg.hook_name, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
                "architecture": cfg.architecture, "k": cfg.k, "model_name": cfg.model_name,
                "other_model": cfg.model_name not in (None, model.model_name), "state": self.state}


class Features:
    """The Features tab's computations for an [`Api`][clip_lens.app.Api] (which owns the lock,
    the store images and the request parsing)."""

    def __init__(self, api: Any, saes: Union[Mapping[str, "SAE"], Sequence["SAE"], None]):
        self.api = api
        if saes is None:
            saes = {}
        if not isinstance(saes, Mapping):
            saes = {f"sae{i}": sae for i, sae in enumerate(saes)}
        self.views: dict[str, SAEView] = {}
        for name, sae in saes.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"SAE names must be non-empty strings, got {name!r}.")
            check_sae_fits(api.model, sae, f"SAE '{name}'")
            self.views[name] = SAEView(name, sae)
        self.bank = "shapes" if shapes_world_version(api.model) is not None else "general"
        """The bank the features are named with."""

    # --- GET ----------------------------------------------------------------------------
    def info(self) -> list[dict[str, Any]]:
        return [view.describe(self.api.model) for view in self.views.values()]

    def status(self) -> dict[str, Any]:
        """Per SAE: ``state``, and ``done``/``total`` store images while computing (no lock taken)."""
        total = self.api.n_rows
        return {"saes": {name: {"state": view.state, "done": view.done, "total": total}
                         for name, view in self.views.items()}}

    # --- requests -----------------------------------------------------------------------
    def view(self, fields: "Fields") -> SAEView:
        if not self.views:
            raise InputError(NO_SAE)
        name = fields.body.get("sae", next(iter(self.views)))
        if not isinstance(name, str) or name not in self.views:
            hint = close_matches(name, list(self.views)) if isinstance(name, str) else ""
            raise InputError(f"no SAE named {name!r}.{hint} SAEs: {', '.join(self.views)}.")
        return self.views[name]

    def feature_list(self, fields: "Fields") -> dict[str, Any]:
        view = self.view(fields)
        d_sae = view.sae.cfg.d_sae
        order = fields.string("order", "frequency")
        if order not in ORDERS:
            raise InputError(f"order must be one of {', '.join(ORDERS)}, got {order!r}.{close_matches(order, ORDERS)}")
        text = fields.text("text") if "text" in fields.body else None
        start = fields.integer("start", 0, 0, d_sae - 1)
        count = fields.integer("count", 100, 1, MAX_LIST)
        with self.api.hold():
            top = self._dashboard(view)
            names = self._names(view)
            scores = self._text_scores(view, text) if text is not None else None
        frequency, strongest = top.frequency, top.values[:, 0]
        if scores is not None:
            ranked = _order(scores, strongest)
        elif order == "frequency":
            ranked = _order(frequency, strongest)
        elif order == "rare":  # fewest images first, the features that never fire last
            ascending = _order(-frequency, strongest)
            ranked = torch.cat([ascending[frequency[ascending] > 0], ascending[frequency[ascending] == 0]])
        elif order == "activation":
            ranked = _order(strongest, frequency)
        else:
            ranked = torch.arange(d_sae)
        rows = []
        for feature in ranked[start:start + count].tolist():
            row = {"feature": feature, "frequency": float(frequency[feature]), "max": float(strongest[feature]),
                   "name": None, "name_score": None}
            if names is not None:
                row["name"] = names.texts[int(names.indices[feature, 0])]
                row["name_score"] = float(names.scores[feature, 0])
            if scores is not None:
                row["score"] = float(scores[feature])
            rows.append(row)
        return {"sae": view.name, "hook_name": view.sae.cfg.hook_name, "n_images": top.n_images, "d_sae": d_sae,
                "order": "text" if text is not None else order, "text": text, "start": start, "features": rows,
                "names": self._names_info(view)}

    def feature(self, fields: "Fields") -> dict[str, Any]:
        view = self.view(fields)
        d_sae = view.sae.cfg.d_sae
        feature = fields.integer("feature", None, 0, d_sae - 1)
        k = fields.integer("k", 9, 1, TOP_K)
        with self.api.hold():
            top = self._dashboard(view)
            names = self._names(view)
            values, indices = top.values[feature, :k], top.indices[feature, :k]
            keep = [i for i in range(k) if int(indices[i]) >= 0 and float(values[i]) > 0]
            rows = [int(indices[i]) for i in keep]
            maps = top.maps[feature, keep] if top.maps is not None and _overlay(top.positions) else None
            scale = float(maps.max()) if maps is not None and len(keep) else 0.0
            title = self._title(view, feature, float(top.frequency[feature]), top.n_images)
            thumbnails = self.api.thumbnail_loader(rows) if rows else np.zeros((0, 1, 1, 3), np.uint8)
            figure = figure_data_url(feature_figure(thumbnails, maps, [float(values[i]) for i in keep], rows, title, scale))
        ids = self.api.ids
        return {
            "sae": view.name, "feature": feature, "frequency": float(top.frequency[feature]), "n_images": top.n_images,
            "names": [{"text": t, "score": s} for t, s in names.top(feature)] if names is not None else [],
            "names_info": self._names_info(view),
            "top": [{"row": row, "id": ids[row] if ids else str(row), "value": float(values[i]),
                     "map": maps[j].tolist() if maps is not None else None}
                    for j, (i, row) in enumerate(zip(keep, rows))],
            "scale": scale, "maps_note": _maps_note(top.positions, top.maps is not None), "figure": figure,
        }

    def image(self, fields: "Fields") -> dict[str, Any]:
        from clip_lens.sae.naming import image_feature_acts, top_activating

        view = self.view(fields)
        k = fields.integer("k", 8, 1, min(32, view.sae.cfg.d_sae))
        pixels, shown = self.api.images(fields)
        sae, model = view.sae, self.api.model
        queries = self.api.query_names(fields)
        with self.api.hold():
            names = self._names(view)
            acts = image_feature_acts(model, sae, pixels)  # [q, d_sae]
            answers, panels, note = [], [], None
            for q in range(len(pixels)):
                self.api.check_time(f"after the patch maps of {q} of {len(pixels)} images")
                values, order = acts[q].topk(k)
                chosen = [int(f) for f, v in zip(order, values) if v > 0]
                maps = None
                if chosen:  # the chosen features' patch maps (top_activating of this one image)
                    one = top_activating(model, sae, pixels[q:q + 1], k=1, features=chosen)
                    note = _maps_note(one.positions, one.maps is not None)
                    maps = one.maps[:, 0] if note is None else None
                answers.append([
                    {"feature": f, "value": float(acts[q, f]),
                     "name": names.texts[int(names.indices[f, 0])] if names is not None else None,
                     "map": maps[j].tolist() if maps is not None else None}
                    for j, f in enumerate(chosen)])
                panels.append((shown[q], chosen, [float(acts[q, f]) for f in chosen], maps))
            figure = figure_data_url(image_figure(panels, names, sae.cfg.hook_name, queries=queries))
        return {"sae": view.name, "images": [{"features": features} for features in answers],
                "names_info": self._names_info(view), "maps_note": note, "figure": figure}

    # --- cached computations (the caller holds the lock) -------------------------------
    def _dashboard(self, view: SAEView) -> "TopActivations":
        """Every feature's top store images (computed once, over the store's rows after skipped images).

        The caller holds the model lock; between batches it is handed to waiting requests (the store
        may be large), which get 503 while they ask for this SAE. Computed once for every request, it is
        not cut off by the asking request's budget, only by the server stopping."""
        if view.top is not None:
            return view.top
        if view.state == "computing":  # by another request, which has lent the model lock out between batches
            raise OverBudget(503, f"SAE '{view.name}': its feature activations over the store are being computed "
                             f"({view.done} of {self.api.n_rows} images); try again in a few seconds.")
        from clip_lens.collect import ImageSource
        from clip_lens.sae.naming import top_activating

        api = self.api
        if api._store_images is None:
            raise InputError(f"store {api.store.path} does not record its images, so the features' top images cannot "
                             "be found; collect the store from a folder or from shapes-world scenes.")
        n = api.n_rows

        def load(start: int, stop: int):
            if start > 0:  # let other requests use the model between batches
                api.lock.release()
                time.sleep(0.001)  # the waiting thread takes the lock
                api.lock.acquire()
            api.check_time(f"while computing SAE '{view.name}' over the store ({start} of {n} images)", budget=False)
            pixels = torch.stack([api.model.preprocess(image) for image in api._store_images(range(start, stop))])
            view.done = stop
            return pixels, None

        view.state, view.done = "computing", 0
        try:
            logger.info("SAE '%s': computing feature activations over %d store images", view.name, n)
            view.top = top_activating(api.model, view.sae, ImageSource(n, load, api.ids, f"store {api.store.path}"),
                                      k=TOP_K)
        finally:
            view.state = "ready" if view.top is not None else "idle"
        return view.top

    @torch.no_grad()
    def _names(self, view: SAEView) -> Optional["FeatureNames"]:
        """The features' names on the bank (computed once), or None with ``view.names_note`` saying why."""
        if view.named:
            return view.names
        from clip_lens.sae.naming import feature_directions_to_embedding, name_features

        try:
            view.names = name_features(self.api.model, view.sae, self.bank, top=NAMES_PER_FEATURE)
            carried = feature_directions_to_embedding(self.api.model, view.sae)
            view.carried = torch.nn.functional.normalize(carried.float(), dim=-1)
            view.names_note = (
                f"names: the '{self.bank}' texts nearest to each feature's decoder direction carried to the embedding"
                + (" (direct path only: a logit-lens approximation for a hook before the last layer)."
                   if view.names.readout == "direct" else " (exact read-out)."))
        except ClipLensError as exc:
            view.names, view.carried = None, None
            view.names_note = f"no text names for this SAE: {' '.join(str(exc).split())}"
        view.named = True
        return view.names

    def _names_info(self, view: SAEView) -> dict[str, Any]:
        return {"bank": self.bank if view.names is not None else None,
                "readout": view.names.readout if view.names is not None else None, "note": view.names_note}

    @torch.no_grad()
    def _text_scores(self, view: SAEView, text: str) -> Float[Tensor, "d_sae"]:
        """Cosine of every feature's carried decoder direction with the text's embedding."""
        from clip_lens.banks import encode_bank, load_bank

        if view.carried is None:
            raise InputError(f"cannot search features by text: {view.names_note}")
        embedding = encode_bank(self.api.model, load_bank([text]))[0].float()
        return (view.carried @ embedding.to(view.carried.device)).cpu()

    def _title(self, view: SAEView, feature: int, frequency: float, n_images: int) -> str:
        title = f"feature {feature} of {plain(view.name, 40)} at {view.sae.cfg.hook_name} (fires on {frequency:.1%} of {n_images} images)"
        if view.names is not None:
            text, score = view.names.top(feature)[0]
            title += f"\nname: \"{plain(text, 80)}\" (cos {score:.2f}{', direct path' if view.names.readout == 'direct' else ''})"
        return title


def _order(key: Tensor, tie: Tensor) -> Tensor:
    """Indices by ``key`` descending, ties by ``tie`` descending, then by index (a stable order)."""
    by_tie = torch.sort(tie.float(), descending=True, stable=True).indices
    return by_tie[torch.sort(key.float()[by_tie], descending=True, stable=True).indices]


def _overlay(positions: Optional[str]) -> bool:
    """Whether the patch maps mean something: not for an SAE that reads the class token only."""
    return positions not in ("cls", "pooled")


def _maps_note(positions: Optional[str], has_maps: bool) -> Optional[str]:
    """Why a feature's patch maps are not drawn (None when they are)."""
    if not has_maps:
        return "this SAE reads a pooled hook: there are no patch maps."
    if not _overlay(positions):
        return "this SAE reads the class token only, so its activations at the patches are not drawn."
    return None


# --- figures ---------------------------------------------------------------------------------------
def _draw(ax, picture: np.ndarray, heat: Optional[np.ndarray], scale: float) -> None:
    ax.imshow(picture)
    if heat is not None and scale > 0:
        h, w = picture.shape[:2]
        ax.imshow(heat_rgba(heat / scale), extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")


def _colour_scale(fig: "Figure", axes: Any, scale: float) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0, scale), "inferno"), ax=axes, shrink=0.9, aspect=25, pad=0.02)
    bar.set_label("feature activation (overlay opacity grows with it)", fontsize=7)
    bar.ax.tick_params(labelsize=7)


def feature_figure(
    thumbnails: UInt8[np.ndarray, "n H W 3"], maps: Optional[Float[Tensor, "n gh gw"]], values: Sequence[float],
    rows: Sequence[int], title: str, scale: float, columns: int = 6,
) -> "Figure":
    """A feature's top store images with its patch maps over them, one colour scale (``scale``: its top)."""
    from matplotlib.figure import Figure

    n = len(rows)
    columns = max(1, min(n, columns))
    lines = max(1, math.ceil(n / columns))
    fig = Figure(figsize=(1.5 * columns + (1.0 if maps is not None else 0.3), 1.55 * lines + 0.6), layout="constrained")
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        heat = maps[i].float().numpy() if maps is not None else None
        _draw(axes.flat[i], thumbnails[i], heat, scale)
        axes.flat[i].set_title(f"#{rows[i]}  {values[i]:.2f}", fontsize=8)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "never fires on the store", ha="center", va="center")
    elif maps is not None and scale > 0:
        _colour_scale(fig, axes, scale)
    fig.suptitle(title, fontsize=9)
    return fig


def image_figure(panels: Sequence[tuple], names: Optional["FeatureNames"], hook_name: str, wrap: int = 5,
                 queries: Optional[Sequence[str]] = None) -> "Figure":
    """Per query image ``(picture, features, values, maps)``: the image (titled with its name from
    ``queries``, e.g. "store image #3"), then its most active features' patch maps over it, one colour
    scale. Several images: one line each; one image: wrapped at ``wrap`` panels."""
    from matplotlib.figure import Figure

    scale = max([float(maps.max()) for _, _, _, maps in panels if maps is not None and len(maps)] + [0.0])
    lines: list[list[tuple]] = []  # cells of (picture, map or None, title)
    for q, (picture, chosen, values, maps) in enumerate(panels):
        query = plain(queries[q], 60) if queries is not None and q < len(queries) else "query"
        cells = [(picture, None, query if chosen else f"{query}: no feature fires")]
        for j, feature in enumerate(chosen):
            label = names.texts[int(names.indices[feature, 0])] if names is not None else ""
            label = plain(label, 22)
            heat = maps[j].float().numpy() if maps is not None else None
            cells.append((picture, heat, f"f{feature}  {values[j]:.2f}" + (f"\n{label}" if label else "")))
        step = wrap if len(panels) == 1 else len(cells)
        lines.extend(cells[i:i + step] for i in range(0, len(cells), step))
    columns = max(len(line) for line in lines)
    fig = Figure(figsize=(1.5 * columns + 1.0, 1.75 * len(lines) + 0.5), layout="constrained")
    axes = fig.subplots(len(lines), columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, line in enumerate(lines):
        for column, (picture, heat, title) in enumerate(line):
            _draw(axes[row, column], picture, heat, scale)
            axes[row, column].set_title(title, fontsize=7 if heat is not None else 8)
    if scale > 0:
        _colour_scale(fig, axes, scale)
    fig.suptitle(f"most active features at {hook_name}", fontsize=9)
    return fig
