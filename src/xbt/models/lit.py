"""lit: a CLIP-like model from locked pretrained towers plus trained linear heads (LiT, Zhai et al. 2022).

Saved as a folder: `config.json` (towers by reference, head sizes, the embedding space) and
`model.safetensors` (heads, input standardisation, temperature). Towers are never copied: they are shipped
assets or user paths.

A loaded model builds a tower only when something needs it (an encode, its tokenizer or transform, LoRA,
`state_dict`): the space's fingerprint, a hash of every weight, towers included, is recorded in the config
at save time and used as long as the tower files (size, head and tail) and the heads file are the ones it
was computed from. Work that only reads vectors cached under the model's space (a warm rerun of the
main job) then loads no tower at all. Until a tower is built, `parameters()` lists the heads only (tower
weights are frozen either way); `state_dict()` builds both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xbt.durable import file_sha256
from xbt.errors import AssetMissingError, InputError
from xbt.models.base import EmbeddingSpace, VLPModel, write_json
from xbt.models.towers import build_tower, tower_cache_id

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Head(nn.Module):
    """Standardise locked-tower features, then project linearly into the joint space."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # cpu-only: buffers are built on the CPU like parameters and moved with the module (.to / configure)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))  # cpu-only: as above
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def fit_standardisation(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj((features - self.mean) / self.std)


class LitModel(VLPModel):
    """`tower_dims` = (image, text) feature widths: given, the towers are built on first use (from_pretrained
    passes them when the config's recorded space still holds); omitted, both are built now."""

    TOWERS = ("image", "text")

    def __init__(self, image_tower: dict[str, Any], text_tower: dict[str, Any], embed_dim: int, name: str = "lit",
                 tower_dims: tuple[int, int] | None = None):
        super().__init__()
        self._tower_configs = {"image": dict(image_tower), "text": dict(text_tower)}
        self._when_built: dict[str, list[tuple[str, Callable[[VLPModel], None]]]] = {"image": [], "text": []}
        if tower_dims is None:
            tower_dims = (self.image_tower.out_dim, self.text_tower.out_dim)
        self.image_head = Head(int(tower_dims[0]), embed_dim)
        self.text_head = Head(int(tower_dims[1]), embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # cpu-only: a parameter, moved with the module
        self._embed_dim = embed_dim
        self.name = name
        self.space_name = f"lit:{name}"  # stable wherever the folder lives
        self.spec = ""  # resolvable only once saved: from_pretrained sets lit:PATH

    # ----- towers, built on first use ------------------------------------------------------------
    @property
    def image_tower(self) -> nn.Module:
        return self._tower("image")

    @property
    def text_tower(self) -> nn.Module:
        return self._tower("text")

    def tower_built(self, tower: str) -> bool:
        return f"{tower}_tower" in self._modules

    def when_built(self, tower: str, fn: Callable[[VLPModel], None], key: str = "") -> None:
        if self.tower_built(tower):
            fn(self)
            return
        if key and any(k == key for k, _ in self._when_built[tower]):
            raise InputError(f"the {tower} tower of {self.display_name} already waits for {key} (another model"
                             f" was loaded onto it); load a fresh model for each")
        self._when_built[tower].append((key, fn))

    def _tower(self, which: str) -> nn.Module:
        key = f"{which}_tower"
        module = self._modules.get(key)
        if module is None:
            # Built on first use, which may be inside an encode's inference mode: its weights (and adapters
            # attached to it) must still be ordinary tensors that a later training can use.
            with torch.inference_mode(False):
                module = build_tower(self._tower_configs[which])
                for p in module.parameters():
                    p.requires_grad_(False)
                head = self._modules.get(f"{which}_head")
                if head is not None:  # built after a .to(): where the heads went, and at their dtype
                    module.to(device=head.proj.weight.device, dtype=head.proj.weight.dtype)
                self._modules[key] = module  # a registered submodule: state_dict keys as an eagerly built one
                pending, self._when_built[which] = self._when_built[which], []
                for _key, fn in pending:
                    fn(self)
        return module

    def build_towers(self) -> LitModel:
        for tower in self.TOWERS:
            self._tower(tower)
        return self

    def release_towers(self) -> LitModel:
        """Drop the built towers (they are built again from their files on next use): the memory of a model
        whose vectors are all cached. Refused (InputError) for a tower that is no longer its files: one with
        trainable weights (LoRA adapters injected, unfrozen for training)."""
        space = self.space  # kept: the weights it hashes are those the towers are rebuilt from
        for tower in self.TOWERS:
            module = self._modules.get(f"{tower}_tower")
            if module is not None and any(p.requires_grad for p in module.parameters()):
                raise InputError(f"the {tower} tower of {self.display_name} has trainable weights (adapters or"
                                 " training): it is not its files any more, so it cannot be released")
        for tower in self.TOWERS:
            self._modules.pop(f"{tower}_tower", None)
        object.__setattr__(self, "_space_cache", space)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.build_towers()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.build_towers()
        return super().load_state_dict(*args, **kwargs)

    def tower_cache_id(self, tower: str) -> str:
        """What the tower computes, for its feature cache (`cache_id`), without building it."""
        module = self._modules.get(f"{tower}_tower")
        return module.cache_id if module is not None else tower_cache_id(self._tower_configs[tower])

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
            "image_tower": dict(self._tower_configs["image"]),
            "text_tower": dict(self._tower_configs["text"]),
        }

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {f"image_head.{k}": v for k, v in self.image_head.state_dict().items()}
        state.update({f"text_head.{k}": v for k, v in self.text_head.state_dict().items()})
        state["logit_scale"] = self.logit_scale.detach()
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def save_pretrained(self, path: str | Path) -> Path:
        """Heads, then the config with the space recorded: its fingerprint hashed from every weight now in
        memory (the towers are built for it), and what it was computed from (the towers' file identities,
        the heads file's sha256), so a later load can trust it without building the towers."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.head_state(), str(path / WEIGHTS_NAME))
        self.invalidate_space()
        space = self.space  # weights_fingerprint(self): builds the towers
        record = {"fingerprint": space.fingerprint, "dim": space.dim, "heads_sha256": file_sha256(path / WEIGHTS_NAME),
                  "towers": {t: self.tower_cache_id(t) for t in self.TOWERS}}
        write_json(path / CONFIG_NAME, self.config() | {"space": record})
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
        state = load_file(str(path / WEIGHTS_NAME))
        fingerprint = _recorded_fingerprint(config, path)
        dims = None
        if fingerprint is not None and "image_head.mean" in state and "text_head.mean" in state:
            dims = (state["image_head.mean"].shape[0], state["text_head.mean"].shape[0])
        embed_dim = int(config["embed_dim"])
        model = cls(config["image_tower"], config["text_tower"], embed_dim, config.get("name", path.name), tower_dims=dims)
        model.load_heads(state)
        if dims is not None:
            object.__setattr__(model, "_space_cache", EmbeddingSpace(model.space_name, embed_dim, fingerprint))
        model.spec = f"lit:{path}"
        model.eval()
        return model

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.image_head.load_state_dict({k.removeprefix("image_head."): v for k, v in state.items() if k.startswith("image_head.")})
            self.text_head.load_state_dict({k.removeprefix("text_head."): v for k, v in state.items() if k.startswith("text_head.")})
            self.logit_scale.copy_(state["logit_scale"])
        self.invalidate_space()


def _recorded_fingerprint(config: dict[str, Any], path: Path) -> str | None:
    """The space fingerprint recorded in a lit model's config, when it still describes these files: the
    same heads file (sha256) and the same tower weight files (size, head and tail, as the feature cache
    names them). None otherwise (a folder saved before spaces were recorded, a tower file replaced, heads
    edited): the model is then built whole and its fingerprint hashed from the weights."""
    record = config.get("space")
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        return None
    if record.get("dim") != config.get("embed_dim"):
        return None
    towers = record.get("towers") or {}
    try:
        if record.get("heads_sha256") != file_sha256(path / WEIGHTS_NAME):
            return None
        if any(towers.get(t) != tower_cache_id(config[f"{t}_tower"]) for t in LitModel.TOWERS):
            return None
    except (OSError, KeyError, AssetMissingError):
        return None
    return record["fingerprint"]


def record_space(path: str | Path) -> bool:
    """Record the space in a saved lit model's config when it holds none (saved by an older xbt) or one
    that no longer describes its files; True when it wrote. Loading the folder afterwards builds no tower
    until one is needed. For folders xbt owns (the testbed's models): it rewrites the folder's config."""
    path = Path(path)
    config = json.loads((path / CONFIG_NAME).read_text())
    if _recorded_fingerprint(config, path) is not None:
        return False
    LitModel.from_pretrained(path).save_pretrained(path)
    return True
