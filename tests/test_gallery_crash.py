"""Crash safety: a real process ingests (adds, deletes, snapshots, compactions) in a loop and reports each
acknowledged write; it is killed with SIGKILL at random moments. After every kill the gallery must hold
every acknowledged add, no acknowledged delete, whole batches only, and pass a full consistency check."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from gallery_support import acknowledged_lines

from xbt.gallery.index import IndexConfig
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

DIM = 8
SPACE = EmbeddingSpace("crash-test", DIM, "c" * 64)

WORKER = r'''
import sys, zlib
import numpy as np
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

def vector(item_id):
    return np.random.default_rng(zlib.crc32(item_id.encode())).standard_normal(8).astype(np.float32)

path, start, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
space = EmbeddingSpace("crash-test", 8, "c" * 64)
g = Gallery.open(path)
rng = np.random.default_rng(seed)
mine, i = [], start
print("READY", flush=True)
while True:
    n = int(rng.integers(1, 25))
    ids = [f"item-{j}" for j in range(i, i + n)]
    i += n
    print("ADDING " + " ".join(ids), flush=True)
    g.add(np.stack([vector(x) for x in ids]), ids, [{"id": x} for x in ids], space=space)
    print("ADDED " + " ".join(ids), flush=True)
    mine += ids
    r = rng.random()
    if r < 0.2 and len(mine) > 5:
        gone = [mine.pop(int(rng.integers(len(mine)))) for _ in range(int(rng.integers(1, 4)))]
        print("DELETING " + " ".join(gone), flush=True)
        g.delete(gone)
        print("DELETED " + " ".join(gone), flush=True)
    elif r < 0.3:
        g.save_index()
    elif r < 0.33:
        g.compact()
'''


def _vector(item_id: str) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(item_id.encode())).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class _Ledger:
    """What the worker acknowledged, and which batches were in flight when it died."""

    def __init__(self) -> None:
        self.present: set[str] = set()
        self.deleted: set[str] = set()
        self.in_flight: list[tuple[str, list[str]]] = []
        self.next_id = 0

    def read(self, lines: list[str]) -> None:
        self.in_flight = []
        pending: dict[str, list[str]] = {}
        for line in lines:
            verb, _, rest = line.partition(" ")
            ids = rest.split()
            if verb in ("ADDING", "DELETING"):
                pending[verb] = ids
                if verb == "ADDING":
                    self.next_id = max(self.next_id, 1 + max(int(x.split("-")[1]) for x in ids))
            elif verb == "ADDED":
                self.present |= set(ids)
                pending.pop("ADDING", None)
            elif verb == "DELETED":
                self.present -= set(ids)
                self.deleted |= set(ids)
                pending.pop("DELETING", None)
        self.in_flight = list(pending.items())

    def check(self, path: Path) -> None:
        with Gallery.open(path) as g:
            assert g.verify() == []
            stored = set(g.ids())
            uncertain_adds = {x for verb, ids in self.in_flight if verb == "ADDING" for x in ids}
            uncertain_deletes = {x for verb, ids in self.in_flight if verb == "DELETING" for x in ids}
            missing = self.present - uncertain_deletes - stored
            assert not missing, f"acknowledged adds lost: {sorted(missing)[:5]}"
            resurrected = self.deleted & stored
            assert not resurrected, f"acknowledged deletes undone: {sorted(resurrected)[:5]}"
            unexpected = stored - self.present - uncertain_adds
            assert not unexpected, f"ids that were never written: {sorted(unexpected)[:5]}"
            for verb, ids in self.in_flight:  # a batch is atomic: all of it or none of it
                assert len(set(ids) & stored) in (0, len(ids)), f"torn {verb} batch"
            # The surviving state becomes the truth for the next round.
            self.present = stored
            sample = sorted(stored)[:: max(1, len(stored) // 20)]
            if sample:
                got = g.get(sample, with_vectors=True)
                for x in sample:
                    np.testing.assert_allclose(got[x]["vector"], _vector(x), atol=1e-6)
                    assert got[x]["payload"] == {"id": x}
                hits = g.search(np.stack([_vector(x) for x in sample]), 1, space=SPACE)
                assert [h[0].id for h in hits] == sample


def _run_and_kill(path: Path, script: Path, start: int, seed: int, rng: random.Random) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(start), str(seed)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines, reader = acknowledged_lines(proc, "worker")
    time.sleep(rng.uniform(0.05, 1.2))
    assert proc.poll() is None, f"worker died by itself: {proc.stderr.read() if proc.stderr else ''}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    reader.join(10)
    assert proc.returncode == -signal.SIGKILL
    return lines


def _kill_rounds(tmp_path: Path, rounds: int, seed: int) -> int:
    path = tmp_path / "g"
    Gallery.create(path, SPACE, IndexConfig(flat_max=150, hnsw_max=10**6)).close()  # grows into HNSW on compaction
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    rng = random.Random(seed)
    ledger = _Ledger()
    for r in range(rounds):
        lines = _run_and_kill(path, script, ledger.next_id, seed * 100 + r, rng)
        assert any(line.startswith("ADDED") for line in lines), "the worker acknowledged nothing before the kill"
        ledger.read(lines)
        ledger.check(path)
    return len(ledger.present)


def test_sigkill_mid_ingest_loses_nothing_acknowledged(tmp_path):
    assert _kill_rounds(tmp_path, rounds=3, seed=1) > 0


@pytest.mark.slow
def test_sigkill_many_times(tmp_path):
    assert _kill_rounds(tmp_path, rounds=15, seed=2) > 0


def test_the_ledger_check_catches_a_lost_acknowledged_write(tmp_path):
    """The checker itself can fail: an acknowledged id that is not stored is reported."""
    with Gallery.create(tmp_path / "g", SPACE) as g:
        g.add(np.stack([_vector("item-0")]), ["item-0"], [{"id": "item-0"}], space=SPACE)
    ledger = _Ledger()
    ledger.read(["READY", "ADDING item-0 item-1", "ADDED item-0 item-1"])
    with pytest.raises(AssertionError, match="acknowledged adds lost"):
        ledger.check(tmp_path / "g")
    ledger = _Ledger()
    ledger.read(["READY", "ADDING item-0", "ADDED item-0", "DELETING item-0", "DELETED item-0"])
    with pytest.raises(AssertionError, match="deletes undone"):
        ledger.check(tmp_path / "g")
