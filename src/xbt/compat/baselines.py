"""The trivial baseline: compare new vectors with old ones as they are (pad with zeros or truncate)."""

from __future__ import annotations

import numpy as np

from xbt.compat.base import CompatMethod, Modality


def pad_or_truncate(x: np.ndarray, dim: int) -> np.ndarray:
    if x.shape[1] >= dim:
        return x[:, :dim]
    return np.pad(x, ((0, 0), (0, dim - x.shape[1])))


class NoAdaptation(CompatMethod):
    """What happens without any compatibility method: near-chance retrieval. Shown to prove the need."""

    name = "no-adaptation"
    fits_on = "nothing"

    def map(self, new_vectors: np.ndarray, modality: Modality, old_vectors: np.ndarray | None = None) -> np.ndarray:
        return pad_or_truncate(new_vectors, self.old_space.dim)
