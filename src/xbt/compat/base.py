"""The interface every fitted peer implements (Procrustes, the affine map, the adapter, SLERP, ...).

A peer is fitted on training data only (never on the evaluation split), in closed form or in seconds,
and its fit is a `QueryMap` (compat/maps.py): `to_model(new_model)` puts that map around the frozen new
model as a `CompatibleModel`, the same deployable artifact XBT trains. Methods that also need the old
model's query vector at query time (an ensemble, like SLERP) say so in `needs_old_model_at_query_time`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from xbt.compat.maps import QueryMap
from xbt.compat.model import CompatibleModel
from xbt.errors import InputError
from xbt.embed import PairEmbeddings
from xbt.models.base import EmbeddingSpace, VLPModel


@dataclass
class FitData:
    """Paired embeddings a method may fit on. Text pairs come from a text corpus (cheap); image pairs
    from image-text training pairs. Rows of new_* and old_* correspond."""

    new_text: np.ndarray
    old_text: np.ndarray
    new_image: np.ndarray | None = None
    old_image: np.ndarray | None = None
    # For ensembles (SLERP): support pairs with both models' embeddings of images and captions.
    support: tuple[PairEmbeddings, PairEmbeddings] | None = None


class CompatMethod(ABC):
    name: str = "method"
    needs_old_model_at_query_time: bool = False
    fits_on: str = "text"  # what it is fitted on, for the report: text, images, text+images, nothing
    # The directions a setting chosen on the support split is scored on: both, unless the method's map
    # serves one query tower only (a gallery-modality method's halves: xbt.compat.gallery_modality).
    support_directions: tuple[str, ...] = ("t2i", "i2t")

    def __init__(self, new_space: EmbeddingSpace, old_space: EmbeddingSpace):
        self.new_space, self.old_space = new_space, old_space

    def fit(self, data: FitData) -> CompatMethod:
        return self

    @abstractmethod
    def to_map(self) -> QueryMap:
        """The fitted map as a torch module (raises InputError when not fitted yet). A method with a map per
        query tower returns the text tower's here and overrides `to_maps`."""

    def to_maps(self) -> dict[str, QueryMap]:
        """{"text": map, "image": map}: the map each query tower uses (by default one map for both)."""
        shared = self.to_map()
        return {"text": shared, "image": shared}

    def transform(self, new_vectors: np.ndarray, old_vectors: np.ndarray | None = None,
                  tower: str = "text") -> np.ndarray:
        """(n, new_dim) new-model vectors of `tower`'s queries [+ the old model's, for an ensemble] ->
        (n, old_dim) unit vectors."""
        new_vectors = np.asarray(new_vectors, dtype=np.float32)
        if new_vectors.ndim != 2 or new_vectors.shape[1] != self.new_space.dim:
            raise InputError(
                f"{self.name} maps {self.new_space.dim}-d vectors of {self.new_space.id}; got shape {new_vectors.shape}"
            )
        if self.needs_old_model_at_query_time and old_vectors is None:
            raise InputError(f"{self.name} needs the old model's query vectors too (it is an ensemble)")
        return self.to_maps()[tower].apply(new_vectors, old_vectors)

    def details(self) -> dict[str, Any]:
        """The settings it was fitted with or chose (e.g. SLERP's weight), for the record."""
        return {}

    def tower_provenance(self) -> dict[str, Any]:
        """What each query tower's map was fitted on ({"maps_fitted_on": {tower: label}}), when they differ."""
        return {}

    def to_model(self, new_model: VLPModel, old_model: VLPModel | None = None) -> CompatibleModel:
        """The deployable model: this fit's map around the frozen new model (and the old model, for an
        ensemble). Save it with `save_pretrained(dir)`; it loads as `compat:DIR`."""
        self.new_space.check(new_model.space, f"the new model given to {self.name}")
        model = CompatibleModel(new_model, self.to_maps(), self.old_space, old_model=old_model, method=self.name)
        model.provenance = {"fits_on": self.fits_on, "details": self.details()} | self.tower_provenance()
        return model

    def _require_fitted(self, *fitted: Any) -> None:
        if any(f is None for f in fitted):
            raise InputError(f"{self.name} is not fitted yet; call fit() on training data first")
