"""Regression tests for issue 17 (loading and library input checks), one per red-team finding.

Checkpoints are written into ``tmp_path`` from a tiny seeded open_clip model or from the bundled
toy-shapes state dict; nothing is downloaded. Malicious pickles carry a payload that would delete
a marker file (a blocked module) or write one (an unknown global): the tests check both that the
refusal names what the pickle would import and that the payload never ran.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clip_lens import CorruptCheckpointError, HookedCLIP, InputError, StateDictMismatchError
from clip_lens.decompose import _layers
from clip_lens.errors import IndexOutOfRangeError
from clip_lens.loading import checkpoint_format, load_bundled, load_state_dict_strict, pickle_globals, read_state_dict
from tests.helpers import build_open_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "ViT-B-32"
TINY = {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 64, "head_width": 16}, "text_cfg": {"layers": 1, "width": 64, "heads": 4}}
TORCH_ADVICE = ("weights_only=False", "`weights_only` set to `False`", "add_safe_globals", "safe_globals(")


def _images(batch: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def source():
    return build_open_clip(NAME, TINY, seed=7)


@pytest.fixture(scope="module")
def source_state(source):
    return {k: v.detach().contiguous().clone() for k, v in source.state_dict().items()}


@pytest.fixture(scope="module")
def source_embedding(source):
    with torch.no_grad():
        return source.encode_image(_images())


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture
def no_build(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("open_clip.create_model was called; the error should come before building")

    monkeypatch.setattr(open_clip, "create_model", refuse)


# --- non-float checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.uint8, torch.int64])
def test_non_float_tensor_in_checkpoint_is_refused_naming_tensor_and_dtype(tmp_path, source_state, dtype):
    state = dict(source_state)
    state["visual.conv1.weight"] = (state["visual.conv1.weight"] * 100).to(dtype)
    path = tmp_path / "quantised.safetensors"
    save_file(state, str(path))
    with pytest.raises(StateDictMismatchError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    message = str(info.value)
    assert f"visual.conv1.weight ({dtype}; expected floating point, the model's is torch.float32)" in message
    assert info.value.mismatched == [f"visual.conv1.weight ({dtype}; expected floating point, the model's is torch.float32)"]
    assert "dequantise" in message


def test_int8_copy_of_the_bundled_model_is_refused_instead_of_loading_as_floats(tmp_path):
    """The red-team case: every tensor int8 (outputs were off by 3.5e4 after a silent cast)."""
    from open_clip.model import CLIP
    import json
    from importlib import resources

    from clip_lens.loading import bundled_models

    bundled = load_bundled("toy-shapes").model
    path = tmp_path / "toy-int8.safetensors"
    save_file({k: v.detach().to(torch.int8).contiguous() for k, v in bundled.state_dict().items()}, str(path))
    meta = json.loads(resources.files("clip_lens").joinpath(bundled_models()["toy-shapes"]["config"]).read_text())
    target = CLIP(**meta["model_cfg"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateDictMismatchError, match=r"torch\.int8; expected floating point") as info:
        load_state_dict_strict(target, read_state_dict(path), source=f"checkpoint {path}")
    assert len(info.value.mismatched) == len(before)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing was copied


def test_half_precision_checkpoint_still_loads(tmp_path, source_state, source_embedding):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in source_state.items()}, str(path))
    model = HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(_images()), source_embedding, atol=5e-2, rtol=0)


# --- pickle refusals --------------------------------------------------------------------------------


def write_marker(path: str) -> None:
    """What a malicious checkpoint would run when unpickled (a global torch does not know)."""
    Path(path).write_text("code from the checkpoint ran")


class WritesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return write_marker, (self.marker,)


class RemovesFile:
    """A payload from a module torch blocks outright (``os``/``posix``)."""

    def __init__(self, victim: Path):
        self.victim = str(victim)

    def __reduce__(self):
        return os.remove, (self.victim,)


def _assert_refusal(message: str, global_name: str) -> None:
    assert global_name in message
    assert "safetensors" in message
    for advice in TORCH_ADVICE:
        assert advice not in message, advice


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_with_unknown_global_is_refused_naming_it(tmp_path, source_state, legacy):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_state, "hook": WritesMarker(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CorruptCheckpointError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    _assert_refusal(str(info.value), f"{__name__}.write_marker")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_with_blocked_module_is_refused_naming_the_global(tmp_path, protocol):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    path = tmp_path / "evil.bin"
    if protocol == 2:
        torch.save({"w": torch.zeros(2), "x": RemovesFile(victim)}, path)
    else:  # a plain pickle (STACK_GLOBAL opcodes); torch's refusal names nothing for it
        path.write_bytes(pickle.dumps({"x": RemovesFile(victim)}, protocol=4))
    with pytest.raises(CorruptCheckpointError) as info:
        read_state_dict(path)
    _assert_refusal(str(info.value), f"{os.remove.__module__}.remove")
    assert victim.read_text() == "still here"


def test_refusal_names_the_global_when_torch_message_names_none(tmp_path, source_state, monkeypatch):
    """torch 2.14 can answer with only its advice to use weights_only=False: the global then
    comes from reading the pickle's opcodes."""
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_state, "hook": WritesMarker(marker)}, path)

    def advice_only(*args, **kwargs):
        raise pickle.UnpicklingError(
            "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
            "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` "
            "will likely succeed, but it can result in arbitrary code execution.\n\n"
            "Check the documentation of torch.load to learn more about types accepted by default with weights_only."
        )

    monkeypatch.setattr(torch, "load", advice_only)
    with pytest.raises(CorruptCheckpointError) as info:
        read_state_dict(path)
    _assert_refusal(str(info.value), f"{__name__}.write_marker")
    assert not marker.exists()


