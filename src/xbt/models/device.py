"""Where a model runs and at what precision: resolved once per command, carried by the model.

    model = configure(load_model(spec), device="auto", precision="bf16", num_workers=4)

`device` is `auto` (a CUDA GPU when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N`; `precision`
is `fp32`, `bf16` or `fp16` (fp16 on CUDA only), applied with `torch.autocast` around the forward passes
of `encode_image` / `encode_text`: the weights stay float32, so the model's EmbeddingSpace (a fingerprint
of its weights) is the same on every device and at every precision. Outputs are always CPU float32 unit
vectors. `num_workers` > 0 decodes and preprocesses images in DataLoader worker processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xbt.errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: Default encoding batch sizes per device type (images, texts): larger batches keep an accelerator busy;
#: the CPU values are those xbt always used, so CPU results do not change.
BATCH_SIZES = {"cpu": {"image": 32, "text": 64}, "cuda": {"image": 256, "text": 1024}}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cuda[:N]` is refused (InputError) when there is none."""
    if isinstance(device, torch.device):
        device = str(device)
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise InputError(f"--device {device!r}: write cuda or cuda:N with N a GPU number")
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        return torch.device(name)
    raise InputError(f"--device must be {DEVICE_CHOICES}, not {device!r}")


def check_precision(precision: str | None, device: torch.device) -> str:
    """The precision name, validated for the device: fp16 autocast is offered on CUDA only."""
    name = (precision or "fp32").strip().lower()
    if name not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if name == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA GPU (half-precision matmuls on a CPU are slow and"
                         " lose accuracy); use --precision bf16 or fp32 on a CPU")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16 / fp16; a no-op for fp32 (so fp32 runs exactly the code it always ran)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def model_device(module: nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter or buffer); cpu for a module without any."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must wait); a no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an accelerator running out of memory (torch.OutOfMemoryError, or the RuntimeError
    some backends raise instead)."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def free_cached_memory(device: torch.device) -> None:
    """Give the caching allocator's unused blocks back after an out-of-memory error (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def split_on_oom(run: Callable[[int, int], torch.Tensor], n: int, device: torch.device) -> torch.Tensor:
    """run(0, n), the rows of one batch; when the device runs out of memory, the two halves one after the
    other (and so on down to one row), so a batch size chosen for a larger GPU still finishes. The same
    rows come back; only their grouping into forward passes changes (equal to float tolerance)."""
    try:
        return run(0, n)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        failed = str(exc).splitlines()[0]
    free_cached_memory(device)
    if n <= 1:
        raise InputError(f"one item does not fit in the memory of {device} ({failed}): free the device (other"
                         " processes, other models on it) or use --device cpu")
    half = n // 2
    first = split_on_oom(run, half, device)
    second = split_on_oom(lambda a, b: run(half + a, half + b), n - half, device)
    return torch.cat([first, second.to(first.device)])


def to_device(x: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A tensor, or tokenizer output (a dict / BatchEncoding of tensors), on `device`."""
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) for v in x):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x


@dataclass(frozen=True)
class Placement:
    """How a model encodes: precision and data-loader workers (its device is where its weights are)."""

    precision: str = "fp32"
    num_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "num_workers": self.num_workers}


def configure(model: nn.Module, device: str | torch.device | None = "auto", precision: str | None = "fp32",
              num_workers: int = 0) -> nn.Module:
    """Move `model` (and every model inside it: a compatible model's new and old models) to `device` and set
    the precision and data-loader workers of each. Returns the model (for chaining)."""
    resolved = resolve_device(device)
    placement = Placement(check_precision(precision, resolved), max(0, int(num_workers)))
    if placement.num_workers != num_workers:
        raise InputError(f"--num-workers must be 0 or more, not {num_workers}")
    model.to(resolved)
    for module in model.modules():
        if isinstance(getattr(type(module), "placement", None), property):  # a VLPModel (base.py imports this module)
            object.__setattr__(module, "_placement", placement)
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """{"device": ..., "precision": ..., "num_workers": ...}: what runs records in configs and reports."""
    placement = getattr(model, "_placement", None) or Placement()
    return {"device": str(model_device(model)), **placement.to_dict()}


def default_batch_size(device: torch.device, modality: str) -> int:
    return BATCH_SIZES["cuda" if device.type == "cuda" else "cpu"][modality]
