"""Helpers for drawing user text in matplotlib figures.

Matplotlib reads any string with an even number of unescaped ``$`` as mathtext: a query such as
``"$\\foo$"`` or ``"$x^{$"`` then fails to parse and the figure raises, and ``"$x$"`` is drawn as a
formula instead of the text the user typed. A label of a megabyte takes minutes to lay out. Every
figure that draws text it did not write itself (a query, a label, a bank text, a class name, a
descriptor, a file name) passes it through `plain` first.

Low level on purpose: imports only the standard library, so that any module that draws can use it.
"""

from __future__ import annotations

import unicodedata

ELLIPSIS = "…"


def plain(text: object, limit: int = 120) -> str:
    """``text`` as matplotlib draws it literally, at most ``limit`` characters long.

    - every ``$`` is escaped (``\\$``), so mathtext is never triggered; matplotlib draws ``\\$``
      in plain text as ``$``, so the drawn text is the user's text;
    - control characters (newlines, tabs, NUL, …) become spaces: fonts have no glyph for them
      and a label stays on one line;
    - lone surrogates (undecodable bytes of a command line) become U+FFFD: the font engine
      refuses them with a ``TypeError``;
    - text longer than ``limit`` characters is cut to ``limit - 1`` and ends in ``…``, so a title
      is laid out in bounded time.

    Args:
        text: any object; ``str(text)`` is drawn.
        limit: the longest result, in characters (before escaping; at least 1).
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + ELLIPSIS
    return "".join(_drawable(ch) for ch in text).replace("$", r"\$")


def _drawable(ch: str) -> str:
    """One character as a font can draw it (see `plain`)."""
    category = unicodedata.category(ch)
    if category == "Cc":
        return " "
    if category == "Cs":
        return "\ufffd"
    return ch
