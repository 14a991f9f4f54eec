"""SAELens' folder format: round trips, SAELens-written fixtures, and every way a folder can be wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clip_lens.errors import CheckpointNotFoundError, CorruptCheckpointError, InputError
from clip_lens.sae import SAE, SAEConfig, load_config, load_sae, load_sparsity

from tests.unit.test_sae_model import random_sae

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "saelens"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def saved(tmp_path) -> Path:
    """A standard SAE saved by clip_lens."""
    sae = random_sae()
    return sae.save(tmp_path / "sae")


# --- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_save_load_round_trip_is_exact(tmp_path, architecture):
    sae = random_sae(architecture, metadata={"context_size": 17, "dataset_path": "shapes", "my_key": {"a": 1}},
                     model_name="toy-shapes", normalize_activations="layer_norm")
    folder = sae.save(tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # no temp files
    loaded = SAE.load(folder)
    assert loaded.cfg.to_dict() == json.loads((folder / "cfg.json").read_text())
    assert loaded.cfg.metadata["my_key"] == {"a": 1} and loaded.cfg.model_name == "toy-shapes"
    for name, param in sae.named_parameters():
        assert torch.equal(param, getattr(loaded, name)), name
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(sae(x), loaded(x))


def test_files_are_saelens_layout_with_the_weights_checksum(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and "hook_name" not in cfg
    assert len(cfg["metadata"]["clip_lens_weights_sha256"]) == 64
    tensors = load_file(str(saved / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (8, 16), "b_enc": (16,), "W_dec": (16, 8), "b_dec": (8,)}


def test_sparsity_round_trip_and_a_stale_sparsity_file_is_removed(tmp_path):
    sae = random_sae()
    log_sparsity = torch.linspace(-4, -0.5, 16)
    folder = sae.save(tmp_path / "sae", log_feature_sparsity=log_sparsity)
    assert torch.equal(load_sparsity(folder), log_sparsity)
    assert list(load_file(str(folder / "sparsity.safetensors"))) == ["sparsity"]
    sae.save(folder)
    assert load_sparsity(folder) is None
    with pytest.raises(InputError, match=r"\[d_sae\] = \[16\]"):
        sae.save(folder, log_feature_sparsity=torch.zeros(3))


def test_load_onto_a_device_and_from_a_file_inside_the_folder(saved):
    sae = load_sae(saved / "cfg.json", device="cpu")
    assert sae.cfg.device == "cpu" and sae.device.type == "cpu"
    assert load_config(saved).d_sae == 16


# --- SAELens-written fixtures -----------------------------------------------------------------
@pytest.mark.parametrize("name, architecture, k", [
    ("standard_v6", "standard", None), ("topk_v6", "topk", 3), ("jumprelu_v6", "jumprelu", None),
    ("standard_v5", "standard", None), ("topk_v5", "topk", 3),
])
def test_saelens_fixtures_load_and_give_the_expected_activations(name, architecture, k):
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    sae = SAE.load(FIXTURES / name)
    assert (sae.cfg.architecture, sae.cfg.k) == (architecture, k)
    assert (sae.cfg.hook_name, sae.cfg.model_name) == ("blocks.1.hook_resid_post", "toy-shapes")
    assert sae.cfg.apply_b_dec_to_input is (name != "jumprelu_v6")
    with torch.no_grad():
        acts = sae.encode(expected["x"])
        torch.testing.assert_close(acts, expected[f"{name}.acts"], rtol=0, atol=1e-5)
        torch.testing.assert_close(sae(expected["x"]), expected[f"{name}.recons"], rtol=0, atol=1e-5)
    assert (acts > 0).any() and (acts == 0).any()


def test_saelens_metadata_survives_a_round_trip(tmp_path):
    source = json.loads((FIXTURES / "standard_v6" / "cfg.json").read_text())
    folder = SAE.load(FIXTURES / "standard_v6").save(tmp_path / "copy")
    written = json.loads((folder / "cfg.json").read_text())
    written["metadata"].pop("clip_lens_weights_sha256")
    assert written == source
    assert load_sparsity(FIXTURES / "standard_v6").shape == (16,)


# --- damaged, missing and foreign files -------------------------------------------------------
def test_missing_folder_and_files_are_named(tmp_path, saved):
    with pytest.raises(CheckpointNotFoundError, match="SAE folder not found"):
        SAE.load(tmp_path / "nowhere")
    (saved / "sae_weights.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="sae_weights.safetensors is missing"):
        SAE.load(saved)
    (saved / "cfg.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="cfg.json is missing"):
        SAE.load(saved)
    model_file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(model_file))
    with pytest.raises(CheckpointNotFoundError, match="is a file.*pass that folder"):
        SAE.load(model_file)


def test_config_that_is_not_json_or_not_an_sae_is_refused(saved):
    (saved / "cfg.json").write_text('{"d_in": 8, "d_sae": ')
    with pytest.raises(InputError, match="not valid JSON.*line 1"):
        SAE.load(saved)
    (saved / "cfg.json").write_text('[1, 2]')
    with pytest.raises(InputError, match="JSON object"):
        SAE.load(saved)
    (saved / "cfg.json").write_text('{"d_sae": 16, "architecture": "standard"}')
    with pytest.raises(InputError, match="cfg.json.*lacks d_in"):
        SAE.load(saved)
    (saved / "cfg.json").write_text('{"d_in": 8, "d_sae": 16, "architecture": "temporal"}')
    with pytest.raises(InputError, match="temporal"):
        SAE.load(saved)


def test_foreign_safetensors_is_not_taken_for_an_sae(tmp_path):
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(SAEConfig(d_in=8, d_sae=16).to_dict()))
    save_file({"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "logit_scale": torch.zeros(())},
              str(folder / "sae_weights.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"lacks W_enc, b_enc, W_dec, b_dec.*visual.conv1.weight"):
        SAE.load(folder)
    extra = {**random_sae().state_dict_for_saving(), "extra": torch.zeros(1)}
    save_file(extra, str(folder / "sae_weights.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="does not have: extra"):
        SAE.load(folder)


def test_weights_of_another_shape_or_with_nan_are_refused(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["metadata"].pop("clip_lens_weights_sha256")
    (saved / "cfg.json").write_text(json.dumps(cfg))
    weights = load_file(str(saved / "sae_weights.safetensors"))
    save_file({**weights, "W_enc": torch.zeros(8, 32)}, str(saved / "sae_weights.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"W_enc has shape \(8, 32\).*needs \(8, 16\)"):
        SAE.load(saved)
    bad = weights["b_dec"].clone()
    bad[2] = float("inf")
    save_file({**weights, "b_dec": bad}, str(saved / "sae_weights.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="b_dec contains NaN or inf"):
        SAE.load(saved)


def test_flipped_bytes_fail_the_checksum(saved):
    path = saved / "sae_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's data: still a valid file, different numbers
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="sha256 does not match"):
        SAE.load(saved)


def test_truncated_or_pickled_weights_are_refused_without_unpickling(saved, tmp_path):
    path = saved / "sae_weights.safetensors"
    cfg = json.loads((saved / "cfg.json").read_text())
    cfg["metadata"].pop("clip_lens_weights_sha256")  # as a SAELens-written folder: no checksum
    (saved / "cfg.json").write_text(json.dumps(cfg))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="cannot read .* as safetensors"):
        SAE.load(saved)
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path.write_bytes(pickle.dumps({"W_enc": Trap()}))
    with pytest.raises(CorruptCheckpointError):
        SAE.load(saved)
    assert not marker.exists()


def test_saelens_legacy_tensors_are_converted(tmp_path):
    sae = random_sae("jumprelu")
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(sae.cfg.to_dict()))
    weights = sae.state_dict_for_saving()
    threshold = weights.pop("threshold") + 0.01
    save_file({**weights, "log_threshold": threshold.log(), "scaling_factor": torch.ones(16)},
              str(folder / "sae_weights.safetensors"))
    torch.testing.assert_close(SAE.load(folder).threshold.detach(), threshold)
    save_file({**weights, "log_threshold": threshold.log(), "scaling_factor": torch.full((16,), 2.0)},
              str(folder / "sae_weights.safetensors"))
    with pytest.raises(InputError, match="scaling_factor"):
        SAE.load(folder)


def test_saving_nan_weights_or_into_a_file_is_refused(tmp_path):
    sae = random_sae()
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(InputError, match="W_dec"):
        sae.save(tmp_path / "sae")
    assert not (tmp_path / "sae" / "cfg.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        random_sae().save(tmp_path / "file")
