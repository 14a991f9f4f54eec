"""Issue 27, classes 2 and 3 outside the web app: user text in figures, and stores that skipped images.

User text (a query, a label, a bank text, a class name, a descriptor, a file name) is drawn through
`clip_lens.figures.plain`: matplotlib never reads it as mathtext (``"$\\foo$"`` and ``"$x^{$"`` raised in
``neighbors``/``segment`` before), and a 1 MB text is cut before layout. Each figure is rendered to PNG,
and every text it drew is checked: not mathtext, at most `DRAWN` characters, the user's text shown
literally (short attacks) or as its shortened prefix (the 1 MB one).

Skipped rows: a folder of scene PNGs with one undecodable file, collected with `clip_lens.collect.collect`.
Every reader that maps store rows back to images (``sae inspect --store``, the neighbours figure, the
shapes-world search truth, TextSpan/ablation labels) numbers rows as ``Store.read``/``Store.ids`` do, i.e.
without the skipped image; each is checked by recomputing from the image files themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib import cbook
from matplotlib.text import Text
from PIL import Image
from typer.testing import CliRunner

from clip_lens import HookedCLIP, analyses
from clip_lens.banks import TextBank
from clip_lens.collect import ImageSource, collect, shapes_world_images, store_thumbnails
from clip_lens.errors import InputError
from clip_lens.figures import ELLIPSIS, plain
from clip_lens.files import load_image
from clip_lens.toy.world import ShapesWorld, batch_images
from tests.helpers import ok

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # a glyph the font lacks (control characters) or a label too wide for its cell is drawn wrong: fail on it
    pytest.mark.filterwarnings("error:Glyph .* missing from font:UserWarning"),
    pytest.mark.filterwarnings("error:constrained_layout not applied:UserWarning"),
]

BIG = "$" + "x" * (2**20 - 2) + "$"  # 1 MiB, mathtext-shaped, one (unknown) word for the toy tokenizer
ATTACKS = {"backslash": "$\\foo$", "unclosed": "$x^{$", "1MB": BIG}
DRAWN = 400  # the longest text any figure may draw (titles join a few shortened parts)
BAD = 2  # the undecodable file of the skipped-image folder
HOOK = "blocks.3.hook_resid_post"


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def drawn(fig) -> list[str]:
    """Render ``fig`` to PNG (the step that raised on mathtext) and return every text it drew."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    assert buffer.getvalue().startswith(b"\x89PNG")
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def shown(text: str) -> str:
    """What matplotlib shows for a plain (non-math) text: ``\\$`` is drawn as ``$``."""
    return text.replace(r"\$", "$")


def assert_user_text_drawn(fig, attack: str) -> None:
    """``fig`` renders, draws nothing as mathtext, nothing longer than `DRAWN`, and shows ``attack``
    literally (short) or its first characters followed by the ellipsis (1 MB)."""
    texts = drawn(fig)
    assert not [t for t in texts if cbook.is_math_text(t)]
    assert max(map(len, texts)) <= DRAWN
    if len(attack) < 40:
        assert any(attack in shown(t) for t in texts), texts
    else:
        assert any(attack[:20] in shown(t).replace("\n", "") and ELLIPSIS in t for t in texts), texts


@pytest.fixture(scope="module")
def toy() -> HookedCLIP:
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


# --- figures.plain -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["$\\foo$", "$x^{$", "$x$", "cost: $5", "\\$x$", "a $b$ c $d$ e"])
def test_plain_text_is_never_mathtext_and_shows_the_text_itself(text):
    out = plain(text)
    assert not cbook.is_math_text(out)
    assert Text(text=out)._preprocess_math(out) == (text, False)  # matplotlib's own reading: the user's text, not math


def test_plain_bounds_length_and_replaces_what_fonts_cannot_draw():
    out = plain(BIG)
    assert len(out) == 120 + out.count("\\$") and out.endswith(ELLIPSIS) and shown(out) == BIG[:119] + ELLIPSIS
    assert plain("x" * 120) == "x" * 120 and plain("x" * 121) == "x" * 119 + ELLIPSIS
    assert plain("abcdef", limit=3) == "ab" + ELLIPSIS and plain("abc", limit=1) == ELLIPSIS
    assert plain("a\nb\tc\x00d") == "a b c d"
    assert plain("\ud800x") == "\ufffdx"  # a lone surrogate made the font engine raise TypeError
    assert plain(3.5) == "3.5"
    with pytest.raises(ValueError, match="at least 1"):
        plain("x", limit=0)


