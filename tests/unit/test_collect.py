"""Collection into the chunked store: exact terms, resumption after a kill, no partial chunk read."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_lens import HookedCLIP
from clip_lens.collect import Store, collect, image_source, shapes_world_images, store_images, store_thumbnails
from clip_lens.errors import InputError


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


def test_store_terms_sum_to_the_unit_embedding_and_match_decompose(toy, tmp_path):
    store = collect(toy, shapes_world_images(20), tmp_path / "s", chunk_size=8, batch_size=4, progress=False)
    assert store.complete and store.n_chunks == 3
    total = store.read("embed") + store.read("attn").sum(1) + store.read("mlp").sum(1) + store.read("bias")
    torch.testing.assert_close(total, store.read("embedding"), atol=1e-5, rtol=0)
    torch.testing.assert_close(store.read("embedding").norm(dim=-1), torch.ones(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(store.read("heads").sum(2) + store.read("attn_bias"), store.read("attn"), atol=1e-5, rtol=0)
    images, _ = shapes_world_images(20).load(0, 20)
    direct = toy.decompose(images)
    torch.testing.assert_close(store.read("embedding_norm"), direct.embedding_norm, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(store.read("heads"), direct.normalized().heads, atol=1e-5, rtol=1e-4)
    assert store.head_outputs(3, 1).shape == (20, 128)
    assert store.ids() == [str(i) for i in range(20)]


def test_token_terms_projected_on_directions(toy, tmp_path):
    directions = torch.nn.functional.normalize(torch.randn(3, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    store = collect(toy, shapes_world_images(6), tmp_path / "t", heads=[3], tokens=[3], directions=directions, progress=False)
    tokens = store.read("tokens")
    assert tokens.shape == (6, 1, 4, 65, 3)
    torch.testing.assert_close(tokens.sum(3), store.read("heads") @ directions.T, atol=1e-5, rtol=1e-4)


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from clip_lens import HookedCLIP
    from clip_lens.collect import collect
    from clip_lens.toy.world import ShapesWorld, batch_images

    class SlowScenes:
        '''Shapes-world scenes; slow after the first chunks when ``delay`` (to be killed midway).'''
        def __init__(self, delay):
            self.world, self.delay = ShapesWorld(seed=3), delay
        def __len__(self):
            return 48
        def __getitem__(self, i):
            if self.delay and i >= 16:
                time.sleep(self.delay)
            return batch_images([self.world.scene(i)])[0], i % 5

    if __name__ == "__main__":
        collect(HookedCLIP.from_pretrained("toy-shapes"), SlowScenes(float(sys.argv[2])), sys.argv[1],
                chunk_size=8, batch_size=4, progress=False)
    """
)


@pytest.mark.slow  # long; the default suite stays under 5 minutes
def test_collect_resumes_after_a_kill_and_equals_an_uninterrupted_run(toy, tmp_path):
    script = tmp_path / "slow_scenes.py"
    script.write_text(SCRIPT)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(script), str(killed), "0.5"], cwd=tmp_path)
    deadline = time.time() + 120
    while len(list((killed / "done").glob("*"))) < 2:
        assert process.poll() is None and time.time() < deadline, "collection ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with pytest.raises(InputError, match="incomplete"):
        Store.open(killed)
    interrupted = Store.open(killed, partial=True)
    assert 2 <= len(interrupted.done_chunks()) < interrupted.n_chunks
    with pytest.raises(InputError, match="incomplete"):
        interrupted.read("heads", partial=False)
    assert len(interrupted.read("heads")) == 8 * len(interrupted.done_chunks())

    sys.path.insert(0, str(tmp_path))
    try:
        from slow_scenes import SlowScenes
    finally:
        sys.path.remove(str(tmp_path))
    resumed = collect(toy, SlowScenes(0), killed, chunk_size=8, batch_size=4, progress=False)
    fresh = collect(toy, SlowScenes(0), tmp_path / "fresh", chunk_size=8, batch_size=4, progress=False)
    assert resumed.complete
    for name in fresh.arrays:
        np.testing.assert_array_equal(resumed.read(name).numpy(), fresh.read(name).numpy(), err_msg=name)
    assert resumed.read("labels").tolist() == [i % 5 for i in range(48)]


def test_an_unmarked_chunk_is_never_read_and_is_rewritten(toy, tmp_path):
    out = tmp_path / "s"
    collect(toy, shapes_world_images(16), out, chunk_size=8, progress=False)
    expected = Store.open(out).read("embedding")
    os.remove(out / "done" / "000001")  # as if the process died after writing the data, before the marker
    import zarr

    zarr.open_array(str(out / "embedding"), mode="r+")[8:16] = 7.0  # a half-written chunk
    store = Store.open(out, partial=True)
    assert store.read("embedding", partial=True).shape == (8, 128)
    again = collect(toy, shapes_world_images(16), out, chunk_size=8, progress=False)
    torch.testing.assert_close(again.read("embedding"), expected, atol=0, rtol=0)


def test_resuming_with_other_settings_is_refused(toy, tmp_path):
    out = tmp_path / "s"
    collect(toy, shapes_world_images(8), out, chunk_size=8, progress=False)
    with pytest.raises(InputError, match="chunk_size: stored 8, now 4"):
        collect(toy, shapes_world_images(8), out, chunk_size=4, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a clip_lens store"):
        collect(toy, shapes_world_images(8), tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_image_folder_source_uses_the_model_preprocess(toy, tmp_path):
    from PIL import Image

    world_images, _ = shapes_world_images(3).load(0, 3)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(world_images):
        pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    source = image_source(folder, toy.preprocess)
    loaded, labels = source.load(0, 3)
    assert labels is None and source.ids[0].endswith("0.png")
    torch.testing.assert_close(loaded, world_images, atol=1e-5, rtol=0)
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png"):
        image_source(folder, toy.preprocess).load(0, 4)


def test_store_images_are_the_collected_images(toy, tmp_path):
    from PIL import Image

    from clip_lens.toy.world import ShapesWorld

    shapes = collect(toy, shapes_world_images(6, seed=3), tmp_path / "shapes", progress=False)
    world = ShapesWorld(seed=3, image_size=64)
    assert all(np.array_equal(np.asarray(im), world.scene(i).image) for im, i in zip(store_images(shapes)([2, 5]), [2, 5]))
    assert store_thumbnails(shapes)([0, 1, 2]).shape == (3, 64, 64, 3)

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((60, 80, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    files = collect(toy, folder, tmp_path / "files", progress=False)
    assert store_images(files)([1])[0].size == (80, 60) and store_thumbnails(files)([0, 1]).shape == (2, 64, 64, 3)
    (folder / "1.png").unlink()
    with pytest.raises(InputError, match="store image #1"):
        store_images(files)([1])

    tensors = collect(toy, torch.zeros(2, 3, 64, 64), tmp_path / "tensors", progress=False)
    with pytest.raises(InputError, match="does not record its images"):
        store_images(tensors)


@pytest.mark.parametrize(
    "images, match",
    [(torch.zeros(3, 64, 64), r"\[N, 3, H, W\]"), ("/no/such/folder", "no such image folder"), (42, "cannot read images")],
)
def test_bad_image_sources_get_clear_errors(images, match):
    with pytest.raises(InputError, match=match):
        image_source(images)
