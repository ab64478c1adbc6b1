"""XBT's two training stages: stage 1 (text-only projection pretraining with noise), stage 2 (LoRA +
projection on pairs), their configuration, data and losses, and `train_xbt`, the whole program. Both
stages run in the one shared loop (`xbt.train.loop`: optimizer, schedule, checkpoints, resume, stopping),
with checkpoints written by `xbt.train.checkpoint`, safe against a kill at any point.

The old model is used only to embed the training data once, into the feature cache, before any
training step (`prepare_data`); the training loop never calls it. Every step seeds its own
randomness from (seed, stage, step), so a run resumed from a checkpoint follows exactly the same
trajectory as an uninterrupted one. The same seeding makes every process of a data-parallel run
(torchrun, `xbt.train.distributed`) draw the same global batch; each computes its slice and the loss is taken on
the gathered global batch, so several processes train the same model as one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from xbt.compat.lora import frozen_text_prefix, text_from_prefix, text_gradient_checkpointing, text_prefix_states
from xbt.compat.maps import Projection
from xbt.compat.model import CompatibleModel
from xbt.data.pairs import Pair
from xbt.durable import atomic_write_text
from xbt.errors import InputError
from xbt.eval.embed import embed_pairs, embed_texts
from xbt.models.base import VLPModel
from xbt.models.device import autocast
from xbt.train.distributed import DistContext
from xbt.train.loop import Schedule, StopTraining, train_loop

__all__ = ["CaptionCache", "LoraSettings", "ProjectionConfig", "ProjectionPenalty", "Stage1Config", "Stage2Config",
           "StopTraining", "TrainingData", "XBTConfig", "prepare_data", "procrustes_rotation", "run_stage1", "run_stage2",
           "train_xbt"]


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


# ----- data ---------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Everything the loop needs, with the old model's embeddings already computed (cached)."""

    corpus: list[str]
    corpus_new: torch.Tensor  # original new model's text embeddings of the corpus
    corpus_old: torch.Tensor  # old model's text embeddings of the corpus
    pairs: list[Pair]
    pair_image_index: list[int]  # pair -> row of the image arrays
    new_images: torch.Tensor  # new model's image embeddings (fixed when the image tower has no LoRA)
    old_images: torch.Tensor
    old_texts: torch.Tensor  # old model's embeddings of the pair captions
    new_texts: torch.Tensor  # original new model's embeddings of the pair captions


def resolve_pairs(source: str) -> list[Pair]:
    from xbt.data.datasets import open_dataset

    return open_dataset(source)


def resolve_corpus(source: str) -> list[str]:
    from xbt.data.texts import load_texts

    return load_texts(source)


def subsample_pairs(pairs: list[Pair], n: int | None, seed: int) -> list[Pair]:
    if n is None or n >= len(pairs):
        return pairs
    order = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [pairs[i] for i in sorted(order)]


def prepare_data(old: VLPModel, new: VLPModel, corpus: list[str], pairs: list[Pair], show_progress: bool = True) -> TrainingData:
    """Embed the training data with both models once (through the feature cache): afterwards the old
    model is never needed again."""
    empty = torch.zeros(0, 1)  # cpu-only: the data is made on the host; train_xbt moves it to the device
    if pairs:
        old_emb, new_emb = embed_pairs(old, pairs, show_progress), embed_pairs(new, pairs, show_progress)
        images = (torch.from_numpy(new_emb.images), torch.from_numpy(old_emb.images))
        texts = (torch.from_numpy(old_emb.texts), torch.from_numpy(new_emb.texts))
        index = old_emb.caption_image_index
    else:
        images, texts, index = (empty, empty), (empty, empty), []
    return TrainingData(
        corpus=corpus, corpus_new=torch.from_numpy(embed_texts(new, corpus, show_progress)),
        corpus_old=torch.from_numpy(embed_texts(old, corpus, show_progress)),
        pairs=pairs, pair_image_index=index, new_images=images[0], old_images=images[1], old_texts=texts[0], new_texts=texts[1],
    )


# ----- losses -------------------------------------------------------------------------------------
def multi_positive_infonce(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE where `positives[i, j]` marks every key that matches query i (duplicate captions or images
    in a batch are not treated as negatives). Symmetric over queries and keys."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    target = positives.float() / positives.float().sum(1, keepdim=True)
    target_t = positives.T.float() / positives.T.float().sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean() + torch.sum(-target_t * F.log_softmax(logits.T, 1), 1).mean()
    )


