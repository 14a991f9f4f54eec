"""The hooked text tower, built from either open_clip text layout.

``open_clip.CLIP`` keeps its text modules at the top level (``model.transformer``,
``model.token_embedding`` …); ``CustomTextCLIP`` and ``CoCa`` hold a ``TextTransformer`` in
``model.text``. `TextTower` reads both into one hooked module.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.components import LayerNorm, TransformerBlock
from clip_lens.config import TowerConfig
from clip_lens.weights import TowerWeights
from clip_lens.errors import InputError, UnsupportedArchitectureError


class TextTower(TowerWeights, nn.Module):
    """Hooked text encoder sharing the parameters of the open_clip model it was built from.

    Hooks (under ``text.`` in [`HookedCLIP`][clip_lens.HookedCLIP]), ``n`` = token positions:

    ==============================  =========================================================
    ``hook_embed``                  ``[batch, n, m]`` token embeddings (+ CoCa's CLS)
    ``hook_pos_embed``              ``[batch, n, m]`` positional embedding
    ``blocks.{l}.*``                see `TransformerBlock`
    ``ln_final.hook_scale/normalized``  per token, or ``[batch, 1]`` for CoCa (after pooling)
    ``hook_pooled``                 ``[batch, m]`` the pooled (EOT/argmax/…) token
    ``hook_text_embed``             ``[batch, E]`` un-normalised text embedding
    ==============================  =========================================================
    """

    def __init__(self, model: nn.Module, model_name: Optional[str] = None):
        super().__init__()
        source = getattr(model, "text", None)
        if source is not None and not isinstance(source, TextTransformer):
            raise UnsupportedArchitectureError(
                f"text tower {type(source).__name__} is not supported (Hugging Face text towers are "
                "not reproduced); HookedCLIP wraps open_clip's own TextTransformer."
            )
        if source is None:  # open_clip.CLIP: text modules live on the model itself
            source = model
            self.cls_emb = None
            self.pool_type = model.text_pool_type
            self.eos_id = getattr(model, "text_eos_id", None)
            self.pad_mask = False
            self.pad_id = 0
            self.correct_cls_mask = False
            causal_mask = model.attn_mask
        else:
            self.cls_emb = source.cls_emb
            self.pool_type = source.pool_type
            self.eos_id = getattr(source, "eos_id", None)
            self.pad_mask = bool(source.use_pad_mask) or source.cls_emb is not None
            self.pad_id = source.pad_id
            self.correct_cls_mask = source.correct_cls_mask
            causal_mask = source.attn_mask
        self.register_buffer("causal_mask", causal_mask, persistent=False)
        self.token_embedding = source.token_embedding
        self.positional_embedding = source.positional_embedding
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock.from_open_clip(b) for b in source.transformer.resblocks)
        self.ln_final = LayerNorm(source.ln_final)
        self.text_projection = source.text_projection
        self.hook_pooled = HookPoint()
        self.hook_text_embed = HookPoint()

        first = source.transformer.resblocks[0]
        n_pos = self.positional_embedding.shape[0]
        self.cfg = TowerConfig(
            tower="text",
            n_layers=len(self.blocks),
            n_heads=first.attn.num_heads,
            d_model=source.transformer.width,
            d_head=first.attn.head_dim,
            d_mlp=first.mlp.c_fc.out_features,
            n_ctx=n_pos,
            d_embed=self._projection_width(),
            act_fn=type(first.mlp.gelu).__name__,
            pool_type="last" if self.cls_emb is not None else self.pool_type,
            layer_scale=self.blocks[0].attn.layer_scale is not None,
            context_length=n_pos - (1 if self.cls_emb is not None else 0),
            vocab_size=self.token_embedding.num_embeddings,
            causal=causal_mask is not None,
            model_name=model_name,
            dtype=self.token_embedding.weight.dtype,
        )

    def _projection_width(self) -> Optional[int]:
        proj = self.text_projection
        if proj is None:
            return None
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def output_affine(self) -> tuple[Float[Tensor, "m E"], Optional[Float[Tensor, "E"]]]:
        """The projection after pooling as ``pooled @ W + b`` (identity without one)."""
        proj = self.text_projection
        if isinstance(proj, nn.Linear):
            return proj.weight.T, proj.bias
        if proj is not None:
            return proj, None
        ln = self.ln_final.weight
        return torch.eye(ln.shape[0], device=ln.device, dtype=ln.dtype), None

    def attention_mask(self, tokens: Int[Tensor, "batch ctx"], seq_len: int, dtype: torch.dtype) -> Optional[Tensor]:
        """Additive mask ``[seq, seq]`` (causal) or ``[batch, heads, seq, seq]`` (with padding)."""
        causal = None if self.causal_mask is None else self.causal_mask[:seq_len, :seq_len].to(dtype)
        if not self.pad_mask:
            return causal
        valid = tokens != self.pad_id
        if self.cls_emb is not None:
            ones = valid.new_ones(valid.shape[0], 1)
            valid = torch.cat([valid, ones] if self.correct_cls_mask else [ones, valid], dim=1)
        additive = torch.zeros(valid.shape[0], 1, seq_len, seq_len, dtype=dtype, device=tokens.device)
        additive = additive.masked_fill(~valid[:, None, None, :], float("-inf"))
        return additive if causal is None else additive + causal

    def pooled_positions(self, tokens: Int[Tensor, "batch ctx"]) -> Int[Tensor, "batch"]:
        """Each sequence's pooled position in the residual stream (the EOT/argmax/eos token, or
        CoCa's appended CLS), as ``text_global_pool`` picks it. Raises for ``pool_type='none'``."""
        batch, ctx = tokens.shape
        if self.cls_emb is not None or self.pool_type == "last":
            index = ctx if self.cls_emb is not None else ctx - 1
            return torch.full((batch,), index, dtype=torch.long, device=tokens.device)
        if self.pool_type == "first":
            return torch.zeros(batch, dtype=torch.long, device=tokens.device)
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        raise UnsupportedArchitectureError(
            f"text pool_type='{self.pool_type}' returns every token; there is no single pooled position."
        )

    def embed(self, tokens: Int[Tensor, "batch ctx"]) -> Float[Tensor, "batch n m"]:
        """The residual stream entering block 0 (``blocks.0.hook_resid_pre``)."""
        dtype = self.blocks[0].mlp.c_fc.weight.dtype
        x = self.token_embedding(tokens).to(dtype)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
        embed = self.hook_embed(x)
        pos = self.hook_pos_embed(self.positional_embedding[: x.shape[1]].to(dtype).expand(x.shape[0], -1, -1))
        return embed + pos

    def readout(self, x: Float[Tensor, "batch n m"], tokens: Int[Tensor, "batch ctx"]) -> Float[Tensor, "batch E"]:
        """The text embedding from the final residual stream: ``ln_final``, pooling, projection."""
        if self.cls_emb is not None:  # CoCa: the appended CLS is pooled, LN after pooling
            pooled = self.ln_final(x[:, -1])
        else:
            pooled = text_global_pool(self.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)
        pooled = self.hook_pooled(pooled)
        proj = self.text_projection
        if isinstance(proj, nn.Linear):
            pooled = proj(pooled)
        elif proj is not None:
            pooled = pooled @ proj
        return self.hook_text_embed(pooled)

    def forward(
        self,
        tokens: Int[Tensor, "batch ctx"],
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        *,
        residual: Optional[Float[Tensor, "batch n m"]] = None,
    ) -> Float[Tensor, "batch E"]:
        """The text embedding. ``stop_at_layer`` returns the residual stream entering that block
        ``[batch, n, m]``; with ``start_at_layer`` the run starts from ``residual`` (the stream
        entering that block) and ``tokens`` still give the masks and pooled positions."""
        layers = self.cfg.layer_range(start_at_layer, stop_at_layer)
        if start_at_layer is None:
            x = self.embed(tokens)
        elif residual is None:
            raise InputError("start_at_layer needs the residual stream: pass residual=[batch, n, d_model].")
        else:
            x = residual
        mask = self.attention_mask(tokens, x.shape[1], x.dtype)
        for layer in layers:
            x = self.blocks[layer](x, mask)
        return x if stop_at_layer is not None else self.readout(x, tokens)
