#!/usr/bin/env python
"""Patching a CLIP: the script behind ``docs/tutorials/patching.md``.

Runs offline on the bundled shapes-world CLIP (``toy-shapes``), writes the tutorial's figures
and prints every number the tutorial quotes:

  (a) a minimal colour pair and its logit-difference metric
  (b) activation patching of ``resid_pre`` at every layer and position
  (c) per-head patching of ``z``, and attribution patching against activation patching
  (d) a ground-truth check over 12 pairs each for colour, shape and position
  (e) logit attribution of the clean and the corrupted embedding
  (f) patching the text tower

  python docs/scripts/patching_tutorial.py                 # figures into docs/figures/
  python docs/scripts/patching_tutorial.py --out /tmp/figs --pairs 4

Every printed number is deterministic (CPU, fixed seeds); the tutorial quotes them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from textwrap import fill

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from clip_lens import HookedCLIP  # noqa: E402
from clip_lens.patching import (  # noqa: E402
    PatchingResult,
    activation_patch,
    attribution_patch,
    cosine_metric,
    logit_diff_metric,
)
from clip_lens.stats import bootstrap_ci  # noqa: E402
from clip_lens.toy.world import Scene, ShapesWorld, attribute_prompt, batch_images  # noqa: E402

WORLD_SEED = 7
PAIR_INDEX = 23  # ShapesWorld(seed=7).variants(23, "colour", 2): a large red circle and its orange twin
ATTRIBUTES = ("colour", "shape", "position")


# --- (a) a minimal pair ------------------------------------------------------------------------
def minimal_pair(model: HookedCLIP, world: ShapesWorld, index: int, attribute: str):
    """Two scenes that differ only in ``attribute``, and the zero-shot logit difference between
    the two attribute prompts (positive: the model prefers the clean scene's value)."""
    clean, corrupted = world.variants(index, attribute, 2)
    correct = attribute_prompt(attribute, clean.value(attribute))
    incorrect = attribute_prompt(attribute, corrupted.value(attribute))
    return clean, corrupted, logit_diff_metric(model, correct, incorrect), (correct, incorrect)


def object_cells(model: HookedCLIP, mask: np.ndarray) -> torch.Tensor:
    """Patches (row-major, class token excluded) that show any pixel of a pixel mask."""
    gh, gw = model.cfg.grid_size
    ph, pw = model.cfg.patch_size
    return torch.from_numpy(mask).reshape(gh, ph, gw, pw).any(3).any(1).flatten()


def changed_cells(model: HookedCLIP, clean: Scene, corrupted: Scene) -> torch.Tensor:
    """The ground truth: patches that show the object in either scene of the pair."""
    return object_cells(model, clean.object_masks[0]) | object_cells(model, corrupted.object_masks[0])


def plot_pair(model: HookedCLIP, clean: Scene, corrupted: Scene, prompts: tuple[str, str], path: Path) -> None:
    truth = changed_cells(model, clean, corrupted).reshape(model.cfg.grid_size)
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    panels = [(clean.image, "clean\n" + fill(clean.caption(), 34)), (corrupted.image, "corrupted\n" + fill(corrupted.caption(), 34)),
              (truth.numpy(), "patches showing the object\n(in either image)")]
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(image, cmap="Greys", vmin=0, vmax=1) if image.ndim == 2 else ax.imshow(image)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"metric: logit('{prompts[0]}') − logit('{prompts[1]}')", fontsize=9)
    fig.tight_layout()
    save(fig, path)


def save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"  wrote {path}")


# --- (b) residual stream patching --------------------------------------------------------------
def names(model: HookedCLIP, positions: list[int]) -> list[str]:
    labels = model.to_str_tokens(torch.zeros(1, 3, *model.cfg.image_size))  # image positions: cls, r0c0, ...
    return [labels[p] for p in positions]


def report_resid_pre(model: HookedCLIP, result: PatchingResult, truth: torch.Tensor) -> None:
    k = int(truth.sum())
    print(f"  clean metric {result.clean_metric:.2f}, corrupted metric {result.corrupted_metric:.2f}")
    print(f"  object cells (k = {k}): {', '.join(names(model, (truth.nonzero().flatten() + 1).tolist()))}")
    for layer in result.layers:
        top = result.top_positions(layer, k)
        hits = sum(p > 0 and bool(truth[p - 1]) for p in top)
        best = result.normalized()[layer].max()
        cls = result.normalized()[layer, 0]
        print(f"  layer {layer}: top-{k} positions {', '.join(names(model, top))} -> {hits}/{k} on the object; "
              f"best single patch restores {best:.2f}, the class token {cls:.2f}")


