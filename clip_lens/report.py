"""The ``clip-lens report`` job: images (shapes-world scenes or synthetic blobs), a decomposition, figures and a summary.

Everything here is plain functions over a [`HookedCLIP`][clip_lens.HookedCLIP] and a
[`Decomposition`][clip_lens.Decomposition], so the CLI stays a thin shell:

* `synthetic_images` — a seeded batch of smooth colour-blob images, normalised like CLIP;
* `summarize` — the numbers (per-layer and per-head contribution norms, sum check);
* `plot_decomposition`, `plot_tokens` — matplotlib figures (`clip_lens.figures`: Agg backend, `figure_png`);
* `render_html` — a self-contained page with the figures embedded as base64;
* files go through `clip_lens.files.atomic_write`, so an interrupted run never leaves a half file.

The report composes the sections of `clip_lens.head_report`, `clip_lens.neurons_report` (with the head
analyses) and `clip_lens.feature_report`; nothing but
the CLI imports it (figure helpers live in `clip_lens.figures`; ``clip_lens.report.figure_png`` still
names the same function).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens.figures import HEAD_CMAP, TOKEN_CMAP, figure_png, plain, png_data_url, pyplot  # figure_png: also clip_lens.report.figure_png, as before
from clip_lens.files import atomic_write
from clip_lens.head_report import analyse_heads, render_sections

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from clip_lens.decompose import Decomposition
    from clip_lens.hooked_clip import HookedCLIP

# open_clip's OPENAI_DATASET_MEAN / STD: the fallback when a model has no preprocess config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

REPORT_FILES = ("decomposition.png", "tokens.png", "summary.json", "report.html")
CAPTIONS = {
    "decomposition.png": "left, the mean norm of each head's direct contribution to the image embedding; "
    "right, each layer's attention and MLP contribution norms (means over the images).",
    "tokens.png": "the first image and, for the last layer, the norm of each patch's contribution "
    "(summed over heads) to its embedding, on the patch grid.",
    "head_labels.png": "each head coloured by the property its span texts share (confidence in the cell).",
    "span_variance.png": "share of each head's output variance explained by its first TextSpan texts.",
    "metrics.png": "left, the share of heads with each concept-consistency score; right, CCS per head.",
    "ablation.png": "zero-shot margin lost per attribute when each head's direct effect is mean-ablated.",
    "your_images.png": "the first of your images (--images), each beside the norm of every patch's contribution "
    "to its embedding through the last layer's attention heads (summed over heads): where the last layer reads from.",
    "segmentation.png": "pixel accuracy, object IoU, mIoU and mAP (%, whiskers: bootstrap 95% intervals over images) of "
    "the decomposition's heatmaps of the predicted colour (plain bars) next to the maps that could beat them "
    "(hatched: no object, a constant map, the pixel-only chroma and border-colour maps, raw attention, random heads).",
    "ablation_curves.png": "zero-shot accuracy with everything but the last k attention layers mean-ablated "
    "(the embedding term and the MLPs stay ablated for every k, so k = all layers is below the unablated model).",
}


# --- inputs -------------------------------------------------------------------------------
def normalization(model: "HookedCLIP") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the model's own preprocess transform (CLIP's values if it has none)."""
    for transform in getattr(model.preprocess, "transforms", []):
        if type(transform).__name__ == "Normalize":
            return tuple(float(m) for m in transform.mean), tuple(float(s) for s in transform.std)
    return CLIP_MEAN, CLIP_STD


