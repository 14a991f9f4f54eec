"""Second-order neuron effects are exact: an independent oracle built from the model's own forward pass
with frozen LayerNorm scales and attention patterns, the first/second/higher-order identity, and the
refusals.

The oracle never calls clip_lens.second_order: it pins every ``hook_scale`` and ``hook_pattern`` of the
image tower to the clean run's values (the linearised model), zeroes the neuron at ``mlp.hook_post``,
pins the later MLPs and all later attention layers but one to their clean outputs, and differences
the embeddings. Every family's read-out (CLS, average pooling with LN after pooling, CoCa's attentional
pooler, timm EVA02) is the model's own.
"""

from __future__ import annotations

import pytest
import torch

from clip_lens import IndexOutOfRangeError, InputError, UnsupportedArchitectureError
from clip_lens.second_order import SecondOrder, second_order, second_order_maps
from tests.helpers import hooked_pair, random_images

TEXT = {"layers": 1, "vocab_size": 1000}
# name -> (open_clip overrides, timm kwargs): one per read-out family, 3 layers so that l = 0 has two later layers
FAMILIES = {
    "ViT-B-32": ({"vision_cfg": {"layers": 3, "width": 128}, "text_cfg": TEXT}, None),  # CLS token, ln_pre
    "ViT-L-14-CLIPA": ({"vision_cfg": {"layers": 3, "width": 128, "image_size": 112}, "text_cfg": TEXT}, None),  # avg pool, LN after pool
    "coca_ViT-B-32": ({"vision_cfg": {"layers": 3, "width": 128, "attentional_pool": True}, "text_cfg": TEXT}, None),
    "EVA02-B-16": ({"text_cfg": TEXT}, {"depth": 3, "embed_dim": 128, "num_heads": 2, "img_size": 112}),  # rotary, SwiGLU+LN, LN over heads
}
NEURONS = [0, 7, 101]
ATOL = 1e-10


def _model(name: str, seed: int = 0):
    overrides, timm = FAMILIES[name]
    _, model = hooked_pair(name, overrides, seed=seed, randomize=True, timm=timm)
    return model.to(torch.float64)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model = _model(request.param)
    images = random_images(model, batch=2, seed=3).to(torch.float64)
    return model, images


# --- the oracle: the linearised model run through its own forward pass -------------------------------------------


def _image_hooks(model) -> list[str]:
    return [name for name in model.hook_dict if not name.startswith("text.")]


