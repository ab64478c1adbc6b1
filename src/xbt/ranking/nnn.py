"""Gallery-side calibration (hubness reduction): nearest-neighbour normalisation (NNN, arXiv 2410.24114).

A "hub" is a gallery item that sits near very many queries and so crowds the top of every result list.
NNN lowers each gallery item's score by a bias computed once from a bank of queries that are not the
evaluation queries (training queries, mapped by the very query model that will search):

    score(q, g) = q . g - bias[g],    bias[g] = alpha * mean of the k largest b . g over bank queries b.

The bias depends only on the item and the bank, never on the other items, so an item added later gets its
bias from the stored bank alone, and the old gallery's bias is computed once and stored with it. Exact and
inner-product ANN search apply it with one extra dimension ([q, -1] . [g, bias], `xbt.ranking.nnn.with_bias`).
QB-Norm (arXiv 2112.12777) is the same family (a bank of queries normalising gallery scores); NNN's
additive bias is the one that folds into an index.

Nothing here is chosen on evaluation queries: `choose_alpha` picks the weight on a val split (its queries
and its own gallery), with the bank drawn from training queries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from xbt.embed import DIRECTIONS, ExtraEmbeddings, GalleryBias, PairEmbeddings, QueryVectors
from xbt.metrics import DEFAULT_KS, MAX_SCORE_ELEMENTS, best_positive_rank, hits_at_k

#: The weights `choose_alpha` tries (0: no calibration, so val can always say "leave it off").
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_K = 10

Alpha = float | Mapping[str, float]  # one weight, or one per direction {"t2i": a, "i2t": a}


def with_bias(queries: np.ndarray, gallery: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Queries and gallery with the calibration folded into one extra dimension: [q, -1] . [g, b] = q . g - b.
    Every query's scores shift by the same per-item offsets, so its ranking is that of the calibrated scores."""
    if bias is None:
        return queries, gallery
    bias = np.asarray(bias, dtype=np.float32).reshape(-1)
    if bias.shape[0] != gallery.shape[0]:
        raise ValueError(f"a gallery bias of {bias.shape[0]} values for a gallery of {gallery.shape[0]} items")
    q = np.concatenate([np.asarray(queries, dtype=np.float32), -np.ones((len(queries), 1), np.float32)], axis=1)
    g = np.concatenate([np.asarray(gallery, dtype=np.float32), bias[:, None]], axis=1)
    return q, g


def _matrix(x: Any, what: str) -> torch.Tensor:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, dim); got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(a))


def top_k_mean(gallery: Any, bank: Any, k: int = DEFAULT_K, max_score_elements: int = MAX_SCORE_ELEMENTS,
               exclude_self: bool = False) -> np.ndarray:
    """Per gallery row, the mean of its k largest inner products with the bank's rows ((n,) float64; k is
    capped by the bank's size). Computed in blocks of gallery rows so that one (block x bank) score matrix
    stays under `max_score_elements`: memory is bounded for a gallery of any size. `exclude_self`: the bank
    is the gallery itself, and each row's score with itself is left out (the density of its neighbourhood)."""
    g, b = _matrix(gallery, "the gallery vectors"), _matrix(bank, "the bank of queries")
    if g.shape[1] != b.shape[1]:
        raise ValueError(f"gallery vectors of dimension {g.shape[1]} and bank queries of dimension {b.shape[1]}")
    if len(b) == 0:
        raise ValueError("the bank of queries is empty: calibration needs training queries (a source with pairs)")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if exclude_self and g.shape != b.shape:
        raise ValueError("exclude_self needs the bank to be the gallery itself")
    k = min(int(k), len(b) - 1 if exclude_self else len(b))
    out = np.empty(len(g), dtype=np.float64)
    if k < 1:  # a one-item gallery has no neighbour
        out.fill(0.0)
        return out
    block = max(1, max_score_elements // max(1, len(b)))
    bt = b.T.contiguous()
    for start in range(0, len(g), block):
        scores = g[start : start + block] @ bt
        if exclude_self:
            rows = torch.arange(len(scores), device=scores.device)
            scores[rows, rows + start] = -torch.inf
        out[start : start + block] = torch.topk(scores, k, dim=1).values.double().mean(1).numpy()
    return out


def nnn_bias(gallery: Any, bank: Any, alpha: float, k: int = DEFAULT_K,
             max_score_elements: int = MAX_SCORE_ELEMENTS) -> np.ndarray:
    """NNN's per-item bias: alpha * (mean of the item's top-k similarities to the bank of queries), (n,)
    float32. `gallery` (n, d) and `bank` (m, d) in the same space (the bank: the query model's queries of
    training data, never the evaluation queries). alpha = 0 gives zeros (no calibration)."""
    alpha = _check_alpha(alpha)
    return (alpha * top_k_mean(gallery, bank, k, max_score_elements)).astype(np.float32)


def _check_alpha(alpha: Any) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number; got {alpha!r}") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"alpha must be a finite number >= 0; got {alpha!r}")
    return value


def _per_direction(alpha: Alpha) -> dict[str, float]:
    if isinstance(alpha, Mapping):
        missing = [d for d in DIRECTIONS if d not in alpha]
        if missing:
            raise ValueError(f"alpha per direction needs {', '.join(DIRECTIONS)}; missing {', '.join(missing)}")
        return {d: _check_alpha(alpha[d]) for d in DIRECTIONS}
    return {d: _check_alpha(alpha) for d in DIRECTIONS}


def gallery_bias(gallery: PairEmbeddings, bank: QueryVectors, alpha: Alpha, k: int = DEFAULT_K,
                 extras: ExtraEmbeddings | None = None) -> GalleryBias:
    """The bias of both old galleries: images from the bank's text queries (text-to-image), captions from
    the bank's image queries (image-to-text). The bank must claim the gallery's space. With gallery
    `extras`, their items get their bias the same way (an item's bias depends on the bank alone)."""
    gallery.space.check(bank.space, "the bank of queries")
    a = _per_direction(alpha)
    bias = GalleryBias(images=nnn_bias(gallery.images, bank.texts, a["t2i"], k),
                       texts=nnn_bias(gallery.texts, bank.images, a["i2t"], k))
    if extras is not None:
        gallery.space.check(extras.space, "the gallery extras")
        bias.extra_images = _bias_or_empty(extras.images, bank.texts, a["t2i"], k)
        bias.extra_texts = _bias_or_empty(extras.texts, bank.images, a["i2t"], k)
    return bias


def _bias_or_empty(rows: np.ndarray, bank: np.ndarray, alpha: float, k: int) -> np.ndarray:
    return nnn_bias(rows, bank, alpha, k) if len(rows) else np.zeros(0, np.float32)


def calibrate_queries(queries: QueryVectors, gallery: PairEmbeddings, bank: QueryVectors, alpha: Alpha,
                      k: int = DEFAULT_K, extras: ExtraEmbeddings | None = None) -> QueryVectors:
    """`queries` (a method's, in the old space) with `gallery_bias` set for the old `gallery`: what
    `xbt.eval.matrix.evaluate_upgrade` / `system_hits` then search with. `bank`: the same method's queries
    of training pairs (QueryVectors of the training split), never the evaluation queries. `alpha`: one
    weight or {"t2i": a, "i2t": a} (e.g. `choose_alpha(...).alpha`)."""
    queries.space.check(bank.space, "the bank of queries (made by another query model than the queries?)")
    return replace(queries, gallery_bias=gallery_bias(gallery, bank, alpha, k, extras))


@dataclass
class AlphaChoice:
    """The weight chosen per direction on val, and the val score (mean recall in percent over `ks`) of
    every weight tried, per direction. Ties go to the smaller weight (less intervention)."""

    alpha: dict[str, float]
    scores: dict[str, dict[float, float]] = field(default_factory=dict)
    n_val_queries: dict[str, int] = field(default_factory=dict)
    k: int = DEFAULT_K

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": dict(self.alpha), "k": self.k, "n_val_queries": dict(self.n_val_queries),
                "scores": {d: {str(a): s for a, s in row.items()} for d, row in self.scores.items()}}


