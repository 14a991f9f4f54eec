"""``clip-lens``: the command-line shell over `clip_lens`.

Commands: ``report``, ``models``, ``hooks``, ``train-toy``, and the head-analysis pipeline
``collect`` → ``spans`` (TextSpan, optionally head labels) → ``compare``; ``analyses`` lists the
installed analysis plugins; ``sae train`` / ``sae inspect`` train sparse autoencoders and show their
features (`clip_lens.feature_report`). Plugins are reached through `clip_lens.analyses` only.

Errors raised by clip_lens (`ClipLensError`), filesystem errors (``OSError``) and usage errors
(a missing option, a bad number, an unknown option or command: ``_Group``) are printed as one
``error:`` line and exit with status 2; file arguments that are FIFOs or devices are refused before
any work (``_refuse_special_files``). The work itself lives in
the library (`clip_lens.report`, `clip_lens.collect`, the plugins). Library messages
that recommend a Python call (``clip_lens.list_models()``) are printed with the CLI command that
does the same (``clip-lens models``; ``_CLI_HINTS``). Every command that reads a store with a model
refuses a store collected with another model or other weights (``_check_store_model``), and every
command with a ``--model`` defaults to ``DEFAULT_MODEL`` (toy-shapes-v2).

Help: plain click help, no Rich markup (a help text is printed as written, brackets included);
every parameter has help, and options show INTEGER, NUMBER, TEXT or PATH as their placeholder
(``_Group``). ``tests/acceptance/test_cli_help.py`` walks the command tree and checks both.

Outputs: every command that writes checks its output paths before any work
(`clip_lens.files.check_outputs`: never an input, never two outputs on one path, a writable
folder, no file where a folder goes or the reverse) and refuses existing outputs unless ``--force``;
an unfinished run that the same command resumes (``collect``, ``sae train``, ``train-toy``) is not
an existing output. Files are written with `clip_lens.files.atomic_write`. Image files are
decoded with `clip_lens.files.load_image` (one line naming a bad file); ``collect``, ``report
--images`` and ``sae train/inspect --images`` skip unreadable images of a folder and say how many.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from typer.core import TyperGroup

from clip_lens.errors import ClipLensError

# Value placeholders in --help (typer's own read "<int range>", "<str>"): by the option's type.
_METAVARS = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "path": "PATH", "list[Path]": "PATH",
             "list[str]": "TEXT"}



def _shapes_model(name: Optional[str]) -> bool:
    """A bundled model trained on the shapes world (toy-shapes, its checkpoints, toy-shapes-v2)."""
    from clip_lens.toy.evaluate import shapes_world_version

    return shapes_world_version(name or "") is not None


def _readable_metavars(command: Any) -> None:
    """Give every parameter of ``command`` (and of its sub-commands) without a metavar one that reads
    well in ``--help``: INTEGER, NUMBER, TEXT or PATH for options (flags show none), the upper-case
    name for arguments."""
    for param in getattr(command, "params", []):
        if param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()  # SAE_DIR, FILES (typer's own: "sae_dir <path>", "files... <list[Path]>")
            param.display_type_rich = lambda ctx: None  # the name and the help say what it is
        elif param.param_type_name == "option" and param.metavar is None and not getattr(param, "is_flag", False):
            try:
                label = param.display_type(None).strip("<>")
            except Exception:  # pragma: no cover - a type typer cannot label: keep its own
                continue
            param.metavar = _METAVARS.get(label.removesuffix(" range"))
    for sub in getattr(command, "commands", {}).values():
        _readable_metavars(sub)


# click's UsageError (missing option, bad value, unknown option, unknown command), found through typer's
# public BadParameter: typer >= 0.24 vendors its own copy of click, older ones use click itself.
_USAGE_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")
# the UsageError a group raises to print its help when called without a command: help, not a failure
_HELP_REQUEST = getattr(importlib.import_module(_USAGE_ERROR.__module__), "NoArgsIsHelpError", ())


@contextlib.contextmanager
def _one_line_usage_errors(command_path: str) -> Iterator[None]:
    """Print a usage error (missing option, bad number or choice, unknown option or command) as one
    ``error:`` line naming the ``--help`` to read, exit status 2, instead of click's three-line block.
    ``command_path`` names the command when the error does not (``clip-lens hooks``)."""
    try:
        yield
    except _HELP_REQUEST:
        raise
    except _USAGE_ERROR as exc:
        message = exc.format_message().strip()
        path = exc.ctx.command_path if exc.ctx is not None else command_path
        _fail(f"{message}{'' if message.endswith('.') else '.'} Run `{path} --help` for the usage.")


class _Group(TyperGroup):
    """The ``clip-lens`` group (and ``clip-lens sae``): readable option metavars in every ``--help``,
    and usage errors of the group and of every command below it as one ``error:`` line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _readable_metavars(self)

    def make_context(self, info_name: Optional[str], args: list[str], parent: Any = None, **extra: Any) -> Any:
        path = " ".join(part for part in (parent.command_path if parent else "", info_name or self.name or "") if part)
        with _one_line_usage_errors(path):  # the group's own options: `clip-lens --bogus`
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        given = [*getattr(ctx, "_protected_args", []), *ctx.args][:1]  # read before click consumes them
        path = " ".join([ctx.command_path, *[name for name in given if name in self.commands]])
        with _one_line_usage_errors(path):  # the command's name, then its options and their values
            return super().invoke(ctx)


