"""Bad images and tokens are refused at the model's surface with an InputError (a ValueError)
that says what was wrong and how to fix it, never a traceback from deep inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clip_lens import ClipLensError, HookedCLIP, InputError
from tests.helpers import build_open_clip

NAME = "ViT-B-32"
TINY = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 64, "head_width": 16}, "text_cfg": {"layers": 1, "width": 64, "heads": 4}}
SOT, EOT, VOCAB, CTX = 49406, 49407, 49408, 77


@pytest.fixture(scope="module")
def model() -> HookedCLIP:
    torch.manual_seed(0)
    return HookedCLIP.from_pretrained(NAME, None, config_overrides=TINY)


def images(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def tokens(batch: int = 2, length: int = CTX) -> torch.Tensor:
    out = torch.zeros(batch, length, dtype=torch.long)
    out[:, 0], out[:, 1:4], out[:, 4] = SOT, 320, EOT
    return out


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError) and issubclass(InputError, ClipLensError)


# --- images -----------------------------------------------------------------------------------


def test_valid_images_pass(model):
    assert model.encode_image(images(2, 3, 224, 224)).shape == (2, 32)
    assert model.encode_image(images(0, 3, 224, 224)).shape == (0, 32)
    half = model.encode_image(images(1, 3, 224, 224, dtype=torch.float16))  # cast to the model's dtype
    assert half.dtype == torch.float32


@pytest.mark.parametrize(
    "value, hint",
    [
        ([images(3, 224, 224)], "torch.stack([model.preprocess(im)"),
        (Image.new("RGB", (224, 224)), "model.preprocess(image)[None]"),
        (np.zeros((1, 3, 224, 224), dtype=np.float32), "torch.from_numpy"),
        (None, "model.preprocess"),
    ],
    ids=["list", "pil", "numpy", "none"],
)
def test_images_that_are_not_tensors_point_to_preprocess(model, value, hint):
    with pytest.raises(InputError) as info:
        model.encode_image(value)
    assert "torch.Tensor" in str(info.value) and hint in str(info.value)
    assert type(value).__name__ in str(info.value)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_float_images_are_refused(model, dtype):
    with pytest.raises(InputError, match="floating point") as info:
        model.encode_image(torch.zeros(1, 3, 224, 224, dtype=dtype))
    assert str(dtype) in str(info.value)


def test_unbatched_image_suggests_adding_a_batch_dimension(model):
    with pytest.raises(InputError, match=r"images\[None\]") as info:
        model.encode_image(images(3, 224, 224))
    assert "(3, 224, 224)" in str(info.value)


@pytest.mark.parametrize("shape", [(224, 224), (1, 1, 3, 224, 224)])
def test_images_of_other_rank_are_refused(model, shape):
    with pytest.raises(InputError, match=r"\[batch, 3, 224, 224\]"):
        model.encode_image(images(*shape))


@pytest.mark.parametrize(
    "channels, hint", [(1, "expand"), (4, "alpha"), (2, "RGB")]
)
def test_wrong_channel_count_is_refused(model, channels, hint):
    with pytest.raises(InputError) as info:
        model.encode_image(images(2, channels, 224, 224))
    message = str(info.value)
    assert f"{channels} channels" in message and "takes 3" in message and hint in message


def test_channels_last_images_suggest_permute(model):
    with pytest.raises(InputError, match=r"permute\(0, 3, 1, 2\)"):
        model.encode_image(images(2, 224, 224, 3))


@pytest.mark.parametrize("size", [(225, 224), (224, 225), (32, 32), (336, 336)])
def test_wrong_image_size_names_the_expected_size(model, size):
    with pytest.raises(InputError) as info:
        model.encode_image(images(1, 3, *size))
    message = str(info.value)
    assert f"{size[0]}x{size[1]}" in message and "224x224" in message and "model.preprocess" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_images_are_refused(model, bad):
    x = images(2, 3, 224, 224)
    x[1, 2, 5, 7] = bad
    with pytest.raises(InputError, match="NaN or inf"):
        model.encode_image(x)


def test_bad_images_are_refused_by_every_entry_point(model):
    bad = images(1, 3, 225, 224)
    with pytest.raises(InputError):
        model(bad)
    with pytest.raises(InputError):
        model.get_logits(bad, tokens(1))
    with pytest.raises(InputError):
        model.run_with_cache(bad)
    # the failed run leaves no hooks behind
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


# --- tokens -----------------------------------------------------------------------------------


def test_valid_tokens_pass(model):
    assert model.encode_text(tokens()).shape == (2, 32)
    assert model.encode_text(tokens(length=10)).shape == (2, 32)  # shorter than the context is fine


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_tokens_of_any_width_are_accepted(model, dtype):
    small = torch.zeros(2, CTX, dtype=dtype)
    small[:, 1] = 100
    expected = model.encode_text(small.long())
    torch.testing.assert_close(model.encode_text(small), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_tokens_are_refused(model, dtype):
    with pytest.raises(InputError, match="integer token ids") as info:
        model.encode_text(tokens().to(dtype))
    assert "to_tokens" in str(info.value)


def test_tokens_longer_than_the_context_name_the_context_length(model):
    with pytest.raises(InputError) as info:
        model.encode_text(torch.zeros(2, CTX + 1, dtype=torch.long))
    assert "78 positions" in str(info.value) and "context length is 77" in str(info.value)


@pytest.mark.parametrize("bad_id", [-1, VOCAB, VOCAB + 1000])
def test_out_of_vocabulary_ids_are_refused(model, bad_id):
    t = tokens()
    t[1, 3] = bad_id
    with pytest.raises(InputError) as info:
        model.encode_text(t)
    assert f"[0, {VOCAB})" in str(info.value) and str(bad_id) in str(info.value)


def test_unbatched_tokens_suggest_adding_a_batch_dimension(model):
    with pytest.raises(InputError, match=r"tokens\[None\]"):
        model.encode_text(tokens()[0])


@pytest.mark.parametrize("shape", [(1, 2, CTX), (2, 0)])
def test_tokens_of_other_shapes_are_refused(model, shape):
    with pytest.raises(InputError, match="tokens"):
        model.encode_text(torch.zeros(*shape, dtype=torch.long))


@pytest.mark.parametrize(
    "value, hint",
    [([[SOT, 320, EOT]], "torch.tensor(tokens)"), (np.zeros((1, CTX), dtype=np.int64), "torch.from_numpy"), ([], "to_tokens")],
    ids=["nested-list", "numpy", "empty-list"],
)
def test_tokens_that_are_not_tensors_are_refused(model, value, hint):
    with pytest.raises(InputError) as info:
        model.encode_text(value)
    assert hint in str(info.value)


# --- text -------------------------------------------------------------------------------------


def test_to_tokens_works_offline_with_the_bundled_tokenizer(model):
    t = model.to_tokens(["a photo of a cat"])
    assert t.shape == (1, CTX) and t.dtype == torch.long
    assert t[0, 0] == SOT and t[0, 6] == EOT and (t[0, 7:] == 0).all()  # SOT, 5 words, EOT, padding
    assert torch.equal(model.to_tokens("a photo of a cat"), t)


def test_encode_text_accepts_strings(model):
    texts = ["a cat", "a dog"]
    out = model.encode_text(texts)
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, model.encode_text(model.to_tokens(texts)))
    assert not torch.allclose(out[0], out[1])
    assert model.encode_text("a cat").shape == (1, 32)
    assert model.encode_text(("a cat", "a dog")).shape == (2, 32)


@pytest.mark.parametrize("texts", [[1, 2], ["a cat", 3], 42])
def test_to_tokens_refuses_non_strings(model, texts):
    with pytest.raises(InputError, match="string"):
        model.to_tokens(texts)


def test_mixed_text_list_is_refused_by_encode_text(model):
    with pytest.raises(InputError, match="int"):
        model.encode_text(["a cat", 3])


def test_to_tokens_without_a_model_name_asks_for_token_ids():
    unnamed = HookedCLIP.from_open_clip(build_open_clip(NAME, TINY))
    with pytest.raises(InputError, match="token ids"):
        unnamed.to_tokens("a cat")
    assert unnamed.encode_text(tokens(1)).shape == (1, 32)  # token ids still work
