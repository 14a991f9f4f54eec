"""`clip-lens neurons` and `clip-lens collect --neurons` on the bundled model (offline, seconds): the outputs
agree with the library on the same images, and every failure is one `error:` line with the fix."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clip_lens import HookedCLIP, analyses, second_order
from clip_lens.cli import app
from clip_lens.collect import Store, collect, shapes_world_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 31007  # a world seed no code tuned on


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes-v2")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of 40 scenes with the neurons of layers 0 and 2, collected from the shell."""
    out = tmp_path_factory.mktemp("neurons") / "store"
    done = CliRunner().invoke(app, ["collect", "-m", "toy-shapes-v2", "--shapes", "40", "--seed", str(SEED), "--heads", "none",
                                    "--neurons", "0,2", "--chunk-size", "16", "--out", str(out)])
    assert done.exit_code == 0, done.output
    return out


def one_error(result, *phrases):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def store_scenes():
    """The store's images: `clip-lens collect --shapes` renders the scenes of the model's world (toy-shapes-v2: version 2)."""
    return shapes_world_images(40, SEED, 64, version=2).load(0, 40)[0]


def test_collected_neuron_effects_equal_second_order_on_the_same_images(toy, store):
    opened = Store.open(store)
    assert opened.meta["neuron_layers"] == [0, 2] and opened.verify() == {}  # checksummed like every array
    images = store_scenes()
    direct = second_order(toy, images, layers=[0, 2])
    norm = toy.encode_image(images).norm(dim=-1)
    stored = opened.read("neurons")
    assert stored.shape == (40, 2, toy.cfg.d_mlp, toy.cfg.d_embed)
    torch.testing.assert_close(stored, direct.effects / norm[:, None, None, None], atol=1e-5, rtol=1e-4)


def test_collect_projects_neuron_effects_on_the_store_directions(toy, tmp_path):
    images, _ = shapes_world_images(12, SEED + 1, 64, version=2).load(0, 12)
    directions = torch.nn.functional.normalize(torch.randn(5, toy.cfg.d_embed, generator=torch.Generator().manual_seed(0)), dim=-1)
    opened = collect(toy, images, tmp_path / "s", heads=None, neurons=[1], directions=directions, progress=False)
    direct = second_order(toy, images, layers=[1], directions=directions)
    norm = toy.encode_image(images).norm(dim=-1)
    torch.testing.assert_close(opened.read("neurons"), direct.effects / norm[:, None, None, None], atol=1e-5, rtol=1e-4)


def test_neurons_from_a_store_match_the_analysis_of_its_images(toy, store, tmp_path):
    result = CliRunner().invoke(app, ["neurons", "--store", str(store), "--top", "3", "-k", "4", "--top-k", "10",
                                      "--images-per-neuron", "4", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a" / "neurons.json").read_text())
    direct = analyses.get("neurons")(toy).run(store_scenes(), bank="shapes-attributes", layers=[0, 2], k=4, top_k=10)
    assert saved["layers"] == [0, 2] and len(saved["neurons"]) == 2 * toy.cfg.d_mlp
    np.testing.assert_allclose([n["effect_norm"] for n in saved["neurons"]], [n.effect_norm for n in direct.neurons],
                               rtol=1e-3, atol=1e-6)
    assert [s["neuron"] for s in saved["shown"]] == [f"L{n.layer}N{n.neuron}" for n in direct.top(3)]
    for shown in saved["shown"]:  # each shown neuron's highest-scoring images first, named by store id
        assert shown["top_scores"] == sorted(shown["top_scores"], reverse=True) and len(shown["top_ids"]) == 4
        with Image.open(tmp_path / "a" / shown["dashboard"]) as png:
            assert png.format == "PNG" and png.width > 400
    page = (tmp_path / "a" / "neurons.html").read_text()
    assert page.count("<img") == 3 and all(s["neuron"] in page for s in saved["shown"])


def test_neurons_named_on_the_command_line_are_the_ones_shown(tmp_path):
    result = CliRunner().invoke(app, ["neurons", "--shapes", "20", "--seed", str(SEED), "--layers", "1", "--neurons", "L1N7,l1n300",
                                      "-k", "3", "--top-k", "5", "--images-per-neuron", "2", "--out", str(tmp_path / "n")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "n" / "neurons.json").read_text())
    assert [s["neuron"] for s in summary["shown"]] == ["L1N7", "L1N300"] and summary["selection"] == "given"


def test_neurons_failures_are_one_line_with_the_fix(store, tmp_path):
    runner = CliRunner()
    out = ["--out", str(tmp_path / "x")]
    one_error(runner.invoke(app, ["neurons", *out]), "exactly one image source")
    one_error(runner.invoke(app, ["neurons", "--shapes", "4", "--neurons", "neuron7", *out]), "L<layer>N<index>")
    one_error(runner.invoke(app, ["neurons", "--shapes", "4", "--layers", "9", *out]), "layer 9")
    one_error(runner.invoke(app, ["neurons", "--shapes", "4", "--layers", "3", *out]), "no attention layer follows")
    one_error(runner.invoke(app, ["neurons", "--shapes", "4", "--neurons", "L1N999", *out]), "512 neurons")
    one_error(runner.invoke(app, ["neurons", "--shapes", "4", "--layers", "1", "--neurons", "L0N3", *out]), "was not analysed")
    bank = tmp_path / "bank.npz"
    np.savez(bank, texts=np.array(["a", "b"]), embeddings=np.zeros((2, 7), np.float32))
    one_error(runner.invoke(app, ["neurons", "--shapes", "4", "--bank", str(bank), *out]), "d_embed")
    one_error(runner.invoke(app, ["neurons", "--shapes", "4", "-m", "toy-shapes-rn", *out]), "ViT towers")
    one_error(runner.invoke(app, ["neurons", "--store", str(store), "--layers", "1", *out]), "--neurons")
    plain = tmp_path / "plain"
    assert runner.invoke(app, ["collect", "-m", "toy-shapes-v2", "--shapes", "4", "--heads", "none", "--out", str(plain)]).exit_code == 0
    one_error(runner.invoke(app, ["neurons", "--store", str(plain), *out]), "clip-lens collect --neurons")
    one_error(runner.invoke(app, ["collect", "-m", "toy-shapes-rn", "--shapes", "4", "--neurons", "0",
                                  "--out", str(tmp_path / "rn")]), "ViT towers")


def test_report_section_shows_the_largest_mean_effects_and_skips_towers_without_neurons(toy):
    from clip_lens.neurons_report import neurons_section, render_section

    summary, pngs = neurons_section(toy, n_images=30, seed=SEED, n_neurons=3)
    assert summary["n_analysed"] == (toy.cfg.n_layers - 1) * toy.cfg.d_mlp and summary["n_images"] == 30
    by_label = {f"L{n['layer']}N{n['neuron']}": n["effect_norm"] for n in summary["neurons"]}
    effects = [by_label[shown["neuron"]] for shown in summary["shown"]]
    assert len(pngs) == 3 and effects == sorted(effects, reverse=True)
    assert render_section(summary, pngs).count("<img") == 3
    skipped, none = neurons_section(HookedCLIP.from_pretrained("toy-shapes-rn"), n_images=4)
    assert none == {} and "ViT towers" in skipped["skipped"] and "Not analysed" in render_section(skipped, none)