def estimate_modality_gap(new_images: torch.Tensor, new_texts: torch.Tensor, index: Sequence[int]) -> float:
    """RMS distance between paired unit image and text vectors of the new model (training pairs only)."""
    if len(index) == 0:
        return 0.1
    diff = new_images[torch.as_tensor(index)] - new_texts
    return float(diff.norm(dim=1).pow(2).mean().sqrt())


def add_noise(x: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise whose expected norm is `noise_std`, then back to the unit sphere."""
    if noise_std <= 0:
        return x
    # cpu-only: drawn from the step's CPU generator (the same noise on every device and rank), then moved
    noise = torch.randn(x.shape, generator=generator) * (noise_std / math.sqrt(x.shape[1]))
    return F.normalize(x + noise.to(x.device), dim=-1)


class ProjectionPenalty:
    """The projection's regularisers, added to both stages' losses: relaxed orthogonality of its linear part
    (`orthogonality_weight`) and a pull toward where training started (`anchor_weight`), the closed-form
    init, captured when this object is made (before any checkpoint is restored, so a resumed run pulls
    toward the same point)."""

    def __init__(self, projection: Projection, cfg: ProjectionConfig):
        self.projection = projection
        self.weights = {"orthogonality": float(cfg.orthogonality_weight), "anchor": float(cfg.anchor_weight)}
        self.start = [p.detach().clone() for p in (projection.linear.weight, projection.linear.bias)]

    @property
    def active(self) -> bool:
        return any(w > 0 for w in self.weights.values())

    def __call__(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the weighted sum, each active term unweighted)."""
        parts: dict[str, torch.Tensor] = {}
        if self.weights["orthogonality"] > 0:
            parts["orthogonality"] = self.projection.orthogonality_gap()
        if self.weights["anchor"] > 0:
            now = (self.projection.linear.weight, self.projection.linear.bias)
            parts["anchor"] = sum((p - s.to(p.device)).pow(2).sum() for p, s in zip(now, self.start))
        return sum(self.weights[k] * v for k, v in parts.items()), parts


def procrustes_rotation(data: TrainingData, new_space: Any, old_space: Any) -> np.ndarray:
    """The (new_dim, old_dim) rotation the procrustes-both peer fits on the same training data
    (`xbt.compat.fit.fit_data`): every distinct text of the corpus and of the training captions, and every
    distinct training image, each embedded by both models."""
    from xbt.compat.base import FitData
    from xbt.compat.procrustes import Procrustes

    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for texts, new, old in ((data.corpus, data.corpus_new, data.corpus_old),
                            ([p.caption for p in data.pairs], data.new_texts, data.old_texts)):
        for i, text in enumerate(texts):
            rows.setdefault(text, (new[i].cpu().numpy(), old[i].cpu().numpy()))
    if not rows:
        raise InputError("projection.init procrustes needs a text corpus or training pairs to fit on")
    fit = FitData(new_text=np.stack([r[0] for r in rows.values()]), old_text=np.stack([r[1] for r in rows.values()]))
    if data.pairs:
        fit.new_image, fit.old_image = data.new_images.cpu().numpy(), data.old_images.cpu().numpy()
    method = Procrustes(new_space, old_space, "both" if data.pairs else "text").fit(fit)
    return method.rotation


# ----- the two stages ------------------------------------------------------------------------------
def run_stage1(model: CompatibleModel, data: TrainingData, cfg: XBTConfig, out: Path,
               stop_after_step: int | None = None, show_progress: bool = True,
               ctx: DistContext | None = None, penalty: ProjectionPenalty | None = None,
               ) -> tuple[list[dict[str, float]], float]:
    """Stage 1: the projection learns to map noised new-model text vectors onto the old model's.
    `penalty`: the projection's regularisers (made from the projection as it is now when not given)."""
    ctx = ctx or DistContext.local()
    penalty = penalty or ProjectionPenalty(model.projection, cfg.projection)
    s1 = cfg.stage1
    n = data.corpus_new.shape[0]
    if n < 2:
        raise InputError("stage 1 needs a text corpus of at least 2 captions")
    noise = (estimate_modality_gap(data.new_images, data.new_texts, data.pair_image_index) if s1.noise_std == "auto"
             else float(s1.noise_std))

    def make_step():
        projection = ctx.wrap(model.projection)

        def step(_: int, idx: torch.Tensor, gen: torch.Generator):
            # Duplicate captions in the corpus are one text, so positives are identities.
            x = add_noise(data.corpus_new[idx], noise, gen)  # the whole global batch: same noise on every rank
            y = data.corpus_old[idx]
            pred = ctx.gather(projection(x[ctx.local_slice(len(idx))]), len(idx))
            eye = torch.eye(len(idx), dtype=torch.bool, device=y.device)
            loss_nce = multi_positive_infonce(pred, y, eye, s1.temperature)
            loss_cos = (1 - F.cosine_similarity(pred, y, dim=-1)).mean()
            loss = s1.infonce_weight * loss_nce + s1.cosine_weight * loss_cos
            parts = {"infonce": loss_nce, "cosine": loss_cos}
            if penalty.active:
                extra, terms = penalty()
                loss, parts = loss + extra, parts | terms
            return loss, parts

        return step

    groups = [{"params": list(model.projection.parameters()), "lr": s1.lr}]
    history = train_loop(model, groups, s1.weight_decay, Schedule(1, n, s1.batch_size, s1.epochs, cfg.seed), make_step,
                         out=out, checkpoint_every=cfg.checkpoint_every, label="stage 1 (text only)",
                         stop_after_step=stop_after_step, show_progress=show_progress, ctx=ctx)
    return history, noise


class CaptionCache:
    """The output of the new model's frozen lower text blocks for every training caption, computed once per
    run: stage 2's LoRA adapters sit only in the upper blocks (`lora.layers`), so a step runs those blocks,
    pooling and the head, forward and back, and never the frozen ones again. The same model to float
    precision: a caption's states do not depend on the batch it is in (padding is masked), and a batch is
    rebuilt exactly as the tokenizer pads it (to its longest caption).

    Held per caption without padding (one flat tensor and offsets), so its memory is what the captions need."""

    def __init__(self, model: CompatibleModel, captions: Sequence[str], n_layers: int, device: torch.device,
                 chunk: int = 64, limit_bytes: int | None = None):
        """`limit_bytes`: stop after the first chunk when the whole cache would be larger (`too_large`)."""
        self.n_layers, self.too_large = n_layers, False
        unique = sorted(set(captions))
        where = {c: i for i, c in enumerate(unique)}
        self.row_of = torch.as_tensor([where[c] for c in captions])
        tokens = model.tokenize(unique)  # padded to the longest caption of all; trimmed per batch below
        self.tokens = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()}
        self.lengths = tokens["attention_mask"].sum(1)
        order = torch.argsort(self.lengths, stable=True)  # chunks of similar lengths: little padding computed
        pieces: list[torch.Tensor | None] = [None] * len(unique)
        precision = model.placement.precision
        for start in range(0, len(unique), chunk):
            rows = order[start:start + chunk]
            with autocast(device, precision):
                hidden = text_prefix_states(model.new_model, self.batch_tokens(rows), n_layers)
            for j, r in enumerate(rows.tolist()):
                pieces[r] = hidden[j, : int(self.lengths[r])].detach()
            if limit_bytes is not None and int(self.lengths.sum()) * hidden[0, 0].nbytes > limit_bytes:
                self.too_large, self.estimated_bytes = True, int(self.lengths.sum()) * hidden[0, 0].nbytes
                return
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=self.lengths.device), torch.cumsum(self.lengths, 0)])
        self.states = torch.cat(pieces)  # type: ignore[arg-type]

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def batch_tokens(self, rows: torch.Tensor) -> dict[str, Any]:
        """The tokenizer's output for these captions, padded to their longest (as tokenizing them does)."""
        width = int(self.lengths[rows].max())
        device_rows = rows.to(self.tokens["attention_mask"].device)
        return {k: v[device_rows, :width] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                for k, v in self.tokens.items()}

    def batch(self, pairs: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
        """(tokens, states after the frozen blocks) of the captions of these pairs."""
        rows = self.row_of[pairs]
        tokens = self.batch_tokens(rows)
        hidden = self.states.new_zeros((len(rows), tokens["attention_mask"].shape[1], self.states.shape[1]))
        for j, r in enumerate(rows.tolist()):
            hidden[j, : int(self.lengths[r])] = self.states[self.offsets[r] : self.offsets[r + 1]]
        return tokens, hidden


CACHE_LIMIT_BYTES = 2 << 30  # above this, stage 2 runs the whole text tower at every step instead


class _Stage2Forward(torch.nn.Module):
    """Stage 2's trainable forward as one module call, so DistributedDataParallel sees each parameter
    used once per step: (adapted) new text, then its projection and the image's projection. `text` is the
    tokens, or (tokens, cached states) when `cached_layers` lower blocks are cached, or fixed vectors."""

    def __init__(self, model: CompatibleModel, encode_text: bool, encode_image: bool, cached_layers: int = 0):
        super().__init__()
        self.model, self.encode_text, self.encode_image = model, encode_text, encode_image
        self.cached_layers = cached_layers

    def forward(self, text: Any, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.encode_text and self.cached_layers:
            new_text = F.normalize(text_from_prefix(self.model.new_model, text[0], text[1], self.cached_layers), dim=-1)
        else:
            new_text = self.model.new_text(text) if self.encode_text else text
        new_image = self.model.new_image(image) if self.encode_image else image
        return new_text, self.model.projection(new_text), self.model.projection(new_image)


def _to_device(x: Any, device: torch.device) -> Any:
    """Tokenizer output (a tensor, a dict or a BatchEncoding) on the training device."""
    if isinstance(x, dict) and not hasattr(x, "to"):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x.to(device) if hasattr(x, "to") else x


def run_stage2(model: CompatibleModel, data: TrainingData, cfg: XBTConfig, out: Path,
               stop_after_step: int | None = None, show_progress: bool = True,
               ctx: DistContext | None = None, notes: dict[str, Any] | None = None,
               penalty: ProjectionPenalty | None = None) -> list[dict[str, float]]:
    """Stage 2: LoRA adapters on the frozen new model and the projection, on image-text pairs.

    When the text adapters sit only in the upper blocks of a text tower that can be split (`lora.layers`
    on the testbed's mpnet), the frozen blocks' output for every caption is computed once (`CaptionCache`)
    and each step runs only the adapted blocks; `notes` (a dict) receives what was cached and how long it took."""
    ctx = ctx or DistContext.local()
    notes = notes if notes is not None else {}
    penalty = penalty or ProjectionPenalty(model.projection, cfg.projection)
    s2 = cfg.stage2
    n = len(data.pairs)
    if n < 2:
        raise InputError("stage 2 needs at least 2 image-text pairs")
    groups = [{"params": list(model.projection.parameters()), "lr": s2.lr}]
    if s2.lora.enabled:  # adapters first: the optimizer and the checkpoint both hold their weights
        lora = {k: v for k, v in asdict(s2.lora).items() if k not in ("enabled", "image")}
        lora_params = model.enable_lora("text", lora)
        if s2.lora.image:
            lora_params += model.enable_lora("image", lora)
        groups.append({"params": lora_params, "lr": s2.lora_lr})
    lowered = [p.caption.lower() for p in data.pairs]
    caption_id = torch.as_tensor([{c: i for i, c in enumerate(sorted(set(lowered)))}[c] for c in lowered])
    image_of = torch.as_tensor(data.pair_image_index)
    images_needed = s2.lora.enabled and s2.lora.image
    weights = {"t2i": s2.t2i_weight, "i2t": s2.i2t_weight, "text": s2.text_weight, "preserve": s2.preserve_weight}
    cache = _caption_cache(model, data, cfg, ctx, notes) if s2.lora.enabled else None
    if s2.lora.enabled and s2.gradient_checkpointing:
        notes["gradient_checkpointing"] = text_gradient_checkpointing(model.new_model, True)

    def make_step():
        forward = ctx.wrap(_Stage2Forward(model, s2.lora.enabled, images_needed, cache.n_layers if cache else 0))

        def step(_: int, idx: torch.Tensor, __: torch.Generator):
            img_rows = image_of[idx]
            same_image = img_rows[:, None] == img_rows[None, :]
            same_caption = caption_id[idx][:, None] == caption_id[idx][None, :]  # the same caption, up to case
            positives = (same_image | same_caption).to(ctx.device)
            mine = idx[ctx.local_slice(len(idx))]  # this process's rows of the global batch (all of it on one)
            if cache is not None:
                text_in: Any = cache.batch(mine)
            elif s2.lora.enabled:
                text_in = _to_device(model.tokenize([data.pairs[i].caption for i in mine]), ctx.device)
            else:
                text_in = data.new_texts[mine]
            if images_needed:
                image_in = model.preprocess([data.pairs[i].image for i in mine]).to(ctx.device)
            else:
                image_in = data.new_images[image_of[mine]]
            new_text, proj_text, proj_image = (ctx.gather(t, len(idx)) for t in forward(text_in, image_in))
            losses = {
                "t2i": multi_positive_infonce(proj_text, data.old_images[img_rows], positives, s2.temperature),
                "i2t": multi_positive_infonce(proj_image, data.old_texts[idx], positives, s2.temperature),
                "text": multi_positive_infonce(proj_text, data.old_texts[idx], positives, s2.temperature),
                "preserve": (1 - F.cosine_similarity(new_text, data.new_texts[idx], dim=-1)).mean(),
            }
            loss = sum(weights[k] * v for k, v in losses.items())
            if penalty.active:
                extra, terms = penalty()
                loss, losses = loss + extra, losses | terms
            return loss, losses

        return step

    try:
        return train_loop(model, groups, s2.weight_decay, Schedule(2, n, s2.batch_size, s2.epochs, cfg.seed), make_step,
                          out=out, checkpoint_every=cfg.checkpoint_every, label="stage 2 (LoRA + projection)",
                          stop_after_step=stop_after_step, show_progress=show_progress, ctx=ctx)
    finally:
        if "gradient_checkpointing" in notes:
            text_gradient_checkpointing(model.new_model, False)  # the trained model is used as it was loaded


def _caption_cache(model: CompatibleModel, data: TrainingData, cfg: XBTConfig, ctx: DistContext,
                   notes: dict[str, Any]) -> CaptionCache | None:
    """The frozen text blocks' cache for stage 2, or None (with the reason in `notes`) when it cannot apply."""
    if not cfg.stage2.cache_frozen_text:
        notes["text_cache"] = "off (stage2.cache_frozen_text: false)"
        return None
    n_layers = frozen_text_prefix(model.new_model)
    if not n_layers:
        notes["text_cache"] = "not applicable: no frozen lower text blocks in a tower that can be split"
        return None
    t = time.perf_counter()
    cache = CaptionCache(model, [p.caption for p in data.pairs], n_layers, ctx.device, limit_bytes=CACHE_LIMIT_BYTES)
    if cache.too_large:
        notes["text_cache"] = (f"not used: {cache.estimated_bytes / 2**20:.0f} MiB of states would be above"
                               f" {CACHE_LIMIT_BYTES >> 20} MiB; every step runs the whole text tower")
        return None
    notes["text_cache"] = {"frozen_layers": n_layers, "captions": len(cache.lengths),
                           "mib": round(cache.nbytes / 2**20, 1), "build_s": round(time.perf_counter() - t, 2)}
    return cache


def train_xbt(
    cfg: XBTConfig,
    out: str | Path,
    old: VLPModel | None = None,
    new: VLPModel | None = None,
    stop_after: tuple[int, int] | None = None,
    show_progress: bool = True,
    distributed: DistContext | None = None,
    precision: str | None = None,
    train_pairs: Sequence[Pair] | None = None,
    text_corpus: Sequence[str] | None = None,
    num_workers: int | None = None,
) -> CompatibleModel:
    """The whole program: prepare (cache old embeddings), stage 1, stage 2, save. Resumes from `out`.

    `precision` (fp32, bf16, fp16 on CUDA): autocast in embedding the training data and in every training
    step, recorded in training_report.json; None keeps the new model's own (`configure`; fp32 by default).
    `num_workers`: DataLoader workers decoding the training images while they are embedded (None: the models' own).

    `distributed`: this process's place in a data-parallel run (`xbt.train.distributed.process_group`); rank 0
    writes every file, all ranks return the same trained model."""
    from xbt.specs import load_model

    ctx = distributed or DistContext.local()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "xbt_config.yaml"
    if saved.exists() and (out / "checkpoints").exists() and yaml.safe_load(saved.read_text()) != cfg.to_dict():
        raise InputError(
            f"{out} holds checkpoints of a run with another config; resume needs the same config."
            " Pick a new output folder, or delete that one to start over."
        )
    ctx.check_same(cfg.to_dict(), "the XBT config")
    ctx.barrier()  # every rank has read the saved config before rank 0 rewrites it
    if ctx.is_main:
        atomic_write_text(saved, yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # a kill never leaves half a config
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    old = old or load_model(cfg.old)
    new = new or load_model(cfg.new)
    if precision is not None or num_workers is not None:  # both models embed the training data on this device
        for vlp in (new, old):
            vlp.configure(ctx.device, precision or vlp.placement.precision,
                          vlp.placement.num_workers if num_workers is None else num_workers)
    # `train_pairs` / `text_corpus`: what cfg.train_pairs / cfg.text_corpus name, already read by the caller
    needs_corpus = cfg.stage1.enabled or cfg.projection.init == "procrustes"  # the peer's rotation fits on it too
    corpus = (list(text_corpus) if text_corpus is not None else resolve_corpus(cfg.text_corpus)) if needs_corpus else []
    all_pairs = list(train_pairs) if train_pairs is not None else resolve_pairs(cfg.train_pairs)
    pairs = subsample_pairs(all_pairs, cfg.max_pairs, cfg.seed) if cfg.max_pairs != 0 else []
    skipped: dict[str, str] = {}
    if cfg.stage1.enabled and not corpus:
        raise InputError("stage 1 (text-only) is enabled but the text corpus is empty: give texts (text_corpus in the"
                         " config, or --set text_corpus=FILE), or turn the stage off with --set stage1.enabled=false")
    skip_stage2 = cfg.stage2.enabled and cfg.max_pairs == 0  # a data-efficiency point of zero pairs, on purpose
    if skip_stage2:
        skipped["stage2_skipped"] = "max_pairs is 0: no image-text pairs, on purpose"
    elif cfg.stage2.enabled and len(pairs) < 2:
        raise InputError(f"stage 2 (pairs) is enabled but there are {len(pairs)} image-text pairs (it needs at least 2):"
                         " give training pairs (train_pairs in the config, or --set train_pairs=SOURCE), or turn it off with --set stage2.enabled=false")
    ctx.check_same((old.space.id, new.space.id, len(corpus), len(pairs)), "the models and the training data")
    # Rank 0 embeds into the feature cache first; the others then read it. They wait on a barrier without the
    # process group's 30-minute timeout, which an embedding at scale outlasts (DistContext.wait_for_main).
    if not ctx.is_main:
        ctx.wait_for_main()
    data = prepare_data(old, new, corpus, pairs, show_progress and ctx.is_main)
    if ctx.is_main:
        ctx.wait_for_main()
    old_space = old.space
    del old  # from here on, only cached old-model embeddings are used
    timings["prepare_s"] = time.perf_counter() - t0
    if ctx.device.type != "cpu":
        for name in ("corpus_new", "corpus_old", "new_images", "old_images", "old_texts", "new_texts"):
            setattr(data, name, getattr(data, name).to(ctx.device))

    p = cfg.projection
    torch.manual_seed(cfg.seed)
    projection = Projection(new.embed_dim, old_space.dim, p.kind, p.hidden, p.dropout)
    if p.init == "lstsq" and len(data.corpus) > 0:
        projection.init_least_squares(data.corpus_new, data.corpus_old)
    elif p.init == "lstsq" and data.pairs:
        projection.init_least_squares(data.new_texts, data.old_texts)
    elif p.init == "procrustes":
        projection.init_linear(procrustes_rotation(data, new.space, old_space))
    model = CompatibleModel(new, projection, old_space, new.spec).to(ctx.device)
    penalty = ProjectionPenalty(model.projection, p)  # the pull's target: the closed-form start, never a checkpoint
    report: dict[str, Any] = {"config": cfg.to_dict(), "n_pairs": len(pairs), "n_corpus": len(corpus),
                              "runtime": {"device": str(ctx.device), "precision": model.placement.precision}}
    report.update(skipped)
    if ctx.distributed:
        report["processes"] = ctx.world_size
    stop1, stop2 = stop_after or (None, None)
    if cfg.stage1.enabled:
        t = time.perf_counter()
        report["stage1"], report["noise_std"] = run_stage1(model, data, cfg, out, stop1, show_progress, ctx, penalty)
        timings["stage1_s"] = time.perf_counter() - t
    if cfg.stage2.enabled and not skip_stage2:
        t = time.perf_counter()
        notes: dict[str, Any] = {}
        report["stage2"] = run_stage2(model, data, cfg, out, stop2, show_progress, ctx, notes, penalty)
        report.update({f"stage2_{k}": v for k, v in notes.items()})
        timings["stage2_s"] = time.perf_counter() - t
    report["timings"] = timings
    report["peak_rss_mb"] = _peak_rss_mb()
    if ctx.device.type != "cpu":
        model.to("cpu")  # the artifact and the returned model live on the CPU, as the loaded one does
    if ctx.is_main:
        model.save_pretrained(out, extra={"training": {"pairs": cfg.train_pairs, "n_pairs": len(pairs), "corpus": cfg.text_corpus}})
        atomic_write_text(out / "training_report.json", json.dumps(report, indent=1))
    model.spec = f"compat:{out}"  # loadable by this name from now on (e.g. as the newer half of a chain)
    ctx.barrier()  # the artifact is complete when any rank returns
    return model


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
