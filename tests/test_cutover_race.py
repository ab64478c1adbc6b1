"""A kill-and-race loop over a migration's whole life (issue 27): a runner process backfills and cuts over,
and is SIGKILLed at random moments and started again, while a writer adds items to and deletes items from
the old gallery (as `xbt gallery add --gallery OLD` / `xbt gallery delete` do) until the cut-over seals it.
After the cut-over the new gallery must hold exactly the items the old one acknowledged, less those whose
delete it acknowledged: nothing lost, nothing resurrected. On the embedded store with real processes; on
Milvus Lite (one process per database file: Lite does not let a second process open it) with the runner
and the writer as threads of one process and the runner's "kills" injected at random batch boundaries."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gallery_support import make_images, save_tiny_openclip, unit_rows

from xbt.errors import InputError
from xbt.gallery.base import copy_gallery, open_gallery
from xbt.gallery.migration import Migration
from xbt.gallery.store import Gallery, GallerySealedError
from xbt.models.base import EmbeddingSpace
from xbt.specs import load_model

OLD_SPACE = EmbeddingSpace("race-old", 32, "0" * 16)
N_START = 16
MAX_WRITES = 12

_RUNNER = """
import sys
from xbt.errors import InputError
from xbt.gallery.migration import Migration
from xbt.specs import load_model

model = load_model(sys.argv[2])
migration = Migration(sys.argv[1])
print("ready", flush=True)  # the kill clock starts here: start-up is not what the test races
while not migration.cut_over_done:
    migration.run(model, batch_size=2)
    try:
        migration.cut_over()
    except InputError as exc:  # the old gallery changed since (or during) this run: run again
        if not any(why in str(exc) for why in ("changed after the last backfill run", "not complete", "another process")):
            raise