def synthetic_images(
    n_images: int,
    image_size: Sequence[int],
    seed: int = 0,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    n_blobs: tuple[int, int] = (3, 7),
) -> tuple[Float[Tensor, "batch 3 H W"], Float[Tensor, "batch 3 H W"]]:
    """A seeded batch of smooth random colour blobs on a coloured background.

    Returns ``(normalised, pixels)``: ``pixels`` in ``[0, 1]`` and ``normalised`` =
    ``(pixels - mean) / std``, ready for `HookedCLIP.decompose`. The same ``seed`` gives
    the same images on every machine (CPU generator).
    """
    if n_images < 1:
        raise InputError(f"n_images must be at least 1, got {n_images}.")
    height, width = int(image_size[0]), int(image_size[1])
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    images = []
    for _ in range(n_images):
        # background: a gentle linear gradient between two random colours
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        angle = float(torch.rand((), generator=g)) * 2 * math.pi
        t = (math.cos(angle) * xs + math.sin(angle) * ys - min(0, math.cos(angle)) - min(0, math.sin(angle)))
        t = t / (abs(math.cos(angle)) + abs(math.sin(angle)))
        img = c0 * (1 - t) + c1 * t
        k = int(torch.randint(n_blobs[0], n_blobs[1] + 1, (), generator=g))
        for _ in range(k):
            cy, cx = torch.rand(2, generator=g).tolist()
            ry, rx = (0.06 + 0.16 * torch.rand(2, generator=g)).tolist()
            radius = torch.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
            alpha = torch.sigmoid((1 - radius) / 0.12)  # an ellipse with a soft edge
            colour = torch.rand(3, 1, 1, generator=g)
            img = img * (1 - alpha) + colour * alpha
        images.append(img.clamp(0, 1))
    pixels = torch.stack(images)
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t, pixels


def report_images(model: "HookedCLIP", n_images: int, seed: int = 0) -> tuple[Tensor, Tensor, str]:
    """``(normalised, pixels in [0, 1], description)``: held-out shapes-world scenes for a
    shapes-world model (it has the world's word tokenizer), synthetic colour blobs otherwise."""
    from clip_lens.toy import ShapesWorld, WordTokenizer, batch_images
    from clip_lens.toy.evaluate import HELD_OUT_SEED, shapes_world_version

    if isinstance(model.tokenizer, WordTokenizer):
        if n_images < 1:
            raise InputError(f"n_images must be at least 1, got {n_images}.")
        world = ShapesWorld(seed=HELD_OUT_SEED + seed, image_size=model.cfg.image_size[0], version=shapes_world_version(model) or 1)
        scenes = [world.scene(i) for i in range(n_images)]
        images = batch_images(scenes)
        captions = "; ".join(s.caption() for s in scenes[:3])
        return images, (images + 1) / 2, f"held-out shapes-world scenes ({captions}; …)"
    mean, std = normalization(model)
    images, pixels = synthetic_images(n_images, model.cfg.image_size, seed, mean, std)
    return images, pixels, "synthetic colour blobs"


# --- numbers ------------------------------------------------------------------------------
def token_norms(decomposition: "Decomposition", image: int = 0) -> Float[Tensor, "token"]:
    """‖Σ_h tokens[image, last token layer, h, t]‖ for every source token ``t``."""
    if decomposition.tokens is None:
        raise InputError("this decomposition has no per-token terms; call decompose(..., tokens=[layer]).")
    return decomposition.tokens[image, -1].sum(0).norm(dim=-1)


def summarize(model: "HookedCLIP", decomposition: "Decomposition", **extra: Any) -> dict[str, Any]:
    """The JSON-ready numbers of a report (norms are means over the batch of ‖term‖₂)."""
    d = decomposition
    cfg = model.cfg
    errors = d.relative_error()
    summary: dict[str, Any] = {
        "model": model.model_name,
        "pretrained": model.pretrained,
        "random_weights": model.pretrained is None,
        **extra,
        "cfg": cfg.to_dict(),
        "text_cfg": model.text.cfg.to_dict(),
        "sum_check": {
            "max_relative_error": float(errors.max()),
            "mean_relative_error": float(errors.mean()),
            "what": "max over images of ||sum of all terms - image embedding|| / ||image embedding||",
        },
        "embedding_norm_mean": float(d.embedding_norm.mean()),
        "embed_norm_mean": float(d.embed.norm(dim=-1).mean()),
        "bias_norm_mean": float(d.bias.norm(dim=-1).mean()),
        "layers": [
            {
                "layer": layer,
                "attn_norm_mean": float(d.attn[:, layer].norm(dim=-1).mean()),
                "mlp_norm_mean": float(d.mlp[:, layer].norm(dim=-1).mean()),
                "attn_bias_norm_mean": float(d.attn_bias[:, layer].norm(dim=-1).mean()),
            }
            for layer in range(cfg.n_layers)
        ],
        "head_layers": d.head_layers,
        "head_norm_mean": None if d.heads is None else d.heads.norm(dim=-1).mean(0).tolist(),
        "token_layers": d.token_layers,
    }
    if d.tokens is not None:
        norms = token_norms(d)
        summary["tokens_image0"] = {"layer": d.token_layers[-1], "norms": norms.tolist()}
    return summary


