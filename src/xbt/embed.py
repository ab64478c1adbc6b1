"""Embedding a pair set with a model, once: vectors are cached under the model's space id and item content;
and the containers embeddings travel in through evaluation, ranking and the gallery (pair embeddings, a
method's query vectors per direction, a per-item gallery bias)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xbt.data.distractors import GalleryExtra
from xbt.data.features import cached_image_features, cached_text_features, device_cache_tag
from xbt.data.pairs import Pair, unique_images
from xbt.models.base import EmbeddingSpace, VLPModel


DIRECTIONS = ("t2i", "i2t")
DIRECTION_NAMES = {"t2i": "text-to-image", "i2t": "image-to-text"}


@dataclass
class GalleryBias:
    """A per-item score offset of the old gallery, for one query model (hubness calibration, e.g. NNN):
    a query q scores gallery item g as q . g - bias[g]. `images`: one per gallery image (text queries);
    `texts`: one per gallery caption (image queries). Exact and inner-product ANN search apply it with one
    extra dimension: [q, -1] . [g, bias]."""

    images: np.ndarray
    texts: np.ndarray
    # The same bias for the gallery extras (ExtraEmbeddings' rows), when the galleries have extras.
    extra_images: np.ndarray | None = None
    extra_texts: np.ndarray | None = None


@dataclass
class QueryVectors:
    """A method's queries, already in the gallery's space: images (n_images, d) and texts (n_captions, d),
    stamped with the space they claim to live in (checked against the old gallery's, not just the shape).
    `gallery_bias`: the calibration this method's queries are searched with (None: plain inner product)."""

    images: np.ndarray
    texts: np.ndarray
    space: EmbeddingSpace
    gallery_bias: GalleryBias | None = None


@dataclass
class PairEmbeddings:
    """Images (one row per distinct image_id) and captions (one row per pair), with the caption -> image map."""

    images: np.ndarray
    texts: np.ndarray
    caption_image_index: list[int]
    space: EmbeddingSpace


@dataclass
class ExtraEmbeddings:
    """Gallery extras (xbt.data.distractors) embedded by one model: images (n, d) and texts (m, d), added to
    that model's galleries and never made into queries."""

    images: np.ndarray
    texts: np.ndarray
    space: EmbeddingSpace
    source: str = ""

    @property
    def sizes(self) -> dict[str, int]:
        return {"images": int(len(self.images)), "texts": int(len(self.texts))}


def encoder_cache_id(model: VLPModel, modality: str) -> str:
    """The feature cache's key: what the encoder computes, its precision when not fp32 (bf16 / fp16 vectors
    are cached apart), and the device kind when not the CPU (GPU fp32 vectors, TF32 by default on recent
    GPUs, are cached apart from the CPU's; CPU keys are those of earlier xbt versions)."""
    precision = model.placement.precision
    key = f"{model.encoder_id}-{modality}" + ("" if precision == "fp32" else f"-{precision}") + device_cache_tag(model.device)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def caption_image_index(pairs: Sequence[Pair]) -> list[int]:
    order = {p.image_id: i for i, p in enumerate(unique_images(pairs))}
    return [order[p.image_id] for p in pairs]


def embed_pairs(model: VLPModel, pairs: Sequence[Pair], show_progress: bool = False) -> PairEmbeddings:
    """Images (deduplicated by image_id) and captions, cached under `model.encoder_id` and item content."""
    return PairEmbeddings(embed_images(model, pairs, show_progress),
                          embed_texts(model, [p.caption for p in pairs], show_progress),
                          caption_image_index(pairs), model.space)


def embed_images(model: VLPModel, pairs: Sequence[Pair], show_progress: bool = False) -> np.ndarray:
    """The pairs' distinct images (by image_id, in order of first appearance), through the feature cache."""
    images = [p.image for p in unique_images(pairs)]
    return cached_image_features(
        encoder_cache_id(model, "image"), lambda paths: model.encode_image(paths).numpy(), images,
        label=f"{model.space.name} images", show_progress=show_progress,
    )


def embed_image_files(model: VLPModel, images: Sequence[str], show_progress: bool = False) -> np.ndarray:
    """Image files (no captions) through the same cache as `embed_images`."""
    if not images:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    return cached_image_features(
        encoder_cache_id(model, "image"), lambda paths: model.encode_image(paths).numpy(), list(images),
        label=f"{model.space.name} images", show_progress=show_progress,
    )


def embed_extras(model: VLPModel, extra: GalleryExtra, show_progress: bool = False) -> ExtraEmbeddings:
    """A gallery extra's images and texts embedded by `model`, through the feature cache (a lit model's
    vectors from its towers' cached features, through `prime_lit_cache`: a fold's heads over 10,000 cached
    items take seconds)."""
    from xbt.models.lit import LitModel

    if isinstance(model, LitModel) and (extra.images or extra.texts):
        prime_lit_cache(model, texts=extra.texts, show_progress=show_progress, image_files=extra.images)
    return ExtraEmbeddings(embed_image_files(model, extra.images, show_progress), embed_texts(model, extra.texts, show_progress),
                           model.space, extra.source)


def embed_texts(model: VLPModel, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
    """Text-only embeddings (a text corpus has no images), through the same cache as `embed_pairs`."""
    if not texts:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    return cached_text_features(
        encoder_cache_id(model, "text"), lambda batch: model.encode_text(batch).numpy(), list(texts),
        label=f"{model.space.name} texts", show_progress=show_progress,
    )


def head_vectors(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Unit vectors of a lit model's linear head over tower features, computed where the head is (the
    features are moved there); float32, on the head's device."""
    device = next(iter(head.parameters())).device
    with torch.inference_mode():
        return torch.nn.functional.normalize(head(features.to(device)), dim=-1).float()


def prime_lit_cache(model: VLPModel, pairs: Sequence[Pair] = (), texts: Sequence[str] = (), show_progress: bool = False,
                    image_files: Sequence[str] = ()) -> None:
    """Fill the vector cache of a lit model (locked towers + linear heads) from its towers' cached
    features: the heads run in milliseconds, so a newly trained head (e.g. one per cross-validation fold)
    over items the towers have already seen encodes no image and no caption again. Afterwards
    `embed_pairs` / `embed_texts` of those items read the cache. Vectors equal the encoder's to float
    tolerance (same towers, same inputs, another batching)."""
    from xbt.data.testbed import tower_image_features, tower_text_features
    from xbt.errors import InputError
    from xbt.models.lit import LitModel

    if not isinstance(model, LitModel):  # its towers are built only if an item is missing from the cache
        raise InputError(f"{model.spec or model.space.name} is not a lit model (locked towers + heads): nothing to prime")

    def through(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
        return np.asarray(head_vectors(head, torch.from_numpy(features)).cpu().numpy())

    images = list(dict.fromkeys([*(p.image for p in unique_images(pairs)), *image_files]))
    if images:
        cached_image_features(encoder_cache_id(model, "image"),
                              lambda paths: through(model.image_head, tower_image_features(model.image_tower, paths, False)),
                              images, label=f"{model.space.name} images", show_progress=show_progress)
    captions = list(dict.fromkeys([*(p.caption for p in pairs), *texts]))
    if captions:
        cached_text_features(encoder_cache_id(model, "text"),
                             lambda batch: through(model.text_head, tower_text_features(model.text_tower, batch, False)),
                             captions, label=f"{model.space.name} texts", show_progress=show_progress)
