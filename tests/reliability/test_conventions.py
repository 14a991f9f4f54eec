"""Regression tests for issue 27, part D: loading, SAEs and conventions (classes 6, 7 and 8).

Each test is an attack from the issue or a convention a TransformerLens / SAELens / open_clip user
expects, checked against the expected one-line error or against an independent computation:
checkpoints with NaN/inf weights, SAE folders whose sparsity file was flipped or whose cfg.json
names another model or tower, gated and abstopk SAEs written from SAELens' format by hand,
non-integer patching arguments, open_clip's ``create_model`` keyword arguments and per-tag
preprocessing, pretrained tags offline, and ``logit_attrs(tokens=…)``, ``SVDInterpreter`` and
``all_composition_scores``. Nothing is downloaded: models are tiny random ones or bundled.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clip_lens import ClipLensError, CorruptCheckpointError, HookedCLIP, InputError, ModelNotFoundError
from clip_lens.errors import HookNameError, UnsupportedArchitectureError
from clip_lens.loading import checkpoint_preprocess, model_config
from clip_lens.patching import activation_patch, cosine_metric
from clip_lens.sae import SAE, SAEConfig
from tests.helpers import build_open_clip, random_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "ViT-B-32"
TINY = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 64, "head_width": 16},
        "text_cfg": {"layers": 1, "width": 64, "heads": 4}}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def toy() -> HookedCLIP:
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny ViT-B-32 checkpoint (safetensors) and its state dict."""
    state = {k: v.clone().contiguous() for k, v in build_open_clip(NAME, TINY, seed=5).state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return path, state


# --- class 6: non-finite weights ----------------------------------------------------------------


def test_nan_and_inf_weights_are_refused_naming_each_tensor_and_count(tmp_path, checkpoint):
    _, state = checkpoint
    state["visual.conv1.weight"].view(-1)[:3] = float("nan")
    state["text_projection"].view(-1)[7] = float("inf")
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    before = _sha(path)
    with pytest.raises(CorruptCheckpointError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    message = _one_line(info.value)
    n_conv = state["visual.conv1.weight"].numel()
    assert f"visual.conv1.weight (3 of {n_conv} values NaN/inf)" in message
    assert f"text_projection (1 of {state['text_projection'].numel()} values NaN/inf)" in message
    assert "2 tensors" in message and "allow_nonfinite=True" in message
    # for research on broken checkpoints: loads, with a warning naming them, and computes NaN
    with pytest.warns(UserWarning, match="visual.conv1.weight"):
        model = HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY, allow_nonfinite=True)
    assert torch.isnan(model.visual.conv1.weight.view(-1)[:3]).all()
    assert torch.isnan(model.encode_image(random_images(model, 1))).all()
    assert _sha(path) == before


def test_half_precision_overflow_is_refused_like_a_nonfinite_checkpoint(tmp_path, checkpoint):
    _, state = checkpoint
    state["visual.proj"].view(-1)[0] = 1e6  # finite in fp32, inf in fp16
    path = tmp_path / "large.safetensors"
    save_file(state, str(path))
    with pytest.raises(CorruptCheckpointError, match=r"torch.float16 conversion .*visual\.proj \(1 of"):
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY, precision="pure_fp16")


# --- class 6: SAE checks ------------------------------------------------------------------------


def _sae(d_in: int, hook: str, **metadata) -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=16, hook_name=hook, metadata=dict(metadata)))
    with torch.no_grad():
        sae.b_enc.normal_()
    return sae


def test_sparsity_file_bit_flip_is_detected_when_the_sae_is_loaded(tmp_path):
    folder = _sae(8, "blocks.1.hook_resid_post").save(tmp_path / "sae", log_feature_sparsity=-torch.rand(16) * 3)
    sparsity = folder / "sparsity.safetensors"
    data = bytearray(sparsity.read_bytes())
    data[-5] ^= 0x01  # one bit of one value: still a valid float
    sparsity.write_bytes(bytes(data))
    hashes = {p.name: _sha(p) for p in folder.iterdir()}
    with pytest.raises(CorruptCheckpointError) as info:
        SAE.load(folder)
    assert "sparsity.safetensors is damaged or was replaced" in _one_line(info.value)
    assert "clip_lens_sparsity_sha256" in str(info.value)
    assert hashes == {p.name: _sha(p) for p in folder.iterdir()}


