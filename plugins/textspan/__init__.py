"""TextSpan head spans (Gandelsman et al., ICLR 2024): the texts that span each head's outputs."""

from clip_lens_plugins.textspan.algorithm import Span, textspan
from clip_lens_plugins.textspan.analysis import HeadSpan, TextSpan, TextSpanResult

__all__ = ["HeadSpan", "Span", "TextSpan", "TextSpanResult", "textspan"]
