"""The textspan analysis on a collected store of the bundled model, and the span validation."""

import pytest
import torch

import clip_lens.analyses
from clip_lens import HookedCLIP
from clip_lens.banks import encode_bank, load_bank
from clip_lens.collect import collect, shapes_world_images
from clip_lens.errors import InputError
from clip_lens_plugins.textspan import TextSpan, textspan


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def store(toy, tmp_path_factory):
    return collect(toy, shapes_world_images(200, seed=5), tmp_path_factory.mktemp("s") / "store", progress=False)


def test_registry_hands_out_the_textspan_analysis():
    assert clip_lens.analyses.get("textspan") is TextSpan
    assert "textspan" in [info.name for info in clip_lens.analyses.list() if info.ok]


def test_textspan_run_spans_every_head_with_bank_texts(toy, store, tmp_path):
    result = TextSpan(toy).run(store, bank="shapes", m=6)
    bank = load_bank("shapes")
    assert [h.head for h in result.heads] == [f"L{l}H{h}" for l in range(4) for h in range(4)]
    for head in result.heads:
        assert head.texts == [bank.texts[i] for i in head.text_indices] and len(set(head.text_indices)) == 6
        assert head.cumulative[-1] == pytest.approx(sum(head.explained_variance), abs=1e-5)
        assert 0 < head.cumulative[-1] <= 1 + 1e-6
    one = result.by_head()["L3H2"]
    outputs = store.head_outputs(3, 2)
    direct = textspan(outputs, encode_bank(toy, bank), m=6)
    assert direct.indices.tolist() == one.text_indices
    saved = result.save(tmp_path / "spans.json")
    assert '"L3H2"' in saved.read_text()
    assert result.texts_by_head()["L3H2"] == one.texts


def test_span_replacement_with_the_full_span_keeps_accuracy(toy, store):
    """With as many texts as a head's output rank the reconstruction is the head itself."""
    result = TextSpan(toy).run(store, bank="shapes", m=40)
    from clip_lens.head_report import attribute_tasks

    scores = result.replacement_accuracy(store, {"colour": attribute_tasks(toy, 200, seed=5)["colour"]}, ms=(5, 40))["colour"]
    heads = store.read("heads")
    worst = max(
        (result.reconstruct(h.head, heads[:, h.layer, h.index], 40) - heads[:, h.layer, h.index]).norm()
        / heads[:, h.layer, h.index].norm()
        for h in result.heads
    )
    assert worst < 0.2
    assert scores["m=40"] == pytest.approx(scores["original"], abs=0.02)
    assert set(scores) == {"original", "m=5", "m=40", "ci95"}
    for column, (low, high) in scores["ci95"].items():  # bootstrap intervals over the 200 images
        assert low <= scores[column] <= high and high - low < 0.2


def test_planted_mix_of_bank_texts_is_recovered_in_order(toy):
    """A synthetic head writing a known mix of three shapes-world text directions plus noise."""
    bank = load_bank("shapes")
    texts = encode_bank(toy, bank)
    g = torch.Generator().manual_seed(0)
    # three attributes' prompts (pairwise cosine 0.14-0.34 in the toy text space)
    planted = [bank.texts.index(t) for t in ("a red shape", "a shape at the top left", "a shape on a striped background")]
    mix = torch.randn(3000, 3, generator=g) * torch.tensor([1.0, 0.6, 0.35])
    outputs = mix @ texts[planted] + 0.02 * torch.randn(3000, texts.shape[1], generator=g)
    span = textspan(outputs, texts, m=5)
    assert span.indices[:3].tolist() == planted
    assert span.cumulative[2] > 0.9


def test_textspan_refuses_a_store_of_another_model_or_missing_layers(toy, store):
    other = HookedCLIP.from_pretrained("toy-shapes")
    other.model_name = "something-else"
    with pytest.raises(InputError, match="collected with model 'toy-shapes'"):
        TextSpan(other).run(store, bank="shapes")
    changed = HookedCLIP.from_pretrained("toy-shapes")
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    with pytest.raises(InputError, match="collected with other weights"):
        TextSpan(changed).run(store, bank="shapes")
    with pytest.raises(InputError, match=r"layers \[7\] were not collected"):
        TextSpan(toy).run(store, bank="shapes", layers=[7])


def test_saved_result_loads_back(toy, store, tmp_path):
    result = TextSpan(toy).run(store, bank="shapes", m=3)
    path = result.save(tmp_path / "spans.json")
    loaded = type(result).load(path)
    assert loaded.to_dict() == result.to_dict() and loaded.texts_by_head() == result.texts_by_head()
    with pytest.raises(InputError, match="not a TextSpan result"):
        type(result).from_dict({"model": "x"})
