"""Mutual knowledge: descriptor banks, Sinkhorn, visual and textual concepts."""

import json

import pytest
import torch
import torch.nn.functional as F

from clip_lens import HookedCLIP
from clip_lens.errors import InputError
from clip_lens.toy.world import VALUES, attribute_prompt
from clip_lens_plugins.mutual_knowledge.descriptors import (
    CANDIDATE_STAGES, IMAGENET_TEMPLATES, candidate_mask, class_embeddings, encode_descriptors,
    load_descriptors, shapes_world_descriptors, sinkhorn, textual_concepts, visual_concepts,
)
from tests.seeds import TEST_SEEDS


CLASS_TEMPLATES = ("a {}",)  # the class prompt of the shapes world: attribute_prompt("shape", s)


@pytest.fixture(scope="module")
def model():
    return HookedCLIP.from_pretrained("toy-shapes").eval()


@pytest.fixture(scope="module")
def shapes(model):
    bank = shapes_world_descriptors()
    return bank, encode_descriptors(model, bank), class_embeddings(model, bank.classes, templates=CLASS_TEMPLATES)


# --- the bank ----------------------------------------------------------------------------
def test_shapes_bank_layout_and_vocabulary(model):
    bank = load_descriptors("shapes")
    assert bank.classes == list(VALUES["shape"])
    assert [CLASS_TEMPLATES[0].format(s) for s in bank.classes] == [attribute_prompt("shape", s) for s in bank.classes]
    assert len(bank) == 6 * 23 and len(set(bank.descriptors)) == len(bank)
    assert bank.template == "{}" and bank.name == "shapes"
    circle = [bank.descriptors[i] for i in bank.class_descriptors["circle"]]
    assert {"a red circle", "a small circle", "a circle at the top left", "a circle on the right",
            "a circle on a striped background"} <= set(circle)
    vocab = set(model.tokenizer.vocab)
    assert {w for d in bank.prompts() for w in model.tokenizer.words(d)} <= vocab


def test_shapes_descriptors_are_meaningful_to_the_bundled_model(shapes):
    """Each descriptor's nearest class embedding is its own class (measured: 138/138 = 100%)."""
    bank, desc, cls = shapes
    owner = torch.tensor([o[0] for o in bank.owners()])
    nearest = (desc @ cls.T).argmax(-1)
    accuracy = (nearest == owner).float().mean().item()
    assert accuracy >= 0.9, accuracy
    assert torch.allclose(desc.norm(dim=-1), torch.ones(len(bank)), atol=1e-5)


def test_shapes_descriptors_describe_scenes(model, shapes):
    """On 100 scenes of a test world (measured first on seed 7): the image's most similar descriptor names the scene's shape (measured
    0.96; zero-shot shape accuracy 0.95) and 4 of its top 5 are true of the scene (measured 0.77)."""
    from clip_lens.toy.world import POSITION_PHRASES, ShapesWorld, batch_images

    bank, desc, _ = shapes
    scenes = [ShapesWorld(seed=TEST_SEEDS[7]).scene(i) for i in range(100)]
    with torch.no_grad():
        sims = model.encode_image(batch_images(scenes).to(model.device), normalize=True) @ desc.T
    owners = [VALUES["shape"][o[0]] for o in bank.owners()]
    top1 = sum(owners[int(t)] == s.objects[0].shape for t, s in zip(sims.argmax(-1), scenes)) / len(scenes)
    assert top1 >= 0.85, top1

    def facts(scene):
        o = scene.objects[0]
        return {f"a {o.colour} {o.shape}", f"a {o.size} {o.shape}", f"a {o.shape} {POSITION_PHRASES[o.position]}",
                f"a {o.shape} on a {scene.background} background"}

    true5 = sum(bank.descriptors[i] in facts(s) for row, s in zip(sims.topk(5).indices.tolist(), scenes) for i in row)
    assert true5 / (5 * len(scenes)) >= 0.6, true5


def test_textual_concepts_of_a_circle_are_circle_descriptors(shapes):
    """Top-23 (one class's worth) of "a circle": measured 23/23 circle descriptors; u' = min(u, D)."""
    bank, desc, cls = shapes
    k = bank.classes.index("circle")
    top = textual_concepts(cls, desc, torch.tensor([k, k]), u=23)
    assert top.shape == (2, 23)
    share = sum(int(i) in set(bank.class_descriptors["circle"]) for i in top[0]) / 23
    assert share >= 0.9, share
    assert textual_concepts(cls, desc, torch.tensor([0]), u=1000).shape == (1, len(bank))
    with pytest.raises(InputError, match="predicted classes"):
        textual_concepts(cls, desc, torch.tensor([6]))


