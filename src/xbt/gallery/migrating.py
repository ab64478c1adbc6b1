"""Serving during a migration: the compatible model against the complete old gallery, merged with the new
model against the growing new gallery by the migration's merge rule (`xbt.ranking.merge.merge_rankings`,
the very function the offline curve measures): the calibrated score rule when the migration holds a
calibration (`Migration.merge_calibration`), the rank-slot rule otherwise.

Score rule: each space's inner products are mapped to P(match) by the calibration fitted when the
migration started (on pairs the new model was not trained on); the result is the union of the
old-gallery hits of items not yet backfilled and the new-gallery hits of backfilled items, by calibrated
score. The old search deepens (x4 per round) until every query has
k items that are not backfilled, or the whole old gallery (at most `MAX_OLD_DEPTH`) was searched: late in
a migration, about k / (1 - fraction backfilled) old hits per query. Queries of another modality than the
calibration's (e.g. image queries of an image gallery) are merged by the rank-slot rule.

Rank-slot rule: scores of two spaces are not compared. The old gallery is complete, so the
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
from xbt.ranking.merge import merge_rankings
from xbt.gallery.base import GalleryBackend, calibration_status, describe_query_model, open_gallery
from xbt.gallery.ingest import check_model, model_name
from xbt.gallery.media import adopt_media
from xbt.gallery.migration import Migration
from xbt.gallery.store import Hit, OnConflict
from xbt.models.base import VLPModel

#: The deepest old-gallery search of the score rule (Milvus's largest top-k).
MAX_OLD_DEPTH = 16384


class MigratingRetriever:
    """Answers queries during a backfill: the compatible model against the old gallery, merged with the
    new model against the growing new gallery (`merge_rankings`: by calibrated score when the migration
    holds a calibration, by rank slots otherwise); after the cut-over, the new model alone. Writes go to
    both galleries until the cut-over, so new items need no backfill."""

    def __init__(self, migration: Migration, compat_model: VLPModel, new_model: VLPModel,
                 old: GalleryBackend | None = None, new: GalleryBackend | None = None):
        self.migration = migration
        self.old = old or open_gallery(migration.old_gallery_ref)
        self.new = new or open_gallery(migration.new_gallery_ref)
        check_model(self.old, compat_model)
        check_model(self.new, new_model)
        self.compat_model, self.new_model = compat_model, new_model
        self.calibration = migration.merge_calibration
        if self.calibration is not None:
            self.calibration.check(self.old.space.id, self.new.space.id, "the galleries served")
        self.gallery = self.new  # what a service reports as "the" gallery after the cut-over
        self._model_lock = threading.Lock()

    def _encode(self, model: VLPModel, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        with self._model_lock:
            if modality == "image":
                return model.encode_image(list(inputs)).numpy()
            return model.encode_text(list(inputs)).numpy()

    def _search_new(self, queries: np.ndarray, k: int, calibrated: bool = True) -> list[list[Hit]]:
        """The new model against the new gallery (its NNN calibration applies when made for the new model)."""
        query_model = self.new_model.encoder_id if calibrated else None
        return self.new.search(queries, k, space=self.new_model.space, query_model=query_model)

    def _search_old(self, queries: np.ndarray, k: int, calibrated: bool = True) -> list[list[Hit]]:
        """The compatible model against the old gallery: the gallery's NNN calibration applies when it was made
        for the compatible model (as outside a migration), unless the scores feed the score merge, whose
        calibration was fitted on plain inner products."""
        query_model = self.compat_model.encoder_id if calibrated else None
        return self.old.search(queries, k, space=self.compat_model.space, query_model=query_model)

    def _search(self, modality: str, inputs: Sequence[Any], k: int) -> list[list[Hit]]:
        new_q = self._encode(self.new_model, modality, inputs)
        if self.migration.cut_over_done:
            return self._search_new(new_q, k)
        old_q = self._encode(self.compat_model, modality, inputs)
        cal = self.calibration
        if cal is not None and cal.query_modality in ("", modality):
            return self._search_by_score(old_q, new_q, k)
        old_hits = self._search_old(old_q, k)
        out = []
        for q, hits in enumerate(old_hits):
            ids = [h.id for h in hits]
            done = self.new.present(ids)
            n_slots = sum(i in done for i in ids)
            new_hits = self._search_new(new_q[q : q + 1], n_slots)[0] if n_slots else []
            out.append(self._merged(hits, done, new_hits, None))
        return out

    def _search_by_score(self, old_q: np.ndarray, new_q: np.ndarray, k: int) -> list[list[Hit]]:
        new_hits = self._search_new(new_q, k, calibrated=False) if len(self.new) else [[] for _ in old_q]
        size, depth = len(self.old), k
        while True:
            old_hits = self._search_old(old_q, depth, calibrated=False)
            done = [self.new.present([h.id for h in hits]) for hits in old_hits]
            short = any(sum(h.id not in d for h in hits) < k for hits, d in zip(old_hits, done))
            if not short or depth >= min(size, MAX_OLD_DEPTH):
                break
            depth = min(size, MAX_OLD_DEPTH, depth * 4)
        return [self._merged(hits, d, new, self.calibration)[:k] for hits, d, new in zip(old_hits, done, new_hits)]

    @staticmethod
    def _merged(old_hits: list[Hit], done: set[str], new_hits: list[Hit], calibration: Any) -> list[Hit]:
        by_id = {h.id: h for h in old_hits} | {h.id: h for h in new_hits}
        merged = merge_rankings([(h.id, h.score) for h in old_hits], done, [(h.id, h.score) for h in new_hits],
                                calibration)
        return [by_id[i] for i, _ in merged]

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
        if keep:  # an upload stored under the old gallery's media/ is copied under the new one's
            self.new.add(new_vecs[keep], [ids[j] for j in keep], adopt_media([payloads[j] for j in keep], self.old, self.new),
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
            "migration": {"status": state["status"], "position": state["position"], "plan_size": state["plan_size"],
                          "merge": self.migration.merge},
            "nnn": self._nnn_status(),
        }

    def _nnn_status(self) -> dict[str, Any]:
        """Whether the old gallery's NNN calibration applies to the searches served now, and why."""
        if self.migration.cut_over_done:
            return calibration_status(self.new.calibration, describe_query_model(self.new_model))
        status = calibration_status(self.old.calibration, describe_query_model(self.compat_model))
        if status["applies"] and self.calibration is not None:
            return {"applies": False, "message": "the migration merges by calibrated score, fitted on plain inner"
                    " products: the old gallery's NNN calibration is not applied while it runs"}
        return status

    def close(self) -> None:
        self.old.close()
        self.new.close()
