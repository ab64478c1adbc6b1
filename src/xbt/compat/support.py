"""Choosing a method's one free setting on the support split (never on the evaluation split).

SLERP's weight, the affine map's ridge and the adapter's number of epochs are each picked by the
same score: mean Recall@{1,5,10} over both directions of the support pairs' mapped new-model queries
against the support pairs' old-model gallery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from xbt.errors import InputError
from xbt.embed import PairEmbeddings
from xbt.metrics import DEFAULT_KS, retrieval_ranks
from xbt.models.base import EmbeddingSpace

Support = tuple[PairEmbeddings, PairEmbeddings]


def order_support(support: Support, new_space: EmbeddingSpace, old_space: EmbeddingSpace) -> Support:
    """(new, old) support embeddings, recognised by their spaces whatever order they were given in."""
    a, b = support
    if a.space.fingerprint == old_space.fingerprint and b.space.fingerprint == new_space.fingerprint:
        a, b = b, a
    new_space.check(a.space, "the support split's new-model embeddings")
    old_space.check(b.space, "the support split's old-model embeddings")
    if list(a.caption_image_index) != list(b.caption_image_index):
        raise InputError("the support embeddings of the two models come from different pair sets")
    return a, b


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


BOTH_DIRECTIONS = ("t2i", "i2t")


def support_score(
    map_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    new: PairEmbeddings,
    old: PairEmbeddings,
    ks: Sequence[int] = DEFAULT_KS,
    directions: Sequence[str] = BOTH_DIRECTIONS,
) -> float:
    """Mean recall (0-1) over `directions` (both by default; a map that serves one query tower is scored
    on the direction its queries search: text queries t2i, image queries i2t) and `ks` of
    `map_fn(new vectors, old vectors)`."""
    if not directions or any(d not in BOTH_DIRECTIONS for d in directions):
        raise InputError(f"support directions must be among {BOTH_DIRECTIONS}, not {list(directions)}")
    images = l2_normalise(np.asarray(map_fn(new.images, old.images), dtype=np.float32))
    texts = l2_normalise(np.asarray(map_fn(new.texts, old.texts), dtype=np.float32))
    ranks = retrieval_ranks(images, texts, old.images, old.texts, old.caption_image_index)
    return float(np.mean([(ranks[d] < k).mean() for d in directions for k in ks]))


def best_setting(scores: dict[float, float], prefer: str = "larger") -> float:
    """The setting with the highest score; ties go to the larger (or smaller) setting."""
    best = max(scores.values())
    tied = [s for s, v in scores.items() if v >= best - 1e-12]
    return max(tied) if prefer == "larger" else min(tied)


def rounded(scores: dict[float, float]) -> dict[str, float]:
    """Support scores for the record: string keys (JSON), five decimals."""
    return {str(k): round(v, 5) for k, v in scores.items()}
