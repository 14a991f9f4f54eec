"""Neuron dashboards: what ``clip-lens neurons`` writes and the report's "Neurons" section.

The ``neurons`` analysis (`clip_lens_plugins.neurons`, reached through `clip_lens.analyses`) gives every
MLP neuron of the chosen layers its second-order effect statistics, rank-1 direction and sparse text
code. `inspect_neurons` picks the neurons with the largest mean effect norm (``effect_norm``, mean
over images of ‖ψ_n(i)‖) and, for each, the images its effect points along its rank-1 direction the
most (largest score s_n(i) = ⟨ψ_n(i) − ψ̄_n, r_n⟩, the side its text code describes), with the neuron's
post-activation (``blocks.{l}.mlp.hook_post``) at every patch of those images. The result
(`NeuronInspection`) gives the JSON (`to_dict`), one PNG dashboard per neuron (`dashboards`) and HTML
(`render_section`, `render_page`).

Layer: ``sections`` (docs: Architecture). The report and the CLI import it; it imports no plugin by name.
"""

from __future__ import annotations

import html
import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens.figures import figure_png, heat_rgba, plain, png_data_url

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

RANKING = "mean second-order effect norm over the images (effect_norm), largest first"


def neuron_label(layer: int, neuron: int) -> str:
    """``"L{layer}N{neuron}"``: how every output names a neuron."""
    return f"L{int(layer)}N{int(neuron)}"


def dashboard_name(layer: int, neuron: int) -> str:
    """File name of a neuron's dashboard PNG."""
    return f"neuron_{neuron_label(layer, neuron)}.png"


def parse_neuron_label(text: str) -> tuple[int, int]:
    """``"L1N64"`` → ``(1, 64)`` (case-insensitive), else a one-line `InputError`."""
    import re

    match = re.fullmatch(r"\s*[lL](\d+)[nN](\d+)\s*", text)
    if not match:
        raise InputError(f"'{text}' is not a neuron; name one as L<layer>N<index>, e.g. L1N64.")
    return int(match.group(1)), int(match.group(2))


