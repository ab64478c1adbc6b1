"""lit: a CLIP-like model from locked pretrained towers plus trained linear heads (LiT, Zhai et al. 2022).

Saved as a folder: `config.json` (towers by reference, head sizes) and `model.safetensors` (heads,
input standardisation, temperature). Towers are never copied: they are shipped assets or user paths.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xbt.errors import AssetMissingError
from xbt.models.base import VLPModel, write_json
from xbt.models.towers import build_tower

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Head(nn.Module):
    """Standardise locked-tower features, then project linearly into the joint space."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def fit_standardisation(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj((features - self.mean) / self.std)


class LitModel(VLPModel):
    def __init__(self, image_tower: dict[str, Any], text_tower: dict[str, Any], embed_dim: int, name: str = "lit"):
        super().__init__()
        self.image_tower = build_tower(image_tower)
        self.text_tower = build_tower(text_tower)
        for p in list(self.image_tower.parameters()) + list(self.text_tower.parameters()):
            p.requires_grad_(False)
        self.image_head = Head(self.image_tower.out_dim, embed_dim)
        self.text_head = Head(self.text_tower.out_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
        self._embed_dim = embed_dim
        self.name = name
        self.space_name = f"lit:{name}"  # stable wherever the folder lives
        self.spec = ""  # resolvable only once saved: from_pretrained sets lit:PATH

    # ----- VLPModel ---------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def image_transform(self):
        return self.image_tower.transform

    def tokenize(self, texts: Sequence[str]) -> Any:
        return self.text_tower.tokenize(texts)

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tower(pixels))

    def forward_text(self, tokens: Any) -> torch.Tensor:
        return self.text_head(self.text_tower(tokens))

    # ----- persistence ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format": "xbt.lit/1",
            "name": self.name,
            "embed_dim": self._embed_dim,
            "image_tower": self.image_tower.config(),
            "text_tower": self.text_tower.config(),
        }

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"image_head.{k}": v for k, v in self.image_head.state_dict().items()}
        state.update({f"text_head.{k}": v for k, v in self.text_head.state_dict().items()})
        state["logit_scale"] = self.logit_scale.detach()
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.head_state(), str(path / WEIGHTS_NAME))
        write_json(path / CONFIG_NAME, self.config())
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LitModel:
        path = Path(path).expanduser()
        if not (path / CONFIG_NAME).exists() or not (path / WEIGHTS_NAME).exists():
            raise AssetMissingError(
                f"{path} is not a lit model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "train one with `xbt lit train`, or build the testbed with `xbt testbed build`"
            )
        config = json.loads((path / CONFIG_NAME).read_text())
        model = cls(config["image_tower"], config["text_tower"], int(config["embed_dim"]), config.get("name", path.name))
        model.load_heads(load_file(str(path / WEIGHTS_NAME)))
        model.spec = f"lit:{path}"
        model.eval()
        return model

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.image_head.load_state_dict({k.removeprefix("image_head."): v for k, v in state.items() if k.startswith("image_head.")})
            self.text_head.load_state_dict({k.removeprefix("text_head."): v for k, v in state.items() if k.startswith("text_head.")})
            self.logit_scale.copy_(state["logit_scale"])
        self.invalidate_space()
