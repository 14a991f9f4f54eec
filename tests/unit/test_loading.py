"""Loading models by name and from local checkpoints, and every way that can go wrong.

All offline: random-init models and checkpoint files written into ``tmp_path``. Nothing here may
reach a model hub; the download entry points are patched to fail where a test could reach them.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import pytest
import torch

import clip_lens
from clip_lens import (
    CheckpointNotFoundError,
    ClipLensError,
    CorruptCheckpointError,
    HookedCLIP,
    InputError,
    ModelNotFoundError,
    StateDictMismatchError,
    UnsupportedArchitectureError,
)
from clip_lens.errors import close_matches
from clip_lens.loading import read_state_dict
from tests.helpers import build_open_clip

NAME = "ViT-B-32"
TINY = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 64, "head_width": 16}, "text_cfg": {"layers": 1, "width": 64, "heads": 4}}
TINY_2_LAYERS = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 2}, "text_cfg": {**TINY["text_cfg"], "layers": 2}}
TINY_NARROW = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 32}}


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def source():
    """A seeded tiny open_clip model whose weights the checkpoint tests write and reload."""
    return build_open_clip(NAME, TINY, seed=123)


@pytest.fixture(scope="module")
def source_embedding(source):
    with torch.no_grad():
        return source.encode_image(_images())


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything tries to build an open_clip model."""

    def refuse(*args, **kwargs):
        raise AssertionError("open_clip.create_model was called; the error should come before building")

    monkeypatch.setattr(open_clip, "create_model", refuse)


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if anything tries to download weights."""
    import open_clip.factory
    import open_clip.pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for module in (open_clip.factory, open_clip.pretrained):
        for attr in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, refuse)


# --- building by name -------------------------------------------------------------------------


def test_random_init_by_name_applies_config_overrides():
    model = HookedCLIP.from_pretrained(NAME, None, config_overrides=TINY)
    assert isinstance(model, HookedCLIP)
    assert model.cfg.n_layers == 1 and model.text.cfg.n_layers == 1
    assert model.cfg.d_model == 64 and model.cfg.n_heads == 4
    assert model.text.cfg.d_model == 64 and model.text.cfg.n_heads == 4
    assert model.model_name == NAME and model.pretrained is None
    assert model.encode_image(_images()).shape == (2, 32)


def test_overrides_merge_into_nested_config_without_dropping_other_fields():
    config = clip_lens.loading.model_config(NAME, {"vision_cfg": {"layers": 1}})
    assert config["vision_cfg"]["layers"] == 1
    assert config["vision_cfg"]["patch_size"] == 32  # untouched field of the same sub-config survives
    assert config["text_cfg"]["layers"] == 12


@pytest.mark.parametrize(
    "overrides, named, suggestion",
    [
        ({"vision_cfg": {"nonsense": 1}}, "vision_cfg.nonsense", None),
        ({"text_cfg": {"layerz": 1}}, "text_cfg.layerz", "layers"),
        ({"embed_dimm": 32}, "embed_dimm", "embed_dim"),
    ],
)
def test_invalid_override_key_raises_input_error_naming_it(no_build, overrides, named, suggestion):
    with pytest.raises(InputError) as info:
        HookedCLIP.from_pretrained(NAME, None, config_overrides=overrides)
    assert isinstance(info.value, ValueError)
    assert named in str(info.value)
    if suggestion:
        assert f"Did you mean: {suggestion}" in str(info.value)


@pytest.mark.parametrize("overrides", [{"vision_cfg": 3}, [("vision_cfg", {})]])
def test_malformed_overrides_raise_input_error(no_build, overrides):
    with pytest.raises(InputError, match="config_overrides"):
        HookedCLIP.from_pretrained(NAME, None, config_overrides=overrides)


def test_override_value_of_wrong_type_raises_input_error():
    with pytest.raises(InputError, match="Invalid config_overrides"):
        HookedCLIP.from_pretrained(NAME, None, config_overrides={"vision_cfg": {"layers": 1, "image_size": "big"}})


def test_non_string_model_name_and_pretrained_raise_input_error(no_build):
    with pytest.raises(InputError, match="model_name"):
        HookedCLIP.from_pretrained(32, None)
    with pytest.raises(InputError, match="pretrained"):
        HookedCLIP.from_pretrained(NAME, {"visual.conv1.weight": torch.zeros(1)}, config_overrides=TINY)


# --- local checkpoints --------------------------------------------------------------------------


def _write(kind: str, state_dict: dict, path: Path) -> Path:
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in state_dict.items()}, str(path))
    elif kind == "training":  # open_clip's training loop: DDP-prefixed keys plus bookkeeping
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state_dict.items()}}, path)
    else:
        torch.save(state_dict, path)
    return path


@pytest.mark.parametrize(
    "kind, filename",
    [
        ("safetensors", "model.safetensors"),
        ("torch", "model.pt"),
        ("torch", "pytorch_model.bin"),
        ("torch", "model.pth"),
        ("training", "epoch_3.pt"),
    ],
)
def test_local_checkpoint_reproduces_the_source_model(tmp_path, source, source_embedding, kind, filename):
    path = _write(kind, source.state_dict(), tmp_path / filename)
    torch.manual_seed(999)  # the random init it replaces differs from the source
    model = HookedCLIP.from_pretrained(NAME, str(path), config_overrides=TINY)
    assert model.pretrained == str(path)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(_images()), source_embedding, atol=1e-6, rtol=0)
    assert torch.equal(model.logit_scale.detach(), source.logit_scale.detach())


def test_checkpoint_accepts_pathlib_path_and_bare_relative_name(tmp_path, monkeypatch, source, source_embedding):
    path = _write("torch", source.state_dict(), tmp_path / "weights.pt")
    model = HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(_images()), source_embedding, atol=1e-6, rtol=0)
    monkeypatch.chdir(tmp_path)
    model = HookedCLIP.from_pretrained(NAME, "weights.pt", config_overrides=TINY)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(_images()), source_embedding, atol=1e-6, rtol=0)


def test_random_init_differs_from_source(source_embedding):
    """Guards the checkpoint tests: without the weights, outputs would not match."""
    torch.manual_seed(999)
    model = HookedCLIP.from_pretrained(NAME, None, config_overrides=TINY)
    with torch.no_grad():
        assert (model.encode_image(_images()) - source_embedding).abs().max() > 1e-3


def test_loading_does_not_modify_the_callers_state_dict(source):
    state_dict = dict(source.state_dict())
    state_dict["logit_scale"] = state_dict["logit_scale"].reshape(1)  # reshaped to a scalar on load
    target = build_open_clip(NAME, TINY, seed=1)
    clip_lens.loading.load_state_dict_strict(target, state_dict)
    assert state_dict["logit_scale"].shape == (1,)
    assert torch.equal(target.logit_scale, source.logit_scale)


# --- checkpoint errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nonexistent/x.safetensors", "/nonexistent/x.pt", "missing_file.bin"])
def test_missing_checkpoint_raises_checkpoint_not_found(no_build, path):
    with pytest.raises(CheckpointNotFoundError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    assert isinstance(info.value, FileNotFoundError)
    assert path in str(info.value)


def test_directory_as_checkpoint_raises_checkpoint_not_found(no_build, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="directory"):
        HookedCLIP.from_pretrained(NAME, tmp_path, config_overrides=TINY)


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _truncated_pt(path: Path) -> None:
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "filename, make",
    [
        ("random.safetensors", _random_bytes),
        ("empty.safetensors", lambda p: p.write_bytes(b"")),
        ("truncated.pt", _truncated_pt),
        ("notes.bin", lambda p: p.write_text("these are not weights\n")),
        ("empty.pt", lambda p: p.write_bytes(b"")),
        ("random.pth", _random_bytes),
    ],
)
def test_corrupt_checkpoint_raises_corrupt_checkpoint_error(no_build, tmp_path, filename, make):
    path = tmp_path / filename
    make(path)
    with pytest.raises(CorruptCheckpointError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


def make_marker(path: str) -> None:
    """What a malicious checkpoint would run when unpickled."""
    Path(path).write_text("code from the checkpoint ran")


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return make_marker, (self.marker,)


def test_pickled_code_is_refused_and_never_runs(tmp_path, source):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source.state_dict(), "opt": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CorruptCheckpointError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    assert not marker.exists()
    message = str(info.value)
    assert "make_marker" in message and "weights_only" in message
    assert "\x1b[" not in message  # torch's terminal colour codes are stripped
    # The payload is real: unpickling without weights_only would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_non_tensor_entries_are_named(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"visual.proj": torch.zeros(2, 2), "step": 7}, path)
    with pytest.raises(CorruptCheckpointError, match=r"step \(int\)"):
        read_state_dict(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CorruptCheckpointError, match="got list"):
        read_state_dict(path)


def test_training_checkpoint_is_unwrapped_and_unprefixed(tmp_path, source):
    path = _write("training", source.state_dict(), tmp_path / "epoch_1.pt")
    state_dict = read_state_dict(path)
    assert set(state_dict) == set(source.state_dict())


def test_checkpoint_with_fewer_layers_lists_missing_keys(tmp_path, source):
    path = _write("safetensors", source.state_dict(), tmp_path / "one_layer.safetensors")
    with pytest.raises(StateDictMismatchError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY_2_LAYERS)
    err = info.value
    assert isinstance(err, ValueError)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in err.missing
    assert "transformer.resblocks.1.mlp.c_fc.weight" in err.missing
    assert all(".resblocks.1." in key for key in err.missing)
    assert err.unexpected == [] and err.mismatched == []
    assert "missing keys" in str(err) and "resblocks.1" in str(err)


def test_checkpoint_with_more_layers_lists_unexpected_keys(tmp_path):
    path = _write("torch", build_open_clip(NAME, TINY_2_LAYERS).state_dict(), tmp_path / "two_layers.pt")
    with pytest.raises(StateDictMismatchError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    assert "visual.transformer.resblocks.1.ln_1.weight" in info.value.unexpected
    assert info.value.missing == [] and info.value.mismatched == []


def test_checkpoint_of_other_width_names_mismatched_shapes(tmp_path, source):
    path = _write("torch", source.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(StateDictMismatchError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY_NARROW)
    err = info.value
    assert "visual.conv1.weight (64, 3, 32, 32) vs model (32, 3, 32, 32)" in err.mismatched
    assert all(key.startswith("visual.") for key in err.mismatched)
    assert "shape mismatches" in str(err) and "visual.conv1.weight" in str(err)


def test_extra_keys_are_listed_as_unexpected(tmp_path, source):
    state_dict = {**source.state_dict(), "extra.head.weight": torch.zeros(3)}
    path = _write("safetensors", state_dict, tmp_path / "extra.safetensors")
    with pytest.raises(StateDictMismatchError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    assert info.value.unexpected == ["extra.head.weight"]
    assert info.value.missing == [] and info.value.mismatched == []
    assert "extra.head.weight" in str(info.value)


def test_long_key_listings_are_truncated(tmp_path):
    path = tmp_path / "unrelated.pt"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(40)}, path)
    with pytest.raises(StateDictMismatchError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    assert len(info.value.unexpected) == 40
    assert "(30 more)" in str(info.value)


# --- unknown names and tags ----------------------------------------------------------------------


def test_unknown_model_name_suggests_close_names(no_build, no_download):
    with pytest.raises(ModelNotFoundError) as info:
        HookedCLIP.from_pretrained("ViT-B-322")
    assert isinstance(info.value, ValueError)
    assert "'ViT-B-322'" in str(info.value)
    assert "Did you mean: ViT-B-32" in str(info.value)


def test_hub_model_config_that_cannot_be_fetched_raises_model_not_found(no_build, monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", offline)
    with pytest.raises(ModelNotFoundError) as info:
        HookedCLIP.from_pretrained("hf-hub:someone/some-clip")
    assert "hf-hub:someone/some-clip" in str(info.value) and "network is unreachable" in str(info.value)


def test_local_dir_model_without_config_raises_checkpoint_not_found(no_build, no_download, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="open_clip_config.json"):
        HookedCLIP.from_pretrained(f"local-dir:{tmp_path}")


def test_unknown_pretrained_tag_suggests_close_tag_without_downloading(no_build, no_download):
    with pytest.raises(ModelNotFoundError) as info:
        HookedCLIP.from_pretrained(NAME, "laion2b_s34b_b79")
    message = str(info.value)
    assert "'laion2b_s34b_b79'" in message
    assert "Did you mean: laion2b_s34b_b79k" in message
    assert "openai" in message  # the full list of tags


def test_failed_download_of_known_tag_says_to_pass_a_local_path(monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", offline, raising=False)
    with pytest.raises(ClipLensError, match="local path"):
        HookedCLIP.from_pretrained(NAME, "laion2b_s34b_b79k", config_overrides=TINY)


@pytest.mark.parametrize("name, feature", [("swin_base_patch4_window7_224", "Swin"), ("vit_relpos_medium_patch16_cls_224", "relative position")])
def test_unsupported_architecture_raises_before_building(no_build, no_download, name, feature):
    with pytest.raises(UnsupportedArchitectureError) as info:
        HookedCLIP.from_pretrained(name)
    assert isinstance(info.value, NotImplementedError)
    assert feature in str(info.value) and name in str(info.value)


def test_list_models_holds_only_supported_architectures():
    names = clip_lens.list_models()
    assert NAME in names and "ViT-B-16" in names
    assert "RN50" in names and "convnext_base" in names and "MobileCLIP2-S2" in names  # convolutional towers
    assert "swin_base_patch4_window7_224" not in names
    for name in ("ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP-384", "EVA02-L-14", "PE-Core-B-16", "roberta-ViT-B-32"):
        assert name in names


# --- close_matches -------------------------------------------------------------------------------


def test_close_matches_suggests_similar_names():
    found = close_matches("ViT-B-322", ["RN50", "ViT-L-14", "ViT-B-32"])
    assert found.startswith(" Did you mean: ViT-B-32") and found.endswith("?")  # best match first
    assert "RN50" not in found
    suggestion = close_matches("blocks.0.attn.hook_patern", ["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_pre"])
    assert suggestion.startswith(" Did you mean: blocks.0.attn.hook_pattern")


def test_close_matches_is_empty_when_nothing_is_close():
    assert close_matches("zzzz", ["ViT-B-32", "RN50"]) == ""
    assert close_matches("anything", []) == ""


def test_close_matches_caps_the_number_of_suggestions():
    choices = [f"ViT-B-3{i}" for i in range(10)]
    found = close_matches("ViT-B-3", choices, n=3)
    assert found.count("ViT-B-3") == 3
    assert close_matches("ViT-B-3", iter(choices), n=1).count(",") == 0  # any iterable of choices


def test_bundled_architecture_loads_a_training_checkpoint(tmp_path):
    """`from_pretrained("toy-shapes", file)`: the bundled architecture and tokenizer with a run's weights."""
    from safetensors.torch import save_file

    from clip_lens import HookedCLIP
    from clip_lens.errors import InputError

    bundled = HookedCLIP.from_pretrained("toy-shapes")
    state = {k: (v * 0.5).contiguous() for k, v in clip_lens.loading.load_bundled("toy-shapes").model.state_dict().items()}
    save_file(state, str(tmp_path / "model-250.safetensors"))
    halved = HookedCLIP.from_pretrained("toy-shapes", tmp_path / "model-250.safetensors")
    assert halved.pretrained == str(tmp_path / "model-250.safetensors")
    for (name, mine), (_, theirs) in zip(halved.named_parameters(), bundled.named_parameters()):
        assert torch.equal(mine, 0.5 * theirs), name
    assert torch.equal(halved.to_tokens(["a red circle"]), bundled.to_tokens(["a red circle"]))
    with pytest.raises(InputError, match="local checkpoint of the same architecture"):
        HookedCLIP.from_pretrained("toy-shapes", "laion2b_s34b_b88k")