def test_load_round_trip_pooling_and_for_classes(tmp_path):
    data = {"classes": {"cat": ["whiskers", " pointy ears ", "whiskers"], "dog": ["pointy ears", "a wet nose"]},
            "template": "a photo of {}", "name": "pets"}
    path = tmp_path / "pets.json"
    path.write_text(json.dumps(data))
    bank = load_descriptors(path)
    assert bank.descriptors == ["whiskers", "pointy ears", "a wet nose"]
    assert bank.class_descriptors == {"cat": [0, 1], "dog": [1, 2]}
    assert bank.owners() == [[0], [0, 1], [1]]
    assert (bank.template, bank.name) == ("a photo of {}", "pets")
    assert load_descriptors(bank.to_dict()) == bank
    plain = load_descriptors({"cat": ["whiskers"]})
    assert plain.template == "a photo showing {}" and plain.name == "custom"
    dog = bank.for_classes(["dog"])
    assert dog.descriptors == ["pointy ears", "a wet nose"] and dog.class_descriptors == {"dog": [0, 1]}
    with pytest.raises(InputError, match=r"'dgo', 'cow'. 'dgo': Did you mean: dog\?"):
        bank.for_classes(["dgo", "cow"])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"cat": ["a", ]}', r"not valid JSON: .* line 1, column 15"),
        ('["a", "b"]', "top level is a list"),
        ("{}", "no classes"),
        ('{"cat": []}', "class 'cat' has an empty descriptor list"),
        ('{"cat": ["ok", 3, null]}', r"not strings: item 2 \(a number\), item 3 \(null\)"),
        ('{"cat": ["ok", "  "]}', r"empty descriptors \(items \[2\]\)"),
        ('{"cat": "whiskers"}', "must map to a list"),
        ('{"cat": ["a"], "cat": ["b"]}', "names 'cat' twice"),
        ('{"classes": {"cat": ["a"]}, "template": "no slot"}', "exactly one"),
        ('{"classes": {"cat": ["a"]}, "extra": 1}', "only \"classes\""),
    ],
)
def test_load_errors(tmp_path, content, message):
    path = tmp_path / "bank.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_descriptors(path)


def test_load_errors_for_names_paths_and_types(tmp_path):
    with pytest.raises(InputError, match="no descriptor bank named 'shape'.*Did you mean: shapes"):
        load_descriptors("shape")
    with pytest.raises(InputError, match="does not exist"):
        load_descriptors(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_bytes(b'{"cat": ["\xff"]}')
    with pytest.raises(InputError, match="not UTF-8"):
        load_descriptors(tmp_path / "bad.json")
    with pytest.raises(InputError, match="got list"):
        load_descriptors(["a"])


def test_encoding_refuses_unknown_words_and_ensembles_templates(model):
    with pytest.raises(InputError, match=r"does not know.*\(showing\)"):
        encode_descriptors(model, load_descriptors({"circle": ["a red circle"]}))  # paper's template
    one = class_embeddings(model, ["a circle", "a star"])
    direct = model.encode_text(model.to_tokens(["a circle", "a star"]), normalize=True)
    assert torch.allclose(one, direct, atol=1e-6)
    two = class_embeddings(model, ["circle", "star"], templates=("a {}", "a {} at the top"))
    parts = [model.encode_text(model.to_tokens([f"a {c}", f"a {c} at the top"]), normalize=True)
             for c in ("circle", "star")]
    expected = torch.stack([F.normalize(p.mean(0), dim=-1) for p in parts])
    assert torch.allclose(two, expected, atol=1e-5)
    with pytest.raises(InputError, match="exactly one"):
        class_embeddings(model, ["circle"], templates=("a circle",))
    assert len(IMAGENET_TEMPLATES) == 8 and all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


# --- Sinkhorn ----------------------------------------------------------------------------
def test_sinkhorn_is_doubly_stochastic_batched_with_masks():
    torch.manual_seed(0)
    logits = 2.5 * torch.randn(3, 4, 5, 40)
    rows = torch.rand(3, 4, 5) > 0.3
    rows[..., 0] = True
    cols = torch.rand(3, 4, 40) > 0.2
    cols[..., 0] = True
    logits[0, 0, 0, 1] = float("-inf")  # a forbidden pair
    plan = sinkhorn(logits, valid_rows=rows, valid_cols=cols)
    n_rows, n_cols = rows.sum(-1, keepdim=True), cols.sum(-1, keepdim=True)
    assert torch.allclose(plan.sum(-1), rows / n_rows, atol=1e-4)
    assert torch.allclose(plan.sum(-2), cols / n_cols, atol=1e-4)
    assert (plan[~rows] == 0).all() and (plan.transpose(-1, -2)[~cols] == 0).all() and plan[0, 0, 0, 1] == 0
    full = sinkhorn(logits[0, 0])
    assert torch.allclose(full.sum(-1), torch.full((5,), 1 / 5), atol=1e-4)
    assert torch.allclose(full.sum(-2), torch.full((40,), 1 / 40), atol=1e-4)
    none = sinkhorn(logits[0, 0], valid_rows=torch.zeros(5, dtype=torch.bool))
    assert (none == 0).all()


def test_sinkhorn_spreads_regions_over_descriptors():
    """Every region prefers descriptor 0; argmax gives it to all 5, the plan gives 5 distinct tops."""
    torch.manual_seed(0)
    scores = torch.rand(5, 12) * 0.2
    scores[:, 0] += 0.6
    scores[torch.arange(5), torch.arange(1, 6)] += 0.5
    assert len(set((2.5 * scores).argmax(-1).tolist())) == 1
    assert len(set(sinkhorn(2.5 * scores).argmax(-1).tolist())) == 5


def test_sinkhorn_errors():
    with pytest.raises(InputError, match="NaN"):
        sinkhorn(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(InputError, match="valid_rows must have shape"):
        sinkhorn(torch.zeros(2, 3), valid_rows=torch.ones(3, dtype=torch.bool))
    with pytest.raises(InputError, match="no finite logit"):
        sinkhorn(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]))


