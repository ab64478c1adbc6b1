"""Locked pretrained single-modality towers for lit models: EfficientNet-Lite images, sentence-transformers text."""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from xbt.assets import efficientnet_lite_weights, resolve_text_tower
from xbt.errors import AssetMissingError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}


class PadToSquare:
    """Pad on white to a square so the whole object survives the centre crop."""

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w == h:
            return img
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return canvas


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Identity of a weights file: size plus hashes of its head and tail (fast on big files)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(0, size - chunk))
        digest.update(f.read(chunk))
    return digest.hexdigest()


class LockedTower(nn.Module):
    """A pretrained tower that stays in inference mode: `train()` does not switch its BatchNorm to batch
    statistics or turn on its dropout / drop-connect, so a feature never depends on the batch it was in."""

    def train(self, mode: bool = True) -> LockedTower:
        return super().train(False)


class EfficientNetLiteTower(LockedTower):
    """EfficientNet-Lite (ImageNet weights) -> globally average-pooled last conv stage (1280-d)."""

    def __init__(self, variant: str = "lite0", weights: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in EFFICIENTNET_LITE_SIZES:
            raise AssetMissingError(f"unknown EfficientNet-Lite variant {variant!r}; use {sorted(EFFICIENTNET_LITE_SIZES)}")
        self.variant = variant
        path = Path(weights) if weights else efficientnet_lite_weights(variant)
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on every load
            self.net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path))
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        self.out_dim = int(self.net._conv_head.out_channels)
        self.eval()
        self.image_size = EFFICIENTNET_LITE_SIZES[variant]
        self.cache_id = f"efficientnet-{variant}-{_file_digest(path)[:12]}-eval"
        self.transform = transforms.Compose(
            [
                PadToSquare(),
                transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def config(self) -> dict[str, Any]:
        return {"kind": "efficientnet-lite", "variant": self.variant}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))


class SentenceTransformerTower(LockedTower):
    """Any sentence-transformers folder (local path or `asset:NAME`) -> its sentence embedding."""

    def __init__(self, source: str):
        super().__init__()
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in every command

        self.source = source
        path = resolve_text_tower(source)
        self.st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dim = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        self.out_dim = int(dim())
        weights = next(iter(sorted(path.glob("*.safetensors"))), None) or next(iter(sorted(path.glob("*.bin"))), None)
        ident = _file_digest(weights) if weights else hashlib.sha256(str(path).encode()).hexdigest()
        self.cache_id = f"st-{path.name}-{ident[:12]}"
        self.eval()

    def config(self) -> dict[str, Any]:
        return {"kind": "sentence-transformers", "source": self.source}

    @property
    def transformer(self) -> nn.Module:
        """The underlying Hugging Face transformer (where LoRA adapters go)."""
        return self.st[0].auto_model

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # sentence-transformers >= 6 calls it `preprocess`; older releases `tokenize`.
        prepare = getattr(self.st, "preprocess", None) or self.st.tokenize
        return prepare(list(texts))

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.st(dict(tokens))["sentence_embedding"]


def build_tower(config: dict[str, Any]) -> nn.Module:
    kind = config.get("kind")
    if kind == "efficientnet-lite":
        return EfficientNetLiteTower(config.get("variant", "lite0"), config.get("weights"))
    if kind == "sentence-transformers":
        return SentenceTransformerTower(config["source"])
    raise AssetMissingError(f"unknown tower kind {kind!r} in model config; use efficientnet-lite or sentence-transformers")
