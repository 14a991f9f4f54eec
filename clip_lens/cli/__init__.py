"""``clip-lens``: the command-line shell over `clip_lens`.

Commands: ``report``, ``models``, ``hooks``, ``train-toy``, and the head-analysis pipeline
``collect`` → ``spans`` (TextSpan, optionally head labels) → ``compare``; ``analyses`` lists the
installed analysis plugins; ``sae train`` / ``sae inspect`` train sparse autoencoders and show their
features (`clip_lens.feature_report`). Plugins are reached through `clip_lens.analyses` only.

Layout: one module per command group (`models`: models/hooks/train-toy; `heads`: collect/spans/compare/
analyses; `interpret`: segment/segment-eval/neighbors; `neurons`: neurons; `mutual`: mi; `serve`: app; `sae`; `report`), the
shared option parsing and the one-line error wrapper in `common`. The commands are registered below, in
the order ``--help`` lists them; a new command goes in its group's module and gets one line here.

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

from clip_lens.cli import heads, interpret, models, mutual, neurons, report, sae, serve
from clip_lens.cli.common import (  # noqa: F401  (re-exported: tests and scripts import them from clip_lens.cli)
    _MAX_SCENES, _SEED_MAX, DEFAULT_MODEL, EXIT_USER_ERROR, _cli_hints, _Group, _user_errors, app,
)

app.command()(report.report)
app.command()(models.models)
app.command()(models.hooks)
app.command("train-toy")(models.train_toy)
app.command("collect")(heads.collect_command)
app.command()(heads.spans)
app.command()(heads.compare)
app.command("analyses")(heads.analyses_command)
app.command()(interpret.segment)
app.command("segment-eval")(interpret.segment_eval)
app.command("mi")(mutual.mutual_information)
app.command()(interpret.neighbors)
app.command()(neurons.neurons)
app.command("app")(serve.app_command)
app.add_typer(sae.sae_app, name="sae")


def main() -> None:  # pragma: no cover - `python -m clip_lens.cli`
    app()
