"""SAE ground truth on the shapes world: does some feature detect each attribute value, and is it named after it?

`shapes_world_ground_truth` trains an SAE on shapes-world scenes, scores every feature as a detector of
each attribute value (`clip_lens.sae.naming.feature_auroc`, chosen on a selection split, measured on
held-out scenes), names it through the read-out (`clip_lens.sae.naming.name_features`), and compares
with baselines that could beat it (random directions, PCA components, the embedding's cosine with the
value's prompt), with bootstrap intervals (``tests/acceptance/test_sae_truth.py``,
``docs/scripts/sae_ground_truth.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from clip_lens.errors import InputError
from clip_lens.sae.model import SAE
from clip_lens.sae.naming import FeatureNames, feature_auroc, name_features

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

SAE_WORLD_SEED = 21
"""Seed of the shapes world the ground-truth SAE trains on (the toy CLIP trained on seed 0; the
held-out scenes come from `clip_lens.toy.evaluate.HELD_OUT_SEED`)."""
BASELINES = ("random", "pca", "embedding")


@dataclass
class ValueDetection:
    """One attribute value of the shapes world: its best SAE feature and the baselines."""

    attribute: str
    value: str
    feature: int
    """The feature with the largest AUROC for this value on the selection split."""
    selection_auroc: float
    auroc: float
    """That feature's AUROC on the held-out scenes."""
    name: str
    """The feature's text name: its nearest attribute prompt through the read-out."""
    name_match: bool
    """``name`` is this value's prompt (``attribute_prompt(attribute, value)``)."""
    baselines: dict[str, float]
    """Held-out AUROC of each baseline (random directions and PCA components chosen on the
    selection split like the features; the embedding's cosine with the value's prompt)."""

    def detected(self, threshold: float) -> bool:
        return self.auroc >= threshold and self.name_match


