"""The TransformerLens surface of HookedCLIP: layer ranges, return types, gradients in the cache,
pooled positions, logit attributions, residual directions, position names."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_lens import HookedCLIP, IndexOutOfRangeError, InputError
from tests.helpers import hooked_pair, random_images, random_tokens
from tests.parity.test_timm_towers import NARROW, overrides

L2 = {"layers": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small forwards: 2 threads mostly wait

@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def models():
    """Native ViT (CLS), CoCa (attentional pooler, CLS appended to the text), SigLIP (timm, MAP pooler)."""
    out = {
        "ViT-B-32": hooked_pair("ViT-B-32", {"vision_cfg": L2, "text_cfg": L2}, randomize=True)[1],
        "coca_ViT-B-32": hooked_pair("coca_ViT-B-32", {"vision_cfg": L2, "text_cfg": L2, "multimodal_cfg": {"layers": 1}},
                                     randomize=True)[1],
        "ViT-B-16-SigLIP": hooked_pair("ViT-B-16-SigLIP", overrides("ViT-B-16-SigLIP", NARROW), timm=NARROW,
                                       randomize=True)[1],
    }
    return out


def _texts(model: HookedCLIP) -> torch.Tensor:
    a, b = random_tokens(model, batch=2, length=5, seed=1), random_tokens(model, batch=1, length=11, seed=2)
    return torch.cat([a, b])  # prompts of different lengths: different pooled positions


@pytest.mark.parametrize("name", ["ViT-B-32", "coca_ViT-B-32", "ViT-B-16-SigLIP"])
def test_stop_then_start_at_every_layer_reproduces_both_towers(models, name):
    model = models[name]
    images, tokens = random_images(model, 2), _texts(model)
    image_features, text_features = model(images, tokens)[:2]
    for layer in range(model.cfg.n_layers + 1):
        resid = model(images, stop_at_layer=layer)
        assert resid.shape == (2, model.cfg.n_ctx, model.cfg.d_model)
        torch.testing.assert_close(model(resid, start_at_layer=layer, return_type="image_features"), image_features,
                                   atol=1e-5, rtol=1e-5)
    for layer in range(model.text.cfg.n_layers + 1):
        resid = model(text=tokens, stop_at_layer=layer)
        again = model(text=resid, tokens=tokens, start_at_layer=layer, return_type="text_features")
        torch.testing.assert_close(again, text_features, atol=1e-5, rtol=1e-5)


def test_stop_at_layer_equals_the_cached_residual_stream(toy):
    images = random_images(toy, 2)
    _, cache = toy.run_with_cache(images)
    torch.testing.assert_close(toy(images, stop_at_layer=2), cache["blocks.2.hook_resid_pre"])
    torch.testing.assert_close(toy(images, stop_at_layer=-1), cache[f"blocks.{toy.cfg.n_layers - 1}.hook_resid_pre"])


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-SigLIP"])
def test_return_types_match_open_clip(models, name):
    model = models[name]
    images, tokens = random_images(model, 3), random_tokens(model, 3)
    logits, _ = model.get_logits(images, tokens)
    torch.testing.assert_close(model(images, tokens, return_type="logits"), logits)
    features = model(images, tokens)
    torch.testing.assert_close(model(images, return_type="image_features"), features[0])
    torch.testing.assert_close(model(text=tokens, return_type="text_features"), features[1])
    if model.logit_bias is not None:
        reference = open_clip.loss.SigLipLoss()(features[0], features[1], features[2], features[3])
    else:
        reference = open_clip.loss.ClipLoss()(features[0], features[1], features[2])
    torch.testing.assert_close(model(images, tokens, return_type="loss"), reference)
    assert model(images, tokens, return_type=None) is None


def test_incl_bwd_caches_the_gradient_of_the_loss_or_a_metric(toy):
    images, tokens = random_images(toy, 2), toy.to_tokens(["a red circle", "a blue square"])
    loss, cache = toy.run_with_cache(images, tokens, return_type="loss", incl_bwd=True)
    resid = toy(images, stop_at_layer=2).detach().requires_grad_(True)
    again = toy(resid, tokens, start_at_layer=2, return_type="loss")
    (grad,) = torch.autograd.grad(again, resid)
    torch.testing.assert_close(cache["blocks.2.hook_resid_pre_grad"], grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss.detach(), again.detach())
    _, cache = toy.run_with_cache(images, incl_bwd=True, metric=lambda out: out[0][:, 3].sum())
    assert cache["blocks.0.attn.hook_pattern_grad"].abs().sum() > 0
    with pytest.raises(InputError, match="return_type='loss' or metric="):
        toy.run_with_cache(images, incl_bwd=True)
    with pytest.raises(InputError, match=r"shape \(2, 512\)|shape"):
        toy.run_with_cache(images, incl_bwd=True, metric=lambda out: out[0])


def test_pooled_pos_slice_takes_each_prompts_own_eot(models):
    model = models["ViT-B-32"]
    tokens = _texts(model)
    _, cache = model.run_with_cache(text=tokens)
    eot = tokens.argmax(-1)
    assert eot.tolist() == [5, 5, 11]
    stack = cache.text.decompose_resid(pos_slice="pooled")
    full = cache.text.decompose_resid()
    torch.testing.assert_close(stack, full[:, torch.arange(3), eot])
    torch.testing.assert_close(cache.text.accumulated_resid(pos_slice="pooled")[-1],
                               cache["text.blocks.1.hook_resid_post"][torch.arange(3), eot])


def test_pooled_pos_slice_on_the_image_tower_is_the_class_token(toy):
    _, cache = toy.run_with_cache(random_images(toy, 2))
    torch.testing.assert_close(cache.decompose_resid(pos_slice="pooled"), cache.decompose_resid(pos_slice=0))
    with pytest.raises(InputError, match="only named slice"):
        cache.decompose_resid(pos_slice="last")


def test_logit_attrs_add_up_to_the_image_text_similarity(toy):
    images = random_images(toy, 3)
    texts = ["a red circle", "a green square", "a small star"]
    _, cache = toy.run_with_cache(images)
    stack = cache.decompose_resid(pos_slice="pooled")
    attrs = cache.logit_attrs(stack, texts=texts, pos_slice="pooled")  # one text per image
    embedding = toy.encode_image(images)
    text_features = toy.encode_text(texts, normalize=True)
    bias = (toy.visual.ln_post.bias @ toy.visual.proj) @ text_features.T  # the constant LN-bias share
    expected = (embedding * text_features).sum(-1) - bias
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=1e-4)
    diff = cache.logit_attrs(stack, texts=texts, incorrect_texts=texts[::-1], pos_slice="pooled")
    torch.testing.assert_close(diff, attrs - cache.logit_attrs(stack, texts=texts[::-1], pos_slice="pooled"))
    with pytest.raises(InputError, match="pair up"):
        cache.logit_attrs(stack, texts=texts, incorrect_texts=texts[:2], pos_slice="pooled")


def test_text_logit_attrs_read_the_text_tower_with_image_directions(toy):
    images = random_images(toy, 2)
    tokens = toy.to_tokens(["a red circle", "a big blue square on the left"])
    _, cache = toy.run_with_cache(images, tokens)
    stack = cache.text.decompose_resid(pos_slice="pooled")
    attrs = cache.text.logit_attrs(stack, images=images, pos_slice="pooled")
    image_features = toy.encode_image(images, normalize=True)
    weight, _ = toy.text.output_affine()
    expected = (toy.encode_text(tokens) * image_features).sum(-1) - image_features @ (toy.text.ln_final.bias @ weight)
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=1e-4)


def test_residual_directions_refuse_a_nonlinear_read_out(models):
    with pytest.raises(Exception, match="attentional pooler"):
        models["ViT-B-16-SigLIP"].texts_to_residual_directions(random_tokens(models["ViT-B-16-SigLIP"], 1))


def test_to_str_tokens_names_text_and_image_positions(toy, models):
    assert toy.to_str_tokens("a red circle") == ["<sot>", "a", "red", "circle", "<eot>"]
    names = toy.to_str_tokens(random_images(toy, 1))
    assert names[:2] == ["cls", "r0c0"] and len(names) == toy.cfg.n_ctx and names[-1] == "r7c7"
    siglip = models["ViT-B-16-SigLIP"]
    assert siglip.to_str_tokens(random_images(siglip, 1))[0] == "r0c0"  # no class token


def test_cfg_device_follows_the_model(toy):
    assert toy.cfg.device == torch.device("cpu") and toy.cfg.n_key_value_heads is None


def test_bad_layer_ranges_and_inputs_are_clear_errors(toy):
    images = random_images(toy, 1)
    with pytest.raises(IndexOutOfRangeError, match="outside"):
        toy(images, stop_at_layer=toy.cfg.n_layers + 1)
    with pytest.raises(IndexOutOfRangeError, match="comes after"):
        toy(toy(images, stop_at_layer=1), start_at_layer=3, stop_at_layer=2)
    with pytest.raises(InputError, match="residual stream"):
        toy(images, start_at_layer=1)
    with pytest.raises(InputError, match="not both"):
        toy(images, toy.to_tokens("a red circle"), stop_at_layer=1)
    with pytest.raises(InputError, match="needs tokens"):
        toy(text=torch.zeros(1, 32, 128), start_at_layer=1)
    with pytest.raises(InputError, match="return_type"):
        toy(images, return_type="embeddings")
    with pytest.raises(InputError, match="needs image and text"):
        toy(images, return_type="logits")
    with pytest.raises(InputError, match="pairs image i with text i"):
        toy(random_images(toy, 2), toy.to_tokens(["a red circle"]), return_type="loss")


def test_full_resid_decomposition_adds_up_on_both_towers(toy):
    """Heads, neurons, embeddings and accumulated biases sum to the residual stream (ln_pre: one embed row)."""
    toy.set_use_attn_result(True)
    try:
        images, tokens = random_images(toy, 2), toy.to_tokens(["a red circle", "a big blue square on the left"])
        _, cache = toy.run_with_cache(images, tokens)
    finally:
        toy.set_use_attn_result(False)
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert labels.count("embed") == 1 and "pos_embed" not in labels  # the image tower has ln_pre
    torch.testing.assert_close(stack.sum(0), cache[f"blocks.{toy.cfg.n_layers - 1}.hook_resid_post"], atol=1e-5, rtol=1e-5)
    mid = cache.get_full_resid_decomposition(layer=2, mlp_input=True, expand_neurons=False, pos_slice="pooled")
    torch.testing.assert_close(mid.sum(0), cache["blocks.2.hook_resid_mid"][:, 0], atol=1e-5, rtol=1e-5)
    text = cache.text.get_full_resid_decomposition(pos_slice="pooled")
    last = cache[f"text.blocks.{toy.text.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(text.sum(0), last[torch.arange(2), tokens.argmax(-1)], atol=1e-5, rtol=1e-5)
