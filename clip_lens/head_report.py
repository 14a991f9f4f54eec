"""The head analyses of ``clip-lens report``: collect → TextSpan → head labels → metrics (+ checks).

The plugins are reached through the registry ([`clip_lens.analyses`][clip_lens.analyses]), as any user would; the
core never imports them. On the shapes world the report also checks the analyses against ground
truth: zero-shot accuracy per attribute, TextSpan's span-replacement validation, and whether the
heads labelled with a property are the ones whose ablation hurts that property most.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from clip_lens import analyses
from clip_lens.collect import collect, shapes_world_images
from clip_lens.errors import InputError

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

REPORT_SEED = 2024  # report images: an independent shapes world (training used 0, evaluation 1000)
CARRIER_SHARE = 0.10
"""A head carries an attribute (ground truth for its label) when mean-ablating its direct effect costs
at least this share of the attribute's mean zero-shot margin."""


def report_attributes(model: "HookedCLIP") -> tuple[str, ...]:
    """The attributes checked on the report's one-object scenes: the model's world's, except ``count``
    (always "one" there; the bundle's zero-shot table measures it on scenes of 1–4 objects)."""
    from clip_lens.toy.evaluate import shapes_world_version
    from clip_lens.toy.world import ShapesWorld

    return tuple(a for a in ShapesWorld(version=shapes_world_version(model) or 1).attributes if a != "count")


