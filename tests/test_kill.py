"""Kill tests of the long-running commands, through the public CLI: a real `xbt train` (tiny open_clip
models saved to disk) and a real `xbt gallery build`, each SIGKILLed at seeded random points, again and
again, and rerun with the same command line each time: no manual step. After every kill, nothing the job
had committed is lost (training: the newest checkpoint never goes back; gallery: every stored item stays,
once) and nothing half-written is visible; at the end the result equals an uninterrupted run."""

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
import torch
import yaml
from gallery_support import make_images, save_tiny_openclip

from conftest import CORPUS

CAPTIONS = CORPUS + ["a small bird", "a big red bus", "the sea at night", "a cup of tea"]
TRAIN_STEPS = 72 + 32  # of the config below: stage 1 (12 captions, batches of 4, 24 epochs) + stage 2 (8 pairs, 16 epochs)


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XBT_HOME": str(home)}


def _xbt(*args: str) -> list[str]:
    return [sys.executable, "-m", "xbt.cli", *args]


def _run_killed(cmd: list[str], env: dict[str, str], delay: float) -> bool:
    """Run cmd; SIGKILL it after `delay` seconds unless it finished. True if it was killed."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, text=True)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
            assert proc.returncode == -signal.SIGKILL
            return True
        log.seek(0)
        assert proc.returncode == 0, log.read()[-4000:]
    return False


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return time.monotonic() - t0


# ----- xbt train ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kill_train")
    old = save_tiny_openclip(root / "old", seed=0, embed_dim=32, width=32)
    new = save_tiny_openclip(root / "new", seed=1, embed_dim=48, width=48)
    images = make_images(root / "images", len(CORPUS))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"image": str(p), "caption": c}) + "\n" for p, c in zip(images, CORPUS)))
    (root / "corpus.txt").write_text("\n".join(CAPTIONS))
    config = {
        "old": old, "new": new, "train_pairs": str(root / "pairs.jsonl"), "text_corpus": str(root / "corpus.txt"),
        "checkpoint_every": 3, "seed": 0,
        "projection": {"kind": "mlp", "hidden": 16, "dropout": 0.1, "init": "lstsq"},
        "stage1": {"epochs": 24, "batch_size": 4, "noise_std": 0.2},  # 72 steps
        "stage2": {"epochs": 16, "batch_size": 4, "lora": {"r": 2, "alpha": 4, "dropout": 0.1}},  # 32 steps
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    home = root / "home"
    reference = root / "reference"
    t0 = time.monotonic()
    _run(_xbt("train", "--config", str(root / "config.yaml"), "--out", str(reference)), _env(home))
    return {"root": root, "home": home, "reference": reference, "seconds": time.monotonic() - t0, "new": new}


def _newest_step(out: Path) -> tuple[int, int]:
    from xbt.train.checkpoint import find_checkpoint

    found = []
    for stage in (1, 2):
        folder = find_checkpoint(out, stage)
        if folder is not None:
            found.append((stage, json.loads((folder / "state.json").read_text())["step"]))
    return max(found) if found else (0, 0)


def _weights(out: Path, new_spec: str) -> dict[str, torch.Tensor]:
    from xbt.specs import load_compatible, load_model

    model = load_compatible(out, new_model=load_model(new_spec))
    tensors = {f"projection.{k}": v for k, v in model.projection.state_dict().items()}
    tensors.update({f"lora.{k}": v for k, v in model.lora_state("text").items()})
    tensors["encoded"] = model.encode_text(["a red apple", "two birds in the sky"])
    return tensors


def _committed_steps(out: Path) -> int:
    """Steps committed so far (both stages), from the checkpoint folders' names: cheap enough to poll."""
    steps = {1: 0, 2: 0}
    for folder in out.glob("checkpoints/stage*/step-*"):
        stage = int(folder.parent.name.removeprefix("stage"))
        steps[stage] = max(steps[stage], int(folder.name.removeprefix("step-")))
    return steps[1] + steps[2]


def _run_train_killed(cmd: list[str], env: dict[str, str], out: Path, rng: random.Random, seconds: float) -> bool:
    """Half the kills at a random time (start-up, the old model's embedding, training, the final save), half
    once training has committed a random number of steps, a random fraction of a second later."""
    if rng.random() < 0.5:
        return _run_killed(cmd, env, rng.uniform(0.05, 0.6) * seconds)  # the reference run was a cold start
    target = rng.randrange(1, TRAIN_STEPS - 8)
    return _run_killed_at(cmd, env, lambda: _committed_steps(out), target, then_s=rng.uniform(0.0, 0.3))


