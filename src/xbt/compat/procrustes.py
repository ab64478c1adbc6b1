"""Orthogonal Procrustes ("SVD"): the closed-form rotation from the new space into the old one.

The smaller space is zero-padded to the larger dimension, the rotation R minimising ||X R - Y|| over
orthogonal R is U V^T from the SVD of X^T Y, and mapped vectors keep the old space's coordinates.
Training-free and cheap at query time (one matrix product), it preserves the new model's geometry
exactly, which is both its strength and why it cannot fix a new space that is not a rotation of the old.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from xbt.compat.base import CompatMethod, FitData
from xbt.compat.maps import LinearMap
from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace

FitOn = Literal["text", "image", "both"]
FITS_ON_LABEL = {"text": "text pairs", "image": "image pairs", "both": "text + image pairs"}


def paired_rows(data: FitData, fit_on: FitOn, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The (new, old) rows a method fits on: text pairs, image pairs (same image, both models) or both."""
    if fit_on not in FITS_ON_LABEL:
        raise InputError(f"{method}: fit_on must be one of {sorted(FITS_ON_LABEL)}, not {fit_on!r}")
    new, old = [], []
    if fit_on in ("text", "both"):
        if data.new_text is None or len(data.new_text) == 0:
            raise InputError(f"{method} fits on text pairs, and none were given: pass a text corpus or training pairs")
        new.append(np.asarray(data.new_text, dtype=np.float64))
        old.append(np.asarray(data.old_text, dtype=np.float64))
    if fit_on in ("image", "both"):
        if data.new_image is None or data.old_image is None or len(data.new_image) == 0:
            raise InputError(f"{method} fits on image pairs, and none were given: pass images both models embed: --fit-images (unlabeled) or --fit-pairs")
        new.append(np.asarray(data.new_image, dtype=np.float64))
        old.append(np.asarray(data.old_image, dtype=np.float64))
    x, y = np.concatenate(new), np.concatenate(old)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{method}: {x.shape[0]} new-model rows but {y.shape[0]} old-model rows; they must be paired")
    return x, y


def pad_to(x: np.ndarray, dim: int) -> np.ndarray:
    return x if x.shape[1] == dim else np.pad(x, ((0, 0), (0, dim - x.shape[1])))


def orthogonal_procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The orthogonal (D, D) matrix R minimising ||pad(x) R - pad(y)||_F, D = max of the two dimensions."""
    dim = max(x.shape[1], y.shape[1])
    u, _, vt = np.linalg.svd(pad_to(x, dim).T @ pad_to(y, dim))
    return u @ vt


class Procrustes(CompatMethod):
    """Orthogonal map new -> old fitted on text pairs, image pairs, or both (`fit_on`)."""

    def __init__(self, new_space: EmbeddingSpace, old_space: EmbeddingSpace, fit_on: FitOn = "text"):
        super().__init__(new_space, old_space)
        if fit_on not in FITS_ON_LABEL:
            raise InputError(f"procrustes: fit_on must be one of {sorted(FITS_ON_LABEL)}, not {fit_on!r}")
        self.fit_on = fit_on
        self.name = f"procrustes-{fit_on}"
        self.fits_on = FITS_ON_LABEL[fit_on]
        self.rotation: np.ndarray | None = None  # (new_dim, old_dim): the rows and columns that matter

    def fit(self, data: FitData) -> Procrustes:
        x, y = paired_rows(data, self.fit_on, self.name)
        self.rotation = orthogonal_procrustes(x, y)[: self.new_space.dim, : self.old_space.dim].astype(np.float32)
        return self

    def to_map(self) -> LinearMap:
        self._require_fitted(self.rotation)
        return LinearMap.from_arrays(self.rotation)

    def details(self) -> dict[str, object]:
        return {"fit_on": self.fit_on}