# --- figures with user text ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(toy, tmp_path_factory) -> SimpleNamespace:
    """A small shapes-world store (per-head terms of layer 3) and query scenes."""
    root = tmp_path_factory.mktemp("user_text")
    store = collect(toy, shapes_world_images(6, seed=11), root / "store", heads=[3], chunk_size=6, batch_size=6, progress=False)
    world = ShapesWorld(seed=12)
    pixels = batch_images([world.scene(i) for i in range(2)])
    return SimpleNamespace(root=root, store=store, pixels=pixels, images=np.stack([world.scene(i).image for i in range(6)]))


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_neighbours_figure_of_a_text_query_draws_it_as_text(toy, scenes, attack):
    result = analyses.get("neighbors")(toy).run(scenes.store, query_texts=[attack, "a red shape"], heads=["L3H0"], k=3)
    assert result.texts[0] == attack  # the result keeps the text; only the figure shortens it
    assert_user_text_drawn(result.plot(scenes.images), attack)


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_neighbours_figure_of_an_image_query_draws_the_property_as_text(toy, scenes, attack):
    from clip_lens_plugins.head_labels import HeadLabel, HeadLabelsResult

    labels = HeadLabelsResult("toy-shapes", "prototype", [HeadLabel("L3H1", attack, 1.0, ["t"], [True])], [attack])
    result = analyses.get("neighbors")(toy).run(scenes.store, query_images=scenes.pixels, property=attack, labels=labels, k=2)
    assert_user_text_drawn(result.plot(scenes.images, scenes.images[:2]), attack)


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_segmentation_figures_draw_topic_and_contrastive_texts_as_text(toy, scenes, attack):
    topic = analyses.get("segmentation")(toy).run(scenes.pixels, attack, head="L3H0")
    assert_user_text_drawn(topic.plot(scenes.pixels), attack)
    contrast = analyses.get("contrastive_segmentation")(toy).run(scenes.pixels, attack, "a red shape", heads="all")
    assert_user_text_drawn(contrast.plot(scenes.pixels), attack)


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_sae_dashboards_draw_bank_texts_as_text(toy, scenes, attack):
    from clip_lens.feature_report import inspect_features
    from clip_lens.sae import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=toy.cfg.d_model, d_sae=8, architecture="topk", k=2, hook_name=HOOK, model_name="toy-shapes"))
    inspection = inspect_features(toy, sae, scenes.pixels, features=[0, 1], k=2, bank=TextBank("attack", [attack], "list"))
    assert inspection.names.top(0)[0][0] == attack
    for f in inspection.features:
        assert_user_text_drawn(inspection.top.plot(f, names=inspection.names), attack)
    assert all(png.startswith(b"\x89PNG") for png in inspection.dashboards(dpi=30).values())


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_report_figures_draw_model_checkpoint_and_labels_as_text(toy, attack):
    from clip_lens.report import plot_decomposition, plot_tokens, report_images, summarize, token_norms
    from clip_lens_plugins.head_labels import HeadLabel, HeadLabelsResult

    images, pixels, description = report_images(toy, 1)
    decomposition = toy.decompose(images, heads="all", tokens=[toy.cfg.n_layers - 1])
    summary = summarize(toy, decomposition, n_images=1, seed=0, images=description)
    for key in ("model", "pretrained"):  # a checkpoint's file name, a model name read from a result
        attacked = {**summary, "random_weights": False, "model": "toy-shapes", "pretrained": "/ckpt/x.pt"}
        attacked[key] = attack if key == "model" else f"/ckpt/{attack}"
        assert_user_text_drawn(plot_decomposition(attacked), attack)
        assert_user_text_drawn(plot_tokens(attacked, token_norms(decomposition), pixels[0], toy.cfg.grid_size,
                                           toy.cfg.pool_type), attack)
    table = HeadLabelsResult(attack, "prototype", [HeadLabel("L3H0", attack, 1.0, ["t"], [True])], [attack])
    assert_user_text_drawn(table.plot(), attack)


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_mutual_knowledge_figures_draw_classes_descriptors_and_ids_as_text(attack):
    from clip_lens_plugins.mutual_knowledge.analysis import ImageConcepts
    from clip_lens_plugins.mutual_knowledge.plots import concept_figure, venn_figure

    record = ImageConcepts(id=f"{attack}.png", predicted=0, label=0, parts=[[0, 0], [1, -1]], region_descriptors=[[0], [1]],
                           visual=[0, 1], textual=[1, 2], mi=0.5, curve=[0.5, 0.1], auc=0.3, control_curve=[0.5, 0.4],
                           control_auc=0.4)
    descriptors, classes = [attack, "round", "red"], [attack, "square"]
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_user_text_drawn(concept_figure(image, [record], descriptors, classes), attack[:20])
    assert_user_text_drawn(venn_figure(record, descriptors, classes), attack[:20])


