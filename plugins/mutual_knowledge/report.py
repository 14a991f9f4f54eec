"""One folder a run: the result (JSON), its figures (PNG) and a self-contained HTML page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from clip_lens.files import atomic_write
from clip_lens.figures import figure_png, png_data_url

if TYPE_CHECKING:
    from clip_lens_plugins.mutual_knowledge.analysis import MutualKnowledgeResult


def write_report(result: "MutualKnowledgeResult", images: Float[Tensor, "n 3 H W"], out: str | Path, examples: int = 4) -> Path:
    """Write ``MutualKnowledgeResult.json``, ``mi_dynamics.png``, ``concepts_<method>.png``,
    ``venn.png``, ``evaluation.png`` (when evaluated) and ``index.html`` into ``out``; returns the page.

    ``images``: the first images of the run (at least ``examples`` of them), for the concept figure.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "MutualKnowledgeResult.json")
    shown = list(range(min(examples, len(images), len(result.images))))
    figures = {"mi_dynamics": result.plot()}
    for method in result.methods:
        figures[f"concepts_{method}"] = result.plot_concepts(images[shown], shown, method=method)
    figures["venn"] = result.plot_venn(0)
    if result.evaluation is not None:
        from clip_lens_plugins.mutual_knowledge.evaluation import ExplanationEval

        figures["evaluation"] = ExplanationEval.from_dict(result.evaluation).plot()
    pngs = {name: figure_png(fig) for name, fig in figures.items()}
    for name, data in pngs.items():
        atomic_write(out / f"{name}.png", data)
    page = out / "index.html"
    atomic_write(page, _html(result, pngs))
    return page


def _html(result: "MutualKnowledgeResult", pngs: dict[str, bytes]) -> str:
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in result.parameters.items())
    images = "".join(
        f"<h2>{esc(name.replace('_', ' '))}</h2><img alt=\"{esc(name)}\" src=\"{png_data_url(data)}\">"
        for name, data in pngs.items()
    )
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>clip_lens: mutual knowledge</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
        "td,th{padding:2px 8px;text-align:left}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc}</style></head><body>\n"
        f"<h1>Mutual knowledge of {esc(str(result.parameters.get('model')))}</h1>\n"
        f"{markdown_html(result.to_markdown())}\n<h2>parameters</h2><table class=\"parameters\">{rows}</table>\n{images}\n</body></html>\n"
    )


def markdown_html(markdown: str) -> str:
    """The result's markdown (paragraphs and ``| a | b |`` tables) as HTML: each run of table lines a
    ``<table>`` (the first row its header, the ``|---|`` line dropped), every other line a paragraph."""
    esc = html.escape
    parts: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, body = table[0], table[1:]
            parts.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # the header rule
                table.append(cells)
            continue
        flush()
        if stripped:
            parts.append(f"<p>{esc(stripped)}</p>")
    flush()
    return "\n".join(parts)
