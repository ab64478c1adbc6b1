"""Measuring retrieval quality during a migration, offline: R@K of the merged search against the fraction
of the gallery backfilled, under either merge rule that `xbt.gallery.migrating.MigratingRetriever` serves by
(the rules themselves, and their calibration, are `xbt.ranking.merge`), in several backfill orders, with
paired intervals, their JSON, tables and plots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xbt.errors import InputError, SpaceMismatchError
from xbt.metrics import (
    DEFAULT_KS,
    Estimate,
    bootstrap_indices,
    difference_estimate,
    estimate,
    image_to_text_positives,
    recall_estimate,
    text_to_image_positives,
)
from xbt.ranking.merge import ScoreCalibration, top_k_indices, check_merge, merge_rankings

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))
#: The share of the upgrade's R@1 gain whose fraction backfilled is reported (`fraction_for_gain`).
GAIN_SHARE = 0.8


# --------------------------------------------------------------------------------------------------
# the curve
# --------------------------------------------------------------------------------------------------
@dataclass
class BackfillCurve:
    """R@K of the merged search against the fraction of the gallery backfilled, in one backfill order.

    `area[k]`: the area under the R@K curve over the fraction backfilled (the mean R@K a migration serves
    while it runs, in percent); `gain_area[k]`: the same of the normalised gain (R@K(f) - R@K(0)) /
    (R@K(1) - R@K(0)) (1: all at once, 1/2: a straight line); `gain_fraction`: the smallest fraction at
    which R@1 reaches R@1(0) + `gain_share` x (R@1(1) - R@1(0)), interpolated between measured fractions.
    Each with its 95% bootstrap interval over the queries."""

    direction: str
    fractions: list[float]
    recall: dict[int, list[Estimate]]
    n_queries: int
    order: str = ""
    area: dict[int, Estimate] = field(default_factory=dict)
    gain_area: dict[int, Estimate] = field(default_factory=dict)
    gain_fraction: Estimate | None = None
    gain_share: float = GAIN_SHARE

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "direction": self.direction, "fractions": self.fractions, "n_queries": self.n_queries,
            "recall": {str(k): [e.to_dict() for e in row] for k, row in self.recall.items()}}
        if self.order:
            out["order"] = self.order
        if self.area:
            out["area"] = {str(k): e.to_dict() for k, e in self.area.items()}
            out["gain_area"] = {str(k): e.to_dict() for k, e in self.gain_area.items()}
        if self.gain_fraction is not None:
            out[f"fraction_for_{round(100 * self.gain_share)}pct_gain"] = self.gain_fraction.to_dict()
        return out


def fraction_for_gain(fractions: Sequence[float], values: Sequence[float], share: float = GAIN_SHARE) -> float:
    """The smallest fraction backfilled at which `values` (R@K per fraction, the first at fraction 0, the last
    at 1) reach values[0] + share x (values[-1] - values[0]), linearly interpolated between the two measured
    fractions around the crossing. NaN when there is no gain (values[-1] <= values[0])."""
    f, v = np.asarray(fractions, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(f) != len(v) or len(f) < 2:
        raise InputError("fraction_for_gain needs one value per fraction, at least two")
    if v[-1] <= v[0]:
        return float("nan")
    target = v[0] + share * (v[-1] - v[0])
    for j in range(1, len(v)):
        if v[j] >= target - 1e-12:
            step = v[j] - v[j - 1]
            if step <= 0:
                return float(f[j])
            return float(f[j - 1] + (f[j] - f[j - 1]) * (target - v[j - 1]) / step)
    return float(f[-1])


def curve_area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Area under values over fractions (trapezoid); over [0, 1] this is the mean of the curve."""
    return float(np.trapezoid(np.asarray(values, dtype=np.float64), np.asarray(fractions, dtype=np.float64)))


def _normalised_gain_area(fractions: np.ndarray, values: np.ndarray) -> float:
    gain = values[-1] - values[0]
    return curve_area(fractions, (values - values[0]) / gain) if gain > 0 else float("nan")


def _check_order(order: Any, n: int) -> np.ndarray:
    order = np.asarray(order)
    if order.shape != (n,) or sorted(order.tolist()) != list(range(n)):
        raise InputError("order must be a permutation of the gallery rows")
    return order