@dataclass
class SAEGroundTruth:
    """Per attribute value of the shapes world: is there an SAE feature that detects it and is named after it?"""

    rows: list[ValueDetection]
    threshold: float
    """The AUROC a feature needs to count as a detector."""
    summary: dict[str, dict[str, Any]]
    """Per method (``sae``: detected and named; ``sae_detected``: AUROC only; each baseline): the
    ``fraction`` of values with held-out AUROC ≥ ``threshold``, its bootstrap 95% ``ci`` over the
    values, and ``count``."""
    factors: dict[str, dict[str, float]]
    """Rows and columns of the 3×3 grid (``"row top"`` … ``"column right"``): the best feature's
    held-out AUROC (``sae``) and the baselines'. The model writes position as row + column."""
    training: dict
    """The SAE's training metrics (`final`)."""
    settings: dict
    sae: Optional[SAE] = field(default=None, repr=False)
    names: Optional[FeatureNames] = field(default=None, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)

    def fraction(self, method: str = "sae") -> float:
        return float(self.summary[method]["fraction"])

    def to_dict(self) -> dict:
        return {
            "rows": [vars(r) for r in self.rows], "threshold": self.threshold, "summary": self.summary,
            "factors": self.factors, "training": self.training, "settings": self.settings, "seconds": self.seconds,
        }

    def table(self) -> str:
        """The per-value table (Markdown)."""
        lines = [
            "| attribute | value | feature | AUROC | name | match | random | PCA | embedding |",
            "|---|---|---:|---:|---|:-:|---:|---:|---:|",
        ]
        for r in self.rows:
            mark = "✓" if r.name_match else "✗"
            ok = "**" if r.detected(self.threshold) else ""
            lines.append(
                f"| {r.attribute} | {r.value} | {r.feature} | {ok}{r.auroc:.3f}{ok} | {r.name} | {mark} | "
                f"{r.baselines['random']:.3f} | {r.baselines['pca']:.3f} | {r.baselines['embedding']:.3f} |"
            )
        lines.append("")
        lines.append(f"| method | values with AUROC ≥ {self.threshold} | 95% bootstrap interval |")
        lines.append("|---|---:|---|")
        labels = {"sae": "SAE feature, named after the value", "sae_detected": "SAE feature (AUROC only)",
                  "random": "random directions", "pca": "PCA components", "embedding": "embedding · prompt"}
        for method, label in labels.items():
            s = self.summary[method]
            lines.append(f"| {label} | {s['count']}/{len(self.rows)} ({s['fraction']:.0%}) | "
                         f"[{s['ci'][0]:.2f}, {s['ci'][1]:.2f}] |")
        return "\n".join(lines)

    def plot(self) -> "Figure":
        """Held-out AUROC per value: the SAE's best feature (filled when named after the value) and the baselines."""
        from matplotlib.figure import Figure

        n = len(self.rows)
        fig = Figure(figsize=(max(8.0, 0.36 * n + 2), 4.2), layout="constrained")
        ax = fig.subplots()
        x = np.arange(n)
        styles = {"random": ("#999999", "x", "random directions"), "pca": ("#377eb8", "^", "PCA components"),
                  "embedding": ("#4daf4a", "s", "embedding · prompt")}
        for method, (colour, marker, label) in styles.items():
            ax.scatter(x, [r.baselines[method] for r in self.rows], color=colour, marker=marker, s=22,
                       label=f"{label} ({self.summary[method]['count']}/{n} ≥ {self.threshold})", zorder=2)
        sae = np.array([r.auroc for r in self.rows])
        named = np.array([r.name_match for r in self.rows])
        ax.scatter(x[named], sae[named], color="#e41a1c", s=46, zorder=3,
                   label=f"SAE feature named after the value ({self.summary['sae']['count']}/{n} also ≥ {self.threshold})")
        ax.scatter(x[~named], sae[~named], facecolors="none", edgecolors="#e41a1c", s=46, zorder=3,
                   label="SAE feature, named otherwise")
        ax.axhline(self.threshold, color="black", lw=0.8, ls="--")
        ax.set_xticks(x, [r.value for r in self.rows], rotation=70, fontsize=8)
        ax.set_ylabel("held-out AUROC")
        ax.set_ylim(0.45, 1.02)
        start = 0
        for attribute in dict.fromkeys(r.attribute for r in self.rows):
            count = sum(r.attribute == attribute for r in self.rows)
            ax.axvspan(start - 0.5, start + count - 0.5, color="#000000", alpha=0.04 if len(ax.patches) % 2 else 0.0)
            ax.text(start + (count - 1) / 2, 0.47, attribute, ha="center", fontsize=8, color="#555555")
            start += count
        ax.legend(fontsize=7, loc="lower right")
        hook = self.settings.get("hook_name")
        ax.set_title(f"Does an SAE feature detect each attribute value? ({hook}, {self.settings.get('positions')}, "
                     f"d_sae={self.settings.get('d_sae')}, k={self.settings.get('k')})", fontsize=9)
        return fig


def _best_on(select: Tensor, labels_select: np.ndarray, held: Tensor, labels_held: np.ndarray) -> tuple[int, float, float]:
    """The column with the largest AUROC on the selection split, and its held-out AUROC."""
    aurocs = feature_auroc(select, labels_select)
    best = int(aurocs.argmax())
    return best, float(aurocs[best]), float(feature_auroc(held[:, best : best + 1], labels_held)[0])


@torch.no_grad()
def _split_activations(model: "HookedCLIP", pixels: Tensor, hook_name: str, positions: str, batch_size: int):
    """Per image: the hook's rows at ``positions`` (``[n, n_rows, d]``) and the normalised image embedding."""
    rows, embeds = [], []
    n_prefix = model.cfg.n_prefix_tokens
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(model.device, model.dtype)
        embedding, cache = model.run_with_cache(batch, names_filter=hook_name, return_type="image_features")
        act = cache[hook_name]
        act = act[:, :1] if positions == "cls" else act[:, n_prefix:]
        rows.append(act.float().cpu())
        embeds.append(torch.nn.functional.normalize(embedding.float(), dim=-1).cpu())
    return torch.cat(rows), torch.cat(embeds)


