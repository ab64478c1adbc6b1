"""The benefit order of an in-place backfill (issue 26, part 3): which transformed rows to replace first, by the
in-place benefit scorer of `xbt.ranking.inplace_benefit`, chosen on training pairs and saved beside the migration.

    scorer = fit_gallery_benefit(gallery, gmap, old_model, new_model, pairs)   # or load_or_fit_benefit(FOLDER, ...)
    backfill_in_place(gallery, new_model, "benefit", benefit=scorer)

The scorer reads only what a transformed gallery holds: its transformed rows' vectors. It is fitted on training
pairs (never the gallery's evaluated items) embedded by both models, the pairs' old vectors carried by the very
map that made the gallery (its digest must be the one the gallery is stamped with), plus any re-embedded sample
(texts, unlabeled images) for its heads. `load_or_fit_benefit` saves it to a folder on the first run and loads it
on every later one, so a resumed backfill orders by the same scorer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xbt.data.pairs import Pair
from xbt.errors import InputError, SpaceMismatchError
from xbt.embed import embed_images, embed_pairs, embed_texts
from xbt.ranking.inplace_benefit import InplaceBenefitScorer, fit_inplace_benefit
from xbt.ranking.inplace_curve import RowCalibration
from xbt.metrics import image_to_text_positives, text_to_image_positives
from xbt.gallery.base import GalleryBackend
from xbt.gallery.transform import TRANSFORM_META, GalleryMap, provenance_of
from xbt.models.base import VLPModel


def _check_map(gallery: GalleryBackend, gmap: GalleryMap) -> None:
    stamp = gallery.extra.get(TRANSFORM_META)
    if not isinstance(stamp, Mapping):
        raise InputError(f"the gallery at {gallery.path} was not made by `xbt gallery transform`: no in-place benefit order")
    if stamp.get("map") != gmap.digest:
        raise InputError(f"the gallery at {gallery.path} was transformed by map {str(stamp.get('map'))[:12]}"
                         f" ({stamp.get('made_by')}), not by {gmap.digest[:12]} ({gmap.made_by}): the benefit scorer"
                         " must be fitted through the map that made the gallery")
    gmap.new_space.check(gallery.space, f"the gallery at {gallery.path}")


def fit_gallery_benefit(gallery: GalleryBackend, gmap: GalleryMap, old_model: VLPModel, new_model: VLPModel,
                        fit_pairs: Sequence[Pair], *, sample_texts: Sequence[str] = (), sample_images: Sequence[str] = (),
                        calibration: RowCalibration | None = None, seed: int = 0,
                        show_progress: bool = False) -> InplaceBenefitScorer:
    """The in-place benefit scorer of `gallery` (a transformed gallery, made by `gmap`), chosen on `fit_pairs`
    embedded by both models; the heads also learn from `sample_texts` (a caption gallery) or `sample_images` (an
    image gallery) embedded by both."""
    _check_map(gallery, gmap)
    gmap.old_space.check(old_model.space, "the old model (it must be the model of the gallery's source)")
    new_model.space.check(gmap.new_space, "the new model")
    if not fit_pairs:
        raise InputError("the in-place benefit order is chosen on training pairs: give some (never the gallery's items)")
    old, new = embed_pairs(old_model, fit_pairs, show_progress), embed_pairs(new_model, fit_pairs, show_progress)
    index = list(old.caption_image_index)
    sample_t = sample_n = None
    if gallery.modality == "text":
        transformed, native, queries = gmap.apply(old.texts), new.texts, new.images
        positives = image_to_text_positives(index, len(old.images))
        if sample_texts:
            sample_t = gmap.apply(embed_texts(old_model, sample_texts, show_progress))
            sample_n = embed_texts(new_model, sample_texts, show_progress)
    else:
        transformed, native, queries = gmap.apply(old.images), new.images, new.texts
        positives = text_to_image_positives(index)
        if sample_images:
            unlabeled = [Pair(image=str(p), caption="", image_id=str(p)) for p in sample_images]
            sample_t = gmap.apply(embed_images(old_model, unlabeled, show_progress))
            sample_n = embed_images(new_model, unlabeled, show_progress)
    scorer = fit_inplace_benefit(transformed, native, queries, positives, sample_t, sample_n, seed=seed,
                                 space_id=gallery.space.id, calibration=calibration)
    scorer.fit_report["map"] = gmap.digest
    return scorer


def load_or_fit_benefit(folder: str | Path, gallery: GalleryBackend, fit: Any = None) -> InplaceBenefitScorer:
    """The scorer saved in `folder`, or, when there is none yet, `fit()` (e.g. a lambda around
    `fit_gallery_benefit`) saved there first. A saved scorer must be for the gallery's space and map."""
    folder = Path(folder)
    if (folder / "scorer.json").exists():
        scorer = InplaceBenefitScorer.load(folder)
    else:
        if fit is None:
            raise InputError(f"no in-place benefit scorer at {folder} yet: fit one (on the command line give --compat,"
                             " --old-model and --fit-pairs)")
        scorer = fit()
        scorer.save(folder)
    if scorer.space_id not in (None, gallery.space.id):
        raise SpaceMismatchError(f"the benefit scorer at {folder} was fitted for {scorer.space_id}, the gallery lives in"
                                 f" {gallery.space.id}")
    stamp = gallery.extra.get(TRANSFORM_META)
    made = stamp.get("map") if isinstance(stamp, Mapping) else None
    if scorer.fit_report.get("map") not in (None, made):
        raise InputError(f"the benefit scorer at {folder} was fitted through map {str(scorer.fit_report['map'])[:12]};"
                         f" the gallery was transformed by {str(made)[:12]}")
    return scorer


