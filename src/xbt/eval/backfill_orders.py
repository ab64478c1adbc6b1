"""Backfill orders compared offline, from the models (`xbt gallery backfill-curve`): each order's curve on
evaluation pairs, with the benefit scorer and the score merge's calibration fitted on training / held-out
pairs the way a migration fits them (`xbt.gallery.fits`), never on the evaluation pairs.

    result = measure_orders(old, new, compat, eval_pairs, ["random", "benefit"], fit_pairs=train_pairs)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xbt.data.pairs import Pair
from xbt.errors import InputError
from xbt.gallery.fits import embed_for_fit, fit_benefit, fit_merge_calibration
from xbt.eval.backfill_curve import order_curves, order_hits
from xbt.models.base import VLPModel

ORDERS = ("random", "oldest", "newest", "benefit")
MERGES = ("slot", "score")
Log = Callable[[str], None]


def check_curve_options(orders: Sequence[str], steps: int, merge: str, calibrate_pairs: object) -> None:
    """The options of `measure_orders`, refused before any model loads."""
    unknown = [o for o in orders if o not in ORDERS]
    if unknown or not orders:
        raise InputError(f"--orders takes random, oldest, newest and benefit, not {', '.join(unknown) or 'nothing'}")
    if steps < 1:
        raise InputError("--steps must be at least 1")
    if merge not in MERGES:
        raise InputError(f"--merge takes slot or score, not {merge!r}")
    if (merge == "score") != bool(calibrate_pairs):
        raise InputError("--merge score needs --calibrate-pairs (and --calibrate-pairs is for --merge score)")


def measure_orders(old: VLPModel, new: VLPModel, compat: Any, pairs: Sequence[Pair], orders: Sequence[str], *,
                   fit_pairs: Sequence[Pair] | None = None, merge: str = "slot",
                   calibrate_pairs: Sequence[Pair] | None = None, calibrate_source: str = "", steps: int = 10,
                   n_random: int = 5, seed: int = 0, compat_name: str = "", log: Log | None = None) -> dict[str, Any]:
    """Retrieval quality during a migration: R@K of the merged search against the fraction backfilled, for
    each backfill order (random: `n_random` orders averaged; oldest; newest; benefit: fitted on `fit_pairs`),
    both directions, with the `merge` rule (score: calibrated on `calibrate_pairs`). Returns {"curves",
    "fractions", and, where fitted, "score_calibration" and "benefit_scorer"}."""
    check_curve_options(orders, steps, merge, calibrate_pairs)
    old_eval, new_eval, queries = embed_for_fit(old, new, compat, pairs, compat_name)
    sizes = {"t2i": len(old_eval.images), "i2t": len(old_eval.texts)}
    rng = np.random.default_rng(seed)
    chosen: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {}
    for name in orders:
        if name == "random":
            chosen[name] = {d: [rng.permutation(n) for _ in range(max(1, n_random))] for d, n in sizes.items()}
        elif name == "oldest":
            chosen[name] = {d: np.arange(n) for d, n in sizes.items()}
        elif name == "newest":
            chosen[name] = {d: np.arange(n)[::-1] for d, n in sizes.items()}
        else:
            if not fit_pairs:
                raise InputError("the benefit order is estimated from training pairs: give --fit-pairs (the compatible"
                                 " model, the gallery's own model and the training pairs)")
            fitted = {d: fit_benefit(old, new, compat, fit_pairs, modality, compat_name=compat_name, log=log)
                      for d, modality in (("t2i", "image"), ("i2t", "text"))}
            chosen[name] = {"t2i": fitted["t2i"].order(old_eval.images), "i2t": fitted["i2t"].order(old_eval.texts)}
            result["benefit_scorer"] = {d: sc.describe() for d, sc in fitted.items()}
    calibrations = None
    if merge == "score":
        calibrations = {d: fit_merge_calibration(old, new, compat, calibrate_pairs or [], modality, calibrate_source,
                                                 compat_name, log)
                        for d, modality in (("t2i", "image"), ("i2t", "text"))}
        result["score_calibration"] = calibrations
    fractions = [i / steps for i in range(steps + 1)]
    curves = order_curves(order_hits(old_eval, queries, new_eval, chosen, fractions, seed=seed, merge=merge,
                                     calibrations=calibrations), seed=seed)
    return {"curves": curves, "fractions": fractions, **result}
