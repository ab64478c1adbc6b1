"""A compatible model's queries of a pair set, per tower, in the old space: what every evaluation, NNN bank
and backfill-order fit searches the old gallery with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xbt.compat.model import CompatibleModel
from xbt.data.pairs import Pair
from xbt.embed import PairEmbeddings, QueryVectors, embed_images, embed_texts


def compatible_queries(
    model: CompatibleModel, pairs: Sequence[Pair], new_eval: PairEmbeddings, old_eval: PairEmbeddings,
    show_progress: bool = False,
) -> QueryVectors:
    """A compatible model's queries of `pairs`, per tower: where it runs the very new model of `new_eval`
    unadapted (every peer; XBT's image tower when only its text tower has LoRA), the cached features are
    mapped; elsewhere it encodes (cached under its `encoder_id`, which differs from the old model's although
    both declare the old space)."""
    ensemble = model.needs_old_model_at_query_time

    def mapped(tower: str) -> np.ndarray:
        new_vecs, old_vecs = (new_eval.images, old_eval.images) if tower == "image" else (new_eval.texts, old_eval.texts)
        return model.map_features(new_vecs, old_vecs if ensemble else None, tower=tower)

    images = mapped("image") if model.runs_unadapted("image", new_eval.space) else embed_images(model, pairs, show_progress)
    texts = (mapped("text") if model.runs_unadapted("text", new_eval.space)
             else embed_texts(model, [p.caption for p in pairs], show_progress))
    return QueryVectors(images=images, texts=texts, space=model.space)
