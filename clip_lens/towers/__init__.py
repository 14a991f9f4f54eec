"""Hooked towers beyond open_clip's own ``VisionTransformer`` / ``TextTransformer``.

One module per family: `clip_lens.towers.timm_vit` (timm ViT, SigLIP/SigLIP2, EVA/EVA02,
PE-Core image towers) and `clip_lens.towers.hf_text` (Hugging Face text towers, run as
they are). Every tower emits the same TransformerLens hook names as the native ones.
"""