def test_cli_draws_mathtext_shaped_queries(runner, scenes, tmp_path):
    """``neighbors --text`` and ``segment --text/--versus`` ended in a mathtext traceback."""
    ok(runner, ["neighbors", "--store", scenes.store.path, "--model", "toy-shapes", "--text", "$\\foo$", "--text", "$x^{$",
                "--head", "L3H0", "--k", 3, "--out", tmp_path / "nb.json"])
    assert json.loads((tmp_path / "nb.json").read_text())["texts"] == ["$\\foo$", "$x^{$"]
    assert (tmp_path / "nb.png").read_bytes().startswith(b"\x89PNG")
    ok(runner, ["segment", "--text", "$x^{$", "--versus", "$\\foo$", "--shapes", 2, "--head", "L3H0", "--out", tmp_path / "seg.png"])
    assert (tmp_path / "seg.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "seg.json").read_text())["text_a"] == "$x^{$"


# --- stores that skipped an image ---------------------------------------------------------------
@pytest.fixture(scope="module")
def skipped(toy, tmp_path_factory) -> SimpleNamespace:
    """Scene PNGs 000..006 with 002 undecodable, collected in chunks of 3 (the skip is in chunk 0), and
    the same model's store of the six good files alone: the reference every reader must agree with."""
    root = tmp_path_factory.mktemp("skipped")
    folder = root / "images"
    folder.mkdir()
    world = ShapesWorld(seed=5)
    paths = []
    for i in range(7):
        path = folder / f"{i:03d}.png"
        if i == BAD:
            path.write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature")
        else:
            Image.fromarray(world.scene(i).image).save(path)
        paths.append(path)
    store = collect(toy, folder, root / "store", heads=[3], chunk_size=3, batch_size=3, progress=False)
    good = [p for i, p in enumerate(paths) if i != BAD]
    clean = collect(toy, good, root / "clean", heads=[3], chunk_size=6, batch_size=6, progress=False)
    return SimpleNamespace(root=root, folder=folder, paths=paths, good=good, store=store, clean=clean)


def test_the_store_lists_the_skipped_image_and_numbers_rows_without_it(skipped):
    store = skipped.store
    assert store.complete and store.n_images == 7 and store.n_done == 6
    assert list(store.skipped()) == [BAD] and store.skipped()[BAD][0] == str(skipped.paths[BAD])
    assert store.ids() == [str(p) for p in skipped.good] and len(store.read("heads")) == 6


def test_sae_inspect_on_a_store_that_skipped_an_image(runner, toy, skipped, tmp_path):
    """``sae inspect --store`` ended in an IndexError: it walked the source's 7 rows through 6 ids.
    Now each top image's id names the file whose activation, recomputed from the file alone, is the value shown."""
    from clip_lens.sae import SAE, SAEConfig, load_sae, save_sae
    from clip_lens.sae.naming import image_feature_acts, top_activating

    torch.manual_seed(1)
    save_sae(SAE(SAEConfig(d_in=toy.cfg.d_model, d_sae=8, architecture="topk", k=2, hook_name=HOOK, model_name="toy-shapes")),
             tmp_path / "sae")
    before = digest(skipped.root)
    ok(runner, ["sae", "inspect", tmp_path / "sae", "--store", skipped.store.path, "--model", "toy-shapes", "--k", 6,
                "--top-features", 3, "--bank", "none", "--out", tmp_path / "inspect"])
    assert digest(skipped.root) == before
    summary = json.loads((tmp_path / "inspect" / "features.json").read_text())
    assert summary["n_images"] == 6 and "without the 1 it skipped" in summary["images"]
    sae = load_sae(tmp_path / "sae")
    on_files = top_activating(toy, sae, skipped.good, k=6)  # the six good files, without any store
    acts = image_feature_acts(toy, sae, skipped.good)
    for row in summary["features"]:
        f = row["feature"]
        assert row["top_ids"] == [str(skipped.good[i]) for i in row["top_indices"]]
        assert row["top_values"] == pytest.approx([float(acts[i, f]) for i in row["top_indices"]], abs=1e-5)
        mine = on_files.features.tolist().index(f)
        fired = [i for i, v in zip(on_files.indices[mine].tolist(), on_files.values[mine].tolist()) if v > 0]
        assert row["top_indices"] == fired
        assert (tmp_path / "inspect" / row["dashboard"]).read_bytes().startswith(b"\x89PNG")


def test_neighbours_figure_shows_the_image_of_each_row(runner, toy, skipped, tmp_path):
    """The neighbours' rows are read rows: the thumbnail drawn for a row is the file whose terms the row holds."""
    before = digest(skipped.root)
    ok(runner, ["neighbors", "--store", skipped.store.path, "--model", "toy-shapes", "--text", "a red shape", "--head", "L3H0",
                "--k", 6, "--out", tmp_path / "nb.json"])
    assert digest(skipped.root) == before
    rows = json.loads((tmp_path / "nb.json").read_text())["indices"][0]
    assert sorted(rows) == list(range(6))  # every read row, none past the six the store holds
    torch.testing.assert_close(skipped.store.read("heads"), skipped.clean.read("heads"), atol=2e-6, rtol=1e-5)
    size = toy.cfg.image_size[0]
    thumbnails = store_thumbnails(skipped.store, size)(rows)
    files = np.stack([np.asarray(load_image(skipped.good[r]).resize((size, size))) for r in rows])
    np.testing.assert_array_equal(thumbnails, files)


def test_textspan_counts_the_rows_it_read_and_labels_follow_them(toy, skipped):
    spans = analyses.get("textspan")(toy).run(skipped.store, bank="shapes-attributes", m=2, layers=[3])
    assert spans.n_images == 6
    classifier = torch.randn(2, toy.cfg.d_embed)
    with pytest.raises(InputError, match=r"7 labels for 6 images in the store \(7 source images, 1 skipped .*store\.ids\(\)"):
        spans.replacement_accuracy(skipped.store, {"t": (classifier, [0] * 7)}, ms=(1,))
    assert set(spans.replacement_accuracy(skipped.store, {"t": (classifier, [0] * 6)}, ms=(1,))["t"]) >= {"original", "m=1"}


def test_ablation_labels_follow_the_rows_read(skipped):
    from clip_lens_plugins.ablation import MeanAblation, ZeroShotTask

    classifier = torch.randn(2, skipped.store.read("embedding").shape[1])
    with pytest.raises(InputError, match=r"7 labels for 6 store images \(1 of 7 images were skipped .*store\.ids\(\)"):
        MeanAblation().run(skipped.store, {"t": ZeroShotTask(classifier, torch.zeros(7, dtype=torch.long))}, heads=["L3H0"])


def test_shapes_world_search_truth_maps_rows_to_scenes_after_a_skip(toy, tmp_path):
    """A shapes-world store whose scene 4 could not be decoded scores exactly as a store collected
    without scene 4: each read row is mapped to its scene through ``ids()``, not through source rows."""
    from clip_lens_plugins.neighbors import property_search_truth

    seed, n = 31, 9
    full = shapes_world_images(n, seed=seed)
    pixels = full.load(0, n)[0]

    def item(i: int):
        if i == 4:
            raise InputError("scene 4 cannot be decoded")
        return pixels[i], -1

    broken = ImageSource(n, full.load, full.ids, full.description, item)
    kept = [i for i in range(n) if i != 4]
    reference = ImageSource(len(kept), lambda a, b: (pixels[kept[a:b]], None), [str(i) for i in kept], full.description)
    one = collect(toy, broken, tmp_path / "skipped", heads=[3], chunk_size=4, batch_size=4, progress=False)
    two = collect(toy, reference, tmp_path / "reference", heads=[3], chunk_size=8, batch_size=8, progress=False)
    assert list(one.skipped()) == [4] and one.ids() == two.ids()
    options = dict(heads=["L3H0"], attribute="colour", k=3, n_queries=6, metric="dot", n_random=0)
    got = property_search_truth(toy, one, seed, **options).to_dict()
    want = property_search_truth(toy, two, seed, **options).to_dict()
    assert got["searches"] == want["searches"] and got["chance"] == want["chance"]