def attribute_tasks(model: "HookedCLIP", n_images: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per world attribute: (prompt embeddings ``[values, D]``, true value index per image ``[N]``)."""
    from clip_lens.toy.evaluate import shapes_world_version
    from clip_lens.toy.world import ShapesWorld, attribute_prompt

    world = ShapesWorld(seed=seed, image_size=model.cfg.image_size[0], version=shapes_world_version(model) or 1)
    scenes = [world.scene(i) for i in range(n_images)]
    tasks = {}
    with torch.no_grad():
        for attribute in report_attributes(model):
            values = world.values[attribute]
            prompts = [attribute_prompt(attribute, v) for v in values]
            classifier = model.encode_text(model.to_tokens(prompts).to(model.device), normalize=True).float().cpu()
            labels = torch.tensor([values.index(s.value(attribute)) for s in scenes])
            tasks[attribute] = (classifier, labels)
    return tasks


def ground_truth_agreement(labels, ablation, attributes, n_boot: int = 1000) -> list[dict[str, Any]]:
    """Per attribute: of the ``k`` heads labelled with it, how many are among the ``k`` heads whose
    mean-ablation costs it the most margin (k = 1 and agreement 0 when no head has the label, so a
    missed attribute shows); and the labels' precision and recall against the heads that carry it
    (`CARRIER_SHARE`). Bootstrap 95% intervals resample the images behind the ablation ranking;
    the labels, from one TextSpan run, are held fixed."""
    rng = np.random.default_rng(0)
    heads = ablation.heads
    rows = []
    for attribute in attributes:
        drops = ablation.margin_drops[attribute].numpy()  # [heads, N]
        base = ablation.original_margin[attribute]
        labelled = [h.head for h in labels.heads if h.label == attribute]
        k = max(1, len(labelled))

        def ranked(columns: np.ndarray) -> tuple[list[str], list[str]]:
            """The top-k heads by mean margin lost on these images, and the heads that carry the attribute."""
            mean = drops[:, columns].mean(1)
            return ([heads[i] for i in np.argsort(-mean, kind="stable")[:k]],
                    [heads[i] for i in np.flatnonzero(mean >= CARRIER_SHARE * abs(base))])

        def measures(columns: np.ndarray) -> tuple[float, float, float]:
            top, carriers = ranked(columns)
            hits = len(set(labelled) & set(carriers))
            precision = hits / len(labelled) if labelled else float("nan")
            recall = hits / len(carriers) if carriers else float("nan")
            return len(set(labelled) & set(top)) / k, precision, recall

        every = np.arange(drops.shape[1])
        point = measures(every)
        samples = np.array([measures(rng.integers(0, drops.shape[1], drops.shape[1])) for _ in range(n_boot)])
        top, carriers = ranked(every)
        row = {"property": attribute, "attribute": attribute, "labelled_heads": labelled,
               "top_ablation_heads": top, "carriers": carriers}
        for j, name in enumerate(("agreement", "precision", "recall")):
            column = samples[:, j][~np.isnan(samples[:, j])]
            row[name] = None if np.isnan(point[j]) else point[j]
            row[f"{name}_ci95"] = list(np.percentile(column, [2.5, 97.5])) if column.size else None
        rows.append(row)
    return rows


def analyse_heads(
    model: "HookedCLIP",
    out_dir: Path,
    *,
    n_images: int = 1000,
    images: Any = None,
    bank: Optional[str] = None,
    m: int = 20,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Run the head analyses into ``out_dir`` (store in ``out_dir/store``, resumable).

    Returns the summary (JSON-able) and the figures as PNG bytes.
    """
    from clip_lens.report import figure_png

    toy = images is None
    if toy and model.cfg.image_size is None:
        raise InputError("this model has no image size; pass images.")
    from clip_lens.toy.evaluate import shapes_world_version

    version = shapes_world_version(model)
    source = shapes_world_images(n_images, REPORT_SEED, model.cfg.image_size[0], version or 1) if toy else images
    store = collect(model, source, Path(out_dir) / "store", chunk_size=250, batch_size=125, progress=progress)
    # one attribute per text on the shapes world, so that a head's property can be read off its texts
    bank = bank or ("shapes-attributes" if version is not None else "general")

    spans = analyses.get("textspan")(model).run(store, bank=bank, m=m)
    labels = analyses.get("head_labels")(model).run(spans)
    metrics = analyses.get("interp_metrics")().run(labels)
    summary: dict[str, Any] = {
        # n_images: the rows analysed, without the images skipped at collection
        "n_images": store.n_done, "images": store.meta["source"], "bank": spans.bank, "m": m,
        "spans": spans.to_dict(), "labels": labels.to_dict(), "metrics": metrics.to_dict(),
    }
    pngs = {
        "head_labels.png": figure_png(labels.plot()),
        "span_variance.png": figure_png(spans.plot()),
        "metrics.png": figure_png(metrics.plot()),
    }
    if toy:
        tasks = attribute_tasks(model, n_images, REPORT_SEED)
        summary["span_replacement"] = spans.replacement_accuracy(store, tasks, ms=(5, 10, 20))
        summary["zero_shot"] = {a: scores["original"] for a, scores in summary["span_replacement"].items()}
        ablation = analyses.get("ablation")().run(store, tasks)
        summary["ablation"] = ablation.to_dict()
        summary["ground_truth"] = ground_truth_agreement(labels, ablation, list(tasks))
        pngs["ablation.png"] = figure_png(ablation.plot())
        pngs["ablation_curves.png"] = figure_png(ablation.plot_curves())
        scenes = analyses.plugin_function("segmentation_eval", "shapes_world_segmentation")(
            n_images, REPORT_SEED, model.cfg.image_size[0], version=version or 1)
        segmentation = analyses.get("segmentation_eval")(model).run(scenes)
        summary["segmentation"] = {"markdown": segmentation.to_markdown(), **segmentation.to_dict()}
        pngs["segmentation.png"] = figure_png(segmentation.plot())
    return summary, pngs


KEEP_LAST_NOTE = (
    "Even with every attention layer kept (k = {n}), the embedding term and every MLP's direct effect stay "
    "mean-ablated, so that row differs from \u201cnone ablated\u201d: the gap is what those direct paths carry."
)
"""Why the last row of the keep-last table is not the unablated model (shown under the table)."""


def _keep_last_table(ablation: dict[str, Any]) -> str:
    """Accuracy with all but the last k attention layers mean-ablated, then the unablated model, with
    a caption saying what each row keeps (the embedding term and MLPs are ablated in every k row)."""
    esc = html.escape
    tasks = list(ablation["original"])
    n = max((int(k) for k in ablation["keep_last"]), default=0)

    def kept(k: int) -> str:
        if k == 0:
            return "0 (everything ablated)"
        if k == n:
            return f"{k} (every attention layer; MLPs and embedding term still ablated)"
        return str(k)

    head = "<tr><th>last k attention layers kept</th>" + "".join(f"<th>{esc(t)}</th>" for t in tasks) + "</tr>"
    rows = "".join(
        f"<tr><td>{kept(int(k))}</td>" + "".join(f"<td>{values[t]:.3f}</td>" for t in tasks) + "</tr>"
        for k, values in sorted(ablation["keep_last"].items(), key=lambda kv: int(kv[0]))
    )
    original = ("<tr><td>none ablated (the model)</td>" + "".join(f"<td>{ablation['original'][t]:.3f}</td>" for t in tasks)
                + "</tr>")
    caption = f"<caption>{esc(KEEP_LAST_NOTE.format(n=n))}</caption>"
    return f'<table class="keep-last">{caption}{head}{rows}{original}</table>'


def _markdown_table(markdown: str) -> str:
    """A result's markdown table (``| a | b |`` rows, then notes) as HTML."""
    esc = html.escape
    rows = [line.strip().strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    notes = [line for line in markdown.splitlines() if line.strip() and not line.startswith("|")]
    head, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
    table = ("<table><tr>" + "".join(f"<th>{esc(c.strip())}</th>" for c in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c.strip())}</td>" for c in r) + "</tr>" for r in body) + "</table>")
    return table + "".join(f"<p><small>{esc(n)}</small></p>" for n in notes)


def _with_interval(value: Optional[float], interval: Optional[list]) -> str:
    """``0.950 [0.931, 0.966]``; "–" for an undefined value (no labelled head, no carrier)."""
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" <small>[{interval[0]:.3f}, {interval[1]:.3f}]</small>" if interval else "")


def render_sections(summary: dict[str, Any], image_tags: dict[str, str]) -> str:
    """HTML of the head-analysis sections (``image_tags``: figure name → ``<figure>`` HTML)."""
    esc = html.escape
    labels = {h["head"]: h for h in summary["labels"]["heads"]}
    ccs = summary["metrics"]["per_head"]
    span_rows = []
    for h in summary["spans"]["heads"]:
        label = labels[h["head"]]
        texts = "".join(
            f"<li>{esc(t)} <small>({v:.1%}){' ✓' if fit else ''}</small></li>"
            for t, v, fit in zip(h["texts"][:10], h["explained_variance"], label["fits"])
        )
        span_rows.append(
            f"<tr><td><b>{h['head']}</b></td><td>{esc(str(label['label']))}<br><small>confidence "
            f"{label['confidence']:.2f}, CCS {ccs[h['head']]['ccs']}</small></td>"
            f"<td><ol>{texts}</ol></td><td>{h['cumulative'][min(9, len(h['cumulative']) - 1)]:.1%}</td></tr>"
        )
    m = summary["metrics"]
    intervals = m.get("intervals", {})
    metric_rows = "".join(
        f"<tr><td>{name}</td><td>{value}</td></tr>"
        for name, value in [
            ("association (higher: more consistent heads)", _with_interval(m["association"], intervals.get("association"))),
            ("entanglement (lower: fewer heads share a property)", _with_interval(m["entanglement"], intervals.get("entanglement"))),
            ("concentrated-concept ratio", _with_interval(m["ccr"], intervals.get("ccr"))),
            *[(f"CCS@{k}", f"{v:.3f}") for k, v in m["ccs_at_k"].items()],
        ]
    )
    parts = [
        f"<h2>Head spans (TextSpan, bank <code>{esc(summary['bank'])}</code>, {summary['n_images']} images)</h2>",
        image_tags.get("head_labels.png", ""),
        "<table><tr><th>head</th><th>label</th><th>span texts (variance explained; ✓ fits the label)</th>"
        "<th>variance by 10 texts</th></tr>" + "".join(span_rows) + "</table>",
        image_tags.get("span_variance.png", ""),
        "<h2>Interpretability metrics</h2><p>[bootstrap 95% intervals over heads; labels held fixed]</p>"
        "<table><tr><th>metric</th><th>value</th></tr>" + metric_rows + "</table>",
        image_tags.get("metrics.png", ""),
    ]
    if "zero_shot" in summary:
        attributes = list(summary["zero_shot"])
        columns = [c for c in next(iter(summary["span_replacement"].values())) if c != "ci95"]
        rows = "".join(
            f"<tr><td>{a}</td>" + "".join(
                f"<td>{_with_interval(summary['span_replacement'][a][c], summary['span_replacement'][a].get('ci95', {}).get(c))}</td>"
                for c in columns) + "</tr>"
            for a in attributes
        )
        truth = "".join(
            f"<tr><td>{r['property']}</td><td>{', '.join(r['labelled_heads']) or 'none'}</td><td>{', '.join(r['top_ablation_heads'])}</td>"
            f"<td>{_with_interval(r['agreement'], r.get('agreement_ci95'))}</td><td>{', '.join(r.get('carriers', [])) or 'none'}</td>"
            f"<td>{_with_interval(r.get('precision'), r.get('precision_ci95'))}</td><td>{_with_interval(r.get('recall'), r.get('recall_ci95'))}</td></tr>"
            for r in summary["ground_truth"]
        )
        parts += [
            "<h2>Checks against ground truth (shapes world)</h2>",
            "<p>Zero-shot accuracy per attribute with every head replaced by its span reconstruction "
            "(first <i>m</i> texts), against the original model.</p>",
            "<table><tr><th>attribute</th>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>" + rows + "</table>",
            "<p>Heads labelled with a property vs. the heads whose mean-ablation costs that attribute the most margin "
            f"(agreement: share of the k labelled heads among the top k; k = 1 when none is labelled), and the labels' "
            f"precision and recall against the heads that carry the attribute (ablating one costs at least "
            f"{CARRIER_SHARE:.0%} of its mean margin). [bootstrap 95% intervals over images; labels held fixed]</p>",
            "<table><tr><th>attribute</th><th>labelled heads</th><th>top ablation heads</th><th>agreement</th>"
            "<th>carriers</th><th>precision</th><th>recall</th></tr>" + truth + "</table>",
            image_tags.get("ablation.png", ""),
            "<p>Mean-ablating whole layers (direct effects): accuracy with everything but the last <i>k</i> "
            "attention layers ablated (embedding term and MLPs included, for every <i>k</i>).</p>",
            _keep_last_table(summary["ablation"]),
            image_tags.get("ablation_curves.png", ""),
        ]
    if "segmentation" in summary:
        parts += [
            "<h2>Zero-shot segmentation against baselines (shapes world)</h2>",
            "<p>Decomposition heatmaps of the predicted colour against maps that could beat them: no object "
            "anywhere, a constant map, two maps computed from the pixels alone (chroma; distance from the border "
            "colour), raw attention and random heads. Object IoU is the foreground class's IoU; with small objects "
            "mIoU is carried by the background. [bootstrap 95% intervals over images]</p>",
            _markdown_table(summary["segmentation"]["markdown"]),
            image_tags.get("segmentation.png", ""),
        ]
    return "\n".join(parts)