# --- figures ------------------------------------------------------------------------------
def _title(summary: dict[str, Any]) -> str:
    """The figures' title: model, weights and images (the model name and checkpoint file name drawn literally)."""
    weights = "random weights" if summary["random_weights"] else f"weights: {plain(Path(str(summary['pretrained'])).name, 60)}"
    kind = "shapes-world scenes" if str(summary.get("images", "")).startswith("held-out shapes") else "synthetic images"
    return f"{plain(summary['model'], 60)} ({weights}), {summary.get('n_images', '?')} {kind}"


def plot_decomposition(summary: dict[str, Any]) -> "Figure":
    """Heatmap of mean ‖head term‖ (layer × head) and bars of per-layer attention vs MLP norms."""
    plt = pyplot()
    layers = [row["layer"] for row in summary["layers"]]
    fig, (ax_heads, ax_layers) = plt.subplots(
        1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.15, 1]}, constrained_layout=True
    )
    fig.suptitle(f"Direct contributions to the image embedding — {_title(summary)}")

    heads = summary["head_norm_mean"]
    if heads:
        import numpy as np

        grid = np.array(heads)
        im = ax_heads.imshow(grid, aspect="auto", cmap=HEAD_CMAP, origin="upper")
        ax_heads.set_yticks(range(len(summary["head_layers"])), [str(l) for l in summary["head_layers"]])
        n_heads = grid.shape[1]
        step = max(1, n_heads // 16)
        ax_heads.set_xticks(range(0, n_heads, step))
        fig.colorbar(im, ax=ax_heads, label="mean ‖head contribution‖₂")
    ax_heads.set_xlabel("head")
    ax_heads.set_ylabel("layer")
    ax_heads.set_title("Per-head contribution norm (mean over images)")

    width = 0.4
    attn = [row["attn_norm_mean"] for row in summary["layers"]]
    mlp = [row["mlp_norm_mean"] for row in summary["layers"]]
    ax_layers.bar([l - width / 2 for l in layers], attn, width, label="attention (all heads + bias)", color="#3b75af")
    ax_layers.bar([l + width / 2 for l in layers], mlp, width, label="MLP", color="#ef8636")
    ax_layers.axhline(summary["embed_norm_mean"], color="grey", ls="--", lw=1, label="embedding term")
    ax_layers.set_xticks(layers)
    ax_layers.set_xlabel("layer")
    ax_layers.set_ylabel("mean ‖contribution‖₂")
    ax_layers.set_title(f"Per-layer attention vs MLP (sum check: max rel. error "
                        f"{summary['sum_check']['max_relative_error']:.1e})")
    # headroom above the tallest bar and line, so that the legend sits over empty space, never over a bar
    top = max([*attn, *mlp, summary["embed_norm_mean"], 0.0])
    ax_layers.set_ylim(0, top * 1.5 if top > 0 else 1.0)
    ax_layers.legend(loc="upper center", ncol=2, fontsize="small", framealpha=0.9)
    return fig


def plot_tokens(
    summary: dict[str, Any], norms: Float[Tensor, "token"], pixels: Float[Tensor, "3 H W"],
    grid_size: Sequence[int], pool_type: str,
) -> "Figure":
    """The first image beside its per-patch contribution norms (last layer, summed over heads)."""
    plt = pyplot()
    n_patches = int(grid_size[0]) * int(grid_size[1])
    patches = norms[norms.shape[0] - n_patches:]  # after the prefix tokens (class, registers), if any
    grid = patches.reshape(int(grid_size[0]), int(grid_size[1])).cpu().numpy()
    layer = summary["tokens_image0"]["layer"]

    fig, (ax_img, ax_map) = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    fig.suptitle(f"Layer {layer} attention, per source token (image 0) — {_title(summary)}")
    ax_img.imshow(pixels.permute(1, 2, 0).cpu().numpy())
    ax_img.set_title("input image")
    ax_img.set_xlabel("x (pixels)")
    ax_img.set_ylabel("y (pixels)")
    im = ax_map.imshow(grid, cmap=TOKEN_CMAP, origin="upper")
    n_prefix = norms.shape[0] - n_patches
    cls = f"; prefix tokens: {float(norms[:n_prefix].sum()):.3g}" if n_prefix else ""
    ax_map.set_title(f"‖Σ_heads contribution of each patch‖₂ (pool: {pool_type}{cls})", fontsize="medium")
    ax_map.set_xlabel("patch column")
    ax_map.set_ylabel("patch row")
    fig.colorbar(im, ax=ax_map, label="‖contribution‖₂")
    return fig


USER_IMAGES_SHOWN = 3
"""How many of the user's own images (``report --images``) the report draws with their per-patch maps."""


def user_image_patches(model: "HookedCLIP", images: Any, n: int = USER_IMAGES_SHOWN) -> tuple[dict[str, Any], Optional[bytes]]:
    """The first ``n`` images of ``images`` (a folder, files or tensor, as `clip_lens.collect.image_source`
    reads them; undecodable ones left out) decomposed, each drawn beside the norm of every patch's
    contribution to its embedding through the last layer's heads (as ``tokens.png``).

    Returns ``({"ids": [...], "layer": L, "norms": [[per patch]...]}``, the PNG)``; the PNG is None, with
    a ``note``, when this model has no per-patch terms to draw (no patch grid)."""
    import numpy as np

    from clip_lens.collect import image_source

    source = image_source(images, getattr(model, "preprocess", None))
    batch = source.load_batch(0, min(len(source), n + 8))  # spares, in case some do not decode
    pixels = batch.pixels[:n]
    ids = [str(source.ids[batch.start + k]) if source.ids is not None else f"image {batch.start + k}" for k in batch.kept[:n]]
    grid_size = model.cfg.grid_size
    if not len(pixels) or grid_size is None:
        return {"ids": ids, "note": "no per-patch map: " + ("no image decoded" if not len(pixels) else "this model has no patch grid")}, None
    last = model.cfg.n_layers - 1
    with torch.no_grad():
        decomposition = model.decompose(pixels.to(model.device), heads="all", tokens=[last])
    n_patches = int(grid_size[0]) * int(grid_size[1])
    norms = [token_norms(decomposition, i)[-n_patches:].reshape(int(grid_size[0]), int(grid_size[1])).cpu().numpy()
             for i in range(len(pixels))]
    mean, std = normalization(model)
    shown = (pixels.float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    plt = pyplot()
    fig, axes = plt.subplots(len(pixels), 2, figsize=(8.5, 3.6 * len(pixels)), squeeze=False, constrained_layout=True)
    fig.suptitle(f"Your images: layer {last} heads, per patch (first {len(pixels)} of {len(source)})")
    for row, (image, grid, name) in enumerate(zip(shown, norms, ids)):
        axes[row, 0].imshow(image.permute(1, 2, 0).numpy())
        axes[row, 0].set_title(plain(Path(name).name, 50), fontsize="medium")
        axes[row, 0].set_axis_off()
        im = axes[row, 1].imshow(grid, cmap=TOKEN_CMAP, origin="upper")
        axes[row, 1].set_title("‖Σ_heads contribution of each patch‖₂", fontsize="medium")
        axes[row, 1].set_xlabel("patch column")
        axes[row, 1].set_ylabel("patch row")
        fig.colorbar(im, ax=axes[row, 1], label="‖contribution‖₂")
    summary = {"ids": ids, "layer": last, "norms": [np.round(g, 6).tolist() for g in norms]}
    return summary, figure_png(fig)


# --- html ---------------------------------------------------------------------------------
def render_html(summary: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """A self-contained HTML page: the figures as base64 data URIs plus the numbers."""
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{r['layer']}</td><td>{r['attn_norm_mean']:.4g}</td><td>{r['mlp_norm_mean']:.4g}</td>"
        f"<td>{r['attn_bias_norm_mean']:.4g}</td></tr>"
        for r in summary["layers"]
    )
    tags = {
        name: f'<figure><img alt="{esc(name)}" src="{png_data_url(data)}">'
        f"<figcaption><code>{esc(name)}</code>: {esc(CAPTIONS.get(name, ''))}</figcaption></figure>"
        for name, data in pngs.items()
    }
    figures = tags.get("decomposition.png", "") + tags.get("tokens.png", "")
    head_sections = render_sections(summary["heads"], tags) if "heads" in summary else ""
    if "features" in summary:
        from clip_lens.feature_report import render_section

        head_sections += render_section(summary["features"], pngs)
    if "neurons" in summary:
        from clip_lens.neurons_report import render_section as render_neurons

        head_sections += render_neurons(summary["neurons"], pngs)
    overrides = summary.get("config_overrides")
    overrides_html = f" Config overrides: <code>{esc(json.dumps(overrides))}</code>." if overrides else ""
    warning = (
        '<p class="warn">Weights are <b>random</b> (no --pretrained given): the figures show the '
        "machinery, not what a trained model has learned.</p>"
        if summary["random_weights"]
        else f"<p>Weights: <code>{esc(str(summary['pretrained']))}</code></p>"
    )
    cfg = summary["cfg"]
    sum_check = summary["sum_check"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>clip_lens report: {esc(str(summary['model']))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }}
caption {{ caption-side: bottom; text-align: left; font-size: 0.9em; color: #555; padding-top: 0.3em; }}
img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
</style></head><body>
<h1>clip_lens report: {esc(str(summary['model']))}</h1>
{warning}
<p>{summary.get('n_images', '?')} images: {esc(str(summary.get('images', '')))} (seed {summary.get('seed', '?')}),
vision tower: {cfg['n_layers']} layers × {cfg['n_heads']} heads, d_model {cfg['d_model']},
image {cfg['image_size']}, patch {cfg['patch_size']}, pooling <code>{esc(str(cfg['pool_type']))}</code>.{overrides_html}</p>
<h2>Sum check</h2>
<p>The decomposition's terms add up to the image embedding with a maximum relative error of
<b>{sum_check['max_relative_error']:.3e}</b> (mean {sum_check['mean_relative_error']:.3e}).</p>
<p>Mean norms: embedding {summary['embedding_norm_mean']:.4g}, embedding term {summary['embed_norm_mean']:.4g},
constant (bias) term {summary['bias_norm_mean']:.4g}.</p>
{figures}
<h2>Per-layer contribution norms (mean over images)</h2>
<table><tr><th>layer</th><th>attention</th><th>MLP</th><th>attention out_proj bias</th></tr>
{rows}
</table>
{head_sections}
<p>Full numbers: <code>summary.json</code> next to this file.</p>
</body></html>
"""


# --- SAE features -------------------------------------------------------------------------
FEATURE_IMAGES = 256
"""Shapes-world scenes searched for the Features section when the head analyses are off."""
FEATURES_SHOWN = 8


def feature_section(
    model: "HookedCLIP", sae: Any, *, images: Any = None, n_images: int = FEATURE_IMAGES, bank: Optional[str] = None,
    n_features: int = FEATURES_SHOWN, k: int = 9, progress: bool = False,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report's "Features" section: the first ``n_features`` features of an SAE by
    `clip_lens.feature_report.rank_features`, named with ``bank`` (default: shapes-attributes,
    the single-attribute prompts, for shapes-world models, else general; no names, with a note, when the hook cannot be named), and
    their top images among ``images`` (default: ``n_images`` shapes-world scenes of the report's
    world, seed `clip_lens.head_report.REPORT_SEED`).

    Returns the summary (``summary.json``'s ``features``) and the dashboards as PNG bytes.
    """
    from clip_lens.collect import model_world_images
    from clip_lens.feature_report import inspect_features
    from clip_lens.head_report import REPORT_SEED
    from clip_lens.sae import SAE, load_sae
    from clip_lens.toy import WordTokenizer

    folder = None
    if not isinstance(sae, SAE):
        folder = Path(sae)
        sae = load_sae(folder)
    if images is None:
        if model.cfg.image_size is None:
            raise InputError("this model has no fixed image size, so shapes-world scenes cannot be rendered; pass images.")
        images = model_world_images(model, n_images, REPORT_SEED)
    if bank is None:
        bank = "shapes-attributes" if isinstance(model.tokenizer, WordTokenizer) else "general"
    inspection = inspect_features(model, sae, images, n_features=n_features, k=k, bank=bank, progress=progress)
    summary = {"sae_dir": None if folder is None else str(folder.resolve()), **inspection.to_dict()}
    return summary, inspection.dashboards()


# --- files --------------------------------------------------------------------------------
def write_report(
    out_dir: Union[str, Path], summary: dict[str, Any], pngs: dict[str, bytes]
) -> dict[str, Path]:
    """Write the PNGs, ``summary.json`` and ``report.html`` into ``out_dir`` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {name: atomic_write(out_dir / name, data) for name, data in pngs.items()}
    written["summary.json"] = atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    written["report.html"] = atomic_write(out_dir / "report.html", render_html(summary, pngs))
    return written


def build_report(
    model: "HookedCLIP",
    out_dir: Union[str, Path],
    *,
    n_images: int = 8,
    seed: int = 0,
    progress: Optional[Any] = None,
    extra: Optional[dict[str, Any]] = None,
    head_images: int = 0,
    head_source: Any = None,
    bank: Optional[str] = None,
    sae: Any = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Synthetic images → ``decompose(heads="all", tokens=[last layer])`` → figures → files.

    ``progress`` is an optional tqdm bar advanced once per step (images, decompose, figures,
    write); ``extra`` is stored in the summary (e.g. the config overrides). With ``head_images``
    (shapes-world scenes) or ``head_source`` (a folder, tensor or dataset of images), the head analyses of
    `clip_lens.head_report` run too (store in ``out_dir/store``). With ``sae`` (an
    `SAE` or its folder) a "Features" section is added
    (`feature_section`). Returns ``(summary, {file name: path})``.
    """

    from clip_lens.head_report import Steps

    # the CLI's bar: each step named in its postfix, redrawn while it runs (so no step is silent), then advanced
    steps = Steps(progress, enabled=progress is not None)

    def done() -> None:
        if progress is not None:
            progress.update(1)

    with steps.step("images"):
        images, pixels, description = report_images(model, n_images, seed)
    done()

    with steps.step("decompose"):
        last = model.cfg.n_layers - 1
        decomposition = model.decompose(images, heads="all", tokens=[last])
        summary = summarize(
            model, decomposition, n_images=n_images, seed=seed, images=description, **(extra or {})
        )
    done()

    with steps.step("figures"):
        pngs = {
            "decomposition.png": figure_png(plot_decomposition(summary)),
            "tokens.png": figure_png(
                plot_tokens(summary, token_norms(decomposition), pixels[0], model.cfg.grid_size, model.cfg.pool_type)
            ),
        }
    done()

    if head_images or head_source is not None:
        with steps.step("head analyses"):
            summary["heads"], head_pngs = analyse_heads(
                model, Path(out_dir), n_images=head_images, images=head_source, bank=bank,
                progress=progress if progress is not None else True)
            pngs.update(head_pngs)
            if head_source is not None:  # the user's own images, each beside its per-patch map
                summary["heads"]["your_images"], pngs["your_images.png"] = user_image_patches(model, head_source)
        done()

    if head_images or head_source is not None:  # the Neurons section, on (the first of) the head analyses' images
        from clip_lens.neurons_report import SECTION_IMAGES, neurons_section

        with steps.step("neurons"):
            summary["neurons"], neuron_pngs = neurons_section(
                model, images=head_source, n_images=min(head_images or SECTION_IMAGES, SECTION_IMAGES), bank=bank)
            pngs.update(neuron_pngs)
        done()

    if sae is not None:
        with steps.step("SAE features"):
            summary["features"], feature_pngs = feature_section(
                model, sae, images=head_source, n_images=head_images or FEATURE_IMAGES, bank=bank,
                progress=progress is not None)
            pngs.update(feature_pngs)
        done()

    with steps.step("write"):
        written = write_report(out_dir, summary, pngs)
    done()
    return summary, written
