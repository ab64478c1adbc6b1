"""Moving a gallery into the new space without re-encoding it: every stored old-space vector is carried
by one old->new map into the new space, once, and the new gallery is then searched by native new-model
queries (issue 26; the corpus-side variant of FCT / FastFill).

The map (`GalleryMap`) is either the transpose of a compatible model's orthogonal query map (Procrustes:
<R q, g> = <q, R^T g>, so the transformed gallery ranks exactly as the old gallery searched through the
query-side map) or an old->new map fitted by the same closed-form fits as the query maps (`xbt.compat`'s
Procrustes and ridge affine map, with the two models' roles swapped), on texts and images both models
embedded.

Provenance: every row the transform writes carries `_xbt_provenance: {"kind": "transformed", "map":
DIGEST}` in its payload; a row without it is native (embedded by the new model, e.g. added later). The
payload is the one per-row field both backends (embedded and Milvus) store, copy (`copy_gallery`) and
return with hits, so the mark follows the row everywhere without a schema change in either backend. The
gallery itself is stamped (`extra["transform"]`) with the source, its space and the map's digest, which
is what a rerun checks before it resumes.

`transform_gallery` streams (one batch of the source's iteration at a time), and is resumable and
kill-safe the way `copy_gallery` is: each batch is one atomic `add` of the ids the target lacks, so a
kill loses nothing acknowledged, and the rerun skips what is there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xbt.compat.base import FitData
from xbt.compat.fit import fit_data
from xbt.compat.maps import LinearMap
from xbt.compat.model import CompatibleModel
from xbt.compat.registry import build_method
from xbt.data.pairs import Pair
from xbt.errors import InputError, SpaceMismatchError
from xbt.embed import embed_images
from xbt.gallery.base import GalleryBackend, create_gallery, gallery_exists, gallery_ref, open_gallery
from xbt.gallery.index import IndexConfig
from xbt.gallery.media import adopt_media
from xbt.models.base import EmbeddingSpace, VLPModel
from xbt.progress import progress_bar

PROVENANCE_KEY = "_xbt_provenance"
TRANSFORM_META = "transform"  # the key of the transformed gallery's stamp in its `extra`
#: The closed-form fits that give a linear old->new map (the others are query-side only: an ensemble
#: needs the old model at query time, the adapter is not linear).
FITTED_METHODS = ("procrustes-text", "procrustes-image", "procrustes-both", "affine")
ORTHOGONALITY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class GalleryMap:
    """old-space unit vectors -> new-space unit vectors: x W (+ b), renormalised (`LinearMap.apply`)."""

    linear: LinearMap  # (old_dim, new_dim)
    old_space: EmbeddingSpace
    new_space: EmbeddingSpace
    made_by: str  # how it was made, for the stamp and messages

    def __post_init__(self) -> None:
        if (self.linear.in_dim, self.linear.out_dim) != (self.old_space.dim, self.new_space.dim):
            raise SpaceMismatchError(
                f"an old->new map must map {self.old_space.dim}-d vectors of {self.old_space.id} to"
                f" {self.new_space.dim}-d vectors of {self.new_space.id}; this one ({self.made_by}) maps"
                f" {self.linear.in_dim}->{self.linear.out_dim}: make it for these two models")

    @property
    def digest(self) -> str:
        """sha256 of the weights, the bias and the two spaces: what each transformed row records."""
        h = hashlib.sha256()
        for space in (self.old_space, self.new_space):
            h.update(f"{space.name}|{space.dim}|{space.fingerprint}\n".encode())
        h.update(self.linear.weight.detach().cpu().numpy().astype("<f4").tobytes())
        if self.linear.bias is not None:
            h.update(self.linear.bias.detach().cpu().numpy().astype("<f4").tobytes())
        return h.hexdigest()

    def apply(self, old_vectors: Any) -> np.ndarray:
        return self.linear.apply(old_vectors)

    def stamp(self) -> dict[str, Any]:
        return {"map": self.digest, "made_by": self.made_by, "old_space": self.old_space.to_dict(),
                "new_space": self.new_space.to_dict()}


def query_tower(modality: str | None) -> str:
    """The tower whose queries search a gallery of `modality`: texts find images, images find captions."""
    if modality not in ("image", "text"):
        raise InputError(f"the gallery's modality is {modality!r}; a transform needs an image or a text gallery")
    return "text" if modality == "image" else "image"


def transposed_query_map(model: CompatibleModel, tower: str) -> GalleryMap:
    """The old->new map R^T of a compatible model whose `tower` query map is orthogonal (x R, no bias),
    applied to the plain new model's queries (no LoRA adapters on that tower, not a chain)."""
    query_map = model.query_map_for(tower)
    name = model.display_name
    if not isinstance(query_map, LinearMap) or query_map.bias is not None:
        raise InputError(
            f"{name}'s {tower} query map is a {query_map.kind} map{' with a bias' if isinstance(query_map, LinearMap) else ''};"
            " only an orthogonal linear map (Procrustes) can be transposed into an old->new map. Fit one instead:"
            f" `xbt gallery transform --fit procrustes-both --old OLD --new NEW ...` (or --fit affine)")
    new_space = model.new_space_at_training
    if not model.runs_unadapted(tower, new_space):
        raise InputError(
            f"{name}'s {tower} tower is not the plain new model (LoRA adapters or a chain): native new-model"
            " queries would not be what its map was fitted on. Fit an old->new map with --fit instead")
    weight = query_map.weight.detach().cpu().double().numpy()  # (new_dim, old_dim)
    gap = float(np.abs(weight.T @ weight - np.eye(weight.shape[1])).max())
    if gap > ORTHOGONALITY_TOLERANCE:
        raise InputError(
            f"{name}'s {tower} query map is not orthogonal (max |R^T R - I| = {gap:.3g}"
            f"{'; the new space is smaller than the old one' if weight.shape[0] < weight.shape[1] else ''}), so its"
            " transpose would not rank as the query-side map does. Fit an old->new map with --fit instead")
    return GalleryMap(LinearMap.from_arrays(weight.T.astype(np.float32)), model.old_space, new_space,
                      f"transpose of the {tower} query map of {name}")


