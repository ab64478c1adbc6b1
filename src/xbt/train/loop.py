"""The one training loop of XBT's two stages: AdamW with a cosine schedule, seeded epochs and steps, a
checkpoint every N steps and at the end, resume from the newest checkpoint, progress, and stopping.

A stage supplies only its parameter groups and its step: `make_step()` (called once the checkpoint is
restored, e.g. to wrap modules for data-parallel training) returns `step(index, batch, generator) ->
(loss, parts)`, where `batch` holds the rows of this step's global batch and `parts` the named loss terms
recorded in the history. Every step seeds its randomness from (seed, stage, step), and every epoch's order
from (seed, stage, epoch), so a resumed run follows the uninterrupted run's trajectory exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xbt.errors import InputError
from xbt.models.device import autocast, is_out_of_memory
from xbt.progress import progress_bar
from xbt.train.checkpoint import Checkpoint, resume, save_checkpoint
from xbt.train.distributed import DistContext

StepFn = Callable[[int, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class StopTraining(Exception):
    """Raised after `stop_after_step` steps (tests: an interruption at a chosen point)."""


@dataclass(frozen=True)
class Schedule:
    """One stage's shape: which stage (for seeding and checkpoints), over how many rows, in what batches."""

    stage: int
    n: int
    batch_size: int
    epochs: int
    seed: int

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        return epoch_batches(self.n, self.batch_size, self.seed, self.stage, epoch)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    @property
    def total(self) -> int:
        return self.epochs * self.steps_per_epoch


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """Seeds torch's global generator (dropout inside the model) and returns a generator for the step's
    own draws (noise), both from (seed, stage, step)."""
    torch.manual_seed(seed * 1_000_003 + stage * 10_007 + step)
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + step)


def epoch_batches(n: int, batch_size: int, seed: int, stage: int, epoch: int) -> list[torch.Tensor]:
    """The row indices of each batch of an epoch (a seeded permutation; batches of fewer than 2 dropped)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + stage * 104_729 + epoch))
    return [order[i : i + batch_size] for i in range(0, n, batch_size) if len(order[i : i + batch_size]) >= 2]


def cosine_schedule(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(1, total))))


def train_loop(
    model: Any,
    param_groups: list[dict[str, Any]],
    weight_decay: float,
    schedule: Schedule,
    make_step: Callable[[], StepFn],
    *,
    out: Path,
    checkpoint_every: int,
    label: str,
    stop_after_step: int | None = None,
    show_progress: bool = True,
    ctx: DistContext | None = None,
) -> list[dict[str, float]]:
    """Train `param_groups` (each with its "lr") for the schedule's steps, resuming from the stage's newest
    checkpoint under `out`. Returns the history: one {"step", "loss", parts...} per step, resumed ones included.

    Mixed precision is the model's (`model.placement.precision`, set by `configure`): each step's forward
    and loss run under torch.autocast (bf16, or fp16 on CUDA with a GradScaler against underflowing
    gradients); the weights and the optimizer stay float32. At fp32 no autocast and no scaler run."""
    ctx = ctx or DistContext.local()
    placement = getattr(model, "placement", None)
    precision = placement.precision if placement is not None else "fp32"
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None
    opt = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    total, steps_per_epoch = schedule.total, schedule.steps_per_epoch
    sched = cosine_schedule(opt, total)
    start, history = 0, []
    restored = resume(out, schedule.stage, model, opt, sched, scaler)
    if restored is not None:
        start, history = restored.step, restored.history
    step_fn = make_step()
    model.train()
    with progress_bar(total, label, show_progress and ctx.is_main) as advance:
        advance(start)
        for step in range(start, total):
            epoch, within = divmod(step, steps_per_epoch)
            batch = schedule.epoch_batches(epoch)[within]
            generator = step_generator(schedule.seed, schedule.stage, step)
            try:
                with autocast(ctx.device, precision):
                    loss, parts = step_fn(step, batch, generator)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:  # fp16: scale the loss so small gradients survive, unscale before the step (skipped on inf/nan)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                raise InputError(
                    f"{label}: step {step + 1} ran out of memory on {ctx.device} (batch {len(batch)}). Lower the stage's"
                    f" batch_size (--set stage{schedule.stage}.batch_size=...), train at --precision bf16, or"
                    " --set stage2.gradient_checkpointing=true; the run resumes from its last checkpoint") from exc
            sched.step()
            history.append({"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in parts.items()}})
            advance(1, loss=loss.item())
            if ctx.is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == total):
                save_checkpoint(out, model, opt, sched, Checkpoint(schedule.stage, step + 1, history), scaler)
            if stop_after_step is not None and step + 1 >= stop_after_step:
                raise StopTraining(f"stopped after stage {schedule.stage} step {step + 1}")
    model.eval()
    return history