def benefit_plan(gallery: GalleryBackend, scorer: InplaceBenefitScorer, batch: int = 4096) -> list[str]:
    """The ids of the gallery's rows still transformed, the largest estimated benefit first (native rows are done:
    left out). One pass over the payloads, then the transformed rows' vectors in batches. Limit: the vectors are
    scored together in memory (and density@k / confusion-own compare every row with every other), which suits
    galleries of up to some hundred thousand rows on a CPU (density@k over n rows costs n^2 x dim); larger ones
    need the scorer run per shard (not built)."""
    ids = [i for i, payload, _added in gallery.iter_items(batch) if provenance_of(payload) == "transformed"]
    if not ids:
        return []
    vectors: list[np.ndarray[Any, Any]] = []
    kept: list[str] = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        stored = gallery.get(chunk, with_vectors=True)
        for i in chunk:
            if i in stored:  # deleted meanwhile: gone
                kept.append(i)
                vectors.append(np.asarray(stored[i]["vector"], dtype=np.float32))
    if not kept:
        return []
    return [kept[int(r)] for r in scorer.order(np.stack(vectors))]


def inplace_benefit_from_specs(gallery: GalleryBackend, folder: str | Path | None, new_model: VLPModel, load: Any,
                               compat: str | None, old_model: str | None, fit_pairs: str | None) -> InplaceBenefitScorer:
    """What `xbt gallery backfill --in-place --order benefit` runs: the scorer saved in `folder`, or fitted there
    through the transposed query map of `compat` (the map `xbt gallery transform --compat` made the gallery with)
    on the pairs `fit_pairs` (any source `xbt evaluate` reads) embedded by `old_model` and `new_model`. `load`:
    spec -> model."""
    if folder is None:
        raise InputError("--order benefit in place keeps its scorer in a folder: give --benefit-scorer DIR")

    def fit() -> InplaceBenefitScorer:
        from xbt.data.datasets import open_dataset
        from xbt.gallery.transform import query_tower, transposed_query_map

        missing = [flag for flag, value in (("--compat", compat), ("--old-model", old_model), ("--fit-pairs", fit_pairs))
                   if not value]
        if missing or fit_pairs is None:
            raise InputError(f"the in-place benefit scorer is fitted on training pairs through the gallery's map: give"
                             f" {', '.join(missing)}")
        gmap = transposed_query_map(load(compat), query_tower(gallery.modality))
        return fit_gallery_benefit(gallery, gmap, load(old_model), new_model, open_dataset(fit_pairs), show_progress=True)

    return load_or_fit_benefit(folder, gallery, fit)
