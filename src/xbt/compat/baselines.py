"""The trivial baseline: compare new vectors with old ones as they are (pad with zeros or truncate)."""

from __future__ import annotations

import numpy as np

from xbt.compat.base import CompatMethod
from xbt.compat.maps import LinearMap


def pad_or_truncate_matrix(in_dim: int, out_dim: int) -> np.ndarray:
    """The (in_dim, out_dim) identity that keeps the first min(in_dim, out_dim) coordinates and pads
    the rest with zeros: new vectors compared with old ones as they are."""
    return np.eye(in_dim, out_dim, dtype=np.float32)


class NoAdaptation(CompatMethod):
    """What happens without any compatibility method: near-chance retrieval. Shown to prove the need."""

    name = "no-adaptation"
    fits_on = "nothing"

    def to_map(self) -> LinearMap:
        return LinearMap.from_arrays(pad_or_truncate_matrix(self.new_space.dim, self.old_space.dim))
