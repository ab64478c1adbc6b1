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

from xbt.errors import InputError


@dataclass(frozen=True)
class StrategyCost:
    """What a strategy costs for a gallery of `items` items (seconds on the machine the rates were measured on)."""

    strategy: str
    items: int
    vectors_written_before_serving: int  # the transform (in place), none (query-side)
    vectors_written_by_a_full_backfill: int
    peak_vectors_stored: int  # both galleries until the cut-over (query-side), one (in place)
    seconds_before_serving: float
    seconds_to_encode_everything: float  # the same for both: every item through the new model
    merge_rule: bool
    second_gallery: bool
    ends_in_new_space: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def migration_costs(items: int, transform_per_s: float, encode_per_s: float) -> dict[str, StrategyCost]:
    """The two strategies' costs for `items` gallery items: `transform_per_s` vectors per second the transform writes
    (through the store, reads and index included), `encode_per_s` items per second the new model encodes."""
    if items < 0 or transform_per_s <= 0 or encode_per_s <= 0:
        raise InputError("migration_costs needs items >= 0 and positive rates")
    encode = items / encode_per_s
    return {
        "query-side": StrategyCost("query-side", items, 0, items, 2 * items, 0.0, encode, True, True, False),
        "in-place": StrategyCost("in-place", items, items, items, items, items / transform_per_s, encode, False, False, True),
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
                       r1_at_0: Mapping[str, Mapping[str, float]], costs: Mapping[str, StrategyCost]) -> dict[str, Any]:
    """The pick and its reasons. `area_in_place_minus_query_side[direction]`: the paired difference of area R@1 (points,
    with low / high) of the two strategies' chosen orders; `r1_at_0[strategy][direction]`: R@1 at 0% backfilled;
    `costs`: `migration_costs`."""
    signs = {d: _excludes_zero(e) for d, e in area_in_place_minus_query_side.items()}
    reasons = [f"area R@1 in place - query-side, {d}: {e.get('value', float('nan')):+.1f}"
               f" [{e.get('low', float('nan')):+.1f}, {e.get('high', float('nan')):+.1f}]"
               for d, e in area_in_place_minus_query_side.items()]
    start = {s: r1_at_0.get(s, {}) for s in ("in-place", "query-side")}
    reasons += [f"R@1 at 0% backfilled, {d}: in place {start['in-place'].get(d, float('nan')):.1f}, query-side"
                f" {start['query-side'].get(d, float('nan')):.1f}" for d in area_in_place_minus_query_side]
    c = costs["in-place"]
    reasons.append(f"in place writes {c.vectors_written_before_serving:,} vectors before serving"
                   f" ({c.seconds_before_serving / 3600:.2f} h here) and keeps one gallery; query-side keeps two"
                   f" ({costs['query-side'].peak_vectors_stored:,} vectors) until the cut-over and merges meanwhile")
    if any(s < 0 for s in signs.values()) and not any(s > 0 for s in signs.values()):
        pick, why = "query-side", "it serves measurably more R@1 over the migration"
    elif any(s > 0 for s in signs.values()) and not any(s < 0 for s in signs.values()):
        pick, why = "in-place", "it serves measurably more R@1 over the migration, in one space"
    else:
        pick, why = "in-place", ("the quality difference is inside its interval (or mixed across directions), and in"
                                 " place is the simpler operation: one space, no merge rule, no cut-over, no chain at"
                                 " the next upgrade")
    return {"pick": pick, "why": why, "reasons": reasons, "costs": {k: v.to_dict() for k, v in costs.items()}}