def test_sparsity_file_not_written_with_the_weights_is_refused(tmp_path):
    folder = _sae(8, "blocks.1.hook_resid_post").save(tmp_path / "sae")  # cfg.json commits the weights only
    save_file({"sparsity": torch.full((16,), -2.0)}, str(folder / "sparsity.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="was not written with this SAE.*records no clip_lens_sparsity_sha256"):
        SAE.load(folder)


def test_cfg_json_nested_100000_deep_is_one_input_error(tmp_path):
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text('{"d_in": 8, "d_sae": 16, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError) as info:
        SAE.load(folder)
    assert "deep" in _one_line(info.value)


def test_sae_trained_on_another_model_is_refused_at_splice_time(toy):
    hook = "blocks.1.hook_resid_post"
    sae = _sae(toy.cfg.d_model, hook, clip_lens_training={"args": {"source": {"model": "ViT-B-32", "hook_name": hook}}})
    with pytest.raises(InputError) as info:
        toy.add_sae(sae)
    assert "trained on model 'ViT-B-32'" in _one_line(info.value) and "'toy-shapes'" in str(info.value)
    assert not toy.acts_to_saes


def test_sae_whose_hook_moved_to_the_other_tower_is_refused(toy):
    trained = "text.blocks.1.hook_resid_post"
    sae = _sae(toy.cfg.d_model, "blocks.1.hook_resid_post",
               clip_lens_training={"args": {"source": {"model": "toy-shapes", "hook_name": trained}}})
    with pytest.raises(InputError) as info:
        toy.add_sae(sae)
    assert "the text tower's 'text.blocks.1.hook_resid_post'" in _one_line(info.value)
    assert "the image tower's 'blocks.1.hook_resid_post'" in str(info.value)


def test_sae_hook_the_model_lacks_is_refused(toy):
    with pytest.raises(HookNameError, match="blocks.99.hook_resid_post"):
        toy.add_sae(_sae(toy.cfg.d_model, "blocks.99.hook_resid_post"))


def test_saelens_model_name_of_another_model_warns_and_splices(toy):
    sae = _sae(toy.cfg.d_model, "blocks.1.hook_resid_post")
    sae.cfg.model_name = "gpt2"
    images = random_images(toy, 2)
    with torch.no_grad():
        clean = toy(images, return_type="image_features")
        with pytest.warns(UserWarning, match="model_name is 'gpt2' but the model is 'toy-shapes'"):
            spliced = toy.run_with_saes(images, saes=[sae], use_error_term=True, return_type="image_features")
    assert torch.equal(spliced, clean)


# --- class 8: gated and abstopk SAEs, from SAELens' format written by hand ----------------------


def _write_saelens(folder: Path, architecture: str, tensors: dict, **fields) -> Path:
    """An SAE folder the way SAELens 6 writes one (json.dump + safetensors' save_file)."""
    folder.mkdir()
    cfg = {"d_in": 8, "d_sae": 16, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", **fields,
           "metadata": {"sae_lens_version": "6.10.0", "hook_name": "blocks.1.hook_resid_post", "model_name": "x"},
           "architecture": architecture}
    with open(folder / "cfg.json", "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _weights(gated: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    tensors = {"W_enc": torch.randn(8, 16, generator=g) / 3, "W_dec": torch.randn(16, 8, generator=g) / 4,
               "b_dec": 0.1 * torch.randn(8, generator=g)}
    extra = ("b_gate", "b_mag", "r_mag") if gated else ("b_enc",)
    tensors.update({name: 0.3 * torch.randn(16, generator=g) for name in extra})
    return tensors


def _gated_reference(x: torch.Tensor, w: dict) -> torch.Tensor:
    """SAELens' GatedSAE.encode, one row and one feature at a time."""
    rows = []
    for row in (x - w["b_dec"]).tolist():
        acts = []
        for j in range(16):
            gate = sum(row[i] * float(w["W_enc"][i, j]) for i in range(8)) + float(w["b_gate"][j])
            mag = sum(row[i] * float(w["W_enc"][i, j]) * float(torch.exp(w["r_mag"][j])) for i in range(8)) + float(w["b_mag"][j])
            acts.append(max(mag, 0.0) if gate > 0 else 0.0)
        rows.append(acts)
    return torch.tensor(rows)


def _abstopk_reference(x: torch.Tensor, w: dict, k: int, rescale: bool) -> torch.Tensor:
    """SAELens' AbsTopK: the k pre-activations largest in magnitude, signed; the rest 0."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if rescale:
        pre = pre * w["W_dec"].norm(dim=-1)
    out = torch.zeros_like(pre)
    for r, row in enumerate(pre.tolist()):
        for j in sorted(range(16), key=lambda j: -abs(row[j]))[:k]:
            out[r, j] = row[j]
    return out


def test_gated_sae_runs_exactly_as_saelens_defines_it(tmp_path):
    w = _weights(gated=True)
    sae = SAE.load(_write_saelens(tmp_path / "gated", "gated", w))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    acts = sae.encode(x)
    expected = _gated_reference(x, w)
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-5)
    assert 0 < int((acts > 0).sum()) < acts.numel()  # the gate closes some features and opens others
    torch.testing.assert_close(sae(x), expected @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)
    again = SAE.load(sae.save(tmp_path / "copy"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sae.state_dict().values()))


@pytest.mark.parametrize("rescale", [False, True])
def test_abstopk_sae_keeps_the_largest_magnitudes_with_their_sign(tmp_path, rescale):
    w = _weights(gated=False)
    sae = SAE.load(_write_saelens(tmp_path / "abstopk", "abstopk", w, k=3, rescale_acts_by_decoder_norm=rescale))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    acts = sae.encode(x)
    expected = _abstopk_reference(x, w, 3, rescale)
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-5)
    assert bool((acts < 0).any()) and ((acts != 0).sum(-1) == 3).all()
    decoded = (expected / w["W_dec"].norm(dim=-1) if rescale else expected) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(sae(x), decoded, atol=1e-5, rtol=1e-5)


def test_gated_sae_splices_with_the_error_term_bit_for_bit(toy, tmp_path):
    d = toy.cfg.d_model
    g = torch.Generator().manual_seed(6)
    w = {"W_enc": torch.randn(d, 32, generator=g) / d ** 0.5, "W_dec": torch.randn(32, d, generator=g) / 6,
         "b_dec": torch.zeros(d), "b_gate": torch.randn(32, generator=g), "b_mag": torch.randn(32, generator=g),
         "r_mag": 0.1 * torch.randn(32, generator=g)}
    cfg = SAEConfig(d_in=d, d_sae=32, architecture="gated", hook_name="blocks.2.hook_resid_post", model_name="toy-shapes")
    sae = SAE(cfg)
    with torch.no_grad():
        for name, value in w.items():
            getattr(sae, name).copy_(value)
    images = random_images(toy, 2)
    with torch.no_grad():
        clean, cache = toy.run_with_cache(images, return_type="image_features")
        spliced, sae_cache = toy.run_with_cache_with_saes(images, saes=[sae], use_error_term=True,
                                                          return_type="image_features")
    assert torch.equal(spliced, clean)
    acts = sae_cache["blocks.2.hook_resid_post.hook_sae_acts_post"]
    x = cache["blocks.2.hook_resid_post"]
    gate = (x @ w["W_enc"] + w["b_gate"] > 0).float()
    torch.testing.assert_close(acts, gate * torch.relu(x @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]))


# --- class 6: activation_patch arguments --------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": [1.5]}, r"layers\[0\] must be an integer, got 1.5 \(float\)"),
    ({"layers": [True]}, r"layers\[0\] must be an integer, got the bool True"),
    ({"layers": 1}, "layers must be a list of integers"),
    ({"positions": [0.0]}, r"positions\[0\] must be an integer, got 0.0"),
    ({"heads": ["1"]}, r"heads\[0\] must be an integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
])
def test_activation_patch_refuses_non_integer_and_out_of_range_arguments(toy, kwargs, message):
    images = random_images(toy, 1)
    activation = "z" if "heads" in kwargs else "resid_pre"
    with pytest.raises(InputError, match=message) as info:
        activation_patch(toy, images, images.flip(-1), cosine_metric(toy, "a red circle"), activation,
                         progress=False, **kwargs)
    _one_line(info.value)


# --- class 7: open_clip conventions -------------------------------------------------------------


def _tiny_config() -> dict:
    """TINY merged into ViT-B-32's config, as open_clip's keyword arguments."""
    config = model_config(NAME, TINY)
    return {key: config[key] for key in TINY}


def _open_clip_features(seed: int, **config) -> torch.Tensor:
    """open_clip's model of the tiny config with ``config`` written into it (the meaning of a force_* flag)."""
    torch.manual_seed(seed)
    kwargs = _tiny_config()
    for key, value in config.items():
        kwargs = {**kwargs, key: {**kwargs[key], **value} if isinstance(value, dict) else value}
    model = open_clip.create_model(NAME, **kwargs).eval()
    with torch.no_grad():
        return model.encode_image(torch.randn(2, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(1)))


def _hooked_features(seed: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    model = HookedCLIP.from_pretrained(NAME, config_overrides=TINY, **kwargs)
    with torch.no_grad():
        return model.encode_image(torch.randn(2, 3, *model.cfg.image_size, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("kwargs, config", [
    ({"force_quick_gelu": True}, {"quick_gelu": True}),
    ({"force_image_size": 64}, {"vision_cfg": {"image_size": 64}}),
])
def test_create_model_arguments_mean_what_they_mean_in_open_clip(kwargs, config):
    ours = _hooked_features(11, **kwargs)
    torch.testing.assert_close(ours, _open_clip_features(11, **config), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, _hooked_features(11)[:, :ours.shape[1]], atol=1e-3)  # the argument took effect


def test_image_preprocessing_arguments_match_open_clips_transform():
    options = {"image_mean": (0.1, 0.2, 0.3), "image_std": (0.5, 0.6, 0.7), "image_interpolation": "bilinear",
               "image_resize_mode": "squash"}
    model = HookedCLIP.from_pretrained(NAME, config_overrides=TINY, **options)
    _, _, theirs = open_clip.create_model_and_transforms(NAME, **_tiny_config(), **options)
    image = Image.fromarray((torch.rand(50, 300, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    assert torch.equal(model.preprocess(image), theirs(image))


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp16"}, "precision='fp16' keeps open_clip's LayerNorms in fp32.*pure_fp16"),
    ({"precision": "pure_bf16", "dtype": torch.float32}, "precision='pure_bf16' means torch.bfloat16 weights"),
    ({"jit": True}, "jit= does not apply to HookedCLIP: a TorchScript model has no hook points"),
    ({"output_dict": True}, "return_type="),
    ({"force_patch_dropout": 0.5}, "patch dropout only acts in training"),
    ({"image_interpolation": "random"}, "training augmentation"),
    ({"image_std": (1, 0, 1)}, "image_std must be positive"),
    ({"force_quickgelu": True}, "unknown keyword argument 'force_quickgelu'. Did you mean: force_quick_gelu"),
    ({"tag": "laion2b_s34b_b79"}, "Did you mean: laion2b_s34b_b79k"),
])
def test_create_model_arguments_that_cannot_apply_say_why(kwargs, message):
    with pytest.raises((InputError, ModelNotFoundError), match=message) as info:
        HookedCLIP.from_pretrained(NAME, config_overrides=TINY, **kwargs)
    _one_line(info.value)


def test_precision_names_give_the_weights_dtype():
    model = HookedCLIP.from_pretrained(NAME, config_overrides=TINY, precision="pure_bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in HookedCLIP.from_pretrained(NAME, config_overrides=TINY, precision="amp").parameters()} == {torch.float32}


def test_local_checkpoint_takes_its_tags_preprocessing(tmp_path):
    big = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 64, "head_width": 16},
           "text_cfg": {"layers": 1, "width": 64, "heads": 4}}
    path = tmp_path / "vitl.safetensors"
    save_file({k: v.contiguous() for k, v in build_open_clip("ViT-L-14", big).state_dict().items()}, str(path))
    # ViT-L-14's tags disagree: laion2b_s32b_b82k normalises with 0.5, the others with OpenAI's statistics
    with pytest.warns(UserWarning, match=r"openai, .*; laion2b_s32b_b82k: mean \(0.5, 0.5, 0.5\).*open_clip's default"):
        default = HookedCLIP.from_pretrained("ViT-L-14", path, config_overrides=big)
    assert tuple(default.preprocess.transforms[-1].mean) == OPENAI_MEAN
    tagged = HookedCLIP.from_pretrained("ViT-L-14", path, config_overrides=big, tag="laion2b_s32b_b82k")
    expected = open_clip.pretrained.get_pretrained_cfg("ViT-L-14", "laion2b_s32b_b82k")
    assert tuple(tagged.preprocess.transforms[-1].mean) == tuple(expected["mean"]) == (0.5, 0.5, 0.5)
    torch.testing.assert_close(tagged.encode_image(random_images(tagged)), default.encode_image(random_images(tagged)))


def test_local_checkpoint_of_a_model_whose_tags_agree_gets_their_preprocessing():
    # every SigLIP tag normalises with 0.5 and squashes; open_clip's default for a file would not
    cfg = checkpoint_preprocess("ViT-B-16-SigLIP", "checkpoint x")
    assert cfg == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "squash"}


@pytest.fixture
def offline(monkeypatch):
    """The network as it is offline: no cached weights, connections refused, downloads would hang."""
    import huggingface_hub
    import open_clip.factory
    import open_clip.pretrained

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    def never(*args, **kwargs):
        raise AssertionError("a download was attempted (it would retry for most of a minute)")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    for module in (open_clip.factory, open_clip.pretrained):
        for attr in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
            monkeypatch.setattr(module, attr, never, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_a_tag_offline_fails_fast_with_the_hint(offline):
    start = time.perf_counter()
    with pytest.raises(ClipLensError) as info:
        HookedCLIP.from_pretrained(NAME, "laion2b_s34b_b79k", config_overrides=TINY)
    assert time.perf_counter() - start < 2
    message = _one_line(info.value)
    assert "huggingface.co is unreachable" in message and "HF_HUB_OFFLINE=1" in message
    assert "tag='laion2b_s34b_b79k'" in message


def test_a_tag_with_hf_hub_offline_set_fails_without_touching_the_network(offline, monkeypatch):
    def no_socket(*args, **kwargs):
        raise AssertionError("the network was tried although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipLensError, match="not in the local cache and HF_HUB_OFFLINE is set"):
        HookedCLIP.from_pretrained(NAME, "laion2b_s34b_b79k", config_overrides=TINY)


# --- class 8: TransformerLens idioms ------------------------------------------------------------


def test_logit_attrs_takes_transformer_lens_tokens(toy):
    images = random_images(toy, 2)
    texts = ["a red circle", "a green square"]
    _, cache = toy.run_with_cache(images)
    stack = cache.decompose_resid(pos_slice="pooled")
    attrs = cache.logit_attrs(stack, tokens=toy.to_tokens(texts), pos_slice="pooled")
    text_features = toy.encode_text(texts, normalize=True)
    bias = (toy.visual.ln_post.bias @ toy.visual.proj) @ text_features.T
    expected = (toy.encode_image(images) * text_features).sum(-1) - bias  # one text per image
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=1e-4)
    diff = cache.logit_attrs(stack, tokens=texts, incorrect_tokens=texts[::-1], pos_slice="pooled")
    torch.testing.assert_close(diff, attrs - cache.logit_attrs(stack, texts=texts[::-1], pos_slice="pooled"))
    with pytest.raises(InputError, match="not both"):
        cache.logit_attrs(stack, texts, tokens=texts, pos_slice="pooled")
    with pytest.raises(InputError, match="pass images="):
        cache.text.logit_attrs(stack, tokens=texts)


def test_svd_interpreter_reads_the_ov_circuit_into_the_embedding_space(toy):
    from transformer_lens import SVDInterpreter

    layer, head, k = 2, 1, 4
    vectors = SVDInterpreter(toy).get_singular_vectors("OV", layer, num_vectors=k, head_index=head)
    assert vectors.shape == (toy.cfg.d_embed, 1, k)
    ov = (toy.blocks[layer].attn.W_V[head] @ toy.blocks[layer].attn.W_O[head]).double()
    right = torch.linalg.svd(ov).Vh[:k]  # rows: right singular vectors in the residual stream
    expected = toy.visual.proj.double().T @ right.T  # [E, k], each up to its sign
    cosines = torch.nn.functional.cosine_similarity(vectors[:, 0].double(), expected, dim=0)
    torch.testing.assert_close(cosines.abs(), torch.ones(k, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
@torch.no_grad()
def test_all_composition_scores_equal_a_direct_computation(toy, mode):
    scores = toy.all_composition_scores(mode)
    n_layers, n_heads = toy.cfg.n_layers, toy.cfg.n_heads
    assert scores.shape == (n_layers, n_heads, n_layers, n_heads)
    attn = [block.attn for block in toy.blocks]
    for l1 in range(n_layers):
        for h1 in range(n_heads):
            ov = (attn[l1].W_V[h1] @ attn[l1].W_O[h1]).double()
            for l2 in range(n_layers):
                for h2 in range(n_heads):
                    qk = (attn[l2].W_Q[h2] @ attn[l2].W_K[h2].T).double()
                    read = {"Q": qk, "K": qk.T, "V": (attn[l2].W_V[h2] @ attn[l2].W_O[h2]).double()}[mode]
                    expected = (ov @ read).norm() / (ov.norm() * read.norm()) if l1 < l2 else torch.tensor(0.0)
                    assert abs(float(scores[l1, h1, l2, h2]) - float(expected)) < 1e-5, (l1, h1, l2, h2)
    assert float(scores[0, 0, 1, 0]) > 0


def test_weight_analyses_on_a_convolutional_tower_say_why_not():
    from transformer_lens import SVDInterpreter

    model = HookedCLIP.from_pretrained("toy-shapes-rn")
    with pytest.raises(UnsupportedArchitectureError, match="resnet image tower .* has none"):
        model.all_composition_scores("Q")
    with pytest.raises(UnsupportedArchitectureError, match="SVDInterpreter"):
        SVDInterpreter(model)
    with pytest.raises(InputError, match="mode must be 'Q', 'K' or 'V'"):
        HookedCLIP.from_pretrained("toy-shapes").all_composition_scores("O")
