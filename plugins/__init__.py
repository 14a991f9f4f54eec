"""Built-in clip_lens analyses, installed as the package ``clip_lens_plugins``.

Each analysis is a sub-package that uses only clip_lens' public API and registers through the
``clip_lens.analyses`` entry-point group, exactly as a third-party plugin would.
"""