def skipped_patches(model: HookedCLIP, clean: torch.Tensor, corrupted: torch.Tensor) -> None:
    """Why layer 0 is cheap: a patch that copies identical values is skipped (no forward)."""
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    _, a = model.run_with_cache(clean, names_filter=hooks)
    _, b = model.run_with_cache(corrupted, names_filter=hooks)
    for hook in hooks:
        same = int((a[hook] == b[hook]).all(-1).sum())
        print(f"  {hook}: {same} of {model.cfg.n_ctx} positions identical in the pair -> {same} patches skipped")


# --- (c) heads and attribution patching --------------------------------------------------------
def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1])


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (ties share their mean rank): not dominated by one large cell as Pearson's r can be."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.empty(v.size)
        order[v.argsort(kind="stable")] = np.arange(v.size)
        _, group = np.unique(v, return_inverse=True)
        return (np.bincount(group, weights=order) / np.bincount(group))[group]

    return float(np.corrcoef(ranks(x.flatten().numpy()), ranks(y.flatten().numpy()))[0, 1])


def compare_attribution(act_resid, att_resid, act_z, att_z) -> None:
    print("  attribution vs activation patching (effects = value - corrupted metric): Pearson r, Spearman rho")
    for layer in act_resid.layers:
        x, y = att_resid.effects()[layer], act_resid.effects()[layer]
        top = int(y.abs().argmax())  # the patch that matters most: how close is the linear estimate?
        print(f"    resid_pre layer {layer} ({x.numel()} positions): r = {pearson(x, y):.3f}, rho = {spearman(x, y):.3f}; "
              f"largest patch ({act_resid.position_labels[top]}): activation {y[top]:.2f}, attribution {x[top]:.2f}")
    x, y = att_resid.effects(), act_resid.effects()
    print(f"    resid_pre all layers x positions ({x.numel()} cells): r = {pearson(x, y):.3f}, rho = {spearman(x, y):.3f}")
    x, y = att_z.effects(), act_z.effects()
    print(f"    z, layer x head ({x.numel()} heads): r = {pearson(x, y):.3f}, rho = {spearman(x, y):.3f}")


def plot_attribution(act_resid, att_resid, act_z, att_z, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))
    for layer in act_resid.layers:
        axes[0].scatter(act_resid.effects()[layer], att_resid.effects()[layer], s=10, label=f"layer {layer}")
    axes[0].set_title("resid_pre, one point per (layer, position)", fontsize=9)
    axes[0].legend(fontsize=7)
    for layer in act_z.layers:
        axes[1].scatter(act_z.effects()[layer], att_z.effects()[layer], s=25, label=f"layer {layer}")
    for flat in act_z.effects().abs().flatten().topk(3).indices.tolist():  # name the three largest heads
        layer, head = divmod(flat, act_z.values.shape[1])
        point = (float(act_z.effects()[layer, head]), float(att_z.effects()[layer, head]))
        axes[1].annotate(f"L{act_z.layers[layer]}H{head}", point, fontsize=7, xytext=(4, -8), textcoords="offset points")
    axes[1].set_title("z, one point per head", fontsize=9)
    axes[1].legend(fontsize=7)
    for ax in axes:
        lo = float(min(ax.get_xlim()[0], ax.get_ylim()[0]))
        hi = float(max(ax.get_xlim()[1], ax.get_ylim()[1]))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")  # y = x: a perfect linear estimate
        ax.set_xlabel("activation patching: change of the metric")
        ax.set_ylabel("attribution patching (linear estimate)")
    fig.tight_layout()
    save(fig, path)


