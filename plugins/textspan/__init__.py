"""TextSpan head spans (Gandelsman et al., ICLR 2024): the texts that span each head's outputs."""

from clip_lens_plugins.textspan.algorithm import Span, textspan

__all__ = ["Span", "textspan"]