# --- visual concepts -----------------------------------------------------------------------
def test_candidate_mask_rule_and_fallbacks():
    # 2 regions, 6 descriptors; top-3 of region 0: {0,1,2}, of region 1: {1,2,3} -> intersection {1,2}
    region = torch.tensor([[[0.9, 0.8, 0.7, 0.0, -0.1, -0.2], [0.0, 0.8, 0.7, 0.9, -0.1, -0.2]]])
    image = torch.tensor([[0.0, 0.5, -0.5, 0.0, 0.0, 0.0]])  # mean 0: keeps > -0.02 -> drops descriptor 2
    valid = torch.ones(1, 2, dtype=torch.bool)
    mask, stage = candidate_mask(region, valid, image, top_k=3, margin=0.02, min_candidates=1)
    assert mask[0].nonzero().flatten().tolist() == [1] and CANDIDATE_STAGES[stage[0]] == "intersection+image"
    mask, stage = candidate_mask(region, valid, image, top_k=3, min_candidates=2)
    assert mask[0].nonzero().flatten().tolist() == [1, 2] and CANDIDATE_STAGES[stage[0]] == "intersection"
    mask, stage = candidate_mask(region, valid, image, top_k=3, min_candidates=3)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 3] and CANDIDATE_STAGES[stage[0]] == "union+image"
    mask, stage = candidate_mask(region, valid, image, top_k=3, min_candidates=4)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2, 3] and CANDIDATE_STAGES[stage[0]] == "union"
    mask, stage = candidate_mask(region, torch.zeros(1, 2, dtype=torch.bool), image, top_k=3)
    assert not mask.any() and CANDIDATE_STAGES[stage[0]] == "none"


def test_visual_concepts_on_random_regions():
    torch.manual_seed(0)
    B, L, D, E = 4, 5, 300, 32
    desc = F.normalize(torch.randn(D, E), dim=-1)
    regions = F.normalize(torch.randn(B, L, E), dim=-1)
    image = F.normalize(regions.mean(1), dim=-1)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 3:] = False
    valid[2] = False
    out = visual_concepts(regions, valid, image, desc, top_k=60)
    assert out[2] == []
    for b in (0, 1, 3):
        n = int(valid[b].sum())
        assert 3 <= len(out[b]) <= n * 3 and len(set(out[b])) == len(out[b])
        assert all(0 <= i < D for i in out[b])
        alone = visual_concepts(regions[b:b + 1, :n], None, image[b:b + 1], desc, top_k=60)
        assert alone[0] == out[b]  # padding other images' candidates changes nothing
    same, region_ids = visual_concepts(regions, valid, image, desc, top_k=60, return_regions=True)
    assert same == out and len(region_ids) == B and all(len(r) == L for r in region_ids)
    assert region_ids[2] == [[]] * L and region_ids[1][3:] == [[], []]
    assert all(len(ids) == 3 for ids in region_ids[0])
    assert out[0] == list(dict.fromkeys(i for ids in region_ids[0] for i in ids))
