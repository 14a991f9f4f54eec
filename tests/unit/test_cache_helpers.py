"""TransformerLens cache helpers on CLIPActivationCache, for the three pooling styles.

* ViT-B-32: CLS ('tok') pooling, ln_pre (the embedding term is ln_pre's output).
* ViT-L-14-CLIPA: average pooling, no ln_pre, ln_post applied after pooling; bidirectional text.
* ViT-M-16-alt: LayerScale folded into W_O / b_O (head results must include it).
* coca_ViT-B-32: attentional pooler (ln_post acts on the pooler output); CoCa text (CLS appended).
"""

from __future__ import annotations

import pytest
import torch

from clip_lens import UnsupportedArchitectureError
from clip_lens.cache import CLIPActivationCache
from tests.helpers import hooked_pair, random_images, random_tokens, randomize_vectors

ATOL = 1e-5
VISION = {"layers": 2, "width": 64, "patch_size": 32, "head_width": 16}
TEXT = {"layers": 2, "width": 64, "heads": 4}
MODELS = {
    "ViT-B-32": {"vision_cfg": VISION, "text_cfg": TEXT, "embed_dim": 32},
    "ViT-L-14-CLIPA": {"vision_cfg": VISION, "text_cfg": TEXT, "embed_dim": 32},
    "ViT-M-16-alt": {"vision_cfg": VISION, "text_cfg": TEXT, "embed_dim": 32},
    "coca_ViT-B-32": {
        "vision_cfg": {**VISION, "attn_pooler_heads": 4},
        "text_cfg": TEXT,
        "multimodal_cfg": {"layers": 1, "width": 64, "heads": 4},
        "embed_dim": 32,
    },
}
NAMES = list(MODELS)


@pytest.fixture(scope="module", params=NAMES)
def run(request):
    name = request.param
    model, hooked = hooked_pair(name, MODELS[name])
    randomize_vectors(model)
    images = random_images(hooked, batch=2)
    tokens = random_tokens(hooked, batch=2)
    tokens[1, 5:10] = 0  # two lengths (EOT at 4 and 9)
    tokens[1, 4] = hooked.text.cfg.vocab_size - 1
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens)
    return name, hooked, cache, tokens


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= atol, diff


def _tower(hooked, cache, tower):
    """(tower module, its cache): the image tower and the full cache, or the text sub-cache."""
    return (hooked.visual, cache) if tower == "vision" else (hooked.text, cache.text)


def test_config_features(run):
    name, hooked, cache, _ = run
    cfg = hooked.cfg
    assert (cfg.pool_type, cfg.has_ln_pre, cfg.final_ln_after_pool, cfg.layer_scale) == {
        "ViT-B-32": ("tok", True, False, False),
        "ViT-L-14-CLIPA": ("avg", False, True, False),
        "ViT-M-16-alt": ("tok", True, False, True),
        "coca_ViT-B-32": ("attn", True, False, False),
    }[name]
    assert isinstance(cache, CLIPActivationCache)