app = typer.Typer(
    name="clip-lens",
    help="TransformerLens-style mechanistic interpretability for OpenCLIP models.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help, no Rich markup: help texts are printed as written ('{class: [descriptors]}' keeps
    # its brackets, which Rich would take for a style tag and drop)
    rich_markup_mode=None,
)

EXIT_USER_ERROR = 2
# the default --model of every command that has one (issue 31: one default everywhere), and the default
# text bank: shapes-attributes for the shapes-world models (as the report's head analyses), general otherwise
DEFAULT_MODEL = "toy-shapes-v2"
_MODEL_HELP = f"model name (see `clip-lens models`; default {DEFAULT_MODEL})."
# --seed / --train-seed: the range every seeded library accepts (numpy's legacy seeds are below 2**32)
_SEED_MAX = 2**32 - 1
# scene counts (--shapes, --n-images …): clip_lens.toy.world.MAX_SCENES, not imported (it imports torch)
_MAX_SCENES = 1_000_000


def _fail(message: str) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _os_error_message(exc: OSError) -> str:
    """One sentence for a filesystem error: the path, the reason and what to do."""
    from clip_lens.files import os_error_fix

    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return f"{where}{reason}; {os_error_fix(exc)}."


# Library messages name Python calls (they are read from Python too); on the command line the same
# advice names the commands. (pattern, replacement), applied in order to every error _user_errors prints.
_CLI_HINTS = (
    (r"clip_lens\.list_models\(\) lists the names", "`clip-lens models` lists the names"),
    (r"\(clip_lens\.list_models\(\)\)", "(`clip-lens models`)"),
    (r"clip_lens\.list_models\(\)", "`clip-lens models`"),
    (r"create one with clip_lens\.collect\b", "create one with `clip-lens collect`"),
    (r"run collect again with the same arguments to finish it, or read\(\.\.\., partial=True\) for the finished images",
     "run the same `clip-lens collect` command again to finish it"),
    (r" \(or collect\(\.\.\.\) with the same arguments\)", ""),
    (r"remove them or pass dedupe=True to keep the first of each", "remove them from the file"),
    # the offline-weights errors of clip_lens.loading (check_tag_reachable, load_open_clip)
    (r"pass its local path as pretrained= \(with tag=('[^']*')? for its preprocessing\)",
     "pass its local path as --pretrained PATH"),
    (r"pass its local path: from_pretrained\([^)]*\) keeps the tag's preprocessing",
     "pass its local path as --pretrained PATH (with the same --model)"),
)


def _cli_hints(message: str) -> str:
    """``message`` with the Python calls it recommends replaced by the CLI commands that do the same."""
    import re

    for pattern, replacement in _CLI_HINTS:
        message = re.sub(pattern, replacement, message)
    return message


# string options that may name a file (a local checkpoint, a text bank, a descriptor file); Path options are files
_FILE_TEXT_OPTIONS = ("pretrained", "bank", "descriptors")


def _option_names() -> dict[str, str]:
    """Parameter name → how the running command's help calls it (``"image"`` → ``"--image"``)."""
    click_globals = importlib.import_module(_USAGE_ERROR.__module__.rpartition(".")[0] + ".globals")
    context = click_globals.get_current_context(silent=True)
    params = getattr(getattr(context, "command", None), "params", [])
    return {param.name: (param.opts[0] if param.param_type_name == "option" else param.name.upper()) for param in params}


