"""XBT's artifact: a compatible model = the new model (+ optional LoRA adapters) + a projection into the old space.

Its `encode_text` / `encode_image` return vectors in the OLD space and it declares the old space as its
own, so a gallery stamped with the old space accepts its queries. Loading it needs the new model and
this folder, never the old model:

    compat_config.json        what to load and the spaces (new: verified on load; old: declared)
    projection.safetensors    the projection's weights
    lora_text/, lora_image/   peft adapters (adapter_config.json + adapter_model.safetensors), if trained
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from xbt.errors import AssetMissingError, InputError, SpaceMismatchError
from xbt.models.base import EmbeddingSpace, VLPModel, write_json

CONFIG_NAME = "compat_config.json"
PROJECTION_NAME = "projection.safetensors"
FORMAT = "xbt.compat/1"


class Projection(nn.Module):
    """new space -> old space. `linear`: one affine map. `mlp`: the affine map plus a residual MLP whose
    last layer starts at zero, so it starts as the linear map and can only add to it."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", hidden: int = 1024, dropout: float = 0.0):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"projection kind must be 'linear' or 'mlp', not {kind!r}")
        self.kind, self.in_dim, self.out_dim, self.hidden, self.dropout = kind, in_dim, out_dim, hidden, dropout
        self.linear = nn.Linear(in_dim, out_dim)
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden, "dropout": self.dropout}

    @torch.no_grad()
    def init_least_squares(self, new: torch.Tensor, old: torch.Tensor, ridge: float = 1e-2) -> None:
        """Closed-form ridge fit of the linear part on paired (new, old) vectors, e.g. a text corpus."""
        x = torch.cat([new, torch.ones(new.shape[0], 1)], dim=1).double()
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, x.T @ old.double())
        self.linear.weight.copy_(w[:-1].T.float())
        self.linear.bias.copy_(w[-1].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y + self.mlp(x) if self.kind == "mlp" else y


def text_lora_target(model: VLPModel) -> nn.Module:
    """The module of a backend that holds its text transformer (where text LoRA adapters go)."""
    for attr in ("text_transformer",):
        if hasattr(model, attr):
            return getattr(model, attr)
    if hasattr(model, "text_tower") and hasattr(model.text_tower, "transformer"):
        return model.text_tower.transformer
    raise AssetMissingError(f"{type(model).__name__} exposes no text transformer for LoRA")


def image_lora_target(model: VLPModel) -> nn.Module:
    if hasattr(model, "image_tower"):
        return model.image_tower
    if hasattr(model, "model") and hasattr(model.model, "visual"):
        return model.model.visual
    if hasattr(model, "model") and hasattr(model.model, "vision_model"):
        return model.model.vision_model
    raise AssetMissingError(f"{type(model).__name__} exposes no image tower for LoRA")


def default_lora_targets(module: nn.Module) -> list[str]:
    """Attention query/value projections where the backend has linear ones, else the MLP (open_clip)."""
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for candidates in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"], ["c_fc", "c_proj"]):
        if set(candidates) <= names:
            return candidates
    raise ValueError(f"cannot guess LoRA target modules among {sorted(names)[:20]}; set lora.target_modules")


def lora_config(module: nn.Module, lora: dict[str, Any]) -> Any:
    """The peft LoraConfig of a config file's `lora` section, for adapters on `module`."""
    from peft import LoraConfig

    targets = lora.get("target_modules") or default_lora_targets(module)
    return LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets),
        layers_to_transform=lora.get("layers"),
        init_lora_weights=True,
    )


def inject_lora(module: nn.Module, config: Any, tower: str) -> None:
    """Inject peft LoRA adapters into `module` in place. A module that already carries adapters is refused:
    a second set would stack on the first (a new model object reused for a second compatible model)."""
    from peft import inject_adapter_in_model

    if lora_parameters(module):
        raise InputError(
            f"the new model's {tower} tower already carries LoRA adapters (from another compatible model, or a"
            " training run); load a fresh new model for each compatible model")
    inject_adapter_in_model(config, module)


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


