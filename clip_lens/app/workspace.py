"""What the app needs for the bundled model, built offline: a store of shapes-world scenes, head
labels, a thumbnail loader and (optionally) a small SAE for the Features tab."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np
import torch
from jaxtyping import UInt8

from clip_lens import analyses
from clip_lens.collect import ImageSource, Store, collect, model_world_images, store_thumbnails
from clip_lens.errors import InputError

if TYPE_CHECKING:
    from clip_lens import HookedCLIP
    from clip_lens.sae import SAE

DEMO_SEED = 2024
"""World seed of the demo store: neither the training world (seed 0) nor the held-out query scenes (1000)."""
DEMO_SAE = {"positions": "patches", "d_sae": 128, "architecture": "relu", "l1": 0.3, "steps": 200, "token_batch": 256,
            "lr": 4e-3}
"""The demo SAE's recipe (on the last residual stream): ~3 s on one CPU core for 300 scenes; every feature
fires on some scenes, at frequencies from a few percent to all of them."""


@dataclass
class Workspace:
    """A store, its head labels and its thumbnails: the arguments of [`make_server`][clip_lens.app.make_server]."""

    store: Store
    labels: Any
    """``HeadLabelsResult`` of the store's heads (from the head_labels analysis)."""
    thumbnails: Callable[[Sequence[int]], UInt8[np.ndarray, "n H W 3"]]
    """Store rows → their images, for the neighbour figures and the page's image picker."""
    saes: dict[str, "SAE"] = field(default_factory=dict)
    """SAEs for the Features tab, by name (``{"demo": ...}`` with ``demo_workspace(..., sae=True)``)."""


def demo_workspace(
    model: "HookedCLIP", directory: Union[str, Path], n_scenes: int = 300, seed: int = DEMO_SEED, sae: bool = False,
    progress: bool = True,
) -> Workspace:
    """Collect ``n_scenes`` shapes-world scenes into ``directory/store`` (resumed if already there),
    run TextSpan (shapes-attributes bank, 20 texts per head) and label the heads (saved as
    ``directory/labels.json``); with ``sae=True`` also train `demo_sae` on the same scenes
    (``workspace.saes["demo"]``).

    Takes a few seconds on CPU for the bundled ``toy-shapes`` model and 300 scenes (about 2.5 s, and
    3 s more for the SAE, on one core). With ``progress`` each step is printed to stderr as it starts
    ("demo [1/3] collecting 300 shapes-world scenes …", with the store's tqdm bar) and the total at the end.
    SIGTERM while it builds unwinds the stack (`exit_on_signals`), so the
    caller's temporary folder is removed.

    Raises:
        InputError: the model has no fixed image size (scenes cannot be rendered for it).
    """
    if model.cfg.image_size is None:
        raise InputError("the demo workspace renders shapes-world scenes, which needs a model with a fixed image size.")
    from clip_lens.app.server import exit_on_signals

    directory = Path(directory)
    steps, began = 3 if sae else 2, time.perf_counter()

    def say(step: int, what: str) -> None:
        if progress:
            print(f"demo [{step}/{steps}] {what} …", file=sys.stderr, flush=True)

    with exit_on_signals():
        directory.mkdir(parents=True, exist_ok=True)
        size = model.cfg.image_size[0]
        say(1, f"collecting {n_scenes} shapes-world scenes into {directory / 'store'}")
        store = collect(model, model_world_images(model, n_scenes, seed), directory / "store",
                        progress=progress)
        say(2, "TextSpan on the shapes-attributes bank and head labels")
        spans = analyses.get("textspan")(model).run(store, bank="shapes-attributes", m=20)
        labels = analyses.get("head_labels")(model).run(spans)
        labels.save(directory / "labels.json")
        if sae:
            say(3, "training the demo SAE (Features tab)")
        saes = {"demo": demo_sae(model, model_world_images(model, n_scenes, seed))} if sae else {}
        if progress:
            print(f"demo ready in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        return Workspace(store, labels, store_thumbnails(store, size), saes)


def demo_sae(model: "HookedCLIP", images: Any, hook_name: Union[str, None] = None, seed: int = 0) -> "SAE":
    """A small SAE (`DEMO_SAE`: ReLU + L1, 128 features, 200 steps of 256 patch tokens) on the
    patch tokens of ``hook_name`` (default: the last residual stream, where the features' text names
    are exact) over ``images`` (anything `ActivationSource` reads).

    Made for the demo's Features tab: seconds on a CPU for the bundled model, not a good SAE. It trains
    on one torch thread (restored afterwards): its matrices are tiny, and on a busy 2-core machine two
    threads made it ten times slower (30 s instead of 3 s).
    """
    from clip_lens.sae.activations import ActivationSource
    from clip_lens.sae.train import train_sae

    hook_name = hook_name or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    recipe = dict(DEMO_SAE)
    n = len(images) if isinstance(images, (ImageSource, torch.Tensor)) else 2**16
    patches, batch = model.cfg.grid_size[0] * model.cfg.grid_size[1], 100
    buffer = min(2**16, max(n * patches, 2 * batch * patches))  # the whole set when small; two forward batches at least
    source = ActivationSource(model, images, hook_name, positions=recipe.pop("positions"), batch_size=batch,
                              buffer_size=buffer, token_batch=recipe.pop("token_batch"), seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            result = train_sae(source, recipe.pop("d_sae"), seed=seed, progress=False, **recipe)
    finally:
        torch.set_num_threads(threads)
    return result.sae
