"""Collection at scale: images that fail to decode are skipped and counted, DataLoader workers give
the same store, mixed precision stays near fp32, and the hot loop waits for the device once per chunk."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_lens import HookedCLIP, checks
from clip_lens.collect import Store, batches, collect, image_source, shapes_world_images
from clip_lens.errors import InputError, StoreCorruptError
from clip_lens.toy.world import ShapesWorld
from tests.helpers import store_files as normalised_files


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


def scene_folder(folder: Path, n: int, bad: set[int]) -> list[Path]:
    """``n`` scene PNGs named 000.png …; the ones in ``bad`` hold bytes no decoder reads."""
    folder.mkdir()
    world = ShapesWorld(seed=5)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        if i in bad:
            path.write_bytes(b"not an image at all")
        else:
            Image.fromarray(world.scene(i).image).save(path)
        paths.append(path)
    return paths


def store_files(path: Path) -> dict[str, bytes]:
    return {name: data for name, data in normalised_files(path).items() if name != "lock"}  # identity as a placeholder


def test_undecodable_images_are_skipped_counted_and_left_out_of_every_read(toy, tmp_path):
    paths = scene_folder(tmp_path / "images", 10, bad={1, 4, 5})
    store = collect(toy, tmp_path / "images", tmp_path / "s", chunk_size=4, batch_size=2, workers=0, progress=False)
    assert store.complete and store.n_images == 10 and store.n_done == 7
    assert sorted(store.skipped()) == [1, 4, 5]
    assert all(name == str(paths[row]) and "not an image" in reason for row, (name, reason) in store.skipped().items())
    good = [p for i, p in enumerate(paths) if i not in {1, 4, 5}]
    assert store.ids() == [str(p) for p in good]
    # the rows read are the good images' terms, in order, equal to collecting only those images
    clean = collect(toy, good, tmp_path / "clean", chunk_size=7, batch_size=7, workers=0, progress=False)
    for name in ("embedding", "heads", "labels"):
        torch.testing.assert_close(store.read(name), clean.read(name), atol=2e-6, rtol=1e-5)
    # chunk starts are numbered like ids(): 0, then 4 - 1 skipped, then 8 - 3 skipped
    assert [start for start, _ in store.iter_chunks("embedding")] == [0, 3, 5]
    assert not torch.isnan(store.read("heads")).any()


def test_workers_write_the_same_store_as_the_main_process(toy, tmp_path):
    scene_folder(tmp_path / "images", 12, bad={7})
    one = collect(toy, tmp_path / "images", tmp_path / "a", chunk_size=4, batch_size=3, workers=0, progress=False)
    two = collect(toy, tmp_path / "images", tmp_path / "b", chunk_size=4, batch_size=3, workers=2, progress=False)
    assert store_files(one.path) == store_files(two.path) and one.skipped() == two.skipped()


def test_a_chunk_whose_images_all_fail_is_finished_and_empty(toy, tmp_path):
    scene_folder(tmp_path / "images", 6, bad={0, 1, 2})
    store = collect(toy, tmp_path / "images", tmp_path / "s", chunk_size=3, batch_size=3, workers=0, progress=False)
    assert store.complete and store.n_done == 3 and sorted(store.skipped()) == [0, 1, 2]
    assert [(start, len(rows)) for start, rows in store.iter_chunks("heads")] == [(0, 0), (0, 3)]
    assert store.read("heads").shape == (3, toy.cfg.n_layers, toy.cfg.n_heads, toy.cfg.d_embed)


def test_a_marker_with_a_malformed_skipped_entry_is_damage(toy, tmp_path):
    scene_folder(tmp_path / "images", 4, bad={2})
    store = collect(toy, tmp_path / "images", tmp_path / "s", chunk_size=4, workers=0, progress=False)
    marker = tmp_path / "s" / "done" / "000000"
    data = json.loads(marker.read_text())
    data["skipped"] = {"9": "outside the chunk"}
    marker.write_text(json.dumps(data))
    with pytest.raises(StoreCorruptError, match="'skipped' entry"):
        Store.open(store.path).read("embedding")


def test_a_store_without_skipped_images_has_markers_as_before(toy, tmp_path):
    store = collect(toy, shapes_world_images(8), tmp_path / "s", chunk_size=4, progress=False)
    markers = [json.loads(p.read_text()) for p in sorted((store.path / "done").iterdir())]
    assert all(sorted(m) == ["arrays", "checksum", "chunk", "rows", "source", "store"] for m in markers) and store.skipped() == {}


def test_batches_from_workers_equal_batches_in_process(tmp_path):
    scene_folder(tmp_path / "images", 9, bad={3})
    source = image_source(tmp_path / "images", HookedCLIP.from_pretrained("toy-shapes").preprocess)
    ranges = [(0, 4), (4, 8), (8, 9)]
    here, there = list(batches(source, ranges)), list(batches(source, ranges, workers=2))
    assert [(b.start, b.stop, b.kept, b.skipped.keys()) for b in here] == [(b.start, b.stop, b.kept, b.skipped.keys()) for b in there]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(here, there))
    assert here[0].kept == [0, 1, 2] and list(here[0].skipped) == [3]


@pytest.mark.parametrize("precision, bound", [("bf16", 2e-2), ("fp16", 3e-3)])
def test_mixed_precision_collection_stays_near_fp32(toy, tmp_path, precision, bound):
    images = shapes_world_images(32, version=1)
    exact = collect(toy, images, tmp_path / "fp32", chunk_size=16, batch_size=8, progress=False)
    mixed = collect(toy, images, tmp_path / precision, chunk_size=16, batch_size=8, precision=precision, progress=False)
    assert mixed.meta["precision"] == precision and "precision" not in exact.meta
    for name in ("embedding", "heads"):
        a, b = exact.read(name), mixed.read(name)
        error = float((a - b).norm() / a.norm())
        assert 1e-6 < error < bound, (name, error)  # it did run in low precision, and stayed near fp32
    # the terms still sum to the (mixed-precision) unit embedding, to its rounding
    total = mixed.read("embed") + mixed.read("attn").sum(1) + mixed.read("mlp").sum(1) + mixed.read("bias")
    assert float((total - mixed.read("embedding")).norm(dim=-1).max()) < bound


def test_resuming_with_another_precision_is_refused(toy, tmp_path):
    collect(toy, shapes_world_images(8), tmp_path / "s", chunk_size=4, progress=False)
    with pytest.raises(InputError):
        collect(toy, shapes_world_images(8), tmp_path / "s", chunk_size=4, precision="bf16", progress=False)
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        collect(toy, shapes_world_images(8), tmp_path / "t", precision="fp8", progress=False)


@pytest.mark.parametrize("precision, bound", [("bf16", 2e-2), ("fp16", 3e-3)])
def test_model_autocast_runs_the_forward_low_and_the_read_out_in_fp32(toy, precision, bound):
    images, _ = shapes_world_images(4).load(0, 4)
    exact = toy.decompose(images, tokens=[3])
    with toy.autocast(precision):
        assert toy.encode_image(images).dtype != torch.float32  # the forward does run in low precision
        mixed = toy.decompose(images, tokens=[3])
    assert mixed.tokens.dtype == mixed.heads.dtype == torch.float32
    for name in ("embedding", "heads", "tokens"):
        a, b = getattr(exact, name), getattr(mixed, name)
        assert 1e-6 < float((a - b).norm() / a.norm()) < bound, name



def test_tiny_terms_keep_their_precision_under_fp16_because_the_read_out_is_fp32(toy):
    small = copy.deepcopy(toy)
    with torch.no_grad():
        small.visual.proj.mul_(1e-5)  # token terms ~1e-6: subnormal in fp16, where a read-out in fp16 loses digits
    images, _ = shapes_world_images(4).load(0, 4)
    reference = small.decompose(images, tokens=[3])
    with small.autocast("fp16"):
        mixed = small.decompose(images, tokens=[3])
    assert float(reference.tokens.abs().max()) < 1e-5
    assert float((mixed.tokens - reference.tokens).norm() / reference.tokens.norm()) < 3e-3


SYNCS = ("__bool__", "item", "tolist", "numpy", "__float__", "__int__", "__index__", "cpu")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts calls of the tensor methods that wait for the device (on CUDA) to return a host value."""
    counts = {"n": 0}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_decompose_reads_nothing_back_from_the_device_inside_deferred_checks(toy, host_reads):
    images, _ = shapes_world_images(4).load(0, 4)
    with checks.deferred():
        host_reads["n"] = 0
        toy.decompose(images, heads="all", tokens=[3])
        assert host_reads["n"] == 0