def backfill_hits(
    old_gallery: np.ndarray,
    new_gallery: np.ndarray,
    compat_queries: np.ndarray,
    new_queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    order: Any = None,
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    block: int = 512,
    merge: str = "slot",
    calibration: ScoreCalibration | None = None,
) -> dict[float, dict[int, np.ndarray]]:
    """Per-query hits (0/1) of the merged search (`merge_rankings`: rule `merge`, "slot" or "score" with its
    `calibration`) at each fraction backfilled: {fraction: {k: (n_queries,)}}. `order`: a permutation of the
    gallery rows, a list of permutations (hits averaged over them, e.g. several random orders), or None (one
    random order drawn with `seed`). See `backfill_curve`."""
    check_merge(merge, calibration)
    old_gallery, new_gallery = np.asarray(old_gallery, np.float32), np.asarray(new_gallery, np.float32)
    compat_queries, new_queries = np.asarray(compat_queries, np.float32), np.asarray(new_queries, np.float32)
    n, n_q = len(old_gallery), len(compat_queries)
    if len(new_gallery) != n or len(new_queries) != n_q or len(positives) != n_q:
        raise InputError("old/new galleries must have the same rows, and compat/new queries and positives the same count")
    if compat_queries.shape[1] != old_gallery.shape[1] or new_queries.shape[1] != new_gallery.shape[1]:
        raise SpaceMismatchError("compat queries must match the old gallery's dimension, new queries the new gallery's")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise InputError("fractions must lie in [0, 1]")
    if order is None:
        orders = [np.random.default_rng(seed).permutation(n)]
    elif np.ndim(order) == 2 or (isinstance(order, (list, tuple)) and order and np.ndim(order[0]) == 1):
        orders = [_check_order(o, n) for o in order]
    else:
        orders = [_check_order(order, n)]
    k_max = max(ks)
    pos_sets = [{int(i) for i in p} for p in positives]
    hits = {f: {k: np.zeros(n_q) for k in ks} for f in fractions}
    for this in orders:
        rank_in_order = np.empty(n, dtype=np.int64)
        rank_in_order[this] = np.arange(n)
        for start in range(0, n_q, block):
            stop = min(n_q, start + block)
            old_scores = compat_queries[start:stop] @ old_gallery.T
            old_top = top_k_indices(old_scores, k_max)
            new_scores = new_queries[start:stop] @ new_gallery.T
            for f in fractions:
                done = rank_in_order < round(f * n)
                masked = np.where(done[None, :], new_scores, -np.inf)
                new_top = top_k_indices(masked, k_max) if done.any() else np.empty((stop - start, 0), np.int64)
                top = old_top
                if merge == "score":  # the top items NOT backfilled (the served search deepens until it has them)
                    top = (top_k_indices(np.where(done[None, :], -np.inf, old_scores), k_max) if not done.all()
                           else np.empty((stop - start, 0), np.int64))
                for row in range(stop - start):
                    fill = [(int(i), float(new_scores[row, i])) for i in new_top[row] if done[i]]
                    ranked = [(int(i), float(old_scores[row, i])) for i in top[row] if merge == "slot" or not done[i]]
                    merged = [i for i, _ in merge_rankings(ranked, _Mask(done), fill, calibration)]
                    q = start + row
                    for k in ks:
                        hits[f][k][q] += float(any(i in pos_sets[q] for i in merged[:k])) / len(orders)
    return hits


def curve_from_hits(
    hits: Mapping[float, Mapping[int, np.ndarray]],
    direction: str = "",
    order: str = "",
    seed: int = 0,
    n_resamples: int = 1000,
    gain_share: float = GAIN_SHARE,
) -> BackfillCurve:
    """The curve, its areas and its gain fraction from per-query hits (`backfill_hits`; hits of several
    folds may be pooled by concatenating each array). Intervals: one shared set of query resamples."""
    fractions = sorted(float(f) for f in hits)
    if not fractions:
        raise InputError("no fractions in the hits")
    ks = sorted(int(k) for k in hits[fractions[0]])
    n_q = len(hits[fractions[0]][ks[0]])
    resamples = bootstrap_indices(n_q, n_resamples, seed)
    recall = {k: [recall_estimate(np.asarray(hits[f][k]), resamples) for f in fractions] for k in ks}
    fr = np.asarray(fractions)
    area: dict[int, Estimate] = {}
    gain_area: dict[int, Estimate] = {}
    gain_fraction = None
    if len(fr) < 2 or fr[0] != 0.0 or fr[-1] != 1.0:  # areas and gain fractions need the whole migration
        return BackfillCurve(direction, fractions, recall, n_q, order, area, gain_area, None, gain_share)
    for k in ks:
        table = np.stack([np.asarray(hits[f][k], dtype=np.float64) for f in fractions], axis=1)  # (n_q, n_f)
        point = 100 * table.mean(axis=0)
        samples = 100 * np.stack([table[r].mean(axis=0) for r in resamples]) if n_resamples else np.zeros((0, len(fr)))
        area[k] = estimate(np.array([curve_area(fr, s) for s in samples]), curve_area(fr, point))
        gain_area[k] = estimate(np.array([_normalised_gain_area(fr, s) for s in samples]), _normalised_gain_area(fr, point))
        if k == 1 or (1 not in ks and k == ks[0]):
            gain_fraction = estimate(np.array([fraction_for_gain(fr, s, gain_share) for s in samples]),
                                     fraction_for_gain(fr, point, gain_share))
    return BackfillCurve(direction, fractions, recall, n_q, order, area, gain_area, gain_fraction, gain_share)


