"""open_clip backend: any open_clip model name with a pretrained tag or checkpoint, or a local-dir/hf-hub schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xbt.models.base import VLPModel


class OpenCLIPModel(VLPModel):
    """`openclip:NAME@TAG`, `openclip:NAME@/path/to/checkpoint.pt`, `openclip:local-dir:/path`, or `openclip:NAME`
    (random initialisation, for tests and from-scratch training)."""

    def __init__(self, name: str, pretrained: str | None = None):
        super().__init__()
        import open_clip

        self.model_name, self.pretrained = name, pretrained
        self.model, _, self._transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        self.model.eval()
        self._tokenizer = open_clip.get_tokenizer(name)
        probe = self.model.encode_text(self._tokenizer(["probe"]))
        self._embed_dim = int(probe.shape[-1])
        self.spec = f"openclip:{name}" + (f"@{pretrained}" if pretrained else "")

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def image_transform(self):
        return self._transform

    @property
    def text_transformer(self) -> torch.nn.Module:
        """Where LoRA adapters go on the text side (`transformer.resblocks.N.mlp.c_fc|c_proj`, attention)."""
        return self.model.transformer if hasattr(self.model, "transformer") else self.model.text

    def tokenize(self, texts: Sequence[str]) -> Any:
        return self._tokenizer(list(texts))

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def forward_text(self, tokens: Any) -> torch.Tensor:
        return self.model.encode_text(tokens)
