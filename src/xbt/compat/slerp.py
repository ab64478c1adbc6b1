"""SLERP: Procrustes, then spherical interpolation between the old model's query and the aligned new one.

    q = slerp(old(x), R new(x), w)      w = 0: the old model alone; w = 1: Procrustes alone

The one weight w is chosen on a support split (never the evaluation split) as the one with the best
mean recall against the support's old gallery. Because w = 0 is on the grid, SLERP cannot do worse
than old->old on the support set; the price is that every query needs the OLD model too (an ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from xbt.compat.base import CompatMethod, FitData
from xbt.compat.maps import LinearMap, SlerpMap, slerp
from xbt.compat.procrustes import FITS_ON_LABEL, FitOn, Procrustes
from xbt.compat.support import best_setting, order_support, rounded, support_score
from xbt.errors import InputError
from xbt.metrics import DEFAULT_KS
from xbt.models.base import EmbeddingSpace

DEFAULT_WEIGHTS = tuple(float(w) for w in np.round(np.linspace(0, 1, 21), 2))


def slerp_arrays(old: np.ndarray, aligned: np.ndarray, weight: float) -> np.ndarray:
    return slerp(torch.from_numpy(np.asarray(old)), torch.from_numpy(np.asarray(aligned)), weight).numpy()


class Slerp(CompatMethod):
    name = "slerp"
    needs_old_model_at_query_time = True

    def __init__(
        self,
        new_space: EmbeddingSpace,
        old_space: EmbeddingSpace,
        fit_on: FitOn = "both",
        weight: float | None = None,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        ks: Sequence[int] = DEFAULT_KS,
    ):
        super().__init__(new_space, old_space)
        if weight is not None and not 0 <= weight <= 1:
            raise InputError(f"slerp: the weight must lie in [0, 1], not {weight}")
        self.procrustes = Procrustes(new_space, old_space, fit_on)
        self.fit_on = fit_on
        self.fits_on = FITS_ON_LABEL[fit_on] + ("" if weight is not None else "; weight on the support split")
        self.weight, self.fixed_weight = weight, weight is not None
        self.weights, self.ks = tuple(weights), tuple(ks)
        self.support_scores: dict[float, float] = {}

    def fit(self, data: FitData) -> Slerp:
        if not self.fixed_weight and data.support is None:
            raise InputError("slerp chooses its weight on a support split: pass one (--support), or give a fixed weight")
        self.procrustes.fit(data)
        if self.fixed_weight:
            return self
        new, old = order_support(data.support, self.new_space, self.old_space)
        rotation = self.procrustes.rotation
        self.support_scores = {
            w: support_score(lambda x, o, w=w: slerp_arrays(o, x @ rotation, w), new, old, self.ks,
                                self.support_directions) for w in self.weights
        }
        # Ties go to the larger weight: as good on the support set, and more of the new model.
        self.weight = best_setting(self.support_scores, prefer="larger")
        return self

    def to_map(self) -> SlerpMap:
        self._require_fitted(self.weight, self.procrustes.rotation)
        query_map = SlerpMap(self.new_space.dim, self.old_space.dim, self.weight)
        query_map.rotation = LinearMap.from_arrays(self.procrustes.rotation)
        return query_map

    def details(self) -> dict[str, object]:
        return {"fit_on": self.fit_on, "weight": self.weight, "support_scores": rounded(self.support_scores)}
