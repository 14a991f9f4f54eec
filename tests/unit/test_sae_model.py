"""The SAE's maths, hooks and config against SAELens' definitions (independent formulas here)."""

from __future__ import annotations

import pytest
import torch

from clip_lens.errors import InputError
from clip_lens.sae import SAE, SAEConfig

D_IN, D_SAE = 8, 16
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_sae(architecture: str = "standard", seed: int = 0, **fields) -> SAE:
    """A small SAE with every parameter random (zero biases would hide a dropped term)."""
    k = fields.pop("k", 3 if architecture == "topk" else None)
    cfg = SAEConfig(d_in=fields.pop("d_in", D_IN), d_sae=D_SAE, architecture=architecture, k=k,
                    hook_name=fields.pop("hook_name", "blocks.1.hook_resid_post"), **fields)
    sae = SAE.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.5))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.5)
    return sae


def reference_acts(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Feature activations by definition, element by element."""
    cfg = sae.cfg
    centred = x - sae.b_dec if cfg.apply_b_dec_to_input else x
    pre = centred @ sae.W_enc + sae.b_enc
    if cfg.architecture == "standard":
        return pre.clamp(min=0)
    if cfg.architecture == "jumprelu":
        threshold = sae.threshold.clamp(min=0)
        return torch.where(pre > threshold, pre.clamp(min=0), torch.zeros_like(pre))
    out = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        ranked = sorted(range(pre.shape[1]), key=lambda i: -float(pre[row, i]))
        for i in ranked[: cfg.k]:
            out[row, i] = max(float(pre[row, i]), 0.0)
    return out


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_decode_match_the_architecture_definitions(architecture, apply_b_dec):
    sae = random_sae(architecture, apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(7, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts = sae.encode(x)
        expected = reference_acts(sae, x)
        torch.testing.assert_close(acts, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(sae.decode(acts), expected @ sae.W_dec + sae.b_dec, rtol=0, atol=1e-6)
        torch.testing.assert_close(sae(x), expected @ sae.W_dec + sae.b_dec, rtol=0, atol=1e-6)
    assert (acts > 0).any() and (acts == 0).any()


def test_topk_keeps_k_features_and_drops_negative_winners():
    sae = random_sae("topk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)  # every pre-activation negative: the top k go through relu to 0
        assert sae.encode(torch.randn(3, D_IN)).abs().sum() == 0
        sae.b_enc.zero_()
        sae.b_enc[:5] = 100.0
        acts = sae.encode(torch.zeros(3, D_IN) + sae.b_dec)
    assert ((acts > 0).sum(-1) == 4).all()
    assert (acts[:, 5:] == 0).all()


def test_jumprelu_treats_a_negative_threshold_as_zero():
    sae = random_sae("jumprelu")
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(sae.encode(x), pre.clamp(min=0), rtol=0, atol=1e-6)


def test_topk_rescale_by_decoder_norm_selects_and_decodes_with_the_norms():
    sae = random_sae("topk", k=2, rescale_acts_by_decoder_norm=True)
    x = torch.randn(4, D_IN)
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1)
        pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * norms
        top = pre.topk(2, dim=-1)
        expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
        torch.testing.assert_close(sae.encode(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(sae.decode(expected), (expected / norms) @ sae.W_dec + sae.b_dec, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale"])
def test_run_time_normalisation_is_applied_in_and_undone_out(mode):
    sae = random_sae(normalize_activations=mode)
    x = 5 * torch.randn(4, D_IN) + 2
    with torch.no_grad():
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            x_n, undo = (x - mu) / (std + 1e-5), (lambda y: y * std + mu)
        else:
            c = D_IN ** 0.5 / x.norm(dim=-1, keepdim=True)
            x_n, undo = x * c, (lambda y: y / c)
        acts = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
        acts = acts.clamp(min=0)
        torch.testing.assert_close(sae.encode(x), acts, rtol=0, atol=1e-5)
        torch.testing.assert_close(sae(x), undo(acts @ sae.W_dec + sae.b_dec), rtol=1e-5, atol=1e-5)


def test_hook_z_flattens_heads_and_forward_restores_the_shape():
    sae = random_sae(d_in=8, reshape_activations="hook_z", hook_name="blocks.0.attn.hook_z")
    z = torch.randn(2, 5, 2, 4)  # [batch, pos, head, d_head]
    with torch.no_grad():
        assert sae.encode(z).shape == (2, 5, D_SAE)
        torch.testing.assert_close(sae.encode(z), sae.encode(z.flatten(-2)))
        out = sae(z)
    assert out.shape == z.shape
    torch.testing.assert_close(out.flatten(-2), sae.decode(sae.encode(z)).detach())


def test_error_term_returns_the_input_exactly_and_carries_feature_edits():
    sae = random_sae()
    x = torch.randn(6, D_IN, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(sae.run(x, use_error_term=True), x)
        sae.use_error_term = True
        assert torch.equal(sae(x), x)

        def ablate(acts, hook):
            acts = acts.clone()
            acts[..., 0] = 0
            return acts

        acts = sae.encode(x)
        ablated = acts.clone()
        ablated[..., 0] = 0
        expected = x + (sae.decode(ablated) - sae.decode(acts))
        out = sae.run_with_hooks(x, fwd_hooks=[("hook_sae_acts_post", ablate)])
    assert not torch.equal(out, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_error_term_in_another_dtype_returns_the_input_in_its_dtype():
    sae = random_sae()
    x = torch.randn(3, D_IN, dtype=torch.float64)
    with torch.no_grad():
        out = sae.run(x, use_error_term=True)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
        assert sae(x).dtype == torch.float64


def test_hooks_fire_in_saelens_order_and_error_only_with_the_error_term():
    sae = random_sae()
    x = torch.randn(2, D_IN)
    with torch.no_grad():
        _, cache = sae.run_with_cache(x)
        assert list(cache) == ["hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                               "hook_sae_output"]
        sae.use_error_term = True
        _, cache = sae.run_with_cache(x)
    assert list(cache)[-2:] == ["hook_sae_error", "hook_sae_output"]
    torch.testing.assert_close(cache["hook_sae_error"], x - cache["hook_sae_recons"], rtol=0, atol=1e-6)


def test_every_sae_hook_return_feeds_the_output():
    x = torch.randn(3, D_IN)
    for name in ["hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
                 "hook_sae_output"]:
        sae = random_sae()
        sae.use_error_term = True
        with torch.no_grad():
            out = sae.run_with_hooks(x, fwd_hooks=[(name, lambda t, hook: t + 1.0)])
        assert not torch.allclose(out, x), name


def test_gradients_flow_through_the_sae_and_not_through_the_error_term():
    sae = random_sae()
    x = torch.randn(3, D_IN, requires_grad=True)
    out = sae.run(x, use_error_term=True)
    out.sum().backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    # the error term is a constant (as in SAELens): d out / d x is the SAE's Jacobian, not the identity
    with torch.no_grad():
        mask = (sae.encode(x) > 0).float()
        expected = (mask * sae.W_dec.sum(-1)) @ sae.W_enc.T
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_nan_input_is_refused_unless_the_check_is_off():
    sae = random_sae()
    x = torch.randn(2, D_IN)
    x[0, 3] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        sae(x)
    with pytest.raises(InputError, match="NaN"):
        sae.encode(x)
    sae.cfg.check_finite = False
    assert torch.isnan(sae(x)).any()


def test_wrong_width_names_both_widths():
    sae = random_sae()
    with pytest.raises(InputError, match=r"d_in=8.*width 5"):
        sae(torch.randn(2, 5))
    with pytest.raises(InputError, match="floating-point"):
        sae(torch.ones(2, D_IN, dtype=torch.long))


def test_decode_with_normalisation_needs_an_encode_first():
    sae = random_sae(normalize_activations="layer_norm")
    with pytest.raises(InputError, match="encode"):
        sae.decode(torch.zeros(2, D_SAE))


# --- config ----------------------------------------------------------------------------------
def test_config_dict_is_saelens_v6_and_round_trips_unknown_metadata():
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, hook_name="text.blocks.1.hook_resid_post",
                    model_name="toy-shapes", metadata={"context_size": 17, "my_key": [1, 2]})
    d = cfg.to_dict()
    assert d["architecture"] == "topk" and d["k"] == 2 and d["rescale_acts_by_decoder_norm"] is False
    assert "hook_name" not in d and d["metadata"]["hook_name"] == "text.blocks.1.hook_resid_post"
    assert d["metadata"]["model_name"] == "toy-shapes" and d["metadata"]["my_key"] == [1, 2]
    assert int(d["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # SAELens reads the v6 layout
    assert "check_finite" not in d
    back = SAEConfig.from_dict(d)
    assert back.metadata.pop("sae_lens_version") == d["metadata"]["sae_lens_version"]
    assert back == cfg
    assert SAEConfig.from_dict(back.to_dict()).to_dict() == d
    standard = SAEConfig(d_in=8, d_sae=16).to_dict()
    assert "k" not in standard and set(standard) == {
        "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
        "reshape_activations", "metadata", "architecture"}


def test_config_reads_the_old_flat_layout_and_ignores_training_fields():
    old = {"d_in": 8, "d_sae": 16, "hook_point": "blocks.0.attn.hook_z", "model_name": "m",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "normalize_activations": False,
           "l1_coefficient": 3.0, "lr": 1e-3, "context_size": 10}
    cfg = SAEConfig.from_dict(old)
    assert (cfg.architecture, cfg.k, cfg.hook_name, cfg.model_name) == ("topk", 5, "blocks.0.attn.hook_z", "m")
    assert cfg.reshape_activations == "hook_z" and cfg.normalize_activations == "none"
    assert cfg.metadata == {"context_size": 10}


@pytest.mark.parametrize("bad, message", [
    ({"d_sae": 16}, "d_in"),
    ({"d_in": 8}, "d_sae"),
    ({"d_in": 8, "d_sae": 16, "architecture": "temporal"}, "temporal"),
    ({"d_in": 8, "d_sae": 16, "architecture": "matryoshka"}, "standard, topk, jumprelu"),
    ({"d_in": 8, "d_sae": 16, "architecture": "topk"}, "k"),
    ({"d_in": 8, "d_sae": 16, "architecture": "topk", "k": 17}, "k"),
    ({"d_in": 0, "d_sae": 16}, "positive"),
    ({"d_in": 8, "d_sae": 16, "normalize_activations": "expected_average_only_in"}, "fold"),
    ({"d_in": 8, "d_sae": 16, "normalize_activations": "whiten"}, "normalize_activations"),
    ({"d_in": 8, "d_sae": 16, "activation_fn_str": "tanh-relu"}, "tanh-relu"),
    ({"d_in": 8, "d_sae": 16, "dtype": "int8"}, "dtype"),
    ({"d_in": 8, "d_sae": 16, "finetuning_scaling_factor": True}, "scaling factor"),
])
def test_config_refuses_what_it_cannot_run(bad, message):
    with pytest.raises(InputError, match=message):
        SAEConfig.from_dict(bad)
