"""Least-squares affine map new -> old with a ridge penalty: the unconstrained linear peer.

Unlike Procrustes it may scale, shear and shift, so it can undo more than a rotation, at the price of
overfitting small training sets (the ridge term holds it back; the bias is not penalised).
"""

from __future__ import annotations

import numpy as np

from xbt.compat.base import CompatMethod, FitData, Modality
from xbt.compat.procrustes import FITS_ON_LABEL, FitOn, paired_rows
from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace


def ridge_affine(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimising ||x W + b - y||^2 + ridge ||W||^2, in closed form (float64)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + ridge * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, xc.T @ yc)
    return weight, y_mean - x_mean @ weight


class AffineMap(CompatMethod):
    name = "affine"

    def __init__(self, new_space: EmbeddingSpace, old_space: EmbeddingSpace, fit_on: FitOn = "both", ridge: float = 1.0):
        super().__init__(new_space, old_space)
        if ridge < 0:
            raise InputError(f"affine: ridge must be >= 0, not {ridge}")
        if fit_on not in FITS_ON_LABEL:
            raise InputError(f"affine: fit_on must be one of {sorted(FITS_ON_LABEL)}, not {fit_on!r}")
        self.fit_on, self.ridge = fit_on, float(ridge)
        self.fits_on = FITS_ON_LABEL[fit_on]
        self.weight: np.ndarray | None = None
        self.bias: np.ndarray | None = None

    def fit(self, data: FitData) -> AffineMap:
        x, y = paired_rows(data, self.fit_on, self.name)
        weight, bias = ridge_affine(x, y, self.ridge)
        self.weight, self.bias = weight.astype(np.float32), bias.astype(np.float32)
        return self

    def map(self, new_vectors: np.ndarray, modality: Modality, old_vectors: np.ndarray | None = None) -> np.ndarray:
        if self.weight is None:
            raise InputError(f"{self.name} is not fitted yet; call fit() on training data first")
        return new_vectors @ self.weight + self.bias
