"""Retrieval metrics with per-query hits, so that every figure can carry a bootstrap interval.

Protocol (Karpathy / CLIP): a text query is correct if its own image is in the top K; an image
query is correct if any of its captions is in the top K. Ties are counted against the query: a
positive tied with a negative ranks below it, so a degenerate (constant) embedding scores chance or
worse, never better. Search is exact and runs in blocks of queries, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def _positives_csr(positives: Any, n_queries: int, n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive lists (or an (offsets, indices) pair already in CSR form) as CSR, one list per query."""
    if isinstance(positives, tuple) and len(positives) == 2 and isinstance(positives[0], np.ndarray):
        offsets, indices = positives
    else:
        offsets, indices = positive_lists_to_csr(positives, n_gallery)
    if len(offsets) != n_queries + 1:
        raise ValueError(f"{len(offsets) - 1} positive lists for {n_queries} queries")
    return offsets, indices


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
    offsets, indices = _positives_csr(positives, q.shape[0], g.shape[0])
    return _ranks_and_best(q, g, offsets, indices, block, max_score_elements)[0]


def _ranks_and_best(q: torch.Tensor, g: torch.Tensor, offsets: np.ndarray, indices: np.ndarray, block: int,
                    max_score_elements: int) -> tuple[np.ndarray, torch.Tensor]:
    """(ranks as `best_positive_rank`, each query's best positive score)."""
    counts = np.diff(offsets)
    block = max(1, min(block, max_score_elements // max(1, g.shape[0])))
    ranks = np.empty(q.shape[0], dtype=np.int64)
    best_all = torch.empty(q.shape[0], dtype=torch.float32, device=g.device)
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
        best_all[start:stop] = best
    return ranks, best_all


def best_positive_rank_with_extras(
    queries: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    positives: Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray],
    extras: torch.Tensor | np.ndarray,
    sizes: Sequence[int],
    block: int = 1024,
    max_score_elements: int = MAX_SCORE_ELEMENTS,
) -> dict[int, np.ndarray]:
    """`best_positive_rank` in the gallery plus the first n rows of `extras`, for each n in `sizes`:
    {n: ranks}. Extras are gallery items that are nobody's positive (distractors), so each adds one to a
    query's rank when it scores at or above the query's best positive (ties against the query, as above):
    the rank in gallery + extras[:n] is the rank in the gallery plus a count over extras[:n]. The extras
    are streamed in blocks (one (query block x extras block) score matrix under `max_score_elements` at a
    time), each extra scored once for all the sizes: memory is bounded for any number of extras."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    g = torch.as_tensor(np.asarray(gallery, dtype=np.float32))
    e = torch.as_tensor(np.asarray(extras, dtype=np.float32))
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and gallery {tuple(g.shape)} must be 2-D with equal dimension")
    if e.ndim != 2 or (e.shape[0] and e.shape[1] != q.shape[1]):
        raise ValueError(f"gallery extras {tuple(e.shape)} must be 2-D with the queries' dimension {q.shape[1]}")
    wanted = sorted({int(n) for n in sizes})
    if wanted and (wanted[0] < 0 or wanted[-1] > e.shape[0]):
        raise ValueError(f"extra gallery sizes {wanted} must lie in [0, {e.shape[0]}] (the extras given)")
    offsets, indices = _positives_csr(positives, q.shape[0], g.shape[0])
    ranks, best = _ranks_and_best(q, g, offsets, indices, block, max_score_elements)
    out: dict[int, np.ndarray] = {}
    above = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    q_block = max(1, min(block, q.shape[0]))
    e_block = max(1, max_score_elements // q_block)
    done = 0
    for n in wanted:
        for es in range(done, n, e_block):
            ee = min(es + e_block, n)
            et = e[es:ee].T.contiguous()
            for qs in range(0, q.shape[0], q_block):
                qe = min(qs + q_block, q.shape[0])
                above[qs:qe] += ((q[qs:qe] @ et) >= best[qs:qe, None]).sum(1, dtype=torch.int32).long()
        done = max(done, n)
        out[n] = ranks + above.cpu().numpy()
    return out


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


def retrieval_ranks_with_extras(
    image_queries: np.ndarray | torch.Tensor,
    text_queries: np.ndarray | torch.Tensor,
    image_gallery: np.ndarray | torch.Tensor,
    text_gallery: np.ndarray | torch.Tensor,
    caption_image_index: Sequence[int],
    extra_images: np.ndarray | torch.Tensor,
    extra_texts: np.ndarray | torch.Tensor,
    sizes: Sequence[tuple[int, int]],
) -> list[dict[str, np.ndarray]]:
    """`retrieval_ranks` with extra gallery items: for each (n_images, n_texts) in `sizes`, the ranks in the
    image gallery plus the first n_images extra images (T2I) and the text gallery plus the first n_texts
    extra texts (I2T). Extras are never queries and never positives."""
    n_images, index = len(image_gallery), np.asarray(caption_image_index, dtype=np.int64)
    n_captions = len(index)
    t2i = _csr(np.arange(n_captions), index, n_captions, n_images)
    i2t = _csr(index, np.arange(n_captions), n_images, n_captions)
    by_images = best_positive_rank_with_extras(text_queries, image_gallery, t2i, extra_images, [s[0] for s in sizes])
    by_texts = best_positive_rank_with_extras(image_queries, text_gallery, i2t, extra_texts, [s[1] for s in sizes])
    return [{"t2i": by_images[int(a)], "i2t": by_texts[int(b)]} for a, b in sizes]


def near_duplicates(items: np.ndarray | torch.Tensor, references: np.ndarray | torch.Tensor, threshold: float,
                    max_score_elements: int = MAX_SCORE_ELEMENTS) -> dict[str, object]:
    """Each item's highest cosine similarity to any reference (unit vectors, e.g. gallery extras against the
    evaluation items, embedded by one model), in blocks: the items at or above `threshold` (indices, with
    their nearest reference and cosine: all in `indices`, the first 50 in `flagged`) and the distribution of
    the maxima."""
    a = torch.as_tensor(np.asarray(items, dtype=np.float32))
    b = torch.as_tensor(np.asarray(references, dtype=np.float32))
    if a.ndim != 2 or b.ndim != 2 or (len(a) and len(b) and a.shape[1] != b.shape[1]):
        raise ValueError(f"items {tuple(a.shape)} and references {tuple(b.shape)} must be 2-D with equal dimension")
    best = np.full(len(a), -np.inf, dtype=np.float32)
    nearest = np.zeros(len(a), dtype=np.int64)
    if len(a) and len(b):
        step = max(1, max_score_elements // len(b))
        bt = b.T.contiguous()
        for start in range(0, len(a), step):
            values, where = (a[start : start + step] @ bt).max(1)
            best[start : start + step], nearest[start : start + step] = values.numpy(), where.numpy()
    flagged = np.flatnonzero(best >= threshold)
    finite = best[np.isfinite(best)]
    quantiles = {q: float(np.quantile(finite, q)) for q in (0.5, 0.99, 0.999)} if finite.size else {}
    return {"threshold": float(threshold), "n_items": int(len(a)), "n_references": int(len(b)),
            "n_at_or_above": int(flagged.size), "max": float(finite.max()) if finite.size else None,
            "quantiles": {str(q): v for q, v in quantiles.items()},
            "indices": [int(i) for i in flagged],
            "flagged": [{"item": int(i), "reference": int(nearest[i]), "cosine": float(best[i])} for i in flagged[:50]]}


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
