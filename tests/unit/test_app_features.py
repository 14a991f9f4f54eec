"""The web app's Features tab (SAEs): feature lists, top store images and image features agree with the
library's own functions on the store; misfit SAEs and bad requests are refused with the reason."""

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from clip_lens import HookedCLIP
from clip_lens.app import Api, demo_workspace, make_server
from clip_lens.app.features import TOP_K, check_sae_fits
from clip_lens.errors import HookNameError, InputError
from clip_lens.sae import SAE, SAEConfig, save_sae
from clip_lens.sae.naming import image_feature_acts, name_features, top_activating
from clip_lens.toy.world import ShapesWorld
from tests.helpers import call, serving

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_SCENES, STORE_SEED, QUERY_SEED = 60, 2024, 1000
MAX_UPLOAD = 100_000


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def workspace(toy, tmp_path_factory):
    """The CLI's demo: store, head labels and the demo SAE (trained on the store's scenes)."""
    return demo_workspace(toy, tmp_path_factory.mktemp("features"), n_scenes=N_SCENES, seed=STORE_SEED, sae=True)


def random_sae(hook: str, d_in: int, d_sae: int = 16, seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook, model_name="toy-shapes", **cfg))


@pytest.fixture(scope="module")
def saes(workspace):
    return {
        "demo": workspace.saes["demo"],
        "mlp": random_sae("blocks.1.mlp.hook_post", 512),  # its directions do not reach the embedding: no names
        "pooled": random_sae("hook_pooled", 128),  # one row per image: no patch maps
    }


@pytest.fixture(scope="module")
def server(toy, workspace, saes):
    server = make_server(toy, workspace.store, workspace.labels, thumbnails=workspace.thumbnails, saes=saes,
                         max_upload_bytes=MAX_UPLOAD, max_images=4)
    with serving(server):
        yield server


@pytest.fixture(scope="module")
def direct(toy, workspace):
    """The library's own answers for the demo SAE over the store."""
    sae = workspace.saes["demo"]
    return top_activating(toy, sae, workspace.store, k=TOP_K), name_features(toy, sae, "shapes", top=5)


def ok(server, path, body=None):
    status, answer = call(server, path, body)
    assert status == 200, answer
    return answer


