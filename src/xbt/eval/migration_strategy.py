"""Which migration strategy for a gallery of N items (issue 26, part 4): query-side (keep the old gallery, map new
queries into the old space, backfill into a second gallery and merge meanwhile) or gallery-side in place (map
the stored vectors into the new space once, serve native queries, replace rows as the backfill reaches them).

`migration_costs` counts, for a gallery size and measured rates (bench/results/transform.json: vectors per second
of the transform through the store, items per second the new model encodes), what each strategy writes and how
long its steps take; `recommend_strategy` weighs the measured quality (R@1 at 0% backfilled and the area of the
backfill curve, with the paired interval of their difference) against those costs. Quality decides only when
its interval excludes zero; otherwise the simpler operation wins: one space, no merge rule, no cut-over, and the
gallery ends in the new space (the next upgrade needs no chain), for N vector writes up front.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from xbt.errors import InputError


@dataclass(frozen=True)
class StrategyCost:
    """What a strategy costs for a gallery of `items` items (seconds on the machine the rates were measured on)."""

    strategy: str
    items: int
    vectors_written_before_serving: int  # the transform (in place), none (query-side)
    vectors_written_by_a_full_backfill: int
    peak_vectors_stored: int  # both galleries until the cut-over (query-side), one (in place)
    seconds_before_serving: float | None  # None: no measured rate to count with
    seconds_to_encode_everything: float | None  # the same for both: every item through the new model
    merge_rule: bool
    second_gallery: bool
    ends_in_new_space: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def migration_costs(items: int, transform_per_s: float | None, encode_per_s: float | None) -> dict[str, StrategyCost]:
    """The two strategies' costs for `items` gallery items: `transform_per_s` vectors per second the transform writes
    (through the store, reads and index included), `encode_per_s` items per second the new model encodes (a rate
    not measured: None, and the seconds it would give are None)."""
    if items < 0 or any(r is not None and r <= 0 for r in (transform_per_s, encode_per_s)):
        raise InputError("migration_costs needs items >= 0 and positive rates (or None)")
    encode = items / encode_per_s if encode_per_s else None
    transform = items / transform_per_s if transform_per_s else None
    return {
        "query-side": StrategyCost("query-side", items, 0, items, 2 * items, 0.0, encode, True, True, False),
        "in-place": StrategyCost("in-place", items, items, items, items, transform, encode, False, False, True),
    }


def _excludes_zero(e: Mapping[str, float] | None) -> int:
    """+1 / -1 when a paired interval lies above / below zero, 0 when it holds zero or is missing."""
    if not e or e.get("low") is None or e.get("high") is None:
        return 0
    if e["low"] > 0:
        return 1
    if e["high"] < 0:
        return -1
    return 0


def recommend_strategy(area_in_place_minus_query_side: Mapping[str, Mapping[str, float]],
                       r1_at_0: Mapping[str, Mapping[str, float]], costs: Mapping[str, StrategyCost],
                       start_in_place_minus_query_side: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
    """The pick and its reasons. `area_in_place_minus_query_side[direction]`: the paired difference of area R@1 (points,
    with low / high) of the two strategies' chosen orders; `r1_at_0[strategy][direction]`: R@1 at 0% backfilled;
    `costs`: `migration_costs`; `start_in_place_minus_query_side[direction]`: the paired difference of R@1 at 0%, when
    the two start from different maps. Area decides where its interval excludes zero; else a start that differs
    measurably (what users get at once, and for as long as the backfill has not reached them); else the simpler
    operation, in place."""
    signs = {d: _excludes_zero(e) for d, e in area_in_place_minus_query_side.items()}
    starts = {d: _excludes_zero(e) for d, e in (start_in_place_minus_query_side or {}).items()}
    reasons = [f"area R@1 in place - query-side, {d}: {e.get('value', float('nan')):+.1f}"
               f" [{e.get('low', float('nan')):+.1f}, {e.get('high', float('nan')):+.1f}]"
               for d, e in area_in_place_minus_query_side.items()]
    start = {s: r1_at_0.get(s, {}) for s in ("in-place", "query-side")}
    reasons += [f"R@1 at 0% backfilled, {d}: in place {start['in-place'].get(d, float('nan')):.1f}, query-side"
                f" {start['query-side'].get(d, float('nan')):.1f}" for d in area_in_place_minus_query_side]
    c = costs["in-place"]
    s = c.seconds_before_serving
    took = "" if s is None else f" ({s / 3600:.2f} h here)" if s >= 360 else f" ({s:.2f} s here)"
    reasons.append(f"in place writes {c.vectors_written_before_serving:,} vectors before serving"
                   f"{took} and keeps one gallery; query-side keeps two"
                   f" ({costs['query-side'].peak_vectors_stored:,} vectors) until the cut-over and merges meanwhile")
    if any(s < 0 for s in signs.values()) and not any(s > 0 for s in signs.values()):
        pick, why = "query-side", "it serves measurably more R@1 over the migration"
    elif any(s > 0 for s in signs.values()) and not any(s < 0 for s in signs.values()):
        pick, why = "in-place", "it serves measurably more R@1 over the migration, in one space"
    elif any(s < 0 for s in starts.values()) and not any(s > 0 for s in starts.values()):
        pick, why = "query-side", ("over the migration the two serve alike, but it starts measurably higher (R@1 at 0%"
                                   " backfilled), which users get at once and keep wherever the backfill has not reached")
    elif any(s > 0 for s in starts.values()) and not any(s < 0 for s in starts.values()):
        pick, why = "in-place", "over the migration the two serve alike, and it starts measurably higher, in one space"
    else:
        pick, why = "in-place", ("the quality difference is inside its interval (or mixed across directions), and in"
                                 " place is the simpler operation: one space, no merge rule, no cut-over, no chain at"
                                 " the next upgrade")
    return {"pick": pick, "why": why, "reasons": reasons, "costs": {k: v.to_dict() for k, v in costs.items()}}


# ----- both strategies measured on one evaluation run -----------------------------------------------------
def compare_on_run(run: Any, query_side: str, transform_from: str = "procrustes-gallery", *, n_orders: int = 5,
                   seed: int = 0, n_resamples: int = 1000, transform_per_s: float | None = None,
                   encode_per_s: float | None = None) -> dict[str, Any] | None:
    """Query-side and in place on an evaluation run's gallery and queries (`xbt.eval.runner.EvaluationRun`):
    the query-side strategy serves `query_side`'s queries on the old gallery and merges with the new gallery as
    it fills (the rank-slot rule, the one a migration without held-out pairs serves); in place maps the old
    gallery once by the transpose of `transform_from`'s orthogonal per-tower maps and serves native new-model
    queries, each backfilled row getting its exact vector. Both under the same `n_orders` random orders; per
    direction R@1 at 0% backfilled, the area R@1 over the migration and its paired difference; the pick
    (`recommend_strategy`) with the costs for the evaluated gallery's size (seconds where rates are given).
    None when `transform_from` is not in the run or its maps cannot be transposed."""
    from xbt.errors import XbtError
    from xbt.eval.backfill_curve import area_difference, backfill_hits, curve_from_hits
    from xbt.gallery.transform import transposed_query_map
    from xbt.metrics import bootstrap_indices, difference_estimate, image_to_text_positives, text_to_image_positives
    from xbt.ranking.inplace_curve import inplace_hits
    from xbt.ranking.nnn import with_bias

    model, queries = run.compatible.get(transform_from), run.queries.get(query_side)
    if model is None or queries is None:
        return None
    try:
        maps = {tower: transposed_query_map(model, tower) for tower in ("text", "image")}
    except XbtError:
        return None
    old, new = run.embeddings["old"], run.embeddings["new"]
    index = list(old.caption_image_index)
    bias = queries.gallery_bias
    sides = {  # direction: (old gallery, compat queries, gallery bias, new gallery, new queries, tower, positives)
        "t2i": (old.images, queries.texts, None if bias is None else bias.images, new.images, new.texts, "text",
                text_to_image_positives(index)),
        "i2t": (old.texts, queries.images, None if bias is None else bias.texts, new.texts, new.images, "image",
                image_to_text_positives(index, len(old.images))),
    }
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"query_side": query_side, "in_place_map": f"transpose of {transform_from}'s maps",
                           "orders": f"{n_orders} random", "directions": {}}
    areas: dict[str, Any] = {}
    starts: dict[str, Any] = {}
    start: dict[str, dict[str, float]] = {"query-side": {}, "in-place": {}}
    for d, (old_g, compat_q, b, new_g, new_q, tower, positives) in sides.items():
        orders = [rng.permutation(len(new_g)) for _ in range(n_orders)]
        compat_q, old_g = with_bias(compat_q, old_g, b)
        hits = {"query-side": backfill_hits(old_g, new_g, compat_q, new_q, positives, order=orders, ks=(1,)),
                "in-place": inplace_hits(maps[tower].apply(old.images if d == "t2i" else old.texts), new_g, new_q,
                                         positives, order=orders, ks=(1,))}
        curves = {s: curve_from_hits(h, d, "random", seed, n_resamples) for s, h in hits.items()}
        diff = area_difference(hits["in-place"], hits["query-side"], 1, seed, n_resamples)
        areas[d] = diff.to_dict()
        first = difference_estimate(hits["in-place"][0.0][1], hits["query-side"][0.0][1],
                                    bootstrap_indices(len(new_q), n_resamples, seed))
        starts[d] = first.to_dict()  # points, as the areas
        for s, c in curves.items():
            start[s][d] = c.recall[1][0].value
        out["directions"][d] = {
            "queries": len(new_q), "gallery": len(new_g),
            **{s: {"r1_at_0": round(c.recall[1][0].value, 1), "r1_at_100": round(c.recall[1][-1].value, 1),
                   "area_r1": c.area[1].to_dict()} for s, c in curves.items()},
            "area_r1_in_place_minus_query_side": diff.to_dict(), "r1_at_0_in_place_minus_query_side": starts[d]}
    out.update(recommend_strategy(areas, start, migration_costs(len(old.images), transform_per_s, encode_per_s), starts))
    out["rates"] = {"transform_per_s": transform_per_s, "encode_per_s": encode_per_s}
    return out
