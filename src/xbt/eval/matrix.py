"""The compatibility matrix: old->old, new->new and each method's new->old, both directions, R@K, with
paired bootstrap intervals, the BCT criterion and the update gain per cell."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xbt.embed import DIRECTIONS, ExtraEmbeddings, GalleryBias, PairEmbeddings, QueryVectors
from xbt.errors import SpaceMismatchError
from xbt.metrics import (
    DEFAULT_KS,
    Estimate,
    estimate,
    hits_at_k,
    resampled_means,
    retrieval_ranks_with_extras,
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


def check_extras(gallery: PairEmbeddings, extras: ExtraEmbeddings | None, which: str) -> None:
    """Gallery extras must live in the gallery's own space (not just have its dimension)."""
    if extras is None:
        return
    gallery.space.check(extras.space, f"the gallery extras ({extras.source or 'extra items'}) of the {which} gallery")
    dim = gallery.images.shape[1]
    for name, rows in (("images", extras.images), ("texts", extras.texts)):
        if rows.ndim != 2 or (len(rows) and rows.shape[1] != dim):
            raise SpaceMismatchError(f"the gallery extras' {name} have shape {rows.shape}; the {which} gallery's vectors"
                                     f" have dimension {dim}")


def system_hits(
    old: PairEmbeddings,
    new: PairEmbeddings,
    methods: Mapping[str, QueryVectors],
    ks: Sequence[int] = DEFAULT_KS,
    old_extras: ExtraEmbeddings | None = None,
    new_extras: ExtraEmbeddings | None = None,
) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """Per-query hits of every system on the old gallery: {"old", "new", "method:NAME"} -> direction -> K ->
    (n_queries,) 0/1. Each method's queries are checked against the old gallery's space and shapes. With
    extras, every gallery holds them all: old->old and every method search the old galleries plus
    `old_extras`, the new->new ceiling the new galleries plus `new_extras` (the same items, embedded by the
    new model)."""
    if (old_extras is None) != (new_extras is None):
        raise ValueError("gallery extras must be given for both the old and the new galleries (every system searches them)")
    sizes = [(len(old_extras.images), len(old_extras.texts))] if old_extras is not None else [(0, 0)]
    return system_hits_at_sizes(old, new, methods, ks, old_extras, new_extras, sizes)[0]


def system_hits_at_sizes(
    old: PairEmbeddings,
    new: PairEmbeddings,
    methods: Mapping[str, QueryVectors],
    ks: Sequence[int],
    old_extras: ExtraEmbeddings | None,
    new_extras: ExtraEmbeddings | None,
    sizes: Sequence[tuple[int, int]],
) -> list[dict[str, dict[str, dict[int, np.ndarray]]]]:
    """`system_hits` at several gallery sizes: for each (n_images, n_texts) in `sizes`, every system's
    galleries hold the first n_images extra images and the first n_texts extra texts (the same items for
    every system: old->old, the ceiling, every method). One pass over the extras serves every size."""
    index = old.caption_image_index
    if list(new.caption_image_index) != list(index):
        raise ValueError("old and new embeddings must come from the same pair set")
    if (old_extras is None) != (new_extras is None):
        raise ValueError("gallery extras must be given for both the old and the new galleries (every system searches them)")
    check_extras(old, old_extras, "old")
    check_extras(new, new_extras, "new")
    if old_extras is not None and new_extras is not None and old_extras.sizes != new_extras.sizes:
        raise ValueError(f"the old model embedded {old_extras.sizes} extras and the new model {new_extras.sizes}:"
                         " every system must search the same gallery")
    ks = tuple(int(k) for k in ks)
    sizes = [(int(a), int(b)) for a, b in sizes]

    def hits(image_q, text_q, image_g, text_g, extras: ExtraEmbeddings | None,
             bias: GalleryBias | None = None) -> list[dict[str, dict[int, np.ndarray]]]:
        d = image_g.shape[1]
        extra_images = extras.images if extras is not None else np.zeros((0, d), np.float32)
        extra_texts = extras.texts if extras is not None else np.zeros((0, d), np.float32)
        if bias is not None:
            text_q, image_g = with_bias(text_q, image_g, bias.images)
            image_q, text_g = with_bias(image_q, text_g, bias.texts)
            extra_images = _extras_with_bias(extra_images, bias.extra_images, "images")
            extra_texts = _extras_with_bias(extra_texts, bias.extra_texts, "texts")
        ranks = retrieval_ranks_with_extras(image_q, text_q, image_g, text_g, index, extra_images, extra_texts, sizes)
        return [{d: hits_at_k(r[d], ks) for d in DIRECTIONS} for r in ranks]

    for name, q in methods.items():
        old.space.check(q.space, f"the queries of method {name!r}")
        if q.images.shape != (len(old.images), old.images.shape[1]) or q.texts.shape != (len(old.texts), old.texts.shape[1]):
            raise ValueError(
                f"method {name!r} returned images {q.images.shape} and texts {q.texts.shape}; the old gallery"
                f" has images {old.images.shape} and texts {old.texts.shape}"
            )
    per_system = {
        "old": hits(old.images, old.texts, old.images, old.texts, old_extras),
        "new": hits(new.images, new.texts, new.images, new.texts, new_extras),
    }
    for name, q in methods.items():
        per_system["method:" + name] = hits(q.images, q.texts, old.images, old.texts, old_extras, q.gallery_bias)
    return [{s: table[i] for s, table in per_system.items()} for i in range(len(sizes))]


def _extras_with_bias(extras: np.ndarray, bias: np.ndarray | None, what: str) -> np.ndarray:
    """Extra gallery rows with their calibration bias as the extra dimension ([g, b], as `with_bias`)."""
    if len(extras) and bias is None:
        raise ValueError(f"a calibrated method searches gallery extras without their bias ({what}): calibrate with the extras")
    b = np.zeros(0, np.float32) if bias is None else np.asarray(bias, dtype=np.float32).reshape(-1)
    if b.shape[0] != len(extras):
        raise ValueError(f"a gallery bias of {b.shape[0]} values for {len(extras)} extra {what}")
    return np.concatenate([np.asarray(extras, dtype=np.float32), b[:, None]], axis=1)


def evaluate_upgrade(
    old: PairEmbeddings,
    new: PairEmbeddings,
    methods: Mapping[str, QueryVectors],
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
    old_extras: ExtraEmbeddings | None = None,
    new_extras: ExtraEmbeddings | None = None,
) -> UpgradeMatrix:
    """Every method is compared with old->old on the same query resamples (paired bootstrap); with gallery
    extras, every system's galleries hold them (`system_hits`)."""
    return matrix_from_hits(system_hits(old, new, methods, ks, old_extras, new_extras), ks, n_resamples, seed)


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
