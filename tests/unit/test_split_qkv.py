"""TransformerLens' optional input hooks: ``use_split_qkv_input``, ``use_attn_in``, ``use_hook_mlp_in``,
``use_attn_result``.

The per-head path must reproduce the fused one (≤1e-5 relative) on the native towers (toy model, a
narrow random ViT-B-32 with randomised biases) and on timm towers (SigLIP: MAP pooler; EVA02: rotary,
SwiGLU, LayerNorm over the heads; EVA02-E: post-norm blocks without ln1); the hooks exist only while
switched on, and an edit of one head's input moves that head's q/k/v only.
"""

from __future__ import annotations

import pytest
import torch

from clip_lens import HookedCLIP
from tests.helpers import hooked_pair, random_images, random_tokens, randomize_vectors
from tests.parity.test_timm_towers import overrides

TINY = {
    "vision_cfg": {"layers": 2, "width": 64, "patch_size": 32, "head_width": 16},
    "text_cfg": {"layers": 2, "width": 64, "heads": 4},
    "embed_dim": 32,
}
TIMM = {"depth": 2, "embed_dim": 128, "num_heads": 2, "img_size": 112}  # 2 heads of 64, 7x7 patches
RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")
INPUT_HOOKS = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in", "hook_mlp_in")


def timm_pair(name: str):
    over = overrides(name, TIMM)
    over = {**over, "text_cfg": {**over["text_cfg"], "width": 128, "heads": 2}}
    model, hooked = hooked_pair(name, over, timm=TIMM)
    randomize_vectors(model)
    with torch.no_grad():  # timm's init (std 0.02) leaves attention nearly uniform: sharpen q and k
        for block in model.visual.trunk.blocks:
            attn = block.attn
            if getattr(attn, "qkv", None) is not None:
                attn.qkv.weight[: 2 * attn.qkv.out_features // 3] *= 4
            else:
                attn.q_proj.weight *= 4
                attn.k_proj.weight *= 4
    return hooked


def _toy():
    return HookedCLIP.from_pretrained("toy-shapes")


def _native():
    model, hooked = hooked_pair("ViT-B-32", TINY)
    randomize_vectors(model)
    return hooked


BUILDERS = {
    "toy-shapes": _toy,
    "ViT-B-32": _native,
    "SigLIP": lambda: timm_pair("ViT-B-16-SigLIP"),
    "EVA02": lambda: timm_pair("EVA02-B-16"),
    "EVA02-E": lambda: timm_pair("EVA02-E-14"),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request):
    hooked = BUILDERS[request.param]()
    images = random_images(hooked, batch=1)
    tokens = random_tokens(hooked, batch=1, length=5)
    with torch.no_grad():
        reference = hooked.encode_image(images), hooked.encode_text(tokens)
    yield request.param, hooked, images, tokens, reference
    hooked.set_use_split_qkv_input(False)
    hooked.set_use_attn_in(False)
    hooked.set_use_hook_mlp_in(False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _input_hook_names(hooked) -> list[str]:
    return [name for name in hooked.hook_dict if name.rsplit(".", 1)[-1] in INPUT_HOOKS]


SWITCHES = ("set_use_split_qkv_input", "set_use_attn_in", "set_use_hook_mlp_in")


def test_per_head_inputs_reproduce_the_fused_path(built):
    _, hooked, images, tokens, (image_ref, text_ref) = built
    for switch in SWITCHES:
        getattr(hooked, switch)(True)
        try:
            with torch.no_grad():
                assert _rel(hooked.encode_image(images), image_ref) <= RTOL, switch
                assert _rel(hooked.encode_text(tokens), text_ref) <= RTOL, switch
        finally:
            getattr(hooked, switch)(False)


def test_input_hooks_exist_only_while_switched_on(built):
    _, hooked, images, tokens, _ = built
    before = list(hooked.hook_dict)
    assert _input_hook_names(hooked) == []
    hooked.set_use_split_qkv_input(True)
    hooked.set_use_hook_mlp_in(True)
    try:
        names = _input_hook_names(hooked)
        n_blocks = hooked.cfg.n_layers + hooked.text.cfg.n_layers
        assert len(names) == 4 * n_blocks  # q/k/v input + mlp_in in every block of both towers
        with torch.no_grad():
            _, cache = hooked.run_with_cache(images, tokens)
        assert len(cache) == len(hooked.hook_dict)  # every listed hook fires
        b, n, h, m = len(images), hooked.cfg.n_ctx, hooked.cfg.n_heads, hooked.cfg.d_model
        for which in ("q", "k", "v"):
            assert cache[f"blocks.1.hook_{which}_input"].shape == (b, n, h, m)
        assert cache["blocks.0.hook_mlp_in"].shape == (b, n, m)
        # the per-head inputs are resid_pre before ln1, and resid_mid before ln2
        resid = cache["blocks.0.hook_resid_pre"]
        assert torch.equal(cache["blocks.0.hook_q_input"], resid[:, :, None].expand(b, n, h, m))
        assert torch.equal(cache["blocks.0.hook_mlp_in"], cache["blocks.0.hook_resid_mid"])
        if hooked.blocks[0].ln1 is not None:  # ln1 normalises each head's copy
            assert cache["blocks.0.ln1.hook_scale"].shape == (b, n, h, 1)
        text_ctx = hooked.text.cfg.n_ctx
        assert cache["text.blocks.0.hook_k_input"].shape == (b, text_ctx, hooked.text.cfg.n_heads, hooked.text.cfg.d_model)
    finally:
        hooked.set_use_split_qkv_input(False)
        hooked.set_use_hook_mlp_in(False)
    assert list(hooked.hook_dict) == before


def test_attn_in_hook_shape(built):
    _, hooked, images, tokens, _ = built
    hooked.set_use_attn_in(True)
    try:
        with torch.no_grad():
            _, cache = hooked.run_with_cache(images, tokens, names_filter=lambda name: name.endswith("hook_attn_in"))
    finally:
        hooked.set_use_attn_in(False)
    assert len(cache) == hooked.cfg.n_layers + hooked.text.cfg.n_layers
    assert cache["blocks.0.hook_attn_in"].shape == (len(images), hooked.cfg.n_ctx, hooked.cfg.n_heads, hooked.cfg.d_model)


def _ramp(act, hook):
    """Not a per-vector affine map (a LayerNorm would undo that): a ramp over features."""
    return act * 1.5 + torch.linspace(-0.5, 0.5, act.shape[-1])


def _ramp_head(head):
    def edit(act, hook):
        act[:, :, head] = _ramp(act[:, :, head], hook)
        return act

    return edit


def test_editing_one_heads_input_moves_only_that_head(built):
    _, hooked, images, tokens, (image_ref, _) = built
    names = [f"blocks.0.attn.hook_{x}" for x in "qkv"]
    hooked.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, clean = hooked.run_with_cache(images, names_filter=names)
            for which in "qkv":
                with hooked.hooks(fwd_hooks=[(f"blocks.0.hook_{which}_input", _ramp_head(1))]):
                    _, edited = hooked.run_with_cache(images, names_filter=names)
                for x in "qkv":
                    before, after = clean[f"blocks.0.attn.hook_{x}"], edited[f"blocks.0.attn.hook_{x}"]
                    if x == which:
                        assert (after[:, :, 1] - before[:, :, 1]).abs().max() > 1e-3, which
                        assert torch.equal(after[:, :, 0], before[:, :, 0]), which
                    else:
                        assert torch.equal(after, before), (which, x)
    finally:
        hooked.set_use_split_qkv_input(False)
    with torch.no_grad():
        assert torch.equal(hooked.encode_image(images), image_ref)  # nothing stayed behind


HOOK_SWITCHES = [("hook_q_input", "set_use_split_qkv_input"), ("hook_k_input", "set_use_split_qkv_input"),
                 ("hook_v_input", "set_use_split_qkv_input"), ("hook_attn_in", "set_use_attn_in"),
                 ("hook_mlp_in", "set_use_hook_mlp_in")]


def test_every_input_hook_output_is_used(built):
    """An edit of each input hook's value reaches the block's output and the embedding. (The
    embedding is compared with the same path unedited: at random init timm's attention is nearly
    uniform, so a key edit in the last block moves the embedding by as little as ~1e-7.)"""
    label, hooked, images, tokens, _ = built
    towers = ["", "text."] if label in ("toy-shapes", "ViT-B-32") else [""]  # timm models: same text code
    for hook, switch in HOOK_SWITCHES:
        getattr(hooked, switch)(True)
        try:
            for tower in towers:
                names = [f"{tower}blocks.1.hook_resid_post"]
                run = (lambda **kw: hooked.run_with_cache(text=tokens, **kw)) if tower else (
                    lambda **kw: hooked.run_with_cache(images, **kw))
                with torch.no_grad():
                    clean_out, clean = run(names_filter=names)
                    with hooked.hooks(fwd_hooks=[(f"{tower}blocks.1.{hook}", _ramp)]):
                        out, edited = run(names_filter=names)
                moved = (edited[names[0]] - clean[names[0]]).abs().max() / clean[names[0]].abs().max()
                assert moved > 1e-4, (tower, hook)
                index = 1 if tower else 0
                assert not torch.equal(out[index], clean_out[index]), (tower, hook)
        finally:
            getattr(hooked, switch)(False)


def test_split_qkv_and_attn_in_are_mutually_exclusive(built):
    _, hooked, *_ = built
    hooked.set_use_attn_in(True)
    try:
        with pytest.raises(ValueError, match="mutually exclusive"):
            hooked.set_use_split_qkv_input(True)
        assert not any(block.use_split_qkv_input for block in hooked.blocks)
    finally:
        hooked.set_use_attn_in(False)
    hooked.set_use_split_qkv_input(True)
    try:
        with pytest.raises(ValueError, match="mutually exclusive"):
            hooked.set_use_attn_in(True)
    finally:
        hooked.set_use_split_qkv_input(False)


def test_use_attn_result_computes_results_without_a_hook(built, monkeypatch):
    _, hooked, images, tokens, (image_ref, text_ref) = built

    def fused(z):
        raise AssertionError("fused output projection used despite use_attn_result")

    hooked.set_use_attn_result(True)
    try:
        assert hooked.cfg.use_attn_result and hooked.text.cfg.use_attn_result
        for block in [*hooked.blocks, *hooked.text.blocks]:
            assert block.attn.use_attn_result
            monkeypatch.setattr(block.attn, "fused_output", fused)  # the per-head einsum must run
        with torch.no_grad():
            image, text = hooked.encode_image(images), hooked.encode_text(tokens)
    finally:
        hooked.set_use_attn_result(False)
    assert not hooked.blocks[0].attn.use_attn_result and not hooked.cfg.use_attn_result
    assert _rel(image, image_ref) <= RTOL and _rel(text, text_ref) <= RTOL
