"""Every method of an evaluation also searched with NNN calibration (xbt.eval.calibration): the +nnn systems.

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

from xbt.compat.model import CompatibleModel
from xbt.data.pairs import Pair
from xbt.errors import InputError
from xbt.eval.calibration import AlphaChoice, calibrate_queries, choose_alpha
from xbt.eval.embed import ExtraEmbeddings, PairEmbeddings, embed_pairs
from xbt.eval.matrix import QueryVectors, evaluate_upgrade
from xbt.eval.runner import EvaluationRun, compatible_queries
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
    bank = compatible_queries(model, bank_pairs, e["new_bank"], e["old_bank"])
    val = compatible_queries(model, val_pairs, e["new_val"], e["old_val"])
    choice = choose_alpha(val, e["old_val"], bank)
    return calibrate_queries(queries, eval_old, bank, choice.alpha, extras=extras), choice


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