def _clean(model, images) -> dict:
    cache = {}

    def save(activation, hook):
        cache[hook.name] = activation.clone()

    keep = ("hook_scale", "hook_pattern", "hook_attn_out", "hook_post", "hook_z")
    hooks = [(name, save) for name in _image_hooks(model) if name.endswith(keep)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model.visual(images)
    return cache


def _frozen(model, images, cache, layer, neurons, free_attn, pin_later_mlps=True, only_head=None):
    """The embedding of the linearised model (every LN scale and pattern pinned) with ``neurons`` of
    ``layer`` zeroed; later attention layers not in ``free_attn`` pinned to their clean output; later
    MLPs pinned (unless ``pin_later_mlps=False``); ``only_head=(l', h)``: the other heads of l' pinned."""
    n_layers = model.cfg.n_layers

    def pin(activation, hook):
        return cache[hook.name]

    def zero(activation, hook):
        activation = activation.clone()
        activation[..., neurons] = 0
        return activation

    def pin_other_heads(activation, hook):
        pinned = cache[hook.name].clone()
        pinned[:, :, only_head[1]] = activation[:, :, only_head[1]]
        return pinned

    hooks = [(name, pin) for name in _image_hooks(model) if name.endswith(("hook_scale", "hook_pattern"))]
    hooks.append((f"blocks.{layer}.mlp.hook_post", zero))
    for later in range(layer + 1, n_layers):
        if later not in free_attn:
            hooks.append((f"blocks.{later}.hook_attn_out", pin))
        if pin_later_mlps:
            hooks.append((f"blocks.{later}.mlp.hook_post", pin))
    if only_head is not None:
        hooks.append((f"blocks.{only_head[0]}.attn.hook_z", pin_other_heads))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model.visual(images)


def _oracle(model, images, layer, neurons):
    """(first order, second order) of the neurons of ``layer`` together, from pinned forward passes."""
    cache = _clean(model, images)
    clean = _frozen(model, images, cache, layer, [], free_attn=())
    first = clean - _frozen(model, images, cache, layer, neurons, free_attn=())
    second = torch.zeros_like(first)
    for later in range(layer + 1, model.cfg.n_layers):
        second += clean - _frozen(model, images, cache, layer, neurons, free_attn=(later,)) - first
    return first, second


# --- exactness ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
def test_effects_equal_the_frozen_forward_oracle_per_neuron(family, layer):
    model, images = family
    result = second_order(model, images, layers=[layer], neurons=NEURONS)
    assert result.effects.shape == (2, 1, len(NEURONS), model.cfg.d_embed)
    for i, neuron in enumerate(NEURONS):
        first, second = _oracle(model, images, layer, [neuron])
        assert second.norm() > 1e-3 * first.norm()  # the path is really there
        torch.testing.assert_close(result.effects[:, 0, i], second, rtol=0, atol=ATOL)
        torch.testing.assert_close(result.first_order[:, 0, i], first, rtol=0, atol=ATOL)


def test_last_layer_has_no_second_order_effect(family):
    model, images = family
    result = second_order(model, images, layers=[-1], neurons=NEURONS)
    assert result.layers == [model.cfg.n_layers - 1]
    assert result.effects.abs().max().item() == 0.0
    assert result.first_order.abs().max().item() > 0.0


def test_first_order_sums_to_decompose_mlp_term_minus_output_bias(family):
    model, images = family
    result = second_order(model, images)  # every layer, every neuron
    parts = model.decompose(images, heads=None)
    torch.testing.assert_close(result.first_order.sum(2) + result.mlp_bias, parts.mlp, rtol=0, atol=1e-9)
    torch.testing.assert_close(result.embedding, model.encode_image(images), rtol=0, atol=1e-12)  # the same forward


def test_mlp_bias_is_b_out_through_the_frozen_ln_post():
    """Independent on a CLS-pooled ViT: ``centre(b_out) ⊙ γ_post / σ_post @ proj``."""
    model = _model("ViT-B-32")
    images = random_images(model, batch=2, seed=5).to(torch.float64)
    result = second_order(model, images, neurons=[3])
    _, cache = model.run_with_cache(images)
    sigma = cache["ln_post.hook_scale"][:, 0]  # [batch, 1] at the CLS token
    for i, block in enumerate(model.visual.blocks):
        b_out = block.mlp.c_proj.bias
        expected = ((b_out - b_out.mean()) * model.visual.ln_post.weight / sigma) @ model.visual.proj
        torch.testing.assert_close(result.mlp_bias[:, i], expected, rtol=0, atol=ATOL)


def test_first_plus_second_order_is_the_layer_ablation_with_one_later_attention_layer():
    """The identity, where it is exact: linearised model, later MLPs pinned, ablate every neuron of the
    layer before the last: the embedding changes by first + second order (no path crosses ≥ 2 later
    attention layers)."""
    model = _model("ViT-B-32", seed=1)
    images = random_images(model, batch=3, seed=6).to(torch.float64)
    layer = model.cfg.n_layers - 2
    result = second_order(model, images, layers=[layer])
    cache = _clean(model, images)
    every = list(range(model.cfg.d_mlp))
    later = tuple(range(layer + 1, model.cfg.n_layers))
    change = _frozen(model, images, cache, layer, [], later) - _frozen(model, images, cache, layer, every, later)
    torch.testing.assert_close(result.first_order.sum(2)[:, 0] + result.total()[:, 0], change, rtol=0, atol=1e-9)
    # with the later MLP free the remainder is the (non-linear) path through it, and it is not zero
    unpinned = _frozen(model, images, cache, layer, [], later, pin_later_mlps=False) - _frozen(
        model, images, cache, layer, every, later, pin_later_mlps=False)
    assert (unpinned - change).norm() > 1e-6 * change.norm()


def test_higher_order_remainder_is_the_path_through_two_later_attention_layers():
    """l = 0 of a 3-layer model, later MLPs pinned: ablation − first − second = the path through
    attention layers 1 then 2 (Δ_both − Δ_1 − Δ_2 + Δ_none in the linearised model), and it is not zero."""
    model = _model("ViT-B-32", seed=2)
    images = random_images(model, batch=2, seed=7).to(torch.float64)
    result = second_order(model, images, layers=[0])
    cache = _clean(model, images)
    every = list(range(model.cfg.d_mlp))

    def change(free):
        return _frozen(model, images, cache, 0, [], free) - _frozen(model, images, cache, 0, every, free)

    both, one, two, none = change((1, 2)), change((1,)), change((2,)), change(())
    higher = both - result.first_order.sum(2)[:, 0] - result.total()[:, 0]
    torch.testing.assert_close(higher, both - one - two + none, rtol=0, atol=1e-9)
    assert higher.norm() > 1e-6 * both.norm()


# --- projections, per-head split, reuse ---------------------------------------------------------------------------


def test_directions_project_the_d_embed_effects():
    model = _model("coca_ViT-B-32")
    images = random_images(model, batch=2, seed=8).to(torch.float64)
    directions = torch.randn(5, model.cfg.d_embed, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    full = second_order(model, images, layers=[0, 1], neurons=NEURONS)
    projected = second_order(model, images, layers=[0, 1], neurons=NEURONS, directions=directions)
    assert projected.effects.shape == (2, 2, len(NEURONS), 5)
    torch.testing.assert_close(projected.effects, full.effects @ directions.T, rtol=0, atol=ATOL)
    torch.testing.assert_close(projected.first_order, full.first_order @ directions.T, rtol=0, atol=ATOL)
    torch.testing.assert_close(projected.directions, directions)


def test_per_head_sums_to_effects_and_matches_the_oracle_for_one_head():
    model = _model("ViT-B-32")
    images = random_images(model, batch=2, seed=10).to(torch.float64)
    result = second_order(model, images, layers=[0, 1], neurons=NEURONS, per_head=True)
    n_heads = model.cfg.n_heads
    assert result.head_labels == [f"L{l}H{h}" for l in (1, 2) for h in range(n_heads)]
    assert result.per_head.shape == (2, 2, len(NEURONS), 2 * n_heads, model.cfg.d_embed)
    plain = second_order(model, images, layers=[0, 1], neurons=NEURONS)  # effects computed without the split
    torch.testing.assert_close(result.per_head.sum(3), plain.effects, rtol=0, atol=ATOL)
    torch.testing.assert_close(result.effects, plain.effects, rtol=0, atol=ATOL)
    assert result.per_head[:, 1, :, :n_heads].abs().max().item() == 0.0  # layer 1 is not later than layer 1
    cache = _clean(model, images)
    clean = _frozen(model, images, cache, 0, [], free_attn=())
    first = clean - _frozen(model, images, cache, 0, [NEURONS[1]], free_attn=())
    ablated = _frozen(model, images, cache, 0, [NEURONS[1]], free_attn=(2,), only_head=(2, 1))
    label = result.head_labels.index("L2H1")
    torch.testing.assert_close(result.per_head[:, 0, 1, label], clean - ablated - first, rtol=0, atol=ATOL)


def test_maps_reused_across_batches_give_the_same_effects():
    model = _model("ViT-L-14-CLIPA")
    images = random_images(model, batch=3, seed=11).to(torch.float64)
    maps = second_order_maps(model, layers=[0, 1], neurons=NEURONS)
    reused = second_order(model, images, maps=maps, batch_size=2)
    fresh = second_order(model, images, layers=[0, 1], neurons=NEURONS)
    assert isinstance(reused, SecondOrder) and reused.layers == [0, 1]
    torch.testing.assert_close(reused.effects, fresh.effects, rtol=0, atol=ATOL)
    torch.testing.assert_close(reused.neurons, torch.tensor(NEURONS))


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    _, model = hooked_pair("ViT-B-32", {"vision_cfg": {"layers": 2, "width": 128}, "text_cfg": TEXT})
    return model, random_images(model, batch=1)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(layers=[5]), IndexOutOfRangeError, "layers: layer 5 is out of range for a 2-layer tower"),
    (dict(layers=[]), InputError, "layers selects no MLP layer"),
    (dict(layers=[1.0]), InputError, "layers[0] must be an integer"),
    (dict(neurons=[3, 512]), IndexOutOfRangeError, "neuron 512 is out of range: the MLPs have 512 neurons"),
    (dict(neurons=[]), InputError, "empty selection"),
    (dict(neurons=torch.tensor([0.5])), InputError, "neurons must be None"),
    (dict(directions=torch.randn(4, 7)), InputError, "directions must be a tensor [n_directions, 512], got (4, 7)"),
    (dict(batch_size=0), InputError, "batch_size must be at least 1"),
])
def test_bad_input_is_refused_in_one_line(small, kwargs, error, message):
    model, images = small
    with pytest.raises(error) as caught:
        second_order(model, images, **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_maps_with_a_selection_is_refused(small):
    model, images = small
    maps = second_order_maps(model, layers=[0], neurons=[1])
    with pytest.raises(InputError, match="not with maps="):
        second_order(model, images, maps=maps, neurons=[1])


@pytest.mark.parametrize("name, overrides, timm, message", [
    ("RN50", {"vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 96, "head_width": 64},
              "text_cfg": TEXT}, None, "resnet image tower"),
    ("ViT-B-16-SigLIP", {"embed_dim": 128, "text_cfg": {**TEXT, "width": 128, "heads": 2}},
     {"depth": 2, "embed_dim": 128, "num_heads": 2, "img_size": 112}, "MAP attention pooler's MLP"),
])
def test_towers_whose_neuron_path_is_not_affine_are_refused(name, overrides, timm, message):
    _, model = hooked_pair(name, overrides, timm=timm)
    images = random_images(model, batch=1)
    with pytest.raises(InputError) as caught:
        second_order(model, images)
    assert isinstance(caught.value, UnsupportedArchitectureError)
    assert message in str(caught.value) and "second_order works on ViT towers" in str(caught.value)
    assert "\n" not in str(caught.value)
