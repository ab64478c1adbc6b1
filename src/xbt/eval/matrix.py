"""The compatibility matrix: old->old, new->new and each method's new->old, both directions, R@K, with
paired bootstrap intervals, the BCT criterion and the update gain per cell."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xbt.embed import DIRECTIONS, GalleryBias, PairEmbeddings, QueryVectors
from xbt.metrics import (
    DEFAULT_KS,
    Estimate,
    estimate,
    hits_at_k,
    resampled_means,
    retrieval_ranks,
    update_gain,
)
from xbt.ranking.nnn import with_bias

@dataclass
class Cell:
    recall: Estimate
    vs_old: Estimate  # paired difference with old->old, in points
    gain: Estimate  # update gain, in percent

    @property
    def passes(self) -> bool:
        """The compatibility criterion on the point estimate: M(new->old) > M(old->old)."""
        return self.vs_old.value > 0

    @property
    def passes_confidently(self) -> bool:
        """The whole 95% interval of M(new->old) - M(old->old) lies above zero."""
        return self.vs_old.low > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recall": self.recall.to_dict(), "vs_old": self.vs_old.to_dict(), "gain": self.gain.to_dict(),
            "passes": self.passes, "passes_confidently": self.passes_confidently,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        return cls(_estimate(data["recall"]), _estimate(data["vs_old"]), _estimate(data["gain"]))


def _estimate(data: Mapping[str, Any]) -> Estimate:
    """JSON null stands for NaN (an undefined gain), since strict JSON has no NaN."""
    return Estimate(*(float("nan") if data[key] is None else float(data[key]) for key in ("value", "low", "high")))


@dataclass
class UpgradeMatrix:
    n_queries: dict[str, int]
    ks: tuple[int, ...]
    old_old: dict[str, dict[int, Estimate]]
    new_new: dict[str, dict[int, Estimate]]
    new_vs_old: dict[str, dict[int, Estimate]]  # the ceiling's paired difference
    methods: dict[str, dict[str, dict[int, Cell]]] = field(default_factory=dict)
    n_resamples: int = 1000
    # Per method, what a reader needs besides its numbers: needs_old_model_at_query_time, fits_on, ...
    method_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def cells(self, method: str) -> list[Cell]:
        return [c for d in self.methods[method].values() for c in d.values()]

    def all_pass(self, method: str, confidently: bool = False) -> bool:
        return all(c.passes_confidently if confidently else c.passes for c in self.cells(method))

    def n_passing(self, method: str, confidently: bool = False) -> int:
        return sum(c.passes_confidently if confidently else c.passes for c in self.cells(method))

    def mean_gain(self, method: str) -> float:
        """Mean update gain over the cells where it is defined (NaN if it is defined nowhere)."""
        gains = np.array([c.gain.value for c in self.cells(method)], dtype=np.float64)
        return float(np.nanmean(gains)) if np.isfinite(gains).any() else float("nan")

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
            "method_info": self.method_info,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpgradeMatrix:
        """Inverse of `to_dict` (e.g. the "matrix" of a results.json)."""

        def est(table):
            return {d: {int(k): _estimate(e) for k, e in row.items()} for d, row in table.items()}

        return cls(
            n_queries={d: int(n) for d, n in data["n_queries"].items()}, ks=tuple(int(k) for k in data["ks"]),
            old_old=est(data["old_old"]), new_new=est(data["new_new"]), new_vs_old=est(data["new_new_vs_old_old"]),
            methods={
                m: {d: {int(k): Cell.from_dict(c) for k, c in row.items()} for d, row in cells.items()}
                for m, cells in data["methods"].items()
            },
            n_resamples=int(data.get("n_resamples", 1000)), method_info=dict(data.get("method_info", {})),
        )


def system_hits(
    old: PairEmbeddings,
    new: PairEmbeddings,
    methods: Mapping[str, QueryVectors],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """Per-query hits of every system on the old gallery: {"old", "new", "method:NAME"} -> direction -> K ->
    (n_queries,) 0/1. Each method's queries are checked against the old gallery's space and shapes."""
    index = old.caption_image_index
    if list(new.caption_image_index) != list(index):
        raise ValueError("old and new embeddings must come from the same pair set")
    ks = tuple(int(k) for k in ks)

    def hits(image_q, text_q, image_g, text_g, bias: GalleryBias | None = None) -> dict[str, dict[int, np.ndarray]]:
        if bias is None:
            ranks = retrieval_ranks(image_q, text_q, image_g, text_g, index)
        else:
            text_q, image_g = with_bias(text_q, image_g, bias.images)
            image_q, text_g = with_bias(image_q, text_g, bias.texts)
            ranks = retrieval_ranks(image_q, text_q, image_g, text_g, index)
        return {d: hits_at_k(ranks[d], ks) for d in DIRECTIONS}

    for name, q in methods.items():
        old.space.check(q.space, f"the queries of method {name!r}")
        if q.images.shape != (len(old.images), old.images.shape[1]) or q.texts.shape != (len(old.texts), old.texts.shape[1]):
            raise ValueError(
                f"method {name!r} returned images {q.images.shape} and texts {q.texts.shape}; the old gallery"
                f" has images {old.images.shape} and texts {old.texts.shape}"
            )
    systems: dict[str, dict[str, dict[int, np.ndarray]]] = {
        "old": hits(old.images, old.texts, old.images, old.texts),
        "new": hits(new.images, new.texts, new.images, new.texts),
    }
    for name, q in methods.items():
        systems["method:" + name] = hits(q.images, q.texts, old.images, old.texts, q.gallery_bias)
    return systems


def evaluate_upgrade(
    old: PairEmbeddings,
    new: PairEmbeddings,
    methods: Mapping[str, QueryVectors],
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
) -> UpgradeMatrix:
    """Every method is compared with old->old on the same query resamples (paired bootstrap)."""
    return matrix_from_hits(system_hits(old, new, methods, ks), ks, n_resamples, seed)


def matrix_from_hits(
    systems: Mapping[str, Mapping[str, Mapping[int, np.ndarray]]],
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
) -> UpgradeMatrix:
    """The matrix from per-query hits ({"old", "new", "method:NAME"} -> direction -> K -> (n_queries,)), e.g.
    pooled over cross-validation folds; a query's hit may be a mean over seeds (a value in [0, 1]).

    All per-query hits of a direction are resampled together (one pass, memory bounded), so recalls,
    differences and gains of every method come from the same resamples."""
    ks = tuple(int(k) for k in ks)
    n_queries = {d: int(len(systems["old"][d][ks[0]])) for d in DIRECTIONS}
    for s, table in systems.items():
        for d in DIRECTIONS:
            if any(len(table[d][k]) != n_queries[d] for k in ks):
                raise ValueError(f"{s} has hits for another number of {d} queries than old->old ({n_queries[d]})")

    # One column per (system, K); resampled together so that every statistic is paired.
    keys = [(s, k) for s in systems for k in ks]
    col = {key: j for j, key in enumerate(keys)}
    points, samples = {}, {}
    for d in DIRECTIONS:
        columns = np.stack([systems[s][d][k] for s, k in keys], axis=1)
        points[d], samples[d] = columns.mean(0), resampled_means(columns, n_resamples, seed)

    def recall(d: str, s: str, k: int) -> Estimate:
        j = col[(s, k)]
        return estimate(100 * samples[d][:, j], 100 * points[d][j])

    def difference(d: str, a: str, b: str, k: int) -> Estimate:
        i, j = col[(a, k)], col[(b, k)]
        return estimate(100 * (samples[d][:, i] - samples[d][:, j]), 100 * (points[d][i] - points[d][j]))

    def gain(d: str, s: str, k: int) -> Estimate:
        c, o, n = col[(s, k)], col[("old", k)], col[("new", k)]
        return estimate(update_gain(*(samples[d][:, j] for j in (c, o, n))), float(update_gain(*(points[d][j] for j in (c, o, n)))))

    matrix = UpgradeMatrix(
        n_queries=n_queries, ks=ks,
        old_old={d: {k: recall(d, "old", k) for k in ks} for d in DIRECTIONS},
        new_new={d: {k: recall(d, "new", k) for k in ks} for d in DIRECTIONS},
        new_vs_old={d: {k: difference(d, "new", "old", k) for k in ks} for d in DIRECTIONS},
        n_resamples=n_resamples,
    )
    for s in systems:
        if not s.startswith("method:"):
            continue
        name = s.removeprefix("method:")
        matrix.methods[name] = {
            d: {k: Cell(recall=recall(d, s, k), vs_old=difference(d, s, "old", k), gain=gain(d, s, k)) for k in ks}
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
            for cells in matrix.methods.values():
                c = cells[d][k]
                mark = "PASS" if c.passes_confidently else ("pass" if c.passes else "FAIL")
                row.append(f"{c.recall} ({c.vs_old.value:+.1f} {mark}; {c.gain.value:.0f}%)")
            lines.append(" | ".join(row))
    lines.append(f"queries: t2i={matrix.n_queries['t2i']} i2t={matrix.n_queries['i2t']}; 95% bootstrap intervals, "
                 f"{matrix.n_resamples} paired resamples of queries")
    return "\n".join(lines)
