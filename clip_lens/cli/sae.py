"""`clip-lens sae train` / `sae inspect`: sparse autoencoders from the shell (`clip_lens.sae`, `clip_lens.feature_report`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from clip_lens.cli.common import (
    DEFAULT_MODEL, _MAX_SCENES, _MODEL_HELP, _SEED_MAX, _Group, _check_outputs, _check_store_model, _default_bank,
    _fail, _load, _out, _random_weights_note, _readable_images, _shapes_model, _user_errors,
)


# --- clip-lens sae ---------------------------------------------------------------------------------
sae_app = typer.Typer(
    name="sae",
    help="Sparse autoencoders: train one on a hook point (`sae train`), name and show its features (`sae inspect`).",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # as the main app: help printed as written
)

SAE_TRAIN_FORMAT = "clip_lens.sae_train_command/1"
SAE_TRAIN_FILE = "train.json"
SAE_METRICS_FILE = "metrics.json"
SAE_TRAINING_DIR = "training"
SAE_POSITIONS = ("all", "patches", "cls", "pooled")
SAE_ARCHITECTURES = ("topk", "batchtopk", "relu")


def _at_least(value: Optional[float], option: str, low: float = 1) -> None:
    if value is not None and not value >= low:
        _fail(f"{option} must be at least {low:g}, got {value:g}.")


def _pretrained_setting(pretrained: Optional[str]) -> Optional[str]:
    """A local checkpoint as an absolute path (so that a rerun from another folder matches), else the tag."""
    if pretrained is not None and Path(pretrained).exists():
        return str(Path(pretrained).resolve())
    return pretrained


def _check_train_out(out: Path, settings: dict, force: bool = False) -> bool:
    """Refuse an --out that is a file, holds something this command did not write, or was started
    with other settings (checked before the model is loaded), unless ``force``. Returns whether the
    run there must start afresh (``force`` over a run started with other settings)."""
    from clip_lens.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (new, empty, or one this command started).")
    record = out / SAE_TRAIN_FILE
    if record.is_file():
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{record} cannot be read ({exc}); delete {out} to start over, or choose another --out.")
        if not isinstance(stored, dict) or stored.get("format") != SAE_TRAIN_FORMAT:
            raise InputError(f"{record} was not written by `clip-lens sae train`; choose another --out.")
        old = stored.get("settings", {})
        changed = [key for key in settings if old.get(key) != settings[key]]
        started = (out / SAE_TRAINING_DIR / "checkpoint.pt").exists() or (out / "cfg.json").exists()
        if changed and started:  # (killed before its first checkpoint: nothing to lose, start afresh)
            if force:
                return True
            parts = "; ".join(f"--{key.replace('_', '-')} {old.get(key)!r} there, {settings[key]!r} now" for key in changed)
            raise InputError(
                f"--out {out} holds an SAE trained with other settings ({parts}); rerun with the same options to "
                "resume or re-evaluate it, pass --force to train afresh over it, or choose another --out."
            )
        return False
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an SAE that `clip-lens sae train` did not write" if (out / "cfg.json").exists() else "other files"
        raise InputError(f"--out {out} already holds {what} (no {SAE_TRAIN_FILE}); choose a new or empty folder, "
                         "or pass --force to write into it.")
    return False


def _activation_source(hooked, images: Any, hook: str, positions: str, batch_size: int, buffer_size: Optional[int],
                       token_batch: int, seed: int):
    """The training stream; without --buffer-size the buffer holds the whole data set's rows (at
    most 65,536, at least two forward batches and two training batches)."""
    from clip_lens.sae import ActivationSource

    common = dict(positions=positions, batch_size=batch_size, seed=seed)
    if buffer_size is None:
        probe = ActivationSource(hooked, images, hook, buffer_size=max(2**16, 4 * batch_size * (hooked.cfg.n_ctx + 1)),
                                 token_batch=1, **common)
        _ = probe.d_in  # one forward pass of one image: rows per image
        per_image = max(1, probe.max_batch_rows // batch_size)
        buffer_size = max(2 * token_batch, 2 * probe.max_batch_rows, min(2**16, len(probe.data) * per_image))
    # keep: a data set that fits in the buffer runs through the model once, however many steps
    return ActivationSource(hooked, images, hook, buffer_size=buffer_size, token_batch=token_batch, keep=True, **common)


@sae_app.command("train")
@_user_errors
def sae_train(
    hook: str = typer.Option(..., "--hook", help="image-tower hook point, e.g. blocks.3.hook_resid_post (see `clip-lens hooks`)."),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the SAE (SAELens format), metrics.json and the checkpoint; "
                             "rerunning the same command resumes an interrupted run."),
    d_sae: int = typer.Option(..., "--d-sae", help="number of features."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    pretrained: Optional[str] = typer.Option(
        None, "--pretrained", "-p", help="pretrained tag or local checkpoint; omitted: RANDOM weights (bundled models excepted)."
    ),
    positions: str = typer.Option("all", "--positions", help="rows per image: all, patches, cls or pooled (one row for pooled hooks: all)."),
    images: Optional[Path] = typer.Option(None, "--images", help="folder of training images (searched recursively)."),
    shapes: Optional[int] = typer.Option(None, "--shapes", max=_MAX_SCENES, help="train on this many shapes-world scenes instead of --images."),
    seed: int = typer.Option(0, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes."),
    architecture: str = typer.Option("topk", "--architecture", help="topk, batchtopk (saved as jumprelu) or relu (L1)."),
    k: Optional[int] = typer.Option(None, "--k", help="topk/batchtopk: active features per row (default min(32, d_sae/4))."),
    l1: Optional[float] = typer.Option(None, "--l1", help="relu: the L1 penalty, e.g. 1.0 (required for relu; larger is sparser)."),
    matryoshka: Optional[str] = typer.Option(
        None, "--matryoshka", help="nested dictionary sizes, e.g. 8,32: the first 8, the first 32 and all features must each "
        "reconstruct (a Matryoshka SAE: general features first, less feature absorption)."
    ),
    steps: int = typer.Option(1000, "--steps", help="training steps (one batch of --token-batch rows each)."),
    token_batch: int = typer.Option(1024, "--token-batch", help="rows per training step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384))."),
    batch_size: int = typer.Option(32, "--batch-size", help="images per forward pass."),
    buffer_size: Optional[int] = typer.Option(
        None, "--buffer-size", help="rows in the shuffle buffer (default: the data set's rows, at most 65536)."
    ),
    train_seed: int = typer.Option(0, "--train-seed", min=0, max=_SEED_MAX, help="seed of the SAE's initialisation and of the shuffling."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="steps between checkpoints."),
    eval_images: int = typer.Option(
        512, "--eval-images", max=_MAX_SCENES, help="held-out shapes-world scenes (seed 1000) to evaluate on after --shapes training, "
        "and for toy-shapes' zero-shot accuracy."
    ),
    force: bool = typer.Option(
        False, "--force", help="write into an --out that holds other files, or train afresh over a run started there "
        "with other settings or data (its checkpoint is deleted); the same command without --force resumes."
    ),
) -> None:
    """Train a sparse autoencoder on one hook point, save it in SAELens format, evaluate it (metrics.json)."""
    import math

    from clip_lens.errors import InputError

    if (images is None) == (shapes is None):
        _fail("give exactly one image source: --images FOLDER or --shapes N.")
    if architecture not in SAE_ARCHITECTURES:
        _fail(f"--architecture must be one of {', '.join(SAE_ARCHITECTURES)}; got '{architecture}'.")
    if positions not in SAE_POSITIONS:
        _fail(f"--positions must be one of {', '.join(SAE_POSITIONS)}; got '{positions}'.")
    for value, option in ((d_sae, "--d-sae"), (steps, "--steps"), (token_batch, "--token-batch"),
                          (batch_size, "--batch-size"), (buffer_size, "--buffer-size"), (shapes, "--shapes"),
                          (checkpoint_every, "--checkpoint-every"), (eval_images, "--eval-images")):
        _at_least(value, option)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        _fail(f"--lr must be a positive number, got {lr}.")
    if architecture == "relu":
        if k is not None:
            _fail("--k applies to topk and batchtopk; a relu SAE is made sparse by --l1 (drop --k).")
        if l1 is None:
            _fail("--architecture relu needs --l1, its sparsity penalty (e.g. --l1 1.0; larger is sparser).")
        if not (math.isfinite(l1) and l1 >= 0):
            _fail(f"--l1 must be a number >= 0, got {l1}.")
    else:
        if l1 is not None:
            _fail(f"--l1 is the relu SAE's penalty; {architecture} is made sparse by --k (drop --l1).")
        k = max(1, min(32, d_sae // 4)) if k is None else k
        if not 1 <= k <= d_sae:
            _fail(f"--k must be between 1 and --d-sae ({d_sae}), got {k}.")
    if buffer_size is not None and token_batch > buffer_size // 2:
        _fail(f"--token-batch ({token_batch}) must be at most half of --buffer-size ({buffer_size}); raise --buffer-size.")
    if images is not None and not images.is_dir():
        _fail(f"--images {images} is not a folder; give a folder of images (searched recursively).")
    if hook.startswith("text."):
        _fail(f"{hook} is a text-tower hook; `clip-lens sae train` trains on images (image-tower hooks such as "
              "blocks.3.hook_resid_post). Train text SAEs in Python: ActivationSource(model, texts, hook).")
    prefixes = None
    if matryoshka is not None:
        try:
            prefixes = [int(part) for part in matryoshka.split(",")]
        except ValueError:
            _fail(f"--matryoshka must be comma-separated sizes such as 8,32; got '{matryoshka}'.")
        if prefixes != sorted(set(prefixes)) or prefixes[0] < 1 or prefixes[-1] >= d_sae:
            _fail(f"--matryoshka sizes must increase and lie in 1..{d_sae - 1} (below --d-sae); got '{matryoshka}'.")
    settings = {
        "model": model, "pretrained": _pretrained_setting(pretrained), "hook": hook, "positions": positions,
        "images": None if images is None else str(images.resolve()), "shapes": shapes,
        "seed": seed if shapes is not None else None, "architecture": architecture, "d_sae": d_sae, "k": k, "l1": l1,
        "steps": steps, "token_batch": token_batch, "lr": lr, "batch_size": batch_size, "buffer_size": buffer_size,
        "train_seed": train_seed, "matryoshka": prefixes,
    }
    restart = _check_train_out(out, settings, force)  # before the (slow) model load
    _check_outputs([_out(out, folder=True, resume=True)], {"--images": images, "--pretrained": pretrained}, force)
    images_or_paths, _ = _readable_images(images)

    from clip_lens.collect import model_world_images
    from clip_lens.files import atomic_write
    from clip_lens.sae import evaluate_sae, save_sae, train_sae
    from clip_lens.toy.evaluate import HELD_OUT_SEED

    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    hooked.check_hook_name(hook)
    if shapes is not None and hooked.cfg.image_size is None:
        raise InputError(f"{model} has no fixed image size, so shapes-world scenes cannot be rendered for it; use --images.")
    source_images: Any = images_or_paths
    if shapes is not None:
        source_images = model_world_images(hooked, shapes, seed)
    source = _activation_source(hooked, source_images, hook, positions, batch_size, buffer_size, token_batch, train_seed)
    described = source.describe()
    record = out / SAE_TRAIN_FILE
    checkpoint_dir = out / SAE_TRAINING_DIR
    if record.is_file() and not restart:
        stored = json.loads(record.read_text(encoding="utf-8")).get("source", {})
        changed = [key for key in ("data_fingerprint", "n_items", "weights") if stored.get(key) != described.get(key)]
        if changed and force:
            restart = True
        elif changed:
            what = "the model's weights" if "weights" in changed else "the images"
            raise InputError(
                f"--out {out} was started on other data: {what} changed since ({', '.join(changed)} differ); "
                "rerun with the original images and weights, pass --force to train afresh over it, or choose another --out."
            )
    if restart:  # --force over a run of other settings or data: its checkpoint must not be resumed
        import shutil

        if checkpoint_dir.is_dir():
            shutil.rmtree(checkpoint_dir)
        record.unlink(missing_ok=True)
        typer.echo(f"Note: --force: the run in {out} (other settings or data) is discarded; training afresh.", err=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(record, json.dumps({"format": SAE_TRAIN_FORMAT, "settings": settings, "source": described}, indent=1))
    try:
        result = train_sae(
            source, d_sae, architecture=architecture, k=k, l1=l1, steps=steps, lr=lr, seed=train_seed, matryoshka=prefixes,
            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, progress=True,
        )
    except BaseException:
        if not (checkpoint_dir / "checkpoint.pt").exists():
            record.unlink(missing_ok=True)  # nothing trained yet: the folder is free for other settings
            if checkpoint_dir.is_dir() and not any(checkpoint_dir.iterdir()):
                checkpoint_dir.rmdir()
        raise
    save_sae(result.sae, out)

    toy = _shapes_model(hooked.model_name)
    if images is not None:
        eval_source: Any = images_or_paths
        evaluated_on = f"the {len(source.data)} training images of {images} (not held out)"
    else:
        eval_source = None if toy else model_world_images(hooked, eval_images, HELD_OUT_SEED)
        evaluated_on = f"{eval_images} held-out shapes-world scenes (seed {HELD_OUT_SEED})"
    evaluation = evaluate_sae(hooked, result.sae, eval_source, n_images=eval_images).to_dict()
    if toy and images is not None and evaluation.get("zero_shot") is not None:
        evaluated_on += f"; zero-shot accuracy on {eval_images} held-out shapes-world scenes"
    metrics = {
        "format": "clip_lens.sae_metrics/1", "model": model, "pretrained": hooked.pretrained, "hook_name": hook,
        "positions": positions, "architecture": architecture, "saved_as": result.sae.cfg.architecture, "d_sae": d_sae,
        "k": k, "l1": l1, "steps": steps, "resumed_from": result.resumed_from, "evaluated_on": evaluated_on,
        **evaluation, "training": result.final,
    }
    atomic_write(out / SAE_METRICS_FILE, json.dumps(metrics, indent=1) + "\n")

    sparsity = f"k={k}" if k is not None else f"l1={l1:g}"
    resumed = "" if result.resumed_from is None else f", resumed from step {result.resumed_from}"
    if result.resumed_from == steps:
        resumed = " (already finished: re-saved and re-evaluated)"
    typer.echo(f"Trained a {architecture} SAE ({d_sae} features, {sparsity}) on {hook} (positions {positions}) of "
               f"{model}: {steps} steps of {token_batch} rows{resumed}.")
    typer.echo(f"Evaluated on {evaluated_on}:")
    typer.echo(f"  explained variance  {evaluation['explained_variance']:.4f}")
    typer.echo(f"  L0                  {evaluation['l0']:.2f} active features per row")
    dead = evaluation["dead_fraction"]
    typer.echo(f"  dead features       {dead:.1%} ({round(dead * d_sae)} of {d_sae} never fired)")
    if evaluation.get("zero_shot"):
        pairs = ", ".join(f"{key} {evaluation['zero_shot'][key]:.3f} / {evaluation['zero_shot_clean'][key]:.3f}"
                          for key in evaluation["zero_shot"])
        typer.echo(f"  zero-shot accuracy, SAE spliced / clean: {pairs}")
    typer.echo(f"SAE saved in SAELens format to {out.resolve()}; metrics in {(out / SAE_METRICS_FILE).resolve()}")


def _parse_features(text: str) -> list[int]:
    try:
        features = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"--features must be comma-separated feature indices such as 0,5,9; got '{text}'.")
    if not features:
        _fail("--features is empty; give feature indices such as 0,5,9 (or --top-features N).")
    return features


@sae_app.command("inspect")
@_user_errors
def sae_inspect(
    sae_dir: Path = typer.Argument(..., help="SAE folder (SAELens format), e.g. the --out of `clip-lens sae train`."),
    out: Path = typer.Option(..., "--out", "-o", help="folder for features.json, the dashboards (PNG) and features.html."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the model the SAE was trained on (default: the one it records)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="the --pretrained it was trained with."),
    images: Optional[Path] = typer.Option(None, "--images", help="folder of images (searched recursively)."),
    shapes: Optional[int] = typer.Option(None, "--shapes", max=_MAX_SCENES, help="use this many shapes-world scenes."),
    seed: int = typer.Option(1000, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes (default: the held-out world)."),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="the images of a store written by `clip-lens collect`."),
    bank: Optional[str] = typer.Option(
        None, "--bank", help="texts to name features with: shapes-attributes, shapes, general, a text file, or none "
        "(default: shapes-attributes for the shapes-world models, else general; skipped with a note when the hook cannot be named)."
    ),
    features: Optional[str] = typer.Option(None, "--features", help="features to show, e.g. 0,5,9."),
    top_features: Optional[int] = typer.Option(
        None, "--top-features", help="show the first N features of the ranking (default 16): selective ones by "
        "frequency, then dense ones; never dead ones."
    ),
    k: int = typer.Option(9, "--k", help="top images per feature."),
    names: int = typer.Option(5, "--names", help="bank texts kept per feature."),
    batch_size: int = typer.Option(32, "--batch-size", help="images per forward pass."),
    force: bool = typer.Option(False, "--force", help="write into an --out folder that holds files (dashboards of the same names are replaced)."),
    partial: bool = typer.Option(False, "--partial", help="read a store whose collect has not finished (only its finished "
                                 "chunks); without it such a store is refused, naming the missing chunks."),
) -> None:
    """Name an SAE's features (bank texts through the frozen read-out) and show the images they fire on most."""
    from clip_lens.errors import InputError

    given = [name for name, value in (("--images", images), ("--shapes", shapes), ("--store", store)) if value is not None]
    if len(given) != 1:
        _fail(f"give exactly one image source: --images FOLDER, --shapes N or --store STORE (got {', '.join(given) or 'none'}).")
    if features is not None and top_features is not None:
        _fail("give --features or --top-features, not both.")
    for value, option in ((shapes, "--shapes"), (top_features, "--top-features"), (k, "--k"), (names, "--names"),
                          (batch_size, "--batch-size")):
        _at_least(value, option)
    chosen = _parse_features(features) if features is not None else None
    _check_outputs([_out(out, folder=True)], {"SAE": sae_dir, "--store": store, "--images": images, "--bank": bank,
                                              "--pretrained": pretrained}, force)

    from clip_lens.banks import load_bank
    from clip_lens.collect import Store, model_world_images
    from clip_lens.feature_report import inspect_features, naming_problem, recorded_model, render_page
    from clip_lens.files import atomic_write
    from clip_lens.sae import load_sae

    if images is not None and not images.is_dir():
        _fail(f"--images {images} is not a folder; give a folder of images (searched recursively).")
    readable, _ = _readable_images(images)
    sae = load_sae(sae_dir)
    recorded = recorded_model(sae)
    if not (model or recorded):
        raise InputError(f"the SAE in {sae_dir} does not record its model; pass --model.")
    text_bank = None
    if bank is None or bank.lower() != "none":
        text_bank = load_bank(bank or _default_bank(model or recorded))  # fail fast
    opened = Store.open(store, partial=partial) if store is not None else None
    if model is None:
        from clip_lens.errors import ModelNotFoundError

        model = recorded
        try:
            hooked = _load(model, pretrained, None)
        except ModelNotFoundError as exc:
            raise InputError(f"the SAE records the model '{model}', which cannot be loaded here ({exc}); pass --model.") from exc
    else:
        hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    if opened is not None:
        _check_store_model(opened, hooked, model, pretrained)
    if text_bank is not None:
        problem = naming_problem(hooked, sae.cfg.hook_name) if not sae.cfg.hook_name.startswith(("text.", "term:")) else None
        if problem is not None:
            if bank is not None:
                _fail(f"cannot name these features: {problem} Drop --bank (or pass --bank none) to get the dashboards "
                      "without names.")
            typer.echo(f"Note: the features are not named ({problem}); the dashboards are made without names.", err=True)
    if shapes is not None:
        if hooked.cfg.image_size is None:
            raise InputError(f"{model} has no fixed image size, so shapes-world scenes cannot be rendered for it; use --images.")
        source: Any = model_world_images(hooked, shapes, seed)
    else:
        source = opened if opened is not None else readable
    inspection = inspect_features(
        hooked, sae, source, features=chosen, n_features=top_features or 16, k=k, bank=text_bank, names_top=names,
        batch_size=batch_size, progress=True,
    )
    summary = {"sae_dir": str(sae_dir.resolve()), **inspection.to_dict()}
    if summary["readout"] == "direct":
        typer.echo(f"Note: {sae.cfg.hook_name} is read by later blocks too, so the names follow the direct path to the "
                   "embedding only (a logit-lens approximation).", err=True)
    pngs = inspection.dashboards()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pngs.items():
        atomic_write(out / name, data)
    atomic_write(out / "features.json", json.dumps(summary, indent=1) + "\n")
    title = f"SAE features: {sae.cfg.hook_name} of {model} ({sae_dir.name})"
    atomic_write(out / "features.html", render_page(summary, pngs, title))
    for row in summary["features"]:
        named = f"  \"{row['names'][0][0]}\" ({row['names'][0][1]:.2f})" if row["names"] else ""
        typer.echo(f"feature {row['feature']:>5}  fires on {row['frequency']:6.1%}  max {row['max_activation']:.3g}{named}")
    typer.echo(f"{len(pngs)} dashboards, features.json and features.html written to {out.resolve()}")
