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


def best_positive_rank(
    queries: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    positives: Sequence[Sequence[int]],
    block: int = 1024,
) -> np.ndarray:
    """0-based rank of each query's best-ranked positive gallery item (pessimistic on ties)."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    g = torch.as_tensor(np.asarray(gallery), dtype=torch.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and gallery {tuple(g.shape)} must be 2-D with equal dimension")
    if len(positives) != q.shape[0]:
        raise ValueError(f"{len(positives)} positive lists for {q.shape[0]} queries")
    ranks = np.empty(q.shape[0], dtype=np.int64)
    for start in range(0, q.shape[0], block):
        scores = q[start : start + block] @ g.T
        for row, i in enumerate(range(start, min(start + block, q.shape[0]))):
            pos = torch.as_tensor(list(positives[i]), dtype=torch.long)
            if pos.numel() == 0:
                raise ValueError(f"query {i} has no positive in the gallery")
            s = scores[row]
            best = s[pos].max()
            is_pos = torch.zeros_like(s, dtype=torch.bool)
            is_pos[pos] = True
            ranks[i] = int((s > best).sum()) + int(((s == best) & ~is_pos).sum())
    return ranks


def hits_at_k(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, np.ndarray]:
    """Per-query 0/1 hit vectors for each K (K may exceed the gallery: then every query hits)."""
    return {k: (ranks < k).astype(np.float64) for k in ks}


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """One shared set of query resamples, so that methods are compared on the same resamples (paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


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
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high))


def recall_estimate(hits: np.ndarray, resamples: np.ndarray) -> Estimate:
    """Recall in percent, with the bootstrap interval over queries."""
    return estimate(100 * hits[resamples].mean(axis=1), 100 * hits.mean())


def difference_estimate(hits_a: np.ndarray, hits_b: np.ndarray, resamples: np.ndarray) -> Estimate:
    """Paired difference a - b in points, resampling the same queries for both."""
    diff = hits_a - hits_b
    return estimate(100 * diff[resamples].mean(axis=1), 100 * diff.mean())


def gain_estimate(hits_compat: np.ndarray, hits_old: np.ndarray, hits_new: np.ndarray, resamples: np.ndarray) -> Estimate:
    """Update gain (compat - old) / (new - old) in percent; undefined resamples (no upgrade benefit) are dropped."""

    def gain(c: np.ndarray, o: np.ndarray, n: np.ndarray) -> np.ndarray:
        denom = n - o
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.abs(denom) > 1e-12, 100 * (c - o) / denom, np.nan)

    samples = gain(hits_compat[resamples].mean(1), hits_old[resamples].mean(1), hits_new[resamples].mean(1))
    point = float(gain(np.array(hits_compat.mean()), np.array(hits_old.mean()), np.array(hits_new.mean())))
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
    """Ranks for both directions. T2I: text queries vs image gallery; I2T: image queries vs text gallery."""
    n_images = len(image_gallery)
    return {
        "t2i": best_positive_rank(text_queries, image_gallery, text_to_image_positives(caption_image_index)),
        "i2t": best_positive_rank(image_queries, text_gallery, image_to_text_positives(caption_image_index, n_images)),
    }