class CompatibleModel(VLPModel):
    def __init__(self, new_model: VLPModel, projection: Projection, old_space: EmbeddingSpace, new_spec: str | None = None):
        super().__init__()
        if projection.in_dim != new_model.embed_dim or projection.out_dim != old_space.dim:
            raise SpaceMismatchError(
                f"projection maps {projection.in_dim}->{projection.out_dim}, but the new model is {new_model.embed_dim}-d"
                f" and the old space {old_space.dim}-d"
            )
        self.new_model = new_model
        self.projection = projection
        self.old_space = old_space
        self.new_spec = new_spec or new_model.spec
        self.new_space_at_training = new_model.space
        self.lora_configs: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}  # written into compat_config.json (e.g. what a chain was made of)
        self.spec = f"compat:{self.new_spec}->{old_space.id}"
        for p in new_model.parameters():
            p.requires_grad_(False)

    # ----- identity: the old space, declared ---------------------------------------------------
    @property
    def space(self) -> EmbeddingSpace:
        return self.old_space

    @property
    def embed_dim(self) -> int:
        return self.old_space.dim

    @property
    def encoder_id(self) -> str:
        """Its own weights (projection, adapters) and the new model's: never the old model's cache entries."""
        from xbt.models.base import weights_fingerprint

        return f"compat-{weights_fingerprint(self.projection)[:12]}-{weights_fingerprint(self.new_model)[:12]}-{self.embed_dim}"

    @torch.no_grad()
    def project(self, new_vectors: torch.Tensor) -> torch.Tensor:
        """Map unit vectors the (unadapted) new model already computed into the old space, without re-encoding.
        Valid for a tower that has no LoRA adapters (by default: the image tower)."""
        was_training = self.projection.training
        self.projection.eval()
        out = F.normalize(self.projection(F.normalize(torch.as_tensor(new_vectors, dtype=torch.float32), dim=-1)), dim=-1)
        self.projection.train(was_training)
        return out

    @property
    def image_transform(self):
        return self.new_model.image_transform

    def tokenize(self, texts: Sequence[str]) -> Any:
        return self.new_model.tokenize(texts)

    # ----- forward: new model -> unit vector -> projection -------------------------------------
    def new_text(self, tokens: Any) -> torch.Tensor:
        """The (LoRA-adapted) new model's own normalised text embedding, before projection."""
        return F.normalize(self.new_model.forward_text(tokens), dim=-1)

    def new_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.new_model.forward_image(pixels), dim=-1)

    def forward_text(self, tokens: Any) -> torch.Tensor:
        return self.projection(self.new_text(tokens))

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.new_image(pixels))

    # ----- LoRA -----------------------------------------------------------------------------------
    def enable_lora(self, tower: str, lora: dict[str, Any]) -> list[nn.Parameter]:
        """Add LoRA adapters to the new model's text (or image) tower; returns the trainable parameters."""
        module = text_lora_target(self.new_model) if tower == "text" else image_lora_target(self.new_model)
        self.lora_configs[tower] = lora_config(module, lora)
        inject_lora(module, self.lora_configs[tower], tower)
        params = lora_parameters(module)
        for p in params:
            p.requires_grad_(True)
        return params

    def lora_state(self, tower: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        module = text_lora_target(self.new_model) if tower == "text" else image_lora_target(self.new_model)
        return {k: v.detach().contiguous().clone() for k, v in get_peft_model_state_dict(module).items()}

    def load_lora_state(self, tower: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        module = text_lora_target(self.new_model) if tower == "text" else image_lora_target(self.new_model)
        result = set_peft_model_state_dict(module, state)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise SpaceMismatchError(f"LoRA weights do not fit the new model ({len(unexpected)} unexpected keys)")

    # ----- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.projection.state_dict().items()}, str(path / PROJECTION_NAME))
        for tower, config in self.lora_configs.items():
            folder = path / f"lora_{tower}"
            folder.mkdir(exist_ok=True)
            config.save_pretrained(str(folder))
            save_file(self.lora_state(tower), str(folder / "adapter_model.safetensors"))
        write_json(path / CONFIG_NAME, {
            "format": FORMAT,
            "new_model": self.new_spec,
            "new_space": self.new_space_at_training.to_dict(),
            "old_space": self.old_space.to_dict(),
            "projection": self.projection.config(),
            "lora": sorted(self.lora_configs),
            **self.provenance,
            **(extra or {}),
        })
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, new_model: VLPModel | None = None) -> CompatibleModel:
        from peft import LoraConfig

        from xbt.models import load_model

        path = Path(path).expanduser()
        if not (path / CONFIG_NAME).exists():
            raise AssetMissingError(f"{path} is not an xbt compatible model (no {CONFIG_NAME}); train one with `xbt train`")
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.get("format") != FORMAT:
            raise AssetMissingError(f"{path} has format {config.get('format')!r}; this xbt reads {FORMAT}")
        new_model = new_model or load_model(config["new_model"])
        expected = EmbeddingSpace.from_dict(config["new_space"])
        expected.check(new_model.space, f"the new model {config['new_model']!r} loaded for {path}")
        p = config["projection"]
        projection = Projection(p["in_dim"], p["out_dim"], p["kind"], p.get("hidden", 1024), p.get("dropout", 0.0))
        projection.load_state_dict(load_file(str(path / PROJECTION_NAME)))
        model = cls(new_model, projection, EmbeddingSpace.from_dict(config["old_space"]), config["new_model"])
        model.new_space_at_training = expected
        for tower in config.get("lora", []):
            folder = path / f"lora_{tower}"
            saved = LoraConfig.from_pretrained(str(folder))
            module = text_lora_target(new_model) if tower == "text" else image_lora_target(new_model)
            inject_lora(module, saved, tower)
            model.lora_configs[tower] = saved
            model.load_lora_state(tower, load_file(str(folder / "adapter_model.safetensors")))
        model.spec = f"compat:{path.resolve()}"  # resolvable from anywhere: a chain can name it as its new model
        model.eval()
        return model


def chain(newer: CompatibleModel, older: CompatibleModel) -> CompatibleModel:
    """Chained upgrade without retraining: `newer` maps v3 into v2's space, `older` maps v2 into v1's.
    The result runs v3 (with newer's adapters), then newer's projection, then older's projection, and
    declares v1's space, so it serves a v1 gallery. (older's LoRA adapters adapt v2, which the chain
    no longer runs; only its projection is used.)"""
    older.new_space_at_training.check(newer.space, "the newer compatible model's vectors")
    folder = Path(newer.spec.removeprefix("compat:"))
    if not newer.spec.startswith("compat:") or not (folder / CONFIG_NAME).exists():
        raise InputError("chain() needs the newer compatible model loaded from disk (load_model('compat:PATH'))"
                         " so that the chained model can be saved and loaded again")
    # the absolute path: a saved chain names its newer half, and must load from any working directory
    chained = CompatibleModel(newer, older.projection, older.old_space, f"compat:{folder.resolve()}")
    chained.provenance["chain"] = [chained.new_spec, older.spec]
    return chained
