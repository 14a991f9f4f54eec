"""The head analyses of ``clip-lens report``: collect → TextSpan → head labels → metrics (+ checks).

The plugins are reached through the registry ([`clip_lens.analyses`][clip_lens.analyses]), as any user would; the
core never imports them. On the shapes world the report also checks the analyses against ground
truth: zero-shot accuracy per attribute, TextSpan's span-replacement validation, and whether the
heads labelled with a property are the ones whose ablation hurts that property most.
"""

from __future__ import annotations

import contextlib
import html
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import numpy as np
import torch

from clip_lens import analyses
from clip_lens.collect import collect, model_world_images
from clip_lens.errors import InputError

if TYPE_CHECKING:
    from clip_lens.hooked_clip import HookedCLIP

REPORT_SEED = 2024  # report images: an independent shapes world (training used 0, evaluation 1000)
CARRIER_SHARE = 0.10
"""A head carries an attribute (ground truth for its label) when mean-ablating its direct effect costs
at least this share of the attribute's mean zero-shot margin."""


TICK_SECONDS = 2.0
"""While a step runs, its bar is redrawn this often (elapsed time, step name), so no step is silent."""


class Steps:
    """Named steps on a tqdm bar (stderr) that keeps ticking while a step runs.

    ``bar``: an open bar to report on (the CLI's ``clip-lens report`` bar: steps only change its
    postfix, ``prefix: step``, and never advance it), or None to open one of ``total`` steps named
    ``desc`` (advanced once per step; closed by `close`). ``enabled=False``: no output at all.
    While a step runs, a daemon thread redraws the bar every ``interval`` seconds, so its elapsed
    time moves even when the step's own work prints nothing.
    """

    def __init__(self, bar: Any = None, *, total: Optional[int] = None, desc: str = "", prefix: str = "",
                 enabled: bool = True, interval: float = TICK_SECONDS):
        from tqdm.auto import tqdm

        self.own = bar is None and enabled
        self.bar = bar if bar is not None else (tqdm(total=total, desc=desc, unit="step") if enabled else None)
        self.prefix, self.interval = prefix, interval
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Run the block as step ``label``: named on the bar, ticking, timed (`durations`)."""
        start = time.perf_counter()
        if self.bar is None:
            yield
            self.durations[label] = time.perf_counter() - start
            return
        self.bar.set_postfix_str(f"{self.prefix}: {label}" if self.prefix else label)
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.interval):
                self.bar.refresh()

        ticker = threading.Thread(target=tick, name=f"clip-lens progress: {label}", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
        self.durations[label] = time.perf_counter() - start
        if self.own:
            self.bar.update(1)

    def close(self) -> None:
        if self.own:
            self.bar.close()


def _bar(steps: Steps, **options: Any) -> Any:
    """A tqdm bar for the inside of a step (disabled when the steps print nothing)."""
    from tqdm.auto import tqdm

    return tqdm(disable=steps.bar is None, leave=False, **options)


SPAN_IMAGES_PER_TEXT = 2
"""TextSpan keeps ``m`` ≤ (images − 1) / 2: the centred outputs of N images span at most N − 1
directions, so N − 1 texts always explain 100% of any head's variance; keeping m at half that rank
leaves the variance shares something to measure."""


def span_texts(n_images: int, m: int) -> tuple[int, Optional[str]]:
    """``(m to use, warning or None)`` for TextSpan over ``n_images`` images (`SPAN_IMAGES_PER_TEXT`)."""
    cap = max(1, (n_images - 1) // SPAN_IMAGES_PER_TEXT)
    if m <= cap:
        return m, None
    return cap, (
        f"only {n_images} images for {m} span texts per head: the outputs of {n_images} images span at most "
        f"{max(n_images - 1, 0)} directions, so that many texts explain 100% of every head's variance. Using m = {cap} "
        f"texts per head; give at least {SPAN_IMAGES_PER_TEXT * m + 1} images for m = {m}."
    )


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
    progress: Union[bool, Any] = True,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Run the head analyses into ``out_dir`` (store in ``out_dir/store``, resumable).

    ``progress``: True: a ``head analyses`` bar of steps on stderr (each step named, ticking while it
    runs; collection, text encoding and segmentation with bars of their own); a tqdm bar: the steps
    are named in its postfix (``head analyses: textspan``); False: silent. With fewer images than
    ``m`` needs, ``m`` is capped (`span_texts`) with a warning, also kept in the summary's ``warnings``.

    Returns the summary (JSON-able) and the figures as PNG bytes.
    """
    from clip_lens.figures import figure_png

    toy = images is None
    if toy and model.cfg.image_size is None:
        raise InputError("this model has no image size; pass images.")
    from clip_lens.toy.evaluate import shapes_world_version

    version = shapes_world_version(model)
    outer = None if isinstance(progress, bool) else progress
    shown = outer is not None or bool(progress)
    steps = Steps(outer, total=(7 if toy else 4), desc="head analyses", prefix="head analyses" if outer is not None else "",
                  enabled=shown)
    try:
        source = model_world_images(model, n_images, REPORT_SEED) if toy else images
        with steps.step("collect"):
            store = collect(model, source, Path(out_dir) / "store", chunk_size=250, batch_size=125, progress=shown)
        # one attribute per text on the shapes world, so that a head's property can be read off its texts
        bank = bank or ("shapes-attributes" if version is not None else "general")
        notes = []
        m_used, note = span_texts(store.n_done, m)
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
            notes.append(note)

        with steps.step("textspan"):
            spans = analyses.get("textspan")(model).run(store, bank=bank, m=m_used, progress=shown)
        with steps.step("labels and metrics"):
            labels = analyses.get("head_labels")(model).run(spans)
            metrics = analyses.get("interp_metrics")().run(labels, top_k=min(5, m_used))  # CCS over the first 5 texts
            summary: dict[str, Any] = {
                # n_images: the rows analysed, without the images skipped at collection
                "n_images": store.n_done, "images": store.meta["source"], "bank": spans.bank, "m": m_used,
                "spans": spans.to_dict(), "labels": labels.to_dict(), "metrics": metrics.to_dict(),
            }
            if notes:
                summary["warnings"] = notes
        with steps.step("figures"):
            pngs = {
                "head_labels.png": figure_png(labels.plot()),
                "span_variance.png": figure_png(spans.plot()),
                "metrics.png": figure_png(metrics.plot()),
            }
        if toy:
            with steps.step("span replacement"):
                tasks = attribute_tasks(model, n_images, REPORT_SEED)
                summary["span_replacement"] = spans.replacement_accuracy(store, tasks, ms=(5, 10, 20))
                summary["zero_shot"] = {a: scores["original"] for a, scores in summary["span_replacement"].items()}
            with steps.step("ablation"):
                ablation = analyses.get("ablation")().run(store, tasks)
                summary["ablation"] = ablation.to_dict()
                summary["ground_truth"] = ground_truth_agreement(labels, ablation, list(tasks))
                pngs["ablation.png"] = figure_png(ablation.plot())
                pngs["ablation_curves.png"] = figure_png(ablation.plot_curves())
            with steps.step("segmentation"):
                scenes = analyses.plugin_function("segmentation_eval", "shapes_world_segmentation")(
                    n_images, REPORT_SEED, model.cfg.image_size[0], version=version or 1)
                bar = _bar(steps, total=len(scenes), desc="segmentation", unit="img")
                scenes = _counting(scenes, bar)
                segmentation = analyses.get("segmentation_eval")(model).run(scenes)
                bar.close()
                summary["segmentation"] = {"markdown": segmentation.to_markdown(), **segmentation.to_dict()}
                pngs["segmentation.png"] = figure_png(segmentation.plot())
    finally:
        steps.close()
    summary["seconds"] = {label: round(seconds, 2) for label, seconds in steps.durations.items()}
    return summary, pngs


