"""CLIP-InterpreT's views from the shell: `clip-lens segment`, `segment-eval` and `neighbors`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from clip_lens.cli.common import (
    DEFAULT_MODEL, _MAX_SCENES, _MODEL_HELP, _SEED_MAX, _check_outputs, _check_store_model, _fail, _json_file, _load,
    _out, _parse_layers, _plugin_function, _random_weights_note, _result_and_figure, _user_errors,
)


def _segmentation_images(hooked, images: Optional[Path], shapes: Optional[int], seed: int, attribute: str = "colour"):
    """A SegmentationData from a folder (images/ + masks/) or shapes-world scenes."""
    if (images is None) == (shapes is None):
        _fail("give exactly one image source: --images FOLDER or --shapes N.")
    if shapes is not None:
        from clip_lens.toy.evaluate import shapes_world_camouflage, shapes_world_version

        make = _plugin_function("segmentation", "shapes_world_segmentation")
        camouflage = shapes_world_camouflage(hooked)
        if camouflage:  # the scenes follow the model's world; say so, since they change every figure
            typer.echo(f"{hooked.model_name} was trained on camouflage scenes: drawing shapes-world v2 camouflage scenes.")
        return make(shapes, seed=seed, image_size=hooked.cfg.image_size[0], attribute=attribute,
                    version=shapes_world_version(hooked) or 1, camouflage=camouflage)
    return _plugin_function("segmentation", "folder_segmentation")(images, hooked.preprocess)


@_user_errors
def segment(
    text: str = typer.Option(..., "--text", "-t", help="the topic, e.g. 'a red shape'."),
    versus: Optional[str] = typer.Option(None, "--versus", help="a second text: contrastive maps (text − versus, versus − text)."),
    head: str = typer.Option("all", "--head", help="all, a head such as L3H0, or layers such as 2,3."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="pretrained tag or local checkpoint."),
    images: Optional[Path] = typer.Option(None, "--images", help="a folder of photos (searched recursively; its "
                                          "images/ sub-folder when it has one; no masks needed) or one image: the first 8 are mapped."),
    shapes: Optional[int] = typer.Option(None, "--shapes", min=1, max=_MAX_SCENES, help="use this many shapes-world scenes."),
    seed: int = typer.Option(1000, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes."),
    out: Path = typer.Option(Path("segment.png"), "--out", "-o", help="overlay figure NAME.png; the maps go next to it "
                             "as NAME.json (--out may name either)."),
    force: bool = typer.Option(False, "--force", help="replace existing NAME.png / NAME.json."),
) -> None:
    """Per-head topic segmentation (or contrastive, with --versus): heatmaps over the image patches."""
    from clip_lens import analyses
    from clip_lens.files import atomic_write
    from clip_lens.figures import figure_png

    maps, figure, outputs = _result_and_figure(out)
    _check_outputs(outputs, {"--images": images, "--pretrained": pretrained}, force)
    if (images is None) == (shapes is None):
        _fail("give exactly one image source: --images FOLDER or --shapes N.")
    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    if images is not None:  # photos: no masks (a map needs none)
        pixels = _plugin_function("segmentation", "folder_images")(images, hooked.preprocess, limit=8)[0]
    else:
        data = _segmentation_images(hooked, None, shapes, seed)
        pixels = data.loader(0, min(data.n, 8))[0]
    selection: Any = head if head == "all" or head.upper().startswith("L") else _parse_layers(head, "--head")
    if versus is None:
        result = analyses.get("segmentation")(hooked).run(pixels, text, head=selection)
    else:
        result = analyses.get("contrastive_segmentation")(hooked).run(pixels, text, versus, heads=selection)
    figure.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(figure, figure_png(result.plot(pixels)))
    saved = result.save(maps)
    typer.echo(f"Heatmaps of {len(pixels)} images written to {figure.resolve()} and {saved.resolve()}.")


@_user_errors
def segment_eval(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="pretrained tag or local checkpoint."),
    images: Optional[Path] = typer.Option(None, "--images", help="folder with images/NAME.png|jpg and masks/NAME.png."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="text file of class prompts, one per line (default for shapes: colour prompts)."),
    shapes: Optional[int] = typer.Option(None, "--shapes", min=1, max=_MAX_SCENES, help="evaluate on this many shapes-world scenes."),
    attribute: str = typer.Option("colour", "--attribute", help="shapes world: the attribute whose prompts are the classes."),
    seed: int = typer.Option(1000, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="save the table (JSON) here."),
    force: bool = typer.Option(False, "--force", help="replace an existing --out."),
) -> None:
    """Zero-shot segmentation: decomposition heatmaps against baselines that could beat them (all background, uniform, no-model chroma and colour-contrast maps, raw attention, random heads): pixel acc, object IoU, mIoU, mAP with bootstrap intervals.

    An image or mask of --images that cannot be decoded stops the run with one line naming it
    (skipping it would change the scores silently)."""
    from clip_lens import analyses
    from clip_lens.banks import load_bank

    if out is not None:  # checked before the (long) evaluation
        _check_outputs([_out(_json_file(out))], {"--images": images, "--classes": classes, "--pretrained": pretrained}, force)
    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    data = _segmentation_images(hooked, images, shapes, seed, attribute)
    prompts = load_bank(classes).texts if classes is not None else None
    result = analyses.get("segmentation_eval")(hooked).run(data, classes=prompts)
    typer.echo(result.to_markdown())
    if out is not None:
        typer.echo(f"Saved to {result.save(out).resolve()}")


def _score(value: float) -> str:
    """A score with three significant digits (5e-05 stays 5e-05, not 0.000)."""
    return f"{value:.3g}"


@_user_errors
def neighbors(
    store: Path = typer.Option(..., "--store", "-s", help="store folder written by `clip-lens collect`."),
    model: str = typer.Option(..., "--model", "-m", help="the model the store was collected with."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="the --pretrained the store was collected with."),
    text: Optional[list[str]] = typer.Option(None, "--text", "-t", help="query text(s): nearest images in the head's output space."),
    image: Optional[list[Path]] = typer.Option(None, "--image", help="query image file(s)."),
    head: Optional[str] = typer.Option(None, "--head", help="one head, e.g. L3H0, or the sum of several: L0H3,L3H0."),
    property: Optional[str] = typer.Option(None, "--property", help="a property label, e.g. colour (needs --labels)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="head label table written by `clip-lens spans --labels`."),
    k: int = typer.Option(10, "--k", min=1, help="neighbours per query."),
    metric: str = typer.Option("dot", "--metric", help="dot (as CLIP-InterpreT), cosine, or concepts (image queries: "
                               "compare the distributions over the property's texts; shares the property, ignores the rest)."),
    subspace: Optional[str] = typer.Option(None, "--subspace", help="texts: search in the span of the property's texts."),
    texts: Optional[Path] = typer.Option(None, "--texts", help="text file, one per line: the texts of --subspace texts or "
                                         "--metric concepts (default: the property's span texts), e.g. one prompt per colour."),
    out: Path = typer.Option(Path("neighbors.json"), "--out", "-o", help="result NAME.json; the thumbnails go next to it "
                             "as NAME.png (--out may name either)."),
    force: bool = typer.Option(False, "--force", help="replace existing NAME.json / NAME.png."),
    partial: bool = typer.Option(False, "--partial", help="read a store whose collect has not finished (only its finished "
                                 "chunks); without it such a store is refused, naming the missing chunks."),
) -> None:
    """Nearest store images of query images or texts, by one head or by the heads of a property."""
    import numpy as np
    import torch

    from clip_lens import analyses
    from clip_lens.banks import load_bank
    from clip_lens.collect import Store, store_thumbnails
    from clip_lens.files import atomic_write, load_image
    from clip_lens.figures import figure_png

    if text and image:  # one query kind per run: the printed result is labelled by its query
        _fail("give --text or --image, not both (each run answers one kind of query): run `clip-lens neighbors` once "
              "with the texts and once with the images, with different --out.")
    if not text and not image:
        _fail("give a query: --text TEXT or --image FILE (repeat either for several).")
    result_path, figure, outputs = _result_and_figure(out)
    _check_outputs(outputs, {"--store": store, "--image": image, "--labels": labels, "--texts": texts,
                             "--pretrained": pretrained}, force)
    query_images = [load_image(p, "--image file") for p in image or []]  # decoded once, before the model
    opened = Store.open(store, partial=partial)
    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    _check_store_model(opened, hooked, model, pretrained)
    table = None
    if labels is not None:
        table = _plugin_function("head_labels", "HeadLabelsResult").load(labels)
    chosen = None if head is None else [h.strip() for h in head.split(",") if h.strip()]
    options = dict(heads=chosen, property=property, labels=table, k=k, metric=metric, subspace=subspace,
                   texts=None if texts is None else load_bank(texts).texts)
    if image:
        pixels = torch.stack([hooked.preprocess(picture) for picture in query_images])
        result = analyses.get("neighbors")(hooked).run(opened, query_images=pixels, **options)
    else:
        result = analyses.get("neighbors")(hooked).run(opened, query_texts=text, **options)
    thumbnails = store_thumbnails(opened, hooked.cfg.image_size[0])
    queries = None
    if image:
        size = hooked.cfg.image_size[0]
        queries = np.stack([np.asarray(picture.resize((size, size))) for picture in query_images])
    png = figure_png(result.plot(thumbnails, queries))  # before writing anything: a failing plot leaves no half pair
    saved = result.save(result_path)
    atomic_write(figure, png)
    for q, (rows, scores) in enumerate(zip(result.indices.tolist(), result.scores.tolist())):
        query = text[q] if text else str(image[q])
        typer.echo(f"{query}: " + ", ".join(f"#{r} ({_score(s)})" for r, s in zip(rows, scores)))
    typer.echo(f"Saved {saved.resolve()} and {figure.resolve()}")
