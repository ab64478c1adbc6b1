"""Backfill in place (issue 26, part 2): in a gallery `xbt gallery transform` made, each transformed row is
replaced by its native vector (the new model's embedding of the item), same id, payload without the
transformed mark. The gallery stays in one space and is searched by native new-model queries throughout,
so there is no second gallery, no merge rule and no cut-over: a backfilled item simply gets its exact vector.

Kill-safe and resumable without a state file: each batch is one `add(..., on_conflict="update")` (the
embedded store deletes and adds in one transaction; Milvus upserts), so a row is either transformed or
native, never absent; a rerun computes the order again and skips the rows already native. "update"
replaces only the rows still stored when the write happens: a row another writer deletes while its batch
is being re-embedded stays deleted (on the embedded store across processes, inside the write's
transaction; on Milvus within this process, as for every Milvus write).

The `benefit` order is the in-place one (`xbt.gallery.inplace_benefit`: a scorer of the transformed rows'
vectors, chosen on training pairs, `benefit=`); the query-side migration's benefit scorer reads old-space
vectors, which a transformed gallery no longer holds. On a rerun the benefit plan is computed again over the
rows still transformed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xbt.errors import InputError
from xbt.ranking.inplace_benefit import InplaceBenefitScorer
from xbt.gallery.base import GalleryBackend
from xbt.gallery.ingest import GalleryItem, embed_items
from xbt.gallery.inplace_benefit import benefit_plan
from xbt.gallery.migration import order_ids
from xbt.gallery.transform import PROVENANCE_KEY, TRANSFORM_META, provenance_of, transform_status
from xbt.models.base import VLPModel
from xbt.progress import progress_bar


def backfill_in_place(gallery: GalleryBackend, model: VLPModel, order: str | Sequence[str] = "oldest", *,
                      batch_size: int = 64, max_items: int | None = None, show_progress: bool = False,
                      benefit: InplaceBenefitScorer | None = None) -> dict[str, Any]:
    """Replace the transformed rows of `gallery` by `model`'s (the new model's) vectors of their items, in
    `order` (oldest, newest, id, field:NAME, -field:NAME, benefit with `benefit` the in-place scorer, or a list
    of ids first); at most `max_items` this run. Returns how many were replaced, those that could not be
    embedded, and the rows still transformed."""
    if not isinstance(gallery.extra.get(TRANSFORM_META), dict):
        raise InputError(f"the gallery at {gallery.path} was not made by `xbt gallery transform`; backfill it into a new"
                         " gallery with `xbt gallery backfill --state DIR --gallery ...`, or transform it first")
    gallery.space.check(model.space, "the in-place backfill's model (give the new model the gallery was transformed for)")
    if order == "benefit" and benefit is None:
        raise InputError("the in-place benefit order needs its scorer (xbt.gallery.inplace_benefit.fit_gallery_benefit,"
                         " chosen on training pairs; on the command line --benefit-scorer DIR with --compat, --old-model"
                         " and --fit-pairs); or use oldest, newest, id, field:NAME, -field:NAME or @FILE of ids")
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    modality = gallery.modality or "image"
    plan = benefit_plan(gallery, benefit) if order == "benefit" and benefit is not None else order_ids(gallery, order)
    replaced, failed = 0, dict[str, str]()
    with progress_bar(len(plan), "backfill in place", show_progress) as advance:
        for start in range(0, len(plan), batch_size):
            if max_items is not None and replaced >= max_items:
                break
            chunk = plan[start : start + batch_size]
            stored = gallery.get(chunk)  # ids deleted meanwhile are simply gone
            items = [GalleryItem(i, stored[i]["payload"]) for i in chunk
                     if i in stored and provenance_of(stored[i]["payload"]) == "transformed"]
            if max_items is not None:
                items = items[: max_items - replaced]
            good, vectors, bad = embed_items(model, items, modality, batch_size)
            failed.update(bad)
            if good:
                native = [{k: v for k, v in it.payload.items() if k != PROVENANCE_KEY} for it in good]
                replaced += len(gallery.add(vectors, [it.id for it in good], native, space=model.space,
                                            on_conflict="update"))
            advance(len(chunk))
    return {"replaced": replaced, "failed": failed, **(transform_status(gallery) or {})}
