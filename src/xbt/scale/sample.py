"""Fit data from the gallery itself (issue 24): N of its items re-embedded by the new model, beside the old
vectors the gallery already holds. No caption, no label and no old model is needed: an image gallery gives
(old image, new image) pairs, which fit the map its text queries need (the gallery-modality map); a caption
gallery gives (old text, new text) pairs for its image queries.

    sample = sample_gallery(gallery, new_model, 3000)
    model = fit_peer("procrustes-image", old, new, extra=sample.fit_data())
    sample.keep("kept/")      # a vectors folder: `xbt gallery backfill --preload kept/` adds them first

A fit on a sample of the gallery is a partial backfill: those items are re-embedded already, and `keep`
writes their new vectors as a vectors folder (`xbt.scale.vectors`, the format `xbt embed` writes), so a later
backfill loads them instead of encoding them again. Where such a fit is evaluated, the sampled items count
as backfilled (they are gallery items the new model has seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbt.compat.base import FitData
from xbt.errors import InputError
from xbt.gallery.base import GalleryBackend
from xbt.gallery.ingest import GalleryItem, embed_items
from xbt.models.base import EmbeddingSpace, VLPModel
from xbt.scale.vectors import FORMAT, Manifest, write_shard

KEEP_SHARD = 65536  # rows per kept shard file


@dataclass
class GallerySample:
    """N gallery items: their stored (old) vectors and the new model's vectors of the same items."""

    modality: str
    ids: list[str]
    old: np.ndarray
    new: np.ndarray
    payloads: list[dict[str, Any]]
    old_space: EmbeddingSpace
    new_space: EmbeddingSpace
    model: str
    failed: dict[str, str] = field(default_factory=dict)

    def fit_data(self) -> FitData:
        """The sample as fit data of its modality's side (the other side empty)."""
        empty_new, empty_old = (np.zeros((0, s.dim), np.float32) for s in (self.new_space, self.old_space))
        if self.modality == "image":
            return FitData(new_text=empty_new, old_text=empty_old, new_image=self.new, old_image=self.old)
        return FitData(new_text=self.new, old_text=self.old)

    def keep(self, folder: str | Path) -> Manifest:
        """Write the new vectors (with the items' payloads) as a vectors folder a backfill can load."""
        out = Path(folder).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        shards = []
        for index, start in enumerate(range(0, max(1, len(self.ids)), KEEP_SHARD)):
            ids = self.ids[start : start + KEEP_SHARD]
            name = f"sample-{index:05d}.parquet"
            meta = {"format": FORMAT, "space": self.new_space.to_dict(), "model": self.model, "modality": self.modality,
                    "shard": name, "index": index, "digest": "", "rows": len(ids), "failed": {}, "kind": "gallery-sample"}
            write_shard(out / name, ids, self.new[start : start + KEEP_SHARD], self.payloads[start : start + KEEP_SHARD], meta)
            shards.append({"name": name, "rows": len(ids), "failed": 0})
        manifest = Manifest(self.model, self.new_space.to_dict(), self.modality, KEEP_SHARD, shards, len(self.ids),
                            dict(self.failed))
        manifest.write(out)
        return manifest


def sample_gallery(gallery: GalleryBackend, new_model: VLPModel, n: int, *, seed: int = 0, batch_size: int = 64,
                   show_progress: bool = False) -> GallerySample:
    """`n` items of `gallery` drawn at random (seeded), re-embedded by `new_model` from their payloads (an image
    path or a caption, as the gallery was built); items that cannot be embedded are left out (`failed`)."""
    if n < 1:
        raise InputError(f"--sample must be at least 1, not {n}")
    modality = gallery.modality
    if modality not in ("image", "text"):
        raise InputError(f"the gallery at {gallery.path} holds {modality!r} items; a sample needs an image or a text gallery")
    if new_model.space == gallery.space:
        raise InputError(f"{new_model.spec or new_model.space.name} is the gallery's own model: give the new model")
    all_ids = sorted(gallery.ids())
    if not all_ids:
        raise InputError(f"the gallery at {gallery.path} is empty: nothing to sample")
    rng = np.random.default_rng(seed)
    chosen = [all_ids[i] for i in sorted(rng.choice(len(all_ids), size=min(n, len(all_ids)), replace=False))]
    stored = gallery.get(chosen, with_vectors=True)
    items = [GalleryItem(i, stored[i]["payload"]) for i in chosen if i in stored]
    good, vectors, failed = embed_items(new_model, items, modality, batch_size)
    if not good:
        raise InputError(f"none of the {len(items)} sampled items could be embedded by the new model (e.g. "
                         f"{next(iter(failed.values()), 'no payload')}): the gallery's payloads must name its images or captions")
    return GallerySample(modality, [it.id for it in good], np.stack([stored[it.id]["vector"] for it in good]),
                           np.asarray(vectors, np.float32), [dict(it.payload) for it in good], gallery.space,
                           new_model.space, new_model.spec or new_model.space.name, dict(failed))
