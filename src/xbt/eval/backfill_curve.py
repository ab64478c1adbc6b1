"""Measuring retrieval quality during a migration, offline: R@K of the rank-slot merge (`slot_merge`, the
rule `xbt.gallery.migrating.MigratingRetriever` serves by) against the fraction of the gallery backfilled.

`slot_merge` lives here, below the gallery layer, because both the served merge and this measurement
follow it (the evaluation must not import the gallery).
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from xbt.errors import InputError, SpaceMismatchError
from xbt.eval.retrieval import (
    DEFAULT_KS,
    Estimate,
    bootstrap_indices,
    image_to_text_positives,
    recall_estimate,
    text_to_image_positives,
)

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))

T = TypeVar("T", bound=Hashable)


# --------------------------------------------------------------------------------------------------
# the merge rule
# --------------------------------------------------------------------------------------------------
def slot_merge(old_ranking: Sequence[T], backfilled: Container[T], new_ranking: Sequence[T]) -> list[tuple[T, str]]:
    """Merge an old-space ranking over the complete old gallery with a new-space ranking over the
    backfilled items: slots the old ranking gives to backfilled items are refilled, in order, by the new
    ranking. Returns (item, "old" | "new") pairs, best first. No score of one space meets the other's."""
    fill = iter(new_ranking)
    merged: list[tuple[T, str]] = []
    seen: set[T] = set()  # an item backfilled between the two searches must not appear twice
    for item in old_ranking:
        if item in backfilled:
            nxt = next(fill, None)
            while nxt is not None and nxt in seen:
                nxt = next(fill, None)
            if nxt is not None:
                merged.append((nxt, "new"))
                seen.add(nxt)
        elif item not in seen:
            merged.append((item, "old"))
            seen.add(item)
    return merged


# --------------------------------------------------------------------------------------------------
# the curve
# --------------------------------------------------------------------------------------------------
@dataclass
class BackfillCurve:
    """R@K of the merged search against the fraction of the gallery backfilled."""

    direction: str
    fractions: list[float]
    recall: dict[int, list[Estimate]]
    n_queries: int

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "fractions": self.fractions, "n_queries": self.n_queries,
                "recall": {str(k): [e.to_dict() for e in row] for k, row in self.recall.items()}}


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row, best first (stable among equal scores)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def backfill_curve(
    old_gallery: np.ndarray,
    new_gallery: np.ndarray,
    compat_queries: np.ndarray,
    new_queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    order: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    direction: str = "",
    seed: int = 0,
    n_resamples: int = 1000,
    block: int = 512,
) -> BackfillCurve:
    """R@K of `slot_merge` search when a fraction of the gallery has been backfilled.

    Row i of old_gallery (old model) and new_gallery (new model) is the same item; compat_queries are the
    compatible model's queries (old space), new_queries the new model's; `positives[q]` lists the gallery
    rows that answer query q. `order` is the backfill order (a permutation of the rows; random with
    `seed` by default). Fraction 0 reproduces compat->old retrieval, fraction 1 new->new."""
    old_gallery, new_gallery = np.asarray(old_gallery, np.float32), np.asarray(new_gallery, np.float32)
    compat_queries, new_queries = np.asarray(compat_queries, np.float32), np.asarray(new_queries, np.float32)
    n, n_q = len(old_gallery), len(compat_queries)
    if len(new_gallery) != n or len(new_queries) != n_q or len(positives) != n_q:
        raise InputError("old/new galleries must have the same rows, and compat/new queries and positives the same count")
    if compat_queries.shape[1] != old_gallery.shape[1] or new_queries.shape[1] != new_gallery.shape[1]:
        raise SpaceMismatchError("compat queries must match the old gallery's dimension, new queries the new gallery's")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise InputError("fractions must lie in [0, 1]")
    order = np.random.default_rng(seed).permutation(n) if order is None else np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise InputError("order must be a permutation of the gallery rows")
    rank_in_order = np.empty(n, dtype=np.int64)
    rank_in_order[order] = np.arange(n)
    k_max = max(ks)
    pos_sets = [set(int(i) for i in p) for p in positives]
    hits = {f: {k: np.zeros(n_q) for k in ks} for f in fractions}
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        old_top = _top_k(compat_queries[start:stop] @ old_gallery.T, k_max)
        new_scores = new_queries[start:stop] @ new_gallery.T
        for f in fractions:
            done = rank_in_order < int(round(f * n))
            masked = np.where(done[None, :], new_scores, -np.inf)
            new_top = _top_k(masked, k_max) if done.any() else np.empty((stop - start, 0), np.int64)
            for row in range(stop - start):
                fill = [int(i) for i in new_top[row] if done[i]]
                merged = [i for i, _ in slot_merge([int(i) for i in old_top[row]], _Mask(done), fill)]
                q = start + row
                for k in ks:
                    hits[f][k][q] = float(any(i in pos_sets[q] for i in merged[:k]))
    resamples = bootstrap_indices(n_q, n_resamples, seed)
    recall = {k: [recall_estimate(hits[f][k], resamples) for f in fractions] for k in ks}
    return BackfillCurve(direction, [float(f) for f in fractions], recall, n_q)


class _Mask:
    """`in` over a boolean row mask (for slot_merge on integer rows)."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def __contains__(self, i: object) -> bool:
        return bool(self.mask[int(i)])  # type: ignore[arg-type]


def backfill_curves(old: Any, compat: Any, new: Any, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    seed: int = 0, n_resamples: int = 1000) -> dict[str, BackfillCurve]:
    """Both directions from pair embeddings: `old` and `new` are PairEmbeddings of the old and new models on
    the same pairs, `compat` the compatible model's QueryVectors (old space; e.g.
    `xbt.eval.runner.compatible_queries(model, pairs, new, old)`). Spaces are checked, not just shapes:
    the queries must be stamped with the old space, and `new` must be another space than `old`.
    T2I backfills the image gallery, I2T the caption gallery."""
    if list(old.caption_image_index) != list(new.caption_image_index):
        raise InputError("old and new embeddings must come from the same pairs in the same order")
    old.space.check(compat.space, "the compatible model's queries")
    if new.space == old.space:
        raise InputError(f"the 'new' embeddings are of the old space {old.space.id}: pass the new model's own embeddings")
    index = list(old.caption_image_index)
    return {
        "t2i": backfill_curve(old.images, new.images, compat.texts, new.texts, text_to_image_positives(index),
                              fractions, direction="t2i", seed=seed, n_resamples=n_resamples),
        "i2t": backfill_curve(old.texts, new.texts, compat.images, new.images,
                              image_to_text_positives(index, len(old.images)), fractions, direction="i2t", seed=seed,
                              n_resamples=n_resamples),
    }


def format_curves(curves: dict[str, BackfillCurve], k: int = 1) -> str:
    """A plain-text table: fraction backfilled -> R@k per direction."""
    dirs = list(curves)
    lines = ["backfilled  " + "  ".join(f"{d} R@{k:<16}" for d in dirs)]
    for j, f in enumerate(next(iter(curves.values())).fractions):
        lines.append(f"{100 * f:9.0f}%  " + "  ".join(f"{str(curves[d].recall[k][j]):<22}" for d in dirs))
    return "\n".join(lines)
