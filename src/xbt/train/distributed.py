"""Data-parallel training on several processes (torchrun + torch.distributed), equal to one process.

Every rank draws the same global batch (the per-step seeding of `xbt.train.stages` makes it identical
everywhere), runs the trainable forward on its own contiguous slice of it, and gathers the outputs of
all ranks *with their gradients*. The loss is then computed on the whole global batch, exactly as a
single process computes it: for the contrastive (InfoNCE) terms the in-batch negatives of every rank
take part. Backward sends each rank the gradient of its own rows summed over ranks (world_size times
the single-process one, as every rank holds the same loss), and DistributedDataParallel's gradient
average divides that back: the update is the single-process update, up to float summation order.

What can still differ from one process: dropout masks (drawn per rank for its slice) and, with CUDA,
non-deterministic kernels. With dropout 0 a multi-process run matches a single-process run to float
tolerance (tests/test_train_distributed.py).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xbt.errors import InputError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: How long the other ranks wait for rank 0's embedding of the training data (`DistContext.wait_for_main`).
LONG_WAIT_S = 24 * 3600.0


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Rows of a global batch of n per rank: contiguous, as even as possible (the first ranks take one
    more). Concatenating the ranks' slices in rank order restores the global batch."""
    base, extra = divmod(n, world_size)
    return [base + (r < extra) for r in range(world_size)]


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of unequal sizes, differentiable.

    Forward: pad each block to the largest, all_gather, trim, concatenate. Backward: all_reduce (SUM)
    of the gradient of the concatenation, then this rank's rows. Only all_gather and all_reduce are
    used, which every backend (gloo, NCCL) supports; torch's own differentiable all_gather is deprecated
    in recent releases and needs equal sizes."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]  # autograd.Function declares (ctx, *args: Any)
        ctx.sizes, ctx.rank = sizes, rank
        width = max(sizes)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded.contiguous())
        return torch.cat([b[:n] for b, n in zip(blocks, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]  # as forward
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


@dataclass(frozen=True)
class DistContext:
    """Where a training process stands: its rank, the number of processes, its device.

    `DistContext.local()` is the single-process context: every helper is then the identity, so the
    single-process training program runs exactly as it did before data parallelism existed."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    wait_group: Any = field(default=None, compare=False)  # the long-timeout gloo group of `wait_for_main`

    @classmethod
    def local(cls, device: str | torch.device = "cpu") -> DistContext:
        return cls(0, 1, torch.device(device), False)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, artifacts and reports; the others only compute."""
        return self.rank == 0

    def local_slice(self, n: int) -> slice:
        """This rank's rows of a global batch of n."""
        if not self.distributed:
            return slice(0, n)
        sizes = shard_sizes(n, self.world_size)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """The global batch (n rows) from every rank's slice, keeping the autograd graph of this rank's rows."""
        if not self.distributed:
            return local
        sizes = shard_sizes(n, self.world_size)
        if local.shape[0] != sizes[self.rank]:
            raise RuntimeError(f"rank {self.rank} holds {local.shape[0]} rows of a batch of {n}; expected {sizes[self.rank]}")
        return _GatherRows.apply(local, sizes, self.rank)

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around the module that holds the trainable parameters (identity on one
        process). Call it once the set of trainable parameters is final (after LoRA is injected)."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers of the frozen model never change during training: no need to sync them every step.
        # (torch 2.14 renamed the option; older releases only know the old name.)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=device_ids, **no_buffer_sync)

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def wait_for_main(self) -> None:
        """A barrier for rank 0's long work (embedding the training data while the others wait): on a gloo
        group of its own whose timeout is LONG_WAIT_S, not the process group's (30 min, which an embedding at
        COCO scale outlasts). The others call it before, rank 0 after the work. If rank 0 fails, torchrun
        stops the others."""
        if self.distributed:
            dist.barrier(group=self.wait_group)

    def check_same(self, value: Any, what: str) -> None:
        """Refuse to train when the ranks disagree (e.g. another model or config on one of them): their
        updates would silently average two different problems."""
        if not self.distributed:
            return
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise InputError(
                f"the training processes disagree on {what}: {values}. Every rank must load the same models,"
                " data and config (same files, same seeds)."
            )


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(device: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """"auto": this rank's GPU when CUDA is available, else the CPU. One GPU per process: more processes
    on this machine than GPUs is refused (two ranks on one GPU: NCCL stops with "Duplicate GPU detected")."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda, but torch sees no CUDA device; use --device cpu")
        gpus = torch.cuda.device_count()
        if max(local_world_size, local_rank + 1) > gpus:
            raise InputError(
                f"{local_world_size} training processes on this machine but {gpus} GPU(s): each process needs a GPU"
                f" of its own. Use --nproc {gpus} (or fewer), or --device cpu for CPU processes")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise InputError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """Join the process group torchrun set up (env:// rendezvous) and leave it on exit.

    Backend: NCCL for CUDA devices, gloo for the CPU. Outside torchrun this yields the single-process
    context, so the same program runs either way."""
    if not under_torchrun():
        yield DistContext.local(resolve_device(device))
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = resolve_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        waits = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=max(timeout_s, LONG_WAIT_S)))
        yield DistContext(dist.get_rank(), dist.get_world_size(), dev, True, waits)
    finally:
        dist.destroy_process_group()


def torchrun_command(nproc: int, module_args: Sequence[str]) -> list[str]:
    """The torchrun command that runs `python -m <module_args...>` on nproc processes of this machine
    (several machines: run torchrun yourself, with --nnodes and a rendezvous endpoint)."""
    if nproc < 1:
        raise InputError(f"--nproc must be at least 1, not {nproc}")
    launcher = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, from this very environment
    return [*launcher, "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}", "-m", *module_args]


def launch(nproc: int, module_args: Sequence[str], threads_per_process: int | None = None) -> int:
    """Run `python -m module_args` under torchrun on this machine; returns its exit code.

    torchrun sets OMP_NUM_THREADS=1 per process unless told otherwise; by default each process gets an
    equal share of this machine's cores instead."""
    env = dict(os.environ)
    if threads_per_process is None:
        threads_per_process = max(1, (os.cpu_count() or 1) // nproc)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process))
    return subprocess.call(torchrun_command(nproc, module_args), env=env)