def test_pickle_globals_reads_opcodes_without_running_them(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    for protocol in (0, 2, 4, 5):
        data = pickle.dumps([RemovesFile(victim), RemovesFile(victim), io.BytesIO], protocol=protocol)
        found = pickle_globals(data)
        assert f"{os.remove.__module__}.remove" in found and "_io.BytesIO" in found, (protocol, found)
    assert pickle_globals(b"not a pickle at all") == []
    assert victim.read_text() == "still here"


# --- formats by content -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, filename",
    [
        ("safetensors", "weights"),  # the red-team case: "corrupt (KeyError: 15)"
        ("safetensors", "model.pt"),
        ("zip", "model.safetensors"),
        ("zip", "checkpoint"),
        ("legacy", "old_checkpoint"),
    ],
)
def test_checkpoint_format_comes_from_content_not_suffix(tmp_path, source_state, source_embedding, kind, filename):
    path = tmp_path / filename
    if kind == "safetensors":
        save_file(source_state, str(path))
    else:
        torch.save(source_state, path, _use_new_zipfile_serialization=kind == "zip")
    assert checkpoint_format(path) == {"safetensors": "safetensors", "zip": "torch-zip", "legacy": "torch-legacy"}[kind]
    model = HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(_images()), source_embedding, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "filename, content, expected",
    [
        ("notes", b"these are not weights\n", "unknown file format"),
        ("image.safetensors", b"\x89PNG\r\n\x1a\n" + bytes(100), "unknown file format"),
        ("weights", b"", "empty"),
        ("cut.safetensors", (10_000).to_bytes(8, "little") + b'{"w": {"dtype": "F32"', "truncated"),
    ],
)
def test_unreadable_file_gets_a_clear_format_error(no_build, tmp_path, filename, content, expected):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as info:
        HookedCLIP.from_pretrained(NAME, path, config_overrides=TINY)
    message = str(info.value)
    assert str(path) in message and expected in message
    assert "KeyError" not in message
    if expected == "unknown file format":
        assert "safetensors" in message and "zip" in message and "legacy" in message


# --- config overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"vision_cfg": {"layers": -1}}, "vision_cfg.layers must be a positive integer, got -1"),
        ({"vision_cfg": {"layers": 0}}, "vision_cfg.layers must be a positive integer, got 0"),
        ({"text_cfg": {"layers": True}}, "text_cfg.layers must be an integer, got the bool True"),
        ({"text_cfg": {"heads": 2.5}}, "text_cfg.heads must be an integer, got 2.5"),
        ({"vision_cfg": {"width": "64"}}, "vision_cfg.width must be an integer"),
        ({"vision_cfg": {"image_size": [64, 0]}}, "vision_cfg.image_size[1] must be a positive integer"),
        ({"embed_dim": -3}, "embed_dim must be a positive integer, got -3"),
        ({"vision_cfg": {"width": 100, "head_width": 64}}, "vision_cfg.width=100 is not a multiple of vision_cfg.head_width=64"),
        ({"vision_cfg": {"no_ln_pre": "yes"}}, "vision_cfg.no_ln_pre must be True or False"),
        ({"text_cfg": {"mlp_ratio": -4}}, "text_cfg.mlp_ratio must be a positive number"),
    ],
)
def test_invalid_override_values_raise_input_error_before_building(no_build, overrides, named):
    with pytest.raises(InputError) as info:
        HookedCLIP.from_pretrained(NAME, None, config_overrides=overrides)
    assert "Invalid config_overrides for ViT-B-32" in str(info.value)
    assert named in str(info.value)


