"""The in-place strategy's backfill curve, offline (issue 26, part 3): R@K of native new-model queries against
a gallery whose rows are transformed old vectors (an old->new map applied once) until a backfill replaces
each by its exact new-model vector, against the fraction of the gallery backfilled.

One space, no merge rule: at fraction f the gallery is `native[i]` for the backfilled rows and
`transformed[i]` for the others, and a query's ranking is by inner product over that one gallery. Fraction 0
is the transformed gallery (for the transpose R^T of an orthogonal query map R, exactly the query-side map's
ranking: <q, R^T g> = <R q, g>), fraction 1 is new->new.

A transformed row's score may be put on the native rows' scale (`RowCalibration`: s -> a s + b for
transformed rows only). In a vector database that is deployable without a merge: the stored transformed
vector scaled by a, and one extra dimension holding b on transformed rows (0 on native rows, 1 in every
query). Both are fitted on pairs neither model trained on (`fit_row_calibration`, e.g. the val split).

The hits (`inplace_hits`: fraction -> k -> per-query hits) have the form of
`xbt.eval.backfill_curve.backfill_hits`, so `curve_from_hits`, `pool_order_hits`, `order_curves`,
`area_difference` and `plot_orders` of that module apply unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xbt.errors import InputError, SpaceMismatchError
from xbt.metrics import DEFAULT_KS
from xbt.ranking.benefit import FIT_FRACTIONS as DEFAULT_FRACTIONS
from xbt.ranking.merge import fit_score_calibration

ROW_CALIBRATION_FORMAT = "xbt.inplace-row-calibration/1"

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class RowCalibration:
    """Transformed rows' scores s -> a s + b, native rows' unchanged: the two kinds of row on one scale (the
    log-odds of a match of each kind, Platt-fitted, expressed on the native scale). `report`: what it was
    fitted on."""

    a: float = 1.0
    b: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.a) and np.isfinite(self.b)) or self.a <= 0:
            raise InputError(f"a row calibration must be increasing and finite (a > 0); got a={self.a}, b={self.b}")

    def apply(self, scores: Array) -> Array:
        return self.a * np.asarray(scores, dtype=np.float64) + self.b

    def to_dict(self) -> dict[str, Any]:
        return {"format": ROW_CALIBRATION_FORMAT, "a": self.a, "b": self.b, "report": self.report}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowCalibration:
        if data.get("format") != ROW_CALIBRATION_FORMAT:
            raise InputError(f"not a row calibration of format {ROW_CALIBRATION_FORMAT} (got {data.get('format')!r})")
        return cls(float(data["a"]), float(data["b"]), dict(data.get("report", {})))


def fit_row_calibration(transformed: Array, native: Array, queries: Array, positives: Sequence[Sequence[int]],
                        depth: int = 20) -> RowCalibration:
    """Platt scaling of the native queries' scores against the transformed rows and against the native rows of
    the same items (row i of `transformed` and `native` is one item; `positives[q]` the rows answering query
    q), then the transformed map expressed on the native scale: a = a_t / a_n, b = (b_t - b_n) / a_n. Fit it on
    pairs neither model was trained on: a model's scores on its own training pairs are inflated."""
    cal = fit_score_calibration(transformed, native, queries, queries, positives, "transformed", "native", depth=depth)
    (a_t, b_t), (a_n, b_n) = cal.old, cal.new
    return RowCalibration(a_t / a_n, (b_t - b_n) / a_n, {"items": len(native), "queries": len(queries), "depth": depth,
                                                        "platt_transformed": [a_t, b_t], "platt_native": [a_n, b_n]})


def _check(transformed: Array, native: Array, queries: Array, positives: Sequence[Sequence[int]]) -> None:
    if transformed.shape != native.shape:
        raise SpaceMismatchError(f"transformed {transformed.shape} and native {native.shape} galleries must have the same"
                                 " rows and dimension (both in the new space)")
    if queries.shape[1] != native.shape[1]:
        raise SpaceMismatchError(f"queries of dimension {queries.shape[1]} cannot search a {native.shape[1]}-d gallery")
    if len(positives) != len(queries):
        raise InputError("one list of positives per query")


def _orders(order: Any, n: int, seed: int) -> list[Array]:
    if order is None:
        return [np.random.default_rng(seed).permutation(n)]
    if isinstance(order, np.ndarray) and order.ndim == 1 or (isinstance(order, Sequence) and order
                                                            and np.isscalar(order[0])):
        order = [order]
    out = [np.asarray(o, dtype=np.int64) for o in order]
    for o in out:
        if sorted(o.tolist()) != list(range(n)):
            raise InputError("a backfill order must be a permutation of the gallery's rows")
    return out


