"""Two processes add and delete in one gallery while a third searches it (real OS processes, one SQLite
database). Each keeps its own faiss index, brought up to date with the others' commits. Checked: during
the run, no search returns an item twice or fewer than k items (the gallery never holds fewer than k);
at the end, in every one of the three long-lived processes, every stored item is found by search and no
deleted one is, and every acknowledged write is what the database holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from xbt.gallery.index import IndexConfig
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

DIM = 16
SPACE = EmbeddingSpace("two-writers", DIM, "d" * 64)
BASE = 40  # items stored before the run and never deleted: a search of k <= BASE always has k answers
K = 10

WORKER = r'''
import json, os, sys, time, zlib
from pathlib import Path
import numpy as np
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

DIM = 16
space = EmbeddingSpace("two-writers", DIM, "d" * 64)

def vector(item_id):
    v = np.random.default_rng(zlib.crc32(item_id.encode())).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)

role, path, run, seconds, seed, k = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
writers = int(sys.argv[7])
rng = np.random.default_rng(seed)
g = Gallery.open(path)
(run / f"ready-{role}").touch()
while len(list(run.glob("ready-*"))) < writers + 1:  # start together
    time.sleep(0.01)
report = {"role": role, "added": [], "deleted": [], "searches": 0, "short": [], "duplicates": [], "writes": 0}
deadline = time.monotonic() + seconds
if role.startswith("writer"):
    mine, i = [], 0
    while time.monotonic() < deadline:
        if mine and rng.random() < 0.35:
            gone = [mine.pop(int(rng.integers(len(mine)))) for _ in range(min(len(mine), int(rng.integers(1, 4))))]
            g.delete(gone)
            report["deleted"] += gone
        else:
            ids = [f"{role}-{j}" for j in range(i, i + int(rng.integers(1, 6)))]
            i += len(ids)
            g.add(np.stack([vector(x) for x in ids]), ids, [{"by": role}] * len(ids), space=space)
            report["added"] += ids
            mine += ids
        report["writes"] += 1
        if rng.random() < 0.3:  # writers search too (the service reads and writes in one process)
            hits = g.search(vector(f"query-{rng.integers(1 << 30)}"), k, space=space)[0]
            report["searches"] += 1
            if len(hits) < k:
                report["short"].append(len(hits))
    (run / f"done-{role}").touch()
else:
    while len(list(run.glob("done-*"))) < writers:
        queries = np.stack([vector(f"query-{rng.integers(1 << 30)}") for _ in range(4)])
        for hits in g.search(queries, k, space=space):
            report["searches"] += 1
            ids = [h.id for h in hits]
            if len(ids) < k:
                report["short"].append(len(ids))
            if len(set(ids)) != len(ids):
                report["duplicates"].append(ids)
while len(list(run.glob("done-*"))) < writers:  # the final check sees every writer's last commit
    time.sleep(0.01)
# The final check, in this long-lived process: its index must have caught up with every commit.
stored = g.ids()
report["stored"] = len(stored)
top = [hits[0].id if hits else None for hits in g.search(np.stack([vector(x) for x in stored]), 1, space=space)]
report["not_found"] = [x for x, t in zip(stored, top) if t != x]
report["problems"] = g.verify()
(run / f"report-{role}.json").write_text(json.dumps(report))
(run / f"checked-{role}").touch()
# Deleted items: checked once every writer has written the full list of what it deleted.
while not (run / "deleted.json").exists():
    time.sleep(0.01)
deleted = json.loads((run / "deleted.json").read_text())
found = []
if deleted:
    for x, hits in zip(deleted, g.search(np.stack([vector(x) for x in deleted]), 3, space=space)):
        found += [x for h in hits if h.id == x]
(run / f"deleted-found-{role}.json").write_text(json.dumps(found))
g.close()
'''


def _vector(item_id: str) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(item_id.encode())).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() not in (None, 0):
                raise AssertionError(f"a worker failed: {proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, "the workers did not finish in time"
        time.sleep(0.05)


def run_two_writers(tmp_path: Path, seconds: float, seed: int, kind: str = "flat") -> dict:
    """Run two writers and a searcher on one gallery; returns the figures (and asserts every check)."""
    path = tmp_path / "g"
    config = IndexConfig(kind=kind, hnsw_ef_search=256)
    with Gallery.create(path, SPACE, config, modality="image") as g:
        base = [f"base-{i}" for i in range(BASE)]
        g.add(np.stack([_vector(x) for x in base]), base, space=SPACE)
    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    roles = ["writer0", "writer1", "searcher"]
    procs = [subprocess.Popen([sys.executable, str(script), role, str(path), str(run), str(seconds), str(seed * 10 + n),
                               str(K), "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, role in enumerate(roles)]
    try:
        _wait_for([run / f"checked-{r}" for r in roles], procs, timeout=seconds + 180)
        reports = {r: json.loads((run / f"report-{r}.json").read_text()) for r in roles}
        deleted = sorted({x for r in roles for x in reports[r]["deleted"]})
        (run / "deleted.tmp").write_text(json.dumps(deleted))
        os.replace(run / "deleted.tmp", run / "deleted.json")
        for proc in procs:
            proc.wait(120)
            assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    added = {x for r in roles for x in reports[r]["added"]}
    with Gallery.open(path) as g:
        stored = set(g.ids())
    assert added - set(deleted) <= stored, "acknowledged adds are missing from the database"
    assert not set(deleted) & stored, "acknowledged deletes are still in the database"
    assert stored == (added - set(deleted)) | {f"base-{i}" for i in range(BASE)}
    figures = {"seconds": seconds, "kind": kind, "writes": sum(reports[r]["writes"] for r in roles),
               "searches": sum(reports[r]["searches"] for r in roles), "added": len(added), "deleted": len(deleted),
               "stored": len(stored), "items_checked": 0}
    failures = []
    for r in roles:
        rep = reports[r]
        if rep["stored"] != len(stored):
            failures.append(f"{r}: saw {rep['stored']} stored items, the database holds {len(stored)}")
        if rep["not_found"]:
            failures.append(f"{r}: {len(rep['not_found'])} stored items not found by search, e.g. {rep['not_found'][:3]}")
        if rep["problems"]:
            failures.append(f"{r}: verify: {rep['problems']}")
        if rep["short"]:
            failures.append(f"{r}: {len(rep['short'])} of {rep['searches']} searches returned fewer than k={K}: {rep['short'][:5]}")
        if rep["duplicates"]:
            failures.append(f"{r}: searches returned an item twice: {rep['duplicates'][:2]}")
        found_deleted = json.loads((run / f"deleted-found-{r}.json").read_text())
        if found_deleted:
            failures.append(f"{r}: {len(found_deleted)} deleted items still found by search, e.g. {found_deleted[:3]}")
        figures["items_checked"] += rep["stored"] + len(deleted)
    assert not failures, "\n".join(failures)
    return figures


def test_two_writers_and_a_searcher(tmp_path):
    figures = run_two_writers(tmp_path, seconds=4.0, seed=0)
    assert figures["writes"] > 50 and figures["deleted"] > 0
    print(json.dumps(figures))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_two_writers_and_a_searcher_longer(tmp_path, kind):
    figures = run_two_writers(tmp_path, seconds=20.0, seed=1, kind=kind)
    assert figures["writes"] > 200 and figures["deleted"] > 0
    print(json.dumps(figures))