def _counting(dataset: Any, bar: Any) -> Any:
    """``dataset`` (a segmentation dataset: ``loader(start, stop)``) advancing ``bar`` by each batch it loads."""
    import dataclasses

    loader = dataset.loader

    def load(start: int, stop: int) -> Any:
        batch = loader(start, stop)
        bar.update(stop - start)
        return batch

    return dataclasses.replace(dataset, loader=load)


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


NO_LABEL = "none"
"""How a head without a label is written, in the tables as in the head-label figure's legend."""


def span_order(texts, shares, fits) -> list[tuple[str, float, bool]]:
    """``(text, share, fits)`` of a head's span texts, largest share of its variance first (stable:
    TextSpan's pick order among equal shares)."""
    rows = list(zip(texts, shares, fits))
    return sorted(rows, key=lambda row: -row[1])


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
    shown = min(10, max((len(h["texts"]) for h in summary["spans"]["heads"]), default=10))
    for h in summary["spans"]["heads"]:
        label = labels[h["head"]]
        judged = min(shown, len(label["fits"]))  # the texts the label was read from (head_labels' n_texts)
        texts = "".join(
            f"<li>{esc(t)} <small>({v:.1%}){' ✓' if fit else ''}</small></li>"
            for t, v, fit in span_order(h["texts"][:judged], h["explained_variance"], label["fits"])
        )
        span_rows.append(
            f"<tr><td><b>{h['head']}</b></td><td>{esc(label['label'] or NO_LABEL)}<br><small>confidence "
            f"{label['confidence']:.2f}, CCS {ccs[h['head']]['ccs']}</small></td>"
            f"<td><ul>{texts}</ul></td><td>{h['cumulative'][min(shown, len(h['cumulative'])) - 1]:.1%}</td></tr>"
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
        *(f'<p class="warn">{esc(note)}</p>' for note in summary.get("warnings", [])),
        image_tags.get("your_images.png", ""),
        image_tags.get("head_labels.png", ""),
        "<table><tr><th>head</th><th>label</th><th>first span texts, which the label is read from (share of the "
        f"head's variance each explains, largest first; ✓ fits the label)</th><th>variance by {shown} texts</th></tr>"
        + "".join(span_rows) + "</table>",
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
            f"<tr><td>{r['property']}</td><td>{', '.join(r['labelled_heads']) or NO_LABEL}</td><td>{', '.join(r['top_ablation_heads'])}</td>"
            f"<td>{_with_interval(r['agreement'], r.get('agreement_ci95'))}</td><td>{', '.join(r.get('carriers', [])) or NO_LABEL}</td>"
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
