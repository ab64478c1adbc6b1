"""XBT with the old model's query, for teams that keep the old encoder online (what SLERP assumes).

A trained XBT model (or any map-only compatible model) is turned, post hoc and without training, into an
ensemble: every query is encoded by both models and

    q = normalize((1 - w) normalize(P(new(x))) + w old(x))      w = 0: XBT alone; w = 1: the old model alone

with its own map kind (`maps.OldQueryBlend`), saved and loaded as any compatible model (xbt.compat/3,
sha256 of every weight file; the old model's spec is recorded, as SLERP's is). The weight is chosen on a
val split, never on evaluation queries, by the score SLERP's weight is chosen by (`compat.support`).

    w, scores = choose_old_query_weight(xbt, old, val_pairs)
    ensemble = with_old_query(xbt, old, w)          # needs_old_model_at_query_time is True
    ensemble.save_pretrained("runs/xbt-old-query")  # loads as compat:runs/xbt-old-query
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xbt.compat.maps import OldQueryBlend
from xbt.compat.model import CompatibleModel
from xbt.compat.support import best_setting, l2_normalise, rounded, support_score
from xbt.data.pairs import Pair
from xbt.errors import InputError
from xbt.embed import embed_pairs
from xbt.metrics import DEFAULT_KS
from xbt.models.base import VLPModel

DEFAULT_OLD_QUERY_WEIGHTS = tuple(float(w) for w in np.round(np.linspace(0, 1, 21), 2))


def blend_arrays(mapped: np.ndarray, old: np.ndarray, weight: float) -> np.ndarray:
    """What the blend computes, on vectors the two models already produced (NumPy)."""
    mapped, old = l2_normalise(np.asarray(mapped, dtype=np.float32)), l2_normalise(np.asarray(old, dtype=np.float32))
    return l2_normalise((1 - weight) * mapped + weight * old)


def _check(model: CompatibleModel, old_model: VLPModel) -> None:
    if not isinstance(model, CompatibleModel):
        raise InputError("with_old_query takes a compatible model (xbt train's output, loaded with load_model('compat:DIR'))")
    if model.needs_old_model_at_query_time:
        raise InputError(f"{model.method} already needs the old model at query time; blend a map-only model (XBT)")
    model.old_space.check(old_model.space, "the old model given to with_old_query")


def with_old_query(model: CompatibleModel, old_model: VLPModel, weight: float) -> CompatibleModel:
    """The ensemble of `model` (e.g. a trained XBT) and the old model's own query, with old-query weight `weight`.
    It shares `model`'s new model, adapters and projection (no copy, no training); save it to deploy it."""
    _check(model, old_model)
    blends = {m: OldQueryBlend(m.in_dim, m.out_dim, weight, m) for m in dict.fromkeys(model.query_maps().values())}
    maps = {tower: blends[m] for tower, m in model.query_maps().items()}  # a shared map: one shared blend
    ensemble = CompatibleModel(model.new_model, maps, model.old_space, model.new_spec, old_model=old_model,
                               method=f"{model.method}+old-query")
    ensemble.new_space_at_training = model.new_space_at_training
    ensemble.lora_configs = dict(model.lora_configs)  # the adapters live in the shared new model
    details = {"old_query_weight": float(weight), "blended": model.spec or model.method}
    ensemble.provenance = {**{k: v for k, v in model.provenance.items() if k != "details"},
                           "details": {**model.provenance.get("details", {}), **details}}
    if "_placement" in vars(model):
        object.__setattr__(ensemble, "_placement", model.placement)
    return ensemble


def choose_old_query_weight(
    model: CompatibleModel,
    old_model: VLPModel,
    val_pairs: Sequence[Pair],
    weights: Sequence[float] = DEFAULT_OLD_QUERY_WEIGHTS,
    ks: Sequence[int] = DEFAULT_KS,
    show_progress: bool = False,
) -> tuple[float, dict[float, float]]:
    """The old-query weight with the best mean Recall@ks over both directions of the val pairs (queries of
    the blend against the val items' old gallery), and every weight's score. Ties go to the smaller weight
    (as good on val, and less of the old model). Give val pairs only, never evaluation pairs."""
    _check(model, old_model)
    if len(val_pairs) < 2:
        raise InputError("choosing the old-query weight needs at least 2 val pairs")
    if not weights or any(not 0 <= w <= 1 for w in weights):
        raise InputError(f"old-query weights must lie in [0, 1], got {list(weights)}")
    mapped = embed_pairs(model, val_pairs, show_progress)
    old = embed_pairs(old_model, val_pairs, show_progress)
    scores = {float(w): support_score(lambda x, o, w=w: blend_arrays(x, o, w), mapped, old, ks) for w in weights}
    return best_setting(scores, prefer="smaller"), scores


def fit_old_query(model: CompatibleModel, old_model: VLPModel, val_pairs: Sequence[Pair],
                  weights: Sequence[float] = DEFAULT_OLD_QUERY_WEIGHTS, show_progress: bool = False) -> CompatibleModel:
    """`with_old_query` at the weight `choose_old_query_weight` picks on the val pairs (scores recorded)."""
    weight, scores = choose_old_query_weight(model, old_model, val_pairs, weights, show_progress=show_progress)
    ensemble = with_old_query(model, old_model, weight)
    ensemble.provenance["details"]["val_scores"] = rounded(scores)
    ensemble.provenance["fits_on"] = "the blended model's training data; weight on the val split"
    return ensemble
