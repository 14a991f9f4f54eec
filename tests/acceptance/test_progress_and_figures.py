"""Issue 31, items 5, 7 and 8: long steps show progress, the user's photos reach the report, and the
figures and pages say what they show (captions, distinct label colours, span texts in order, one
spelling of "none", colour bars, HTML tables on the `mi` page)."""

from __future__ import annotations

import contextlib
import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from clip_lens import HookedCLIP, analyses
from clip_lens.head_report import NO_LABEL, Steps, analyse_heads, render_sections, span_texts
from clip_lens.report import CAPTIONS, build_report, render_html
from clip_lens.toy.world import ShapesWorld, batch_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG = b"\x89PNG\r\n\x1a\n"
HEAD_STEPS = ("collect", "textspan", "labels and metrics", "figures", "span replacement", "ablation", "segmentation")


def stderr_of(run):
    """``(run(), what it wrote on stderr)`` (tqdm bars pick their stream when they open)."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        value = run()
    return value, buffer.getvalue()


@pytest.fixture(scope="module")
def v2():
    return HookedCLIP.from_pretrained("toy-shapes-v2")


@pytest.fixture(scope="module")
def heads(v2, tmp_path_factory):
    """The report's head analyses on 120 shapes-world scenes, progress on, with their stderr."""
    out = tmp_path_factory.mktemp("heads")
    (summary, pngs), err = stderr_of(lambda: analyse_heads(v2, out, n_images=120))
    return summary, pngs, err


# --- item 5: progress --------------------------------------------------------------------------
@pytest.mark.slow  # moved out of the default run (seconds of real work; CI runs it)
def test_every_head_analysis_step_is_named_on_the_bar(heads):
    summary, _, err = heads
    for label in HEAD_STEPS:
        assert f"head analyses: {label}" not in err  # no outer bar here: the steps bar is its own
        assert re.search(rf"head analyses:.*\|.*{re.escape(label)}", err), label
    assert list(summary["seconds"]) == list(HEAD_STEPS)
    # the long steps have bars of their own, counting their units (opened at 0 of the total; quick ones are
    # cleared before tqdm redraws them)
    from clip_lens.banks import load_bank

    assert re.search(r"collect:\s+0%.*\| 0/120 ", err)
    assert re.search(rf"textspan: encode shapes-attributes:\s+0%.*\| 0/{len(load_bank('shapes-attributes'))} ", err)
    assert re.search(r"textspan: layers:\s+0%.*\| 0/4 ", err)
    assert re.search(r"segmentation:\s+0%.*\| 0/120 ", err)
    assert "verify" not in err  # a fresh store has nothing to verify: no empty "verify: 0chunk" bars


@pytest.mark.slow  # moved out of the default run (seconds of real work; CI runs it)
def test_outer_bar_gets_the_steps_in_its_postfix(v2, tmp_path):
    from tqdm import tqdm

    def run():
        with tqdm(total=5, desc="clip-lens report", unit="step") as bar:  # the CLI adds "build model"
            return build_report(v2, tmp_path / "r", n_images=2, head_images=60, progress=bar)

    (summary, _), err = stderr_of(run)
    for label in ("images", "decompose", "figures", "head analyses: collect", "head analyses: segmentation", "write"):
        assert re.search(rf"clip-lens report:.*{re.escape(label)}", err), label
    assert "clip-lens report: 100%" in err
    assert summary["heads"]["m"] == 20  # 60 images: m = 20 needs 41, no cap


