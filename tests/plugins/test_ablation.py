"""Mean ablation of direct effects on a store."""

import pytest
import torch

import clip_lens.analyses
from clip_lens import HookedCLIP
from clip_lens.collect import collect, shapes_world_images
from clip_lens.errors import InputError
from clip_lens.head_report import attribute_tasks, ground_truth_agreement
from clip_lens_plugins.ablation import AblationResult, MeanAblation, mean_ablate_heads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    toy = HookedCLIP.from_pretrained("toy-shapes")
    store = collect(toy, shapes_world_images(120, seed=9), tmp_path_factory.mktemp("a") / "s", progress=False)
    return toy, store


def test_ablating_every_head_leaves_their_means(setup):
    _, store = setup
    embedding, heads = store.read("embedding"), store.read("heads")
    keys = [f"L{l}H{h}" for l in range(4) for h in range(4)]
    ablated = mean_ablate_heads(embedding, heads, store.head_layers, keys)
    expected = embedding - heads.sum((1, 2)) + heads.mean(0).sum((0, 1))
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="L9H0 is not in the store"):
        mean_ablate_heads(embedding, heads, store.head_layers, ["L9H0"])


def test_mean_ablation_reports_drops_per_task(setup):
    toy, store = setup
    assert clip_lens.analyses.get("ablation") is MeanAblation
    tasks = attribute_tasks(toy, 120, seed=9)
    result = MeanAblation().run(store, {"colour": tasks["colour"]})
    assert len(result.heads) == 16
    embedding, heads = store.read("embedding"), store.read("heads")
    classifier, labels = tasks["colour"]
    changed = embedding - heads[:, 0, 1] + heads[:, 0, 1].mean(0)
    expected = float(((changed @ classifier.T).argmax(-1) == labels).float().mean())
    assert result.ablated["L0H1"]["colour"] == pytest.approx(expected)
    drops, margins = result.drop("colour"), result.margin_drop("colour")
    assert result.top_heads("colour", 2) == sorted(drops, key=lambda h: (-drops[h], -margins[h]))[:2]
    changed_margin = embedding - heads[:, 3, 0] + heads[:, 3, 0].mean(0)
    assert result.ablated_margin["L3H0"]["colour"] == pytest.approx(plain_margin(classifier, labels, changed_margin))
    with pytest.raises(InputError, match="3 labels for 120"):
        MeanAblation().run(store, {"colour": (classifier, labels[:3])})


def plain_margin(classifier, labels, embedding):
    logits = torch.nn.functional.normalize(embedding, dim=-1) @ classifier.T
    true = logits[torch.arange(len(labels)), labels]
    logits[torch.arange(len(labels)), labels] = -2
    return float((true - logits.max(1).values).mean())


def test_ground_truth_agreement_counts_labelled_heads_among_top_ablations():
    from clip_lens_plugins.head_labels import HeadLabel, HeadLabelsResult

    labels = HeadLabelsResult("m", "prototype", [
        HeadLabel("L0H0", "colour", 1.0, ["a"], [True]), HeadLabel("L0H1", "colour", 1.0, ["a"], [True]),
        HeadLabel("L1H0", "shape", 1.0, ["a"], [True]), HeadLabel("L1H1", None, 0.0, ["a"], [False]),
    ])
    heads = ["L0H0", "L0H1", "L1H0", "L1H1"]
    n = 200
    # per-image margin lost per head (rows: heads): colour is carried by L0H0 (0.2) and L1H1 (0.1);
    # shape by L1H1 only; size by L1H0, which nobody labels
    drops = {
        "colour": torch.tensor([0.2, 0.01, 0.0, 0.1])[:, None].expand(4, n).clone(),
        "shape": torch.tensor([0.0, 0.0, 0.01, 0.3])[:, None].expand(4, n).clone(),
        "size": torch.tensor([0.0, 0.0, 0.2, 0.0])[:, None].expand(4, n).clone(),
    }
    drops["colour"][0, ::2] = 0.1  # image noise: L0H0 still carries colour on average (0.15)
    ablation = AblationResult("m", {}, {}, heads, {"colour": 0.5, "shape": 0.5, "size": 0.5}, {}, margin_drops=drops)
    rows = {r["property"]: r for r in ground_truth_agreement(labels, ablation, ["colour", "shape", "size"], n_boot=200)}
    colour = rows["colour"]
    assert colour["top_ablation_heads"] == ["L0H0", "L1H1"] and colour["agreement"] == 0.5
    assert colour["carriers"] == ["L0H0", "L1H1"]  # ≥ 10 % of the 0.5 margin
    assert colour["precision"] == 0.5 and colour["recall"] == 0.5
    low, high = colour["agreement_ci95"]
    assert low <= 0.5 <= high
    assert rows["shape"]["top_ablation_heads"] == ["L1H1"] and rows["shape"]["agreement"] == 0.0
    assert rows["shape"]["precision"] == 0.0 and rows["shape"]["recall"] == 0.0
    # an attribute nobody labels is a row with agreement 0 (k = 1), not a skipped row
    assert rows["size"]["labelled_heads"] == [] and rows["size"]["agreement"] == 0.0
    assert rows["size"]["top_ablation_heads"] == ["L1H0"] and rows["size"]["precision"] is None


def test_margin_grades_what_accuracy_cannot_see():
    from clip_lens_plugins.ablation import ZeroShotTask

    classifier = torch.eye(3)
    task = ZeroShotTask(classifier, torch.tensor([0, 1]))
    embedding = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8]])
    assert task.accuracy(embedding) == 0.5
    assert task.margin(embedding) == pytest.approx(((0.8 - 0.6) + (0.6 - 0.8)) / 2)
    # ties in accuracy are broken by margin
    ablation = AblationResult("m", {"t": 1.0}, {"A": {"t": 1.0}, "B": {"t": 1.0}}, ["A", "B"],
                              {"t": 0.5}, {"A": {"t": 0.45}, "B": {"t": 0.2}})
    assert ablation.top_heads("t", 1) == ["B"]


def test_layer_curves_ablate_what_they_say(setup):
    from clip_lens_plugins.ablation import mean_ablate_layers

    toy, store = setup
    tasks = attribute_tasks(toy, 120, seed=9)
    result = MeanAblation().run(store, tasks)
    terms = {name: store.read(name) for name in ("embedding", "embed", "attn", "mlp")}
    manual = terms["embedding"] - terms["mlp"][:, 1] + terms["mlp"][:, 1].mean(0) - terms["attn"][:, 2] + terms["attn"][:, 2].mean(0)
    torch.testing.assert_close(mean_ablate_layers(terms, attn_layers=[2], mlp_layers=[1]), manual, atol=1e-6, rtol=0)
    assert sorted(result.keep_last) == [0, 1, 2, 3, 4] and sorted(result.attention_upto) == [0, 1, 2, 3]
    assert result.keep_last[4] == result.mlps  # all attention kept = only MLPs and embedding ablated
    # with nothing kept every image gets (almost) the same embedding: accuracy falls to about one class's share
    for name, (classifier, labels) in tasks.items():
        share = torch.bincount(labels).max().item() / len(labels)
        assert result.keep_last[0][name] <= share + 0.05, name
    assert result.plot_curves().axes