def choose_alpha(val_queries: QueryVectors, val_gallery: PairEmbeddings, bank: QueryVectors,
                 grid: Sequence[float] = ALPHA_GRID, k: int = DEFAULT_K, ks: Sequence[int] = DEFAULT_KS,
                 directions: Sequence[str] = DIRECTIONS) -> AlphaChoice:
    """Pick NNN's weight per direction on a val split: `val_queries` (the method's queries of the val
    pairs), `val_gallery` (the old model's embeddings of the same val pairs: the val split's own gallery)
    and `bank` (the method's queries of training pairs). Score: mean R@K over `ks` in that direction.
    Only the arrays of the `directions` asked for are used (t2i: text queries, gallery images, the bank's
    texts; i2t: image queries, gallery captions, the bank's images). Never pass evaluation queries here."""
    if not grid:
        raise ValueError("the alpha grid is empty")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise ValueError(f"directions must be among {', '.join(DIRECTIONS)}; got {list(directions)}")
    grid = sorted({_check_alpha(a) for a in grid})
    val_gallery.space.check(val_queries.space, "the val queries")
    val_gallery.space.check(bank.space, "the bank of queries")
    index = np.asarray(val_gallery.caption_image_index, dtype=np.int64)
    n_images, n_captions = len(val_gallery.images), len(index)
    sides: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]]]] = {
        "t2i": (val_queries.texts, val_gallery.images, bank.texts, [[int(i)] for i in index]),
        "i2t": (val_queries.images, val_gallery.texts, bank.images,
                [[int(j) for j in np.flatnonzero(index == i)] for i in range(n_images)])}
    scores: dict[str, dict[float, float]] = {}
    n: dict[str, int] = {}
    for d in directions:
        queries, gallery, bank_side, positives = sides[d]
        want = (n_captions if d == "t2i" else n_images, gallery.shape[1])
        if queries.shape != want:
            raise ValueError(f"{d}: val queries of shape {queries.shape}; the val pairs need {want}"
                             " (queries and gallery must come from the same val pairs)")
        base = top_k_mean(gallery, bank_side, k)  # independent of alpha: computed once, scaled per weight
        scores[d], n[d] = {}, len(queries)
        for a in grid:
            q, g = with_bias(queries, gallery, (a * base).astype(np.float32))
            hits = hits_at_k(best_positive_rank(q, g, positives), ks)
            scores[d][a] = float(100 * np.mean([hits[kk].mean() for kk in ks]))
    chosen = {d: max(grid, key=lambda a: (scores[d][a], -a)) for d in directions}
    return AlphaChoice(alpha=chosen, scores=scores, n_val_queries=n, k=int(k))
