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


def test_version_2_batches_are_deterministic_and_mix_one_and_several_object_scenes():
    from clip_lens.toy.train import training_batch_v2

    config = TrainConfig(batch_size=64, world_version=2, multi=0.25)
    world = ShapesWorld(seed=0, version=2)
    scenes, captions, positives = training_batch_v2(world, config, step=5)
    again = training_batch_v2(world, config, step=5)
    assert captions == again[1] and torch.equal(positives, again[2])
    counts = [len(s.objects) for s in scenes]
    assert sum(c >= 2 for c in counts) == 16 and all(c == 1 for c in counts[:48])
    assert positives.diagonal().all()
    relations = [c for c in captions if any(r in c for r in (" above ", " below ", " of a "))]
    assert relations and all(positives[i, captions.index(c)] for i, c in [(captions.index(c), c) for c in relations])


def test_fine_tuning_starts_from_the_bundled_weights_with_new_words_added():
    """`init_from`: version 1's words keep their embeddings, so v1 texts encode exactly as before."""
    from clip_lens.loading import load_bundled
    from clip_lens.toy import WordTokenizer, vocabulary
    from clip_lens.toy.train import build_model, initial_weights, model_config

    tokenizer = WordTokenizer(vocabulary(2), context_length=32)
    model = build_model(model_config(tokenizer.vocab_size)).eval()
    initial_weights(model, "toy-shapes", tokenizer)
    bundled = load_bundled("toy-shapes")
    texts = ["a small red star at the top left on a dotted background", "a shape"]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokenizer(texts)), bundled.model.encode_text(bundled.tokenizer(texts)))
        images = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model.encode_image(images), bundled.model.encode_image(images))
    assert tokenizer(["two shapes"])[0, 1] != 1  # "two" is a known word, not <unk>


@pytest.mark.slow  # long; the default suite stays under 5 minutes
def test_kept_checkpoints_are_the_weights_at_their_step(tmp_path):
    from safetensors.torch import load_file

    config = TrainConfig(steps=4, batch_size=16, warmup=2, eval_every=1000, eval_images=8, checkpoint_every=2,
                         world_version=2, keep_every=2, init_from="toy-shapes")
    train(tmp_path / "run", config, log=lambda *_: None)
    kept = sorted(p.name for p in (tmp_path / "run" / "steps").iterdir())
    assert kept == ["model-2.safetensors", "model-4.safetensors"]
    final, last = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "run" / "steps" / "model-4.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)
    early = load_file(tmp_path / "run" / "steps" / "model-2.safetensors")
    assert any(not torch.equal(final[k], early[k]) for k in final)
