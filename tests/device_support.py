"""Comparing vectors made on two devices: by direction (cosine), with a stated tolerance.

A GPU computes fp32 matmuls and convolutions in TF32 by default (Ampere and later), so its vectors differ
from the CPU's by more than float rounding, but point the same way: the tests that may run on a GPU compare
unit vectors by cosine, never element by element at 1e-5."""

from __future__ import annotations

import numpy as np

#: Minimum cosine between a vector made on a GPU (fp32, TF32 allowed) and the CPU's of the same input.
#: bench/gpu_check.py's MIN_COSINE["fp32"] is the same figure, for the full-size models.
MIN_COSINE_FP32 = 0.9999


def assert_same_directions(got, want, min_cosine: float = MIN_COSINE_FP32) -> None:
    """Row by row, cos(got_i, want_i) >= min_cosine (both normalised here); the worst row is reported."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    cosines = (got * want).sum(1)
    worst = int(cosines.argmin()) if len(cosines) else 0
    assert not len(cosines) or cosines[worst] >= min_cosine, f"row {worst}: cosine {cosines[worst]:.6f} < {min_cosine}"