def decoded(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    image.load()
    return image


class TestFeatures:
    def test_info_lists_the_saes(self, server):
        saes = ok(server, "/api/info")["saes"]
        assert [s["name"] for s in saes] == ["demo", "mlp", "pooled"]
        assert saes[0]["hook_name"] == "blocks.3.hook_resid_post" and saes[0]["d_sae"] == 128
        assert not any(s["other_model"] for s in saes)

    def test_list_is_ranked_by_frequency_with_the_read_out_names(self, server, direct):
        top, names = direct
        answer = ok(server, "/api/sae_features", {"sae": "demo", "count": 128})
        features = answer["features"]
        assert len(features) == 128 and answer["n_images"] == N_SCENES and answer["order"] == "frequency"
        frequency = [f["frequency"] for f in features]
        assert frequency == sorted(frequency, reverse=True) and len(set(frequency)) > 5  # informative, not all 100%
        for f in features:
            assert f["frequency"] == pytest.approx(float(top.frequency[f["feature"]]))
            assert f["max"] == pytest.approx(float(top.values[f["feature"], 0]), rel=1e-5)
            assert f["name"] == names.name(f["feature"])
        assert answer["names"]["bank"] == "shapes" and answer["names"]["readout"] == "exact"
        assert ok(server, "/api/sae_status")["saes"]["demo"] == {"state": "ready", "done": N_SCENES, "total": N_SCENES}

    def test_other_orders_and_pages(self, server, direct):
        top, _ = direct
        rare = ok(server, "/api/sae_features", {"order": "rare", "count": 20})["features"]  # "sae": the first one
        fired = [f["frequency"] for f in rare if f["frequency"] > 0]
        assert fired == sorted(fired) and fired[0] == pytest.approx(float(top.frequency[top.frequency > 0].min()))
        strongest = ok(server, "/api/sae_features", {"order": "activation", "count": 5})["features"]
        assert [f["feature"] for f in strongest] == top.values[:, 0].argsort(descending=True)[:5].tolist()
        page = ok(server, "/api/sae_features", {"order": "index", "start": 120, "count": 50})
        assert [f["feature"] for f in page["features"]] == list(range(120, 128))

    def test_top_images_of_a_feature_agree_with_top_activating(self, server, direct):
        top, names = direct
        feature = int(top.frequency.argsort()[len(top.frequency) // 2])
        answer = ok(server, "/api/sae_feature", {"sae": "demo", "feature": feature, "k": 6})
        rows = [t["row"] for t in answer["top"]]
        assert rows == top.indices[feature, :6].tolist() and len(rows) == 6
        np.testing.assert_allclose([t["value"] for t in answer["top"]], top.values[feature, :6].numpy(), rtol=1e-5)
        np.testing.assert_allclose([t["map"] for t in answer["top"]], top.maps[feature, :6].numpy(), rtol=1e-5, atol=1e-6)
        assert answer["scale"] == pytest.approx(float(top.maps[feature, :6].max()), rel=1e-5)
        assert [(n["text"], pytest.approx(n["score"], abs=1e-6)) for n in answer["names"]] == names.top(feature)
        assert answer["maps_note"] is None and answer["frequency"] == pytest.approx(float(top.frequency[feature]))
        figure = decoded(answer["figure"])
        assert figure.width > 400 and figure.height > 150

    def test_text_search_ranks_features_by_cosine_with_the_text(self, server, toy, workspace):
        answer = ok(server, "/api/sae_features", {"sae": "demo", "text": "a red shape", "count": 10})
        assert answer["order"] == "text" and answer["text"] == "a red shape"
        cosine = name_features(toy, workspace.saes["demo"], ["a red shape"], top=1).scores[:, 0]
        assert [f["feature"] for f in answer["features"]] == cosine.argsort(descending=True)[:10].tolist()
        np.testing.assert_allclose([f["score"] for f in answer["features"]], cosine.sort(descending=True).values[:10],
                                   atol=1e-5)

    def test_image_features_agree_with_image_feature_acts(self, server, toy, workspace, direct):
        scene = ShapesWorld(seed=QUERY_SEED, image_size=64).scene(3).image
        answer = ok(server, "/api/sae_image", {"sae": "demo", "images": [{"scene": 3}, {"store_row": 2}], "k": 5})
        pixels = torch.stack([toy.preprocess(Image.fromarray(image)) for image in (scene, workspace.thumbnails([2])[0])])
        acts = image_feature_acts(toy, workspace.saes["demo"], pixels)
        assert len(answer["images"]) == 2
        for q, image in enumerate(answer["images"]):
            values, order = acts[q].topk(5)
            assert [f["feature"] for f in image["features"]] == order.tolist()
            np.testing.assert_allclose([f["value"] for f in image["features"]], values.numpy(), rtol=1e-5)
            assert all(np.asarray(f["map"]).shape == (8, 8) and f["name"] for f in image["features"])
        # a feature's map on a store image is the one the store-wide top images hold for that image
        top, _ = direct
        held = [(f, top.indices[f["feature"]].tolist().index(2)) for f in answer["images"][1]["features"]
                if 2 in top.indices[f["feature"]].tolist()]
        assert held
        for f, i in held:
            np.testing.assert_allclose(f["map"], top.maps[f["feature"], i].numpy(), rtol=1e-5, atol=1e-6)
        assert decoded(answer["figure"]).height > 200

    def test_a_hook_the_read_out_cannot_carry_has_no_names_and_says_why(self, server):
        answer = ok(server, "/api/sae_features", {"sae": "mlp", "count": 4})
        assert all(f["name"] is None for f in answer["features"])
        assert answer["names"]["bank"] is None and "do not write into the residual stream" in answer["names"]["note"]
        assert ok(server, "/api/sae_feature", {"sae": "mlp", "feature": 0})["names"] == []
        status, error = call(server, "/api/sae_features", {"sae": "mlp", "text": "a red shape"})
        assert status == 400 and "cannot search features by text" in error["error"]

    def test_a_pooled_hook_has_no_patch_maps(self, server):
        answer = ok(server, "/api/sae_feature", {"sae": "pooled", "feature": 1, "k": 3})
        assert answer["top"] and all(t["map"] is None for t in answer["top"]) and "pooled" in answer["maps_note"]
        image = ok(server, "/api/sae_image", {"sae": "pooled", "images": [{"store_row": 0}], "k": 3})
        assert image["images"][0]["features"][0]["map"] is None and "pooled" in image["maps_note"]

    def test_store_activations_are_computed_once_with_progress(self, toy, workspace):
        api = Api(toy, workspace.store, saes=[random_sae("blocks.2.hook_resid_post", 128, seed=1)])
        assert api.sae_status() == {"saes": {"sae0": {"state": "idle", "done": 0, "total": N_SCENES}}}
        seen, load = [], api._store_images
        api._store_images = lambda rows: (seen.append(api.sae_status()["saes"]["sae0"]), load(rows))[1]
        api.sae_features({})
        assert seen and all(s["state"] == "computing" for s in seen) and seen[0]["done"] == 0
        assert api.sae_status()["saes"]["sae0"]["state"] == "ready"
        calls = len(seen)
        api.sae_feature({"feature": 3})
        api.sae_features({"order": "rare"})
        assert len(seen) == calls  # cached: the store is not read again (figures use the thumbnail loader)


class TestRefusals:
    @pytest.mark.parametrize("path, body, message", [
        ("sae_features", {"sae": "dmeo"}, "no SAE named 'dmeo'. Did you mean: demo?"),
        ("sae_features", {"sae": 0}, "no SAE named 0"),
        ("sae_features", {"order": "best"}, "order must be one of frequency, rare, activation, index"),
        ("sae_features", {"text": "  "}, "text must be a non-empty string"),
        ("sae_features", {"text": 5}, "text must be a non-empty string"),
        ("sae_features", {"start": -1}, "start must be a whole number from 0 to 127"),
        ("sae_features", {"count": 0}, "count must be a whole number from 1 to 500"),
        ("sae_features", {"count": "10"}, "count must be a whole number"),
        ("sae_features", {"cuont": 10}, "unknown field 'cuont'. Did you mean: count?"),
        ("sae_features", {"text": "x" * 300}, "200"),
        ("sae_feature", {"sae": "demo"}, "feature must be a whole number from 0 to 127, got None"),
        ("sae_feature", {"feature": 128}, "feature must be a whole number from 0 to 127"),
        ("sae_feature", {"feature": True}, "feature must be a whole number"),
        ("sae_feature", {"feature": 1, "k": 13}, f"k must be a whole number from 1 to {TOP_K}"),
        ("sae_image", {"k": 3}, "images must be a non-empty list"),
        ("sae_image", {"images": [{"store_row": 0}], "k": 0}, "k must be a whole number from 1 to 32"),
        ("sae_image", {"images": [{"store_row": 0}] * 5}, "at most 4 images per request"),
        ("sae_image", {"images": ["data:image/png;base64,@@"]}, "base64 data cannot be decoded"),
        ("sae_image", [1], "must be a JSON object"),
    ])
    def test_bad_requests_get_400_with_the_reason(self, server, path, body, message):
        status, answer = call(server, f"/api/{path}", body)
        assert status == 400 and answer["status"] == 400
        assert message in answer["error"]

    def test_the_server_protections_hold_for_the_new_endpoints(self, server):
        url = "data:image/png;base64," + "A" * MAX_UPLOAD
        status, answer = call(server, "/api/sae_image", {"images": [url]})
        assert status == 413 and "over the limit" in answer["error"]
        status, answer = call(server, "/api/sae_features", data=b"{}", headers={"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in answer["error"]
        status, answer = call(server, "/api/sae_status", headers={"Host": "attacker.example"})
        assert status == 403 and "attacker.example" in answer["error"]
        status, answer = call(server, "/api/sae_features", data=b"{not json")
        assert status == 400 and "not valid JSON" in answer["error"]

    def test_a_server_without_sae_says_how_to_get_one(self, toy, workspace):
        api = Api(toy, workspace.store)
        assert api.info()["saes"] == [] and api.sae_status() == {"saes": {}}
        for method, body in ((api.sae_features, {}), (api.sae_feature, {"feature": 0}),
                             (api.sae_image, {"images": [{"store_row": 0}]})):
            with pytest.raises(InputError, match="no SAE.*clip-lens sae train.*clip-lens app --sae"):
                method(body)

    @pytest.mark.parametrize("sae, error, message", [
        (random_sae("blocks.3.hook_resid_post", 64), InputError, "reads width d_in=64, but 'blocks.3.hook_resid_post'"),
        (random_sae("text.blocks.1.hook_resid_post", 128), InputError, "reads the text tower"),
        (random_sae("blocks.3.hook_resid_pots", 128), HookNameError, "Did you mean"),
        (random_sae("blocks.1.attn.hook_pattern", 65), InputError, "not [batch, tokens, width]"),
        (random_sae("", 128), InputError, "records no hook point"),
    ])
    def test_a_misfit_sae_is_refused_at_start(self, toy, workspace, sae, error, message):
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            make_server(toy, workspace.store, saes={"bad": sae})

    def test_hook_z_saes_fit_flattened(self, toy):
        check_sae_fits(toy, random_sae("blocks.1.attn.hook_z", 128, reshape_activations="hook_z"))


def test_cli_app_refuses_a_misfit_sae_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from tests.helpers import one_line_error

    save_sae(random_sae("blocks.3.hook_resid_post", 64), tmp_path / "narrow")
    one_line_error(CliRunner(), ["app", "--sae", tmp_path / "narrow"], "SAE 'narrow'", "reads width d_in=64")
    one_line_error(CliRunner(), ["app", "--sae", tmp_path / "missing"], "missing")
