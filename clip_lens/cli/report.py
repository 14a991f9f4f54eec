"""`clip-lens report`: the HTML/PNG report of a model (`clip_lens.report`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from clip_lens.cli.common import (
    DEFAULT_MODEL, _MAX_SCENES, _MODEL_HELP, _SEED_MAX, _check_outputs, _load, _out, _parse_overrides,
    _readable_images, _shapes_model, _user_errors,
)


@_user_errors
def report(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    pretrained: Optional[str] = typer.Option(
        None, "--pretrained", "-p", help="pretrained tag or local checkpoint; omitted: RANDOM weights (bundled models excepted)."
    ),
    n_images: int = typer.Option(8, "--n-images", min=1, max=_MAX_SCENES, help="number of synthetic images."),
    seed: int = typer.Option(0, "--seed", min=0, max=_SEED_MAX, help="seed of the synthetic images."),
    out: Path = typer.Option(Path("clip_lens_report"), "--out", "-o", help="output folder."),
    config_override: Optional[str] = typer.Option(
        None, "--config-override", help='JSON merged into the open_clip config, e.g. \'{"vision_cfg": {"layers": 2}}\'.'
    ),
    head_images: Optional[int] = typer.Option(
        None, "--head-images", min=0, max=_MAX_SCENES,
        help="shapes-world scenes for the head analyses (TextSpan, labels, metrics); default 2000 for the shapes-world models, 0 (off) otherwise.",
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="folder of real images for the head analyses."),
    bank: Optional[str] = typer.Option(None, "--bank", help="text bank: shapes-attributes, shapes, general or a text file (default: shapes-attributes for the "
                                        "shapes-world models, else general)."),
    sae: Optional[Path] = typer.Option(
        None, "--sae", help="an SAE folder (e.g. from `clip-lens sae train`): adds a Features section (names, "
        "frequencies, dashboards of its top features) over the head analyses' images (or 256 shapes-world scenes)."
    ),
    force: bool = typer.Option(False, "--force", help="write into an --out folder that holds files (a report's files are replaced)."),
) -> None:
    """Decompose images, run the head analyses and write figures, summary.json and report.html into --out."""
    from tqdm import tqdm

    typer.echo("clip-lens report: loading torch and the model code …", err=True)  # the imports take seconds
    from clip_lens.report import build_report

    overrides = _parse_overrides(config_override)
    if sae is not None:
        from clip_lens.sae import load_config

        load_config(sae)  # fail fast, before the model (the weights are read with it later)
    # a folder holding only the head analyses' store is a report interrupted while collecting: resumed
    interrupted = out.is_dir() and {entry.name for entry in out.iterdir()} == {"store"}
    _check_outputs([_out(out, folder=True, resume=interrupted)],
                   {"--pretrained": pretrained, "--images": images, "--bank": bank, "SAE": sae}, force)
    images, _ = _readable_images(images)
    start = time.perf_counter()
    if head_images is None:
        head_images = 2000 if _shapes_model(model) and images is None else 0
    with tqdm(total=(7 if head_images or images else 5) + (sae is not None), desc="clip-lens report", unit="step") as bar:
        bar.set_postfix_str("build model")
        hooked = _load(model, pretrained, overrides)
        if hooked.pretrained is None:
            bar.write(f"Note: no --pretrained given, so {model} has RANDOM weights: the report shows the machinery, "
                      "not what a trained model has learned.")
        bar.update(1)
        summary, written = build_report(
            hooked, out, n_images=n_images, seed=seed, progress=bar, extra={"config_overrides": overrides},
            head_images=head_images, head_source=images, bank=bank, sae=sae,
        )
    error = summary["sum_check"]["max_relative_error"]
    typer.echo(f"Sum check: terms add up to the image embedding, max relative error {error:.2e}.")
    typer.echo(f"Report written to {written['report.html'].resolve()} ({time.perf_counter() - start:.1f} s)")
