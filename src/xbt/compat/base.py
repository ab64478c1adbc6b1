"""The interface every compatibility method implements (XBT's projection, Procrustes, SLERP, adapters, ...).

A method is fitted on training data only (never on the evaluation split) and then maps new-model
query vectors into the old space. Methods that also need the old model's query vector at query time
(an ensemble, like SLERP) say so in `needs_old_model_at_query_time`; the report shows it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np

from xbt.errors import InputError
from xbt.eval.embed import PairEmbeddings
from xbt.eval.matrix import QueryVectors
from xbt.models.base import EmbeddingSpace

Modality = Literal["image", "text"]


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


def l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CompatMethod(ABC):
    name: str = "method"
    needs_old_model_at_query_time: bool = False
    fits_on: str = "text"  # what it is fitted on, for the report: text, images, text+images, nothing

    def __init__(self, new_space: EmbeddingSpace, old_space: EmbeddingSpace):
        self.new_space, self.old_space = new_space, old_space

    def fit(self, data: FitData) -> CompatMethod:
        return self

    @abstractmethod
    def map(self, new_vectors: np.ndarray, modality: Modality, old_vectors: np.ndarray | None = None) -> np.ndarray:
        """(n, new_dim) new-model vectors -> (n, old_dim) vectors comparable with the old gallery."""

    def transform(self, new_vectors: np.ndarray, modality: Modality, old_vectors: np.ndarray | None = None) -> np.ndarray:
        new_vectors = np.asarray(new_vectors, dtype=np.float32)
        if new_vectors.ndim != 2 or new_vectors.shape[1] != self.new_space.dim:
            raise InputError(
                f"{self.name} maps {self.new_space.dim}-d vectors of {self.new_space.id}; got shape {new_vectors.shape}"
            )
        if self.needs_old_model_at_query_time and old_vectors is None:
            raise InputError(f"{self.name} needs the old model's query vectors too (it is an ensemble)")
        return l2_normalise(self.map(new_vectors, modality, old_vectors)).astype(np.float32)

    def transform_embeddings(self, new: PairEmbeddings, old: PairEmbeddings | None = None) -> QueryVectors:
        self.new_space.check(new.space, "the query embeddings")
        return QueryVectors(
            images=self.transform(new.images, "image", old.images if old is not None else None),
            texts=self.transform(new.texts, "text", old.texts if old is not None else None),
        )
