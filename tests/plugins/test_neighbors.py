"""Nearest-neighbour searches: exact streamed top-k, the three CLIP-InterpreT searches, the shapes world."""

import tracemalloc

import numpy as np
import pytest
import torch
import zarr
from matplotlib.figure import Figure

import clip_lens.analyses
from clip_lens import HookedCLIP
from clip_lens.collect import FORMAT, Store, collect, shapes_world_images
from clip_lens.errors import InputError
from clip_lens_plugins.head_labels import HeadLabel, HeadLabelsResult
from clip_lens.stats import bootstrap_ci
from clip_lens.toy.world import ShapesWorld, batch_images
from clip_lens_plugins.neighbors import (
    HeadIndex, Neighbors, NeighborsResult, PropertySearchTruth, project, property_search_truth, property_texts,
    shapes_world_loader, text_basis, world_prompts,
)

WORLD_SEED = 2024


def fake_store(path, heads: np.ndarray, chunk_size: int, done=None) -> Store:
    """A store holding only ``heads`` [N, head_layer, H, D], written with the collect layout;
    ``done``: the finished chunks (default all)."""
    group = zarr.open_group(str(path), mode="w")
    n = len(heads)
    group.attrs.update({"format": FORMAT, "model": "fake", "n_images": n, "chunk_size": chunk_size,
                        "head_layers": list(range(heads.shape[1])), "token_layers": [], "arrays": ["heads"]})
    group.create_array("heads", shape=heads.shape, chunks=(chunk_size, *heads.shape[1:]), dtype="float32", fill_value=0)[:] = heads
    (path / "done").mkdir()
    for c in range(-(-n // chunk_size)) if done is None else done:
        (path / "done" / f"{c:06d}").touch()
    return Store.open(path, partial=done is not None)  # a store with unfinished chunks opens only when asked


def brute_force(rows: torch.Tensor, queries: torch.Tensor, k: int):
    """Top-k on the full score matrix: values by torch.topk, indices by a stable sort (ties: lowest index)."""
    scores = queries @ rows.T
    return torch.topk(scores, k).values, scores.argsort(dim=1, descending=True, stable=True)[:, :k]


def unit_texts(model: HookedCLIP, texts: list[str]) -> torch.Tensor:
    return model.encode_text(model.to_tokens(texts), normalize=True).detach()


def labels_table(**by_property: list[str]) -> HeadLabelsResult:
    heads = [HeadLabel(h, p, 1.0, ["t"], [True]) for p, keys in by_property.items() for h in keys]
    return HeadLabelsResult("fake", "prototype", heads, list(by_property))


class TestExactTopK:
    @pytest.mark.parametrize("chunk_size", [1, 7, 64, 500])
    @pytest.mark.parametrize("metric", ["dot", "cosine"])
    def test_equals_brute_force(self, tmp_path, chunk_size, metric):
        g = torch.Generator().manual_seed(0)
        terms = torch.randn(300, 2, 3, 16, generator=g)
        store = fake_store(tmp_path / "s", terms.numpy(), chunk_size)
        index = HeadIndex.from_store(store, heads=["L0H1", "L1H2"], metric=metric)
        queries = torch.randn(5, 16, generator=g)
        scores, indices = index.search(queries, k=20)  # k > chunk size for 1 and 7
        rows = terms[:, 0, 1] + terms[:, 1, 2]
        if metric == "cosine":
            rows, queries = torch.nn.functional.normalize(rows, dim=-1), torch.nn.functional.normalize(queries, dim=-1)
        expected_scores, expected_indices = brute_force(rows, queries, 20)
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
        assert torch.equal(indices, expected_indices)

    @pytest.mark.parametrize("chunk_size", [3, 10, 40])
    def test_ties_go_to_the_lowest_index(self, tmp_path, chunk_size):
        # integer terms: many exactly equal scores
        terms = torch.randint(-2, 3, (40, 1, 1, 4), generator=torch.Generator().manual_seed(1)).float()
        store = fake_store(tmp_path / "s", terms.numpy(), chunk_size)
        queries = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 0, 0]])
        scores, indices = HeadIndex.from_store(store, heads=["L0H0"]).search(queries, k=15)
        expected_scores, expected_indices = brute_force(terms[:, 0, 0], queries, 15)
        assert torch.equal(scores, expected_scores) and torch.equal(indices, expected_indices)
        assert len(set(indices[0].tolist())) == 15

    @pytest.mark.parametrize("chunk_size", [4, 9, 30])
    def test_ties_inside_the_top_k_are_ordered_by_index(self, tmp_path, chunk_size):
        # the three best rows tie and nothing ties at the k-th place: the fast path (no full sort) must order them
        values = torch.tensor([0.1 * i for i in range(30)])
        values[[25, 3, 17]] = 9.0
        terms = values.reshape(30, 1, 1, 1)
        store = fake_store(tmp_path / "s", terms.numpy(), chunk_size)
        scores, indices = HeadIndex.from_store(store, heads=["L0H0"]).search(torch.ones(1, 1), k=5)
        assert indices[0].tolist() == [3, 17, 25, 29, 28]
        assert scores[0, :3].tolist() == [9.0, 9.0, 9.0]

    def test_only_finished_chunks_are_searched(self, tmp_path):
        terms = torch.randn(50, 1, 2, 8, generator=torch.Generator().manual_seed(2))
        store = fake_store(tmp_path / "s", terms.numpy(), chunk_size=10, done=[1, 3])
        index = HeadIndex.from_store(store, heads=["L0H1"])
        assert store.done_rows() == [(10, 20), (30, 40)] and store.n_done == index.n_images == 20
        queries = torch.randn(3, 8)
        scores, indices = index.search(queries, k=20)
        finished = torch.cat([torch.arange(10, 20), torch.arange(30, 40)])
        _, expected = brute_force(terms[finished, 0, 1], queries, 20)
        assert torch.equal(indices, finished[expected])
        with pytest.raises(InputError, match=r"k must lie in 1\.\.20"):
            index.search(queries, k=21)

    def test_streams_100k_images_one_chunk_at_a_time(self, tmp_path, monkeypatch):
        n, d, chunk_size = 100_000, 32, 4096
        terms = np.random.default_rng(3).standard_normal((n, 1, 1, d), dtype=np.float32)
        store = fake_store(tmp_path / "s", terms, chunk_size)
        reads = []
        open_array = zarr.open_array

        class Spy:
            def __init__(self, array):
                self.array, self.shape = array, array.shape

            def __getitem__(self, key):
                reads.append(key.stop - key.start)
                return self.array[key]

        monkeypatch.setattr(zarr, "open_array", lambda *a, **kw: Spy(open_array(*a, **kw)))
        index = HeadIndex.from_store(store, heads=["L0H0"])
        queries = torch.from_numpy(terms[:3, 0, 0])
        tracemalloc.start()
        scores, indices = index.search(queries, k=5)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert reads == [chunk_size] * (n // chunk_size) + [n % chunk_size]
        assert peak < n * d * 4 / 4  # numpy/zarr buffers: ~2 MB (a 0.5 MB chunk and its copies), not the 12.8 MB array
        _, expected = brute_force(torch.from_numpy(terms[:, 0, 0]), queries, 5)
        assert torch.equal(indices, expected)


class TestHeadChoice:
    def test_property_heads_come_from_the_labels(self, tmp_path):
        terms = torch.randn(30, 2, 2, 8, generator=torch.Generator().manual_seed(4))
        store = fake_store(tmp_path / "s", terms.numpy(), chunk_size=8)
        labels = labels_table(colour=["L0H1", "L1H0"], shape=["L0H0"])
        by_property = HeadIndex.from_store(store, property="colour", labels=labels)
        assert by_property.heads == ["L0H1", "L1H0"]
        queries = torch.randn(2, 8)
        by_heads = HeadIndex.from_store(store, heads=["L0H1", "L1H0"])
        assert torch.equal(by_property.search(queries, 5)[1], by_heads.search(queries, 5)[1])

    def test_bad_choices_say_what_exists(self, tmp_path):
        store = fake_store(tmp_path / "s", np.zeros((12, 2, 3, 4), np.float32), chunk_size=5)
        labels = labels_table(colour=["L0H1"], location=["L1H0"])
        with pytest.raises(InputError, match="no head is labelled 'shape'. Labelled properties: colour, location"):
            HeadIndex.from_store(store, property="shape", labels=labels)
        with pytest.raises(InputError, match="Did you mean: colour"):
            HeadIndex.from_store(store, property="colours", labels=labels)
        with pytest.raises(InputError, match="needs labels="):
            HeadIndex.from_store(store, property="colour")
        with pytest.raises(InputError, match=r"head L9H0 is not in the store: it has layers \[0, 1\] with 3 heads"):
            HeadIndex.from_store(store, heads=["L9H0"])
        with pytest.raises(InputError, match="head L1H3 is not in the store"):
            HeadIndex.from_store(store, heads=["L1H3"])
        with pytest.raises(InputError, match="not of the form 'L<layer>H<head>'"):
            HeadIndex.from_store(store, heads=["layer1"])
        with pytest.raises(InputError, match="give one of heads=.*, property=.* or embedding=True"):
            HeadIndex.from_store(store)
        with pytest.raises(InputError, match="give one of heads="):
            HeadIndex.from_store(store, heads=["L0H0"], embedding=True)
        with pytest.raises(InputError, match="metric must be one of dot, cosine"):
            HeadIndex.from_store(store, heads=["L0H0"], metric="l2")

    def test_a_store_without_finished_images_is_refused(self, tmp_path):
        unfinished = fake_store(tmp_path / "a", np.zeros((12, 1, 1, 4), np.float32), chunk_size=5, done=[])
        empty = fake_store(tmp_path / "b", np.zeros((0, 1, 1, 4), np.float32), chunk_size=5)
        for store in (unfinished, empty):
            with pytest.raises(InputError, match="has no finished images to search"):
                HeadIndex.from_store(store, heads=["L0H0"])


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def world(toy, tmp_path_factory):
    """toy-shapes, a 600-scene store and the registry's labels of its heads."""
    store = collect(toy, shapes_world_images(600, seed=WORLD_SEED), tmp_path_factory.mktemp("n") / "s", progress=False)
    spans = clip_lens.analyses.get("textspan")(toy).run(store, bank="shapes-attributes", m=20)
    return store, clip_lens.analyses.get("head_labels")(toy).run(spans)


class TestNeighbors:
    def test_registered(self):
        assert clip_lens.analyses.get("neighbors") is Neighbors

    def test_image_query_representation_matches_the_store(self, toy, world):
        store, _ = world
        images = shapes_world_images(600, seed=WORLD_SEED).load(100, 104)[0]
        search = Neighbors(toy)
        stored = store.read("heads")[100:104]
        torch.testing.assert_close(search.represent(images, ["L3H1", "L1H2"]), stored[:, 3, 1] + stored[:, 1, 2], atol=1e-5, rtol=0)
        result = search.run(store, query_images=images, head="L1H2", k=8, metric="cosine")
        assert result.indices.shape == (4, 8) and result.heads == ["L1H2"]
        assert result.indices[:, 0].tolist() == [100, 101, 102, 103]  # a store image is its own nearest
        torch.testing.assert_close(result.scores[:, 0], torch.ones(4), atol=1e-5, rtol=0)

    def test_whole_embedding_search_finds_each_store_image_itself(self, toy, world):
        store, _ = world
        images = shapes_world_images(600, seed=WORLD_SEED).load(200, 203)[0]
        search = Neighbors(toy)
        unit = toy.encode_image(images, normalize=True).detach()  # the forward pass, not the decomposition
        torch.testing.assert_close(search.represent(images, None), unit, atol=1e-5, rtol=0)
        torch.testing.assert_close(store.read("embedding")[200:203], unit, atol=1e-5, rtol=0)
        result = search.run(store, query_images=images, embedding=True, k=5, metric="cosine")
        assert result.heads is None and result.indices[:, 0].tolist() == [200, 201, 202]
        torch.testing.assert_close(result.scores[:, 0], torch.ones(3), atol=1e-5, rtol=0)
        assert NeighborsResult.from_dict(result.to_dict()).heads is None

    def test_text_query_is_the_text_embedding_dotted_with_head_terms(self, toy, world):
        store, _ = world
        texts = ["a red shape", "a shape on a striped background"]
        result = Neighbors(toy).run(store, query_texts=texts, head="L3H1", k=3)
        text = toy.encode_text(toy.to_tokens(texts), normalize=True)
        expected = torch.topk(text @ store.read("heads")[:, 3, 1].T, 3)
        torch.testing.assert_close(result.scores, expected.values, atol=1e-5, rtol=0)
        assert torch.equal(result.indices, expected.indices)

    def test_bad_queries(self, toy, world):
        store, labels = world
        search = Neighbors(toy)
        with pytest.raises(InputError, match="images are 32x32 but toy-shapes takes 64x64"):
            search.run(store, query_images=torch.zeros(1, 3, 32, 32), head="L3H1")
        with pytest.raises(InputError, match="either query_images=.* or query_texts="):
            search.run(store, head="L3H1")
        labelled = sorted({h.label for h in labels.heads if h.label is not None})
        assert "size" not in labelled  # no head of toy-shapes writes size alone
        with pytest.raises(InputError, match=f"Labelled properties: {', '.join(labelled)}"):
            search.run(store, query_texts=["a big shape"], property="size", labels=labels)

    def test_result_saves_and_plots(self, toy, world, tmp_path):
        store, labels = world
        queries = shapes_world_images(2, seed=WORLD_SEED + 1).load(0, 2)[0]
        result = Neighbors(toy).run(store, query_images=queries, property="colour", labels=labels, k=4)
        assert result.property == "colour" and result.heads == [h.head for h in labels.heads if h.label == "colour"]
        loaded = NeighborsResult.load(result.save(tmp_path))
        assert torch.equal(loaded.indices, result.indices) and loaded.heads == result.heads
        query_thumbnails = ((queries.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
        assert isinstance(result.plot(shapes_world_loader(WORLD_SEED), query_thumbnails), Figure)
        texts = Neighbors(toy).run(store, query_texts=["a red shape"], head="L3H0", k=3)
        all_images = shapes_world_loader(WORLD_SEED)(range(600))
        assert isinstance(texts.plot(all_images), Figure)
        with pytest.raises(InputError, match="images must give 3 images"):
            texts.plot(lambda rows: all_images[:1])


class TestTextSubspace:
    def test_projection_is_idempotent_and_orthogonal(self, toy):
        prompts = world_prompts("colour")
        basis = text_basis(unit_texts(toy, prompts + prompts[:2]))  # repeated texts add no direction
        assert basis.shape == (8, 128)
        torch.testing.assert_close(basis @ basis.T, torch.eye(8), atol=1e-6, rtol=0)
        x = torch.randn(50, 128, generator=torch.Generator().manual_seed(5))
        projected = project(x, basis)
        torch.testing.assert_close(project(projected, basis), projected, atol=1e-6, rtol=0)
        torch.testing.assert_close((x - projected) @ basis.T, torch.zeros(50, 8), atol=1e-5, rtol=0)
        embeddings = unit_texts(toy, prompts)
        torch.testing.assert_close(project(embeddings, basis), embeddings, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("chunk_size", [7, 64])
    @pytest.mark.parametrize("metric", ["dot", "cosine"])
    def test_rows_and_queries_are_projected_chunk_by_chunk(self, toy, tmp_path, chunk_size, metric):
        g = torch.Generator().manual_seed(6)
        terms = torch.randn(200, 1, 2, 128, generator=g)
        store = fake_store(tmp_path / "s", terms.numpy(), chunk_size)
        texts = world_prompts("shape")
        index = HeadIndex.from_store(store, heads=["L0H0", "L0H1"], metric=metric, subspace="texts", texts=texts, model=toy)
        assert index.search_texts == texts
        queries = torch.randn(4, 128, generator=g)
        scores, indices = index.search(queries, k=15)
        basis = text_basis(unit_texts(toy, texts))
        rows, queries = project(terms[:, 0].sum(1), basis), project(queries, basis)
        if metric == "cosine":
            rows, queries = torch.nn.functional.normalize(rows, dim=-1), torch.nn.functional.normalize(queries, dim=-1)
        expected_scores, expected_indices = brute_force(rows, queries, 15)
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
        assert torch.equal(indices, expected_indices)

    def test_default_texts_are_the_fitting_span_texts(self, toy, world, tmp_path):
        store, labels = world
        texts = property_texts(labels, "background")
        assert sorted(texts) == sorted(world_prompts("background"))  # the labeller's background texts, each once
        queries = shapes_world_images(3, seed=WORLD_SEED + 1).load(0, 3)[0]
        result = Neighbors(toy).run(store, query_images=queries, property="background", labels=labels, k=5, subspace="texts")
        assert result.search_texts == texts
        assert NeighborsResult.load(result.save(tmp_path)).search_texts == texts

    def test_bad_subspaces(self, toy, tmp_path):
        store = fake_store(tmp_path / "s", np.zeros((12, 1, 2, 128), np.float32), chunk_size=5)
        labels = HeadLabelsResult("fake", "prototype", [
            HeadLabel("L0H0", "colour", 0.4, ["a circle", "a map"], [False, False]),
            HeadLabel("L0H1", "shape", 1.0, ["a circle"], [True]),
        ], ["colour", "shape"])
        with pytest.raises(InputError, match="no span text of the heads labelled 'colour' fits 'colour'.*pass texts="):
            HeadIndex.from_store(store, property="colour", labels=labels, subspace="texts", model=toy)
        assert HeadIndex.from_store(store, property="shape", labels=labels, subspace="texts", model=toy).basis.shape == (1, 128)
        with pytest.raises(InputError, match="subspace must be None or 'texts', got 'prompts'"):
            HeadIndex.from_store(store, heads=["L0H0"], subspace="prompts", model=toy)
        with pytest.raises(InputError, match="pass it with subspace='texts'"):
            HeadIndex.from_store(store, heads=["L0H0"], texts=["a red shape"])
        with pytest.raises(InputError, match="pass model=HookedCLIP"):
            HeadIndex.from_store(store, heads=["L0H0"], subspace="texts", texts=["a red shape"])
        with pytest.raises(InputError, match=r"with heads=\[...\] or embedding=True needs texts="):
            HeadIndex.from_store(store, heads=["L0H0"], subspace="texts", model=toy)
        with pytest.raises(InputError, match="texts is empty"):
            HeadIndex.from_store(store, heads=["L0H0"], subspace="texts", texts=[], model=toy)
        narrow = fake_store(tmp_path / "n", np.zeros((12, 1, 2, 16), np.float32), chunk_size=5)
        with pytest.raises(InputError, match="text embeddings have 128 dimensions but the store's terms have 16"):
            HeadIndex.from_store(narrow, heads=["L0H0"], subspace="texts", texts=["a red shape"], model=toy)
        with pytest.raises(InputError, match="Did you mean: colour"):
            world_prompts("color")


class TestConcepts:
    @pytest.mark.parametrize("chunk_size", [7, 64])
    def test_images_are_compared_by_their_distributions_over_the_texts(self, toy, tmp_path, chunk_size):
        g = torch.Generator().manual_seed(8)
        terms = torch.randn(150, 1, 2, 128, generator=g)
        store = fake_store(tmp_path / "s", terms.numpy(), chunk_size)
        texts = world_prompts("colour")
        index = HeadIndex.from_store(store, heads=["L0H0", "L0H1"], metric="concepts", texts=texts, model=toy, temperature=0.5)
        queries = torch.randn(4, 128, generator=g)
        scores, indices = index.search(queries, k=12)
        # the whole store at once, in float64: standardised over all rows (population std), softmax at T = 0.5
        directions = unit_texts(toy, texts).double()
        store_scores = terms[:, 0].sum(1).double() @ directions.T
        mean, std = store_scores.mean(0), store_scores.std(0, correction=0)
        def distribution(x):
            return (((x @ directions.T) - mean) / (std * 0.5)).softmax(-1)
        rows, queries = distribution(terms[:, 0].sum(1).double()), distribution(queries.double())
        torch.testing.assert_close(rows.sum(-1), torch.ones(150, dtype=torch.float64))
        expected_scores, expected_indices = brute_force(rows, queries, 12)
        torch.testing.assert_close(scores.double(), expected_scores, atol=1e-5, rtol=0)
        assert torch.equal(indices, expected_indices)
        assert index.search_texts == texts
        # no autograd graph: it would hold every chunk's rows in memory
        assert not (index.concepts.directions.requires_grad or index.concepts.mean.requires_grad)

    def test_bad_concepts(self, toy, world, tmp_path):
        store, labels = world
        with pytest.raises(InputError, match="already scores images by the texts alone; drop subspace='texts'"):
            HeadIndex.from_store(store, heads=["L0H0"], metric="concepts", subspace="texts", texts=["a red shape"], model=toy)
        with pytest.raises(InputError, match="temperature must be positive, got 0"):
            HeadIndex.from_store(store, heads=["L0H0"], metric="concepts", texts=["a red shape"], model=toy, temperature=0)
        with pytest.raises(InputError, match="metric='concepts' embeds texts with the model"):
            HeadIndex.from_store(store, heads=["L0H0"], metric="concepts", texts=["a red shape"])
        with pytest.raises(InputError, match="a text query has none"):
            Neighbors(toy).run(store, query_texts=["a red shape"], property="colour", labels=labels, metric="concepts")
        blank = fake_store(tmp_path / "b", np.zeros((12, 1, 2, 128), np.float32), chunk_size=5)
        with pytest.raises(InputError, match="'a red shape', 'a blue shape' score every one of its 12 image"):
            HeadIndex.from_store(blank, heads=["L0H0"], metric="concepts", texts=["a red shape", "a blue shape"], model=toy)


# --- the shapes world: searches measured against the scenes' known attributes ----------------------
N_QUERIES = 60


@pytest.fixture(scope="module")
def truth(toy, world):
    """What the tests compute independently of the plugin: every stored and query scene's attribute
    values (from the world), the query images' unit embeddings (forward pass) and head terms (core
    decomposition), and the store's arrays."""
    store, _ = world
    stored = [ShapesWorld(seed=WORLD_SEED).scene(int(i)) for i in store.ids()]
    queries = [ShapesWorld(seed=WORLD_SEED + 1).scene(i) for i in range(N_QUERIES)]
    images = batch_images(queries)
    with torch.no_grad():
        parts = toy.decompose(images, heads="all").normalized()
        embedding = toy.encode_image(images, normalize=True)
    attributes = ShapesWorld(version=1).attributes
    return {
        "store": {a: np.array([s.value(a) for s in stored]) for a in attributes},
        "query": {a: np.array([q.value(a) for q in queries]) for a in attributes},
        "query_heads": parts.heads.double(), "query_embedding": embedding.double(),
        "store_heads": store.read("heads").double(), "store_embedding": store.read("embedding").double(),
    }


def chance(truth, attribute: str) -> float:
    """The same-value share of random store images: per query, the share of store scenes with its value."""
    return float(np.mean([(truth["store"][attribute] == v).mean() for v in truth["query"][attribute]]))


def shares_by_hand(toy, truth, heads, texts, k: int = 10, temperature: float = 0.3) -> dict[str, np.ndarray]:
    """Per attribute, each query's share of same-value neighbours under metric='concepts', from the
    definition: head terms summed (or the unit embedding for heads=None), each text's scores
    standardised over the store, softmax at the temperature, ``p · p'``, top k by a stable sort."""
    if heads is None:
        rows, queries = truth["store_embedding"], truth["query_embedding"]
    else:
        pick = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in heads]
        rows = sum(truth["store_heads"][:, l, h] for l, h in pick)
        queries = sum(truth["query_heads"][:, l, h] for l, h in pick)
    directions = toy.encode_text(toy.to_tokens(list(texts)), normalize=True).detach().double()
    scores = rows @ directions.T
    mean, std = scores.mean(0), scores.std(0, correction=0)
    p_rows = (((rows @ directions.T) - mean) / (std * temperature)).softmax(-1)
    p_queries = (((queries @ directions.T) - mean) / (std * temperature)).softmax(-1)
    indices = (p_queries @ p_rows.T).argsort(dim=1, descending=True, stable=True)[:, :k].numpy()
    return {a: (truth["store"][a][indices] == truth["query"][a][:, None]).mean(1) for a in truth["store"]}


@pytest.fixture(scope="module")
def colour_truth(toy, world):
    store, labels = world
    return property_search_truth(toy, store, WORLD_SEED, labels, "colour", n_queries=N_QUERIES)


class TestShapesWorldTruth:
    """Searches on 600 stored scenes (seed 2024) with 60 held-out queries (seed 2025), top 10. Every
    claim is a share of neighbours whose attribute value equals the query's (known from the world),
    with a bootstrap 95% interval over the queries, against chance from the store's own values, the
    same scoring on the whole embedding, and random heads."""

    def test_concepts_search_equals_an_independent_computation(self, toy, truth, colour_truth):
        result = colour_truth
        assert result.texts == world_prompts("colour") and result.k == 10 and result.n_store == 600
        searched = {"heads": [result.heads], "embedding": [None], "random heads": result.searches["random heads"].heads}
        for name, head_sets in searched.items():
            expected = [shares_by_hand(toy, truth, heads, result.texts) for heads in head_sets]
            got = result.searches[name]
            # the colour share does not depend on how near-equal scores are ordered (they are the same colour)
            np.testing.assert_allclose(got.per_query["colour"], np.mean([e["colour"] for e in expected], 0), atol=1e-12)
            for attribute in result.attributes:  # the others may differ where float32 and float64 order near-ties apart
                assert got.share[attribute] == pytest.approx(np.mean([e[attribute].mean() for e in expected]), abs=0.03), (name, attribute)
                assert got.interval[attribute] == pytest.approx(bootstrap_ci(got.per_query[attribute]), abs=1e-12)
                assert got.interval[attribute][0] <= got.share[attribute] <= got.interval[attribute][1]
        for attribute in result.attributes:
            assert result.chance[attribute] == pytest.approx(chance(truth, attribute), abs=1e-12)
        difference = np.array(result.searches["heads"].per_query["colour"]) - result.searches["random heads"].per_query["colour"]
        assert result.gain["over random heads"]["mean"] == pytest.approx(difference.mean(), abs=1e-12)

    def test_random_heads_are_distinct_subsets_of_the_same_size(self, colour_truth):
        draws = colour_truth.searches["random heads"].heads
        every = {f"L{l}H{h}" for l in range(4) for h in range(4)}
        assert len(draws) == 5 and len({frozenset(d) for d in draws} | {frozenset(colour_truth.heads)}) == 6
        assert all(len(d) == len(colour_truth.heads) and set(d) <= every for d in draws)
        assert len(colour_truth.searches["random heads"].per_draw) == 5

    @pytest.mark.parametrize("metric, search, attribute", [
        ("concepts", {"property": "colour"}, "colour"),
        ("concepts", {"property": "shape"}, "shape"),
        ("concepts", {"property": "background"}, "background"),
        ("concepts", {"heads": ["L1H2"]}, "position"),  # the one position head (unlabelled by the offline labeller)
        ("dot", {"property": "colour"}, "colour"),
        ("dot", {"heads": ["L1H2"]}, "position"),
        ("cosine", {"property": "shape"}, "shape"),
        ("cosine", {"heads": ["L3H0"]}, "colour"),
        ("dot", {"heads": ["L3H1"]}, "size"),  # labelled "shape", but it retrieves by size
    ])
    def test_a_property_search_beats_chance_and_random_heads(self, toy, world, truth, metric, search, attribute):
        store, labels = world
        result = property_search_truth(toy, store, WORLD_SEED, labels if "property" in search else None, attribute=attribute,
                                       n_queries=N_QUERIES, metric=metric, **search)
        heads = result.searches["heads"]
        assert heads.interval[attribute][0] > chance(truth, attribute), heads.share
        low, _ = result.gain["over random heads"]["interval"]
        assert low > 0, result.gain  # the chosen heads, not any heads of that many

    @pytest.mark.parametrize("prop, search", [("colour", {}), ("background", {}), ("position", {"heads": ["L1H2"]})])
    def test_concepts_search_ignores_the_other_attributes(self, toy, world, truth, prop, search):
        """Only the property: every other attribute's interval reaches within 0.05 of its chance."""
        store, labels = world
        kwargs = search or {"labels": labels, "property": prop}
        result = property_search_truth(toy, store, WORLD_SEED, attribute=prop, n_queries=N_QUERIES, n_random=0, **kwargs)
        for attribute in result.attributes:
            if attribute != prop:
                low, high = result.searches["heads"].interval[attribute]
                assert low <= chance(truth, attribute) + 0.05 and high >= chance(truth, attribute) - 0.05, attribute

    @pytest.mark.parametrize("prop, search", [("colour", {}), ("background", {}), ("position", {"heads": ["L1H2"]})])
    def test_heads_beat_the_whole_embedding_under_dot_but_not_under_concepts(self, toy, world, prop, search):
        """What the heads add. With the raw dot product the heads beat the whole embedding (which ranks
        by every attribute at once); with metric='concepts' the property's texts do the selecting, and
        the whole embedding does as well as the heads (the upper bound of heads − embedding is ≤ 0.01)."""
        store, labels = world
        kwargs = search or {"labels": labels, "property": prop}
        dot = property_search_truth(toy, store, WORLD_SEED, attribute=prop, n_queries=N_QUERIES, n_random=0, metric="dot", **kwargs)
        assert dot.gain["over embedding"]["interval"][0] > 0.1
        concepts = property_search_truth(toy, store, WORLD_SEED, attribute=prop, n_queries=N_QUERIES, n_random=0, **kwargs)
        assert concepts.gain["over embedding"]["interval"][1] <= 0.01

    def test_shape_is_found_better_by_the_whole_embedding_than_by_the_shape_heads(self, toy, world, truth):
        store, labels = world
        result = property_search_truth(toy, store, WORLD_SEED, labels, "shape", n_queries=N_QUERIES, n_random=0)
        assert result.gain["over embedding"]["interval"][1] < 0
        assert result.searches["embedding"].interval["shape"][0] > 0.9 > result.searches["heads"].share["shape"]

    def test_no_heads_measures_the_embedding_alone_and_results_round_trip(self, toy, world, tmp_path):
        store, _ = world
        result = property_search_truth(toy, store, WORLD_SEED, heads=[], attribute="size", n_queries=10)
        assert list(result.searches) == ["embedding"] and result.gain == {} and result.texts == world_prompts("size")
        loaded = PropertySearchTruth.load(result.save(tmp_path))
        assert loaded.to_dict() == result.to_dict()
        table = loaded.to_markdown()
        assert table.count("\n") == 3 and "| whole embedding |" in table and "| chance |" in table

    def test_bad_input(self, toy, world):
        store, labels = world
        with pytest.raises(InputError, match="query_seed must differ"):
            property_search_truth(toy, store, WORLD_SEED, labels, "colour", query_seed=WORLD_SEED)
        with pytest.raises(InputError, match="unknown attribute 'colours'.*Did you mean: colour"):
            property_search_truth(toy, store, WORLD_SEED, heads=["L0H0"], attribute="colours")
        with pytest.raises(InputError, match="pass texts=.* or attribute="):
            property_search_truth(toy, store, WORLD_SEED, heads=["L0H0"])
        with pytest.raises(InputError, match="either heads=.* or property="):
            property_search_truth(toy, store, WORLD_SEED, labels, "colour", heads=["L0H0"])
        with pytest.raises(InputError, match="not a property search result"):
            PropertySearchTruth.from_dict({"model": "x"})

