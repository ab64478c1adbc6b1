"""`xbt gallery backfill`, the public command, SIGKILLed at seeded random points (random times, start-up and
the migration's start included, and random progress points mid-backfill), again and again, rerun with
the same command line each time. After every kill: the migration state reads, the new gallery is
consistent, its checkpoint never claims an item the new gallery lacks, nothing stored before is lost, no
item is stored twice, every stored vector is the new model's, the old gallery is untouched. At the end
the rerun completes the backfill, and the cut-over serves the new gallery. (tests/test_backfill_kill.py
kills a worker of the library once; this drives the CLI, repeatedly.)"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from gallery_support import make_images, save_tiny_openclip

N_ITEMS = 200


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XBT_HOME": str(home)}


def _cmd(state: Path, setup: dict) -> list[str]:
    return [sys.executable, "-m", "xbt.cli", "gallery", "backfill", "--state", str(state), "--model", setup["new"],
            "--gallery", str(setup["old_gallery"]), "--batch-size", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from xbt.gallery.ingest import ingest, items_from_folder
    from xbt.gallery.store import Gallery
    from xbt.specs import load_model

    root = tmp_path_factory.mktemp("backfill_cli_kill")
    old_model = load_model(save_tiny_openclip(root / "old", seed=0))
    new_spec = save_tiny_openclip(root / "new", seed=1)
    make_images(root / "photos", N_ITEMS)
    with Gallery.create(root / "gallery", old_model.space, modality="image") as old:
        ingest(old, old_model, items_from_folder(root / "photos"))
        ids = old.ids()
        old_vectors = {i: e["vector"] for i, e in old.get(ids, with_vectors=True).items()}
    new_model = load_model(new_spec)
    images = [str(p) for p in sorted((root / "photos").glob("*.png"))]
    want = dict(zip([Path(p).name for p in images], new_model.encode_image(images).numpy()))
    setup = {"root": root, "new": new_spec, "old_gallery": root / "gallery", "home": root / "home",
             "old_vectors": old_vectors, "want": want}
    t0 = time.monotonic()
    _finish(setup, root / "reference")
    setup["seconds"] = time.monotonic() - t0
    return setup


def _finish(setup: dict, state: Path) -> dict:
    done = subprocess.run(_cmd(state, setup), env=_env(setup["home"]), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout)


def _position(state: Path) -> int:
    try:
        return int(json.loads((state / "migration.json").read_text())["position"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_killed(cmd: list[str], env: dict[str, str], state: Path, rng: random.Random, seconds: float) -> bool:
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, text=True)
        if rng.random() < 0.5:  # a random time: start-up, the migration's start, mid-run, the end
            try:
                proc.wait(rng.uniform(0.1, 0.9) * seconds)
            except subprocess.TimeoutExpired:
                pass
        else:  # a random point of the backfill
            target = rng.randrange(1, N_ITEMS)
            deadline = time.monotonic() + 600
            while proc.poll() is None and _position(state) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))  # and anywhere inside the next batch
        if proc.poll() is not None:
            log.seek(0)
            assert proc.returncode == 0, log.read()[-4000:]
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    return True


def _check(setup: dict, state: Path, before: dict[str, np.ndarray], last_position: int) -> tuple[dict[str, np.ndarray], int]:
    from xbt.gallery.migration import Migration
    from xbt.gallery.store import Gallery, is_complete_gallery

    if not (state / "migration.json").exists():
        return {}, 0  # killed before the migration's start committed: nothing claimed yet
    migration = Migration(state)  # the state reads
    position = int(migration.state["position"])
    assert position >= last_position, f"the backfill position went back from {last_position} to {position}"
    plan = migration.plan()
    assert sorted(plan) == sorted(setup["old_vectors"])
    if not is_complete_gallery(migration.new_gallery_path):
        assert position == 0
        return {}, position
    with Gallery.open(migration.new_gallery_path) as new:
        assert new.verify() == [], "the new gallery is inconsistent after a kill"
        ids = new.ids()
        assert len(ids) == len(set(ids)), "an item stored twice"
        stored = {i: e["vector"] for i, e in new.get(ids, with_vectors=True).items()}
        payloads = {i: e["payload"] for i, e in new.get(ids).items()}
    assert set(plan[:position]) <= set(stored), "the checkpoint claims items the new gallery lacks"
    assert set(stored) <= set(plan)
    lost = set(before) - set(stored)
    assert not lost, f"items backfilled before the kill are gone: {sorted(lost)[:3]}"
    for item_id, vector in stored.items():
        np.testing.assert_allclose(vector, setup["want"][Path(payloads[item_id]["image"]).name], atol=1e-5)
    with Gallery.open(setup["old_gallery"]) as old:  # the old gallery is only read
        assert old.verify() == [] and sorted(old.ids()) == sorted(setup["old_vectors"])
    return stored, position


def kill_backfill(setup: dict, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    state = setup["root"] / f"killed-{seed}"
    runs = done_kills = checked = position = 0
    before: dict[str, np.ndarray] = {}
    while done_kills < kills:
        killed = _run_killed(_cmd(state, setup), _env(setup["home"]), state, rng, setup["seconds"])
        runs += 1
        done_kills += killed
        before, position = _check(setup, state, before, position)
        checked += len(before)
        if not killed:  # finished first: a fresh migration, so that every kill interrupts one
            state, before, position = setup["root"] / f"killed-{seed}-{runs}", {}, 0
    progress = _finish(setup, state)  # the same command once more: it resumes and completes
    assert progress["status"] == "complete" and progress["new_size"] == N_ITEMS
    final, _ = _check(setup, state, before, position)
    assert sorted(final) == sorted(setup["old_vectors"])
    done = subprocess.run([sys.executable, "-m", "xbt.cli", "gallery", "cutover", "--state", str(state)],
                          env=_env(setup["home"]), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "cut-over", done.stderr[-2000:]
    return {"runs": runs + 1, "kills": done_kills, "items_checked": checked + len(final), "lost": 0, "duplicated": 0}


def test_gallery_backfill_cli_killed_at_random_points(setup):
    print(kill_backfill(setup, kills=3, seed=0))


@pytest.mark.slow
def test_gallery_backfill_cli_killed_many_times(setup):
    print(kill_backfill(setup, kills=20, seed=1))
