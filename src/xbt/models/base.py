"""One interface for every vision-language model, and the embedding space that stamps its vectors."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from xbt.data.images import ImageInput, load_image
from xbt.errors import InputError, SpaceMismatchError
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
    digest = hashlib.sha256(extra.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d: logit_scale
    return digest.hexdigest()


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

    # ----- encoding -------------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.stack([self.image_transform(load_image(img)) for img in images])

    @torch.inference_mode()
    def encode_image(
        self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 32, show_progress: bool = False
    ) -> torch.Tensor:
        """Images (PIL, paths, or a preprocessed (N,C,H,W) tensor) -> (N, D) unit vectors."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise InputError(f"a pixel tensor must be (N, C, H, W); got shape {tuple(images.shape)}")
            n = images.shape[0]
            get = lambda s: images[s]  # noqa: E731
        else:
            images = list(images)
            n = len(images)
            get = lambda s: self.preprocess(images[s])  # noqa: E731
        return self._batched(n, batch_size, lambda s: self.forward_image(get(s)), "images", show_progress)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> torch.Tensor:
        """Captions -> (N, D) unit vectors. Empty or non-string captions are refused, not embedded."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        validate_texts(texts)
        return self._batched(
            len(texts), batch_size, lambda s: self.forward_text(self.tokenize(texts[s])), "texts", show_progress
        )

    def _batched(self, n: int, batch_size: int, fn, what: str, show_progress: bool) -> torch.Tensor:
        was_training = self.training
        self.eval()
        out = torch.empty(n, self.embed_dim, dtype=torch.float32)
        try:
            with progress_bar(n, f"encoding {what}", show_progress) as advance:
                for start in range(0, n, batch_size):
                    s = slice(start, min(n, start + batch_size))
                    out[s] = nn.functional.normalize(fn(s).float(), dim=-1)
                    advance(s.stop - s.start)
        finally:
            self.train(was_training)
        return out


def validate_texts(texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"caption #{i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InputError(f"caption #{i} is empty; drop it or give it text before encoding")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