def fitted_map(method: str, old_model: VLPModel, new_model: VLPModel, *, fit_texts: Sequence[str] = (),
               fit_pairs: Sequence[Pair] = (), fit_images: Sequence[str] = (), show_progress: bool = False,
               **options: Any) -> GalleryMap:
    """An old->new map fitted in closed form by one of `xbt.compat`'s linear methods with the two models'
    roles swapped: the old model's vectors are the inputs, the new model's the targets. It fits on texts,
    on image-caption pairs (their images and captions) and on unlabeled images, each embedded by both."""
    if method not in FITTED_METHODS:
        raise InputError(f"--fit must be one of {', '.join(FITTED_METHODS)}, not {method!r}")
    swapped = build_method(method, old_model.space, new_model.space, **options)  # "new" = the map's input
    data: FitData = fit_data(new_model, old_model, fit_texts, fit_pairs, None, show_progress)
    if fit_images:  # unlabeled: only the images are embedded (by both models, through the feature cache)
        unlabeled = [Pair(image=str(path), caption="", image_id=str(path)) for path in fit_images]
        inputs, targets = (embed_images(old_model, unlabeled, show_progress),
                           embed_images(new_model, unlabeled, show_progress))
        data.new_image = inputs if data.new_image is None else np.concatenate([data.new_image, inputs])
        data.old_image = targets if data.old_image is None else np.concatenate([data.old_image, targets])
    linear = swapped.fit(data).to_map()
    assert isinstance(linear, LinearMap)  # every FITTED_METHODS fit is one
    made_by = f"{method} fitted old->new on {len(data.new_text)} texts and {0 if data.new_image is None else len(data.new_image)} images"
    return GalleryMap(linear, old_model.space, new_model.space, made_by)


def _check_target(dest: GalleryBackend, source: GalleryBackend, gmap: GalleryMap, target: str | Path) -> None:
    """A target that exists must be an earlier run of this very transform (same source space, same map)."""
    gmap.new_space.check(dest.space, f"the gallery at {target} (not made by this transform?)")
    stamp = dest.extra.get(TRANSFORM_META)
    if not isinstance(stamp, Mapping) or stamp.get("map") != gmap.digest:
        made = f" with map {stamp.get('map', '?')[:12]} ({stamp.get('made_by')})" if isinstance(stamp, Mapping) else ""
        raise InputError(
            f"{target} already holds a gallery{made}, not a transform of this gallery with map {gmap.digest[:12]}"
            f" ({gmap.made_by}); choose a new --out, or rerun with the map that made it")
    if dest.modality != source.modality:
        raise InputError(f"the gallery at {target} holds {dest.modality}s, the source {source.modality}s")


