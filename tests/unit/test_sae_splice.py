"""Splicing SAEs into the bundled toy-shapes CLIP (d_model 128, 4 layers, 4 heads)."""

from __future__ import annotations

import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens.errors import HookNameError, InputError
from clip_lens.sae import SAE, SAEConfig

HOOK = "blocks.2.hook_resid_post"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def images(model):
    return torch.randn(2, 3, *model.cfg.image_size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(model, images):
    """The image features without any SAE."""
    with torch.no_grad():
        return model(images, return_type="image_features")


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(["a red circle", "a blue square on green"])


@pytest.fixture(autouse=True)
def clean(model):
    yield
    model.reset_saes()
    model.reset_hooks(including_permanent=True)


def make_sae(hook_name: str = HOOK, d_in: int = 128, seed: int = 0, **fields) -> SAE:
    sae = SAE.from_config(SAEConfig(d_in=d_in, d_sae=256, hook_name=hook_name, **fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(256, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae


def features(model, images, **kwargs):
    with torch.no_grad():
        return model(images, return_type="image_features", **kwargs)


def test_error_term_leaves_the_output_unchanged_bit_for_bit(model, images, base):
    with torch.no_grad():
        spliced = model.run_with_saes(images, saes=[make_sae()], use_error_term=True, return_type="image_features")
    assert torch.equal(spliced, base)


def test_reconstruction_without_error_term_changes_the_output(model, images, base):
    with torch.no_grad():
        spliced = model.run_with_saes(images, saes=[make_sae()], return_type="image_features")
    assert not torch.allclose(spliced, base, atol=1e-3)


def test_ablating_a_feature_changes_the_output_by_its_decoder_direction(model, images, base):
    sae = make_sae()
    _, cache = model.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    feature = int(acts.flatten(0, 1).gt(0).sum(0).argmax())  # the most often active feature

    def ablate(value, hook):
        value = value.clone()
        value[..., feature] = 0
        return value

    with torch.no_grad():
        out = model.run_with_hooks_with_saes(
            images, saes=[sae], use_error_term=True, return_type="image_features",
            fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", ablate)])
        # the same edit done by hand on the residual stream
        delta = -acts[..., feature, None] * sae.W_dec[feature]
        by_hand = model.run_with_hooks(images, return_type="image_features",
                                       fwd_hooks=[(HOOK, lambda r, hook: r + delta)])
    assert not torch.allclose(out, base, atol=1e-4)
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)


def test_cache_holds_the_sae_hooks_under_the_hook_point_name(model, images):
    sae = make_sae()
    _, plain = model.run_with_cache(images)
    _, cache = model.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)
    names = [k for k in cache.keys() if k.startswith(HOOK + ".")]
    assert names == [f"{HOOK}.hook_sae_{n}" for n in ("input", "acts_pre", "acts_post", "recons", "error", "output")]
    torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], plain[HOOK], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(plain[HOOK]))
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (*plain[HOOK].shape[:-1], 256)
    assert torch.equal(cache[HOOK], plain[HOOK])  # the hook point carries what flows on: here x itself
    assert set(plain.keys()) < set(cache.keys())


def test_text_tower_sae_is_spliced_under_text_names(model, tokens):
    name = "text.blocks.1.hook_resid_post"
    sae = make_sae(name)
    with torch.no_grad():
        base = model(text=tokens, return_type="text_features")
        _, cache = model.run_with_cache_with_saes(text=tokens, saes=sae, use_error_term=True,
                                                  return_type="text_features")
        out = model.run_with_saes(text=tokens, saes=sae, use_error_term=True, return_type="text_features")
    assert f"{name}.hook_sae_acts_post" in cache.keys()
    assert torch.equal(out, base)


def test_add_sae_persists_until_reset_and_keeps_the_model_state(model, images, base):
    sae = make_sae()
    keys = list(model.state_dict())
    n_hooks = len(model.hook_dict)
    model.add_sae(sae)
    assert model.acts_to_saes == {HOOK: sae}
    assert len(model.hook_dict) == n_hooks + 6 and f"{HOOK}.hook_sae_acts_post" in model.hook_dict
    assert list(model.state_dict()) == keys  # the SAE's weights are not the model's
    spliced = features(model, images)
    model.reset_hooks(including_permanent=True)  # TL's hook reset does not half-remove a splice
    assert torch.equal(features(model, images), spliced)
    assert not torch.allclose(spliced, base, atol=1e-3)
    model.reset_saes()
    assert model.acts_to_saes == {} and len(model.hook_dict) == n_hooks
    assert torch.equal(features(model, images), base)
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"  # the SAE has its own names back
    with torch.no_grad():
        _, own = sae.run_with_cache(torch.randn(3, 128))
    assert "hook_sae_acts_post" in own


def test_saes_context_restores_a_displaced_sae(model, images, base):
    first, second = make_sae(seed=0), make_sae(seed=1)
    model.add_sae(first, use_error_term=True)
    with model.saes(saes=[second]):
        assert model.acts_to_saes[HOOK] is second
        assert not torch.allclose(features(model, images), base, atol=1e-3)  # second: no error term
    assert model.acts_to_saes[HOOK] is first
    assert torch.equal(features(model, images), base)  # first is back, with its error term
    model.reset_saes(HOOK)
    with pytest.raises(InputError, match="no SAE is spliced"):
        model.reset_saes(HOOK)


def test_lazy_attention_hook_z_with_hook_z_reshape(model, images, base):
    name = "blocks.1.attn.hook_z"
    sae = make_sae(name, d_in=128, reshape_activations="hook_z")  # 4 heads * 32
    _, cache = model.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)
    assert cache[f"{name}.hook_sae_acts_post"].shape[-1] == 256
    assert cache[name].shape[-2:] == (4, 32)
    with torch.no_grad():
        assert torch.equal(model.run_with_saes(images, saes=[sae], use_error_term=True, return_type="image_features"),
                           base)
        changed = model.run_with_saes(images, saes=[sae], return_type="image_features")
    assert not torch.allclose(changed, base, atol=1e-3)


