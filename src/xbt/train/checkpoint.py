"""Training checkpoints: the trainable weights, the optimizer and the scheduler, as safetensors + JSON (no
pickle), written so that a process killed at any instant leaves a loadable checkpoint.

Layout: OUT/checkpoints/stage{N}/step-{STEP:08d}/ with `state.safetensors` and `state.json` (which records
the SHA-256 of the tensor file). A save writes a new folder `.tmp-step-...`, fsyncs both files and the
folder, renames it to its final name and fsyncs the parent: the rename is the commit. Only then are older
checkpoints removed. Loading takes the newest folder that verifies (its JSON parses, its tensor file has the
recorded digest) and falls back to the one before it (the two newest are kept), so a kill between any two
of these steps (mid-write, between the rename and the clean-up, mid-clean-up) costs at most the steps
since the previous checkpoint, and a damaged newest checkpoint costs one checkpoint interval.
Nothing is ever renamed over a non-empty folder. Checkpoints of earlier xbt versions (stage{N}/state.json,
or stage{N}.old/ left by a kill between their two renames) are still found.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xbt.durable import file_sha256, fsync_path

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
KEEP = 2  # committed checkpoints kept per stage: the newest, and the one before it in case it is damaged


@dataclass
class Checkpoint:
    stage: int
    step: int
    history: list[dict[str, float]]


# ----- optimizer state as tensors + JSON ----------------------------------------------------------
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, state in sd["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value.contiguous()
                meta["state"][str(pid)][name] = "tensor"
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state = {}
    for pid, fields in meta["state"].items():
        state[int(pid)] = {n: (tensors[f"opt.{pid}.{n}"] if v == "tensor" else v) for n, v in fields.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----- durable files ------------------------------------------------------------------------------
# fsync, write-then-rename and digests: xbt.durable


def _stage_dir(out: Path, stage: int) -> Path:
    return Path(out) / "checkpoints" / f"stage{stage}"


def _step_dirs(folder: Path) -> list[Path]:
    """Committed checkpoint folders, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(STEP_PREFIX) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(out: Path, model: Any, opt: torch.optim.Optimizer, sched: Any, ckpt: Checkpoint,
                    scaler: Any = None) -> Path:
    """Write the checkpoint of `ckpt.stage` at `ckpt.step` under `out`; durable and complete on return.
    `scaler`: fp16 training's GradScaler, whose loss scale and growth count a resumed run must continue from.

    `model` is a CompatibleModel (its projection and the LoRA adapters of each adapted tower are saved)."""
    folder = _stage_dir(out, ckpt.stage)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{STEP_PREFIX}{ckpt.step:08d}"
    for leftover in folder.glob(f"{TMP_PREFIX}*"):  # left by a save killed mid-write (one writer per run)
        _remove(leftover)
    tmp = folder / f"{TMP_PREFIX}{name}"
    tmp.mkdir()
    tensors = {f"projection.{k}": v.contiguous() for k, v in model.projection.state_dict().items()}
    for tower in model.lora_configs:
        tensors.update({f"lora_{tower}.{k}": v.contiguous() for k, v in model.lora_state(tower).items()})
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    # The global generator as the step left it: what runs next (stage 2's adapter initialisation after
    # stage 1's last step) draws from it, also when a resumed run finds this stage already complete.
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(tmp / STATE_TENSORS))
    fsync_path(tmp / STATE_TENSORS)
    meta = {"stage": ckpt.stage, "step": ckpt.step, "history": ckpt.history, "optimizer": opt_meta,
            "scheduler": sched.state_dict() if sched else None,
            "grad_scaler": scaler.state_dict() if scaler is not None else None, "tensors_sha256": file_sha256(tmp / STATE_TENSORS)}
    with open(tmp / STATE_JSON, "w") as f:
        f.write(json.dumps(meta))
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    final = folder / name
    if final.exists():  # the same step saved before (a run resumed from an older checkpoint): replace it
        _remove(final)
    os.rename(tmp, final)  # the commit: from here on this checkpoint is the one a resume takes
    fsync_path(folder)
    # Clean-up; a kill here leaves extra folders that the next save removes.
    older = [p for p in _step_dirs(folder) if p.name < name]
    for stale in older[KEEP - 1 :]:
        _remove(stale)
    for leftover in [folder / STATE_TENSORS, folder / STATE_JSON, folder.with_name(folder.name + ".old"),
                     folder.with_name(folder.name + ".tmp")]:
        _remove(leftover)  # an earlier xbt's layout
    return final


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of one checkpoint folder; ValueError if it is incomplete or damaged."""
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
        digest = meta.get("tensors_sha256")
        if digest is not None and file_sha256(folder / STATE_TENSORS) != digest:
            raise ValueError("the tensor file does not have the recorded digest")
        tensors = load_file(str(folder / STATE_TENSORS))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing files, torn JSON, unreadable safetensors
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict) or not {"stage", "step", "history", "optimizer"} <= set(meta):
        raise ValueError("state.json lacks stage, step, history or optimizer")
    return tensors, meta


def _candidates(out: Path, stage: int) -> list[Path]:
    folder = _stage_dir(out, stage)
    legacy = [folder, folder.with_name(folder.name + ".old")]  # an earlier xbt's checkpoint (and its kill window)
    return _step_dirs(folder) + [p for p in legacy if (p / STATE_JSON).is_file()]


def find_checkpoint(out: Path, stage: int) -> Path | None:
    """The newest checkpoint folder of `stage` under `out` that can be loaded, or None."""
    for folder in _candidates(out, stage):
        try:
            _read(folder)
        except ValueError:
            continue
        return folder
    return None


def _restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: Any, opt: torch.optim.Optimizer,
             sched: Any, scaler: Any = None) -> Checkpoint:
    projection = {k.removeprefix("projection."): v for k, v in tensors.items() if k.startswith("projection.")}
    model.projection.load_state_dict(projection)
    for tower in model.lora_configs:
        prefix = f"lora_{tower}."
        model.load_lora_state(tower, {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    _unflatten_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("opt.")}, meta["optimizer"])
    if sched and meta.get("scheduler"):
        sched.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("grad_scaler"):  # (none: an fp32 / bf16 run, or an earlier xbt's checkpoint)
        scaler.load_state_dict(meta["grad_scaler"])
    if "rng.torch" in tensors:  # (checkpoints of earlier xbt versions have none)
        torch.set_rng_state(tensors["rng.torch"])
        devices = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        cuda = [tensors[k] for k in devices]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return Checkpoint(int(meta["stage"]), int(meta["step"]), meta["history"])


def load_checkpoint(folder: Path, model: Any, opt: torch.optim.Optimizer, sched: Any) -> Checkpoint:
    """Restore the weights, the optimizer and the scheduler saved in `folder` into the given objects."""
    return _restore(*_read(folder), model, opt, sched)


def resume(out: Path, stage: int, model: Any, opt: torch.optim.Optimizer, sched: Any,
           scaler: Any = None) -> Checkpoint | None:
    """Restore the newest loadable checkpoint of `stage` (None: there is none, start from step 0). A damaged
    one is passed over for the one before it; nothing is restored from a checkpoint that does not verify."""
    for folder in _candidates(out, stage):
        try:
            tensors, meta = _read(folder)
        except ValueError:
            continue
        return _restore(tensors, meta, model, opt, sched, scaler)
    return None