def test_numpy_integer_overrides_are_accepted():
    overrides = {
        "embed_dim": np.int64(32),
        "vision_cfg": {"layers": np.int32(1), "width": np.int64(64), "head_width": 16},
        "text_cfg": {"layers": np.int64(1), "width": 64, "heads": np.int16(4)},
    }
    model = HookedCLIP.from_pretrained(NAME, None, config_overrides=overrides)
    assert model.cfg.n_layers == 1 and model.text.cfg.n_heads == 4 and model.cfg.d_embed == 32


# --- decompose(heads=..., tokens=...) --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        (np.int64(2), [2]),
        (2, [2]),
        (-1, [3]),
        (torch.tensor(1), [1]),
        ([np.int64(3), 1], [1, 3]),
        ((0, np.uint8(2)), [0, 2]),
        (range(2), [0, 1]),
        (torch.tensor([3, 0]), [0, 3]),
        (np.array([1, 1, 2]), [1, 2]),
        ([], []),
    ],
)
def test_layer_specs_accept_python_and_numpy_integers(spec, expected):
    assert _layers(spec, 4, "heads") == expected


@pytest.mark.parametrize(
    "spec, named",
    [
        (3.5, "heads must be 'all', None or a list of layer indices (or one index), got 3.5 (float)"),
        (2.0, "int(2.0) if you mean layer 2"),
        ([1.7], "heads[0] must be an integer, got 1.7 (float)"),
        ([None], "heads[0] must be an integer, got None"),
        ([1, True], "heads[1] must be an integer, got the bool True"),
        (True, "heads must be 'all', None or a list of layer indices"),
        (np.float64(1.0), "heads must be 'all', None or a list of layer indices"),
        (torch.tensor([1.0, 2.0]), "dtype torch.float32"),
        (np.array([[0, 1]]), "shape (1, 2)"),
        ("some", "got 'some'"),
        ({1: 2}, "got dict"),
    ],
)
def test_layer_specs_refuse_floats_bools_and_none_naming_the_argument(spec, named):
    with pytest.raises(InputError) as info:
        _layers(spec, 4, "heads")
    assert named in str(info.value)


def test_decompose_accepts_numpy_head_layers_and_refuses_float_ones(toy):
    images = _images(1, toy.cfg.image_size[0])
    by_numpy = toy.decompose(images, heads=np.int64(2), tokens=[np.int32(1)])
    by_int = toy.decompose(images, heads=[2], tokens=[1])
    assert by_numpy.head_layers == by_int.head_layers == [1, 2] and by_numpy.token_layers == [1]
    torch.testing.assert_close(by_numpy.heads, by_int.heads, atol=0, rtol=0)
    for bad, argument in ((dict(heads=3.5), "heads"), (dict(heads=[1.7]), "heads[0]"), (dict(tokens=[None]), "tokens[0]")):
        with pytest.raises(InputError, match=argument.replace("[", r"\[")):
            toy.decompose(images, **bad)


def test_layer_range_accepts_numpy_integers_and_refuses_floats(toy):
    images = _images(1, toy.cfg.image_size[0])
    with torch.no_grad():
        expected = toy(images, stop_at_layer=2)
        torch.testing.assert_close(toy(images, stop_at_layer=np.int64(2)), expected, atol=0, rtol=0)
    with pytest.raises(IndexOutOfRangeError, match="stop_at_layer must be an integer, got 2.0"):
        toy(images, stop_at_layer=2.0)


# --- devices ------------------------------------------------------------------------------------


def test_meta_images_tokens_and_directions_raise_input_error(toy):
    size = toy.cfg.image_size[0]
    meta_images = torch.empty(1, 3, size, size, device="meta")
    for run in (lambda: toy.encode_image(meta_images), lambda: toy.decompose(meta_images), lambda: toy(meta_images)):
        with pytest.raises(InputError, match="got images on the meta device"):
            run()
    tokens = toy.to_tokens(["red circle"])
    with pytest.raises(InputError, match="got tokens on the meta device"):
        toy.encode_text(tokens.to("meta"))
    directions = torch.empty(2, toy.cfg.d_embed, device="meta")
    with pytest.raises(InputError, match="got directions on the meta device"):
        toy.decompose(_images(1, size), directions=directions)
    with pytest.raises(InputError, match="meta device"):
        toy(torch.empty(1, toy.cfg.n_ctx, toy.cfg.d_model, device="meta"), start_at_layer=1)


def test_model_on_meta_device_raises_input_error(toy):
    meta_model = copy.deepcopy(toy).to("meta")
    with pytest.raises(InputError, match="model's weights are on the meta device"):
        meta_model.encode_image(_images(1, toy.cfg.image_size[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second real device")
def test_images_on_another_device_are_moved_to_the_models(toy):
    images = _images(1, toy.cfg.image_size[0])
    with torch.no_grad():
        torch.testing.assert_close(toy.encode_image(images.cuda()), toy.encode_image(images), atol=0, rtol=0)
