"""What a migration starts with, fitted from the models on pairs (never on evaluation pairs): the benefit
scorer of the `benefit` order and the calibration of the score merge. Each fit embeds its pairs with the old,
new and compatible models (through the feature cache) and hands the embeddings to `xbt.ranking`'s fits.

    scorer = fit_benefit(old, new, compat, train_pairs, "image")             # the order `benefit`
    calibration = fit_merge_calibration(old, new, compat, val_pairs, "image")  # the calibrated score merge
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from xbt.compat.queries import compatible_queries
from xbt.data.pairs import Pair
from xbt.embed import embed_pairs
from xbt.models.base import VLPModel
from xbt.ranking.benefit import BenefitScorer, describe_candidates, fit_benefit_pairs
from xbt.ranking.merge import ScoreCalibration, fit_score_calibration_pairs

Log = Callable[[str], None]


def embed_for_fit(old: VLPModel, new: VLPModel, compat: Any, pairs: Sequence[Pair], compat_name: str) -> tuple[Any, Any, Any]:
    """The pairs embedded by the old and new models, and the compatible model's queries of them."""
    old.space.check(compat.space, f"the compatible model {compat_name!r}")
    old_fit, new_fit = embed_pairs(old, pairs, True), embed_pairs(new, pairs, True)
    return old_fit, new_fit, compatible_queries(compat, pairs, new_fit, old_fit, True)


def fit_benefit(old: VLPModel, new: VLPModel, compat: Any, pairs: Sequence[Pair], modality: str,
                calibration: ScoreCalibration | None = None, compat_name: str = "",
                log: Log | None = None) -> BenefitScorer:
    """The benefit scorer of the `benefit` order for a gallery of `modality`: chosen on the training `pairs`
    embedded by the old, new and compatible models (`fit_benefit_pairs`), under the score merge when a
    `calibration` is given (the rule the migration will serve by). The fit report goes to `log`."""
    old_fit, new_fit, queries = embed_for_fit(old, new, compat, pairs, compat_name)
    scorer = fit_benefit_pairs(old_fit, new_fit, queries, modality, calibration=calibration)
    if log is not None:
        log(describe_candidates(scorer.fit_report))
    return scorer


def fit_merge_calibration(old: VLPModel, new: VLPModel, compat: Any, pairs: Sequence[Pair], modality: str,
                          source: str = "", compat_name: str = "", log: Log | None = None) -> ScoreCalibration:
    """The score merge's calibration (`fit_score_calibration_pairs`) for a gallery of `modality`, on `pairs`
    (named `source` in its report) embedded by the old, new and compatible models; what it fitted goes to `log`."""
    old_fit, new_fit, queries = embed_for_fit(old, new, compat, pairs, compat_name)
    calibration = fit_score_calibration_pairs(old_fit, new_fit, queries, modality)
    calibration.report["pairs"] = source
    if log is not None:
        log(f"score merge calibrated on {len(pairs)} pairs ({source}): log-odds old {calibration.old[0]:.2f} s"
            f" {calibration.old[1]:+.2f}, new {calibration.new[0]:.2f} s {calibration.new[1]:+.2f}")
    return calibration
