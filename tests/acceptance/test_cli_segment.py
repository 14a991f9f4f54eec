"""`clip-lens segment` and `clip-lens segment-eval` on the bundled model (offline, seconds)."""

import json

import numpy as np

from PIL import Image
from typer.testing import CliRunner

from clip_lens.cli import app


def test_segment_writes_an_overlay_and_the_maps(tmp_path):
    out = tmp_path / "red.png"
    result = CliRunner().invoke(app, ["segment", "--shapes", "3", "--text", "a red shape", "--head", "L1H2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["text"] == "a red shape" and saved["heads"] == ["L1H2"]


def test_contrastive_segment_and_evaluation_table(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["segment", "--shapes", "2", "--text", "a red shape", "--versus", "a blue shape",
                                 "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["segment-eval", "--shapes", "60", "--out", str(tmp_path / "table.json")])
    assert result.exit_code == 0, result.output
    rows = {line.split("|")[1].strip(): line for line in result.output.splitlines() if line.startswith("| ")}
    assert {"decomposition (all layers)", "raw attention", "uniform"} <= set(rows)
    table = json.loads((tmp_path / "table.json").read_text())["table"]
    assert table["decomposition (all layers)"]["mean_ap"] > table["raw attention"]["mean_ap"] > table["uniform"]["mean_ap"]


def test_segment_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["segment", "--text", "a red shape", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "exactly one image source" in result.output
    result = runner.invoke(app, ["segment", "--shapes", "2", "--text", "a red shape", "--head", "L9H0", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "Traceback" not in result.output and result.output.count("error:") == 1


def test_neighbors_of_a_text_by_a_head_are_images_showing_it(tmp_path):
    from clip_lens.toy.world import ShapesWorld

    runner = CliRunner()
    store = tmp_path / "store"
    assert runner.invoke(app, ["collect", "-m", "toy-shapes", "--shapes", "200", "--seed", "2024", "--out", str(store)]).exit_code == 0
    result = runner.invoke(app, ["neighbors", "-s", str(store), "-m", "toy-shapes", "--text", "a red shape", "--head", "L3H0",
                                 "--k", "5", "--out", str(tmp_path / "nn.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "nn.json").read_text())["indices"][0]
    world = ShapesWorld(seed=2024)
    assert all(world.scene(r).value("colour") == "red" for r in rows)  # L3H0 is the colour head
    assert (tmp_path / "nn.png").is_file()
    result = runner.invoke(app, ["neighbors", "-s", str(store), "-m", "toy-shapes", "--text", "a red shape", "--head", "L9H0",
                                 "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and result.output.count("error:") == 1

    # image queries by the colour heads, compared over one prompt per colour
    from clip_lens.toy.world import VALUES, attribute_prompt

    queries = [ShapesWorld(seed=2025).scene(i) for i in range(6)]
    for i, query in enumerate(queries):
        Image.fromarray(query.image).save(tmp_path / f"query{i}.png")
    (tmp_path / "colours.txt").write_text("\n".join(attribute_prompt("colour", c) for c in VALUES["colour"]) + "\n")
    result = runner.invoke(app, ["neighbors", "-s", str(store), "-m", "toy-shapes", *[a for i in range(6) for a in ("--image", str(tmp_path / f"query{i}.png"))],
                                 "--head", "L0H0,L0H3,L3H0", "--metric", "concepts", "--texts", str(tmp_path / "colours.txt"),
                                 "--k", "5", "--out", str(tmp_path / "by_colour.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "by_colour.json").read_text())
    assert saved["metric"] == "concepts" and len(saved["search_texts"]) == len(VALUES["colour"])
    shared = [world.scene(r).value("colour") == query.value("colour") for query, rows in zip(queries, saved["indices"]) for r in rows]
    assert np.mean(shared) >= 0.9


def test_segment_eval_draws_the_camouflage_scenes_the_model_was_trained_on(tmp_path):
    """toy-shapes-camo's registry entry says camouflage: its scenes are camouflaged (said on stdout), so the
    no-model colour maps fall to the object share while the model's map does not."""
    result = CliRunner().invoke(app, ["segment-eval", "-m", "toy-shapes-camo", "--shapes", "40", "--attribute", "position",
                                      "--seed", "52713", "--out", str(tmp_path / "table.json")])
    assert result.exit_code == 0, result.output
    assert "drawing shapes-world v2 camouflage scenes" in result.output
    table = json.loads((tmp_path / "table.json").read_text())["table"]
    share = table["uniform"]["mean_ap"]  # a constant map's AP is the object share
    assert table["chroma (no model)"]["mean_ap"] < share + 0.03
    assert table["decomposition (all layers)"]["mean_ap"] > table["chroma (no model)"]["mean_ap"] + 0.20