def test_a_silent_step_keeps_ticking():
    """While a step prints nothing, its bar is redrawn every interval (the elapsed time moves)."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        steps = Steps(total=1, desc="work", interval=0.05)
        with steps.step("quiet"):
            time.sleep(0.6)
        steps.close()
    drawn = [line for line in re.split(r"[\r\n]", buffer.getvalue()) if "quiet" in line]
    assert len(drawn) >= 5, drawn
    assert steps.durations["quiet"] >= 0.6


@pytest.mark.slow  # moved out of the default run (seconds of real work; CI runs it)
def test_mi_shows_progress_after_its_images_bar(tmp_path):
    from clip_lens_plugins.mutual_knowledge import shapes_world_data, write_report

    model = HookedCLIP.from_pretrained("toy-shapes")
    data = shapes_world_data(10)
    result, err = stderr_of(lambda: analyses.get("mutual_knowledge")(model).run(data, progress=True))
    after = err[err.index("mutual knowledge: 100%"):]
    assert re.search(r"explanations: deletion/insertion: 100%.*(\d+)/\1", after)
    assert re.search(r"CorLoc:\s+0%.*\| 0/1 ", after)
    # item 8: the page renders its tables as HTML, not as Markdown inside <pre>
    page = write_report(result, data.load(range(4)), tmp_path / "mi").read_text()
    assert "<pre>" not in page and "|---" not in page and "| part method" not in page
    assert page.count("<table>") >= 3  # MI, explanations, CorLoc (+ the parameters)
    assert re.search(r"<th>part method</th><th>MI \(paper\)</th>", page)
    assert re.search(r"<td>GDC tokens</td><td>\d\.\d{3}</td>", page)


# --- item 7: the user's photos ----------------------------------------------------------------
@pytest.mark.slow  # moved out of the default run (seconds of real work; CI runs it)
def test_few_own_photos_cap_m_with_a_warning_and_appear_in_the_report(v2, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    world = ShapesWorld(seed=31, version=2)
    for i in range(9):
        Image.fromarray(world.scene(i).image).save(folder / f"photo{i}.png")
    with pytest.warns(UserWarning, match=r"only 9 images for 20 span texts.*m = 4"):
        summary, written = build_report(v2, tmp_path / "report", n_images=2, head_source=folder)
    heads = summary["heads"]
    assert heads["m"] == 4 and all(len(h["texts"]) == 4 for h in heads["spans"]["heads"])
    # not every head is "explained" by construction: 4 texts for 8 directions of variation
    assert min(h["cumulative"][-1] for h in heads["spans"]["heads"]) < 0.999
    page = written["report.html"].read_text()
    assert "only 9 images for 20 span texts" in page and "variance by 4 texts" in page
    mine = heads["your_images"]
    assert mine["ids"] == [str(folder / f"photo{i}.png") for i in range(3)]
    assert [np.shape(g) for g in mine["norms"]] == [tuple(v2.cfg.grid_size)] * 3
    assert written["your_images.png"].read_bytes().startswith(PNG)
    assert 'alt="your_images.png"' in page and CAPTIONS["your_images.png"].split(",")[0] in page


def test_span_cap_rule():
    assert span_texts(2000, 20) == (20, None)
    assert span_texts(41, 20) == (20, None)
    m, note = span_texts(40, 20)
    assert m == 19 and "give at least 41 images" in note
    assert span_texts(2, 20)[0] == 1


# --- item 8: figures and pages -----------------------------------------------------------------
def test_every_report_figure_has_a_caption(heads):
    summary, pngs, _ = heads
    assert "segmentation.png" in pngs
    for name in pngs:
        assert len(CAPTIONS.get(name, "")) > 40, name
    page = render_html({"model": "m", "pretrained": "p", "random_weights": False, "cfg": {
        "n_layers": 1, "n_heads": 1, "d_model": 1, "image_size": 1, "patch_size": 1, "pool_type": "tok"},
        "sum_check": {"max_relative_error": 0, "mean_relative_error": 0}, "embedding_norm_mean": 1,
        "embed_norm_mean": 1, "bias_norm_mean": 1, "layers": [], "heads": summary}, pngs)
    captions = re.findall(r"<figcaption><code>([^<]+)</code>: ([^<]*)</figcaption>", page)
    assert {name for name, _ in captions} == set(pngs)
    assert all(text.strip() for _, text in captions)


def test_span_texts_listed_largest_share_first_and_one_spelling_of_none(heads):
    summary, _, _ = heads
    page = render_sections(summary, {})
    lists = re.findall(r"<ul>(.*?)</ul>", page)
    assert len(lists) == len(summary["spans"]["heads"])
    for listed in lists:
        shares = [float(x) for x in re.findall(r"\((\d+\.\d)%\)", listed)]
        assert shares == sorted(shares, reverse=True) and len(shares) == 5  # the 5 texts the label is read from
    # a later pick that explains more (TextSpan's shares need not fall) is listed first
    import copy

    swapped = copy.deepcopy(summary)
    head = swapped["spans"]["heads"][0]
    head["explained_variance"][:2] = head["explained_variance"][1::-1]
    first = re.search(r"<ul><li>(.*?) <small>", render_sections(swapped, {})).group(1)
    assert first == head["texts"][1] != head["texts"][0]
    assert ">None<" not in page and "None<br>" not in page
    unlabelled = [h for h in summary["labels"]["heads"] if h["label"] is None]
    assert page.count(f"<td>{NO_LABEL}<br><small>confidence") == len(unlabelled)


def test_head_label_colours_are_distinct():
    from matplotlib.colors import to_rgb

    from clip_lens_plugins.head_labels.result import ABSTAIN, HeadLabel, HeadLabelsResult

    properties = ["colour", "shape", "size", "position", "background", "count"]
    labels = HeadLabelsResult("toy", "prototype", [HeadLabel(f"L0H{i}", p, 1.0, [], []) for i, p in enumerate(properties)]
                              + [HeadLabel("L1H0", None, 0.0, [], [])], properties)
    legend = labels.plot().axes[0].get_legend()
    colours = {text.get_text(): np.array(to_rgb(patch.get_facecolor()))
               for text, patch in zip(legend.get_texts(), legend.get_patches())}
    assert NO_LABEL == ABSTAIN and set(colours) == {*properties, ABSTAIN}
    for i, a in enumerate(properties):
        for b in properties[i + 1:]:
            assert np.abs(colours[a] - colours[b]).sum() > 0.4, (a, b)  # tab20 gave colour/shape 0.43 + 0.18 + 0.15 apart
        assert np.ptp(colours[a]) > 0.05  # no grey, the no-label colour
    assert np.abs(colours["colour"] - colours["shape"]).max() > 0.5


def test_segment_figures_have_one_colour_bar_whose_label_fits(v2):
    from clip_lens.app.api import name_map_rows

    images = batch_images([ShapesWorld(seed=5, version=2).scene(i) for i in range(2)])
    for n in (1, 2):
        heatmap = analyses.get("segmentation")(v2).run(images[:n], "a red shape", head="all")
        contrast = analyses.get("contrastive_segmentation")(v2).run(images[:n], "a red shape", "a blue shape", heads="all")
        for fig, app in ((heatmap.plot(images[:n]), False), (contrast.plot(images[:n]), False),
                         (name_map_rows(heatmap.plot(images[:n]), ["x"] * n, "share of the image–text similarity "
                                                                      "(per image, min to max)"), True)):
            bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
            assert len(bars) == 1, (n, app)
            fig.canvas.draw()
            label = fig.map_colour_bar.ax.yaxis.label
            assert label.get_text().strip()
            box, page = label.get_window_extent(), fig.bbox
            assert page.y0 <= box.y0 and box.y1 <= page.y1 and box.x1 <= page.x1, (n, app, box, page)


def test_page_explains_features_that_fire_everywhere():
    from clip_lens.feature_report import everywhere_note, render_section

    everywhere = {"features": [{"feature": f, "frequency": 1.0, "max_activation": 1.0, "dashboard": "x"} for f in range(8)],
                  "positions": "patches", "hook_name": "blocks.3.hook_resid_post", "n_images": 300}
    note = everywhere_note(everywhere)
    assert "8 of the 8 features" in note and "any of the positions the SAE reads (patches)" in note
    assert "8 of the 8 features" in render_section(everywhere, {})
    selective = {**everywhere, "features": [{**row, "frequency": 0.1} for row in everywhere["features"]]}
    assert everywhere_note(selective) is None