def open_transform_target(source: GalleryBackend, target: str | Path, gmap: GalleryMap,
                          index: IndexConfig | None = None) -> GalleryBackend:
    """The new-space gallery a transform of `source` by `gmap` writes: created (stamped with the map and the
    source) or, where one exists, an earlier run of this very transform; anything else is refused."""
    if source.space.fingerprint != gmap.old_space.fingerprint or source.space.dim != gmap.old_space.dim:
        raise SpaceMismatchError(
            f"the gallery at {source.path} lives in {source.space.id}, but the map ({gmap.made_by}) takes vectors"
            f" of {gmap.old_space.id}: use a map made for this gallery's model (--old, or a compatible model"
            " trained for this gallery's space)")
    if not gallery_exists(target):
        stamp = {TRANSFORM_META: {**gmap.stamp(), "source": gallery_ref(source)}}
        return create_gallery(target, gmap.new_space, index or source.index_config, source.modality,
                              {**source.extra, **stamp})
    dest = open_gallery(target)
    try:
        _check_target(dest, source, gmap, target)
    except BaseException:
        dest.close()
        raise
    return dest


def transform_gallery(source: GalleryBackend, target: str | Path, gmap: GalleryMap, *, batch: int = 1024,
                      index: IndexConfig | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Write every item of `source` (an old-space gallery), mapped by `gmap`, into the new-space gallery at
    `target` (created, or completed when an earlier run of this transform was interrupted), payloads and
    media carried over, each row marked transformed. A rerun also removes the transformed rows whose item
    the source no longer holds (deleted there since), so the new gallery follows the old one until it
    takes over; native rows (backfilled in place, or added with the new model) are never removed. Returns
    counts and the target's info."""
    if batch < 1:
        raise InputError("batch must be at least 1")
    dest = open_transform_target(source, target, gmap, index)
    provenance = {"kind": "transformed", "map": gmap.digest}
    written = skipped = 0
    try:
        with progress_bar(len(source), "transform", show_progress) as advance:
            chunk: list[str] = []
            for item_id, _payload, _added in source.iter_items(batch):
                chunk.append(item_id)
                if len(chunk) == batch:
                    w, s = _transform_batch(source, dest, gmap, chunk, provenance)
                    written, skipped = written + w, skipped + s
                    advance(len(chunk))
                    chunk = []
            if chunk:
                w, s = _transform_batch(source, dest, gmap, chunk, provenance)
                written, skipped = written + w, skipped + s
                advance(len(chunk))
        removed = _remove_deleted(source, dest, batch)
        dest.compact()
        return {"written": written, "already_present": skipped, "removed": removed, "map": gmap.digest,
                "made_by": gmap.made_by, "info": dest.info().to_dict()}
    finally:
        dest.close()


def _remove_deleted(source: GalleryBackend, dest: GalleryBackend, batch: int) -> int:
    """Delete from `dest` the transformed rows whose id `source` no longer holds; how many."""
    transformed = [item_id for item_id, payload, _added in dest.iter_items(batch) if provenance_of(payload) == "transformed"]
    gone: list[str] = []
    for start in range(0, len(transformed), batch):
        chunk = transformed[start : start + batch]
        have = source.present(chunk)
        gone += [i for i in chunk if i not in have]
    return dest.delete(gone) if gone else 0


def _transform_batch(source: GalleryBackend, dest: GalleryBackend, gmap: GalleryMap, chunk: list[str],
                     provenance: dict[str, str]) -> tuple[int, int]:
    """One atomic add of the chunk's ids that `dest` lacks; (written, already present)."""
    have = dest.present(chunk)
    todo = [i for i in chunk if i not in have]
    stored = source.get(todo, with_vectors=True)
    todo = [i for i in todo if i in stored]  # deleted from the source meanwhile
    if todo:
        vectors = gmap.apply(np.stack([stored[i]["vector"] for i in todo]))
        payloads = adopt_media([stored[i]["payload"] for i in todo], source, dest)
        marked = [{**(p or {}), PROVENANCE_KEY: provenance} for p in payloads]
        dest.add(vectors, todo, marked, space=gmap.new_space, on_conflict="skip")
    return len(todo), len(have)


def provenance_of(payload: Mapping[str, Any] | None) -> str:
    """"transformed" or "native" (no mark: embedded by the new model)."""
    mark = (payload or {}).get(PROVENANCE_KEY)
    return str(mark.get("kind", "native")) if isinstance(mark, Mapping) else "native"


def transform_status(gallery: GalleryBackend) -> dict[str, Any] | None:
    """For a transformed gallery: how many rows are still transformed and how many native (counted by the
    backend's query on the payload mark, not by reading payloads); None for a gallery no transform made."""
    stamp = gallery.extra.get(TRANSFORM_META)
    if not isinstance(stamp, Mapping):
        return None
    transformed = gallery.count_payload(PROVENANCE_KEY, "kind", "transformed")
    return {"transformed": transformed, "native": len(gallery) - transformed, "map": stamp.get("map"),
            "made_by": stamp.get("made_by"), "source": stamp.get("source")}
