"""Retrieval metrics with per-query hits, so that every figure can carry a bootstrap interval.

Protocol (Karpathy / CLIP): a text query is correct if its own image is in the top K; an image
query is correct if any of its captions is in the top K. Ties are counted against the query: a
positive tied with a negative ranks below it, so a degenerate (constant) embedding scores chance or
worse, never better. Search is exact and runs in blocks of queries, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)


#: Upper bound on the elements of one (query block x gallery) score matrix: 2**24 float32 = 64 MiB, so a
#: search over a gallery of any size holds at most this much (plus a boolean mask of the same shape).
MAX_SCORE_ELEMENTS = 1 << 24


def positive_lists_to_csr(positives: Sequence[Sequence[int]], n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, indices): query i's distinct positives are indices[offsets[i]:offsets[i + 1]], sorted."""
    sizes = np.fromiter((len(p) for p in positives), dtype=np.int64, count=len(positives))
    flat = np.fromiter((int(i) for p in positives for i in p), dtype=np.int64, count=int(sizes.sum()))
    owner = np.repeat(np.arange(len(positives)), sizes)
    return _csr(owner, flat, len(positives), n_gallery)


def _csr(owner: np.ndarray, items: np.ndarray, n_queries: int, n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Group (query, gallery item) pairs into CSR form, dropping duplicates, checking every query has one."""
    if items.size and (items.min() < 0 or items.max() >= n_gallery):
        bad = int(owner[(items < 0) | (items >= n_gallery)][0])
        raise ValueError(f"query {bad} has a positive outside the gallery of {n_gallery} items")
    order = np.lexsort((items, owner))
    owner, items = owner[order], items[order]
    keep = np.ones(items.size, dtype=bool)
    keep[1:] = (owner[1:] != owner[:-1]) | (items[1:] != items[:-1])
    owner, items = owner[keep], items[keep]
    counts = np.bincount(owner, minlength=n_queries)
    if n_queries and counts.min() == 0:
        raise ValueError(f"query {int(np.argmin(counts))} has no positive in the gallery")
    offsets = np.zeros(n_queries + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    return offsets, items


def best_positive_rank(
    queries: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    positives: Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray],
    block: int = 1024,
    max_score_elements: int = MAX_SCORE_ELEMENTS,
) -> np.ndarray:
    """0-based rank of each query's best-ranked positive gallery item (pessimistic on ties).

    rank = #items scoring above the best positive + #negatives tied with it. `positives` is one list per
    query, or (offsets, indices) from `positive_lists_to_csr`. Exact search, vectorised per block of
    queries; the block shrinks as the gallery grows so that its scores stay under `max_score_elements`.
    """
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    g = torch.as_tensor(np.asarray(gallery, dtype=np.float32))
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and gallery {tuple(g.shape)} must be 2-D with equal dimension")
    if isinstance(positives, tuple) and len(positives) == 2 and isinstance(positives[0], np.ndarray):
        offsets, indices = positives
    else:
        offsets, indices = positive_lists_to_csr(positives, g.shape[0])
    if len(offsets) != q.shape[0] + 1:
        raise ValueError(f"{len(offsets) - 1} positive lists for {q.shape[0]} queries")
    counts = np.diff(offsets)
    block = max(1, min(block, max_score_elements // max(1, g.shape[0])))
    ranks = np.empty(q.shape[0], dtype=np.int64)
    gt = g.T.contiguous()
    for start in range(0, q.shape[0], block):
        stop = min(start + block, q.shape[0])
        scores = q[start:stop] @ gt  # (b, gallery)
        rows = torch.from_numpy(np.repeat(np.arange(stop - start), counts[start:stop]))
        cols = torch.from_numpy(indices[offsets[start] : offsets[stop]])
        pos_scores = scores[rows, cols]
        best = torch.full((stop - start,), -torch.inf, device=scores.device).scatter_reduce(0, rows, pos_scores, "amax")
        # above + tied negatives = (at or above the best positive) - (positives tied with it, itself included);
        # one comparison pass, summed in int32 (summing bools in int64 is twice as slow).
        at_or_above = (scores >= best[:, None]).sum(1, dtype=torch.int32)
        tied_positives = torch.zeros(stop - start, dtype=torch.int32, device=scores.device).scatter_add(0, rows, (pos_scores == best[rows]).int())
        ranks[start:stop] = (at_or_above - tied_positives).numpy()
    return ranks


def hits_at_k(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, np.ndarray]:
    """Per-query 0/1 hit vectors for each K (K may exceed the gallery: then every query hits)."""
    return {k: (ranks < k).astype(np.float64) for k in ks}


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """One shared set of query resamples, so that methods are compared on the same resamples (paired).

    Materialises (n_resamples, n) indices: for large query sets use `resampled_means`, which draws the
    very same resamples in chunks."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


#: Upper bound on the resample indices held at once by `resampled_means` (2**22 int64 = 32 MiB).
MAX_RESAMPLE_ELEMENTS = 1 << 22


def resampled_means(
    columns: np.ndarray, n_resamples: int = 1000, seed: int = 0, max_elements: int = MAX_RESAMPLE_ELEMENTS
) -> np.ndarray:
    """Column means of `columns` (n queries, m per-query statistics) on each bootstrap resample of the
    queries: (n_resamples, m). Same resamples as `bootstrap_indices(n, n_resamples, seed)`, drawn in
    chunks (memory bounded for any n); every statistic sees the same resamples, which pairs them."""
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim == 1:
        columns = columns[:, None]
    n = columns.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of queries")
    rng = np.random.default_rng(seed)
    chunk = max(1, max_elements // n)
    out = np.empty((n_resamples, columns.shape[1]))
    for start in range(0, n_resamples, chunk):
        c = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(c, n))
        counts = np.bincount((idx + n * np.arange(c)[:, None]).ravel(), minlength=c * n).reshape(c, n)
        out[start : start + c] = counts @ columns / n
    return out


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% bootstrap interval (percentile), in percent when from recalls."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.1f} [{self.low:.1f}, {self.high:.1f}]"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def estimate(samples: np.ndarray, point: float) -> Estimate:
    """Percentile 95% interval; NaN samples (an undefined statistic on that resample) are left out."""
    samples = np.asarray(samples, dtype=np.float64)
    if not np.isfinite(samples).any():
        return Estimate(float(point), float("nan"), float("nan"))
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high))


