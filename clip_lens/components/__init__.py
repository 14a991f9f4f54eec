"""Hooked building blocks that reuse open_clip's parameters and modules."""

from clip_lens.components.attention import Attention, AttentionalPooler
from clip_lens.components.block import MLP, TransformerBlock
from clip_lens.components.layer_norm import LayerNorm, hooks_active

__all__ = ["Attention", "AttentionalPooler", "LayerNorm", "MLP", "TransformerBlock", "hooks_active"]
