"""Training the shapes-world CLIP: the loss, the positives, a short run and resuming it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clip_lens.toy import ShapesWorld
from clip_lens.toy.train import TrainConfig, caption_batch, multi_positive_loss, train


def test_multi_positive_loss_equals_open_clip_loss_with_one_positive_per_row():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    texts = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ours = multi_positive_loss(images, texts, scale, torch.eye(8, dtype=torch.bool))
    torch.testing.assert_close(ours, ClipLoss()(images, texts, scale), rtol=1e-6, atol=1e-6)


def test_captions_true_of_several_images_are_positives_for_all_of_them():
    scenes = [ShapesWorld(seed=0).scene(i) for i in range(64)]
    captions, positives = caption_batch(scenes, seed=0, step=0, keep_prob=0.5)
    assert positives.diagonal().all()
    assert positives.sum() > 64  # partial captions ("a red shape") fit other images too
    for j, caption in enumerate(captions):
        for i, scene in enumerate(scenes):
            if positives[i, j]:
                obj = scene.objects[0]
                for value in (obj.colour, obj.shape, scene.background):
                    if value in caption.split() and value not in scene.caption().split():
                        raise AssertionError(f"{caption!r} marked true of {scene.caption()!r}")


@torch.no_grad()
def _held_out_loss(weights) -> float:
    """The loss on one fixed batch of unseen scenes: at initialisation (``weights=None``) or trained."""
    from safetensors.torch import load_file

    from clip_lens.toy import WordTokenizer, batch_images, vocabulary
    from clip_lens.toy.train import build_model, model_config

    tokenizer = WordTokenizer(vocabulary(), context_length=32)
    torch.manual_seed(0)  # the initialisation train() starts from with seed 0
    model = build_model(model_config(tokenizer.vocab_size)).eval()
    if weights is not None:
        model.load_state_dict(load_file(str(weights)))
    scenes = [ShapesWorld(seed=77).scene(i) for i in range(128)]
    captions, positives = caption_batch(scenes, seed=77, step=0, keep_prob=0.5)
    images = F.normalize(model.encode_image(batch_images(scenes)), dim=-1)
    texts = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    return multi_positive_loss(images, texts, model.logit_scale.exp(), positives).item()


@pytest.mark.slow  # ~60 s of training on 2 idle cores: CI runs it in its slow step
def test_short_training_run_lowers_the_loss_and_resumes_exactly(tmp_path):
    config = TrainConfig(steps=100, batch_size=64, warmup=10, eval_every=1000, eval_images=32, checkpoint_every=50)
    meta = train(tmp_path / "full", config, log=lambda *_: None)
    losses = meta["losses"]
    assert len(losses) == 100
    before, after = _held_out_loss(None), _held_out_loss(tmp_path / "full" / "model.safetensors")
    assert after < 0.85 * before, (before, after)
    assert (tmp_path / "full" / "model.safetensors").exists()

    # Interrupt after 50 steps (the checkpoint), resume to 100: the same weights as one run.
    train(tmp_path / "resumed", TrainConfig(**{**config.__dict__, "stop_at": 50}), log=lambda *_: None)
    resumed = train(tmp_path / "resumed", config, log=lambda *_: None)
    assert resumed["losses"][:50] == losses[:50]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((tmp_path / "full" / "config.json").read_text())["steps_done"] == 100


def test_training_batches_mix_random_scenes_and_minimal_sets_that_always_name_their_attribute():
    from clip_lens.toy.train import CONTRAST_WEIGHTS, training_batch
    from clip_lens.toy.world import ShapesWorld

    config = TrainConfig(batch_size=64, contrast=0.5, group_size=4)
    scenes, captions, positives = training_batch(ShapesWorld(seed=0), config, step=3)
    again = training_batch(ShapesWorld(seed=0), config, step=3)
    assert len(scenes) == len(captions) == 64 and positives.shape == (64, 64)
    assert captions == again[1] and torch.equal(positives, again[2])  # deterministic in (seed, step)
    assert positives.diagonal().all()
    grouped = scenes[64 - sum(1 for s in scenes if s.index >= 2**40):]
    assert len(grouped) >= 32 - 4  # half the batch in minimal sets (size sets have only 2 members)
    # in every minimal set the captions differ, so each caption is false of the other members
    start = 64 - len(grouped)
    block = positives[start:, start:]
    same_set = torch.tensor([[a.index == b.index for b in grouped] for a in grouped])
    assert not (block & same_set & ~torch.eye(len(grouped), dtype=torch.bool)).any()
    assert set(CONTRAST_WEIGHTS) == {"colour", "shape", "size", "position", "background"}
