"""Gallery-modality maps: each query tower mapped with the map fitted on the modality its queries search.

Text queries search the old IMAGE gallery (T2I), image queries the old CAPTION gallery (I2T). A map R fitted
on images (new image -> old image of the same image) sends a new text query t to R t, and

    <R t, g_old> ~ <R t, R i_new> = <t, i_new>

for a gallery image g_old ~ R i_new: the new model's own cross-modal score against an approximation of the
gallery item. So the text tower gets the image-fitted map and the image tower the text-fitted one, and
neither fit needs a caption: images (or texts) embedded by both models are enough, e.g. a re-embedded
sample of the gallery or any unlabeled images (`--fit-images`). One orthogonal map fitted on one modality
aligns both encoders of two CLIP-class models up to a mean shift (arXiv 2602.17584).

    method = GalleryModality(new_space, old_space, "procrustes")   # registry name: procrustes-gallery
    model = method.fit(data).to_model(new_model)                   # query_map_for("text"): fitted on images

Each half is today's single-map peer with `fit_on` set to the gallery's modality; a setting a half chooses
on the support split (the affine ridge, the adapter's epochs, SLERP's weight) is scored on the direction
its queries serve only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xbt.compat.adapter import ResidualAdapter
from xbt.compat.affine import AffineMap
from xbt.compat.base import CompatMethod, FitData
from xbt.compat.maps import QueryMap
from xbt.compat.procrustes import Procrustes
from xbt.compat.slerp import Slerp
from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace

#: The single-map peers a gallery-modality variant is made of: name -> constructor taking fit_on=.
GALLERY_PEERS: dict[str, Callable[..., CompatMethod]] = {
    "procrustes": Procrustes, "affine": AffineMap, "adapter": ResidualAdapter, "slerp": Slerp,
}
#: Each query tower's map is fitted on the other modality: the modality of the gallery its queries search.
GALLERY_SIDE = {"text": "image", "image": "text"}
TOWER_DIRECTION = {"text": "t2i", "image": "i2t"}


class GalleryModality(CompatMethod):
    """A map per query tower: the text tower's fitted on images, the image tower's on texts."""

    def __init__(self, new_space: EmbeddingSpace, old_space: EmbeddingSpace, peer: str = "procrustes", **options: Any):
        super().__init__(new_space, old_space)
        if peer not in GALLERY_PEERS:
            raise InputError(f"gallery-modality maps are made of {', '.join(GALLERY_PEERS)}, not {peer!r}")
        if "fit_on" in options:
            raise InputError(f"{peer}-gallery fits each tower's map on its gallery's modality; it takes no fit_on")
        self.peer, self.name = peer, f"{peer}-gallery"
        self.halves: dict[str, CompatMethod] = {}
        for tower, side in GALLERY_SIDE.items():
            half = GALLERY_PEERS[peer](new_space, old_space, fit_on=side, **options)
            half.support_directions = (TOWER_DIRECTION[tower],)
            self.halves[tower] = half
        self.needs_old_model_at_query_time = self.halves["text"].needs_old_model_at_query_time
        self.fits_on = "image pairs for text queries, text pairs for image queries"

    def fit(self, data: FitData) -> GalleryModality:
        for half in self.halves.values():
            half.fit(data)
        labels = {tower: half.fits_on for tower, half in self.halves.items()}
        self.fits_on = f"text queries: {labels['text']}; image queries: {labels['image']}"
        return self

    def to_map(self) -> QueryMap:
        return self.halves["text"].to_map()

    def to_maps(self) -> dict[str, QueryMap]:
        return {tower: half.to_map() for tower, half in self.halves.items()}

    def details(self) -> dict[str, Any]:
        return {"peer": self.peer, **{f"{tower}_queries": half.details() for tower, half in self.halves.items()}}

    def tower_provenance(self) -> dict[str, Any]:
        return {"maps_fitted_on": {tower: f"{half.fits_on} (the {GALLERY_SIDE[tower]} gallery's modality)"
                                   for tower, half in self.halves.items()}}
