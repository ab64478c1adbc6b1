"""Checkpoints survive a kill at any point of a save. Every file-system step a checkpoint save takes (mkdir,
rename, replace, unlink, rmtree under checkpoints/) is a point where a process can die: the training is
"killed" just before the k-th such step (a BaseException nothing catches, so nothing cleans up after it),
then rerun as a user would; it must resume and end with the weights of an uninterrupted run. Among these
points is the one the issue names: after the new checkpoint is renamed into place, before the old one is
removed. Also: a damaged newest checkpoint is passed over for the one before it, and checkpoints of the
earlier layout still resume."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from xbt.specs import load_model
from xbt.train.checkpoint import find_checkpoint
from xbt.train.stages import train_xbt

from conftest import tiny_xbt_config


class Killed(BaseException):
    """The process dies here (not an Exception: no handler of the code under test catches it)."""


@pytest.fixture()
def tiny(tiny_openclip_names, image_files, tmp_path, xbt_home):
    return tiny_xbt_config(tiny_openclip_names, image_files, tmp_path, epochs=2)


def _models(cfg):
    torch.manual_seed(0)
    old = load_model(cfg.old)
    torch.manual_seed(1)
    return old, load_model(cfg.new)  # a fresh new model per run: LoRA is injected in place


def _train(cfg, out: Path):
    old, new = _models(cfg)
    return train_xbt(cfg, out, old=old, new=new, show_progress=False)


def _state(model) -> dict[str, torch.Tensor]:
    return {**{f"p.{k}": v for k, v in model.projection.state_dict().items()},
            **{f"l.{k}": v for k, v in model.lora_state("text").items()}}


class _Crash:
    """Count the file-system steps under a checkpoints/ folder; raise Killed just before the k-th."""

    def __init__(self, monkeypatch, k: int):
        self.k, self.seen, self.steps = k, 0, []
        for module, name in ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "mkdir"), (os, "rmdir"),
                             (shutil, "rmtree")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))

    def _wrap(self, real, name):
        def step(path, *args, **kwargs):
            if f"{os.sep}checkpoints" in os.fspath(path):
                self.seen += 1
                self.steps.append(f"{name} {Path(os.fspath(path)).name}")
                if self.seen == self.k:
                    raise Killed(f"killed before step {self.k}: {name} {path}")
            return real(path, *args, **kwargs)

        return step


def _killed_then_resumed(cfg, tmp_path: Path, monkeypatch, k: int, reference: dict[str, torch.Tensor]) -> bool:
    out = tmp_path / f"run-{k}"
    with monkeypatch.context() as patch:
        crash = _Crash(patch, k)
        try:
            _train(cfg, out)
        except Killed:
            killed = True
        else:
            killed = False
    resumed = _train(cfg, out)  # the same call again: no manual step
    got = _state(resumed)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=f"kill before step {k}: {name}")
    assert not list(out.glob("checkpoints/*/.tmp*")), "a temporary checkpoint folder was left behind"
    return killed and bool(crash.steps)


def _count_steps(cfg, tmp_path: Path, monkeypatch) -> list[str]:
    with monkeypatch.context() as patch:
        crash = _Crash(patch, k=-1)
        _train(cfg, tmp_path / "count")
    return crash.steps


def test_killed_between_the_commit_and_the_clean_up(tiny, tmp_path, monkeypatch):
    """The window of the issue: the new checkpoint is in place, the previous one not yet removed."""
    reference = _state(_train(tiny, tmp_path / "reference"))
    steps = _count_steps(tiny, tmp_path, monkeypatch)
    renames = [i for i, s in enumerate(steps) if s.startswith(("rename", "replace"))]
    # The first removal after the second save's commit (rename): the clean-up of the first checkpoint.
    after_commit = next(i for i, s in enumerate(steps) if i > renames[1] and s.startswith(("rmtree", "unlink", "rmdir")))
    assert _killed_then_resumed(tiny, tmp_path, monkeypatch, after_commit + 1, reference)


def test_killed_at_seeded_random_steps_of_the_saves(tiny, tmp_path, monkeypatch):
    reference = _state(_train(tiny, tmp_path / "reference"))
    steps = _count_steps(tiny, tmp_path, monkeypatch)
    for k in random.Random(0).sample(range(1, len(steps) + 1), 3):
        assert _killed_then_resumed(tiny, tmp_path, monkeypatch, k, reference)


@pytest.mark.slow
def test_killed_at_every_step_of_the_saves(tiny, tmp_path, monkeypatch):
    reference = _state(_train(tiny, tmp_path / "reference"))
    steps = _count_steps(tiny, tmp_path, monkeypatch)
    for k in range(1, len(steps) + 1):
        assert _killed_then_resumed(tiny, tmp_path, monkeypatch, k, reference)
    print({"kill_points": len(steps), "resumed": len(steps), "lost": 0})


def test_a_damaged_newest_checkpoint_is_passed_over(tiny, tmp_path):
    reference = _state(_train(tiny, tmp_path / "reference"))
    out = tmp_path / "run"
    _train(tiny, out)
    newest = find_checkpoint(out, 2)
    assert newest is not None and newest.name.startswith("step-")
    data = (newest / "state.safetensors").read_bytes()
    (newest / "state.safetensors").write_bytes(data[: len(data) // 2])  # a disk fault
    previous = find_checkpoint(out, 2)
    assert previous is not None and previous.name < newest.name  # passed over for the one before it
    got = _state(_train(tiny, out))  # resumes from there and redoes the last interval
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4)


def test_checkpoints_of_the_earlier_layout_are_resumed(tiny, tmp_path, monkeypatch):
    """stage{N}/state.json and stage{N}.old/ (an earlier xbt killed between its renames) still resume."""
    reference = _state(_train(tiny, tmp_path / "reference"))
    out = tmp_path / "run"
    from xbt.train.loop import StopTraining

    old, new = _models(tiny)
    with pytest.raises(StopTraining):
        train_xbt(tiny, out, old=old, new=new, stop_after=(None, 2), show_progress=False)
    stage2 = out / "checkpoints" / "stage2"
    (newest,) = [p for p in stage2.iterdir() if p.name.startswith("step-")]
    legacy = out / "checkpoints" / "stage2.old"
    shutil.move(str(newest), legacy)  # what the earlier layout leaves after a kill between its renames
    shutil.rmtree(stage2)
    json.loads((legacy / "state.json").read_text())
    assert find_checkpoint(out, 2) == legacy
    got = _state(_train(tiny, out))
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4)
    assert not legacy.exists()  # the next save removed the earlier layout's folder