def test_a_nan_image_still_fails_when_checks_are_deferred(toy):
    images, _ = shapes_world_images(2).load(0, 2)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or inf"):
        with checks.deferred():
            toy.decompose(images)


def test_collect_waits_for_the_device_once_per_chunk_whatever_the_batch_size(toy, tmp_path, host_reads):
    images, _ = shapes_world_images(32).load(0, 32)
    counts = {}
    for batch in (1, 4, 16):
        host_reads["n"] = 0
        collect(toy, images, tmp_path / f"b{batch}", chunk_size=16, batch_size=batch, progress=False)
        counts[batch] = host_reads["n"]
    # 16, 4 and 1 batches per chunk: no host read happens per batch (only per chunk and per store)
    assert counts[1] == counts[4] == counts[16], counts


def test_tar_shards_collect_like_the_same_images_in_a_folder_with_labels_and_skips(toy, tmp_path):
    from tests.helpers import write_shards

    world = ShapesWorld(seed=5)
    images = [Image.fromarray(world.scene(i).image) for i in range(9)]
    images[6] = b"\x89PNG broken"
    write_shards(tmp_path / "shards", images, per_shard=4, labels=list(range(100, 109)))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        if i != 6:
            image.save(folder / f"{i:03d}.png")
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    shards = collect(toy, pattern, tmp_path / "s", chunk_size=4, batch_size=2, workers=2, progress=False)
    files = collect(toy, folder, tmp_path / "f", chunk_size=4, batch_size=2, workers=0, progress=False)
    assert shards.n_images == 9 and shards.n_done == 8 and list(shards.skipped()) == [6]
    assert shards.skipped()[6][0] == "shard-000001.tar/000006"
    assert shards.read("labels").tolist() == [100, 101, 102, 103, 104, 105, 107, 108]
    torch.testing.assert_close(shards.read("heads"), files.read("heads"), atol=2e-6, rtol=1e-5)
    assert shards.ids()[6] == "shard-000001.tar/000007"
    from clip_lens.collect import store_images

    shown = store_images(shards)([6])[0]
    assert np.array_equal(np.asarray(shown), np.asarray(images[7]))


