"""What every ``clip-lens`` command shares: the typer ``app`` and its group class (`_Group`: readable
metavars, usage errors as one line), the one-line error wrapper (`_user_errors`: ClipLensError and
OSError → ``error: …``, exit 2, file arguments that are FIFOs refused first), output and option checks,
model loading, and the store/model pairing check. Imports nothing heavy at start-up (``clip-lens --help``
stays fast): the library is imported inside the functions that need it."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
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
    """Refuse to pair a store with a model other than the one it was collected with
    (`clip_lens.store.Store.check_model`); used by every command that reads a store with a model."""
    store.check_model(hooked, pretrained)


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
