"""Fine-tuning on a mix of version-2 and camouflage scenes (``toy-shapes-camo``): the mixed batch, its
positives across the two parts, and a frozen text tower."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from clip_lens.errors import InputError
from clip_lens.toy import ShapesWorld
from clip_lens.toy.claims import scene_facts
from clip_lens.toy.train import (
    CAMOUFLAGE_SEED_OFFSET, TrainConfig, build_model, model_config, text_parameters, train, training_batch_mixed,
    training_batch_v2,
)


def _config(**changes) -> TrainConfig:
    return replace(TrainConfig(world_version=2, batch_size=32, camouflage=0.5), **changes)


def test_mixed_batch_holds_the_asked_share_of_camouflage_scenes_and_keeps_the_v2_part():
    config = _config()
    world = ShapesWorld(seed=0, version=2)
    scenes, captions, truth = training_batch_mixed(world, config, step=3)
    assert len(scenes) == len(captions) == 32 and truth.shape == (32, 32)
    camouflaged = [bool(s.extra["clutter_mask"].sum() == 0 and len({o.colour for o in s.objects}) == 1) for s in scenes]
    assert sum(camouflaged[16:]) == 16  # the second half is the camouflage world's
    plain_scenes, plain_captions, _ = training_batch_v2(world, replace(config, batch_size=16), 3)
    assert captions[:16] == plain_captions  # the version-2 part is the plain batch of its size
    assert [s.image.tobytes() for s in scenes[:16]] == [s.image.tobytes() for s in plain_scenes]
    camo = ShapesWorld(seed=CAMOUFLAGE_SEED_OFFSET, version=2, camouflage=True)
    assert scenes[16].image.tobytes() == camo.scene(scenes[16].index).image.tobytes()


def test_mixed_positives_cross_the_two_parts_and_follow_the_facts():
    scenes, captions, truth = training_batch_mixed(ShapesWorld(seed=0, version=2), _config(), step=0)
    assert truth.diagonal().all()
    assert truth[16:, :16].any() or truth[:16, 16:].any()  # a v2 caption can be true of a camouflage scene
    facts = [scene_facts(s) for s in scenes]
    for j, caption in enumerate(captions):
        if caption.startswith("a ") and " shape" in caption and "background" in caption:
            background = caption.rsplit(" on a ", 1)[1].split()[0]
            for i in range(len(scenes)):
                if truth[i, j]:
                    assert f"background={background}" in facts[i]


def test_camouflage_needs_world_version_2(tmp_path):
    with pytest.raises(InputError, match="--world-version 2"):
        train(tmp_path, TrainConfig(world_version=1, camouflage=0.5, steps=1))


def test_frozen_text_tower_stays_as_initialised_while_the_image_tower_learns(tmp_path):
    config = _config(steps=2, batch_size=16, warmup=1, eval_every=100, eval_images=4, freeze_text=True)
    train(tmp_path, config, log=lambda *_: None)
    torch.manual_seed(config.seed)
    initial = build_model(model_config(_vocab_size(tmp_path)))
    trained = build_model(model_config(_vocab_size(tmp_path)))
    from safetensors.torch import load_file

    trained.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for before, after in zip(text_parameters(initial), text_parameters(trained)):
        assert torch.equal(before, after)
    assert not torch.equal(initial.visual.conv1.weight, trained.visual.conv1.weight)


def _vocab_size(run) -> int:
    import json

    return json.loads((run / "config.json").read_text())["model_cfg"]["text_cfg"]["vocab_size"]
