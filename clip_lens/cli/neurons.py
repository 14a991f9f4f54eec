"""`clip-lens neurons`: second-order effects of MLP neurons, named with sparse text (`clip_lens.neurons_report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from clip_lens.cli.common import (
    DEFAULT_MODEL, _MAX_SCENES, _MODEL_HELP, _SEED_MAX, _check_outputs, _check_store_model, _default_bank, _fail, _load,
    _out, _parse_layers, _random_weights_note, _readable_images, _user_errors,
)

# the largest [image, layer, neuron, d_embed] effect tensor the command computes in memory (float32, first and
# second order): beyond it, fewer images or layers, or a store (`collect --neurons`)
_MAX_EFFECT_BYTES = 8 * 2**30


def _neuron_labels(text: Optional[str]) -> Optional[list[tuple[int, int]]]:
    if text is None:
        return None
    from clip_lens.neurons_report import parse_neuron_label

    labels = [parse_neuron_label(part) for part in text.split(",") if part.strip()]
    if not labels:
        _fail("--neurons is empty; name neurons as L<layer>N<index>, e.g. L1N64,L2N7 (or drop it for the top --top).")
    return labels


def _bank(spec: str, d_embed: int) -> Any:
    """A bank spec for the analysis: a name or text file (`load_bank`), or an ``.npz`` of precomputed
    embeddings (arrays ``texts`` and ``embeddings`` ``[text, d_embed]``)."""
    if not spec.lower().endswith(".npz"):
        from clip_lens.banks import load_bank

        return load_bank(spec)
    import numpy as np
    import torch

    from clip_lens.errors import InputError

    try:
        with np.load(spec, allow_pickle=False) as data:
            texts, embeddings = [str(t) for t in data["texts"]], torch.from_numpy(np.asarray(data["embeddings"], dtype=np.float32))
    except (KeyError, ValueError) as exc:
        raise InputError(f"--bank {spec} must be an .npz with arrays 'texts' and 'embeddings' [text, {d_embed}] ({exc}); "
                         "or give a bank name or a text file, one text per line.") from exc
    return texts, embeddings


def _store_effects(opened: Any, hooked: Any, layers: Optional[list[int]]) -> tuple[Any, list[int]]:
    """The stored second-order effects (`collect --neurons`) as a `SecondOrder` in embedding units."""
    from clip_lens.errors import InputError
    from clip_lens.second_order import SecondOrder

    stored = list(opened.meta.get("neuron_layers") or [])
    if "neurons" not in opened.arrays or not stored:
        raise InputError(f"store {opened.path} has no neuron effects; collect it with `clip-lens collect --neurons "
                         "LAYERS` (e.g. --neurons 0,1,2), or give --shapes N / --images FOLDER instead of --store.")
    if opened.meta.get("directions"):
        raise InputError(f"store {opened.path} holds neuron effects projected on directions; the neurons command needs "
                         "them in embedding space: collect again without directions.")
    n_layers = hooked.cfg.n_layers
    wanted = stored if layers is None else sorted({layer % n_layers for layer in layers})
    missing = [layer for layer in wanted if layer not in stored]
    if missing:
        raise InputError(f"store {opened.path} has the neurons of layers {stored}, not {missing}; pass --layers among "
                         f"those, or collect again with --neurons {','.join(map(str, sorted(set(stored + missing))))}.")
    import torch

    # one stored layer at a time: the store may hold layers that are not wanted
    effects = torch.stack([opened.read("neurons", index=(stored.index(layer),)) for layer in wanted], 1).float()
    norm = opened.read("embedding_norm").float()
    effects *= norm[:, None, None, None]  # stored divided by ‖embedding‖
    embedding = opened.read("embedding").float() * norm[:, None]  # the store's own embeddings, not a new forward
    d_mlp = effects.shape[2]
    return SecondOrder(effects=effects, first_order=None, layers=wanted, neurons=torch.arange(d_mlp),
                       embedding=embedding), wanted


@_user_errors
def neurons(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="pretrained tag or local checkpoint."),
    shapes: Optional[int] = typer.Option(None, "--shapes", min=2, max=_MAX_SCENES, help="analyse this many shapes-world scenes."),
    seed: int = typer.Option(1000, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes (default: the held-out world)."),
    images: Optional[Path] = typer.Option(None, "--images", help="folder of images (searched recursively) or one image."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="a store collected with `clip-lens collect --neurons "
                                         "LAYERS`: its effects are read, not recomputed (its images are shown)."),
    layers: str = typer.Option("all", "--layers", help="MLP layers, e.g. 0,1 (default all but the last, which no attention "
                               "layer follows; with --store: the layers it holds)."),
    show: Optional[str] = typer.Option(None, "--neurons", help="neurons to show instead of the top ones, e.g. L1N64,L2N7."),
    bank: Optional[str] = typer.Option(None, "--bank", help="texts to code neurons with: shapes-attributes, shapes, general, a "
                                       "text file, or an .npz of 'texts' and 'embeddings' (default: shapes-attributes "
                                       "for the shapes-world models, else general)."),
    components: int = typer.Option(8, "--components", "-k", min=1, help="texts per neuron code (OMP atoms)."),
    top: int = typer.Option(10, "--top", min=1, help="neurons shown (largest mean effect norm first)."),
    per_neuron: int = typer.Option(6, "--images-per-neuron", min=1, help="top images per shown neuron."),
    top_k: int = typer.Option(100, "--top-k", min=2, help="images per neuron for its rank-1 direction."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="images per forward pass."),
    out: Path = typer.Option(Path("neurons"), "--out", "-o", help="folder for neurons.json, the dashboards (PNG) and neurons.html."),
    force: bool = typer.Option(False, "--force", help="write into an --out folder that holds files (files of the same names are replaced)."),
    partial: bool = typer.Option(False, "--partial", help="read a store whose collect has not finished (only its finished chunks)."),
) -> None:
    """Second-order effects of MLP neurons (Gandelsman et al., ICLR 2025): per neuron its mean effect, share of
    significant images, rank-1 direction and sparse text code; the top neurons' images with their activation maps.

    Writes --out/neurons.json (every analysed neuron), one dashboard PNG per shown neuron
    (neuron_L<layer>N<index>.png: top images with the neuron's patch activations, its code) and
    --out/neurons.html (the table sorted by effect, codes and dashboards embedded)."""
    given = [name for name, value in (("--images", images), ("--shapes", shapes), ("--store", store)) if value is not None]
    if len(given) != 1:
        _fail(f"give exactly one image source: --shapes N, --images FOLDER or --store STORE (got {', '.join(given) or 'none'}).")
    chosen_layers = _parse_layers(layers, "--layers")
    if chosen_layers is None:
        _fail("--layers none selects no layer; give 'all' or layer indices such as 0,1.")
    wanted = _neuron_labels(show)
    _check_outputs([_out(out, folder=True)], {"--images": images, "--store": store, "--bank": bank, "--pretrained": pretrained}, force)
    readable, _ = _readable_images(images)

    import torch

    from clip_lens import analyses
    from clip_lens.collect import Store, image_source, model_world_images, store_images
    from clip_lens.errors import InputError
    from clip_lens.files import atomic_write
    from clip_lens.neurons_report import inspect_neurons, neuron_label, render_page

    opened = Store.open(store, partial=partial) if store is not None else None
    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    if opened is not None:
        _check_store_model(opened, hooked, model, pretrained)
    from clip_lens.second_order import second_order_maps

    second_order_maps(hooked, layers=[0], neurons=[0])  # towers without an affine neuron path: refused before any work
    text_bank = _bank(bank or _default_bank(model), hooked.cfg.d_embed)
    d_mlp, n_layers = hooked.cfg.d_mlp, hooked.cfg.n_layers
    for layer, index in wanted or []:
        if not 0 <= layer < n_layers:
            raise InputError(f"neuron {neuron_label(layer, index)}: the image tower has layers 0..{n_layers - 1}.")
        if d_mlp is not None and not 0 <= index < d_mlp:
            raise InputError(f"neuron {neuron_label(layer, index)} does not exist: the MLPs have {d_mlp} neurons (0 … {d_mlp - 1}).")
    effects, ids = None, None
    selected = None if chosen_layers == "all" else chosen_layers
    if opened is not None:
        effects, picked = _store_effects(opened, hooked, selected)
        selected = picked
        rows = [row for start, stop in opened.done_rows() for row in range(start, stop)] if partial else range(opened.n_images)
        pictures = store_images(opened, hooked.cfg.image_size[0])
        pixels = torch.stack([hooked.preprocess(picture) for picture in pictures(list(rows))])
        ids = opened.ids(partial=partial)
        description = str(opened.meta.get("source") or f"store {opened.path}")
    else:
        if shapes is not None:
            source = model_world_images(hooked, shapes, seed)
        else:
            source = image_source(readable, hooked.preprocess)
        n_analysed = len(selected) if selected is not None else max(n_layers - 1, 1)
        need = 2 * 4 * len(source) * n_analysed * (d_mlp or 0) * hooked.cfg.d_embed
        if need > _MAX_EFFECT_BYTES:
            raise InputError(f"{len(source)} images × {n_analysed} layers of {d_mlp} neurons need {need / 2**30:.1f} GiB of effects "
                             f"(at most {_MAX_EFFECT_BYTES // 2**30} GiB here); give fewer images or --layers, or collect a store "
                             "with `clip-lens collect --neurons LAYERS` and pass --store.")
        pixels, _ = source.load(0, len(source))
        ids, description = source.ids, source.description
    result = analyses.get("neurons")(hooked).run(pixels, bank=text_bank, layers=selected, k=components, top_k=top_k,
                                                 batch_size=batch_size, effects=effects)
    inspection = inspect_neurons(hooked, pixels, result, n_neurons=top, n_images=per_neuron, neurons=wanted, ids=ids,
                                 description=description, batch_size=batch_size)
    summary = inspection.to_dict()
    pngs = inspection.dashboards()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        atomic_write(out / name, data)
    atomic_write(out / "neurons.json", json.dumps(summary, indent=1) + "\n")
    atomic_write(out / "neurons.html", render_page(summary, pngs, f"Neurons of {model}"))
    for row in inspection.rows:
        code = ", ".join(f"{t} ({c:+.2f})" for t, c in list(zip(row.texts, row.coefficients))[:3])
        typer.echo(f"{neuron_label(row.layer, row.neuron):>9}  mean |effect| {row.effect_norm:.3g}  "
                   f"significant {row.significant:6.1%}  rank-1 {row.explained:4.0%}  {code}")
    typer.echo(f"{len(pngs)} dashboards, neurons.json and neurons.html written to {out.resolve()}")
