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
(rank-based, ties averaged); `clip_lens.sae.ground_truth.shapes_world_ground_truth` trains an SAE on
the shapes world and checks, per attribute value, that some feature detects it on held-out scenes and
is named after it. Its names are still reachable here (``from clip_lens.sae.naming import
shapes_world_ground_truth``), resolved on first use (`__getattr__`), since that module builds on this one.
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
from clip_lens.figures import heat_rgba, plain
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
                rgba = heat_rgba(heat)
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


# moved to clip_lens.sae.ground_truth (which imports this module): reachable here by name, as before the split
_GROUND_TRUTH = ("SAE_WORLD_SEED", "BASELINES", "ValueDetection", "SAEGroundTruth", "shapes_world_ground_truth")


def __getattr__(name: str) -> Any:
    if name in _GROUND_TRUTH:
        import importlib

        return getattr(importlib.import_module("clip_lens.sae.ground_truth"), name)
    raise AttributeError(f"module 'clip_lens.sae.naming' has no attribute {name!r}")
