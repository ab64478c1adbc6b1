"""XBT's training configuration: the projection, the two stages, LoRA, read from YAML (`src/xbt/configs/`)
with dotted-path overrides that refuse a path the config does not have."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xbt.errors import InputError

__all__ = ["LoraSettings", "ProjectionConfig", "Stage1Config", "Stage2Config", "XBTConfig", "apply_overrides",
           "load_xbt_config"]


# ----- configuration -----------------------------------------------------------------------------
PROJECTION_INITS = ("lstsq", "procrustes", "random")


@dataclass
class ProjectionConfig:
    kind: str = "mlp"  # linear | mlp
    hidden: int = 1024
    dropout: float = 0.1
    # lstsq: closed-form ridge fit on the text corpus | procrustes: the procrustes-both peer's rotation (text
    # corpus + training captions + training images, both models) | random
    init: str = "lstsq"
    orthogonality_weight: float = 0.0  # lambda x ||W W^T - I||^2 / k on the linear part: stays near-orthogonal
    anchor_weight: float = 0.0  # mu x ||theta - theta_init||^2 on the linear part: a pull toward the closed-form start

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise InputError(f"projection.kind must be linear or mlp, not {self.kind!r}")
        if self.init not in PROJECTION_INITS:
            raise InputError(f"projection.init must be one of {list(PROJECTION_INITS)}, not {self.init!r}")
        if self.orthogonality_weight < 0 or self.anchor_weight < 0:
            raise InputError("projection.orthogonality_weight and projection.anchor_weight must be >= 0")


@dataclass
class Stage1Config:
    """Text only: projection(new_text(t) + noise) should match old_text(t)."""

    enabled: bool = True
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    noise_std: float | str = "auto"  # norm of the Gaussian noise added to unit new-text vectors; "auto" = measured gap
    infonce_weight: float = 1.0
    cosine_weight: float = 1.0
    temperature: float = 0.05


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    layers: list[int] | None = None  # None = every layer
    image: bool = False  # also adapt the image tower (slower: images are then encoded at every step)


@dataclass
class Stage2Config:
    """Image-text pairs: LoRA on the frozen new model plus the projection."""

    enabled: bool = True
    epochs: int = 20
    batch_size: int = 128
    lr: float = 5e-4
    lora_lr: float = 5e-4
    weight_decay: float = 0.01
    temperature: float = 0.05
    t2i_weight: float = 1.0  # projected new text vs old image
    i2t_weight: float = 1.0  # projected new image vs old text
    text_weight: float = 0.5  # projected new text vs old text (keeps stage 1's alignment)
    preserve_weight: float = 1.0  # adapted new text stays close to the original new text (new->new retrieval)
    cache_frozen_text: bool = True  # compute the text blocks below the adapters once per run (same model, faster)
    gradient_checkpointing: bool = False  # recompute the adapted text blocks' activations in backward (less memory, same model)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class XBTConfig:
    old: str = "testbed:old"
    new: str = "testbed:new"
    train_pairs: str = "testbed:xbt_train"
    text_corpus: str = "testbed:text_corpus"
    max_pairs: int | None = None  # data-efficiency experiments: use only the first N pairs (after a seeded shuffle)
    seed: int = 0
    checkpoint_every: int = 50
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XBTConfig:
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown XBT config keys {sorted(unknown)}; known: {sorted(known)}")
        s2 = dict(data.pop("stage2", {}) or {})
        lora = LoraSettings(**(s2.pop("lora", {}) or {}))
        return cls(
            projection=ProjectionConfig(**(data.pop("projection", {}) or {})),
            stage1=Stage1Config(**(data.pop("stage1", {}) or {})),
            stage2=Stage2Config(**s2, lora=lora),
            **data,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> XBTConfig:
        path = Path(path)
        if not path.exists():
            raise InputError(f"config file not found: {path}")
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()) or {})
        except TypeError as exc:
            raise InputError(f"invalid config {path}: {exc}") from exc


def apply_overrides(doc: dict[str, Any], overrides: Mapping[str, Any], what: str = "override") -> dict[str, Any]:
    """A config document with dotted-path overrides applied ({"stage2.lora.enabled": False}); a path that
    is not in the document is refused (a typo never silently trains the default)."""
    doc = copy.deepcopy(doc)
    for path, value in overrides.items():
        node = doc
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise InputError(f"{what}: {path!r} is not a path of the config")
            node = node[part]
        if leaf not in node:
            raise InputError(f"{what}: the config has no key {path!r}")
        node[leaf] = value
    return doc


def load_xbt_config(config: str | Path, overrides: Sequence[str] = (), max_pairs: int | None = None,
                    seed: int | None = None) -> XBTConfig:
    """What `xbt train` trains with: a YAML file or a shipped config's name, with `overrides` as KEY=VALUE
    strings (dotted paths, YAML values: "stage2.lora.enabled=false"), then `max_pairs` (0: stage 1 only) and
    `seed` when given."""
    from xbt.paths import resolve_config

    cfg = XBTConfig.from_file(resolve_config(config))
    if overrides:
        pairs = [item.split("=", 1) for item in overrides]
        if any(len(p) != 2 for p in pairs):
            raise InputError(f"--set takes KEY=VALUE, e.g. stage2.lora.enabled=false; got {list(overrides)}")
        cfg = XBTConfig.from_dict(apply_overrides(cfg.to_dict(), {k: yaml.safe_load(v) for k, v in pairs}, "--set"))
    if max_pairs is not None:
        cfg.max_pairs = max_pairs
        if max_pairs == 0:
            cfg.stage2.enabled = False
    if seed is not None:
        cfg.seed = seed
    return cfg
