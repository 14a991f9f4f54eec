"""Naming SAE features: text names through the frozen read-out, top images with patch heat maps, AUROC.

**Text names (TextSpan-style).** Feature ``i`` writes its decoder row ``d = W_dec[i]`` into the
stream at ``sae.cfg.hook_name``. For a residual-stream hook of a tower whose read-out is linear once
the final LayerNorm's scale is frozen (CLS or average pooling; no attentional pooler), the read-out
carries ``d`` to the embedding as

    e(d) = (γ ⊙ (d − mean(d))) @ W_proj            (γ: ``ln_post``/``ln_final`` weight)

(the LayerNorm divides by a positive per-image scale and adds a constant bias, neither of which
changes the direction; without a final LayerNorm ``e(d) = d @ W_proj``). It is the inverse way of
[`residual_directions`][clip_lens.HookedCLIP.residual_directions]. For the last residual stream
(``blocks.{L-1}.hook_resid_post``, and the last MLP's output) the read-out is the only path from the
hook to the embedding; for an earlier residual stream (and the other ``hook_attn_out``/``hook_mlp_out``)
the later blocks read ``d`` too and ``e(d)`` is its **direct path only** (a logit-lens approximation). For ``hook_pooled``
``e(d) = d @ W_proj`` and for ``hook_image_embed``/``hook_text_embed`` ``e(d) = d``, both exact.
A direction at a token the tower does not pool is read as if it were at the pooled token.

`name_features` ranks a text bank by the cosine of ``e(d_i)`` with each text's normalised
embedding: the nearest texts are the feature's names.

**Dashboards.** `top_activating` streams images through the model and the SAE and keeps, per
feature, the ``k`` images with the largest activation (the largest over the positions the SAE reads)
and, for token-level hooks, the activation at every patch token as a ``[grid_h, grid_w]`` map;
`TopActivations.plot` draws them as thumbnails with heat-map overlays.

**Ground truth.** `feature_auroc` scores every feature as a detector of a binary label
(rank-based, ties averaged); `shapes_world_ground_truth` trains an SAE on the shapes world and
checks, per attribute value, that some feature detects it on held-out scenes and is named after it
(``tests/acceptance/test_sae_truth.py``, ``docs/scripts/sae_ground_truth.py``).
"""

from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clip_lens.errors import InputError, UnsupportedArchitectureError
from clip_lens.figures import plain
from clip_lens.sae.model import SAE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from clip_lens.banks import TextBank
    from clip_lens.hooked_clip import HookedCLIP

_RESIDUAL = re.compile(
    r"^(text\.)?(blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)|ln_pre\.hook_normalized)$"
)
"""Hooks whose activations live in a tower's residual basis (``d_model`` wide, written into the stream)."""
_PROJECTED = {
    "hook_pooled": "pooled", "hook_image_embed": "embed", "text.hook_pooled": "pooled", "text.hook_text_embed": "embed",
}
"""Hooks after the read-out's LayerNorm: the affine map (pooled) or nothing (embed) is left."""
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


# --- read-out ------------------------------------------------------------------------------------
def _tower(model: "HookedCLIP", hook_name: str):
    from clip_lens.towers.hf_text import HFTextTower

    text = hook_name.startswith("text.")
    module = model.text if text else model.visual
    if isinstance(module, HFTextTower):
        raise UnsupportedArchitectureError(
            "the text tower is a Hugging Face model run as a whole; its read-out is not available to carry SAE "
            "directions to the embedding."
        )
    return module, text


def readout_kind(model: "HookedCLIP", hook_name: str) -> str:
    """How directions at ``hook_name`` reach the embedding: ``"exact"`` (the last residual stream or
    the last MLP's output, ``hook_pooled``, the embedding) or ``"direct"`` (an earlier residual
    stream or block output: the direct path only).

    Raises:
        InputError: a hook whose directions do not live in the residual stream or after the read-out.
        UnsupportedArchitectureError: a residual hook of a tower with an attentional pooler.
    """
    _carrier(model, hook_name)
    match = _RESIDUAL.match(hook_name)
    if match is None:
        return "exact"
    module, _ = _tower(model, hook_name)
    last = module.cfg.n_layers - 1
    final = (f"blocks.{last}.hook_resid_post", f"blocks.{last}.hook_mlp_out")  # nothing reads them but the read-out
    return "exact" if hook_name.removeprefix("text.") in final else "direct"


def _carrier(model: "HookedCLIP", hook_name: str):
    """``(kind, module)`` for a supported hook (``kind``: residual / pooled / embed)."""
    if hook_name in _PROJECTED:
        module, _ = _tower(model, hook_name)
        return _PROJECTED[hook_name], module
    if _RESIDUAL.match(hook_name) is None:
        raise InputError(
            f"SAE features at '{hook_name}' do not write into the residual stream, so the read-out cannot carry "
            "them to the embedding; name features of residual hooks (blocks.{l}.hook_resid_pre/mid/post, "
            "hook_attn_out, hook_mlp_out), hook_pooled or hook_image_embed."
        )
    module, text = _tower(model, hook_name)
    if not text and module.readout_plan().pooler is not None:
        raise UnsupportedArchitectureError(
            "this image tower pools with an attentional pooler, so its read-out is not linear in the residual "
            "stream; name features of an SAE on hook_pooled (after the pooler), or use "
            "model.decompose(images, directions=...), which freezes the pooler."
        )
    return "residual", module