@torch.no_grad()
def shapes_world_ground_truth(
    model: Optional["HookedCLIP"] = None,
    *,
    hook_name: str = "blocks.3.hook_resid_post",
    positions: str = "cls",
    d_sae: int = 128,
    k: int = 12,
    steps: int = 2000,
    token_batch: int = 256,
    lr: float = 3e-3,
    n_train: int = 8000,
    n_select: int = 2000,
    n_eval: int = 2000,
    train_seed: int = SAE_WORLD_SEED,
    eval_seed: Optional[int] = None,
    seed: int = 0,
    threshold: float = 0.95,
    batch_size: int = 250,
    sae: Optional[SAE] = None,
    progress: bool = False,
) -> SAEGroundTruth:
    """Train a TopK SAE on the shapes world and check it against the world's attribute values.

    The SAE trains on ``hook_name`` at ``positions`` (``"cls"``: the class token; ``"patches"``:
    every patch token, an image's activation being the largest over its patches) of ``n_train``
    one-object scenes of seed ``train_seed``. For each of the 29 attribute values (8 colours,
    6 shapes, 2 sizes, 9 positions, 4 backgrounds) the feature with the largest AUROC on the first
    ``n_select`` of those scenes is chosen, and its AUROC is measured on ``n_eval`` held-out scenes
    (seed ``eval_seed``, default `HELD_OUT_SEED`): no choice is made on
    the held-out scenes. The feature's text name is its nearest prompt among the 29
    ``attribute_prompt(attribute, value)`` texts through the read-out
    (`name_features`); it must be the value's own prompt.

    Baselines, chosen and measured the same way: ``d_sae`` random unit directions and the
    principal components (both signs) of the same activations; and, without any choice, the cosine
    of the image embedding with the value's prompt (the model's own zero-shot score).

    Pass ``sae`` to evaluate a trained SAE instead of training one.
    """
    import time

    from clip_lens.hooked_clip import HookedCLIP
    from clip_lens.sae.activations import ActivationSource
    from clip_lens.sae.train import train_sae
    from clip_lens.stats import bootstrap_ci
    from clip_lens.toy.evaluate import HELD_OUT_SEED
    from clip_lens.toy.world import ATTRIBUTES, VALUES, ShapesWorld, attribute_prompt, batch_images

    if positions not in ("cls", "patches"):
        raise InputError(f"positions must be 'cls' or 'patches', got {positions!r}.")
    if not 0 < n_select <= n_train:
        raise InputError(f"n_select must lie in 1..n_train={n_train}, got {n_select}.")
    eval_seed = HELD_OUT_SEED if eval_seed is None else eval_seed
    if eval_seed == train_seed:
        raise InputError("eval_seed must differ from train_seed: the held-out scenes must be new.")
    model = model or HookedCLIP.from_pretrained("toy-shapes")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def scenes(seed_: int, n: int):
        world = ShapesWorld(seed=seed_, image_size=model.cfg.image_size[0], n_objects=1)
        drawn = [world.scene(i) for i in range(n)]
        labels = {a: np.array([s.value(a) for s in drawn]) for a in ATTRIBUTES}
        return batch_images(drawn), labels

    train_pixels, train_labels = scenes(train_seed, n_train)
    eval_pixels, eval_labels = scenes(eval_seed, n_eval)
    seconds["render"] = time.perf_counter() - clock

    clock = time.perf_counter()
    training: dict = {}
    if sae is None:
        per_image = 1 if positions == "cls" else model.cfg.grid_size[0] * model.cfg.grid_size[1]
        buffer = int(min(2**16, max(2 * batch_size * per_image, n_train * per_image)))
        source = ActivationSource(model, train_pixels, hook_name, positions=positions, batch_size=batch_size,
                                  buffer_size=buffer, token_batch=token_batch, seed=seed, keep=True)
        with torch.enable_grad():
            result = train_sae(source, d_sae, architecture="topk", k=k, steps=steps, lr=lr, seed=seed,
                               progress=progress)
        sae, training = result.sae, dict(result.final)
    elif sae.cfg.hook_name != hook_name:
        raise InputError(f"the SAE reads '{sae.cfg.hook_name}', not hook_name='{hook_name}'.")
    seconds["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    select_rows, _ = _split_activations(model, train_pixels[:n_select], hook_name, positions, batch_size)
    eval_rows, eval_embed = _split_activations(model, eval_pixels, hook_name, positions, batch_size)
    select_labels = {a: v[:n_select] for a, v in train_labels.items()}

    def pooled(scores: Tensor) -> Tensor:  # [n, rows, m] → image level [n, m]
        return scores.amax(1)

    feats_select = pooled(sae.encode(select_rows.to(sae.device)).float().cpu())
    feats_eval = pooled(sae.encode(eval_rows.to(sae.device)).float().cpu())
    mean = select_rows.flatten(0, 1).mean(0)
    generator = torch.Generator().manual_seed(seed)
    random_dirs = torch.nn.functional.normalize(torch.randn(d_sae, mean.shape[0], generator=generator), dim=-1)
    centred = select_rows.flatten(0, 1) - mean
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    components = v[: min(d_sae, v.shape[0])]
    pca_dirs = torch.cat([components, -components])
    random_select, random_eval = pooled((select_rows - mean) @ random_dirs.T), pooled((eval_rows - mean) @ random_dirs.T)
    pca_select, pca_eval = pooled((select_rows - mean) @ pca_dirs.T), pooled((eval_rows - mean) @ pca_dirs.T)

    pairs = [(a, v_) for a in ATTRIBUTES for v_ in VALUES[a]]
    prompts = [attribute_prompt(a, v_) for a, v_ in pairs]
    prompt_embeds = model.encode_text(model.to_tokens(prompts), normalize=True).float().cpu()
    names = name_features(model, sae, prompt_embeds, top=1, bank_texts=prompts)
    zero_shot = eval_embed @ prompt_embeds.T

    rows = []
    for j, (attribute, value) in enumerate(pairs):
        y_select, y_eval = select_labels[attribute] == value, eval_labels[attribute] == value
        best, select_auroc, auroc = _best_on(feats_select, y_select, feats_eval, y_eval)
        name = names.name(best)
        baselines = {
            "random": _best_on(random_select, y_select, random_eval, y_eval)[2],
            "pca": _best_on(pca_select, y_select, pca_eval, y_eval)[2],
            "embedding": float(feature_auroc(zero_shot[:, j : j + 1], y_eval)[0]),
        }
        rows.append(ValueDetection(attribute, value, best, select_auroc, auroc, name, name == prompts[j], baselines))

    factors: dict[str, dict[str, float]] = {}
    for axis, index, words in (("row", 0, ("top", "middle", "bottom")), ("column", 1, ("left", "center", "right"))):
        for word in words:
            y_select = np.array([p.split()[index] == word for p in select_labels["position"]])
            y_eval = np.array([p.split()[index] == word for p in eval_labels["position"]])
            best, _, auroc = _best_on(feats_select, y_select, feats_eval, y_eval)
            factors[f"{axis} {word}"] = {
                "feature": best, "sae": auroc,
                "random": _best_on(random_select, y_select, random_eval, y_eval)[2],
                "pca": _best_on(pca_select, y_select, pca_eval, y_eval)[2],
            }

    indicators = {
        "sae": [r.detected(threshold) for r in rows],
        "sae_detected": [r.auroc >= threshold for r in rows],
        **{m: [r.baselines[m] >= threshold for r in rows] for m in BASELINES},
    }
    summary = {
        m: {"fraction": float(np.mean(v)), "count": int(np.sum(v)), "ci": bootstrap_ci(np.asarray(v, dtype=float))}
        for m, v in indicators.items()
    }
    seconds["evaluate"] = time.perf_counter() - clock
    settings = {
        "hook_name": hook_name, "positions": positions, "d_sae": d_sae, "k": k, "steps": steps,
        "token_batch": token_batch, "lr": lr, "n_train": n_train, "n_select": n_select, "n_eval": n_eval,
        "train_seed": train_seed, "eval_seed": eval_seed, "seed": seed, "architecture": "topk",
    }
    return SAEGroundTruth(rows, threshold, summary, factors, training, settings, sae, names, seconds)
