#!/usr/bin/env python
"""Decomposing an image embedding: the script behind ``docs/tutorials/decomposition.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
(``tutorial_decomposition_*.png``) and prints every number the tutorial quotes:

  (a) ``model.decompose``: layer, head and token terms, and the sum check
  (b) the terms projected on text directions: per-layer and per-head shares of the cosine
  (c) the last layer's per-token terms as a map over the image

  python docs/scripts/decomposition_tutorial.py            # figures into docs/figures/
  python docs/scripts/decomposition_tutorial.py --out /tmp/figs
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tutorial_common import save, setup  # noqa: E402
from clip_lens import HookedCLIP  # noqa: E402
from clip_lens.toy.world import VALUES, ShapesWorld, attribute_prompt, batch_images  # noqa: E402

N_IMAGES = 16


def main() -> None:
    args, start = setup(__doc__)

    print("(a) decompose: layers, heads, tokens, sum check")
    model = HookedCLIP.from_pretrained("toy-shapes")
    scenes = [ShapesWorld(seed=1000).scene(i) for i in range(N_IMAGES)]     # held-out scenes
    images = batch_images(scenes)                                          # [16, 3, 64, 64]
    last = model.cfg.n_layers - 1
    parts = model.decompose(images, heads="all", tokens=[last])
    print(f"  embedding {tuple(parts.embedding.shape)}, embed {tuple(parts.embed.shape)}, attn {tuple(parts.attn.shape)}, "
          f"mlp {tuple(parts.mlp.shape)}, heads {tuple(parts.heads.shape)}, tokens {tuple(parts.tokens.shape)}")
    print(f"  sum check: max relative error {parts.relative_error().max().item():.1e}")
    with torch.no_grad():
        encoded = model.encode_image(images)
    print(f"  max |embedding - encode_image| {(parts.embedding - encoded).abs().max().item():.1e}")
    head_sum = parts.heads.sum(2) + parts.attn_bias                            # heads + out_proj bias = layer
    print(f"  max |sum of heads + attn_bias - attn| {(head_sum - parts.attn).abs().max().item():.1e}")
    token_sum = parts.tokens.sum(3)[:, 0]                                      # tokens of one head = the head
    print(f"  max |sum of tokens - head| (layer {last}) {(token_sum - parts.heads[:, last]).abs().max().item():.1e}")

    print("(b) projected on the colour prompts")
    prompts = [attribute_prompt("colour", v) for v in VALUES["colour"]]        # "a red shape", ...
    texts = model.encode_text(model.to_tokens(prompts), normalize=True)        # [8, d_embed]
    proj = model.decompose(images, heads="all", tokens=[last], directions=texts)
    true = torch.tensor([VALUES["colour"].index(s.value("colour")) for s in scenes])
    rows = torch.arange(N_IMAGES)
    norm = proj.embedding_norm                                                # cos = term / ‖embedding‖
    cos = proj.total()[rows, true] / norm
    print(f"  zero-shot colour accuracy {(proj.total().argmax(-1) == true).float().mean().item():.2f}, "
          f"mean cosine with the true prompt {cos.mean().item():.3f}")
    # per-layer shares of the true prompt's cosine minus the mean over the other prompts (a logit-like margin)
    def margin(term: torch.Tensor) -> torch.Tensor:  # [batch, ..., 8] -> [batch, ...]
        true_part = term[rows, ..., true] if term.ndim == 2 else term[rows, :, true]
        return (true_part - (term.sum(-1) - true_part) / (len(prompts) - 1)) / (norm if term.ndim == 2 else norm[:, None])
    labels = ["embed"] + [f"L{l} attn" for l in range(model.cfg.n_layers)] + [f"L{l} mlp" for l in range(model.cfg.n_layers)] + ["bias"]
    terms = [proj.embed] + [proj.attn[:, l] for l in range(model.cfg.n_layers)] + [proj.mlp[:, l] for l in range(model.cfg.n_layers)] + [proj.bias]
    shares = torch.stack([margin(t) for t in terms], 1)                       # [batch, component]
    total = margin(proj.total())
    print(f"  margin (true prompt - mean other prompt) of the cosine, mean over {N_IMAGES} images: {total.mean().item():.3f}")
    for label, value in zip(labels, shares.mean(0).tolist()):
        print(f"    {label:<8} {value:+.3f}")
    print(f"  components sum to the margin: max error {(shares.sum(1) - total).abs().max().item():.1e}")

    fig, ax = plt.subplots(figsize=(7, 3))
    mean = shares.mean(0).numpy()
    ax.bar(range(len(labels)), mean, yerr=shares.std(0).numpy(), capsize=2,
           color=["grey"] + ["tab:blue"] * model.cfg.n_layers + ["tab:orange"] * model.cfg.n_layers + ["grey"])
    ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=8)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("share of the colour margin")
    ax.set_title(f"Direct contributions to cos(image, true colour) − mean other colour ({N_IMAGES} images, ±1 sd)", fontsize=9)
    save(fig, args.out / "tutorial_decomposition_layers.png")

    head_margin = margin(proj.heads.flatten(1, 2)).mean(0).reshape(model.cfg.n_layers, model.cfg.n_heads)
    top = head_margin.flatten().abs().topk(3)
    print("  largest heads: " + ", ".join(f"{proj.head_labels[i]} {head_margin.flatten()[i].item():+.3f}" for i in top.indices.tolist()))
    fig, ax = plt.subplots(figsize=(3.6, 3))
    lim = head_margin.abs().max().item()
    im = ax.imshow(head_margin.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(model.cfg.n_heads), [f"H{h}" for h in range(model.cfg.n_heads)])
    ax.set_yticks(range(model.cfg.n_layers), [f"L{l}" for l in range(model.cfg.n_layers)])
    ax.set_title("per head: share of the colour margin", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    save(fig, args.out / "tutorial_decomposition_heads.png")

    print(f"(c) layer {last}'s token terms as a map")
    gh, gw = model.cfg.grid_size
    token_margin = margin(proj.tokens[:, 0].sum(1))           # [batch, token]: heads summed
    cls_share = token_margin[:, 0]
    print(f"  class token's share of layer {last}'s margin, mean: {cls_share.mean().item():+.3f} of "
          f"{margin(proj.attn[:, last]).mean().item():+.3f}")
    fig, axes = plt.subplots(2, 4, figsize=(8, 4.2))
    for i, ax in enumerate(axes[0]):
        ax.imshow(scenes[i].image)
        ax.set_title(scenes[i].caption(), fontsize=7)
        ax.axis("off")
    for i, ax in enumerate(axes[1]):
        grid = token_margin[i, 1:].reshape(gh, gw).numpy()
        lim = np.abs(grid).max()
        ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"L{last} per patch (cls {token_margin[i, 0].item():+.2f})", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    save(fig, args.out / "tutorial_decomposition_tokens.png")
    inside = []
    for i, scene in enumerate(scenes):
        mask = scene.attribute_mask("colour", scene.value("colour"))
        cells = torch.from_numpy(mask.reshape(gh, mask.shape[0] // gh, gw, mask.shape[1] // gw).any((1, 3)).flatten())
        patch = token_margin[i, 1:]
        inside.append(patch[cells].sum().item() / patch.abs().sum().item())
    print(f"  share of the patches' |margin| on patches showing the object (signed, mean): {np.mean(inside):.2f}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