def feature_directions_to_embedding(
    model: "HookedCLIP", sae: SAE, features: Optional[Sequence[int]] = None
) -> Float[Tensor, "n_features d_embed"]:
    """The SAE's decoder rows carried to the embedding through the frozen read-out (not normalised).

    ``(γ ⊙ centre(W_dec[i])) @ W_proj`` for residual hooks, ``W_dec[i] @ W_proj`` for
    ``hook_pooled`` and ``W_dec[i]`` for the embedding hooks (see the module docstring). For a
    residual stream before the last layer this is the **direct path only** (a logit-lens
    approximation); `readout_kind` says which.

    Args:
        model: the [`HookedCLIP`][clip_lens.HookedCLIP] the SAE was trained on.
        sae: an SAE whose ``cfg.hook_name`` is one of the supported hooks.
        features: feature indices (default: all ``d_sae``).

    Raises:
        InputError: an SAE of another hook kind (``attn.hook_z``, ``mlp.hook_post`` …) or width.
        UnsupportedArchitectureError: a tower with an attentional pooler (residual hooks), or a
            Hugging Face text tower.
    """
    hook_name = sae.cfg.hook_name
    kind, module = _carrier(model, hook_name)
    weight, _ = module.output_affine()
    index = _feature_index(sae, features)
    directions = sae.W_dec.detach()[index].to(device=weight.device, dtype=weight.dtype)
    if kind == "embed":
        width = weight.shape[1]
    else:
        width = weight.shape[0]
    if directions.shape[-1] != width:
        raise InputError(
            f"the SAE reads width {directions.shape[-1]} but '{hook_name}' of this model has width {width}; "
            "use the model the SAE was trained on."
        )
    if kind == "embed":
        return directions
    if kind == "residual":
        ln = module.ln_post if module is model.visual else module.ln_final
        if ln is not None:
            directions = (directions - directions.mean(-1, keepdim=True)) * ln.weight
    return directions @ weight


def _feature_index(sae: SAE, features: Optional[Sequence[int]]) -> Tensor:
    d_sae = sae.cfg.d_sae
    if features is None:
        return torch.arange(d_sae)
    index = torch.as_tensor(list(features) if not isinstance(features, Tensor) else features, dtype=torch.long).flatten()
    bad = index[(index < 0) | (index >= d_sae)]
    if len(bad):
        raise InputError(f"features {bad.tolist()[:5]} are out of range: the SAE has features 0..{d_sae - 1}.")
    return index


# --- names ---------------------------------------------------------------------------------------
@dataclass
class FeatureNames:
    """The bank texts nearest to each feature's decoder direction in the embedding space."""

    texts: list[str]
    """The bank, in order."""
    features: Int[Tensor, "n_features"]
    """The SAE feature each row describes."""
    indices: Int[Tensor, "n_features top"]
    """Bank indices of each feature's nearest texts, best first."""
    scores: Float[Tensor, "n_features top"]
    """Their cosine similarity with the carried decoder direction."""
    hook_name: str
    readout: str
    """``"exact"`` or ``"direct"`` (direct path only, see `readout_kind`)."""

    def _row(self, feature: int) -> int:
        rows = (self.features == int(feature)).nonzero().flatten()
        if len(rows) == 0:
            raise InputError(f"feature {feature} was not named; named features: {self.features.tolist()[:10]}….")
        return int(rows[0])

    def name(self, feature: int) -> str:
        """The nearest text of ``feature``."""
        return self.texts[int(self.indices[self._row(feature), 0])]

    def names(self) -> list[str]:
        """The nearest text of every named feature, in row order."""
        return [self.texts[int(i)] for i in self.indices[:, 0]]

    def top(self, feature: int) -> list[tuple[str, float]]:
        """``(text, cosine)`` of ``feature``'s nearest texts, best first."""
        row = self._row(feature)
        return [(self.texts[int(i)], float(s)) for i, s in zip(self.indices[row], self.scores[row])]

    def to_dict(self) -> dict:
        return {
            "hook_name": self.hook_name, "readout": self.readout,
            "features": {int(f): self.top(int(f)) for f in self.features},
        }