def _run_killed_at(cmd: list[str], env: dict[str, str], progress, target: int, then_s: float = 0.0) -> bool:
    """Run `cmd` and SIGKILL it `then_s` seconds after `progress()` reaches `target`; False (and a clean exit
    checked) if it finished first."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, text=True)
        deadline = time.monotonic() + 600
        while proc.poll() is None and progress() < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(then_s)
        if proc.poll() is not None:
            log.seek(0)
            assert proc.returncode == 0, log.read()[-4000:]
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    return True


def kill_training(setup: dict, kills: int, seed: int) -> dict:
    root, out = setup["root"], setup["root"] / f"killed-{seed}"
    cmd = _xbt("train", "--config", str(root / "config.yaml"), "--out", str(out))
    rng = random.Random(seed)
    runs = done_kills = 0
    progress = (0, 0)
    while done_kills < kills:
        killed = _run_train_killed(cmd, _env(setup["home"]), out, rng, setup["seconds"])
        runs += 1
        done_kills += killed
        now = _newest_step(out)  # the newest checkpoint that verifies: a half-written one is never taken
        assert now >= progress, f"the newest checkpoint went back from {progress} to {now}"
        progress = now
        if not killed:  # finished by itself before the kill: a fresh run, so that every kill interrupts training
            out = setup["root"] / f"killed-{seed}-{runs}"
            cmd = _xbt("train", "--config", str(root / "config.yaml"), "--out", str(out))
            progress = (0, 0)
    _run(cmd, _env(setup["home"]))  # the rerun after the last kill, as a user would: same command line
    want, got = _weights(setup["reference"], setup["new"]), _weights(out, setup["new"])
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=f"{name} differs")
    report = json.loads((out / "training_report.json").read_text())
    reference = json.loads((setup["reference"] / "training_report.json").read_text())
    assert [h["step"] for h in report["stage1"]] == [h["step"] for h in reference["stage1"]]  # every step once
    assert [h["step"] for h in report["stage2"]] == [h["step"] for h in reference["stage2"]]
    return {"runs": runs + 1, "kills": done_kills, "tensors_checked": len(want), "lost": 0}


def test_xbt_train_killed_at_random_points_resumes_to_the_same_weights(train_setup):
    print(kill_training(train_setup, kills=2, seed=0))


@pytest.mark.slow
def test_xbt_train_killed_many_times(train_setup):
    print(kill_training(train_setup, kills=20, seed=1))


# ----- xbt gallery build ----------------------------------------------------------------------------
N_IMAGES = 240


@pytest.fixture(scope="module")
def build_setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kill_build")
    spec = save_tiny_openclip(root / "model", seed=0)
    make_images(root / "photos", N_IMAGES)
    home = root / "home"
    reference = root / "reference"
    t0 = time.monotonic()
    _run(_build_cmd(root, spec, reference), _env(home))
    return {"root": root, "spec": spec, "home": home, "reference": reference, "seconds": time.monotonic() - t0}


def _build_cmd(root: Path, spec: str, out: Path) -> list[str]:
    return _xbt("gallery", "build", "--model", spec, "--data", str(root / "photos"), "--out", str(out), "--batch-size", "4")


def _stored(out: Path) -> dict[str, np.ndarray]:
    from xbt.gallery.store import Gallery, is_complete_gallery

    if not is_complete_gallery(out):
        return {}
    with Gallery.open(out) as g:
        assert g.verify() == [], "the gallery is inconsistent after a kill"
        ids = g.ids()
        assert len(ids) == len(set(ids))
        return {i: entry["vector"] for i, entry in g.get(ids, with_vectors=True).items()}


def _count(out: Path) -> int:
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{out / 'gallery.db'}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def _run_build_killed(cmd: list[str], env: dict[str, str], out: Path, rng: random.Random, seconds: float) -> bool:
    """Half the kills at a random time (start-up, creation, compaction included), half once the gallery
    holds a random number of items (mid-ingest)."""
    if rng.random() < 0.5:
        return _run_killed(cmd, env, rng.uniform(0.1, 0.9) * seconds)
    target = rng.randrange(1, N_IMAGES)
    return _run_killed_at(cmd, env, lambda: _count(out), target)


def kill_building(setup: dict, kills: int, seed: int) -> dict:
    root = setup["root"]
    want = _stored(setup["reference"])
    assert len(want) == N_IMAGES
    rng = random.Random(seed)
    runs = done_kills = checked = 0
    out = root / f"killed-{seed}"
    before: dict[str, np.ndarray] = {}
    while done_kills < kills:
        killed = _run_build_killed(_build_cmd(root, setup["spec"], out), _env(setup["home"]), out, rng, setup["seconds"])
        runs += 1
        done_kills += killed
        now = _stored(out)
        lost = set(before) - set(now)
        assert not lost, f"items stored before the kill are gone: {sorted(lost)[:3]}"
        assert set(now) <= set(want), "ids that the data source does not have"
        for item_id, vector in now.items():  # nothing half-written: every stored vector is the right one
            np.testing.assert_allclose(vector, want[item_id], atol=1e-5)
        checked += len(now)
        before = now
        if not killed:  # it finished first: start a fresh build so that every kill interrupts one
            out, before = root / f"killed-{seed}-{runs}", {}
    _run(_build_cmd(root, setup["spec"], out), _env(setup["home"]))  # the same command, rerun: it resumes
    final = _stored(out)
    assert final.keys() == want.keys()
    for item_id, vector in final.items():
        np.testing.assert_allclose(vector, want[item_id], atol=1e-5)
    return {"runs": runs + 1, "kills": done_kills, "items_checked": checked + len(final), "lost": 0, "duplicated": 0}


def test_gallery_build_killed_at_random_points_resumes(build_setup):
    print(kill_building(build_setup, kills=3, seed=0))


@pytest.mark.slow
def test_gallery_build_killed_many_times(build_setup):
    print(kill_building(build_setup, kills=20, seed=1))


def test_gallery_build_refuses_a_gallery_it_did_not_make(build_setup, tmp_path):
    """Resuming is for the same build only: another data source, or another model, is refused."""
    root = build_setup["root"]
    other = tmp_path / "other"
    make_images(other, 3, seed=5)
    done = subprocess.run(_xbt("gallery", "build", "--model", build_setup["spec"], "--data", str(other), "--out",
                               str(build_setup["reference"])), env=_env(build_setup["home"]), capture_output=True, text=True)
    message = " ".join(done.stderr.split())  # the console wraps long lines
    assert done.returncode == 1 and "already holds a gallery" in message and "--on-conflict skip" in message
    spec2 = save_tiny_openclip(tmp_path / "model2", seed=3)
    done = subprocess.run(_build_cmd(root, spec2, build_setup["reference"]), env=_env(build_setup["home"]),
                          capture_output=True, text=True)
    assert done.returncode == 1 and "space" in " ".join(done.stderr.split()).lower()
