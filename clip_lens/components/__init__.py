"""Hooked building blocks that reuse open_clip's (and timm's) parameters and modules."""

from clip_lens.components.attention import Attention, AttentionalPooler, HeadAttention
from clip_lens.components.block import MLP, GatedMLP, TransformerBlock
from clip_lens.components.layer_norm import LayerNorm, hooks_active

__all__ = [
    "Attention", "AttentionalPooler", "GatedMLP", "HeadAttention", "LayerNorm", "MLP", "TransformerBlock", "hooks_active",
]
