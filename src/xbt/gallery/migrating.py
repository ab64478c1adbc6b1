"""Serving during a migration: the compatible model against the complete old gallery, merged with the new
model against the growing new gallery by the rank-slot rule (`xbt.eval.backfill_curve.slot_merge`).

Scores of two spaces are not comparable, so they are never compared. The old gallery is complete, so the
compatible model's ranking over it decides, depth by depth, whether a slot goes to a not-yet-backfilled
item (kept as ranked, with its old-space score) or to a backfilled one; the backfilled slots are then
filled, in order, with the new model's ranking over the new gallery. With nothing backfilled the result
is the compatible model's; with everything backfilled it is exactly the new model's; in between, the new
model re-orders the backfilled share of each result list. Each hit carries the id of the space its score
came from. After the cut-over (`Migration.cut_over`), the new model alone.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xbt.data.images import ImageInput
from xbt.errors import InputError
from xbt.eval.backfill_curve import slot_merge
from xbt.gallery.base import GalleryBackend, open_gallery
from xbt.gallery.ingest import check_model, model_name
from xbt.gallery.migration import Migration
from xbt.gallery.store import Hit, OnConflict
from xbt.models.base import VLPModel


class MigratingRetriever:
    """Answers queries during a backfill: the compatible model against the old gallery, merged with the
    new model against the growing new gallery (`slot_merge`); after the cut-over, the new model alone.
    Writes go to both galleries until the cut-over, so new items need no backfill."""

    def __init__(self, migration: Migration, compat_model: VLPModel, new_model: VLPModel,
                 old: GalleryBackend | None = None, new: GalleryBackend | None = None):
        self.migration = migration
        self.old = old or open_gallery(migration.old_gallery_ref)
        self.new = new or open_gallery(migration.new_gallery_ref)
        check_model(self.old, compat_model)
        check_model(self.new, new_model)
        self.compat_model, self.new_model = compat_model, new_model
        self.gallery = self.new  # what a service reports as "the" gallery after the cut-over
        self._model_lock = threading.Lock()

    def _encode(self, model: VLPModel, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        with self._model_lock:
            if modality == "image":
                return model.encode_image(list(inputs)).numpy()
            return model.encode_text(list(inputs)).numpy()

    def _search(self, modality: str, inputs: Sequence[Any], k: int) -> list[list[Hit]]:
        new_q = self._encode(self.new_model, modality, inputs)
        if self.migration.cut_over_done:
            return self.new.search(new_q, k, space=self.new_model.space)
        old_q = self._encode(self.compat_model, modality, inputs)
        old_hits = self.old.search(old_q, k, space=self.compat_model.space)
        out = []
        for q, hits in enumerate(old_hits):
            ids = [h.id for h in hits]
            done = self.new.present(ids)
            n_slots = sum(i in done for i in ids)
            new_hits = self.new.search(new_q[q : q + 1], n_slots, space=self.new_model.space)[0] if n_slots else []
            by_id = {h.id: h for h in hits} | {h.id: h for h in new_hits}
            merged = slot_merge(ids, done, [h.id for h in new_hits])
            out.append([by_id[i] for i, _ in merged])
        return out

    def search_texts(self, texts: Sequence[str], k: int) -> list[list[Hit]]:
        return self._search("text", texts, k)

    def search_images(self, images: Sequence[ImageInput], k: int) -> list[list[Hit]]:
        return self._search("image", images, k)

    def add(self, modality: str, ids: Sequence[str], inputs: Sequence[Any], payloads: Sequence[dict[str, Any]],
            on_conflict: OnConflict = "error") -> list[str]:
        if self.new.modality and self.new.modality != modality:
            raise InputError(f"this gallery holds {self.new.modality}s; it cannot store a {modality}")
        new_vecs = self._encode(self.new_model, modality, inputs)
        if self.migration.cut_over_done:
            return self.new.add(new_vecs, ids, payloads, space=self.new_model.space, on_conflict=on_conflict)
        added = self.old.add(self._encode(self.compat_model, modality, inputs), ids, payloads,
                             space=self.compat_model.space, on_conflict=on_conflict)
        added_set = set(added)
        keep = [j for j, i in enumerate(ids) if i in added_set]
        if keep:
            self.new.add(new_vecs[keep], [ids[j] for j in keep], [payloads[j] for j in keep],
                         space=self.new_model.space, on_conflict="replace")
        return added

    def store_media(self, data: bytes, suffix: str) -> Path:
        # before the cut-over, under the old gallery: both galleries' payloads then name one file
        return (self.new if self.migration.cut_over_done else self.old).store_media(data, suffix)

    def delete(self, ids: Sequence[str]) -> int:
        if self.migration.cut_over_done:
            return self.new.delete(ids)
        n = self.old.delete(ids)
        self.new.delete(ids)
        return n

    def info(self) -> dict[str, Any]:
        state = self.migration.state
        return {
            "mode": "cut-over" if self.migration.cut_over_done else "migrating",
            "gallery": self.new.info().to_dict() if self.migration.cut_over_done else self.old.info().to_dict(),
            "new_gallery": self.new.info().to_dict(),
            "model": model_name(self.new_model if self.migration.cut_over_done else self.compat_model),
            "new_model": model_name(self.new_model),
            "migration": {"status": state["status"], "position": state["position"], "plan_size": state["plan_size"]},
        }

    def close(self) -> None:
        self.old.close()
        self.new.close()
