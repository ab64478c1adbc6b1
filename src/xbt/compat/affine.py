"""Least-squares affine map new -> old with a ridge penalty: the unconstrained linear peer.

Unlike Procrustes it may scale, shear and shift, so it can undo more than a rotation, at the price of
overfitting small training sets. The ridge term holds it back (the bias is not penalised); by default
its strength is chosen on the support split when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xbt.compat.base import CompatMethod, FitData
from xbt.compat.maps import LinearMap
from xbt.compat.procrustes import FITS_ON_LABEL, FitOn, paired_rows
from xbt.compat.support import best_setting, order_support, rounded, support_score
from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace

DEFAULT_RIDGE = 1.0
RIDGE_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def ridge_affine(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimising ||x W + b - y||^2 + ridge ||W||^2, in closed form (float64)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, xc.T @ yc)
    return weight, y_mean - x_mean @ weight


class AffineMap(CompatMethod):
    name = "affine"

    def __init__(
        self,
        new_space: EmbeddingSpace,
        old_space: EmbeddingSpace,
        fit_on: FitOn = "both",
        ridge: float | str = "auto",
        ridge_grid: Sequence[float] = RIDGE_GRID,
    ):
        """`ridge="auto"`: the grid value with the best support-split recall (DEFAULT_RIDGE without one)."""
        super().__init__(new_space, old_space)
        if ridge != "auto" and (not isinstance(ridge, (int, float)) or ridge < 0):
            raise InputError(f"affine: ridge must be a number >= 0 or 'auto', not {ridge!r}")
        if fit_on not in FITS_ON_LABEL:
            raise InputError(f"affine: fit_on must be one of {sorted(FITS_ON_LABEL)}, not {fit_on!r}")
        self.fit_on, self.ridge_option, self.ridge_grid = fit_on, ridge, tuple(ridge_grid)
        self.ridge: float | None = None if ridge == "auto" else float(ridge)
        self.fits_on = FITS_ON_LABEL[fit_on]
        self.support_scores: dict[float, float] = {}
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None

    def fit(self, data: FitData) -> AffineMap:
        x, y = paired_rows(data, self.fit_on, self.name)
        self.fits_on = FITS_ON_LABEL[self.fit_on]
        if self.ridge_option == "auto" and data.support is not None:
            new, old = order_support(data.support, self.new_space, self.old_space)
            fits = {r: ridge_affine(x, y, r) for r in self.ridge_grid}
            self.support_scores = {
                r: support_score(lambda v, o, w=w, b=b: v @ w + b, new, old,
                                 directions=self.support_directions) for r, (w, b) in fits.items()
            }
            self.ridge = best_setting(self.support_scores, prefer="larger")  # ties: the more regularised
            self.fits_on = FITS_ON_LABEL[self.fit_on] + "; ridge on the support split"
            weight, bias = fits[self.ridge]
        else:
            self.ridge = DEFAULT_RIDGE if self.ridge_option == "auto" else float(self.ridge_option)
            weight, bias = ridge_affine(x, y, self.ridge)
        self.weight, self.bias = weight.astype(np.float32), bias.astype(np.float32)
        return self

    def to_map(self) -> LinearMap:
        self._require_fitted(self.weight)
        return LinearMap.from_arrays(self.weight, self.bias)

    def details(self) -> dict[str, object]:
        return {"fit_on": self.fit_on, "ridge": self.ridge, "support_scores": rounded(self.support_scores)}