def update_gain(compat: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """(compat - old) / (new - old) in percent: the share of the upgrade's benefit had without backfill.
    NaN where the new model brings no benefit (the ratio is undefined)."""
    compat, old, new = np.asarray(compat, dtype=np.float64), np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
    denom = new - old
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(denom) > 1e-12, 100 * (compat - old) / denom, np.nan)


def recall_estimate(hits: np.ndarray, resamples: np.ndarray) -> Estimate:
    """Recall in percent, with the bootstrap interval over queries."""
    return estimate(100 * hits[resamples].mean(axis=1), 100 * hits.mean())


def difference_estimate(hits_a: np.ndarray, hits_b: np.ndarray, resamples: np.ndarray) -> Estimate:
    """Paired difference a - b in points, resampling the same queries for both."""
    diff = hits_a - hits_b
    return estimate(100 * diff[resamples].mean(axis=1), 100 * diff.mean())


def gain_estimate(hits_compat: np.ndarray, hits_old: np.ndarray, hits_new: np.ndarray, resamples: np.ndarray) -> Estimate:
    """Update gain (compat - old) / (new - old) in percent; undefined resamples (no upgrade benefit) are dropped."""
    samples = update_gain(hits_compat[resamples].mean(1), hits_old[resamples].mean(1), hits_new[resamples].mean(1))
    point = float(update_gain(hits_compat.mean(), hits_old.mean(), hits_new.mean()))
    return estimate(samples, point)


def text_to_image_positives(caption_image_index: Sequence[int]) -> list[list[int]]:
    return [[int(i)] for i in caption_image_index]


def image_to_text_positives(caption_image_index: Sequence[int], n_images: int) -> list[list[int]]:
    positives: list[list[int]] = [[] for _ in range(n_images)]
    for caption, image in enumerate(caption_image_index):
        positives[int(image)].append(caption)
    return positives


def retrieval_ranks(
    image_queries: np.ndarray | torch.Tensor,
    text_queries: np.ndarray | torch.Tensor,
    image_gallery: np.ndarray | torch.Tensor,
    text_gallery: np.ndarray | torch.Tensor,
    caption_image_index: Sequence[int],
) -> dict[str, np.ndarray]:
    """Ranks for both directions. T2I: text queries vs image gallery; I2T: image queries vs text gallery
    (an image's positives are all its captions)."""
    n_images, index = len(image_gallery), np.asarray(caption_image_index, dtype=np.int64)
    n_captions = len(index)
    t2i = _csr(np.arange(n_captions), index, n_captions, n_images)
    i2t = _csr(index, np.arange(n_captions), n_images, n_captions)
    return {
        "t2i": best_positive_rank(text_queries, image_gallery, t2i),
        "i2t": best_positive_rank(image_queries, text_gallery, i2t),
    }
