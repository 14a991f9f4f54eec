"""The figure layer: matplotlib set-up, PNG rendering and drawing user text safely.

Every module that draws (the report sections, the SAE dashboards, the web app, the plugins'
``plot`` methods through their callers) imports its figure helpers from here, never from the report:
[`pyplot`][clip_lens.figures.pyplot] (the non-interactive Agg backend, so figures render without a
display), [`figure_png`][clip_lens.figures.figure_png] (a figure → PNG bytes, closed),
[`png_data_url`][clip_lens.figures.png_data_url] (PNG bytes → a ``data:`` URL for HTML and JSON) and
[`figure_data_url`][clip_lens.figures.figure_data_url] (both at once); the colour maps the figures share
(`HEAD_CMAP`, `TOKEN_CMAP`, `HEAT_CMAP`) and [`heat_rgba`][clip_lens.figures.heat_rgba] (a map as an
overlay on an image).

User text:
Matplotlib reads any string with an even number of unescaped ``$`` as mathtext: a query such as
``"$\\foo$"`` or ``"$x^{$"`` then fails to parse and the figure raises, and ``"$x$"`` is drawn as a
formula instead of the text the user typed. A label of a megabyte takes minutes to lay out. Every
figure that draws text it did not write itself (a query, a label, a bank text, a class name, a
descriptor, a file name) passes it through `plain` first.

Low level on purpose: imports only the standard library at import time (matplotlib inside the
functions that need it), so that any module that draws can use it and ``clip-lens --help`` stays fast.
"""

from __future__ import annotations

import base64
import io
import unicodedata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

ELLIPSIS = "…"
HEAD_CMAP = "viridis"
"""Layer × head grids (the report's decomposition figure)."""
TOKEN_CMAP = "magma"
"""Per-patch contribution maps (the report's token figures)."""
HEAT_CMAP = "inferno"
"""Activation overlays drawn on images (SAE dashboards, the app's Features tab)."""


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


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures render to files and bytes,
    with no display and no GUI event loop)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: "Figure", dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def png_data_url(png: bytes) -> str:
    """PNG bytes as a ``data:image/png;base64,…`` URL (an ``<img src>`` of a self-contained page, a JSON field)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_data_url(fig: "Figure", dpi: int = 110) -> str:
    """A figure as a PNG ``data:`` URL (`figure_png` then `png_data_url`); the figure is closed."""
    return png_data_url(figure_png(fig, dpi))


def heat_rgba(heat: "np.ndarray", opacity: float = 0.75) -> "np.ndarray":
    """A ``[h, w]`` map in [0, 1] (clipped) as an ``[h, w, 4]`` RGBA overlay: the `HEAT_CMAP` colour of
    each value, opacity ``opacity`` × value, so where the map is 0 the image shows through."""
    import numpy as np
    from matplotlib import colormaps

    heat = np.clip(heat, 0, 1)
    rgba = colormaps[HEAT_CMAP](heat)
    rgba[..., 3] = opacity * heat
    return rgba


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
td ol { margin: 0; padding-left: 1.4em; }
img { max-width: 100%; } figure { margin: 1.5em 0; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""
"""The style of the stand-alone dashboard pages (`clip-lens sae inspect`, `clip-lens neurons`)."""


def html_page(title: str, body: str, numbers: str) -> str:
    """A self-contained HTML page: ``title`` as its heading, ``body`` (HTML), and a line naming the JSON file
    ``numbers`` that holds the figures' numbers next to it."""
    import html

    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{PAGE_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n"
            f"<p>Numbers: <code>{html.escape(numbers)}</code> next to this file.</p>\n</body></html>\n")
