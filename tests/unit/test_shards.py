"""WebDataset tar shards as an image source (`clip_lens.shards`), and `load_image_bytes`."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip_lens.shards as shards_module
from clip_lens.errors import InputError
from clip_lens.files import load_image, load_image_bytes
from clip_lens.shards import TarShards, expand_braces, is_shard, shard_paths
from tests.helpers import tar_of, write_shards


def colour_images(n: int) -> list[Image.Image]:
    """``n`` distinct small images (noise, so a mix-up of samples or bytes shows in the pixels)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (6 + i, 9, 3), dtype=np.uint8)) for i in range(n)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def written(tmp_path):
    images = colour_images(5)
    paths = write_shards(tmp_path / "shards", images, per_shard=2, labels=[3, 1, 4, 1, 5])
    return images, paths


# --- the index against what was written -----------------------------------------------------------
def test_index_matches_what_was_written(written):
    images, paths = written
    shards = TarShards(paths[0].parent)
    assert shards.paths == paths and len(paths) == 3
    assert len(shards) == 5 and shards.n_ignored == 0
    assert shards.ids == ["shard-000000.tar/000000", "shard-000000.tar/000001", "shard-000001.tar/000002",
                          "shard-000001.tar/000003", "shard-000002.tar/000004"]
    assert shards.labels == [3, 1, 4, 1, 5] and shards.label(2) == 4
    for i, image in enumerate(images):
        assert shards.read(i) == png(image)
        decoded = shards.image(i)
        assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(image))
    assert shards.description == "3 tar shards, 5 images"
    assert shards.name(4) == "shard-000002.tar/000004.png"
    assert np.array_equal(np.asarray(shards.image(-1)), np.asarray(images[-1]))
    with pytest.raises(IndexError, match="outside the 5 samples"):
        shards.read(5)


def test_samples_without_labels_have_label_minus_one(tmp_path):
    shards = TarShards(write_shards(tmp_path, colour_images(2), per_shard=10))
    assert shards.labels == [-1, -1] and shards.description == "1 tar shard, 2 images"


def test_indexing_reads_headers_not_image_bytes(tmp_path, monkeypatch):
    big = os.urandom(2_000_000)  # never decoded: only its size matters
    path = tar_of(tmp_path / "big.tar", [(f"{i}.jpg", big) for i in range(3)] + [("0.cls", b"7")])
    read = []

    class Counting(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(shards_module, "open", lambda p, mode="rb", **kw: Counting(p, "rb"), raising=False)
    shards = TarShards(path)
    assert len(shards) == 3 and sum(read) < 20_000, sum(read)
    monkeypatch.undo()
    assert shards.read(1) == big and shards.label(0) == 7


# --- shard paths ----------------------------------------------------------------------------------
def test_brace_patterns_expand_like_braceexpand():
    assert expand_braces("d/train-{000000..000002}.tar") == [f"d/train-00000{i}.tar" for i in range(3)]
    assert expand_braces("s{8..11}") == ["s8", "s9", "s10", "s11"]
    assert expand_braces("s{08..11}") == ["s08", "s09", "s10", "s11"]
    assert expand_braces("s{0..10..5}") == ["s0", "s5", "s10"]
    assert expand_braces("s{3..1}") == ["s3", "s2", "s1"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("x{a,{1..2}}") == ["xa", "x1", "x2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize("pattern", ["d/train-{000..003.tar", "d/train-000..003}.tar", "d/}{0..3}.tar",
                                     "d/train-{abc}.tar", "d/train-{}.tar", "d/train-{0..x}.tar",
                                     "d/train-{0..4..0}.tar"])
def test_a_bad_brace_pattern_is_an_input_error_naming_it(pattern):
    with pytest.raises(InputError, match="not a valid brace pattern") as info:
        shard_paths(pattern)
    assert repr(pattern) in str(info.value) and "{000000..000099}" in str(info.value)


def test_brace_pattern_finds_the_shards_and_names_the_first_missing_one(written):
    _, paths = written
    folder = paths[0].parent
    assert shard_paths(str(folder / "shard-{000000..000002}.tar")) == paths
    assert shard_paths(folder / "shard-{000001..000002}.tar") == paths[1:]
    with pytest.raises(InputError) as info:
        shard_paths(str(folder / "shard-{0..2}.tar"))  # not zero-padded: no such files
    message = str(info.value)
    assert f"tar shard {folder / 'shard-0.tar'} does not exist (and 2 more of the 3 shards)" in message
    with pytest.raises(InputError, match="shard-000003.tar does not exist;"):
        shard_paths(str(folder / "shard-{000000..000003}.tar"))


