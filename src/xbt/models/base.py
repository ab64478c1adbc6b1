"""One interface for every vision-language model, and the embedding space that stamps its vectors."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from xbt.data.images import ImageInput, load_image
from xbt.errors import InputError, SpaceMismatchError
from xbt.models.device import Placement, autocast, configure, default_batch_size, model_device, split_on_oom, to_device
from xbt.progress import progress_bar


@dataclass(frozen=True)
class EmbeddingSpace:
    """A stable identifier of the vectors a model emits: which model, which weights, what dimension.

    Two models with the same dimension but other weights have different spaces; comparing their
    vectors is the silent failure that `check` exists to stop.
    """

    name: str
    dim: int
    fingerprint: str

    @property
    def id(self) -> str:
        return f"{self.name}@{self.fingerprint[:12]}/{self.dim}d"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingSpace:
        return cls(name=str(data["name"]), dim=int(data["dim"]), fingerprint=str(data["fingerprint"]))

    def check(self, other: EmbeddingSpace, what: str = "these vectors") -> None:
        """Raise SpaceMismatchError unless `other` is this very space."""
        if other.fingerprint != self.fingerprint or other.dim != self.dim:
            hint = (
                " They have the same dimension, but were made by different weights, so their similarities"
                " are meaningless." if other.dim == self.dim else ""
            )
            raise SpaceMismatchError(
                f"{what} live in space {other.id}, but {self.id} was expected.{hint} Use a model that emits"
                " vectors in the expected space (for an upgrade: an xbt compatible model trained for it)."
            )

    def __str__(self) -> str:
        return self.id


def weights_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha256 over parameter and buffer names, shapes and bytes: identical weights, identical id."""
    return tensors_fingerprint(module.state_dict(), extra)


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """sha256 over named tensors' names, shapes, dtypes and bytes (in name order), after `extra`."""
    digest = hashlib.sha256(extra.encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values as raw bytes (CPU, contiguous; b"" when empty, a 0-d tensor's one value otherwise)."""
    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


class VLPModel(nn.Module, ABC):
    """A two-tower vision-language model. Backends implement the four abstract members below.

    The public calls are `encode_image` and `encode_text`; both return L2-normalised float32 tensors
    in `self.space`, batch by batch, with results independent of the batch size.
    """

    spec: str = ""  # how to load this model again (a spec string load_model resolves)
    space_name: str = ""  # the name in its EmbeddingSpace, when it should not change with the load path

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abstractmethod
    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> preprocessed CHW tensor, exactly as the image tower expects."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> Any:
        """Texts -> whatever `forward_text` takes (a tensor or a dict of tensors)."""

    @abstractmethod
    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (N, C, H, W) -> unnormalised embeddings (N, D); differentiable."""

    @abstractmethod
    def forward_text(self, tokens: Any) -> torch.Tensor:
        """Tokenised texts -> unnormalised embeddings (N, D); differentiable."""

    # ----- identity -------------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        """What to call it in logs and reports: its spec when it has one (a model built in memory has none)."""
        return self.spec or self.space_name or type(self).__name__

    @property
    def space(self) -> EmbeddingSpace:
        cached = getattr(self, "_space_cache", None)
        if cached is None:
            name = getattr(self, "space_name", None) or self.spec or type(self).__name__
            cached = EmbeddingSpace(name, self.embed_dim, weights_fingerprint(self))
            object.__setattr__(self, "_space_cache", cached)
        return cached

    @property
    def encoder_id(self) -> str:
        """Identifies what this encoder computes, for caching its outputs. Usually its space; models that
        declare another model's space (compatible models) override it, so their vectors are cached apart."""
        return f"{self.space.name}-{self.space.fingerprint[:16]}-{self.space.dim}"

    def invalidate_space(self) -> None:
        """Call after changing weights (training) so the space is recomputed."""
        object.__setattr__(self, "_space_cache", None)

    # ----- towers built on first use (lit models); every other backend builds everything at load --------
    def tower_built(self, tower: str) -> bool:
        """Whether the "image" or "text" tower's weights are loaded."""
        return True

    def build_towers(self) -> VLPModel:
        """Load every tower now (a service does, so its first query does not wait for the weights). Returns self."""
        return self

    def release_towers(self) -> VLPModel:
        """Free the towers' weights where they are built again from their files on next use (lit models);
        elsewhere nothing. Returns self."""
        return self

    def when_built(self, tower: str, fn: Callable[[VLPModel], None], key: str = "") -> None:
        """Run fn(self) once the tower is built: now, when it is (LoRA adapters loaded onto a model whose
        towers are built on first use wait for it). A second waiting fn of the same non-empty `key` on the
        same tower is refused (InputError): two sets of adapters would stack."""
        fn(self)

    # ----- where and how it runs -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (set with `configure` or `.to(device)`); inputs are moved here to encode."""
        return model_device(self)

    @property
    def placement(self) -> Placement:
        """Precision and data-loader workers used by encode_image / encode_text (fp32, none by default)."""
        return getattr(self, "_placement", None) or Placement()

    def configure(self, device: str | torch.device | None = "auto", precision: str | None = "fp32",
                  num_workers: int = 0) -> VLPModel:
        """Move to `device` (auto, cpu, cuda[:N]) and encode at `precision` (fp32, bf16, fp16) with
        `num_workers` image-loading processes; carried to every model inside this one. Returns self."""
        configure(self, device, precision, num_workers)
        return self

    def autocast(self):
        """The autocast context of this model's precision on its device (a no-op at fp32)."""
        return autocast(self.device, self.placement.precision)

    # ----- encoding -------------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.stack([self.image_transform(load_image(img)) for img in images])

    @torch.inference_mode()
    def encode_image(
        self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int | None = None, show_progress: bool = False,
        num_workers: int | None = None,
    ) -> torch.Tensor:
        """Images (PIL, paths, or a preprocessed (N,C,H,W) tensor) -> (N, D) unit vectors (CPU float32).
        An image that cannot be decoded raises InputError naming it (`encode_image_items` reports it instead)."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise InputError(f"a pixel tensor must be (N, C, H, W); got shape {tuple(images.shape)}")
            size = batch_size or default_batch_size(self.device, "image")
            return self._batched(images.shape[0], size, lambda s, device: self.forward_image(to_device(images[s], device)),
                                 "images", show_progress)
        vectors, failed = self.encode_image_items(images, batch_size, show_progress, num_workers, stop_on_failure=True)
        if failed:
            raise InputError(failed[min(failed)])
        return vectors

    @torch.inference_mode()
    def encode_image_items(
        self, images: Sequence[ImageInput], batch_size: int | None = None, show_progress: bool = False,
        num_workers: int | None = None, *, stop_on_failure: bool = False,
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """Images -> (unit vectors of the decodable ones, in input order; {position: why} for the others).

        Decoding and preprocessing run in `num_workers` DataLoader processes (default: the model's
        placement; 0 = in this process), overlapping with the forward passes; same vectors either way.
        `stop_on_failure`: return at the first batch with an undecodable image (what `encode_image` needs)."""
        images = list(images)
        device = self.device
        size = batch_size or default_batch_size(device, "image")
        workers = self.placement.num_workers if num_workers is None else num_workers
        out = torch.empty(len(images), self.embed_dim, dtype=torch.float32)  # cpu-only: outputs are CPU float32 by contract
        good: list[int] = []
        failed: dict[int, str] = {}
        was_training = self.training
        self.eval()
        try:
            with progress_bar(len(images), "encoding images", show_progress) as advance:
                for positions, pixels, bad in image_batches(images, self.image_transform, size, workers,
                                                            pin_memory=device.type == "cuda"):
                    failed.update(bad)
                    if bad and stop_on_failure:
                        break
                    if positions:
                        with self.autocast():
                            y = split_on_oom(lambda a, b, p=pixels: self.forward_image(to_device(p[a:b], device, non_blocking=True)),
                                             len(positions), device)
                        out[len(good): len(good) + len(positions)] = nn.functional.normalize(y.float(), dim=-1)
                        good += positions
                    advance(len(positions) + len(bad))
        finally:
            self.train(was_training)
        return out[: len(good)], failed

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False) -> torch.Tensor:
        """Captions -> (N, D) unit vectors (CPU float32). Empty or non-string captions are refused, not embedded."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        validate_texts(texts)
        size = batch_size or default_batch_size(self.device, "text")
        return self._batched(
            len(texts), size, lambda s, device: self.forward_text(to_device(self.tokenize(texts[s]), device)), "texts",
            show_progress,
        )

    def _batched(self, n: int, batch_size: int, fn, what: str, show_progress: bool) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = self.device
        out = torch.empty(n, self.embed_dim, dtype=torch.float32)  # cpu-only: outputs are CPU float32 by contract
        try:
            with progress_bar(n, f"encoding {what}", show_progress) as advance:
                for start in range(0, n, batch_size):
                    s = slice(start, min(n, start + batch_size))
                    with self.autocast():  # halves the batch while the device is out of memory
                        y = split_on_oom(lambda a, b, s=s: fn(slice(s.start + a, s.start + b), device), s.stop - s.start, device)
                    out[s] = nn.functional.normalize(y.float(), dim=-1)
                    advance(s.stop - s.start)
        finally:
            self.train(was_training)
        return out


class _ImageItems(torch.utils.data.Dataset):
    """Position -> (position, preprocessed pixels or None, why it failed or None): decoding errors are
    returned, not raised, so one bad file is reported by position and the rest of its batch is kept."""

    def __init__(self, images: Sequence[ImageInput], transform: Callable[[Image.Image], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(load_image(self.images[i])), None
        except InputError as exc:
            return i, None, str(exc)


def _collate(items: Sequence[tuple[int, torch.Tensor | None, str | None]]):
    positions = [i for i, pixels, _ in items if pixels is not None]
    pixels = torch.stack([p for _, p, _ in items if p is not None]) if positions else None
    return positions, pixels, {i: why for i, pixels, why in items if pixels is None}


def image_batches(images: Sequence[ImageInput], transform: Callable[[Image.Image], torch.Tensor], batch_size: int,
                  num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
    """Batches of (positions, pixels (N,C,H,W) or None, {position: why}) over `images`, in input order.

    With num_workers > 0 a torch DataLoader decodes and preprocesses in worker processes (pinned memory
    for a GPU, `prefetch_factor` batches ahead per worker); with 0, the same items are made here."""
    dataset = _ImageItems(images, transform)
    if num_workers <= 0:
        for start in range(0, len(images), batch_size):
            yield _collate([dataset[i] for i in range(start, min(len(images), start + batch_size))])
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=min(num_workers, max(1, len(images))),
        collate_fn=_collate, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
    )
    yield from loader


def validate_texts(texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"caption #{i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InputError(f"caption #{i} is empty; drop it or give it text before encoding")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
