"""The ``head_labels`` analysis: a property label for each attention head from its TextSpan texts.

>>> from clip_lens_plugins.head_labels import HeadLabels
>>> table = HeadLabels(model).run(spans)          # doctest: +SKIP  (offline prototype labeler)
>>> table = HeadLabels(model, labeler="llm").run(spans)  # doctest: +SKIP  ($CLIP_LENS_LLM_URL, $CLIP_LENS_LLM_MODEL)
"""

from clip_lens_plugins.head_labels.analysis import HeadLabels
from clip_lens_plugins.head_labels.labelers import Labeler, LabelerError, LLMLabeler, PrototypeLabeler
from clip_lens_plugins.head_labels.result import HeadLabel, HeadLabelsResult

__all__ = ["HeadLabels", "HeadLabel", "HeadLabelsResult", "Labeler", "PrototypeLabeler", "LLMLabeler", "LabelerError"]
