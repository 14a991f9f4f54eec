"""`clip-lens … --help` of every command: every parameter has help, printed intact (no text taken for
markup), placeholders that read as types (INTEGER, PATH …), and errors that name CLI commands."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from clip_lens.cli import _cli_hints, app
from tests.helpers import one_line_error


def _commands(command=None, path=()):
    """``(path, click command)`` of every command and group under the ``clip-lens`` group."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands())
IDS = [" ".join(path) or "clip-lens" for path, _ in COMMANDS]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)  # help is re-wrapped (also after hyphens): compare without whitespace


def test_the_tree_holds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"report", "models", "hooks", "train-toy", "collect", "spans", "compare", "mi", "sae train",
            "sae inspect"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_parameter_has_help(path, command):
    assert (command.help or "").strip(), f"{IDS[COMMANDS.index((path, command))]} has no help"
    missing = [param.name for param in command.params if not (param.help or "").strip()]
    assert not missing, f"parameters without help: {missing}"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_prints_every_help_text_intact(runner, path, command):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    printed = _squeezed(result.stdout)
    for param in command.params:
        assert _squeezed(param.help) in printed, f"{param.name}: {param.help!r} not intact in\n{result.stdout}"
    for sub in getattr(command, "commands", {}).values():  # a group lists its commands' first words
        assert _squeezed(sub.help.split()[0]) in printed
    # placeholders read as words, never typer's "<int range>", "<str>", "<bool>", "<path>", "<list[Path]>"
    assert not re.search(r"<(int|float|str|bool|path|list)", result.stdout), result.stdout


def test_brackets_and_braces_survive(runner):
    """Rich took '[descriptors]' for a style tag and printed '{class: }'."""
    result = runner.invoke(app, ["mi", "--help"])
    assert "'shapes' or a JSON file {class: [descriptors]}." in " ".join(result.stdout.split())


def test_train_toy_options_have_types_and_defaults(runner):
    out = runner.invoke(app, ["train-toy", "--help"]).stdout
    flat = " ".join(out.split())  # click wraps at 80 columns
    assert "--steps INTEGER training steps (the bundled model was trained for 2800). [default: 2800; x>=1]" in flat
    assert "--batch-size INTEGER scenes per training step" in flat and "[default: 256; x>=2]" in flat
    assert "--seed INTEGER seed of the initialisation and of the training scenes. [default: 0; 0<=x<=4294967295]" in flat
    assert "--max-minutes NUMBER stop" in flat and "-o, --out PATH run folder" in flat
    assert "--force start a run" in flat  # a flag: no placeholder


class TestErrorsNameCommands:
    """Library messages recommend Python calls; the CLI prints the commands that do the same."""

    def test_unknown_model(self, runner, tmp_path):
        line = one_line_error(runner, ["hooks", "--model", "ViT-B-3"], "ViT-B-32", "`clip-lens models`")
        assert "clip_lens." not in line and "list_models" not in line

    def test_a_folder_that_is_not_a_store(self, runner, tmp_path):
        line = one_line_error(runner, ["spans", "--store", tmp_path, "--model", "toy-shapes",
                                       "--out", tmp_path.parent / f"{tmp_path.name}.json"],
                              "is not a clip_lens store", "create one with `clip-lens collect`")
        assert "clip_lens.collect" not in line

    @pytest.mark.parametrize(("library", "cli"), [
        ("Unknown model 'x'. clip_lens.list_models() lists the names HookedCLIP supports.",
         "Unknown model 'x'. `clip-lens models` lists the names HookedCLIP supports."),
        ("offline, use a built-in name (clip_lens.list_models()) with a local checkpoint path.",
         "offline, use a built-in name (`clip-lens models`) with a local checkpoint path."),
        ("s is incomplete (1 of 2 chunks); run collect again with the same arguments to finish it, or "
         "read(..., partial=True) for the finished images.",
         "s is incomplete (1 of 2 chunks); run the same `clip-lens collect` command again to finish it."),
        ("To repair it, run the same `clip-lens collect` command (or collect(...) with the same arguments) again: it",
         "To repair it, run the same `clip-lens collect` command again: it"),
        ("text bank b.txt has 1 duplicate texts: line 2 repeats line 1 ('a'); remove them or pass dedupe=True to "
         "keep the first of each.",
         "text bank b.txt has 1 duplicate texts: line 2 repeats line 1 ('a'); remove them from the file."),
    ])
    def test_known_python_hints_become_commands(self, library, cli):
        assert _cli_hints(library) == cli

    def test_the_library_messages_still_read_as_mapped(self, tmp_path):
        """The mapped texts are the library's own (a reworded library message would slip through)."""
        from clip_lens.banks import load_bank
        from clip_lens.collect import Store
        from clip_lens.errors import InputError

        (tmp_path / "b.txt").write_text("a\na\n")
        with pytest.raises(InputError) as bank:
            load_bank(tmp_path / "b.txt")
        with pytest.raises(InputError) as store:
            Store.open(tmp_path)
        for exc in (bank, store):
            assert _cli_hints(str(exc.value)) != str(exc.value)
            assert not re.search(r"clip_lens\.\w+|=True|\(\.\.\.\)", _cli_hints(str(exc.value))), str(exc.value)