@dataclass
class NeuronInspection:
    """The shown neurons of one ``neurons`` result: their rows, top images and patch activation maps."""

    result: Any
    """The `NeuronsResult` (with its ``rank1`` tensors)."""
    rows: list
    """The shown `NeuronRow`s, in display order."""
    top: Int[Tensor, "shown n_images"]
    """Indices of each neuron's top images in the analysed image set (by score s_n(i))."""
    scores: Float[Tensor, "shown n_images"]
    """s_n(i) on those images (embedding units)."""
    maps: Float[Tensor, "shown n_images grid_h grid_w"]
    """The neuron's post-activation at every patch of those images."""
    pictures: Float[Tensor, "shown n_images 3 H W"]
    """The preprocessed images (drawn min-max scaled)."""
    selection: str
    """``"ranked"`` (`RANKING`) or ``"given"``."""
    ids: Optional[list[str]] = None
    """Names of the analysed images (store ids, file names), when known."""
    images: Optional[str] = None
    """What the images are (e.g. ``"200 shapes-world v2 scenes (seed 1000)"``)."""

    def to_dict(self) -> dict:
        """JSON-ready: the analysis result (`NeuronsResult.to_dict`), and per shown neuron its label,
        top images (index, score, id when known) and dashboard file name."""
        shown = []
        for r, row in enumerate(self.rows):
            entry: dict[str, Any] = {
                "neuron": neuron_label(row.layer, row.neuron), "layer": row.layer, "index": row.neuron,
                "top_indices": [int(i) for i in self.top[r]], "top_scores": [float(s) for s in self.scores[r]],
                "dashboard": dashboard_name(row.layer, row.neuron),
            }
            if self.ids:
                entry["top_ids"] = [str(self.ids[int(i)]) for i in self.top[r]]
            shown.append(entry)
        return {**self.result.to_dict(), "images": self.images, "selection": self.selection,
                "ranking": RANKING if self.selection == "ranked" else "the neurons given, in that order", "shown": shown}

    def plot(self, r: int) -> "Any":
        """Dashboard of the ``r``-th shown neuron: its top images with its patch activations over them
        (one colour scale per figure), titled with its text code."""
        from matplotlib.figure import Figure

        row = self.rows[r]
        n = self.top.shape[1]
        columns = max(1, min(n, 6))
        lines = max(1, math.ceil(n / columns))
        fig = Figure(figsize=(1.9 * columns, 1.9 * lines + 0.9), layout="constrained")
        axes = fig.subplots(lines, columns, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        scale = float(self.maps[r].clamp_min(0).max()) if n else 0.0
        for i in range(n):
            ax = axes.flat[i]
            picture = self.pictures[r, i].float()
            picture = (picture - picture.amin()) / (picture.amax() - picture.amin()).clamp_min(1e-8)
            ax.imshow(picture.permute(1, 2, 0).numpy())
            if scale > 0:
                h, w = picture.shape[-2:]
                ax.imshow(heat_rgba(self.maps[r, i].float().numpy() / scale), extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                          interpolation="nearest")
            ax.set_title(f"#{int(self.top[r, i])}  s={float(self.scores[r, i]):.2f}", fontsize=8)
        code = ", ".join(f"{plain(t, 40)} ({c:+.2f})" for t, c in list(zip(row.texts, row.coefficients))[:4])
        title = (f"{neuron_label(row.layer, row.neuron)}: mean |effect| {row.effect_norm:.3g}, rank-1 explains "
                 f"{row.explained:.0%}\ncode: {code or '(empty)'}")
        width = max(40, 24 * columns)
        fig.suptitle("\n".join(textwrap.fill(line, width, break_long_words=False) for line in title.split("\n")), fontsize=9)
        return fig

    def dashboards(self, dpi: int = 80) -> dict[str, bytes]:
        """``{file name: PNG}``: one dashboard per shown neuron (`plot`)."""
        return {dashboard_name(row.layer, row.neuron): figure_png(self.plot(r), dpi=dpi) for r, row in enumerate(self.rows)}


def _choose(result: Any, n_neurons: int, neurons: Optional[Sequence[tuple[int, int]]]) -> tuple[list[int], str]:
    """Flat positions (layer-major, as ``result.neurons``) of the neurons to show."""
    where = {(row.layer, row.neuron): p for p, row in enumerate(result.neurons)}
    if neurons is None:
        order = sorted(range(len(result.neurons)), key=lambda p: (-result.neurons[p].effect_norm, p))
        return order[:n_neurons], "ranked"
    chosen = []
    for layer, neuron in neurons:
        if (layer, neuron) not in where:
            analysed = sorted({row.neuron for row in result.neurons})
            span = f"{analysed[0]}…{analysed[-1]}" if analysed else "none"
            raise InputError(f"neuron {neuron_label(layer, neuron)} was not analysed (layers {result.layers}, neurons "
                             f"{span}); name a neuron of those layers, or analyse its layer.")
        chosen.append(where[(layer, neuron)])
    return chosen, "given"


@torch.no_grad()
def inspect_neurons(
    model: "HookedCLIP",
    images: Float[Tensor, "N 3 H W"],
    result: Any,
    *,
    n_neurons: int = 10,
    n_images: int = 6,
    neurons: Optional[Sequence[tuple[int, int]]] = None,
    ids: Optional[list[str]] = None,
    description: Optional[str] = None,
    batch_size: int = 32,
) -> NeuronInspection:
    """Dashboards of the neurons of a `NeuronsResult` computed on ``images``.

    Args:
        model: the model the result was computed with.
        images: the analysed preprocessed images ``[N, 3, H, W]`` (the result's image axis).
        result: ``analyses.get("neurons")(model).run(images, ...)`` (its ``rank1`` tensors are needed:
            a result read back from JSON has none).
        n_neurons: how many neurons to show when ``neurons`` is None (`RANKING`).
        n_images: top images per neuron.
        neurons: ``(layer, neuron)`` pairs to show instead, in that order.
        ids: names of the images, for the JSON.
        description: what the images are, for the JSON and the page.
        batch_size: images per forward pass for the activation maps.

    Returns:
        A `NeuronInspection`.
    """
    if getattr(result, "rank1", None) is None:
        raise InputError("the neurons result has no rank-1 tensors (read back from JSON?); pass the result of "
                         "analyses.get('neurons')(model).run(images, ...).")
    if len(images) != result.n_images:
        raise InputError(f"the result was computed on {result.n_images} images, got {len(images)}; pass the same images.")
    for value, name in ((n_neurons, "n_neurons"), (n_images, "n_images")):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}.")
    positions, selection = _choose(result, n_neurons, neurons)
    per_layer = len(result.neurons) // len(result.layers)
    n_images = min(n_images, len(images))
    scores = result.rank1.scores  # [N, layer, neuron]
    grid_h, grid_w = model.cfg.grid_size
    n_patches = grid_h * grid_w
    top = torch.zeros(len(positions), n_images, dtype=torch.long)
    top_scores = torch.zeros(len(positions), n_images)
    maps = torch.zeros(len(positions), n_images, grid_h, grid_w)
    for r, p in enumerate(positions):
        values, rows = scores[:, p // per_layer, p % per_layer].topk(n_images)
        top[r], top_scores[r] = rows, values
    for layer in sorted({result.neurons[p].layer for p in positions}):
        shown = [r for r, p in enumerate(positions) if result.neurons[p].layer == layer]
        wanted = sorted({int(i) for r in shown for i in top[r]})
        hook = f"blocks.{layer}.mlp.hook_post"
        acts = []
        for s in range(0, len(wanted), batch_size):
            pixels = model.check_images(images[wanted[s:s + batch_size]])
            _, cache = model.run_with_cache(pixels, names_filter=[hook])
            acts.append(cache[hook][:, -n_patches:].float().cpu())  # [b, patch, d_mlp]
        activation = torch.cat(acts)
        slot = {row: i for i, row in enumerate(wanted)}
        for r in shown:
            neuron = result.neurons[positions[r]].neuron
            picked = activation[[slot[int(i)] for i in top[r]], :, neuron]
            maps[r] = picked.reshape(n_images, grid_h, grid_w)
    pictures = images[top.reshape(-1)].detach().float().cpu().reshape(*top.shape, *images.shape[1:])
    rows = [result.neurons[p] for p in positions]
    return NeuronInspection(result, rows, top, top_scores, maps, pictures, selection, ids, description)


# --- html ----------------------------------------------------------------------------------------
def _img(name: str, data: bytes) -> str:
    return f'<img alt="{html.escape(name)}" loading="lazy" src="{png_data_url(data)}">'


def render_section(summary: dict, pngs: dict[str, bytes], heading: str = "h2") -> str:
    """HTML of a `NeuronInspection.to_dict` summary: the table of the shown neurons (effect, share of
    significant images, rank-1 variance, text code) and each one's dashboard (embedded from ``pngs``)."""
    esc = html.escape
    sub = "h3" if heading == "h2" else "h4"
    if "skipped" in summary:
        return f"<{heading}>Neurons</{heading}><p>Not analysed: {esc(summary['skipped'])}</p>"
    n_analysed = summary.get("n_analysed", len(summary["neurons"]))
    intro = (
        f"<p>Second-order effects (Gandelsman, Efros &amp; Steinhardt, ICLR 2025) of {n_analysed} MLP neurons of layers "
        f"{esc(', '.join(map(str, summary['layers'])))} of <code>{esc(str(summary['model']))}</code> on {summary['n_images']} "
        f"images{': ' + esc(str(summary['images'])) if summary.get('images') else ''}. Each neuron's rank-1 direction "
        f"(top {summary['top_k']} images) is coded with {summary['k']} texts of bank <code>{esc(str(summary['bank']))}</code> "
        f"by orthogonal matching pursuit (signed coefficients; the code cosine says how well the texts rebuild the "
        f"direction). Shown: {esc(summary['ranking'])}. An image is significant for a neuron when its centred effect "
        f"is at least {summary['threshold']:.0%} of the embedding norm.</p>"
    )
    by_label = {f"L{n['layer']}N{n['neuron']}": n for n in summary["neurons"]}
    rows, figures = [], []
    for rank, shown in enumerate(summary["shown"], 1):
        label = shown["neuron"]
        row = by_label[label]
        code = "".join(f"<li>{esc(t)} <small>({c:+.2f})</small></li>" for t, c in zip(row["texts"], row["coefficients"]))
        rows.append(
            f'<tr><td>{rank}</td><td><a href="#neuron-{label}"><b>{label}</b></a></td><td>{row["effect_norm"]:.3g}</td>'
            f"<td>{row['significant']:.1%}</td><td>{row['explained']:.0%}</td><td>{f'<ol>{code}</ol>' if code else '—'}</td>"
            f"<td>{row['code_cosine']:.2f}</td></tr>"
        )
        data = pngs.get(shown["dashboard"])
        if data is not None:
            first = f": {esc(row['texts'][0])}" if row["texts"] else ""
            figures.append(f'<figure id="neuron-{label}"><{sub}>{label}{first}</{sub}>{_img(shown["dashboard"], data)}'
                           "<figcaption>top images by the score along the neuron's rank-1 direction (image index, "
                           "score s), the neuron's activation at every patch overlaid.</figcaption></figure>")
    table = ("<table><tr><th>#</th><th>neuron</th><th>mean |effect|</th><th>significant images</th><th>rank-1 variance</th>"
             "<th>text code (coefficient)</th><th>code cosine</th></tr>" + "".join(rows) + "</table>")
    return f"<{heading}>Neurons</{heading}>" + intro + table + "".join(figures)


def render_page(summary: dict, pngs: dict[str, bytes], title: str) -> str:
    """A self-contained HTML page (dashboards embedded) around `render_section`."""
    from clip_lens.figures import html_page

    return html_page(title, render_section(summary, pngs), "neurons.json")


# --- the report's section ------------------------------------------------------------------------
SECTION_IMAGES = 200
"""Images the report's Neurons section analyses (its cost grows with images × layers × d_mlp)."""
SECTION_NEURONS = 6


def neurons_section(
    model: "HookedCLIP", *, images: Any = None, n_images: int = SECTION_IMAGES, seed: Optional[int] = None,
    bank: Optional[str] = None, n_neurons: int = SECTION_NEURONS, k: int = 6, batch_size: int = 64,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report's "Neurons" section: the ``neurons`` analysis over every layer but the last on the first
    ``n_images`` of ``images`` (anything `clip_lens.collect.image_source` takes; default: that many
    shapes-world scenes of seed ``seed``, default `clip_lens.head_report.REPORT_SEED`), and the dashboards
    of the ``n_neurons`` neurons with the largest mean effect.

    A tower without transformer MLP neurons (convolutional, or a path that is not affine) gets
    ``{"skipped": reason}`` and no figures, so the rest of the report is still written.

    Returns the summary (``summary.json``'s ``neurons``) and the dashboards as PNG bytes.
    """
    from clip_lens import analyses
    from clip_lens.collect import image_source, model_world_images
    from clip_lens.second_order import UnsupportedTowerError, second_order_maps

    try:
        second_order_maps(model, layers=[0], neurons=[0])  # refuses the towers it cannot handle, cheaply
    except UnsupportedTowerError as exc:
        return {"skipped": str(exc)}, {}
    if model.cfg.n_layers < 2:
        return {"skipped": "the tower has one layer: no attention layer follows its MLP."}, {}
    if images is None:
        from clip_lens.head_report import REPORT_SEED
        images = model_world_images(model, n_images, REPORT_SEED if seed is None else seed)
    source = image_source(images, getattr(model, "preprocess", None))
    n = min(n_images, len(source))
    pixels, _ = source.load(0, n)
    if bank is None:
        from clip_lens.toy.evaluate import shapes_world_version

        bank = "shapes-attributes" if shapes_world_version(model) is not None else "general"
    layers = list(range(model.cfg.n_layers - 1))
    result = analyses.get("neurons")(model).run(pixels, bank=bank, layers=layers, k=k, top_k=min(100, n), batch_size=batch_size)
    ids = source.ids[:n] if source.ids else None
    inspection = inspect_neurons(model, pixels, result, n_neurons=n_neurons, n_images=6, ids=ids,
                                 description=f"the first {n} of {source.description}", batch_size=batch_size)
    summary = inspection.to_dict()
    shown = {f"L{s['layer']}N{s['index']}" for s in summary["shown"]}
    summary["neurons"] = [row for row in summary["neurons"] if f"L{row['layer']}N{row['neuron']}" in shown]
    summary["n_analysed"] = len(result.neurons)
    return summary, inspection.dashboards()
