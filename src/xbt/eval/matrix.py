"""The compatibility matrix: old->old, new->new and each method's new->old, both directions, R@K, with
paired bootstrap intervals, the BCT criterion and the update gain per cell."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xbt.eval.embed import PairEmbeddings
from xbt.eval.retrieval import (
    DEFAULT_KS,
    Estimate,
    bootstrap_indices,
    difference_estimate,
    gain_estimate,
    hits_at_k,
    recall_estimate,
    retrieval_ranks,
)

DIRECTIONS = ("t2i", "i2t")
DIRECTION_NAMES = {"t2i": "text-to-image", "i2t": "image-to-text"}


@dataclass
class QueryVectors:
    """A method's queries, already in the gallery's space: images (n_images, d) and texts (n_captions, d)."""

    images: np.ndarray
    texts: np.ndarray


@dataclass
class Cell:
    recall: Estimate
    vs_old: Estimate  # paired difference with old->old, in points
    gain: Estimate  # update gain, in percent

    @property
    def passes(self) -> bool:
        return self.vs_old.value > 0

    @property
    def passes_confidently(self) -> bool:
        return self.vs_old.low > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recall": self.recall.to_dict(), "vs_old": self.vs_old.to_dict(), "gain": self.gain.to_dict(),
            "passes": self.passes, "passes_confidently": self.passes_confidently,
        }


@dataclass
class UpgradeMatrix:
    n_queries: dict[str, int]
    ks: tuple[int, ...]
    old_old: dict[str, dict[int, Estimate]]
    new_new: dict[str, dict[int, Estimate]]
    new_vs_old: dict[str, dict[int, Estimate]]  # the ceiling's paired difference
    methods: dict[str, dict[str, dict[int, Cell]]] = field(default_factory=dict)
    n_resamples: int = 1000

    def all_pass(self, method: str, confidently: bool = False) -> bool:
        cells = [c for d in self.methods[method].values() for c in d.values()]
        return all(c.passes_confidently if confidently else c.passes for c in cells)

    def mean_gain(self, method: str) -> float:
        return float(np.mean([c.gain.value for d in self.methods[method].values() for c in d.values()]))

    def to_dict(self) -> dict[str, Any]:
        def est(table):
            return {d: {str(k): e.to_dict() for k, e in row.items()} for d, row in table.items()}

        return {
            "n_queries": self.n_queries, "ks": list(self.ks), "n_resamples": self.n_resamples,
            "old_old": est(self.old_old), "new_new": est(self.new_new), "new_new_vs_old_old": est(self.new_vs_old),
            "methods": {
                m: {d: {str(k): c.to_dict() for k, c in row.items()} for d, row in cells.items()}
                for m, cells in self.methods.items()
            },
        }


def evaluate_upgrade(
    old: PairEmbeddings,
    new: PairEmbeddings,
    methods: Mapping[str, QueryVectors],
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
) -> UpgradeMatrix:
    """Every method is compared with old->old on the same query resamples (paired bootstrap)."""
    index = old.caption_image_index
    if new.caption_image_index != index:
        raise ValueError("old and new embeddings must come from the same pair set")

    def hits(image_q, text_q, image_g, text_g) -> dict[str, dict[int, np.ndarray]]:
        ranks = retrieval_ranks(image_q, text_q, image_g, text_g, index)
        return {d: hits_at_k(ranks[d], ks) for d in DIRECTIONS}

    old_hits = hits(old.images, old.texts, old.images, old.texts)
    new_hits = hits(new.images, new.texts, new.images, new.texts)
    n_queries = {"t2i": len(old.texts), "i2t": len(old.images)}
    resamples = {d: bootstrap_indices(n_queries[d], n_resamples, seed) for d in DIRECTIONS}

    def table(h):
        return {d: {k: recall_estimate(h[d][k], resamples[d]) for k in ks} for d in DIRECTIONS}

    matrix = UpgradeMatrix(
        n_queries=n_queries, ks=tuple(ks), old_old=table(old_hits), new_new=table(new_hits),
        new_vs_old={d: {k: difference_estimate(new_hits[d][k], old_hits[d][k], resamples[d]) for k in ks} for d in DIRECTIONS},
        n_resamples=n_resamples,
    )
    for name, q in methods.items():
        if q.images.shape[1] != old.images.shape[1] or q.texts.shape[1] != old.texts.shape[1]:
            raise ValueError(f"method {name!r} returned {q.texts.shape[1]}-d queries; the old gallery is {old.texts.shape[1]}-d")
        h = hits(q.images, q.texts, old.images, old.texts)
        matrix.methods[name] = {
            d: {
                k: Cell(
                    recall=recall_estimate(h[d][k], resamples[d]),
                    vs_old=difference_estimate(h[d][k], old_hits[d][k], resamples[d]),
                    gain=gain_estimate(h[d][k], old_hits[d][k], new_hits[d][k], resamples[d]),
                )
                for k in ks
            }
            for d in DIRECTIONS
        }
    return matrix


def format_matrix(matrix: UpgradeMatrix) -> str:
    """A plain-text table: one row per (direction, K), old/new and each method with its gain."""
    lines = []
    header = ["dir", "K", "old->old", "new->new", "new-old"] + [f"{m} (vs old; gain%)" for m in matrix.methods]
    lines.append(" | ".join(header))
    for d in DIRECTIONS:
        for k in matrix.ks:
            row = [d, f"R@{k}", str(matrix.old_old[d][k]), str(matrix.new_new[d][k]), str(matrix.new_vs_old[d][k])]
            for m, cells in matrix.methods.items():
                c = cells[d][k]
                mark = "PASS" if c.passes_confidently else ("pass" if c.passes else "FAIL")
                row.append(f"{c.recall} ({c.vs_old.value:+.1f} {mark}; {c.gain.value:.0f}%)")
            lines.append(" | ".join(row))
    lines.append(f"queries: t2i={matrix.n_queries['t2i']} i2t={matrix.n_queries['i2t']}; 95% bootstrap intervals, "
                 f"{matrix.n_resamples} paired resamples of queries")
    return "\n".join(lines)
