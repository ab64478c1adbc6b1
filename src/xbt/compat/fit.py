"""Fitting one peer from models and data: embed the training data (through the feature cache), fit in
closed form (or in seconds), and return the deployable compatible model.

    model = fit_peer("procrustes-both", old, new, fit_texts=corpus, fit_pairs=pairs)
    model.save_pretrained("runs/procrustes")      # loads as compat:runs/procrustes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xbt.compat.base import FitData
from xbt.compat.model import CompatibleModel
from xbt.compat.registry import build_method
from xbt.data.pairs import Pair
from xbt.embed import PairEmbeddings, embed_images, embed_pairs, embed_texts
from xbt.models.base import VLPModel


def fit_image_items(fit_pairs: Sequence[Pair], fit_images: Sequence[Pair] = ()) -> list[Pair]:
    """The distinct images the image-side fits use: the training pairs' images, then the unlabeled images
    (`fit_images`: any source's items, captions ignored) not already among them, by file."""
    seen = {p.image for p in fit_pairs}
    extra = []
    for p in fit_images:
        if p.image not in seen:
            seen.add(p.image)
            extra.append(Pair(p.image, p.caption, f"fit-image:{p.image}"))  # ids of two sources never collide
    return [*fit_pairs, *extra]


def fit_data(
    old_model: VLPModel,
    new_model: VLPModel,
    fit_texts: Sequence[str],
    fit_pairs: Sequence[Pair],
    support: tuple[PairEmbeddings, PairEmbeddings] | None,
    show_progress: bool = False,
    fit_images: Sequence[Pair] = (),
    extra: FitData | None = None,
) -> FitData:
    """Paired training embeddings: every text of the corpus and of the training pairs (deduplicated) by
    both models, and every image of the training pairs and of `fit_images` (unlabeled: their captions are
    not used) by both models. Neither side needs a caption-image pair: the text-side fits use texts, the
    image-side fits images. `extra`: pairs of vectors both models made already (e.g. a gallery's stored vectors
    and the new model's of the same items, `xbt.scale.sample`), appended to each side they hold."""
    texts = list(dict.fromkeys([*fit_texts, *(p.caption for p in fit_pairs)]))
    data = FitData(
        new_text=embed_texts(new_model, texts, show_progress), old_text=embed_texts(old_model, texts, show_progress),
        support=support,
    )
    images = fit_image_items(fit_pairs, fit_images)
    if images:
        data.new_image = embed_images(new_model, images, show_progress)
        data.old_image = embed_images(old_model, images, show_progress)
    if extra is not None:
        data.new_text = np.concatenate([data.new_text.reshape(-1, new_model.space.dim), extra.new_text])
        data.old_text = np.concatenate([data.old_text.reshape(-1, old_model.space.dim), extra.old_text])
        if extra.new_image is not None and extra.old_image is not None:
            have = data.new_image is not None and data.old_image is not None
            data.new_image = np.concatenate([data.new_image, extra.new_image]) if have else extra.new_image
            data.old_image = np.concatenate([data.old_image, extra.old_image]) if have else extra.old_image
    return data


def fit_peer(
    name: str,
    old_model: VLPModel,
    new_model: VLPModel,
    fit_texts: Sequence[str] = (),
    fit_pairs: Sequence[Pair] = (),
    support_pairs: Sequence[Pair] | None = None,
    show_progress: bool = False,
    fit_images: Sequence[Pair] = (),
    extra: FitData | None = None,
    **options: Any,
) -> CompatibleModel:
    """The peer `name` (a registry name) fitted on the training data (+ unlabeled `fit_images`, + `extra`
    vectors both models made already), around the frozen new model."""
    method = build_method(name, new_model.space, old_model.space, **options)
    support = None
    if support_pairs:
        support = (embed_pairs(new_model, support_pairs, show_progress), embed_pairs(old_model, support_pairs, show_progress))
    method.fit(fit_data(old_model, new_model, fit_texts, fit_pairs, support, show_progress, fit_images, extra))
    return method.to_model(new_model, old_model if method.needs_old_model_at_query_time else None)
