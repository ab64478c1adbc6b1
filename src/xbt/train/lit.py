"""Training a lit model's heads (LiT recipe): locked towers, cached tower features, symmetric InfoNCE."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from xbt.models.lit import LitModel


@dataclass
class LitTrainConfig:
    """Defaults are the calibration measured on this machine (docs: offline-assets)."""

    embed_dim: int = 256
    epochs: int = 60
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.5
    input_dropout: float = 0.3
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def symmetric_infonce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: row i of `a` matches row i of `b`; both directions averaged. Inputs are normalised here."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_lit_heads(
    model: LitModel,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    config: LitTrainConfig,
    progress=None,
) -> list[float]:
    """Fit the heads on paired tower features (row i of each is one pair). Returns the loss per epoch."""
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"{image_features.shape[0]} image features but {text_features.shape[0]} text features")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    with torch.no_grad():
        for head in (model.image_head, model.text_head):
            torch.nn.init.normal_(head.proj.weight, std=head.proj.in_features**-0.5, generator=generator)
        model.image_head.fit_standardisation(image_features)
        model.text_head.fit_standardisation(text_features)
        model.logit_scale.fill_(math.log(1 / config.init_temperature))
    params = [model.image_head.proj.weight, model.text_head.proj.weight]
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": config.weight_decay}, {"params": [model.logit_scale], "weight_decay": 0.0}],
        lr=config.lr,
    )
    n = image_features.shape[0]
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )
    history = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            if idx.numel() < 2:
                continue
            img = F.dropout(image_features[idx], config.input_dropout, training=True)
            txt = F.dropout(text_features[idx], config.input_dropout, training=True)
            loss = symmetric_infonce(model.image_head(img), model.text_head(txt), model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(config.max_logit_scale))
            total += loss.item() * idx.numel()
        history.append(total / n)
        if progress:
            progress(history[-1])
    model.eval()
    model.invalidate_space()
    return history