def test_a_recomputed_chunk_records_its_skipped_images_again(toy, tmp_path):
    scene_folder(tmp_path / "images", 8, bad={5})
    store = collect(toy, tmp_path / "images", tmp_path / "s", chunk_size=4, batch_size=2, workers=0, progress=False)
    before = store_files(store.path)
    (store.path / "done" / "000001").unlink()  # as if the run had died before finishing chunk 1
    resumed = collect(toy, tmp_path / "images", tmp_path / "s", chunk_size=4, batch_size=2, workers=0, progress=False)
    assert store_files(resumed.path) == before and list(resumed.skipped()) == [5]


def test_ranks_skip_the_same_images_and_write_the_single_process_store(toy, tmp_path, monkeypatch):
    from tests.unit.test_collect_distributed import assert_same_store, run_ranks

    scene_folder(tmp_path / "images", 10, bad={2, 7})
    single = collect(toy, tmp_path / "images", tmp_path / "one", chunk_size=4, batch_size=2, workers=0, progress=False)
    results = run_ranks(monkeypatch, toy, 2, lambda rank, model: collect(
        model, tmp_path / "images", tmp_path / "two", chunk_size=4, batch_size=2, workers=0, progress=False))
    assert all(isinstance(r, Store) for r in results), results
    assert_same_store(tmp_path / "two", single.path)
    assert sorted(Store.open(tmp_path / "two").skipped()) == [2, 7]