def test_folders_are_read_recursively_in_name_order(tmp_path):
    image = [colour_images(1)[0]]
    for sub, name in [("b", "x.tar"), ("a", "z.tar"), ("a", "y.tar"), ("", "c.tar")]:
        (tmp_path / sub).mkdir(exist_ok=True)
        write_shards(tmp_path / "tmp", image, per_shard=1)[0].rename(tmp_path / sub / name)
    (tmp_path / "notes.txt").write_text("not a shard")
    expected = [tmp_path / "a" / "y.tar", tmp_path / "a" / "z.tar", tmp_path / "b" / "x.tar", tmp_path / "c.tar"]
    assert shard_paths(tmp_path) == expected
    assert shard_paths([tmp_path / "c.tar", tmp_path / "a"]) == [expected[3], *expected[:2]]
    assert is_shard(tmp_path / "c.tar") and not is_shard(tmp_path / "notes.txt") and not is_shard(tmp_path / "a")


def test_bad_specs_are_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    cases = [(tmp_path / "empty", "holds no .tar shards"), (tmp_path / "notes.txt", "is not a tar shard"),
             (tmp_path / "gone.tar", f"tar shard {tmp_path / 'gone.tar'} does not exist"), ([], "is empty"),
             (3, "cannot read tar shards from a int")]
    for spec, expected in cases:
        with pytest.raises(InputError, match=re.escape(expected)):
            shard_paths(spec)
    path = write_shards(tmp_path / "s", colour_images(1), per_shard=1)[0]
    with pytest.raises(InputError, match="is given twice"):
        shard_paths([path, path.parent])


def test_shards_of_the_same_name_in_two_folders_get_distinct_ids(tmp_path):
    images = colour_images(2)
    first = write_shards(tmp_path / "train", images[:1], per_shard=1)
    second = write_shards(tmp_path / "val", images[1:], per_shard=1)
    shards = TarShards([*first, *second])
    assert shards.ids == ["train/shard-000000.tar/000000", "val/shard-000000.tar/000000"]  # same key, two samples


# --- WebDataset grouping --------------------------------------------------------------------------
def test_grouping_by_key_ignores_samples_without_an_image(tmp_path):
    a, b, c = (png(image) for image in colour_images(3))
    path = tar_of(tmp_path / "g.tar", [
        ("dir/one.cls", b"2"), ("dir/one.jpg.json", b"{}"), ("dir/one.PNG", a),  # key dir/one, upper-case extension
        ("two.txt", b"caption only"), ("two.json", b"{}"),  # no image: ignored, counted once
        ("three.seg.png", c), ("three.png", b),  # the plain image extension wins over a compound one
        ("four.seg.png", c),  # only a compound image extension: that is the image
        ("dir/one.label", b"9"),  # a later member joins the earlier sample; the first label is kept
        ("five.label", b" 12\n"), ("five.bmp", png(colour_images(1)[0])),
    ])
    shards = TarShards(path)
    assert shards.ids == ["g.tar/dir/one", "g.tar/three", "g.tar/four", "g.tar/five"]
    assert shards.n_ignored == 1 and shards.description == "1 tar shard, 4 images (1 samples without an image left out)"
    assert [shards.read(i) for i in range(3)] == [a, b, c]
    assert shards.labels == [2, -1, -1, 12]
    assert shards.name(0) == "g.tar/dir/one.png"


@pytest.mark.parametrize("text", [b"cat", b"1.5", b"", b"\xff\xfe", b"1 2", b"7" * 100])
def test_a_label_that_is_not_one_integer_is_refused_naming_the_member(tmp_path, text):
    path = tar_of(tmp_path / "l.tar", [("a.png", png(colour_images(1)[0])), ("a.cls", text),
                                        ("b.png", png(colour_images(1)[0])), ("b.cls.txt", b"-3\n")])
    shards = TarShards(path)
    assert shards.label(1) == -3
    with pytest.raises(InputError, match=r"l\.tar: the label member l\.tar/a\.cls holds .*, not one integer"):
        shards.label(0)


def test_a_shard_without_images_is_an_input_error(tmp_path):
    path = tar_of(tmp_path / "text.tar", [("a.txt", b"a"), ("b.cls", b"1")])
    with pytest.raises(InputError, match=r"text\.tar holds no images \(2 members, 2 samples without an image"):
        TarShards(path)


