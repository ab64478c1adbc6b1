"""Backfill orders and the merge, from the models: what `xbt gallery backfill` starts a migration with and
`xbt gallery backfill-curve` measures.

    scorer = fit_benefit(old, new, compat, train_pairs, "image")             # the order `benefit`
    calibration = fit_merge_calibration(old, new, compat, val_pairs, "image")  # the calibrated score merge
    result = measure_orders(old, new, compat, eval_pairs, ["random", "benefit"], fit_pairs=train_pairs)

Each fit embeds its pairs with the old, new and compatible models (through the feature cache) and hands the
embeddings to the fit of `xbt.eval.benefit` / `xbt.eval.backfill_curve`; neither is ever fitted on
evaluation pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xbt.data.pairs import Pair
from xbt.errors import InputError
from xbt.eval.backfill_curve import ScoreCalibration, fit_score_calibration_pairs, order_curves, order_hits
from xbt.eval.benefit import BenefitScorer, describe_candidates, fit_benefit_pairs
from xbt.eval.embed import embed_pairs
from xbt.eval.runner import compatible_queries
from xbt.models.base import VLPModel

ORDERS = ("random", "oldest", "newest", "benefit")
MERGES = ("slot", "score")
Log = Callable[[str], None]


def _embedded(old: VLPModel, new: VLPModel, compat: Any, pairs: Sequence[Pair], compat_name: str) -> tuple[Any, Any, Any]:
    old.space.check(compat.space, f"the compatible model {compat_name!r}")
    old_fit, new_fit = embed_pairs(old, pairs, True), embed_pairs(new, pairs, True)
    return old_fit, new_fit, compatible_queries(compat, pairs, new_fit, old_fit, True)


def fit_benefit(old: VLPModel, new: VLPModel, compat: Any, pairs: Sequence[Pair], modality: str,
                calibration: ScoreCalibration | None = None, compat_name: str = "",
                log: Log | None = None) -> BenefitScorer:
    """The benefit scorer of the `benefit` order for a gallery of `modality`: chosen on the training `pairs`
    embedded by the old, new and compatible models (`fit_benefit_pairs`), under the score merge when a
    `calibration` is given (the rule the migration will serve by). The fit report goes to `log`."""
    old_fit, new_fit, queries = _embedded(old, new, compat, pairs, compat_name)
    scorer = fit_benefit_pairs(old_fit, new_fit, queries, modality, calibration=calibration)
    if log is not None:
        log(describe_candidates(scorer.fit_report))
    return scorer


def fit_merge_calibration(old: VLPModel, new: VLPModel, compat: Any, pairs: Sequence[Pair], modality: str,
                          source: str = "", compat_name: str = "", log: Log | None = None) -> ScoreCalibration:
    """The score merge's calibration (`fit_score_calibration_pairs`) for a gallery of `modality`, on `pairs`
    (named `source` in its report) embedded by the old, new and compatible models; what it fitted goes to `log`."""
    old_fit, new_fit, queries = _embedded(old, new, compat, pairs, compat_name)
    calibration = fit_score_calibration_pairs(old_fit, new_fit, queries, modality)
    calibration.report["pairs"] = source
    if log is not None:
        log(f"score merge calibrated on {len(pairs)} pairs ({source}): log-odds old {calibration.old[0]:.2f} s"
            f" {calibration.old[1]:+.2f}, new {calibration.new[0]:.2f} s {calibration.new[1]:+.2f}")
    return calibration


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
    old_eval, new_eval, queries = _embedded(old, new, compat, pairs, compat_name)
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