@torch.no_grad()
def name_features(
    model: "HookedCLIP",
    sae: SAE,
    texts: Union[Sequence[str], str, "TextBank", Float[Tensor, "n_texts d_embed"]],
    top: int = 5,
    features: Optional[Sequence[int]] = None,
    bank_texts: Optional[Sequence[str]] = None,
) -> FeatureNames:
    """Name every feature by the bank texts nearest to its decoder direction carried to the embedding.

    Args:
        model: the model the SAE was trained on.
        sae: the SAE (see `feature_directions_to_embedding` for the hooks it may read).
        texts: a list of texts, a `TextBank`, a builtin bank name
            (``"general"``, ``"shapes"``, ``"shapes-attributes"``), or text embeddings
            ``[n_texts, d_embed]`` (then ``bank_texts`` gives their texts).
        top: texts kept per feature.
        features: which features (default: all).

    Returns:
        `FeatureNames` (cosines between the carried direction and the normalised text embeddings).
    """
    from clip_lens.banks import TextBank, encode_bank, load_bank

    if isinstance(texts, Tensor):
        embeddings = texts
        names = list(bank_texts) if bank_texts is not None else [f"text {i}" for i in range(len(texts))]
        if len(names) != len(embeddings):
            raise InputError(f"{len(embeddings)} text embeddings but {len(names)} bank_texts.")
    else:
        bank = texts if isinstance(texts, TextBank) else load_bank(texts)
        embeddings, names = encode_bank(model, bank), list(bank.texts)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top must be a positive integer, got {top!r}.")
    carried = feature_directions_to_embedding(model, sae, features)
    if embeddings.ndim != 2 or embeddings.shape[1] != carried.shape[1]:
        raise InputError(f"text embeddings must be [n_texts, {carried.shape[1]}], got {tuple(embeddings.shape)}.")
    cosine = torch.nn.functional.normalize(carried.float(), dim=-1) @ torch.nn.functional.normalize(
        embeddings.to(carried.device).float(), dim=-1).T
    scores, indices = cosine.topk(min(top, len(names)), dim=-1)
    return FeatureNames(names, _feature_index(sae, features), indices.cpu(), scores.cpu(), sae.cfg.hook_name,
                        readout_kind(model, sae.cfg.hook_name))


# --- AUROC ---------------------------------------------------------------------------------------
def feature_auroc(
    acts: Float[Tensor, "n_images n_features"], labels: Union[Bool[Tensor, "n_images"], np.ndarray, Sequence[bool]]
) -> Float[Tensor, "n_features"]:
    """AUROC of every column of ``acts`` as a detector of ``labels`` (rank-based Mann–Whitney U).

    ``AUROC = (Σ ranks of the positives − n₊(n₊+1)/2) / (n₊ n₋)`` with tied values given their
    average rank, so a feature that is 0 on most images scores 0.5 on those, as it should (it
    cannot tell them apart). 1: every positive above every negative; 0.5: chance.

    Raises:
        InputError: shapes that disagree, NaN/inf, or labels with only one class.
    """
    acts = torch.as_tensor(acts)
    if acts.ndim == 1:
        acts = acts[:, None]
    labels = torch.as_tensor(np.asarray(labels, dtype=bool) if not isinstance(labels, Tensor) else labels).bool().flatten()
    if acts.ndim != 2 or acts.shape[0] != labels.shape[0]:
        raise InputError(f"acts must be [n_images, n_features] with n_images = {labels.shape[0]} labels, got {tuple(acts.shape)}.")
    if not bool(torch.isfinite(acts).all()):
        raise InputError("acts contain NaN or inf values.")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"labels need both classes to measure AUROC; got {n_pos} positives and {n_neg} negatives.")
    values = acts.detach().to("cpu", torch.float64).T.contiguous()  # [features, images]
    ordered = values.sort(dim=-1).values
    below = torch.searchsorted(ordered, values, right=False)
    upto = torch.searchsorted(ordered, values, right=True)
    ranks = (below + upto + 1).double() / 2  # 1-based average rank of ties
    u = ranks[:, labels].sum(-1) - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()


# --- activations over images -------------------------------------------------------------------
def _stop_layer(model: "HookedCLIP", hook_name: str) -> Optional[int]:
    match = _BLOCK.match(hook_name)
    return int(match.group(1)) + 1 if match else None


def _image_source(model: "HookedCLIP", images: Any):
    from clip_lens.collect import ImageSource, Store, image_source, store_images

    if isinstance(images, Store):
        preprocess = getattr(model, "preprocess", None)
        if preprocess is None:
            raise InputError("the model has no preprocess transform to read the store's images with.")
        size = model.cfg.image_size[0]
        load = store_images(images, size)
        # rows as the store numbers them (store_images, ids(), reads): without the images it skipped
        ids = images.ids()
        n = images.n_images if ids is None else len(ids)
        skipped = images.n_images - n
        description = f"images of store {images.path}" + (f", without the {skipped} it skipped" if skipped else "")

        def loader(start: int, stop: int):
            return torch.stack([preprocess(image) for image in load(range(start, stop))]), None

        return ImageSource(n, loader, ids, description)
    return image_source(images, getattr(model, "preprocess", None))


def _default_positions(sae: SAE) -> str:
    source = sae.cfg.metadata.get("clip_lens_training", {}).get("args", {}).get("source", {})
    positions = source.get("positions") if isinstance(source, dict) else None
    return positions if positions in ("cls", "patches", "all", "pooled") else "all"


@torch.no_grad()
def _batch_acts(model: "HookedCLIP", sae: SAE, pixels: Tensor) -> Tensor:
    """SAE activations of one image batch: ``[B, n_pos, d_sae]`` (token hooks) or ``[B, d_sae]``."""
    hook_name = sae.cfg.hook_name
    stop = _stop_layer(model, hook_name)
    kwargs = {"stop_at_layer": stop} if stop is not None else {"return_type": None}
    _, cache = model.run_with_cache(pixels.to(model.device, model.dtype), names_filter=hook_name, **kwargs)
    act = cache[hook_name]
    return sae.encode(act.to(sae.device))