# --- damage ---------------------------------------------------------------------------------------
def test_a_corrupt_image_names_its_id_and_the_others_still_load(tmp_path):
    images = colour_images(4)
    members = [images[0], b"this is not an image at all", png(images[2])[:60], images[3]]
    shards = TarShards(write_shards(tmp_path, members, per_shard=4))
    for i, expected in [(1, "is not an image file"), (2, "truncated or corrupt")]:
        with pytest.raises(InputError, match=expected) as info:
            shards.image(i)
        assert f"image shard-000000.tar/00000{i}.png " in str(info.value)
    for i in (0, 3):
        assert np.array_equal(np.asarray(shards.image(i)), np.asarray(images[i]))


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    second_header = 512 + 512 * ((len(png(colour_images(1)[0])) + 511) // 512)  # after member 0 (no pax headers)
    if kind == "cut in data":
        path.write_bytes(data[:second_header + 600])
    elif kind == "cut in header":
        path.write_bytes(data[:second_header + 100])
    elif kind == "garbage header":
        path.write_bytes(data[:second_header] + b"x" * 512 + data[second_header + 512:])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not a tar":
        path.write_bytes(b"hello" * 300)


@pytest.mark.parametrize("kind, count", [("cut in data", 1), ("cut in header", 1), ("garbage header", 1),
                                         ("empty", 0), ("not a tar", 0)])
def test_a_truncated_or_damaged_tar_names_the_shard(tmp_path, kind, count):
    paths = write_shards(tmp_path, colour_images(6), per_shard=3)
    _damage(paths[1], kind)
    with pytest.raises(InputError) as info:
        TarShards(tmp_path)
    message = str(info.value)
    assert message.startswith(f"tar shard {paths[1]} is truncated or damaged: "
                              f"its headers could be read for {count} members")
    assert message.endswith("re-create or remove the shard.")


def test_a_shard_cut_after_indexing_is_an_input_error_on_read(tmp_path):
    path = write_shards(tmp_path, colour_images(2), per_shard=2)[0]
    shards = TarShards(path)
    path.write_bytes(path.read_bytes()[:1024])
    with pytest.raises(InputError, match=r"ends before the image of shard-000000\.tar/000001"):
        shards.read(1)


# --- processes ------------------------------------------------------------------------------------
def test_pickle_round_trip_then_read(written):
    images, paths = written
    shards = TarShards(paths)
    shards.read(0)  # an open handle, which must not travel
    state = shards.__getstate__()
    assert "_files" not in state and "_lock" not in state
    copy = pickle.loads(pickle.dumps(shards))
    assert copy.ids == shards.ids and copy.labels == [3, 1, 4, 1, 5]
    assert [copy.read(i) for i in range(5)] == [png(image) for image in images]
    shards.close()
    assert shards.read(4) == png(images[4])  # reopened


_FORKED: TarShards | None = None


def _read_in_child(i: int) -> tuple[int, str, int]:
    data = _FORKED.read(i)
    return os.getpid(), hashlib.sha256(data).hexdigest(), _FORKED._pid


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_reads_after_fork_use_the_childs_own_handles(written):
    global _FORKED
    images, paths = written
    _FORKED = TarShards(paths)
    parent = _FORKED.read(3)  # the parent holds an open handle on shard 1 before forking
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(_read_in_child, [4, 3, 2, 1, 0] * 4, chunksize=1)
    finally:
        _FORKED = None
    expected = [hashlib.sha256(png(images[i])).hexdigest() for i in [4, 3, 2, 1, 0] * 4]
    assert [digest for _, digest, _ in results] == expected
    assert all(pid == handle_pid != os.getpid() for pid, _, handle_pid in results)
    assert parent == png(images[3])


# --- bytes and files decode alike -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["corrupt", "header-only", "truncated", "empty", "bomb", "large"])
def test_load_image_bytes_and_load_image_give_the_same_message(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is a bomb (> 2x), 40x40 only too large
    good = png(Image.new("RGB", (20, 20), (200, 30, 30)))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 30, 200)).save(buffer, format="JPEG", quality=95)
    data = {"corrupt": b"this is not an image at all", "header-only": good[:33], "truncated": buffer.getvalue()[:400],
            "empty": b"", "bomb": png(Image.new("L", (100, 100))), "large": png(Image.new("L", (40, 40)))}[kind]
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(data)
    with pytest.raises(InputError) as from_file:
        load_image(path, what="mask")
    with pytest.raises(InputError) as from_bytes:
        load_image_bytes(data, "shard.tar/x.png", what="mask")
    assert str(from_file.value).startswith(f"mask {path} ")
    assert str(from_bytes.value).startswith("mask shard.tar/x.png ")
    assert str(from_file.value).replace(str(path), "NAME") == str(from_bytes.value).replace("shard.tar/x.png", "NAME")


def test_load_image_bytes_converts_modes_like_load_image(tmp_path):
    grey = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
    path = tmp_path / "sixteen.png"
    grey.save(path)
    from_bytes = load_image_bytes(path.read_bytes(), "x.png")
    assert from_bytes.mode == "RGB" and np.array_equal(np.asarray(from_bytes), np.asarray(load_image(path)))
    assert load_image_bytes(path.read_bytes(), "x.png", mode=None).mode == load_image(path, mode=None).mode
