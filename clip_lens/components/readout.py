"""What a tower does after its last block, described for the exact decomposition.

Every image tower (open_clip's own ViT, timm ViTs, SigLIP, EVA, PE-Core) maps its final
residual stream to the embedding by the same few steps, each optional:

    per-token LayerNorm → pooling (fixed weights over positions, or an attention pooler whose
    queries are then pooled) → per-query LayerNorm → LayerNorm of the pooled vector → affine map

[`ReadoutPlan`][clip_lens.components.readout.ReadoutPlan] names the hooked modules of these steps; [`clip_lens.decompose`][clip_lens.decompose]
freezes their LayerNorm scales and attention pattern and so learns every family once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jaxtyping import Float
from torch import Tensor


@dataclass
class ReadoutPlan:
    """The read-out of one image tower (names are hook-name prefixes, e.g. ``"ln_post"``)."""

    positions: slice
    """Residual positions the read-out reads: the pooled tokens, or all the pooler attends to."""
    pool_weights: Float[Tensor, "n"]
    """Weights of the final pooling: over ``positions`` without a pooler, over its queries with one."""
    weight: Float[Tensor, "d_pool d_embed"]
    """The affine map after pooling (projection and heads composed), ``pooled @ weight + bias``."""
    bias: Optional[Float[Tensor, "d_embed"]] = None
    token_norm: Optional[str] = None
    """A LayerNorm applied to every token before pooling or before the pooler's keys and values."""
    pooler: Optional[str] = None
    """An attention pooler with ``.attn`` (``W_V``, ``b_V``, ``W_O``, ``b_O``) and ``.has_mlp``."""
    query_norm: Optional[str] = None
    """A LayerNorm applied to each pooler query's output (CoCa's ``ln_post``)."""
    pooled_norm: Optional[str] = None
    """A LayerNorm of the pooled vector (``final_ln_after_pool``, timm's ``fc_norm``)."""
