"""The web app's Neurons tab: the neurons it finds for an image and for a text agree with the library's own
second-order effects and rank-1 directions on the same store images; bad requests are refused with the reason."""

import json
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from clip_lens import HookedCLIP, analyses, second_order
from clip_lens.app import Api, demo_workspace, make_server
from clip_lens.banks import encode_bank, load_bank
from clip_lens.errors import InputError
from clip_lens.toy.world import ShapesWorld
from tests.helpers import serving

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_SCENES, STORE_SEED, QUERY_SEED = 40, 31011, 31012


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return HookedCLIP.from_pretrained("toy-shapes-v2")


@pytest.fixture(scope="module")
def api(toy, tmp_path_factory):
    workspace = demo_workspace(toy, tmp_path_factory.mktemp("neurons"), n_scenes=N_SCENES, seed=STORE_SEED, progress=False)
    return Api(toy, workspace.store, workspace.labels, thumbnails=workspace.thumbnails)


def scene_pixels(toy, seed, index):
    return toy.preprocess(Image.fromarray(ShapesWorld(seed=seed, image_size=64, version=2).scene(index).image))


@pytest.fixture(scope="module")
def library(toy):
    """The neurons analysis on the store's scenes (the demo store holds the scenes of the model's world, version 2), computed here without the app."""
    images = torch.stack([scene_pixels(toy, STORE_SEED, i) for i in range(N_SCENES)])
    return analyses.get("neurons")(toy).run(images, bank="shapes-attributes", layers=[0, 1, 2], k=8, top_k=N_SCENES)


def test_search_ranks_neurons_by_the_cosine_of_their_rank_one_direction_with_the_text(toy, api, library):
    answer = api.neuron_search({"text": "a red shape", "k": 5})
    text = torch.nn.functional.normalize(encode_bank(toy, load_bank(["a red shape"]))[0].float(), dim=-1)
    directions = torch.nn.functional.normalize(library.rank1.direction.reshape(-1, toy.cfg.d_embed), dim=-1)
    values, order = (directions @ text).topk(5)
    assert [n["neuron"] for n in answer["neurons"]] == [f"L{library.neurons[i].layer}N{library.neurons[i].neuron}" for i in order]
    torch.testing.assert_close(torch.tensor([n["cosine"] for n in answer["neurons"]]), values, atol=1e-4, rtol=0)
    assert answer["n_analysed"] == N_SCENES and all(n["strip"].startswith("data:image/png;base64,") for n in answer["neurons"])
    assert answer["neurons"][0]["code"] == [[t, c] for t, c in zip(library.neurons[order[0]].texts, library.neurons[order[0]].coefficients)]


def test_image_neurons_are_the_largest_second_order_effects_on_that_image(toy, api):
    answer = api.neuron_image({"images": [{"scene": 3, "seed": QUERY_SEED}], "k": 4})
    image = scene_pixels(toy, QUERY_SEED, 3)[None]  # as the app reads {"scene": 3}: a scene of the model's world (v2), preprocessed
    norms = second_order(toy, image, layers=[0, 1, 2]).effects[0].norm(dim=-1).flatten()  # [layer · neuron]
    values, order = norms.topk(4)
    shown = answer["images"][0]["neurons"]
    assert [n["neuron"] for n in shown] == [f"L{int(i) // toy.cfg.d_mlp}N{int(i) % toy.cfg.d_mlp}" for i in order]
    torch.testing.assert_close(torch.tensor([n["effect"] for n in shown]), values, atol=1e-4, rtol=1e-4)
    assert len(shown[0]["map"]) == toy.cfg.grid_size[0] and answer["figure"].startswith("data:image/png;base64,")


def test_bad_neuron_requests_are_refused_with_the_reason(api, toy):
    with pytest.raises(InputError, match="unknown field 'txt'"):
        api.neuron_search({"txt": "red"})
    with pytest.raises(InputError, match="k must be a whole number from 1 to 32"):
        api.neuron_image({"images": [{"store_row": 0}], "k": 0})
    with pytest.raises(InputError, match="text must be a non-empty string"):
        api.neuron_search({"text": " "})
    server = make_server(toy, api.store, api.labels)
    with serving(server):
        request = urllib.request.Request(f"{server.url}api/neuron_search", data=json.dumps({"text": ""}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400 and "text must be" in json.loads(refused.value.read())["error"]
