"""Text → head neighbours against the shapes world's known colours (issue 31, item 1).

"a red shape" against L3H0 of toy-shapes-v2 returns cyan shapes. These tests establish that this is
what the heads write, not an error of the text path: the scores are recomputed independently from the
head's hooked output (an error of sign or centring would change them), the whole embedding finds every
colour, and the complementary colours of the per-head searches are checked on test world seeds
(`tests/seeds.py`), which no measurement in the docs used.
"""

import numpy as np
import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens.collect import collect, shapes_world_images
from clip_lens.errors import InputError
from clip_lens.toy.world import COLOURS, ShapesWorld
from clip_lens_plugins.neighbors import Neighbors, world_prompts
from clip_lens_plugins.neighbors.shapes import TextSearchTruth, complementary_colour, text_search_truth
from tests.seeds import TEST_SEEDS

SEEDS = TEST_SEEDS[-4:-2]
N_SCENES = 300


@pytest.fixture(scope="module")
def v2():
    return HookedCLIP.from_pretrained("toy-shapes-v2")


@pytest.fixture(scope="module")
def stores(v2, tmp_path_factory):
    root = tmp_path_factory.mktemp("text_truth")
    return [(collect(v2, shapes_world_images(N_SCENES, seed=s, version=2), root / str(s), progress=False), s) for s in SEEDS]


@pytest.fixture(scope="module")
def truth(v2, stores):
    return text_search_truth(v2, stores, k=10, head_sets=[["L0H3", "L3H0"]])


def test_complementary_colours():
    assert complementary_colour("red") == "cyan" and complementary_colour("cyan") == "red"
    assert complementary_colour("blue") == "yellow"
    with pytest.raises(InputError, match="unknown colour 'rde'.*red"):
        complementary_colour("rde")


@torch.no_grad()
def test_text_scores_are_the_heads_share_of_the_cosine(v2, stores):
    """The returned scores equal ``term · t`` with the term rebuilt from ``blocks.3.attn.hook_result`` (L3H0
    writes straight into the final residual: through ln_post with its scale frozen, the projection, and
    divided by ‖embedding‖), and the ranking is theirs. A flipped sign, a centred text or a centred store
    term would move these scores."""
    store, seed = stores[0]
    images = shapes_world_images(N_SCENES, seed=seed, version=2).load(0, N_SCENES)[0]
    prompts = world_prompts("colour", 2)
    texts = v2.encode_text(v2.to_tokens(prompts), normalize=True)
    _, cache = v2.run_with_cache(images, names_filter=lambda h: h in ("blocks.3.attn.hook_result", "ln_post.hook_scale"))
    out = cache["blocks.3.attn.hook_result"][:, 0, 0]  # the class token's L3H0 output [n, d_model]
    embedding = v2.encode_image(images)
    term = (out - out.mean(-1, keepdim=True)) / cache["ln_post.hook_scale"][:, 0] * v2.visual.ln_post.weight
    term = term @ v2.visual.proj / embedding.norm(dim=-1, keepdim=True)
    expected = term @ texts.T  # [n, colour]
    result = Neighbors(v2).run(store, query_texts=prompts, head="L3H0", k=20)
    for q in range(len(prompts)):
        top = expected[:, q].sort(descending=True).values[:20]
        torch.testing.assert_close(result.scores[q], top, atol=1e-5, rtol=0)
        torch.testing.assert_close(expected[result.indices[q], q], result.scores[q], atol=1e-5, rtol=0)
    # the whole embedding's text search scores are the image-text cosines themselves
    whole = Neighbors(v2).run(store, query_texts=prompts, embedding=True, k=5)
    cosines = torch.nn.functional.normalize(embedding, dim=-1) @ texts.T
    torch.testing.assert_close(whole.scores, cosines.T.sort(descending=True).values[:, :5], atol=1e-5, rtol=0)


def test_the_whole_embedding_finds_every_colour(truth):
    """The model as a whole: every prompt's top 10 show its colour, none its complement."""
    mean, low, _ = truth.summary("embedding")
    assert low >= 0.9, mean
    assert truth.summary("embedding", "complement")[2] <= 0.05
    assert truth.chance["same"] < 0.2


def test_l3h0_returns_the_complementary_colour_of_red_and_blue(truth):
    """The documented behaviour: on toy-shapes-v2, L3H0's term ranks cyan images first for "a red
    shape" and yellow ones for "a blue shape", and so does the sum L0H3+L3H0 for "a blue shape"; while
    for "a green shape" it finds green. Checked per store (each a fresh world seed)."""
    colours = truth.colours
    red, blue, green = colours.index("red"), colours.index("blue"), colours.index("green")
    for store in range(len(SEEDS)):
        same, other = truth.same["L3H0"][store], truth.complement["L3H0"][store]
        assert other[red] > same[red] and other[red] >= 0.5, (same[red], other[red])
        assert other[blue] > same[blue] and other[blue] >= 0.5, (same[blue], other[blue])
        assert same[green] >= 0.8, same[green]
        pair_same, pair_other = truth.same["L0H3+L3H0"][store], truth.complement["L0H3+L3H0"][store]
        assert pair_other[blue] > pair_same[blue], (pair_same[blue], pair_other[blue])


def test_centring_the_texts_does_not_remove_it(v2, stores):
    """Not a centring error: with the prompts' mean removed from every query, L3H0 still ranks cyan
    images first for "a red shape"."""
    centred = text_search_truth(v2, stores[:1], k=10, centred=True)
    red = centred.colours.index("red")
    assert centred.complement["L3H0"][0][red] > centred.same["L3H0"][0][red]


def test_heads_differ_from_a_random_head(truth):
    """L0H3 and L1H2 find the prompt's colour more often than a random head, with intervals over
    (store, prompt) units; L3H0 returns the complementary colour more often than a random head does."""
    _, _, any_high = truth.summary("any head")
    for head in ("L0H3", "L1H2"):
        _, low, _ = truth.summary(head)
        assert low > any_high, (head, truth.summary(head), truth.summary("any head"))
    assert truth.summary("L3H0", "complement")[0] > truth.summary("any head", "complement")[2]


def test_ground_truth_is_recounted(v2, truth, stores):
    """The shares count scenes that show the colour in any object: recount them from the world."""
    shown = {}
    for store, seed in stores:
        world = ShapesWorld(seed=seed, version=2)
        shown[seed] = np.array([[any(o.colour == c for o in world.scene(i).objects) for c in COLOURS] for i in range(N_SCENES)])
    store, seed = stores[1]
    rows = Neighbors(v2).run(store, query_texts=world_prompts("colour", 2), head="L0H0", k=10).indices.numpy()
    for q, colour in enumerate(COLOURS):
        assert truth.same["L0H0"][1][q] == pytest.approx(shown[seed][rows[q], q].mean())
        other = list(COLOURS).index(complementary_colour(colour))
        assert truth.complement["L0H0"][1][q] == pytest.approx(shown[seed][rows[q], other].mean())
    assert truth.chance["same"] == pytest.approx(np.mean([shown[s].mean() for s in SEEDS]))


def test_round_trip(truth, tmp_path):
    loaded = TextSearchTruth.load(truth.save(tmp_path / "t.json"))
    assert loaded.summary("L3H0") == truth.summary("L3H0")
    assert "| L3H0 |" in loaded.to_markdown(["L3H0"])
