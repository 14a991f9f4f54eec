"""`clip-lens models`, `hooks` and `train-toy`: what a model is and offers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from clip_lens.cli.common import _SEED_MAX, _check_outputs, _fail, _load, _out, _user_errors


def models(
    all_models: bool = typer.Option(
        False, "--all", help="Every open_clip model: 'supported', or the reason it is not, and the pretrained tag count."
    ),
) -> None:
    """List the model names HookedCLIP supports (bundled ones first)."""
    # read from open_clip's config files and tag table without importing torch (0.2 s instead of 12 s)
    from clip_lens.catalog import fast_list_models as list_models, fast_model_coverage as model_coverage

    if not all_models:
        for name in list_models():
            typer.echo(name)
        return
    rows = model_coverage()
    width = max(len(row.name) for row in rows)
    for row in rows:
        typer.echo(f"{row.name:<{width}}  {row.n_tags:>2} tags  {row.reason or 'supported'}")
    pairs = sum(row.n_tags for row in rows)
    accepted = sum(row.n_tags for row in rows if row.reason is None)
    typer.echo(f"{accepted} of {pairs} pretrained (model, tag) pairs are supported "
               f"({sum(row.reason is None for row in rows)} of {len(rows)} model names).")


def _hook_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """``names`` (forward order) grouped per layer: the hooks before the blocks, ``blocks.0`` …
    ``blocks.N`` (``text.blocks.…`` for the text tower; a convolutional tower's ``stages.S`` and
    ``stages.S.blocks.B``), then the hooks after the blocks."""
    import re

    groups: dict[str, list[str]] = {}
    seen_block = False
    for name in names:
        match = re.match(r"((?:text\.)?(?:stages\.\d+\.)?blocks\.\d+)\.", name) or re.match(r"(stages\.\d+)\.", name)
        if match:
            seen_block = True
            key = match.group(1)
        else:
            key = "after the blocks" if seen_block else "before the blocks"
        groups.setdefault(key, []).append(name)
    order = ["before the blocks", *[key for key in groups if key.split(".")[-1].isdigit()], "after the blocks"]
    return [(key, groups[key]) for key in order if key in groups]


@_user_errors
def hooks(
    model: str = typer.Option(..., "--model", "-m", help="model name (see `clip-lens models`)."),
    tower: str = typer.Option("vision", "--tower", "-t", help="vision or text."),
) -> None:
    """Print every hook name of one tower of the full model, grouped per layer in forward order, with its
    shape for a batch of 1 (the model is built with random weights and run once on one input)."""
    if tower not in ("vision", "text"):
        _fail(f"--tower must be 'vision' or 'text', got '{tower}'.")
    import torch

    from clip_lens.errors import UnsupportedArchitectureError
    from clip_lens.loading import bundled_models, model_config, unsupported_feature

    overrides = None
    if model not in bundled_models():  # said before anything is built
        config = model_config(model)
        feature = unsupported_feature(config)
        if feature is not None:
            raise UnsupportedArchitectureError(
                f"'{model}' uses a {feature}, which HookedCLIP does not reproduce exactly, so it has no hooks to list. "
                "`clip-lens models --all` lists every open_clip model with the reason."
            )
        other = "text_cfg" if tower == "vision" else "vision_cfg"  # not listed: built with one layer, for speed
        if isinstance((config.get(other) or {}).get("layers"), int):
            overrides = {other: {"layers": 1}}
    hooked = _load(model, None, overrides)  # random init: the names and shapes do not depend on the weights
    hooked.eval()
    if tower == "vision":
        inputs: dict[str, Any] = {"image": torch.zeros(1, 3, *hooked.cfg.image_size)}
    else:
        cfg = hooked.text.cfg
        tokens = torch.zeros(1, cfg.context_length, dtype=torch.long)
        tokens[0, :3] = torch.tensor([cfg.vocab_size - 2, 1, cfg.vocab_size - 1])  # SOT, word, EOT
        inputs = {"text": tokens}
    on_tower = lambda name: name.startswith("text.") == (tower == "text")  # noqa: E731
    with torch.no_grad():
        _, cache = hooked.run_with_cache(**inputs, names_filter=on_tower)
    names = [name for name in cache.keys() if on_tower(name)]
    not_run = [name for name in hooked.hook_dict if on_tower(name) and name not in cache]  # e.g. optional paths
    shapes = {name: str(list(cache[name].shape)) for name in names}
    shapes.update({name: "(not run by a plain forward)" for name in not_run})
    groups = _hook_groups(names + not_run)
    n_blocks = sum(key.split(".")[-2] == "blocks" for key, _ in groups if "." in key)
    note = ""
    if tower == "text" and getattr(hooked.text, "unhooked_note", None):  # HF text tower: 2 hooks
        note = " (a Hugging Face model: only these hooks, its internals are not hooked)"
    typer.echo(f"# {model} {tower} tower: {len(shapes)} hooks, {n_blocks} blocks{note}; shapes for a batch of 1")
    width = max(len(name) for name in shapes)
    for key, members in groups:
        typer.echo(f"# {key}")
        for name in members:
            typer.echo(f"{name:<{width}}  {shapes[name]}")


@_user_errors
def train_toy(
    out: Path = typer.Option(Path("toy_shapes_run"), "--out", "-o", help="run folder (resumes if it holds a checkpoint)."),
    steps: int = typer.Option(2800, "--steps", min=1, help="training steps (the bundled model was trained for 2800)."),
    batch_size: int = typer.Option(256, "--batch-size", min=2, help="scenes per training step (each with its captions)."),
    seed: int = typer.Option(0, "--seed", min=0, max=_SEED_MAX, help="seed of the initialisation and of the training scenes."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop (and checkpoint) after this long."),
    force: bool = typer.Option(False, "--force", help="start a run in an --out folder that holds other files (a "
                               "folder with a checkpoint is always resumed; delete checkpoint.pt to start over)."),
) -> None:
    """Train the shapes-world CLIP (same as `python -m clip_lens.toy.train`)."""
    from clip_lens.toy.train import TrainConfig, train

    _check_outputs([_out(out, folder=True, resume=(out / "checkpoint.pt").is_file())], {}, force)

    meta = train(out, TrainConfig(steps=steps, batch_size=batch_size, seed=seed, max_minutes=max_minutes), log=typer.echo)
    typer.echo(f"done: {meta['steps_done']} steps in {meta['minutes']:.1f} min; weights in {out / 'model.safetensors'}")