# --- (d) ground truth over many pairs ----------------------------------------------------------
def precision_at_k(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of the ``k = |truth|`` highest-scoring patches that show the changed object."""
    k = int(truth.sum())
    return truth[scores.topk(k).indices].float().mean().item()


def pixel_difference(model: HookedCLIP, clean: Scene, corrupted: Scene) -> torch.Tensor:
    """The no-model baseline: how much each patch's pixels change between the pair."""
    gh, gw = model.cfg.grid_size
    ph, pw = model.cfg.patch_size
    diff = np.abs(clean.image.astype(float) - corrupted.image.astype(float)).sum(-1)
    return torch.from_numpy(diff.reshape(gh, ph, gw, pw).sum((1, 3))).flatten()


def ground_truth(model: HookedCLIP, world: ShapesWorld, n_pairs: int):
    """Per attribute and pair: top-k precision of the layer-0/1 patches and the baselines,
    the class token's share of the effect per layer, and the attribution/activation correlation."""
    rng = np.random.default_rng(0)
    rows = {}
    for attribute in ATTRIBUTES:
        rows[attribute] = stats = {"layer 0": [], "layer 1": [], "random": [], "pixels": [], "cls": [], "r": []}
        for index in range(n_pairs):
            clean, corrupted, metric, _ = minimal_pair(model, world, index, attribute)
            images = batch_images([clean]), batch_images([corrupted])
            result = activation_patch(model, *images, metric, progress=False)
            truth = changed_cells(model, clean, corrupted)
            effect = result.effects().abs()
            stats["layer 0"].append(precision_at_k(effect[0, 1:], truth))  # patches only: [1:] drops the class token
            stats["layer 1"].append(precision_at_k(effect[1, 1:], truth))
            stats["random"].append(precision_at_k(torch.from_numpy(rng.random(truth.numel())), truth))
            stats["pixels"].append(precision_at_k(pixel_difference(model, clean, corrupted), truth))
            stats["cls"].append((effect[:, 0] / effect.sum(1)).tolist())
            attribution = attribution_patch(model, *images, metric)
            stats["r"].append([pearson(attribution.effects()[layer], result.effects()[layer]) for layer in result.layers])
    return rows


def print_ground_truth(rows, n_pairs: int, n_layers: int) -> None:
    print(f"  mean top-k precision over {n_pairs} pairs [95% bootstrap interval]; k = patches showing the object")
    print(f"  {'attribute':<10}" + "".join(f"{name:>22}" for name in ("layer 0", "layer 1", "random", "pixels")))
    for attribute, stats in rows.items():
        cells = [f"{np.mean(v):.2f} [{low:.2f}, {high:.2f}]" for v in (stats[n] for n in ("layer 0", "layer 1", "random", "pixels"))
                 for low, high in [bootstrap_ci(v)]]
        print(f"  {attribute:<10}" + "".join(f"{c:>22}" for c in cells))
    print("  class token's share of the |effect| per layer (mean [95% interval])")
    for attribute, stats in rows.items():
        share = np.array(stats["cls"])
        cells = [f"L{layer} {share[:, layer].mean():.2f} [{lo:.2f}, {hi:.2f}]"
                 for layer in range(n_layers) for lo, hi in [bootstrap_ci(share[:, layer])]]
        print(f"  {attribute:<10}" + "  ".join(cells))
    print("  Pearson r of attribution vs activation patching of resid_pre per layer (median over pairs, min)")
    for attribute, stats in rows.items():
        r = np.array(stats["r"])
        cells = [f"L{layer} {np.median(r[:, layer]):.3f} (min {r[:, layer].min():.3f})" for layer in range(n_layers)]
        print(f"  {attribute:<10}" + "  ".join(cells))


# --- (e) logit attribution ---------------------------------------------------------------------
def logit_attribution(model: HookedCLIP, images: torch.Tensor, prompts: tuple[str, str], path: Path) -> None:
    """Each residual component's share of the logit difference, for the clean and the corrupted image."""
    _, cache = model.run_with_cache(images)
    stack, labels = cache.decompose_resid(pos_slice="pooled", return_labels=True)
    attrs = cache.logit_attrs(stack, texts=[prompts[0]], incorrect_texts=[prompts[1]], pos_slice="pooled")
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice="pooled", return_labels=True)
    head_attrs = cache.logit_attrs(heads, texts=[prompts[0]], incorrect_texts=[prompts[1]], pos_slice="pooled")
    # logit_attrs explains embedding · (t_correct − t_incorrect); the logit is logit_scale · cos
    with torch.no_grad():
        embedding = model.encode_image(images)
        to_logit = model.logit_scale.exp() / embedding.norm(dim=-1)
        direction = model.encode_text(list(prompts), normalize=True)
        bias = (model.visual.ln_post.bias @ model.visual.proj) @ (direction[0] - direction[1])  # the LN-bias constant
    logits = (attrs * to_logit).detach()
    head_logits = (head_attrs * to_logit).detach()
    print(f"  {'component':<11}{'clean':>8}{'corrupted':>11}   (logit-difference units)")
    for label, row in zip(labels, logits):
        print(f"  {label:<11}{row[0]:>8.2f}{row[1]:>11.2f}")
    print(f"  {'ln_post bias':<11}{bias * to_logit[0]:>8.2f}{bias * to_logit[1]:>11.2f}")
    total = logits.sum(0) + bias * to_logit
    print(f"  {'sum':<11}{total[0]:>8.2f}{total[1]:>11.2f}")
    top = head_logits[:, 0].abs().topk(3).indices.tolist()
    print("  largest heads on the clean image: " + ", ".join(f"{head_labels[i]} {head_logits[i, 0]:+.2f}" for i in top))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [9, 16]})
    x = np.arange(len(labels))
    axes[0].bar(x - 0.2, logits[:, 0], 0.4, label="clean (red)")
    axes[0].bar(x + 0.2, logits[:, 1], 0.4, label="corrupted (orange)")
    axes[0].set_xticks(x, labels, rotation=60, fontsize=7)
    axes[0].legend(fontsize=7)
    axes[0].set_title("decompose_resid: direct effect on the logit difference", fontsize=9)
    x = np.arange(len(head_labels))
    axes[1].bar(x - 0.2, head_logits[:, 0], 0.4)
    axes[1].bar(x + 0.2, head_logits[:, 1], 0.4)
    axes[1].set_xticks(x, head_labels, rotation=60, fontsize=7)
    axes[1].set_title("stack_head_results: per head", fontsize=9)
    for ax in axes:
        ax.axhline(0, color="black", lw=0.6)
    fig.tight_layout()
    save(fig, path)