def test_text_sub_cache(run):
    _, hooked, cache, _ = run
    text = cache.text
    assert isinstance(text, CLIPActivationCache)
    assert text.model is hooked.text
    assert sorted(text.keys()) == sorted(k[len("text."):] for k in cache.keys() if k.startswith("text."))
    assert torch.equal(text["blocks.1.hook_resid_post"], cache["text.blocks.1.hook_resid_post"])


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_decompose_resid_sums_to_resid(run, tower):
    _, hooked, cache, _ = run
    module, c = _tower(hooked, cache, tower)
    n = module.cfg.n_layers
    stack, labels = c.decompose_resid(layer=n, return_labels=True)
    embed_labels = ["embed"] if module.cfg.has_ln_pre else ["embed", "pos_embed"]
    assert labels == embed_labels + ["0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    _close(stack.sum(0), c[f"blocks.{n - 1}.hook_resid_post"])
    # every prefix of the stream too: before block 1, before block 1's MLP, before block 0
    _close(c.decompose_resid(layer=1).sum(0), c["blocks.1.hook_resid_pre"])
    _close(c.decompose_resid(layer=1, mlp_input=True).sum(0), c["blocks.1.hook_resid_mid"])
    _close(c.decompose_resid(layer=0).sum(0), c["blocks.0.hook_resid_pre"])
    # a position slice keeps the sum at that position (int: position axis dropped, as in TL)
    _close(c.decompose_resid(layer=n, pos_slice=0).sum(0), c[f"blocks.{n - 1}.hook_resid_post"][:, 0])
    _close(c.decompose_resid(layer=n, pos_slice=[0, 3]).sum(0), c[f"blocks.{n - 1}.hook_resid_post"][:, [0, 3]])


def test_decompose_resid_embed_term(run):
    """Without ln_pre the embedding terms are hook_embed and hook_pos_embed; with it, ln_pre's output."""
    _, hooked, cache, _ = run
    stack = cache.decompose_resid(layer=0)
    if hooked.cfg.has_ln_pre:
        assert stack.shape[0] == 1
        _close(stack[0], cache["ln_pre.hook_normalized"])
    else:
        _close(stack[0], cache["hook_embed"])
        _close(stack[1], cache["hook_pos_embed"])


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_accumulated_resid(run, tower):
    _, hooked, cache, _ = run
    module, c = _tower(hooked, cache, tower)
    n = module.cfg.n_layers
    acc, labels = c.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert acc.shape[0] == n + 1
    _close(acc[-1], c[f"blocks.{n - 1}.hook_resid_post"])
    _close(acc[0], c["blocks.0.hook_resid_pre"])
    _close(acc[1], c["blocks.1.hook_resid_pre"])


@pytest.mark.parametrize("tower", ["vision", "text"])
@pytest.mark.parametrize("from_z", [False, True], ids=["cached_result", "from_z"])
def test_stack_head_results(run, tower, from_z):
    """Head results summed over heads + b_O = hook_attn_out, per layer (LayerScale folded in).

    ``from_z``: hook_result not cached, so the helper recomputes it from hook_z and W_O.
    """
    _, hooked, cache, _ = run
    module, c = _tower(hooked, cache, tower)
    if from_z:
        kept = {k: v for k, v in c.cache_dict.items() if not k.endswith("attn.hook_result") or "attn_pool" in k}
        c = type(c)(kept, c.model, has_batch_dim=c.has_batch_dim)
        assert "blocks.0.attn.hook_result" not in c.cache_dict
    n, h = module.cfg.n_layers, module.cfg.n_heads
    stack, labels = c.stack_head_results(layer=n, return_labels=True)
    assert labels == [f"L{l}H{i}" for l in range(n) for i in range(h)]
    assert stack.shape[0] == n * h
    per_layer = stack.reshape(n, h, *stack.shape[1:])
    total = torch.zeros_like(c["blocks.0.hook_attn_out"])
    for layer in range(n):
        b_O = module.blocks[layer].attn.b_O
        _close(per_layer[layer].sum(0) + b_O, c[f"blocks.{layer}.hook_attn_out"])
        total = total + c[f"blocks.{layer}.hook_attn_out"]
    b_sum = sum(module.blocks[layer].attn.b_O for layer in range(n))
    _close(stack.sum(0) + b_sum, total)


def test_layer_scale_is_in_head_results():
    """Guard for the from_z case: with LayerScale, W_O without gamma would not add up."""
    model, hooked = hooked_pair("ViT-M-16-alt", MODELS["ViT-M-16-alt"])
    randomize_vectors(model)
    attn = hooked.blocks[0].attn
    gamma = model.visual.transformer.resblocks[0].ls_1.gamma
    assert attn.layer_scale is gamma
    raw = model.visual.transformer.resblocks[0].attn.out_proj.weight
    _close(attn.W_O.reshape(-1, attn.d_model), raw.T * gamma)


def test_apply_ln_to_stack_reproduces_image_embedding(run):
    name, hooked, cache, _ = run
    n = hooked.cfg.n_layers
    ln, proj = hooked.visual.ln_post, hooked.visual.proj
    stack = cache.decompose_resid(layer=n)
    if name == "coca_ViT-B-32":
        # ln_post normalises the attentional pooler's output: not a function of the residual stack
        with pytest.raises(UnsupportedArchitectureError, match="attentional pooler"):
            cache.apply_ln_to_stack(stack, layer=n)
        return
    if hooked.cfg.final_ln_after_pool:
        # CLIPA: average over patches first, then ln_post, as the model does
        pooled_stack = stack[:, :, 1:].mean(dim=2)
        normed = cache.apply_ln_to_stack(pooled_stack, layer=n)
        # the per-token form: each token divided by its image's pooled scale, pooled afterwards
        per_token = cache.apply_ln_to_stack(stack, layer=n)
        _close(per_token[:, :, 1:].mean(dim=2), normed)
        _close(cache.decompose_resid(layer=n, apply_ln=True), per_token)
    else:
        # CLS pooling: ln_post per token, position 0
        normed = cache.apply_ln_to_stack(stack, layer=n)[:, :, 0]
        _close(cache.apply_ln_to_stack(stack[:, :, 0], layer=n, pos_slice=0), normed)
        _close(cache.decompose_resid(layer=n, apply_ln=True, pos_slice=0), normed)
    pooled = normed.sum(0) * ln.weight + ln.bias
    _close(pooled, cache["hook_pooled"], atol=1e-4)
    _close(pooled @ proj, cache["hook_image_embed"], atol=1e-4)
    # the embedding is a sum of per-component terms (bias added once)
    per_component = (normed * ln.weight) @ proj
    _close(per_component.sum(0) + ln.bias @ proj, cache["hook_image_embed"], atol=1e-4)


def test_apply_ln_to_stack_reproduces_text_embedding(run):
    name, hooked, cache, tokens = run
    text, c = hooked.text, cache.text
    n = text.cfg.n_layers
    stack = c.decompose_resid(layer=n)  # [comp, batch, pos, d_model]
    rows = torch.arange(tokens.shape[0])
    if text.cls_emb is not None:  # CoCa: LN after taking the appended CLS (last position)
        normed = c.apply_ln_to_stack(stack[:, :, -1], layer=n)
    else:
        normed = c.apply_ln_to_stack(stack, layer=n)
        if text.pool_type == "argmax":
            normed = normed[:, rows, tokens.argmax(-1)]
        else:
            assert text.pool_type == "last"
            normed = normed[:, :, -1]
    pooled = normed.sum(0) * text.ln_final.weight + text.ln_final.bias
    _close(pooled, c["hook_pooled"], atol=1e-4)
    _close(pooled @ text.text_projection, c["hook_text_embed"], atol=1e-4)


def test_apply_ln_to_stack_mid_layer(run):
    """layer < n_layers: ln1 of that block, reproducing blocks.{l}.ln1.hook_normalized."""
    _, hooked, cache, _ = run
    stack = cache.decompose_resid(layer=1)
    normed = cache.apply_ln_to_stack(stack, layer=1).sum(0)
    ln1 = hooked.blocks[1].ln1
    _close(normed * ln1.weight + ln1.bias, cache["blocks.1.ln1.hook_normalized"], atol=1e-4)
    stack = cache.decompose_resid(layer=1, mlp_input=True)
    ln2 = hooked.blocks[1].ln2
    normed = cache.apply_ln_to_stack(stack, layer=1, mlp_input=True).sum(0)
    _close(normed * ln2.weight + ln2.bias, cache["blocks.1.ln2.hook_normalized"], atol=1e-4)


def test_remove_batch_dim_cache_helpers(run):
    """The helpers also work on a batch-1 cache without the batch axis."""
    name, hooked, _, tokens = run
    images = random_images(hooked, batch=1)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(images, tokens[:1], remove_batch_dim=True)
    n = hooked.cfg.n_layers
    final = cache[f"blocks.{n - 1}.hook_resid_post"]
    assert final.ndim == 2
    _close(cache.decompose_resid(layer=n).sum(0), final)
    _close(cache.text.decompose_resid(layer=n).sum(0), cache[f"text.blocks.{n - 1}.hook_resid_post"])
    if name in ("ViT-B-32", "ViT-M-16-alt"):
        normed = cache.apply_ln_to_stack(cache.decompose_resid(layer=n), layer=n, has_batch_dim=False)[:, 0]
        ln = hooked.visual.ln_post
        _close((normed.sum(0) * ln.weight + ln.bias) @ hooked.visual.proj, cache["hook_image_embed"], atol=1e-4)
    if name == "ViT-L-14-CLIPA":
        normed = cache.apply_ln_to_stack(cache.decompose_resid(layer=n)[:, 1:].mean(1), layer=n, has_batch_dim=False)
        ln = hooked.visual.ln_post
        _close((normed.sum(0) * ln.weight + ln.bias) @ hooked.visual.proj, cache["hook_image_embed"], atol=1e-4)
