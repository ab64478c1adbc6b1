"""The peer methods by name, so that the command line, evaluation and reports can list and build them.

    build_method("procrustes-text", new_space, old_space)
    build_method("adapter", new_space, old_space, hidden=256, epochs=30)

XBT itself is not built here: it is a trained model (`compat:PATH`), evaluated through its embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xbt.compat.adapter import ResidualAdapter
from xbt.compat.affine import AffineMap
from xbt.compat.base import CompatMethod
from xbt.compat.baselines import NoAdaptation
from xbt.compat.gallery_modality import GalleryModality
from xbt.compat.procrustes import Procrustes
from xbt.compat.slerp import Slerp
from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace

_FACTORIES: dict[str, Callable[..., CompatMethod]] = {
    "no-adaptation": NoAdaptation,
    "procrustes-text": lambda new, old, **kw: Procrustes(new, old, fit_on="text", **kw),
    "procrustes-image": lambda new, old, **kw: Procrustes(new, old, fit_on="image", **kw),
    "procrustes-both": lambda new, old, **kw: Procrustes(new, old, fit_on="both", **kw),
    # Gallery-modality variants (xbt.compat.gallery_modality): text queries mapped by the image-fitted map,
    # image queries by the text-fitted one; each listed next to its single-map peer.
    "procrustes-gallery": lambda new, old, **kw: GalleryModality(new, old, "procrustes", **kw),
    "affine": AffineMap,
    "affine-gallery": lambda new, old, **kw: GalleryModality(new, old, "affine", **kw),
    "adapter": ResidualAdapter,
    "adapter-gallery": lambda new, old, **kw: GalleryModality(new, old, "adapter", **kw),
    "slerp": Slerp,
    "slerp-gallery": lambda new, old, **kw: GalleryModality(new, old, "slerp", **kw),
}

#: Every training-free or query-side peer, in the order reports list them.
PEER_METHODS: tuple[str, ...] = tuple(_FACTORIES)


def build_method(name: str, new_space: EmbeddingSpace, old_space: EmbeddingSpace, **kwargs: Any) -> CompatMethod:
    """An unfitted peer method by its registry name; kwargs go to its constructor."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise InputError(
            f"unknown method {name!r}; known peers: {', '.join(PEER_METHODS)} (or compat:PATH for a trained XBT model)"
        )
    try:
        return factory(new_space, old_space, **kwargs)
    except TypeError as exc:
        raise InputError(f"method {name!r} does not take these options {sorted(kwargs)}: {exc}") from exc