def test_unknown_hook_name_lists_close_names(model):
    with pytest.raises(HookNameError, match="Did you mean.*blocks.2.hook_resid_post"):
        model.add_sae(make_sae("blocks.2.hook_resid_pots"))
    with pytest.raises(InputError, match="no hook_name"):
        model.add_sae(make_sae(""))


def test_width_mismatch_names_both_widths(model, images):
    with pytest.raises(InputError, match=r"d_in=64.*d_model = 128"):
        model.add_sae(make_sae(d_in=64))
    with pytest.raises(InputError, match=r"d_head = 32.*reshape_activations = 'hook_z'"):
        model.add_sae(make_sae("blocks.1.attn.hook_z", d_in=128))
    assert model.acts_to_saes == {}
    # a hook the config does not describe is checked on the first forward pass
    with pytest.raises(InputError, match=r"d_in=128.*width 512"):
        model.run_with_saes(images, saes=[make_sae("blocks.1.mlp.hook_post")])
    assert model.acts_to_saes == {}


def test_nan_reaching_the_sae_is_reported(model, images):
    def poison(value, hook):
        value = value.clone()
        value[0, 0, 0] = float("nan")
        return value

    with pytest.raises(InputError, match="blocks.2.hook_resid_post.*NaN"):
        model.run_with_hooks_with_saes(images, saes=[make_sae()], fwd_hooks=[("blocks.2.hook_mlp_out", poison)])


def test_splicing_into_an_sae_hook_or_a_non_sae_is_refused(model):
    model.add_sae(make_sae())
    with pytest.raises(InputError, match="cannot be spliced into another SAE"):
        model.add_sae(make_sae(f"{HOOK}.hook_sae_input"))
    with pytest.raises(InputError, match="clip_lens.sae.SAE"):
        model.add_sae(torch.nn.Linear(2, 2))


def test_feature_gradients_are_cached_for_attribution(model, images, tokens):
    name = f"{HOOK}.hook_sae_acts_post"
    loss, cache = model.run_with_cache_with_saes(images, tokens, saes=[make_sae()], use_error_term=True,
                                                 return_type="loss", incl_bwd=True, names_filter=[name])
    assert loss.ndim == 0
    assert cache[f"{name}_grad"].shape == cache[name].shape and cache[f"{name}_grad"].abs().sum() > 0
