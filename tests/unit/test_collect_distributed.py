"""`collect` by several processes (torch.distributed): one store, file for file the single-process one.

The torchrun tests launch real gloo jobs of 2 processes (slow: process start-up dominates). The fast
tests run the same protocol with 2 ranks as threads of this process (`ThreadRanks`), which exchange
objects the way the gloo group does, to cover the split, the shared lock and the error paths.
"""

import copy
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import clip_lens.collect as collect_module
from clip_lens import HookedCLIP
from clip_lens.collect import ImageSource, Store, collect, shapes_world_images
from clip_lens.distributed import launched
from clip_lens.errors import InputError, StoreLockedError, StoreWriteError
from tests.helpers import store_files

N, CHUNK = 24, 4  # 6 chunks: 3 per rank


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def single(toy, tmp_path_factory):
    """The store of a plain single-process collect (the reference)."""
    return collect(toy, shapes_world_images(N), tmp_path_factory.mktemp("single") / "store", chunk_size=CHUNK, progress=False).path


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a store folder, by relative path (the store's random identity as a placeholder)."""
    return store_files(folder)


def assert_same_store(path: Path, reference: Path) -> None:
    """The same files with the same bytes (no lock left), and the same decoded arrays and metadata."""
    got, expected = files(path), files(reference)
    assert sorted(got) == sorted(expected) and "lock" not in got
    assert [name for name in expected if got[name] != expected[name]] == []
    store, ref = Store.open(path), Store.open(reference)
    settings = lambda meta: {k: v for k, v in meta.items() if k not in ("identity", "checksum")}  # noqa: E731
    assert store.complete and settings(store.meta) == settings(ref.meta) and store.ids() == ref.ids()
    for name in ref.arrays:
        np.testing.assert_array_equal(store.read(name).numpy(), ref.read(name).numpy())


class ThreadRanks:
    """`clip_lens.distributed.Ranks` for ranks that are threads of one process (same methods)."""

    def __init__(self, rank: int, size: int, shared: dict):
        self.rank, self.size, self._shared = rank, size, shared

    def broadcast(self, value=None):
        shared = self._shared
        if self.rank == 0:
            shared["box"] = value
        shared["barrier"].wait()
        result = shared["box"]
        shared["barrier"].wait()  # nobody overwrites the box before all have read it
        return result

    def gather(self, value):
        shared = self._shared
        shared["slots"][self.rank] = value
        shared["barrier"].wait()
        result = list(shared["slots"])
        shared["barrier"].wait()
        return result


def run_ranks(monkeypatch, toy, size: int, work) -> list:
    """``work(rank, model)`` on ``size`` threads, each seeing itself as that rank of a group and with its own
    copy of ``toy`` (hooks are per model); each one's result or exception."""
    shared = {"barrier": threading.Barrier(size, timeout=60), "slots": [None] * size}
    local = threading.local()
    monkeypatch.setattr(collect_module.Ranks, "current", classmethod(lambda cls: getattr(local, "ranks", None)))
    results: list = [None] * size
    models = [copy.deepcopy(toy) for _ in range(size)]

    def target(rank: int):
        local.ranks = ThreadRanks(rank, size, shared)
        try:
            results[rank] = work(rank, models[rank])
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def record_written_chunks(monkeypatch) -> dict[int, list]:
    """rank → the chunks it writes from now on (in order)."""
    written: dict[int, list] = {0: [], 1: []}
    original = collect_module._write_chunk

    def record(store, arrays, c, chunk, skipped):
        written[collect_module.Ranks.current().rank].append(c)
        original(store, arrays, c, chunk, skipped)

    monkeypatch.setattr(collect_module, "_write_chunk", record)
    return written


def test_ranks_split_the_chunks_and_write_the_single_process_store(toy, single, tmp_path, monkeypatch):
    out = tmp_path / "store"
    written = record_written_chunks(monkeypatch)
    results = run_ranks(monkeypatch, toy, 2, lambda rank, model: collect(model, shapes_world_images(N), out, chunk_size=CHUNK, progress=False))
    assert all(isinstance(r, Store) and r.complete for r in results), results
    assert written == {0: [0, 2, 4], 1: [1, 3, 5]}  # chunk c by rank c % 2, each once
    assert_same_store(out, single)


def test_a_failed_rank_fails_every_rank_and_a_rerun_computes_only_the_missing_chunks(toy, single, tmp_path, monkeypatch):
    out = tmp_path / "store"
    scenes = shapes_world_images(N)

    def load(start, stop):
        if start == 3 * CHUNK:  # chunk 3: rank 1's second
            raise InputError("image unreadable")
        return scenes.load(start, stop)

    broken = ImageSource(N, load, scenes.ids, scenes.description, fingerprint=scenes.fingerprint)  # the same images
    results = run_ranks(monkeypatch, toy, 2, lambda rank, model: collect(model, broken, out, chunk_size=CHUNK, progress=False))
    assert isinstance(results[1], InputError) and "image unreadable" in str(results[1])
    assert isinstance(results[0], StoreWriteError) and "rank 1 of 2 failed: InputError: image unreadable" in str(results[0])
    # rank 0 wrote its chunks 0, 2 and 4; rank 1 wrote chunk 1, failed on 3 and stopped; the lock was released
    assert Store.open(out, partial=True).done_chunks() == [0, 1, 2, 4] and not (out / "lock").exists()
    written = record_written_chunks(monkeypatch)
    results = run_ranks(monkeypatch, toy, 2, lambda rank, model: collect(model, scenes, out, chunk_size=CHUNK, progress=False))
    assert all(isinstance(r, Store) for r in results), results
    assert written == {0: [3], 1: [5]}  # only the missing chunks, split between the ranks
    assert_same_store(out, single)


def test_a_rank_that_sees_another_folder_is_refused(toy, tmp_path, monkeypatch):
    """Ranks whose --out is not one shared folder (e.g. a node-local path) fail instead of writing two halves."""
    outs = [tmp_path / "node0" / "store", tmp_path / "node1" / "store"]
    (outs[1].parent).mkdir()
    results = run_ranks(monkeypatch, toy, 2, lambda rank, model: collect(model, shapes_world_images(N), outs[rank], chunk_size=CHUNK, progress=False))
    assert isinstance(results[1], StoreLockedError) and "shares" in str(results[1])
    assert isinstance(results[0], StoreWriteError) and "rank 1 of 2 failed: StoreLockedError" in str(results[0])
    assert not outs[1].exists() and not (outs[0] / "lock").exists()


def test_rank_0_holds_the_lock_against_a_plain_writer_while_the_job_runs(toy, tmp_path, monkeypatch):
    out = tmp_path / "store"
    refusals = []
    original = collect_module._write_chunk

    def write_and_try_a_second_writer(store, arrays, c, chunk, skipped):
        original(store, arrays, c, chunk, skipped)
        if c == 1:  # rank 1, while rank 0 holds the lock
            with pytest.raises(StoreLockedError, match="rank 0 of a job of 2 processes") as refused:
                collect_module._Lock.acquire(out)
            refusals.append(str(refused.value))

    monkeypatch.setattr(collect_module, "_write_chunk", write_and_try_a_second_writer)
    results = run_ranks(monkeypatch, toy, 2, lambda rank, model: collect(model, shapes_world_images(8), out, chunk_size=CHUNK, progress=False))
    assert all(isinstance(r, Store) for r in results) and len(refusals) == 1


@pytest.mark.parametrize(
    "environment, match",
    [({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
     ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "not a rank of WORLD_SIZE=2")],
)
def test_a_bad_launch_environment_is_an_input_error(monkeypatch, environment, match):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=match):
        launched()


def test_a_plain_run_is_not_a_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() is None


# -- real torchrun jobs (gloo, 2 processes) ---------------------------------------------------------

COMMAND = ["collect", "--model", "toy-shapes", "--shapes", str(N), "--chunk-size", str(CHUNK)]

DIE_AFTER_FIRST_CHUNK = textwrap.dedent(
    """
    import os
    import clip_lens.collect as c
    from clip_lens.cli import app

    original = c._write_chunk

    def write_then_die(store, arrays, chunk, values, skipped):
        original(store, arrays, chunk, values, skipped)
        if os.environ["RANK"] == "1":
            os._exit(3)  # a crash: no cleanup, no error sent to rank 0

    c._write_chunk = write_then_die
    app(prog_name="clip-lens")
    """
)


def torchrun(script: list[str], args: list[str], port: int) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), *script, *args],
        capture_output=True, text=True, env=environment, timeout=300,
    )


CLI = ["-m", "clip_lens.cli"]


@pytest.mark.slow
def test_torchrun_collect_equals_a_single_process_collect(single, tmp_path):
    out = tmp_path / "store"
    result = torchrun(CLI, [*COMMAND, "--out", str(out)], 29531)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"Store {out.resolve()}: {N} images in 6 chunks") == 1  # rank 0 reports, once
    assert_same_store(out, single)


@pytest.mark.slow
def test_a_crashed_rank_is_resumed_by_a_single_process(single, tmp_path):
    out, script = tmp_path / "store", tmp_path / "die.py"
    script.write_text(DIE_AFTER_FIRST_CHUNK)
    crashed = torchrun([str(script)], [*COMMAND, "--out", str(out)], 29532)
    assert crashed.returncode != 0
    done = Store.open(out, partial=True).done_chunks()
    assert 1 in done and 3 not in done and 5 not in done  # rank 1 died after chunk 1
    resumed = subprocess.run([sys.executable, *CLI, *COMMAND, "--out", str(out)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed: {len(done)} of 6 chunks were already done." in resumed.stdout
    assert_same_store(out, single)