def _refuse_special_files(kwargs: dict) -> None:
    """Refuse a command's file arguments that are FIFOs, devices or sockets before any work
    (`clip_lens.files.require_regular`): reading one would block forever or never end."""
    from clip_lens.files import require_regular, special_file

    for key, value in kwargs.items():
        for item in value if isinstance(value, list) else [value]:
            is_file_argument = isinstance(item, Path) or (key in _FILE_TEXT_OPTIONS and isinstance(item, str))
            if is_file_argument and special_file(item) is not None:
                require_regular(item, _option_names().get(key, key))


def _user_errors(command: Callable) -> Callable:
    """Turn a ClipLensError or a filesystem error (OSError: read-only folder, full disk …) into one
    line on stderr and exit status 2 (no traceback). File arguments that are FIFOs or devices are
    refused first (`_refuse_special_files`)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _refuse_special_files(kwargs)
            return command(*args, **kwargs)
        except ClipLensError as exc:
            _fail(_cli_hints(str(exc)))
        except OSError as exc:
            _fail(_os_error_message(exc))

    return wrapper


def _check_outputs(outputs: list, inputs: dict, force: bool) -> None:
    """`clip_lens.files.check_outputs` (before any work)."""
    from clip_lens.files import check_outputs

    check_outputs(outputs, inputs, force)


def _out(path: Path, name: Optional[str] = None, folder: bool = False, resume: bool = False):
    from clip_lens.files import Output

    return Output(path, name or f"--out {path}", folder=folder, resume=resume)


def _json_file(path: Path, option: str = "--out") -> Path:
    """A JSON result's path: it must end in .json (a result is one file, never a folder of them)."""
    if path.suffix.lower() != ".json":
        _fail(f"{option} {path} must be a file name ending in .json (the result is saved as JSON).")
    return path


def _result_and_figure(out: Path) -> tuple[Path, Path, list]:
    """``(NAME.json, NAME.png, outputs)`` of a command that writes a JSON result and its PNG figure:
    ``--out`` may name either; the other goes next to it."""
    if out.suffix.lower() not in (".json", ".png"):
        _fail(f"--out {out} must end in .json or .png (the result is written as NAME.json and its figure as NAME.png).")
    result, figure = out.with_suffix(".json"), out.with_suffix(".png")
    given, other = (result, figure) if out.suffix.lower() == ".json" else (figure, result)
    kind = "result" if other == result else "figure"
    return result, figure, [_out(given), _out(other, f"the {kind} {other} (written next to --out {out})")]