def inplace_hits(transformed: Array, native: Array, queries: Array, positives: Sequence[Sequence[int]],
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, order: Any = None, ks: Sequence[int] = DEFAULT_KS,
                 seed: int = 0, calibration: RowCalibration | None = None) -> dict[float, dict[int, Array]]:
    """Per-query hits (1 if a positive is in the top k; averaged over several orders) at each fraction: row i
    is `native[i]` once backfilled (its place in `order` below round(f n)), `transformed[i]` before (its score
    mapped by `calibration` if given). `order`: a permutation of the rows, a list of them, or None (random). Dense:
    (queries x items) scores of both kinds in memory, for evaluation-sized galleries."""
    transformed, native = np.asarray(transformed, np.float32), np.asarray(native, np.float32)
    queries = np.asarray(queries, np.float32)
    _check(transformed, native, queries, positives)
    n, n_q = len(native), len(queries)
    orders = _orders(order, n, seed)
    s_t = queries @ transformed.T
    s_t = calibration.apply(s_t) if calibration is not None else s_t.astype(np.float64)
    s_n = (queries @ native.T).astype(np.float64)
    pos = np.zeros((n_q, n), dtype=bool)
    for q, p in enumerate(positives):
        pos[q, list(p)] = True
    hits = {float(f): {int(k): np.zeros(n_q) for k in ks} for f in fractions}
    for o in orders:
        rank = np.empty(n, dtype=np.int64)
        rank[o] = np.arange(n)
        for f in fractions:
            done = rank < round(float(f) * n)
            s = np.where(done[None, :], s_n, s_t)
            best = np.where(pos, s, -np.inf).max(axis=1)
            above = (s > best[:, None]).sum(axis=1)  # items ranked strictly above the best positive
            for k in ks:
                hits[float(f)][int(k)] += (above < k) / len(orders)
    return hits


def inplace_top1_curve(transformed: Array, native: Array, queries: Array, positives: Sequence[Sequence[int]],
                       order: Array, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       calibration: RowCalibration | None = None) -> Array:
    """R@1 in [0, 1] at each fraction backfilled in `order` (what a benefit statistic is chosen by)."""
    hits = inplace_hits(transformed, native, queries, positives, fractions, order, (1,), calibration=calibration)
    return np.asarray([hits[float(f)][1].mean() for f in fractions], dtype=np.float64)


def inplace_oracle_order(transformed: Array, native: Array, queries: Array, positives: Sequence[Sequence[int]],
                         calibration: RowCalibration | None = None) -> Array:
    """NOT deployable, a ceiling: the rows by their measured benefit, which needs the new model's vectors of the
    gallery and the evaluated queries. One space, no coupling: an item's benefit is its own queries' R@1 gain,
    +1 for each query the native gallery finds at R@1 and the transformed gallery misses, -1 the other way;
    ties (most items: no change) by how far the item's native vector raises its queries' best score over the
    transformed one, largest first."""
    transformed, native = np.asarray(transformed, np.float32), np.asarray(native, np.float32)
    queries = np.asarray(queries, np.float32)
    _check(transformed, native, queries, positives)
    s_t = queries @ transformed.T
    s_t = calibration.apply(s_t) if calibration is not None else s_t.astype(np.float64)
    s_n = (queries @ native.T).astype(np.float64)
    top_t, top_n = np.argmax(s_t, axis=1), np.argmax(s_n, axis=1)
    value, lift = np.zeros(len(native)), np.zeros(len(native))
    for q, p in enumerate(positives):
        p = list(p)
        value[p] += float(top_n[q] in p) - float(top_t[q] in p)
        lift[p] += s_n[q, p] - s_t[q, p]
    return np.lexsort((-lift, -value))


def inplace_direction_sets(old: Any, new: Any, transforms: Mapping[str, Any]) -> dict[str, tuple[Array, Array, Array, list[list[int]]]]:
    """(transformed gallery, native gallery, native queries, positives) per direction from pair embeddings of the
    same pairs by the old and new models: t2i backfills the image gallery (caption queries), i2t the caption
    gallery (image queries). `transforms[direction]`: a callable old-space rows -> new-space rows (e.g.
    `GalleryMap.apply`, or lambda x: unit(x @ R.T))."""
    from xbt.metrics import image_to_text_positives, text_to_image_positives

    if list(old.caption_image_index) != list(new.caption_image_index):
        raise InputError("old and new embeddings must come from the same pairs in the same order")
    if new.space == old.space:
        raise InputError("the 'new' embeddings are of the old space: pass the new model's own embeddings")
    index = list(old.caption_image_index)
    return {
        "t2i": (np.asarray(transforms["t2i"](old.images)), new.images, new.texts, text_to_image_positives(index)),
        "i2t": (np.asarray(transforms["i2t"](old.texts)), new.texts, new.images,
                image_to_text_positives(index, len(old.images))),
    }
