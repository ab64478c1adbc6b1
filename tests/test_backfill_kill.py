"""A backfill killed with SIGKILL mid-run resumes where it stopped: the checkpoint never runs ahead of the
new gallery, nothing is embedded twice, and the resumed run completes the migration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
from gallery_support import make_images, save_tiny_openclip

from xbt.gallery.migration import Migration
from xbt.gallery.ingest import ingest, items_from_folder
from xbt.gallery.store import Gallery
from xbt.specs import load_model

WORKER = r'''
import sys, time
from xbt.gallery.migration import Migration
from xbt.specs import load_model

migration_dir, spec = sys.argv[1], sys.argv[2]
model = load_model(spec)
original = model.forward_image

def slow(pixels):  # a slow accelerator: leaves time to kill the process mid-run
    time.sleep(0.15)
    return original(pixels)

model.forward_image = slow
print("READY", flush=True)
Migration(migration_dir).run(model, batch_size=3)
print("DONE", flush=True)
'''


def kill_mid_backfill(proc: subprocess.Popen, migration_dir, after_position: int, jitter_s: float,
                      timeout_s: float = 180.0) -> None:
    """SIGKILL a backfill worker once its checkpoint has passed `after_position`, at a random point of a batch."""
    try:
        deadline = time.monotonic() + timeout_s
        while Migration(migration_dir).state["position"] < after_position:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the backfill made no progress"
            time.sleep(0.05)
        time.sleep(np.random.default_rng().uniform(0.0, jitter_s))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_backfill_killed_mid_run_resumes_and_completes(tmp_path):
    old_model = load_model(save_tiny_openclip(tmp_path / "old", seed=0))
    new_spec = save_tiny_openclip(tmp_path / "new", seed=1)
    new_model = load_model(new_spec)
    make_images(tmp_path / "photos", 24)
    with Gallery.create(tmp_path / "gallery", old_model.space, modality="image") as old:
        ingest(old, old_model, items_from_folder(tmp_path / "photos"))
        migration = Migration.start(tmp_path / "mig", old, new_model.space, order="newest")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "mig"), new_spec], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_mid_backfill(proc, tmp_path / "mig", after_position=6, jitter_s=0.5)  # let at least two batches land

    state = Migration(tmp_path / "mig").state
    plan = migration.plan()
    with Gallery.open(migration.new_gallery_path) as new:
        assert new.verify() == []
        done = set(new.ids())
        assert set(plan[: state["position"]]) <= done  # the checkpoint never claims more than is stored
        assert done <= set(plan[: state["position"] + 3])  # at most the batch in flight beyond it
        assert 6 <= len(done) < 24

    progress = Migration(tmp_path / "mig").run(new_model, batch_size=5)
    assert progress["status"] == "complete" and progress["new_size"] == 24
    with Gallery.open(migration.new_gallery_path) as new, Gallery.open(tmp_path / "gallery") as old:
        assert new.verify() == [] and sorted(new.ids()) == sorted(old.ids())
        sample = plan[::7]
        stored = new.get(sample, with_vectors=True)
        direct = new_model.encode_image([stored[i]["payload"]["image"] for i in sample]).numpy()
        np.testing.assert_allclose(np.stack([stored[i]["vector"] for i in sample]), direct, atol=1e-5)
    assert Migration(tmp_path / "mig").cut_over()["status"] == "cut-over"
