"""The app's Neurons tab: MLP neurons through their second-order effects (Gandelsman et al., ICLR 2025).

Computed once on first use, under the app's model lock, then cached: the ``neurons`` analysis
(`clip_lens.analyses`) over the first store images (at most `MAX_ANALYSED`, and fewer when the
``[image, layer, neuron, d_embed]`` effects would pass `MAX_EFFECT_BYTES`) for every layer but the last
(no attention layer follows it), with text codes over the builtin ``shapes-attributes`` bank for the
shapes-world models and ``general`` for any other; and the image-independent maps of `second_order`
for those layers, so a query image costs one forward pass and one contraction.

Endpoints (methods of [`Api`][clip_lens.app.Api], which delegates here):

=================  ==============================================================================
``neuron_image``   ``images``, ``names``, ``k`` (8): per image the neurons with the largest
                   ‖ψ_n(image)‖, their codes and patch activations (``blocks.{l}.mlp.hook_post``)
``neuron_search``  ``text``, ``k`` (8): the neurons whose rank-1 direction has the largest cosine with
                   the text's embedding, their codes and top store images
=================  ==============================================================================
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens.figures import figure_data_url, heat_rgba, plain, png_data_url

if TYPE_CHECKING:
    from clip_lens.app.api import Api, Fields

MAX_ANALYSED = 512
"""Most store images the neuron table (effects, rank-1 directions, codes) is computed on."""
MAX_EFFECT_BYTES = 2**30
"""Bound on the effects held while the table is computed (first and second order, float32)."""
STRIP = 4
"""Top store images shown per neuron found by text."""


@dataclass
class NeuronTable:
    result: Any
    """The `NeuronsResult` over the analysed store images (with its ``rank1`` tensors)."""
    unit: Tensor
    """``[layer · neuron, d_embed]`` unit rank-1 directions, layer-major as ``result.neurons``."""
    maps: Any
    """`SecondOrderMaps` of the analysed layers."""
    n_images: int


class NeuronsTab:
    """The Neurons tab of one `Api` (the caller of every method holds no lock; they take the model lock)."""

    def __init__(self, api: "Api"):
        self.api = api
        self._table: NeuronTable | None = None

    def info(self) -> dict[str, Any]:
        table = self._table
        return {"computed": table is not None, "n_images": None if table is None else table.n_images,
                "layers": None if table is None else table.result.layers}

    def _analysed(self) -> NeuronTable:
        """The neuron table (computed once; the caller holds the model lock)."""
        if self._table is not None:
            return self._table
        from clip_lens import analyses
        from clip_lens.second_order import second_order_maps
        from clip_lens.toy.evaluate import shapes_world_version

        api, model = self.api, self.api.model
        cfg = model.cfg
        if api._store_images is None:
            raise InputError(f"store {api.store.path} does not record its images, so the neurons cannot be analysed on "
                             "them; collect the store from a folder or from shapes-world scenes.")
        layers = list(range(max(cfg.n_layers - 1, 1)))
        per_image = 2 * 4 * len(layers) * (cfg.d_mlp or 0) * cfg.d_embed
        n = min(api.n_rows, MAX_ANALYSED, max(2, MAX_EFFECT_BYTES // max(per_image, 1)))
        if n < 2:
            raise InputError("the neurons tab needs a store of at least 2 images.")
        api.check_time("before analysing the neurons", budget=False)
        pixels = torch.stack([model.preprocess(image) for image in api._store_images(range(n))])
        bank = "shapes-attributes" if shapes_world_version(model) is not None else "general"
        maps = second_order_maps(model, layers=layers)
        result = analyses.get("neurons")(model).run(pixels, bank=bank, layers=layers, k=8, top_k=min(100, n))
        unit = torch.nn.functional.normalize(result.rank1.direction.reshape(-1, cfg.d_embed).float(), dim=-1)
        self._table = NeuronTable(result, unit, maps, n)
        return self._table

    def _row(self, table: NeuronTable, flat: int) -> dict[str, Any]:
        row = table.result.neurons[flat]
        return {"neuron": f"L{row.layer}N{row.neuron}", "layer": row.layer, "index": row.neuron,
                "effect_norm": row.effect_norm, "significant": row.significant, "explained": row.explained,
                "code": [[t, c] for t, c in zip(row.texts, row.coefficients)], "code_cosine": row.code_cosine}

    def image(self, fields: "Fields") -> dict[str, Any]:
        """Per query image, the neurons with the largest second-order effect norm on it."""
        from clip_lens.second_order import second_order

        k = fields.integer("k", 8, 1, 32)
        pixels, shown = self.api.images(fields)
        queries = self.api.query_names(fields)
        model = self.api.model
        with self.api.hold():
            table = self._analysed()
            self.api.check_time("after analysing the neurons")
            effects = second_order(model, pixels, maps=table.maps).effects.float().cpu()  # [q, layer, neuron, d]
            norms = effects.norm(dim=-1).flatten(1)  # [q, layer · neuron], layer-major
            per_layer = norms.shape[1] // len(table.result.layers)
            hooks = [f"blocks.{layer}.mlp.hook_post" for layer in table.result.layers]
            _, cache = model.run_with_cache(pixels, names_filter=hooks)
            grid_h, grid_w = model.cfg.grid_size
            answers, panels = [], []
            for q in range(len(pixels)):
                values, order = norms[q].topk(min(k, norms.shape[1]))
                neurons = []
                for value, flat in zip(values.tolist(), order.tolist()):
                    entry = self._row(table, flat)
                    acts = cache[hooks[flat // per_layer]][q, -grid_h * grid_w:, entry["index"]].float().cpu()
                    entry.update(effect=value, map=acts.reshape(grid_h, grid_w).tolist())
                    neurons.append(entry)
                answers.append({"neurons": neurons})
                panels.append((shown[q], queries[q], neurons))
            figure = figure_data_url(_image_figure(panels))
        return {"images": answers, "figure": figure, "n_analysed": table.n_images, "layers": table.result.layers}

    def search(self, fields: "Fields") -> dict[str, Any]:
        """The neurons whose rank-1 direction points most along the text's embedding (cosine)."""
        from clip_lens.banks import encode_bank, load_bank

        text = fields.text("text")
        k = fields.integer("k", 8, 1, 32)
        with self.api.hold():
            table = self._analysed()
            embedding = torch.nn.functional.normalize(encode_bank(self.api.model, load_bank([text]))[0].float().cpu(), dim=-1)
            cosine = table.unit @ embedding
            values, order = cosine.topk(min(k, len(cosine)))
            per_layer = len(table.result.neurons) // len(table.result.layers)
            scores = table.result.rank1.scores  # [image, layer, neuron]
            neurons = []
            for value, flat in zip(values.tolist(), order.tolist()):
                entry = self._row(table, flat)
                rows = scores[:, flat // per_layer, flat % per_layer].topk(min(STRIP, table.n_images)).indices.tolist()
                entry.update(cosine=value, top_rows=rows, strip=png_data_url(_png(np.concatenate(
                    list(self.api.thumbnail_loader(rows)), axis=1))))
                neurons.append(entry)
        return {"text": text, "neurons": neurons, "n_analysed": table.n_images, "layers": table.result.layers}


def _png(picture: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(picture, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_figure(panels: list) -> Any:
    """One row per query: the image, then each top neuron's patch activations over it."""
    from matplotlib.figure import Figure

    columns = 1 + max(len(neurons) for _, _, neurons in panels)
    fig = Figure(figsize=(1.7 * columns, 1.9 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (picture, name, neurons) in enumerate(panels):
        axes[r, 0].imshow(picture)
        axes[r, 0].set_title(plain(name, 30), fontsize=8)
        h, w = picture.shape[:2]
        for c, entry in enumerate(neurons, 1):
            heat = np.asarray(entry["map"], dtype=np.float32)
            top = float(heat.max())
            axes[r, c].imshow(picture)
            if top > 0:
                axes[r, c].imshow(heat_rgba(heat / top), extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
            first = plain(entry["code"][0][0], 22) if entry["code"] else ""
            axes[r, c].set_title(f"{entry['neuron']} |ψ|={entry['effect']:.2f}\n{first}", fontsize=7)
    return fig
