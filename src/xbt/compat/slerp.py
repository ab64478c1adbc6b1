"""SLERP: Procrustes, then spherical interpolation between the old model's query and the aligned new one.

    q = slerp(old(x), R new(x), w)      w = 0: the old model alone; w = 1: Procrustes alone

The one weight w is chosen on a support split (never the evaluation split) as the one with the best
mean recall against the support's old gallery. Because w = 0 is on the grid, SLERP cannot do worse
than old->old on the support set; the price is that every query needs the OLD model too (an ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xbt.compat.base import CompatMethod, FitData, Modality, l2_normalise
from xbt.compat.procrustes import FITS_ON_LABEL, FitOn, Procrustes
from xbt.compat.support import best_setting, order_support, support_score
from xbt.errors import InputError
from xbt.eval.retrieval import DEFAULT_KS
from xbt.models.base import EmbeddingSpace

DEFAULT_WEIGHTS = tuple(float(w) for w in np.round(np.linspace(0, 1, 21), 2))


def slerp(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """Row-wise spherical interpolation between unit vectors a (weight 0) and b (weight 1)."""
    a, b = l2_normalise(np.asarray(a, dtype=np.float64)), l2_normalise(np.asarray(b, dtype=np.float64))
    cos = np.clip((a * b).sum(-1, keepdims=True), -1.0, 1.0)
    theta = np.arccos(cos)
    sin = np.sin(theta)
    near = sin < 1e-6  # (anti)parallel: the arc is undefined, fall back to the straight line
    safe = np.where(near, 1.0, sin)
    wa = np.where(near, 1 - weight, np.sin((1 - weight) * theta) / safe)
    wb = np.where(near, weight, np.sin(weight * theta) / safe)
    return wa * a + wb * b


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
        aligned = {"image": self.procrustes.map(new.images, "image"), "text": self.procrustes.map(new.texts, "text")}
        self.support_scores = {
            w: support_score(lambda x, modality, o, w=w: slerp(o, aligned[modality], w), new, old, self.ks)
            for w in self.weights
        }
        # Ties go to the larger weight: as good on the support set, and more of the new model.
        self.weight = best_setting(self.support_scores, prefer="larger")
        return self

    def map(self, new_vectors: np.ndarray, modality: Modality, old_vectors: np.ndarray | None = None) -> np.ndarray:
        if self.weight is None:
            raise InputError(f"{self.name} is not fitted yet; call fit() on training data first")
        if old_vectors is None or len(old_vectors) != len(new_vectors) or old_vectors.shape[1] != self.old_space.dim:
            raise InputError(f"{self.name} needs the old model's {self.old_space.dim}-d vectors of the same queries")
        return slerp(old_vectors, self.procrustes.map(new_vectors, modality), self.weight).astype(np.float32)
