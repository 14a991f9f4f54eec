"""`clip-lens app`: serve the web app (`clip_lens.app`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clip_lens.cli.common import (
    DEFAULT_MODEL, _MODEL_HELP, _check_store_model, _load, _plugin_function, _random_weights_note, _shapes_model,
    _user_errors,
)


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