def _image_scores(acts: Tensor, positions: str, n_prefix: int) -> Tensor:
    """Image-level activation ``[B, d_sae]``: the largest over ``positions`` (token hooks)."""
    if acts.ndim == 2:
        return acts
    if positions in ("cls", "pooled"):
        return acts[:, 0]
    if positions == "patches":
        return acts[:, n_prefix:].amax(1)
    return acts.amax(1)


@torch.no_grad()
def image_feature_acts(
    model: "HookedCLIP", sae: SAE, images: Any, positions: Optional[str] = None, batch_size: int = 256,
) -> Float[Tensor, "n_images d_sae"]:
    """Image-level feature activations: the SAE at its hook, the largest over ``positions``
    (``"cls"``, ``"patches"``, ``"all"``; default: the positions it was trained on)."""
    positions = positions or _default_positions(sae)
    source = _image_source(model, images)
    n_prefix = model.cfg.n_prefix_tokens
    out = []
    for start in range(0, len(source), batch_size):
        pixels, _ = source.load(start, min(len(source), start + batch_size))
        out.append(_image_scores(_batch_acts(model, sae, pixels), positions, n_prefix).cpu())
    return torch.cat(out)


# --- dashboards ----------------------------------------------------------------------------------
@dataclass
class TopActivations:
    """Per feature, the images it fires on most, with patch activation maps."""

    features: Int[Tensor, "n_features"]
    """The SAE feature of each row."""
    indices: Int[Tensor, "n_features k"]
    """Image indices in the data set, by decreasing activation (-1: fewer than ``k`` images)."""
    values: Float[Tensor, "n_features k"]
    """Their image-level activation (the largest over ``positions``)."""
    maps: Optional[Float[Tensor, "n_features k grid_h grid_w"]]
    """The feature's activation at every patch token of those images (None for pooled hooks)."""
    frequency: Float[Tensor, "n_features"]
    """Share of the images on which the feature fires (image-level activation > 0)."""
    hook_name: str
    positions: str
    n_images: int
    source: Any = field(default=None, repr=False)
    """The `ImageSource` the indices refer to (for `plot`)."""
    names: Optional[FeatureNames] = field(default=None, repr=False)

    def _row(self, feature: int) -> int:
        rows = (self.features == int(feature)).nonzero().flatten()
        if len(rows) == 0:
            raise InputError(f"feature {feature} is not in this result (features {self.features.tolist()[:10]}…).")
        return int(rows[0])

    def images(self, feature: int) -> Float[Tensor, "k 3 H W"]:
        """The (preprocessed) top images of ``feature`` that it fires on."""
        if self.source is None:
            raise InputError("this result holds no image source (it was loaded from a file); pass images to top_activating.")
        row = self._row(feature)
        keep = [int(i) for i, v in zip(self.indices[row], self.values[row]) if i >= 0 and v > 0]
        if not keep:
            return torch.zeros(0)
        return torch.cat([self.source.load(i, i + 1)[0] for i in keep])

    def to_dict(self) -> dict:
        out = {
            "hook_name": self.hook_name, "positions": self.positions, "n_images": self.n_images,
            "features": {
                int(f): {"indices": self.indices[r].tolist(), "values": self.values[r].tolist(),
                         "frequency": float(self.frequency[r])}
                for r, f in enumerate(self.features)
            },
        }
        if self.names is not None:
            for f, entry in out["features"].items():
                if bool((self.names.features == f).any()):
                    entry["names"] = self.names.top(f)
        return out

    def plot(self, feature: int, names: Optional[FeatureNames] = None, columns: Optional[int] = None,
             overlay: Optional[bool] = None) -> "Figure":
        """Thumbnails of ``feature``'s top images, each with its patch activation map over it
        (opacity rising with the activation, one colour scale for the whole figure).

        ``overlay`` (default: unless the SAE reads the class token only, whose maps are activations
        at positions it was not trained on) draws the maps.
        """
        from matplotlib.figure import Figure

        overlay = self.positions not in ("cls", "pooled") if overlay is None else overlay
        row = self._row(feature)
        pictures = self.images(feature)
        n = len(pictures)
        names = names or self.names
        columns = columns or max(1, min(n, math.ceil(math.sqrt(max(n, 1)))))
        rows = max(1, math.ceil(n / columns))
        fig = Figure(figsize=(1.9 * columns, 1.9 * rows + 0.7), layout="constrained")
        axes = fig.subplots(rows, columns, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        scale = float(self.maps[row, :n].max()) if self.maps is not None and n else 0.0
        for i in range(n):
            ax = axes.flat[i]
            ax.imshow(_displayable(pictures[i]))
            if overlay and self.maps is not None and scale > 0:
                heat = self.maps[row, i].float().numpy() / scale
                h, w = pictures.shape[-2:]
                rgba = _heat_rgba(heat)
                ax.imshow(rgba, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
            ax.set_title(f"#{int(self.indices[row, i])}  {float(self.values[row, i]):.2f}", fontsize=8)
        title = f"feature {int(feature)} at {plain(self.hook_name, 80)} (fires on {float(self.frequency[row]):.1%} of {self.n_images} images)"
        if names is not None and bool((names.features == int(feature)).any()):
            text, score = names.top(int(feature))[0]
            title += f"\nname: \"{plain(text, 80)}\" (cos {score:.2f}{', direct path' if names.readout == 'direct' else ''})"
        if n == 0:
            axes.flat[0].text(0.5, 0.5, "never fires", ha="center", va="center")
        width = max(40, 24 * columns)  # characters that fit above `columns` thumbnails at fontsize 9
        # whole words only: a break inside a long word could split an escaped dollar sign and start mathtext
        fig.suptitle("\n".join(textwrap.fill(line, width, break_long_words=False) for line in title.split("\n")), fontsize=9)
        return fig


def _displayable(image: Float[Tensor, "3 H W"]) -> np.ndarray:
    """A preprocessed image min-max scaled to [0, 1], channels last."""
    image = image.detach().float().cpu()
    low, high = image.amin(), image.amax()
    return ((image - low) / (high - low).clamp_min(1e-8)).permute(1, 2, 0).numpy()


def _heat_rgba(heat: np.ndarray) -> np.ndarray:
    """A ``[gh, gw]`` map in [0, 1] as an RGBA overlay (inferno, opacity 0.75 × value)."""
    from matplotlib import colormaps

    rgba = colormaps["inferno"](np.clip(heat, 0, 1))
    rgba[..., 3] = 0.75 * np.clip(heat, 0, 1)
    return rgba


@torch.no_grad()
def top_activating(
    model: "HookedCLIP",
    sae: SAE,
    images: Any,
    k: int = 9,
    features: Optional[Sequence[int]] = None,
    positions: Optional[str] = None,
    batch_size: int = 64,
    names: Optional[FeatureNames] = None,
    progress: bool = False,
) -> TopActivations:
    """The ``k`` images each feature fires on most, with per-patch activation maps.

    Args:
        model: the model the SAE was trained on (image tower hooks only).
        sae: the SAE.
        images: anything [`clip_lens.collect.image_source`][clip_lens.collect.image_source] takes, or a collected
            [`Store`][clip_lens.collect.Store] (its images are read again).
        k: images kept per feature.
        features: which features (default: all; memory is ``n_features × k × grid`` values, plus
            one batch of SAE activations).
        positions: which positions give the image-level activation (its largest): ``"cls"``,
            ``"patches"``, ``"all"``; default: the positions the SAE was trained on.
        batch_size: images per forward pass.
        names: `name_features` output, shown by `TopActivations.plot`.

    Returns:
        `TopActivations`. ``maps`` holds the feature at the patch tokens (for an SAE trained
        on the class token these are activations at positions it was not trained on).
    """
    from tqdm.auto import tqdm

    if sae.cfg.hook_name.startswith("text."):
        raise InputError("top_activating reads images; this SAE is on a text-tower hook.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}.")
    positions = positions or _default_positions(sae)
    if positions not in ("cls", "pooled", "patches", "all"):
        raise InputError(f"positions must be 'cls', 'patches' or 'all', got {positions!r}.")
    source = _image_source(model, images)
    index = _feature_index(sae, features)
    n_prefix = model.cfg.n_prefix_tokens
    gh, gw = model.cfg.grid_size
    n_features = len(index)
    values = torch.full((n_features, k), -math.inf)
    indices = torch.full((n_features, k), -1, dtype=torch.long)
    maps: Optional[Tensor] = None
    fired = torch.zeros(n_features)
    rows = torch.arange(n_features)[:, None]
    bar = tqdm(total=len(source), desc="top images", unit="image", disable=not progress)
    try:  # closed on errors too, so that an error message is not followed by the bar
        for start in range(0, len(source), batch_size):
            pixels, _ = source.load(start, min(len(source), start + batch_size))
            acts = _batch_acts(model, sae, pixels)[..., index.to(sae.device)].float().cpu()
            scores = _image_scores(acts, positions, n_prefix)  # [B, F]
            fired += (scores > 0).sum(0)
            b = scores.shape[0]
            merged = torch.cat([values, scores.T], dim=1)
            values, order = merged.topk(k, dim=1)
            from_batch = order >= k
            ids = torch.where(from_batch, start + order - k, indices.gather(1, order.clamp(max=k - 1)))
            if acts.ndim == 3:
                patch = acts[:, n_prefix:].permute(2, 0, 1)  # [F, B, n_patches]
                if patch.shape[-1] != gh * gw:
                    raise InputError(f"{sae.cfg.hook_name} has {patch.shape[-1]} patch tokens, not {gh}×{gw}.")
                new = patch[rows, (order - k).clamp(min=0, max=b - 1)].reshape(n_features, k, gh, gw)
                old = maps[rows, order.clamp(max=k - 1)] if maps is not None else torch.zeros_like(new)
                maps = torch.where(from_batch[..., None, None], new, old)
            indices = ids
            bar.update(len(pixels))
    finally:
        bar.close()
    values = torch.where(indices >= 0, values, torch.zeros(()))
    return TopActivations(index, indices, values, maps, fired / max(1, len(source)), sae.cfg.hook_name, positions,
                          len(source), source, names)


# --- ground truth on the shapes world ------------------------------------------------------------
SAE_WORLD_SEED = 21
"""Seed of the shapes world the ground-truth SAE trains on (the toy CLIP trained on seed 0; the
held-out scenes come from `clip_lens.toy.evaluate.HELD_OUT_SEED`)."""
BASELINES = ("random", "pca", "embedding")


@dataclass
class ValueDetection:
    """One attribute value of the shapes world: its best SAE feature and the baselines."""

    attribute: str
    value: str
    feature: int
    """The feature with the largest AUROC for this value on the selection split."""
    selection_auroc: float
    auroc: float
    """That feature's AUROC on the held-out scenes."""
    name: str
    """The feature's text name: its nearest attribute prompt through the read-out."""
    name_match: bool
    """``name`` is this value's prompt (``attribute_prompt(attribute, value)``)."""
    baselines: dict[str, float]
    """Held-out AUROC of each baseline (random directions and PCA components chosen on the
    selection split like the features; the embedding's cosine with the value's prompt)."""

    def detected(self, threshold: float) -> bool:
        return self.auroc >= threshold and self.name_match


@dataclass
class SAEGroundTruth:
    """Per attribute value of the shapes world: is there an SAE feature that detects it and is named after it?"""

    rows: list[ValueDetection]
    threshold: float
    """The AUROC a feature needs to count as a detector."""
    summary: dict[str, dict[str, Any]]
    """Per method (``sae``: detected and named; ``sae_detected``: AUROC only; each baseline): the
    ``fraction`` of values with held-out AUROC ≥ ``threshold``, its bootstrap 95% ``ci`` over the
    values, and ``count``."""
    factors: dict[str, dict[str, float]]
    """Rows and columns of the 3×3 grid (``"row top"`` … ``"column right"``): the best feature's
    held-out AUROC (``sae``) and the baselines'. The model writes position as row + column."""
    training: dict
    """The SAE's training metrics (`final`)."""
    settings: dict
    sae: Optional[SAE] = field(default=None, repr=False)
    names: Optional[FeatureNames] = field(default=None, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)

    def fraction(self, method: str = "sae") -> float:
        return float(self.summary[method]["fraction"])

    def to_dict(self) -> dict:
        return {
            "rows": [vars(r) for r in self.rows], "threshold": self.threshold, "summary": self.summary,
            "factors": self.factors, "training": self.training, "settings": self.settings, "seconds": self.seconds,
        }

    def table(self) -> str:
        """The per-value table (Markdown)."""
        lines = [
            "| attribute | value | feature | AUROC | name | match | random | PCA | embedding |",
            "|---|---|---:|---:|---|:-:|---:|---:|---:|",
        ]
        for r in self.rows:
            mark = "✓" if r.name_match else "✗"
            ok = "**" if r.detected(self.threshold) else ""
            lines.append(
                f"| {r.attribute} | {r.value} | {r.feature} | {ok}{r.auroc:.3f}{ok} | {r.name} | {mark} | "
                f"{r.baselines['random']:.3f} | {r.baselines['pca']:.3f} | {r.baselines['embedding']:.3f} |"
            )
        lines.append("")
        lines.append(f"| method | values with AUROC ≥ {self.threshold} | 95% bootstrap interval |")
        lines.append("|---|---:|---|")
        labels = {"sae": "SAE feature, named after the value", "sae_detected": "SAE feature (AUROC only)",
                  "random": "random directions", "pca": "PCA components", "embedding": "embedding · prompt"}
        for method, label in labels.items():
            s = self.summary[method]
            lines.append(f"| {label} | {s['count']}/{len(self.rows)} ({s['fraction']:.0%}) | "
                         f"[{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] |")
        return "\n".join(lines)

    def plot(self) -> "Figure":
        """Held-out AUROC per value: the SAE's best feature (filled when named after the value) and the baselines."""
        from matplotlib.figure import Figure

        n = len(self.rows)
        fig = Figure(figsize=(max(8.0, 0.36 * n + 2), 4.2), layout="constrained")
        ax = fig.subplots()
        x = np.arange(n)
        styles = {"random": ("#999999", "x", "random directions"), "pca": ("#377eb8", "^", "PCA components"),
                  "embedding": ("#4daf4a", "s", "embedding · prompt")}
        for method, (colour, marker, label) in styles.items():
            ax.scatter(x, [r.baselines[method] for r in self.rows], color=colour, marker=marker, s=22,
                       label=f"{label} ({self.summary[method]['count']}/{n} ≥ {self.threshold})", zorder=2)
        sae = np.array([r.auroc for r in self.rows])
        named = np.array([r.name_match for r in self.rows])
        ax.scatter(x[named], sae[named], color="#e41a1c", s=46, zorder=3,
                   label=f"SAE feature named after the value ({self.summary['sae']['count']}/{n} also ≥ {self.threshold})")
        ax.scatter(x[~named], sae[~named], facecolors="none", edgecolors="#e41a1c", s=46, zorder=3,
                   label="SAE feature, named otherwise")
        ax.axhline(self.threshold, color="black", lw=0.8, ls="--")
        ax.set_xticks(x, [r.value for r in self.rows], rotation=70, fontsize=8)
        ax.set_ylabel("held-out AUROC")
        ax.set_ylim(0.45, 1.02)
        start = 0
        for attribute in dict.fromkeys(r.attribute for r in self.rows):
            count = sum(r.attribute == attribute for r in self.rows)
            ax.axvspan(start - 0.5, start + count - 0.5, color="#000000", alpha=0.04 if len(ax.patches) % 2 else 0.0)
            ax.text(start + (count - 1) / 2, 0.47, attribute, ha="center", fontsize=8, color="#555555")
            start += count
        ax.legend(fontsize=7, loc="lower right")
        hook = self.settings.get("hook_name")
        ax.set_title(f"Does an SAE feature detect each attribute value? ({hook}, {self.settings.get('positions')}, "
                     f"d_sae={self.settings.get('d_sae')}, k={self.settings.get('k')})", fontsize=9)
        return fig


def _best_on(select: Tensor, labels_select: np.ndarray, held: Tensor, labels_held: np.ndarray) -> tuple[int, float, float]:
    """The column with the largest AUROC on the selection split, and its held-out AUROC."""
    aurocs = feature_auroc(select, labels_select)
    best = int(aurocs.argmax())
    return best, float(aurocs[best]), float(feature_auroc(held[:, best : best + 1], labels_held)[0])


@torch.no_grad()
def _split_activations(model: "HookedCLIP", pixels: Tensor, hook_name: str, positions: str, batch_size: int):
    """Per image: the hook's rows at ``positions`` (``[n, n_rows, d]``) and the normalised image embedding."""
    rows, embeds = [], []
    n_prefix = model.cfg.n_prefix_tokens
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(model.device, model.dtype)
        embedding, cache = model.run_with_cache(batch, names_filter=hook_name, return_type="image_features")
        act = cache[hook_name]
        act = act[:, :1] if positions == "cls" else act[:, n_prefix:]
        rows.append(act.float().cpu())
        embeds.append(torch.nn.functional.normalize(embedding.float(), dim=-1).cpu())
    return torch.cat(rows), torch.cat(embeds)


@torch.no_grad()
def shapes_world_ground_truth(
    model: Optional["HookedCLIP"] = None,
    *,
    hook_name: str = "blocks.3.hook_resid_post",
    positions: str = "cls",
    d_sae: int = 128,
    k: int = 12,
    steps: int = 2000,
    token_batch: int = 256,
    lr: float = 3e-3,
    n_train: int = 8000,
    n_select: int = 2000,
    n_eval: int = 2000,
    train_seed: int = SAE_WORLD_SEED,
    eval_seed: Optional[int] = None,
    seed: int = 0,
    threshold: float = 0.95,
    batch_size: int = 250,
    sae: Optional[SAE] = None,
    progress: bool = False,
) -> SAEGroundTruth:
    """Train a TopK SAE on the shapes world and check it against the world's attribute values.

    The SAE trains on ``hook_name`` at ``positions`` (``"cls"``: the class token; ``"patches"``:
    every patch token, an image's activation being the largest over its patches) of ``n_train``
    one-object scenes of seed ``train_seed``. For each of the 29 attribute values (8 colours,
    6 shapes, 2 sizes, 9 positions, 4 backgrounds) the feature with the largest AUROC on the first
    ``n_select`` of those scenes is chosen, and its AUROC is measured on ``n_eval`` held-out scenes
    (seed ``eval_seed``, default `HELD_OUT_SEED`): no choice is made on
    the held-out scenes. The feature's text name is its nearest prompt among the 29
    ``attribute_prompt(attribute, value)`` texts through the read-out
    (`name_features`); it must be the value's own prompt.

    Baselines, chosen and measured the same way: ``d_sae`` random unit directions and the
    principal components (both signs) of the same activations; and, without any choice, the cosine
    of the image embedding with the value's prompt (the model's own zero-shot score).

    Pass ``sae`` to evaluate a trained SAE instead of training one.
    """
    import time

    from clip_lens.hooked_clip import HookedCLIP
    from clip_lens.sae.activations import ActivationSource
    from clip_lens.sae.train import train_sae
    from clip_lens.stats import bootstrap_ci
    from clip_lens.toy.evaluate import HELD_OUT_SEED
    from clip_lens.toy.world import ATTRIBUTES, VALUES, ShapesWorld, attribute_prompt, batch_images

    if positions not in ("cls", "patches"):
        raise InputError(f"positions must be 'cls' or 'patches', got {positions!r}.")
    if not 0 < n_select <= n_train:
        raise InputError(f"n_select must lie in 1..n_train={n_train}, got {n_select}.")
    eval_seed = HELD_OUT_SEED if eval_seed is None else eval_seed
    if eval_seed == train_seed:
        raise InputError("eval_seed must differ from train_seed: the held-out scenes must be new.")
    model = model or HookedCLIP.from_pretrained("toy-shapes")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def scenes(seed_: int, n: int):
        world = ShapesWorld(seed=seed_, image_size=model.cfg.image_size[0], n_objects=1)
        drawn = [world.scene(i) for i in range(n)]
        labels = {a: np.array([s.value(a) for s in drawn]) for a in ATTRIBUTES}
        return batch_images(drawn), labels

    train_pixels, train_labels = scenes(train_seed, n_train)
    eval_pixels, eval_labels = scenes(eval_seed, n_eval)
    seconds["render"] = time.perf_counter() - clock

    clock = time.perf_counter()
    training: dict = {}
    if sae is None:
        per_image = 1 if positions == "cls" else model.cfg.grid_size[0] * model.cfg.grid_size[1]
        buffer = int(min(2**16, max(2 * batch_size * per_image, n_train * per_image)))
        source = ActivationSource(model, train_pixels, hook_name, positions=positions, batch_size=batch_size,
                                  buffer_size=buffer, token_batch=token_batch, seed=seed, keep=True)
        with torch.enable_grad():
            result = train_sae(source, d_sae, architecture="topk", k=k, steps=steps, lr=lr, seed=seed,
                               progress=progress)
        sae, training = result.sae, dict(result.final)
    elif sae.cfg.hook_name != hook_name:
        raise InputError(f"the SAE reads '{sae.cfg.hook_name}', not hook_name='{hook_name}'.")
    seconds["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    select_rows, _ = _split_activations(model, train_pixels[:n_select], hook_name, positions, batch_size)
    eval_rows, eval_embed = _split_activations(model, eval_pixels, hook_name, positions, batch_size)
    select_labels = {a: v[:n_select] for a, v in train_labels.items()}

    def pooled(scores: Tensor) -> Tensor:  # [n, rows, m] → image level [n, m]
        return scores.amax(1)

    feats_select = pooled(sae.encode(select_rows.to(sae.device)).float().cpu())
    feats_eval = pooled(sae.encode(eval_rows.to(sae.device)).float().cpu())
    mean = select_rows.flatten(0, 1).mean(0)
    generator = torch.Generator().manual_seed(seed)
    random_dirs = torch.nn.functional.normalize(torch.randn(d_sae, mean.shape[0], generator=generator), dim=-1)
    centred = select_rows.flatten(0, 1) - mean
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    components = v[: min(d_sae, v.shape[0])]
    pca_dirs = torch.cat([components, -components])
    random_select, random_eval = pooled((select_rows - mean) @ random_dirs.T), pooled((eval_rows - mean) @ random_dirs.T)
    pca_select, pca_eval = pooled((select_rows - mean) @ pca_dirs.T), pooled((eval_rows - mean) @ pca_dirs.T)

    pairs = [(a, v_) for a in ATTRIBUTES for v_ in VALUES[a]]
    prompts = [attribute_prompt(a, v_) for a, v_ in pairs]
    prompt_embeds = model.encode_text(model.to_tokens(prompts), normalize=True).float().cpu()
    names = name_features(model, sae, prompt_embeds, top=1, bank_texts=prompts)
    zero_shot = eval_embed @ prompt_embeds.T

    rows = []
    for j, (attribute, value) in enumerate(pairs):
        y_select, y_eval = select_labels[attribute] == value, eval_labels[attribute] == value
        best, select_auroc, auroc = _best_on(feats_select, y_select, feats_eval, y_eval)
        name = names.name(best)
        baselines = {
            "random": _best_on(random_select, y_select, random_eval, y_eval)[2],
            "pca": _best_on(pca_select, y_select, pca_eval, y_eval)[2],
            "embedding": float(feature_auroc(zero_shot[:, j : j + 1], y_eval)[0]),
        }
        rows.append(ValueDetection(attribute, value, best, select_auroc, auroc, name, name == prompts[j], baselines))

    factors: dict[str, dict[str, float]] = {}
    for axis, index, words in (("row", 0, ("top", "middle", "bottom")), ("column", 1, ("left", "center", "right"))):
        for word in words:
            y_select = np.array([p.split()[index] == word for p in select_labels["position"]])
            y_eval = np.array([p.split()[index] == word for p in eval_labels["position"]])
            best, _, auroc = _best_on(feats_select, y_select, feats_eval, y_eval)
            factors[f"{axis} {word}"] = {
                "feature": best, "sae": auroc,
                "random": _best_on(random_select, y_select, random_eval, y_eval)[2],
                "pca": _best_on(pca_select, y_select, pca_eval, y_eval)[2],
            }

    indicators = {
        "sae": [r.detected(threshold) for r in rows],
        "sae_detected": [r.auroc >= threshold for r in rows],
        **{m: [r.baselines[m] >= threshold for r in rows] for m in BASELINES},
    }
    summary = {
        m: {"fraction": float(np.mean(v)), "count": int(np.sum(v)), "ci": bootstrap_ci(np.asarray(v, dtype=float))}
        for m, v in indicators.items()
    }
    seconds["evaluate"] = time.perf_counter() - clock
    settings = {
        "hook_name": hook_name, "positions": positions, "d_sae": d_sae, "k": k, "steps": steps,
        "token_batch": token_batch, "lr": lr, "n_train": n_train, "n_select": n_select, "n_eval": n_eval,
        "train_seed": train_seed, "eval_seed": eval_seed, "seed": seed, "architecture": "topk",
    }
    return SAEGroundTruth(rows, threshold, summary, factors, training, settings, sae, names, seconds)
