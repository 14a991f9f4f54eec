"""A store written before ``collect.py`` was split (issue 29) opens, verifies, reads and resumes after it.

``tests/fixtures/store_before_split`` was written by the last single-module ``clip_lens/collect.py``
(commit 0afbd1c): ``collect(HookedCLIP.from_pretrained("toy-shapes"), shapes_world_images(8, seed=3),
out, heads=[3], chunk_size=4, batch_size=4, workers=0)``. The split moved code, not the format, so the
current modules must read it as their own and a resume must find nothing to do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from clip_lens import HookedCLIP
from clip_lens.collect import Store, collect, shapes_world_images
from tests.helpers import store_files

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_before_split"
ARGS = dict(heads=[3], chunk_size=4, batch_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


def test_a_store_written_before_the_split_opens_verifies_and_reads_as_a_fresh_one(toy, tmp_path):
    old = Store.open(FIXTURE)
    assert old.complete and old.n_done == 8 and old.verify() == {}
    fresh = collect(toy, shapes_world_images(8, seed=3), tmp_path / "fresh", **ARGS)
    assert old.arrays == fresh.arrays and old.ids() == fresh.ids()
    for name in old.arrays:  # the same numbers: the format and the terms did not change
        np.testing.assert_allclose(old.read(name).numpy(), fresh.read(name).numpy(), rtol=0, atol=1e-6)


def test_a_store_written_before_the_split_resumes_with_nothing_to_recompute(toy, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(FIXTURE, out)
    before = store_files(out)
    resumed = collect(toy, shapes_world_images(8, seed=3), out, **ARGS)
    assert resumed.recomputed == {"damaged": [], "changed": []}
    assert store_files(out) == before  # not a byte rewritten
