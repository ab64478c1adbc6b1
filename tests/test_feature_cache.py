"""The feature cache survives what a crash or a bad disk leaves: a shard cut short, a temporary file of a
writer that died, and a writer process killed with SIGKILL at random points (seeded, repeated). After
each: the cache opens, every chunk the writer acknowledged is there with its exact vectors, nothing
half-written is visible, and the next run computes only what is missing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from gallery_support import acknowledged_lines

from xbt.data.features import QUARANTINE, FeatureCache

DIM = 2048  # large rows: the writer spends most of its time inside a shard write, where kills matter


def _vectors(idx: list[int]) -> np.ndarray:
    """The vectors of items idx: exact, so a check can compare them bit for bit."""
    return np.asarray(idx, dtype=np.float32)[:, None] + np.arange(DIM, dtype=np.float32)[None, :] / DIM


def _keys(n: int) -> list[str]:
    return [f"key-{i:06d}" for i in range(n)]


def _fill(root: Path, n: int, chunk: int) -> None:
    FeatureCache("enc", root).get_or_compute(_keys(n), _vectors, chunk_size=chunk)


def test_a_truncated_shard_is_quarantined_and_recomputed(tmp_path):
    _fill(tmp_path, 30, chunk=10)
    shards = sorted((tmp_path / "enc").glob("shard-*.npz"))
    assert len(shards) == 3
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # a copy cut short, a disk fault
    with pytest.warns(UserWarning, match="unreadable shard"):
        cache = FeatureCache("enc", tmp_path)
    assert len(cache) == 20 and [p.name for p in cache.quarantined] == [shards[1].name]
    assert (tmp_path / "enc" / QUARANTINE / shards[1].name).read_bytes() == data[: len(data) // 2]
    computed: list[int] = []
    out = cache.get_or_compute(_keys(30), lambda idx: computed.extend(idx) or _vectors(idx))
    assert len(computed) == 10 and np.array_equal(out, _vectors(list(range(30))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healthy again: no warning at the next open
        assert len(FeatureCache("enc", tmp_path)) == 30


def test_a_shard_that_cannot_be_read_now_is_kept_not_quarantined(tmp_path, monkeypatch):
    """A transient OSError (too many open files, an I/O error) says nothing about a shard's content: it is
    left in place (before the fix it was moved to quarantine/ for good), its items are computed again in
    this run, and the next open reads it."""
    import errno

    _fill(tmp_path, 20, chunk=10)
    shards = sorted((tmp_path / "enc").glob("shard-*.npz"))
    real_load = np.load

    def flaky(path, *args, **kwargs):
        if Path(path) == shards[0]:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", flaky)
    with pytest.warns(UserWarning, match="could not read shard"):
        cache = FeatureCache("enc", tmp_path)
    assert len(cache) == 10 and cache.quarantined == [] and cache.unreadable == [shards[0]]
    assert shards[0].is_file() and not (tmp_path / "enc" / QUARANTINE).exists()
    monkeypatch.setattr(np, "load", real_load)
    assert len(FeatureCache("enc", tmp_path)) == 20


@pytest.mark.parametrize("leftover", [
    "shard-0123456789abcdef.tmp.npz",  # what an older xbt's killed write left (it matched the shard glob)
    "shard-garbage.npz",
])
def test_leftovers_that_match_the_shard_glob_do_not_break_the_cache(tmp_path, leftover):
    _fill(tmp_path, 8, chunk=4)
    (tmp_path / "enc" / leftover).write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.warns(UserWarning, match="moved to"):
        cache = FeatureCache("enc", tmp_path)
    assert len(cache) == 8 and not (tmp_path / "enc" / leftover).exists()


def test_a_shard_of_the_wrong_shape_is_quarantined(tmp_path):
    (tmp_path / "enc").mkdir()
    np.savez(tmp_path / "enc" / "shard-bad.npz", keys=np.array(["a", "b"]), vectors=np.zeros((3, 4), np.float32))
    with pytest.warns(UserWarning, match="do not make a shard"):
        assert len(FeatureCache("enc", tmp_path)) == 0


def test_temporary_files_never_match_the_shard_glob(tmp_path, monkeypatch):
    """A write interrupted inside np.savez leaves only a file the cache never reads."""
    cache = FeatureCache("enc", tmp_path)

    def dies_half_way(file, **arrays):
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as f:
                f.write(b"PK\x03\x04 half a shard")
        else:
            file.write(b"PK\x03\x04 half a shard")
        raise KeyboardInterrupt  # stands for the process dying here

    monkeypatch.setattr(np, "savez", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(_keys(4), _vectors)
    monkeypatch.undo()
    assert list((tmp_path / "enc").glob("shard-*.npz")) == []
    assert len(FeatureCache("enc", tmp_path)) == 0


WORKER = r'''
import sys
import numpy as np
from pathlib import Path
from xbt.data.features import FeatureCache

root, n, chunk, dim = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def vectors(idx):
    return np.asarray(idx, dtype=np.float32)[:, None] + np.arange(dim, dtype=np.float32)[None, :] / dim

keys = [f"key-{i:06d}" for i in range(n)]
cache = FeatureCache("enc", root)
missing = [i for i, k in enumerate(keys) if k not in cache]
print("READY", len(cache), flush=True)
done = 0

def acknowledged(count):  # called after each chunk is durable (and once up front with the cached count)
    global done
    if done:
        print("ACK", count, flush=True)
    done += 1

cache.get_or_compute(keys, vectors, chunk_size=chunk, progress=acknowledged)
print("FINISHED", flush=True)
'''


def _run_and_kill(script: Path, root: Path, n: int, chunk: int, rng: random.Random) -> tuple[list[str], bool]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(n), str(chunk), str(DIM)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, reader = acknowledged_lines(proc, "the writer")
    time.sleep(rng.uniform(0.0, 0.5))
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    reader.join(10)
    if finished:
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    else:
        assert proc.returncode == -signal.SIGKILL
    return lines, finished


def kill_rounds(tmp_path: Path, kills: int, seed: int, n: int = 8192, chunk: int = 32) -> dict:
    """SIGKILL a writer at seeded random points until `kills` kills; check the cache after each."""
    script = tmp_path / "writer.py"
    script.write_text(WORKER)
    rng = random.Random(seed)
    acknowledged, done_kills, runs, checked = 0, 0, 0, 0
    expected = _vectors(list(range(n)))
    while done_kills < kills:
        lines, finished = _run_and_kill(script, tmp_path, n, chunk, rng)
        runs += 1
        done_kills += not finished
        acknowledged += sum(int(line.split()[1]) for line in lines if line.startswith("ACK"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing half-written is ever visible: no shard to quarantine
            cache = FeatureCache("enc", tmp_path)
        assert len(cache) >= acknowledged, f"acknowledged items lost: {acknowledged - len(cache)}"
        keys = [k for k in _keys(n) if k in cache]
        if not keys:
            continue
        got = cache.get_or_compute(keys, lambda idx: pytest.fail("a cached item was computed again"))
        rows = [int(k.split("-")[1]) for k in keys]
        assert np.array_equal(got, expected[rows]), "a cached vector differs from what was written"
        checked += len(keys)
        acknowledged = len(cache)  # what survived is the baseline of the next round
        if finished or acknowledged == n:  # complete: start over, so that every round writes
            for shard in (tmp_path / "enc").glob("shard-*.npz"):
                shard.unlink()
            acknowledged = 0
    final = FeatureCache("enc", tmp_path).get_or_compute(_keys(n), _vectors, chunk_size=chunk)
    assert np.array_equal(final, expected)
    return {"runs": runs, "kills": done_kills, "items_checked": checked, "lost": 0}


def test_feature_cache_writer_killed_at_random_points(tmp_path):
    figures = kill_rounds(tmp_path, kills=5, seed=0)
    print(figures)


@pytest.mark.slow
def test_feature_cache_writer_killed_many_times(tmp_path):
    figures = kill_rounds(tmp_path, kills=20, seed=1)
    print(figures)
