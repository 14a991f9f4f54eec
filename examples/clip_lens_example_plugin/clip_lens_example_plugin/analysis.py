"""The ``head_support`` analysis: which heads' direct effects pick the correct zero-shot class.

For image ``b`` with true class ``y_b`` among class prompts with unit text embeddings ``t_c``, the
centred cosine ``m_b = cos(e_b, t_{y_b}) − mean_c cos(e_b, t_c)`` is linear in the unit image
embedding, and the unit embedding is the exact sum of its components (`HookedCLIP.decompose`,
then `normalized()`). So ``m_b`` splits exactly into one share per component; a head's *support*
is its share averaged over the images. Positive: the head's direct effect pushes images towards
their own class; negative: away from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from clip_lens.analyses import JSONResult
from clip_lens.errors import InputError


@dataclass
class HeadSupportResult(JSONResult):
    """Per-head support for the correct class (mean over images of the head's share of the
    centred cosine)."""

    model: str
    prompts: list[str]
    support: Float[Tensor, "layer head"]
    """Mean share of the centred cosine carried by each head's direct effect."""
    margin: float
    """Mean centred cosine ``m_b`` measured on the model's own embeddings."""
    sum_check: float
    """``|Σ all components' shares − margin|``: 0 up to float error (the decomposition is exact)."""

    @property
    def labels(self) -> list[str]:
        """``"L{l}H{h}"`` labels in the order of ``support.flatten()``."""
        layers, heads = self.support.shape
        return [f"L{l}H{h}" for l in range(layers) for h in range(heads)]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` heads with the largest support, largest first."""
        values, order = self.support.flatten().sort(descending=True)
        return [(self.labels[i], float(v)) for v, i in zip(values[:k], order[:k])]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "prompts": list(self.prompts),
            "support": self.support.tolist(),
            "margin": self.margin,
            "sum_check": self.sum_check,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "HeadSupportResult":
        return cls(data["model"], data["prompts"], torch.tensor(data["support"]), data["margin"], data["sum_check"])

    def plot(self) -> Any:
        """A layer × head heat map of the support (a matplotlib figure)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        limit = float(self.support.abs().max()) or 1.0
        image = ax.imshow(self.support, cmap="RdBu", vmin=-limit, vmax=limit)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("support for the correct class")
        fig.colorbar(image, ax=ax)
        return fig


class HeadSupport:
    """Score every attention head by how much its direct effect supports the correct zero-shot class."""

    name = "head_support"
    description = "Per-head share of the centred zero-shot cosine (exact decomposition; sum-checked)."
    parameters = {
        "images": "preprocessed images [batch, 3, H, W]",
        "prompts": "one text prompt per class",
        "labels": "the true class index of every image [batch]",
    }
    needs = ("model",)

    def __init__(self, model):
        self.model = model  # only stored, as in scikit-learn: all work happens in run()

    @torch.no_grad()
    def run(
        self,
        images: Float[Tensor, "batch 3 H W"],
        prompts: Sequence[str],
        labels: Int[Tensor, "batch"] | Sequence[int],
    ) -> HeadSupportResult:
        model = self.model
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(prompts) < 2:
            raise InputError(f"give at least two class prompts, got {len(prompts)}.")
        if labels.shape != (len(images),) or not bool(((labels >= 0) & (labels < len(prompts))).all()):
            raise InputError(f"labels must hold one class index in 0..{len(prompts) - 1} per image ({len(images)} images).")
        texts = model.encode_text(model.to_tokens(list(prompts)), normalize=True)
        # centring over classes is linear, so it can be folded into the directions:
        # (t_y − mean_c t_c) · x for every term x
        directions = texts - texts.mean(0, keepdim=True)
        parts = model.decompose(images, heads="all", directions=directions).normalized()
        pick = labels[:, None]
        heads = parts.heads  # [batch, layer, head, class]
        support = heads.gather(-1, pick[:, None, None, :].expand(*heads.shape[:3], 1)).squeeze(-1).mean(0)
        total = parts.total().gather(-1, pick).squeeze(-1)  # every component's share, summed
        unit = model.encode_image(images, normalize=True)
        margin = (unit @ texts.T).gather(-1, pick).squeeze(-1) - (unit @ texts.T).mean(-1)
        return HeadSupportResult(
            model=getattr(model, "model_name", type(model).__name__),
            prompts=list(prompts),
            support=support,
            margin=float(margin.mean()),
            sum_check=float((total - margin).abs().max()),
        )

    def run_on_shapes(self, world, attribute: str = "colour", n: int = 32) -> HeadSupportResult:
        """Convenience for the shapes world: ``n`` scenes of ``world``, one prompt per value of
        ``attribute`` (e.g. ``"colour"``), the scenes' true values as labels."""
        from clip_lens.toy import VALUES, attribute_prompt, batch_images

        if attribute not in VALUES:
            raise InputError(f"unknown attribute '{attribute}'; choose one of {', '.join(VALUES)}.")
        values = list(VALUES[attribute])
        scenes = [world.scene(i) for i in range(n)]
        labels = [values.index(scene.value(attribute)) for scene in scenes]
        prompts = [attribute_prompt(attribute, value) for value in values]
        return self.run(batch_images(scenes), prompts, labels)
