"""A worked example of a third-party clip_lens analysis plugin (entry point ``head_support``)."""

from clip_lens_example_plugin.analysis import HeadSupport, HeadSupportResult

__all__ = ["HeadSupport", "HeadSupportResult"]
