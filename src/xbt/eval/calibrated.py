"""Every method of an evaluation also searched with NNN calibration (xbt.ranking.nnn): the +nnn systems.

    choices = add_calibrated(run, old_model, new_model, bank_pairs=train_pairs, val_pairs=val_pairs)
    run.matrix.methods["procrustes-gallery+nnn"]   # beside "procrustes-gallery", paired on the same queries

For each method: the bank is that method's own queries of the training pairs, NNN's weight is chosen per
direction on the val pairs (their queries against their own old gallery), and the evaluation queries are
searched against the old gallery with each item's bias. Nothing is chosen on evaluation queries. A
calibrated system deploys as its method's compatible model plus `xbt gallery calibrate` on the old gallery
with the same bank and weight (`calibration_commands`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from xbt.compat.model import CompatibleModel
from xbt.data.pairs import Pair, unique_images
from xbt.errors import InputError
from xbt.ranking.nnn import DEFAULT_K, AlphaChoice, calibrate_queries, choose_alpha
from xbt.embed import ExtraEmbeddings, PairEmbeddings, caption_image_index, embed_images, embed_pairs, embed_texts
from xbt.embed import DIRECTIONS, QueryVectors
from xbt.eval.matrix import evaluate_upgrade
from xbt.eval.runner import EvaluationRun
from xbt.compat.queries import compatible_queries
from xbt.models.base import VLPModel

CALIBRATED = "+nnn"


def calibrated_queries(model: CompatibleModel, queries: QueryVectors, eval_old: PairEmbeddings, old: VLPModel,
                       new: VLPModel, bank_pairs: Sequence[Pair], val_pairs: Sequence[Pair],
                       embedded: dict[str, PairEmbeddings] | None = None,
                       extras: ExtraEmbeddings | None = None) -> tuple[QueryVectors, AlphaChoice]:
    """`queries` (the model's evaluation queries) with the NNN bias of the old gallery `eval_old`: the bank is
    the model's queries of `bank_pairs` (training pairs), alpha chosen per direction on `val_pairs`.
    `embedded`: the new and old models' embeddings of both pair sets when already computed (`_embedded`).
    `extras`: the old model's gallery extras, calibrated with the same bank and alpha (never chosen on them)."""
    if not bank_pairs or len(val_pairs) < 2:
        raise InputError("NNN calibration needs training pairs (the bank of queries) and at least 2 val pairs (alpha)")
    e = embedded or _embedded(old, new, bank_pairs, val_pairs)
    bank, choice = bank_and_alpha(model, old, bank_pairs, val_pairs, features=e)
    return calibrate_queries(queries, eval_old, bank, choice.alpha, extras=extras), choice


def bank_and_alpha(query_model: VLPModel, gallery_model: VLPModel, bank_pairs: Sequence[Pair], val_pairs: Sequence[Pair],
                   directions: Sequence[str] = DIRECTIONS, k: int = DEFAULT_K,
                   features: dict[str, PairEmbeddings] | None = None,
                   show_progress: bool = False) -> tuple[QueryVectors, AlphaChoice]:
    """NNN's bank and weight, as the evaluation and `xbt gallery calibrate --val` both choose them: the bank is
    the query model's queries of `bank_pairs` (training pairs); alpha is chosen per direction on `val_pairs`,
    the query model's val queries searching the val split's own gallery (the gallery model's embeddings of the
    same pairs). `features`: the new and gallery models' embeddings of both pair sets (`_embedded`), for a
    compatible query model (its unadapted towers then map cached features); without them only the sides the
    `directions` use are encoded (t2i: captions as queries, images as the gallery; i2t the other way)."""
    if features is not None:
        bank = compatible_queries(query_model, bank_pairs, features["new_bank"], features["old_bank"])
        val = compatible_queries(query_model, val_pairs, features["new_val"], features["old_val"])
        val_gallery = features["old_val"]
    else:
        bank = query_vectors(query_model, bank_pairs, directions, show_progress)
        val = query_vectors(query_model, val_pairs, directions)
        images, texts = _sides(gallery_model, val_pairs, images="t2i" in directions, texts="i2t" in directions)
        val_gallery = PairEmbeddings(images, texts, caption_image_index(val_pairs), gallery_model.space)
    return bank, choose_alpha(val, val_gallery, bank, k=k, directions=directions)


def query_vectors(model: VLPModel, pairs: Sequence[Pair], directions: Sequence[str] = DIRECTIONS,
                  show_progress: bool = False) -> QueryVectors:
    """A query model's queries of `pairs` for the directions asked (t2i: the captions, i2t: the distinct
    images); a side no direction uses is left as zeros of its shape, never encoded."""
    images, texts = _sides(model, pairs, images="i2t" in directions, texts="t2i" in directions, show_progress=show_progress)
    return QueryVectors(images, texts, model.space)


def _sides(model: VLPModel, pairs: Sequence[Pair], images: bool, texts: bool,
           show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    dim = model.space.dim
    return (embed_images(model, pairs, show_progress) if images else np.zeros((len(unique_images(pairs)), dim), np.float32),
            embed_texts(model, [p.caption for p in pairs], show_progress) if texts else np.zeros((len(pairs), dim), np.float32))


def gallery_bank(query_model: VLPModel, modality: str, bank_pairs: Sequence[Pair], *, alpha: float | None = None,
                 val_pairs: Sequence[Pair] | None = None, gallery_model: VLPModel | None = None, k: int = DEFAULT_K,
                 show_progress: bool = False) -> tuple[np.ndarray, float, AlphaChoice | None]:
    """What `xbt gallery calibrate` stores in a gallery of `modality` (image: searched by text queries; text: by
    image queries) for one query model: the bank (its queries of `bank_pairs`), and the weight, given as
    `alpha` or chosen on `val_pairs` against their gallery by `gallery_model` (`bank_and_alpha`).
    Returns (bank vectors, alpha, the choice or None)."""
    if modality not in ("image", "text"):
        raise InputError("calibration needs an image or a caption gallery; this one has no modality")
    direction = "t2i" if modality == "image" else "i2t"
    chosen = None
    if val_pairs is None or gallery_model is None:
        if alpha is None:
            raise InputError("give alpha, or val pairs and the gallery's own model to choose it on")
        bank = query_vectors(query_model, bank_pairs, [direction], show_progress)
    else:
        bank, chosen = bank_and_alpha(query_model, gallery_model, bank_pairs, val_pairs, [direction], k,
                                      show_progress=show_progress)
        alpha = chosen.alpha[direction]
    return (bank.texts if direction == "t2i" else bank.images), float(alpha), chosen


def _embedded(old: VLPModel, new: VLPModel, bank_pairs: Sequence[Pair], val_pairs: Sequence[Pair]) -> dict[str, PairEmbeddings]:
    return {"new_bank": embed_pairs(new, bank_pairs), "old_bank": embed_pairs(old, bank_pairs),
            "new_val": embed_pairs(new, val_pairs), "old_val": embed_pairs(old, val_pairs)}


def add_calibrated(run: EvaluationRun, old: VLPModel, new: VLPModel, bank_pairs: Sequence[Pair],
                   val_pairs: Sequence[Pair], methods: Sequence[str] | None = None) -> dict[str, AlphaChoice]:
    """Add NAME+nnn beside every (or each listed) method of `run`: its queries, a record (derived from the
    method's, with the weight chosen) and the matrix recomputed over all systems, paired on the same
    queries with the run's own bootstrap settings. Returns {NAME+nnn: the alpha choice}."""
    names = [n for n in (methods if methods is not None else list(run.compatible)) if not n.endswith(CALIBRATED)]
    if not bank_pairs or len(val_pairs) < 2:
        raise InputError("NNN calibration needs training pairs (the bank of queries) and at least 2 val pairs (alpha)")
    embedded = _embedded(old, new, bank_pairs, val_pairs)  # once for every method: each maps the same features
    choices: dict[str, AlphaChoice] = {}
    for name in names:
        calibrated, choice = calibrated_queries(run.compatible[name], run.queries[name], run.embeddings["old"], old,
                                                new, bank_pairs, val_pairs, embedded, run.extras.get("old"))
        derived = name + CALIBRATED
        run.queries[derived] = calibrated
        run.compatible[derived] = run.compatible[name]  # the same model; the gallery carries the calibration
        base = run.methods[name]
        run.methods[derived] = replace(
            base, name=derived, fits_on=f"{base.fits_on}; NNN calibration: bank of {len(bank_pairs)} training queries,"
                                        " alpha on the val split",
            cost_note=base.cost_note + "; each gallery item carries an NNN bias (one extra dimension)",
            details=base.details | {"derived_from": name, "calibration": choice.to_dict()},
        )
        choices[derived] = choice
    protocol = run.protocol
    matrix = evaluate_upgrade(run.embeddings["old"], run.embeddings["new"], run.queries, protocol["ks"],
                              protocol["n_resamples"], protocol["seed"], run.extras.get("old"), run.extras.get("new"))
    matrix.method_info = {n: r.to_dict() for n, r in run.methods.items()}
    run.matrix = matrix
    return choices


def calibration_commands(spec: str, old_images: Any, old_captions: Any, bank_source: str, alpha: dict[str, float]) -> list[str]:
    """The commands that calibrate the old galleries for `spec` as the evaluation did (same bank, same alpha)."""
    return [
        f"xbt gallery calibrate --gallery {old_images} --model {spec} --queries {bank_source} --alpha {alpha['t2i']:g}",
        f"xbt gallery calibrate --gallery {old_captions} --model {spec} --queries {bank_source} --alpha {alpha['i2t']:g}",
    ]
