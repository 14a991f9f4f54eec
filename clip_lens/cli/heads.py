"""The head-analysis pipeline: `clip-lens collect` → `spans` (TextSpan, head labels) → `compare`, and `analyses`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from clip_lens.cli.common import (
    _MAX_SCENES, _SEED_MAX, _check_outputs, _check_store_model, _concept_data, _default_bank, _fail, _json_file,
    _load, _out, _parse_layers, _plugin_function, _random_weights_note, _user_errors,
)


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
    neurons: str = typer.Option("none", "--neurons", help="layers whose MLP neurons' second-order effects are kept, for "
                                "`clip-lens neurons --store` (large: d_mlp × d_embed floats per image and layer): none, "
                                "all or e.g. 0,1,2."),
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

    from clip_lens.collect import Store, collect, model_world_images, replacing_folder, resumable_folder
    from clip_lens.distributed import launched, process_group
    from clip_lens.errors import InputError
    from clip_lens.precision import PRECISIONS

    if (images is None) == (shapes is None):
        _fail("give exactly one image source: --images FOLDER or --shapes N.")
    launched()  # a bad launch environment (MASTER_PORT=abc …) is refused before any work
    head_layers, token_layers = _parse_layers(heads, "--heads"), _parse_layers(tokens, "--tokens")
    neuron_layers = _parse_layers(neurons, "--neurons")
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
        source: Any = model_world_images(hooked, shapes, seed)
    else:
        source = images
    with process_group(str(hooked.device)) as job:  # under torchrun: the ranks share the store, rank 0 reports
        lead = job is None or job.rank == 0
        store = collect(
            hooked, source, out, heads=head_layers, tokens=token_layers, neurons=neuron_layers, chunk_size=chunk_size,
            batch_size=batch_size,
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
    if store.meta.get("neuron_layers"):
        kept += f", neurons of layers {store.meta['neuron_layers']}"
    if bad:
        more = f"; and {len(bad) - 5} more (Store.skipped() lists them)" if len(bad) > 5 else ""
        typer.echo(f"Note: skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of {store.n_images}: {listed}{more}", err=True)
    skipped = f"; skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} (named above)" if bad else ""
    typer.echo(f"Store {out.resolve()}: {store.n_done} images in {store.n_chunks} chunks ({kept}){skipped}.")


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
            from clip_lens.figures import figure_png

            atomic_write(figure, figure_png(table.plot()))
        typer.echo(f"HTML table written to {out.resolve()}")


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