def _readable_images(images: Optional[Path], option: str = "--images") -> tuple[Any, int]:
    """``(source, n_skipped)``: ``images`` (a folder or one file) for `clip_lens.collect.image_source`,
    as the list of its image files that decode when some do not: those are skipped, with a note on
    stderr naming them (``None`` and missing paths are returned as they are, for the library to explain)."""
    if images is None or not images.exists():
        return images, 0
    from clip_lens.errors import InputError
    from clip_lens.files import load_image, readable_images

    if not images.is_dir():
        load_image(images, f"{option} file")  # one image: nothing to skip to
        return images, 0
    from clip_lens.collect import IMAGE_SUFFIXES
    from clip_lens.shards import refuse_mixed_folder

    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    refuse_mixed_folder(images, paths)  # loose images next to tar shards: neither is dropped silently
    good, bad = readable_images(paths)
    if not bad:
        return images, 0
    listed = "; ".join(f"{path} {reason}" for path, reason in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not good:
        raise InputError(f"none of the {len(paths)} images under {option} {images} can be read: {listed}.")
    typer.echo(f"Note: skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of {len(paths)} under {images}: "
               f"{listed}", err=True)
    return good, len(bad)


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
    with tqdm(total=(6 if head_images or images else 5) + (sae is not None), desc="clip-lens report", unit="step") as bar:
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


@app.command()
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


@app.command()
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


@app.command("train-toy")
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


def _parse_layers(text: str, option: str) -> Any:
    """``"all"`` → ``"all"``, ``"none"`` → None, ``"0,1,-1"`` → ``[0, 1, -1]`` (else a one-line error)."""
    value = text.strip().lower()
    if value in ("all", "none"):
        return None if value == "none" else "all"
    try:
        layers = [int(part) for part in value.split(",")]
    except ValueError:
        _fail(f"{option} must be 'all', 'none' or comma-separated layer indices such as 0,1,2; got '{text}'.")
    return layers


def _plugin_function(analysis: str, name: str) -> Callable:
    """A helper function of the package that provides ``analysis`` (reached through the registry:
    the core never imports plugins by name)."""
    from clip_lens import analyses

    return analyses.plugin_function(analysis, name)


def _random_weights_note(hooked, model: str) -> None:
    if hooked.pretrained is None:
        typer.echo(f"Note: no --pretrained given, so {model} has RANDOM weights.", err=True)


def _default_bank(model: Optional[str]) -> str:
    """The default text bank of every command: shapes-attributes for the shapes-world models (the
    report's head analyses use it), general for the others."""
    return "shapes-attributes" if _shapes_model(model) else "general"


def _check_store_model(store: Any, hooked: Any, model: str, pretrained: Optional[str]) -> None:
    """Refuse to pair a store with a model other than the one it was collected with: another model
    name, or other weights (the store's ``weights`` fingerprint, `clip_lens.collect.weights_fingerprint`).
    Random weights (no --pretrained) differ in every process, so a store collected with them can never
    be queried again: the fix is to collect with --pretrained. Used by every command that reads a store
    with a model (``spans``, ``neighbors``, ``app --store``, ``sae inspect --store``)."""
    from clip_lens.collect import weights_fingerprint
    from clip_lens.errors import InputError

    meta = store.meta
    where = f"store {store.path}"
    collected_with = meta.get("model")
    if collected_with not in (None, "custom") and collected_with != hooked.model_name:
        raise InputError(f"{where} was collected with model '{collected_with}', not '{model}'; pass --model {collected_with}.")
    recorded = meta.get("weights")
    if recorded is None:  # a store collected from Python without a fingerprint: nothing to compare
        return
    here = weights_fingerprint(hooked)
    if here == recorded:
        return
    stored_tag = meta.get("pretrained")
    if stored_tag in (None, "None"):
        fix = ("it was collected with RANDOM weights (no --pretrained), which differ in every process, so no other "
               "command can reproduce them: collect it again with --pretrained (a tag or a local checkpoint) and pass "
               "the same --pretrained here")
    elif str(stored_tag).startswith("bundled:"):
        fix = f"pass --model {collected_with} without --pretrained (the store was collected with its bundled weights)"
    else:
        fix = f"pass the same --model/--pretrained as `clip-lens collect` did: --model {collected_with} --pretrained {stored_tag}"
        if pretrained is None:
            fix += " (without --pretrained this model has RANDOM weights)"
    raise InputError(f"{where} was collected with other weights of {collected_with} (weights fingerprint {recorded}, "
                     f"this model's {here}); {fix}.")


@app.command("collect")
@_user_errors
def collect_command(
    model: str = typer.Option(..., "--model", "-m", help="model name (see `clip-lens models`)."),
    pretrained: Optional[str] = typer.Option(
        None, "--pretrained", "-p", help="pretrained tag or local checkpoint; omitted: RANDOM weights (bundled models excepted)."
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="folder of images (searched recursively), one image, or "
                                          "WebDataset tar shards: a .tar, a folder of them, or a pattern such as "
                                          "'train-{000000..000099}.tar'."),
    shapes: Optional[int] = typer.Option(None, "--shapes", min=1, max=_MAX_SCENES, help="use this many shapes-world scenes instead of --images."),
    seed: int = typer.Option(0, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes."),
    out: Path = typer.Option(..., "--out", "-o", help="store folder; an unfinished store made by the same command is resumed."),
    heads: str = typer.Option("all", "--heads", help="layers whose per-head terms are kept: all, none or e.g. 0,1,2."),
    tokens: str = typer.Option("none", "--tokens", help="layers whose per-head, per-token terms are kept (large): none, all or e.g. 11."),
    chunk_size: int = typer.Option(256, "--chunk-size", min=1, help="images per store chunk (the unit of resumption)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="images per forward pass."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16 / fp16: the forward pass and the "
                                  "decomposition under autocast (faster on GPUs; errors against fp32 in docs: Concepts → Scale)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="processes decoding images ahead of the model "
                                          "(default: the CPUs the model leaves free, at most 8: all but one with a GPU, "
                                          "those beyond torch's threads on CPU)."),
    force: bool = typer.Option(False, "--force", help="collect again into an --out that holds a finished store: the "
                               "new store replaces it once it is finished (an unfinished store is always resumed)."),
) -> None:
    """Stream images through the model into a resumable store of direct contributions (for `spans`).

    --images is a folder of images, one image, or WebDataset-style tar shards (a .tar file, a folder
    of them, or a pattern such as 'train-{000000..000099}.tar'). Images that cannot be decoded
    (corrupt, truncated, too large …) are skipped and counted, never fatal; the store names them.
    Under `torchrun --nproc_per_node N` (also with --nnodes, the store on a shared file system) the
    N processes split the chunks and write one store, the same as a single process writes."""
    import shutil

    from clip_lens.collect import Store, collect, replacing_folder, resumable_folder, shapes_world_images
    from clip_lens.distributed import launched, process_group
    from clip_lens.errors import InputError
    from clip_lens.precision import PRECISIONS

    if (images is None) == (shapes is None):
        _fail("give exactly one image source: --images FOLDER or --shapes N.")
    launched()  # a bad launch environment (MASTER_PORT=abc …) is refused before any work
    head_layers, token_layers = _parse_layers(heads, "--heads"), _parse_layers(tokens, "--tokens")
    finished, replace, damaged = 0, False, {}
    if (out / "zarr.json").is_file():
        try:
            existing = Store.open(out, partial=True)
            finished, replace = len(existing.done_chunks()), existing.complete
            if replace and existing.checked:
                damaged = existing.verify()  # a finished store with damaged chunks is repaired, not replaced
                replace, finished = not damaged, finished - len(damaged)
        except InputError:
            pass  # collect explains what is wrong with the folder
    staging = replacing_folder(out)  # a forced run collects here (under --out's lock), then takes --out's place
    outputs = [_out(out, folder=True, resume=True)]  # a store in --out is resumed (or, finished, handled below)
    if replace and force:
        outputs.append(_out(staging, f"the folder {staging} (where --force collects before replacing --out)", folder=True,
                            resume=True))
    _check_outputs(outputs, {"--images": images, "--pretrained": pretrained}, force)  # before the (slow) model load
    if not resumable_folder(out):  # a folder of other things (an interrupted creation's leftovers are resumed)
        raise InputError(f"{out} exists and is not a clip_lens store; choose an empty or new folder for --out "
                         "(--force replaces only a finished store).")
    if replace and not force:
        raise InputError(f"--out {out} holds a finished store ({existing.n_images} images); pass --force to collect "
                         "again (the new store replaces it when finished), or choose another --out.")
    if precision not in PRECISIONS:  # before the (slow) model load
        *names, last = PRECISIONS
        _fail(f"--precision must be {', '.join(names)} or {last}, got {precision!r}.")
    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    if shapes is not None:
        if hooked.cfg.image_size is None:
            raise InputError(f"{model} has no fixed image size, so shapes-world scenes cannot be rendered for it; use --images.")
        source: Any = shapes_world_images(shapes, seed, hooked.cfg.image_size[0])
    else:
        source = images
    with process_group(str(hooked.device)) as job:  # under torchrun: the ranks share the store, rank 0 reports
        lead = job is None or job.rank == 0
        store = collect(
            hooked, source, out, heads=head_layers, tokens=token_layers, chunk_size=chunk_size, batch_size=batch_size,
            precision=precision, workers=workers, progress=lead, replace=replace,
        )
    if not lead:
        return
    bad = store.skipped()
    listed = "; ".join(f"{name or f'row {row}'}: {reason}" for row, (name, reason) in list(bad.items())[:5])
    if bad and store.n_done == 0:
        if not finished:  # a store of no image, made by this command: not left behind
            shutil.rmtree(out)
        raise InputError(f"none of the {store.n_images} images of --images {images} can be read: {listed}.")
    if replace:  # collect swapped the new store in under --out's lock
        typer.echo(f"Replaced the finished store in {out} (--force).")
    elif damaged:
        typer.echo(f"Repaired: recomputed {len(damaged)} damaged chunk(s) ({', '.join(map(str, sorted(damaged)))}); "
                   f"{finished} of {store.n_chunks} chunks were intact.")
    elif finished:
        typer.echo(f"Resumed: {finished} of {store.n_chunks} chunks were already done.")
    changed = store.recomputed.get("changed", [])
    if changed:
        typer.echo(f"Note: the images of {len(changed)} finished chunk(s) changed since they were collected "
                   f"({', '.join(map(str, changed))}); they were recomputed.", err=True)
    kept = f"per-head layers {store.head_layers}" if store.head_layers else "no per-head terms"
    if store.token_layers:
        kept += f", per-token layers {store.token_layers}"
    if bad:
        more = f"; and {len(bad) - 5} more (Store.skipped() lists them)" if len(bad) > 5 else ""
        typer.echo(f"Note: skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of {store.n_images}: {listed}{more}", err=True)
    skipped = f"; skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} (named above)" if bad else ""
    typer.echo(f"Store {out.resolve()}: {store.n_done} images in {store.n_chunks} chunks ({kept}){skipped}.")


@app.command()
@_user_errors
def spans(
    store: Path = typer.Option(..., "--store", "-s", help="store folder written by `clip-lens collect`."),
    model: str = typer.Option(..., "--model", "-m", help="the model the store was collected with."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="the --pretrained the store was collected with."),
    bank: Optional[str] = typer.Option(
        None, "--bank", help="text bank: shapes-attributes, shapes, general or a text file, one text per line (default: "
        "shapes-attributes for the shapes-world models, as in `clip-lens report`, else general)."
    ),
    m: int = typer.Option(10, "--m", min=1, help="texts per head."),
    layers: Optional[str] = typer.Option(None, "--layers", help="layers to analyse, e.g. 10,11, or all (default: the last 4 collected)."),
    out: Path = typer.Option(Path("spans.json"), "--out", "-o", help="where to save the spans (JSON)."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="also label each head (head_labels, offline prototype labeler) and save the table here (JSON)."
    ),
    force: bool = typer.Option(False, "--force", help="replace existing --out / --labels files."),
) -> None:
    """TextSpan on every head of a store: the texts that span each head's outputs (and optionally head labels)."""
    from tqdm import tqdm

    from clip_lens import analyses
    from clip_lens.banks import load_bank
    from clip_lens.collect import Store
    from clip_lens.errors import InputError

    outputs = [_out(_json_file(out))] + ([_out(_json_file(labels, "--labels"), f"--labels {labels}")] if labels else [])
    _check_outputs(outputs, {"--store": store, "--bank": bank, "--pretrained": pretrained}, force)
    text_bank = load_bank(bank or _default_bank(model))  # fail fast, before the model
    opened = Store.open(store)
    if not opened.complete:
        raise InputError(
            f"store {store} is incomplete ({len(opened.done_chunks())} of {opened.n_chunks} chunks); run the same "
            "`clip-lens collect` command again to finish it."
        )
    if opened.meta.get("model") != model:
        raise InputError(f"store {store} was collected with model '{opened.meta.get('model')}'; pass --model {opened.meta.get('model')}.")
    chosen = None
    if layers is not None:
        chosen = _parse_layers(layers, "--layers")
        chosen = opened.head_layers if chosen == "all" else (chosen or [])
        if not chosen:
            _fail("--layers none leaves nothing to analyse; give 'all' or layer indices such as 2,3.")
    with tqdm(total=3 if labels else 2, desc="clip-lens spans", unit="step") as bar:
        bar.set_postfix_str("build model")
        hooked = _load(model, pretrained, None)
        _random_weights_note(hooked, model)
        _check_store_model(opened, hooked, model, pretrained)
        bar.update(1)
        bar.set_postfix_str("textspan")
        result = analyses.get("textspan")(hooked).run(opened, bank=text_bank, m=m, layers=chosen)
        saved = result.save(out)
        bar.update(1)
        table = None
        if labels is not None:
            bar.set_postfix_str("head labels")
            table = analyses.get("head_labels")(hooked).run(result)
            labels_saved = table.save(labels)
            bar.update(1)
    by_head = table.by_head() if table is not None else {}
    for head in result.heads:
        title = head.head
        if head.head in by_head:
            label = by_head[head.head]
            title += f"  label: {label.label or 'none'} (confidence {label.confidence:.2f})"
        typer.echo(title)
        for text, cumulative in list(zip(head.texts, head.cumulative))[:3]:
            typer.echo(f"  {cumulative:6.1%}  {text}")
    typer.echo(f"TextSpan of {len(result.heads)} heads ({result.m} texts each, bank {result.bank}, {result.n_images} images) "
               f"saved to {saved.resolve()}; percentages: cumulative share of each head's variance.")
    if table is not None:
        typer.echo(f"Head labels ({table.labeler}) saved to {labels_saved.resolve()}.")


@app.command()
@_user_errors
def compare(
    files: Optional[list[Path]] = typer.Argument(None, help="saved results: head label tables / interp_metrics results, or mutual_knowledge results (JSON or folders)."),
    analysis: str = typer.Option("interp_metrics", "--analysis", "-a", help="interp_metrics or mutual_knowledge."),
    models: Optional[str] = typer.Option(None, "--models", help="mutual_knowledge: comma-separated model names to run and compare."),
    shapes: int = typer.Option(200, "--shapes", min=1, max=_MAX_SCENES, help="mutual_knowledge with --models: shapes-world scenes per model."),
    seed: int = typer.Option(1000, "--seed", min=0, max=_SEED_MAX, help="seed of the shapes-world scenes."),
    variant: str = typer.Option("paper", "--mi", help="mutual_knowledge with --models: paper or bank MI."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the table as HTML here."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="interp_metrics: K for CCS (default: the plugin's, 5)."),
    force: bool = typer.Option(False, "--force", help="replace an existing --out (and its figure)."),
) -> None:
    """Several models side by side: interpretability metrics (interp_metrics) or MI, AUC and accuracy
    with their correlation (mutual_knowledge)."""
    import html

    from clip_lens import analyses
    from clip_lens.files import atomic_write

    if analysis not in ("interp_metrics", "mutual_knowledge"):
        _fail(f"--analysis must be interp_metrics or mutual_knowledge, got '{analysis}'.")
    figure = None
    if out is not None:  # checked before the models run
        outputs = [_out(out)]
        if analysis == "mutual_knowledge":
            figure = out.with_suffix(".png")
            outputs.append(_out(figure, f"the figure {figure} (written next to --out {out})"))
        _check_outputs(outputs, {"compared result": files}, force)
    if models is not None:
        if analysis != "mutual_knowledge":
            _fail("--models runs the mutual_knowledge analysis: add --analysis mutual_knowledge.")
        results = {}
        for name in [m.strip() for m in models.split(",") if m.strip()]:
            hooked = _load(name, None, None)
            data = _concept_data(hooked, None, shapes, seed, None)
            typer.echo(f"{name}: mutual knowledge on {len(data)} images")
            results[name] = analyses.get("mutual_knowledge")(hooked).run(data, mi=variant, evaluate=False, corloc=False)
        table = _plugin_function("mutual_knowledge", "compare_results")(results)
        sources = list(results)
    else:
        if not files:
            _fail("give the result files to compare (or --models for --analysis mutual_knowledge).")
        compare_files = _plugin_function(analysis, "compare_files")
        table = compare_files(files) if top_k is None else compare_files(files, top_k=top_k)
        sources = [str(f) for f in files]
    typer.echo(table.to_markdown())
    if out is not None:
        page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>clip_lens: {analysis} comparison</title></head>\n"
                f"<body>\n<h1>{html.escape(analysis)}: models side by side</h1>\n{table.to_html()}\n"
                f"<p>Sources: {html.escape(', '.join(sources))}</p>\n</body></html>\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, page)
        if figure is not None:
            from clip_lens.report import figure_png

            atomic_write(figure, figure_png(table.plot()))
        typer.echo(f"HTML table written to {out.resolve()}")


@app.command("analyses")
def analyses_command() -> None:
    """List the installed analysis plugins (entry-point group clip_lens.analyses), broken ones with their error."""
    from clip_lens import analyses

    infos = analyses.list()
    if not infos:
        typer.echo(f"no analyses installed (plugins register in the entry-point group '{analyses.GROUP}').")
        return
    width = max(len(info.name) for info in infos)
    for info in infos:
        where = f"[{info.distribution or 'unknown distribution'}]"
        if info.ok:
            typer.echo(f"{info.name:<{width}}  {info.description}  {where}")
        else:
            typer.echo(f"{info.name:<{width}}  BROKEN {where}: {' '.join(str(info.error).split())}")


def main() -> None:  # pragma: no cover - `python -m clip_lens.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


def _segmentation_images(hooked, images: Optional[Path], shapes: Optional[int], seed: int, attribute: str = "colour"):
    """A SegmentationData from a folder (images/ + masks/) or shapes-world scenes."""
    if (images is None) == (shapes is None):
        _fail("give exactly one image source: --images FOLDER or --shapes N.")
    if shapes is not None:
        from clip_lens.toy.evaluate import shapes_world_version

        make = _plugin_function("segmentation", "shapes_world_segmentation")
        return make(shapes, seed=seed, image_size=hooked.cfg.image_size[0], attribute=attribute,
                    version=shapes_world_version(hooked) or 1)
    return _plugin_function("segmentation", "folder_segmentation")(images, hooked.preprocess)


@app.command()
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
    from clip_lens.report import figure_png

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


@app.command("segment-eval")
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


def _concept_data(hooked, images: Optional[Path], shapes: Optional[int], seed: int, classes: Optional[Path]):
    """A mutual-knowledge ConceptData from a folder (images/ + labels.json/boxes.json) or shapes-world scenes."""
    if images is not None and shapes is not None:
        _fail("give one image source: --images FOLDER or --shapes N.")
    if images is None:
        from clip_lens.toy.evaluate import shapes_world_version

        make = _plugin_function("mutual_knowledge", "shapes_world_data")
        return make(shapes or 200, seed=seed, image_size=hooked.cfg.image_size[0], version=shapes_world_version(hooked) or 1)
    from clip_lens.banks import load_bank

    names = load_bank(classes).texts if classes is not None else None
    return _plugin_function("mutual_knowledge", "folder_data")(images, hooked.preprocess, classes=names)


@app.command("mi")
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


def _score(value: float) -> str:
    """A score with three significant digits (5e-05 stays 5e-05, not 0.000)."""
    return f"{value:.3g}"


@app.command()
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
    from clip_lens.report import figure_png

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


@app.command("app")
@_user_errors
def app_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=_MODEL_HELP),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="pretrained tag or local checkpoint (the store's)."),
    store: Optional[Path] = typer.Option(
        None, "--store", "-s", help="store folder written by `clip-lens collect`; omitted: a demo store of shapes-world scenes."
    ),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="head label table written by `clip-lens spans --labels` (needed for the property search)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback exposes the app to the network."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="port (0: any free port)."),
    max_upload_mb: float = typer.Option(8.0, "--max-upload-mb", min=0.01, help="largest request body in MiB (larger: HTTP 413)."),
    max_images: int = typer.Option(16, "--max-images", min=1, help="most images per request."),
    sae: Optional[list[Path]] = typer.Option(
        None, "--sae", help="SAE folder (SAELens format, e.g. from `clip-lens sae train`) on an image-tower hook, for the "
        "Features tab; repeat for several. Omitted with the demo store of a shapes-world ViT (toy-shapes-v2, toy-shapes): "
        "a small demo SAE is trained (~3 s)."
    ),
    partial: bool = typer.Option(False, "--partial", help="read a store whose collect has not finished (only its finished "
                                 "chunks); without it such a store is refused, naming the missing chunks."),
) -> None:
    """Serve the web app of CLIP-InterpreT's five analyses (property and per-head neighbours, topic and contrastive maps)
    and of SAE features."""
    import tempfile

    from clip_lens.app import demo_workspace, is_loopback, serve
    from clip_lens.app.features import check_sae_fits
    from clip_lens.collect import Store
    from clip_lens.sae import load_sae

    if not is_loopback(host):  # said before the slow part; serve() logs it again next to the URL
        typer.echo(f"Warning: --host {host} can be reached from other machines. The app has no authentication: anyone who "
                   "can connect can run the model and see the store's images.", err=True)
    opened = Store.open(store, partial=partial) if store is not None else None  # fail fast, before the model
    table = _plugin_function("head_labels", "HeadLabelsResult").load(labels) if labels is not None else None
    saes = {}
    for folder in sae or []:  # named by folder (folder~2 for a repeated name)
        name = folder.name or str(folder)
        saes[name if name not in saes else f"{name}~{len(saes) + 1}"] = load_sae(folder)
    hooked = _load(model, pretrained, None)
    _random_weights_note(hooked, model)
    if opened is not None:
        _check_store_model(opened, hooked, model, pretrained)
    for name, loaded in saes.items():  # before the demo store: a misfit is refused at once
        check_sae_fits(hooked, loaded, f"SAE '{name}' ({loaded.cfg.hook_name})")
    limits = dict(host=host, port=port, max_upload_bytes=int(max_upload_mb * 2**20), max_images=max_images, saes=saes)
    if opened is not None:
        if table is None:
            typer.echo("Note: no --labels, so the property search is off (make labels with `clip-lens spans --labels`).", err=True)
        if not saes:
            typer.echo("Note: no --sae, so the Features tab is empty (train an SAE with `clip-lens sae train`).", err=True)
        serve(hooked, opened, table, **limits)
        return
    demo_sae = not saes and _shapes_model(hooked.model_name) and hooked.model_name != "toy-shapes-rn"
    with tempfile.TemporaryDirectory(prefix="clip_lens_app_") as directory:
        typer.echo(f"No --store: building a demo store of shapes-world scenes with {model}, labelling its heads"
                   f"{' and training a demo SAE' if demo_sae else ''} …")
        workspace = demo_workspace(hooked, directory, sae=demo_sae)
        limits["saes"] = saes or workspace.saes
        serve(hooked, workspace.store, table or workspace.labels, thumbnails=workspace.thumbnails, **limits)


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
app.add_typer(sae_app, name="sae")

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

    from clip_lens.collect import shapes_world_images
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
        source_images = shapes_world_images(shapes, seed, hooked.cfg.image_size[0])
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
        eval_source = None if toy else shapes_world_images(eval_images, HELD_OUT_SEED, hooked.cfg.image_size[0])
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
    from clip_lens.collect import Store, shapes_world_images
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
        source: Any = shapes_world_images(shapes, seed, hooked.cfg.image_size[0])
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
