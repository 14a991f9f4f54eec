"""Zero-shot segmentation from neuron activations (Gandelsman et al., ICLR 2025, §5), scored with the
segmentation plugin's protocol and next to its baselines in the same run.

For each image the predicted class c* is the argmax of its embedding against the class texts (as
`segmentation_eval` predicts). Its map is the sum, over the neurons whose text code names c*'s
concept, of their post-activations (``blocks.{l}.mlp.hook_post``) at the patch tokens, upsampled and
scored exactly as the head maps are (clip below 0, min-max, threshold at the mean; `SegmentationScore`).
A class no neuron names gets an all-zero map (which the protocol scores as all foreground).

Rows added to `segmentation_eval`'s table (decomposition maps over heads — the TextSpan paper's
method —, raw attention, chroma, colour contrast, uniform, all background):

- ``neurons named by the class``;
- ``random neurons``: for every class as many neurons drawn at random from the analysed layers
  (``draws`` draws, reported as the mean, intervals over images and draws).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

NEURON_ROW, RANDOM_ROW = "neurons named by the class", "random neurons (as many per class)"


def random_selections(named: Int[Tensor, "class layer neuron"], draws: int, seed: int) -> list[Tensor]:
    """``draws`` selections with as many neurons per class as ``named``, uniform over all analysed neurons."""
    generator = torch.Generator().manual_seed(seed)
    n_classes, n_layers, n_neurons = named.shape
    out = []
    for _ in range(draws):
        selection = torch.zeros_like(named)
        for c in range(n_classes):
            count = int(named[c].sum())
            picks = torch.randperm(n_layers * n_neurons, generator=generator)[:count]
            selection[c].view(-1)[picks] = 1
        out.append(selection)
    return out


@torch.no_grad()
def neuron_patch_maps(
    model: "HookedCLIP",
    images: Float[Tensor, "batch 3 H W"],
    layers: Sequence[int],
    neurons: Int[Tensor, "neuron"],
    selections: Sequence[Int[Tensor, "class layer neuron"]],
    predicted: Int[Tensor, "batch"],
) -> list[Float[Tensor, "batch grid_h grid_w"]]:
    """For each selection, every image's summed patch activations of the neurons selected for its predicted class."""
    hooks = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    _, cache = model.run_with_cache(images, names_filter=hooks)
    grid_h, grid_w = model.cfg.grid_size
    n_patches = grid_h * grid_w
    acts = torch.stack([cache[h][:, -n_patches:, neurons.to(model.device)] for h in hooks], 1).float().cpu()  # [b, layer, patch, neuron]
    maps = []
    for selection in selections:
        chosen = selection[predicted.cpu()].to(acts.dtype)  # [b, layer, neuron]
        summed = torch.einsum("blpn,bln->bp", acts, chosen)
        maps.append(summed.reshape(-1, grid_h, grid_w))
    return maps
