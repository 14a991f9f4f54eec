"""Mean ablation of direct effects on a collected store (Gandelsman et al. §3)."""

from clip_lens_plugins.ablation.analysis import AblationResult, MeanAblation, ZeroShotTask, mean_ablate_heads, mean_ablate_layers

__all__ = ["AblationResult", "MeanAblation", "ZeroShotTask", "mean_ablate_heads", "mean_ablate_layers"]