print("cut over", flush=True)
"""


class Writer:
    """Adds and deletes on the old gallery, recording what the gallery acknowledged, until it is sealed."""

    def __init__(self, gallery, images: list[Path], seed: int):
        self.gallery, self.images, self.rng = gallery, images, random.Random(seed)
        self.added: set[str] = set()
        self.deleted: set[str] = set()
        self.sealed = False
        self.n = 0

    def step(self) -> None:
        """One write, at most MAX_WRITES per migration (a writer that never pauses would, rightly, keep the
        cut-over refusing for ever: writes meant for a migrating gallery go through MigratingRetriever)."""
        if self.sealed or len(self.added) + len(self.deleted) >= MAX_WRITES:
            return
        try:
            if self.rng.random() < 0.7:
                item_id = f"late-{self.n}"
                self.n += 1
                image = self.images[self.rng.randrange(len(self.images))]
                vector = unit_rows(1, 32, seed=self.n)
                self.gallery.add(vector, [item_id], [{"image": str(image)}], space=OLD_SPACE)
                self.added.add(item_id)
            else:
                ids = self.gallery.ids()
                victim = ids[self.rng.randrange(len(ids))]
                if self.gallery.delete([victim]):
                    self.deleted.add(victim)
        except GallerySealedError:
            self.sealed = True


def _old_gallery(ref_folder: Path, images: list[Path]) -> Gallery:
    g = Gallery.create(ref_folder, OLD_SPACE, modality="image")
    g.add(unit_rows(N_START, 32, seed=0), [f"start-{i}" for i in range(N_START)],
          [{"image": str(images[i % len(images)])} for i in range(N_START)], space=OLD_SPACE)
    return g


def _check(new_ids: set[str], start: set[str], writer: Writer) -> dict[str, int]:
    want = (start | writer.added) - writer.deleted
    lost, resurrected = want - new_ids, new_ids - want
    assert not lost, f"acknowledged items lost at the cut-over: {sorted(lost)[:5]}"
    assert not resurrected, f"deleted items back after the cut-over: {sorted(resurrected)[:5]}"
    return {"added": len(writer.added), "deleted": len(writer.deleted)}


@pytest.mark.slow
def test_migration_killed_and_raced_by_writers_loses_and_resurrects_nothing(tmp_path):
    images = make_images(tmp_path / "photos", 6)
    spec = save_tiny_openclip(tmp_path / "new", seed=1)
    new_space = load_model(spec).space
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XBT_HOME": str(tmp_path / "home")}
    rng = random.Random(0)
    kills = rounds = 0
    totals = {"added": 0, "deleted": 0}
    while kills < 20:
        rounds += 1
        folder = tmp_path / f"round-{rounds}"
        old = _old_gallery(folder / "old", images)
        start = set(old.ids())
        Migration.start(folder / "mig", old, new_space)
        writer = Writer(old, images, seed=rounds)
        done, kills_here = False, 0
        while not done:
            proc = subprocess.Popen([sys.executable, "-c", _RUNNER, str(folder / "mig"), spec], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.strip() == "ready", first + proc.stdout.read()[-3000:]
            # a few kills per migration at random moments of its work, then one run to the end
            limit = rng.uniform(0.05, 2.0) if kills_here < 6 else 600.0
            deadline = time.monotonic() + limit
            while proc.poll() is None and time.monotonic() < deadline:
                writer.step()
                time.sleep(rng.uniform(0.0, 0.05))
            if proc.poll() is None:
                kills_here += 1
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(60)
                kills += 1
                continue
            output = proc.stdout.read() if proc.stdout else ""
            assert proc.returncode == 0, output[-3000:]
            done = True
        assert Migration(folder / "mig").cut_over_done
        with pytest.raises(GallerySealedError):
            old.add(unit_rows(1, 32, seed=999), ["after"], [{"image": str(images[0])}], space=OLD_SPACE)
        with Gallery.open(folder / "mig" / "gallery") as new:
            assert new.verify() == []
            counts = _check(set(new.ids()), start, writer)
        totals = {k: totals[k] + counts[k] for k in totals}
        old.close()
    print({"rounds": rounds, "kills": kills, **totals, "lost": 0, "resurrected": 0})


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_milvus_lite_migration_raced_by_a_writer_loses_and_resurrects_nothing(tmp_path):
    pytest.importorskip("milvus_lite")
    images = make_images(tmp_path / "photos", 6)
    new_model = load_model(save_tiny_openclip(tmp_path / "new", seed=1))
    rng = random.Random(1)
    kills = rounds = 0
    while kills < 20:
        rounds += 1
        with _old_gallery(tmp_path / f"seed-{rounds}", images) as embedded:
            copy_gallery(embedded, f"milvus:{tmp_path / f'm{rounds}.db'}#photos")
        old = open_gallery(f"milvus:{tmp_path / f'm{rounds}.db'}#photos")
        start = set(old.ids())
        migration = Migration.start(tmp_path / f"mig-{rounds}", old, new_model.space)
        new = open_gallery(migration.new_gallery_ref)
        writer = Writer(old, images, seed=rounds)
        stop = threading.Event()

        def write() -> None:
            while not stop.is_set() and not writer.sealed:
                writer.step()
                time.sleep(rng.uniform(0.0, 0.02))

        thread = threading.Thread(target=write)
        thread.start()
        real_batch = Migration._backfill_batch

        def dying_batch(self, *args, **kwargs):
            if rng.random() < 0.2:
                raise _Killed("the runner dies here")
            return real_batch(self, *args, **kwargs)

        try:
            Migration._backfill_batch = dying_batch  # type: ignore[method-assign]
            while not migration.cut_over_done:
                try:
                    migration.run(new_model, batch_size=2, old=old, new=new)
                    migration.cut_over(old=old, new=new)
                except _Killed:
                    kills += 1
                    migration = Migration(migration.path)  # a new runner reads the state from disk
                except InputError as exc:  # a write landed after (or during) the sweep: run again
                    assert "changed after the last backfill run" in str(exc) or "not complete" in str(exc)
        finally:
            Migration._backfill_batch = real_batch  # type: ignore[method-assign]
            stop.set()
            thread.join()
        _check(set(new.ids()), start, writer)
        new.close()
        old.close()
    print({"rounds": rounds, "kills": kills, "lost": 0, "resurrected": 0})
