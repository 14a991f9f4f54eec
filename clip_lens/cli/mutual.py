"""`clip-lens mi`: mutual knowledge between the image and text towers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clip_lens.cli.common import (
    DEFAULT_MODEL, _MAX_SCENES, _MODEL_HELP, _SEED_MAX, _check_outputs, _concept_data, _load, _out,
    _plugin_function, _random_weights_note, _user_errors,
)


@_user_errors
def mutual_information(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="pretrained tag or local checkpoint."),
    images: Optional[Path] = typer.Option(None, "--images", help="folder with images/, labels.json and boxes.json (optional)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="text file of class names, one per line (default: labels.json's)."),
    shapes: Optional[int] = typer.Option(None, "--shapes", min=1, max=_MAX_SCENES, help="use this many shapes-world scenes (default 200)."),
    seed: int = typer.Option(1000, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes."),
    descriptors: str = typer.Option("shapes", "--descriptors", "-d", help="'shapes' or a JSON file {class: [descriptors]}."),
    methods: str = typer.Option("pca,kmeans", "--methods", help="part methods: pca, kmeans or both."),
    features: str = typer.Option("tokens", "--features", help="tokens or keys (GDC and parts)."),
    parts: int = typer.Option(5, "--parts", "-L", min=1, help="visual concepts per group."),
    u: int = typer.Option(50, "--u", min=1, help="textual concepts: top-u descriptors of the predicted class."),
    variant: str = typer.Option("paper", "--mi", help="paper (log count, as the paper's code) or bank (MI of bank indicators)."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Deletion/Insertion/AccDrop/AccInc with baselines."),
    corloc: bool = typer.Option(True, "--corloc/--no-corloc", help="CorLoc of GDC/PCA foregrounds (needs boxes)."),
    out: Path = typer.Option(Path("mi_report"), "--out", "-o", help="folder for the result JSON, figures and index.html."),
    force: bool = typer.Option(False, "--force", help="write into an --out folder that holds files (a run's files are replaced)."),
) -> None:
    """Mutual knowledge: visual vs textual concepts of each prediction, MI dynamics/AUC, explanation metrics."""
    from clip_lens import analyses

    _check_outputs([_out(out, folder=True)], {"--images": images, "--classes": classes, "--descriptors": descriptors,
                                             "--pretrained": pretrained}, force)
    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    data = _concept_data(hooked, images, shapes, seed, classes)
    result = analyses.get("mutual_knowledge")(hooked).run(
        data, descriptors=descriptors, methods=[m.strip() for m in methods.split(",")], features=features,
        n_parts=parts, u=u, mi=variant, evaluate=evaluate, corloc=corloc)
    typer.echo(result.to_markdown())
    shown = data.load(range(min(4, len(data))))
    page = _plugin_function("mutual_knowledge", "write_report")(result, shown, out)
    typer.echo(f"Report written to {page.resolve()}")
