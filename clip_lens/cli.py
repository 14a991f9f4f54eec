"""``clip-lens``: the command-line shell over :mod:`clip_lens` (report, models, hooks).

Errors raised by clip_lens (:class:`~clip_lens.ClipLensError`) are printed as one line and
exit with status 2; the work itself lives in :mod:`clip_lens.report`.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from clip_lens.errors import ClipLensError

app = typer.Typer(
    name="clip-lens",
    help="TransformerLens-style mechanistic interpretability for OpenCLIP models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SHRUNK = {"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}}
EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _user_errors(command: Callable) -> Callable:
    """Turn a ClipLensError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ClipLensError as exc:
            _fail(str(exc))

    return wrapper


def _parse_overrides(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--config-override is not valid JSON ({exc.msg} at character {exc.pos}): {text}")
    if not isinstance(value, dict):
        _fail(f"--config-override must be a JSON object such as '{{\"vision_cfg\": {{\"layers\": 2}}}}', got {text}")
    return value


def _load(model: str, pretrained: Optional[str], overrides: Optional[dict]):
    import logging

    from clip_lens import HookedCLIP

    root = logging.getLogger()  # open_clip logs "initialized randomly"; report says it itself
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        return HookedCLIP.from_pretrained(model, pretrained, config_overrides=overrides)
    finally:
        root.setLevel(level)


@app.command()
@_user_errors
def report(
    model: str = typer.Option("toy-shapes", "--model", "-m", help="model name (see `clip-lens models`)."),
    pretrained: Optional[str] = typer.Option(
        None, "--pretrained", "-p", help="pretrained tag or local checkpoint; omitted: RANDOM weights (bundled models excepted)."
    ),
    n_images: int = typer.Option(8, "--n-images", min=1, help="number of synthetic images."),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic images."),
    out: Path = typer.Option(Path("clip_lens_report"), "--out", "-o", help="output folder."),
    config_override: Optional[str] = typer.Option(
        None, "--config-override", help='JSON merged into the open_clip config, e.g. \'{"vision_cfg": {"layers": 2}}\'.'
    ),
    head_images: Optional[int] = typer.Option(
        None, "--head-images", min=0,
        help="shapes-world scenes for the head analyses (TextSpan, labels, metrics); default 1000 for toy-shapes, 0 (off) otherwise.",
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="folder of real images for the head analyses."),
    bank: Optional[str] = typer.Option(None, "--bank", help="text bank: general, shapes or a text file (default: shapes for toy-shapes)."),
) -> None:
    """Decompose images, run the head analyses and write figures, summary.json and report.html into --out."""
    from tqdm import tqdm

    from clip_lens.report import build_report

    overrides = _parse_overrides(config_override)
    start = time.perf_counter()
    if head_images is None:
        head_images = 1000 if model == "toy-shapes" and images is None else 0
    with tqdm(total=6 if head_images or images else 5, desc="clip-lens report", unit="step") as bar:
        bar.set_postfix_str("build model")
        hooked = _load(model, pretrained, overrides)
        if hooked.pretrained is None:
            bar.write(f"Note: no --pretrained given, so {model} has RANDOM weights: the report shows the machinery, "
                      "not what a trained model has learned.")
        bar.update(1)
        summary, written = build_report(
            hooked, out, n_images=n_images, seed=seed, progress=bar, extra={"config_overrides": overrides},
            head_images=head_images, head_source=images, bank=bank,
        )
    error = summary["sum_check"]["max_relative_error"]
    typer.echo(f"Sum check: terms add up to the image embedding, max relative error {error:.2e}.")
    typer.echo(f"Report written to {written['report.html'].resolve()} ({time.perf_counter() - start:.1f} s)")


@app.command()
def models() -> None:
    """List the open_clip model names HookedCLIP supports."""
    from clip_lens import list_models

    for name in list_models():
        typer.echo(name)


@app.command()
@_user_errors
def hooks(
    model: str = typer.Option(..., "--model", "-m", help="open_clip model name."),
    tower: str = typer.Option("vision", "--tower", "-t", help="vision or text."),
) -> None:
    """Print the hook names of one tower in forward order, with their shapes (batch of 1)."""
    if tower not in ("vision", "text"):
        _fail(f"--tower must be 'vision' or 'text', got '{tower}'.")
    import torch

    from clip_lens.loading import bundled_models

    hooked = _load(model, None, None if model in bundled_models() else SHRUNK)
    if tower == "vision":
        inputs: dict[str, Any] = {"image": torch.zeros(1, 3, *hooked.cfg.image_size)}
    else:
        cfg = hooked.text.cfg
        tokens = torch.zeros(1, cfg.context_length, dtype=torch.long)
        tokens[0, :3] = torch.tensor([cfg.vocab_size - 2, 1, cfg.vocab_size - 1])  # SOT, word, EOT
        inputs = {"text": tokens}
    _, cache = hooked.run_with_cache(**inputs)
    names = [name for name in cache.keys() if name.startswith("text.") == (tower == "text")]
    shrunk = "" if model in bundled_models() else ", shrunk to 1 layer for speed (blocks.0.* repeats for every layer)"
    typer.echo(f"# {model} {tower} tower{shrunk}; shapes for a batch of 1")
    width = max(len(name) for name in names)
    for name in names:
        typer.echo(f"{name:<{width}}  {list(cache[name].shape)}")


@app.command("train-toy")
def train_toy(
    out: Path = typer.Option(Path("toy_shapes_run"), "--out", "-o", help="run folder (resumes if it holds a checkpoint)."),
    steps: int = typer.Option(2800, "--steps", min=1),
    batch_size: int = typer.Option(256, "--batch-size", min=2),
    seed: int = typer.Option(0, "--seed"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop (and checkpoint) after this long."),
) -> None:
    """Train the shapes-world CLIP (same as `python -m clip_lens.toy.train`)."""
    from clip_lens.toy.train import TrainConfig, train

    meta = train(out, TrainConfig(steps=steps, batch_size=batch_size, seed=seed, max_minutes=max_minutes), log=typer.echo)
    typer.echo(f"done: {meta['steps_done']} steps in {meta['minutes']:.1f} min; weights in {out / 'model.safetensors'}")


def main() -> None:  # pragma: no cover - `python -m clip_lens.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