def backfill_curve(
    old_gallery: np.ndarray,
    new_gallery: np.ndarray,
    compat_queries: np.ndarray,
    new_queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    order: Any = None,
    ks: Sequence[int] = DEFAULT_KS,
    direction: str = "",
    seed: int = 0,
    n_resamples: int = 1000,
    block: int = 512,
    order_name: str = "",
    merge: str = "slot",
    calibration: ScoreCalibration | None = None,
) -> BackfillCurve:
    """R@K of the merged search (rule `merge`: `merge_rankings`) when a fraction of the gallery has been
    backfilled.

    Row i of old_gallery (old model) and new_gallery (new model) is the same item; compat_queries are the
    compatible model's queries (old space), new_queries the new model's; `positives[q]` lists the gallery
    rows that answer query q. `order` is the backfill order (a permutation of the rows, or a list of them
    whose hits are averaged; random with `seed` by default). Fraction 0 reproduces compat->old retrieval,
    fraction 1 new->new."""
    hits = backfill_hits(old_gallery, new_gallery, compat_queries, new_queries, positives, fractions, order, ks, seed, block,
                         merge, calibration)
    return curve_from_hits(hits, direction, order_name, seed, n_resamples)


class _Mask:
    """`in` over a boolean row mask (for slot_merge on integer rows)."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def __contains__(self, i: object) -> bool:
        return isinstance(i, (int, np.integer)) and bool(self.mask[int(i)])


def direction_sets(old: Any, compat: Any, new: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[list[int]]]]:
    """(old gallery, new gallery, compatible queries, new queries, positives) per direction, from pair
    embeddings: `old` and `new` are PairEmbeddings of the old and new models on the same pairs, `compat` the
    compatible model's QueryVectors (old space; e.g. `xbt.compat.queries.compatible_queries(model, pairs, new,
    old)`). Spaces are checked, not just shapes: the queries must be stamped with the old space, and `new`
    must be another space than `old`. T2I backfills the image gallery, I2T the caption gallery."""
    if list(old.caption_image_index) != list(new.caption_image_index):
        raise InputError("old and new embeddings must come from the same pairs in the same order")
    old.space.check(compat.space, "the compatible model's queries")
    if new.space == old.space:
        raise InputError(f"the 'new' embeddings are of the old space {old.space.id}: pass the new model's own embeddings")
    index = list(old.caption_image_index)
    return {
        "t2i": (old.images, new.images, compat.texts, new.texts, text_to_image_positives(index)),
        "i2t": (old.texts, new.texts, compat.images, new.images, image_to_text_positives(index, len(old.images))),
    }


def backfill_curves(old: Any, compat: Any, new: Any, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    seed: int = 0, n_resamples: int = 1000, orders: Mapping[str, Any] | None = None,
                    order_name: str = "", merge: str = "slot",
                    calibrations: Mapping[str, ScoreCalibration] | None = None) -> dict[str, BackfillCurve]:
    """Both directions from pair embeddings (`direction_sets`). `orders`: the backfill order per direction
    ({"t2i": rows of the image gallery, "i2t": rows of the caption gallery}); random with `seed` if absent.
    `merge` "score": `calibrations` per direction (`fit_score_calibration_pairs` of the image / text gallery)."""
    orders = orders or {}
    sets = direction_sets(old, compat, new)
    per = _direction_calibrations(merge, calibrations, sets)
    return {d: backfill_curve(*s, fractions, order=orders.get(d), direction=d, seed=seed, n_resamples=n_resamples,
                              order_name=order_name, merge=merge, calibration=per[d])
            for d, s in sets.items()}


def _direction_calibrations(merge: str, calibrations: Mapping[str, ScoreCalibration] | None,
                            sets: Mapping[str, Any]) -> dict[str, ScoreCalibration | None]:
    if merge == "score":
        missing = [d for d in sets if not calibrations or d not in calibrations]
        if missing or calibrations is None:
            raise InputError(f"merge 'score' needs a calibration per direction; none for {', '.join(missing)}")
        return {d: calibrations[d] for d in sets}
    check_merge(merge, None if not calibrations else next(iter(calibrations.values())))
    return {d: None for d in sets}


# --------------------------------------------------------------------------------------------------
# comparing backfill orders (and pooling them over folds)
# --------------------------------------------------------------------------------------------------
OrderHits = dict[str, dict[str, dict[float, dict[int, np.ndarray]]]]  # order -> direction -> fraction -> k -> hits


def order_hits(old: Any, compat: Any, new: Any, orders: Mapping[str, Mapping[str, Any]],
               fractions: Sequence[float] = DEFAULT_FRACTIONS, ks: Sequence[int] = DEFAULT_KS, seed: int = 0,
               merge: str = "slot", calibrations: Mapping[str, ScoreCalibration] | None = None) -> OrderHits:
    """Per-query hits of every named order in both directions: `orders[name][direction]` is a permutation of
    that direction's gallery rows or a list of them (hits averaged: several random orders). `merge` and
    `calibrations` (per direction) as in `backfill_curves`."""
    sets = direction_sets(old, compat, new)
    per = _direction_calibrations(merge, calibrations, sets)
    out: OrderHits = {}
    for name, per_direction in orders.items():
        missing = [d for d in sets if d not in per_direction]
        if missing:
            raise InputError(f"order {name!r} gives no order for direction(s) {', '.join(missing)}")
        out[name] = {d: backfill_hits(*sets[d], fractions, per_direction[d], ks, seed, merge=merge, calibration=per[d])
                     for d in sets}
    return out


def pool_order_hits(parts: Sequence[OrderHits]) -> OrderHits:
    """Hits of several folds in one: each query array concatenated (the folds' queries are disjoint)."""
    if not parts:
        raise InputError("nothing to pool")
    first = parts[0]
    for p in parts[1:]:
        if {o: {d: sorted(h) for d, h in v.items()} for o, v in p.items()} != {o: {d: sorted(h) for d, h in v.items()} for o, v in first.items()}:
            raise InputError("the folds' hits differ in orders, directions or fractions: they cannot be pooled")
    return {o: {d: {f: {k: np.concatenate([p[o][d][f][k] for p in parts]) for k in first[o][d][f]}
                    for f in first[o][d]} for d in first[o]} for o in first}


def area_difference(hits_a: Mapping[float, Mapping[int, np.ndarray]], hits_b: Mapping[float, Mapping[int, np.ndarray]],
                    k: int = 1, seed: int = 0, n_resamples: int = 1000) -> Estimate:
    """The paired difference of area R@K (the mean R@K served over the migration, in points) of two curves'
    per-query hits on the same queries (e.g. the score and the slot rule, one order): each query's own area
    under its hits over the fractions, bootstrapped over the queries."""
    fractions = sorted(float(f) for f in hits_a)
    if fractions != sorted(float(f) for f in hits_b) or len(fractions) < 2 or fractions[0] != 0.0 or fractions[-1] != 1.0:
        raise InputError("the two curves must be measured at the same fractions, from 0 to 1")
    fr = np.asarray(fractions)
    per_query = [np.trapezoid(np.stack([np.asarray(h[f][k], dtype=np.float64) for f in fractions], axis=1), fr, axis=1)
                 for h in (hits_a, hits_b)]
    if per_query[0].shape != per_query[1].shape:
        raise InputError("the two curves' hits are of different query sets")
    return difference_estimate(per_query[0], per_query[1], bootstrap_indices(len(per_query[0]), n_resamples, seed))


def order_curves(hits: OrderHits, seed: int = 0, n_resamples: int = 1000) -> dict[str, dict[str, BackfillCurve]]:
    """order -> direction -> curve (with areas and the fraction for 80% of the gain)."""
    return {o: {d: curve_from_hits(h, d, o, seed, n_resamples) for d, h in per.items()} for o, per in hits.items()}


def orders_to_dict(curves: Mapping[str, Mapping[str, BackfillCurve]]) -> dict[str, Any]:
    """{"orders": {order: {direction: curve.to_dict()}}, "summary": {order: {direction: the gain fraction,
    areas}}}, the form of docs/results/backfill-order-testbed.json."""
    summary: dict[str, Any] = {}
    for o, per in curves.items():
        for d, c in per.items():
            key = f"fraction_for_{round(100 * c.gain_share)}pct_gain"
            summary.setdefault(o, {})[d] = {
                key: c.gain_fraction.to_dict() if c.gain_fraction else None,
                "area_r1": c.area[1].to_dict() if 1 in c.area else None,
                "gain_area_r1": c.gain_area[1].to_dict() if 1 in c.gain_area else None,
                "r1_at_0": c.recall[1][0].value if 1 in c.recall else None,
                "r1_at_1": c.recall[1][-1].value if 1 in c.recall else None,
                "n_queries": c.n_queries,
            }
    return {"summary": summary, "orders": {o: {d: c.to_dict() for d, c in per.items()} for o, per in curves.items()}}


def format_orders(curves: Mapping[str, Mapping[str, BackfillCurve]]) -> str:
    """A plain-text table: per order and direction, R@1 from 0 to 1 backfilled, the fraction for 80% of the
    gain, and the areas."""
    lines = [f"{'order':<10} {'dir':<4} {'R@1 0%':>7} {'R@1 100%':>8} {'80% gain at':<22} {'area R@1':<22} {'gain area R@1':<22}"]
    for o, per in curves.items():
        for d, c in per.items():
            frac = "-" if c.gain_fraction is None else f"{c.gain_fraction.value:.2f} [{c.gain_fraction.low:.2f}, {c.gain_fraction.high:.2f}]"
            ga = c.gain_area.get(1)
            ga_text = "-" if ga is None else f"{ga.value:.2f} [{ga.low:.2f}, {ga.high:.2f}]"
            lines.append(f"{o:<10} {d:<4} {c.recall[1][0].value:7.1f} {c.recall[1][-1].value:8.1f} {frac:<22} "
                         f"{c.area.get(1, '-')!s:<22} {ga_text:<22}")
    return "\n".join(lines)


def plot_orders(curves: Mapping[str, Mapping[str, BackfillCurve]], path: Any, ks: Sequence[int] = DEFAULT_KS,
                title: str = "") -> None:
    """R@K against the fraction backfilled, one panel per direction and K, one line per order with its 95%
    band; the 80%-of-gain level of R@1 dashed. Written with matplotlib (Agg) to `path` (.png / .svg / .pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = list(next(iter(curves.values())))
    fig, axes = plt.subplots(len(directions), len(ks), figsize=(4.2 * len(ks), 3.4 * len(directions)), squeeze=False)
    for r, d in enumerate(directions):
        for c, k in enumerate(ks):
            ax = axes[r][c]
            for o, per in curves.items():
                curve = per[d]
                x = np.asarray(curve.fractions)
                y = np.array([e.value for e in curve.recall[k]])
                lo = np.array([e.low for e in curve.recall[k]])
                hi = np.array([e.high for e in curve.recall[k]])
                label = o
                if k == 1 and curve.gain_fraction is not None and np.isfinite(curve.gain_fraction.value):
                    label += f" (80% at {curve.gain_fraction.value:.2f})"
                (line,) = ax.plot(x, y, label=label, lw=1.8)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12, lw=0)
            if k == 1:
                first = next(iter(curves.values()))[d]
                r0, r1 = first.recall[1][0].value, first.recall[1][-1].value
                ax.axhline(r0 + first.gain_share * (r1 - r0), color="grey", ls="--", lw=0.8)
            ax.set_title(f"{d}  R@{k}  ({next(iter(curves.values()))[d].n_queries} queries)", fontsize=10)
            ax.set_xlabel("fraction of the gallery backfilled")
            ax.set_ylabel(f"R@{k} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_curves(curves: dict[str, BackfillCurve], k: int = 1) -> str:
    """A plain-text table: fraction backfilled -> R@k per direction."""
    dirs = list(curves)
    lines = ["backfilled  " + "  ".join(f"{d} R@{k:<16}" for d in dirs)]
    for j, f in enumerate(next(iter(curves.values())).fractions):
        lines.append(f"{100 * f:9.0f}%  " + "  ".join(f"{curves[d].recall[k][j]!s:<22}" for d in dirs))
    return "\n".join(lines)