# --- (f) text patching -------------------------------------------------------------------------
def text_patching(model: HookedCLIP, image: torch.Tensor, path: Path) -> None:
    """Patch "a red circle" into "a blue circle", scored by the cosine with the red-circle image."""
    clean, corrupted = model.to_tokens(["a red circle"]), model.to_tokens(["a blue circle"])
    tokens = model.to_str_tokens("a red circle")
    metric = cosine_metric(model, images=image)
    result = activation_patch(model, clean, corrupted, metric, "resid_pre", positions=range(len(tokens)), progress=False)
    print(f"  clean cosine {result.clean_metric:.3f}, corrupted cosine {result.corrupted_metric:.3f}")
    # the sweep covered the prompt's tokens only: keep those columns and name them
    shown = replace(result, values=result.values[:, : len(tokens)], position_labels=tokens)
    print("  fraction restored, layer x token: " + " ".join(f"{t:>8}" for t in tokens))
    for layer, row in zip(shown.layers, shown.normalized()):
        print(f"  {'layer ' + str(layer):>33}" + " ".join(f"{v:>8.2f}" for v in row.tolist()))
    fig = shown.plot()
    fig.axes[0].set_title("activation patching of text.resid_pre")
    save(fig, path)


# --- main --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "figures")
    parser.add_argument("--pairs", type=int, default=12, help="pairs per attribute in the ground-truth check")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see below)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # a model this small gains little from more threads, and on a busy machine extra threads mostly
    # wait for each other (measured: 12 s with 1 thread, 139 s with 2 on 2 shared cores)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = HookedCLIP.from_pretrained("toy-shapes")
    world = ShapesWorld(seed=WORLD_SEED)

    print("(a) the minimal pair")
    clean, corrupted, metric, prompts = minimal_pair(model, world, PAIR_INDEX, "colour")
    clean_image, corrupted_image = batch_images([clean]), batch_images([corrupted])
    print(f"  clean: {clean.caption()} | corrupted: {corrupted.caption()}")
    print(f"  metric: logit('{prompts[0]}') - logit('{prompts[1]}')")
    plot_pair(model, clean, corrupted, prompts, args.out / "patching_pair.png")

    print("(b) activation patching of resid_pre")
    resid = activation_patch(model, clean_image, corrupted_image, metric, "resid_pre", progress=False)
    report_resid_pre(model, resid, changed_cells(model, clean, corrupted))
    skipped_patches(model, clean_image, corrupted_image)
    save(resid.plot(), args.out / "patching_resid_pre.png")

    print("(c) heads, and attribution patching")
    heads = activation_patch(model, clean_image, corrupted_image, metric, "z", progress=False)
    for layer, row in zip(heads.layers, heads.normalized()):
        print(f"  z layer {layer}: fraction restored per head " + " ".join(f"{v:+.2f}" for v in row.tolist()))
    save(heads.plot(), args.out / "patching_z.png")
    att_resid = attribution_patch(model, clean_image, corrupted_image, metric, "resid_pre")
    att_heads = attribution_patch(model, clean_image, corrupted_image, metric, "z")
    compare_attribution(resid, att_resid, heads, att_heads)
    plot_attribution(resid, att_resid, heads, att_heads, args.out / "patching_attribution.png")

    print(f"(d) ground truth: {args.pairs} pairs each of {', '.join(ATTRIBUTES)} (ShapesWorld(seed={WORLD_SEED}))")
    print_ground_truth(ground_truth(model, world, args.pairs), args.pairs, model.cfg.n_layers)

    print("(e) logit attribution")
    logit_attribution(model, torch.cat([clean_image, corrupted_image]), prompts, args.out / "patching_logit_attrs.png")

    print("(f) text patching")
    text_patching(model, clean_image, args.out / "patching_text.png")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
