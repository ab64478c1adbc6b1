"""Embedding a pair set with a model, once: vectors are cached under the model's space id and item content."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xbt.data.features import cached_image_features, cached_text_features
from xbt.data.pairs import Pair, unique_images
from xbt.models.base import EmbeddingSpace, VLPModel


@dataclass
class PairEmbeddings:
    """Images (one row per distinct image_id) and captions (one row per pair), with the caption -> image map."""

    images: np.ndarray
    texts: np.ndarray
    caption_image_index: list[int]
    space: EmbeddingSpace


def encoder_cache_id(space: EmbeddingSpace, modality: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{space.name}-{space.fingerprint[:16]}-{space.dim}-{modality}")


def caption_image_index(pairs: Sequence[Pair]) -> list[int]:
    order = {p.image_id: i for i, p in enumerate(unique_images(pairs))}
    return [order[p.image_id] for p in pairs]


def embed_pairs(model: VLPModel, pairs: Sequence[Pair], show_progress: bool = False) -> PairEmbeddings:
    space = model.space
    images = [p.image for p in unique_images(pairs)]
    image_vecs = cached_image_features(
        encoder_cache_id(space, "image"), lambda paths: model.encode_image(paths).numpy(), images,
        label=f"{space.name} images", show_progress=show_progress,
    )
    text_vecs = cached_text_features(
        encoder_cache_id(space, "text"), lambda texts: model.encode_text(texts).numpy(), [p.caption for p in pairs],
        label=f"{space.name} texts", show_progress=show_progress,
    )
    return PairEmbeddings(image_vecs, text_vecs, caption_image_index(pairs), space)
