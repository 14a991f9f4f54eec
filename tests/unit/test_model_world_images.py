"""`clip-lens collect --shapes`, the report, the app and the SAE commands draw the scenes of the world the model
was trained on (version and camouflage from its registry entry), and a store's images are rendered back from the
world its description names."""

import numpy as np
import pytest
from typer.testing import CliRunner

from clip_lens import HookedCLIP
from clip_lens.cli import app
from clip_lens.collect import Store, model_world_images, shapes_world_images, store_images
from clip_lens.toy.world import ShapesWorld


@pytest.mark.parametrize("name, version, camouflage", [("toy-shapes", 1, False), ("toy-shapes-v2", 2, False),
                                                        ("toy-shapes-camo", 2, True)])
def test_model_world_images_are_the_scenes_of_the_models_world(name, version, camouflage):
    model = HookedCLIP.from_pretrained(name)
    images, _ = model_world_images(model, 3, seed=7).load(0, 3)
    expected, _ = shapes_world_images(3, 7, 64, version=version, camouflage=camouflage).load(0, 3)
    assert (images == expected).all()
    other, _ = shapes_world_images(3, 7, 64, version=1 if version == 2 else 2).load(0, 3)
    assert not (images == other).all()


def test_camouflage_scenes_have_their_own_fingerprint_and_older_keys_stay():
    plain, camo = shapes_world_images(4, 5, 64, version=2), shapes_world_images(4, 5, 64, version=2, camouflage=True)
    assert plain.fingerprint(0, 4) != camo.fingerprint(0, 4)
    assert "camouflage" in camo.description and "camouflage" not in plain.description


def test_a_v2_store_collected_from_the_cli_shows_its_own_scenes(tmp_path):
    result = CliRunner().invoke(app, ["collect", "-m", "toy-shapes-v2", "--shapes", "4", "--seed", "11",
                                      "--heads", "none", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "s")
    assert "v2" in store.meta["source"]
    shown = np.asarray(store_images(store, 64)([2])[0])
    assert (shown == ShapesWorld(seed=11, image_size=64, version=2).scene(2).image).all()
