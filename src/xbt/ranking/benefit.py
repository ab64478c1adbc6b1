"""Which gallery items to backfill first: an estimate, per item, of how much re-embedding it with the new
model buys, computed without the new model's embeddings of the gallery (the expensive part being saved).

What the estimate may use: the old gallery's own vectors, the compatible model's queries (old space) of
a bank of training queries, and training pairs on which both models' embeddings exist. What it may not
use: the new model's embeddings of the gallery items, or the queries being evaluated.

Why an item's re-embedding helps (the rank-slot merge, `xbt.ranking.merge.slot_merge`): a query
whose compatible-model top result t is wrong gains at R@1 only once t *and* its true item p are both
backfilled (t's slot is refilled by the new model's best backfilled item, which must then be p). A
random order therefore reaches most of the gain late (both of two items must be in: about f^2 at fraction
f). The items worth doing first are those in regions where the old space confuses items: there the
compatible query lands on a neighbour, and backfilling the region together puts both t and p in. Under
the calibrated score merge (`xbt.ranking.merge.score_merge`) the coupling is gone: a query gains
once its own item p is backfilled (and the new model is sure of it), so an item's benefit is its own
queries' gain; `fit_benefit(..., calibration=...)` chooses the statistic under that rule.

The candidate statistics (all from the old gallery vectors and the compatible query bank):

    density@k        mean cosine of the item to its k nearest other gallery items (old space): crowding
    hubness@k        how many bank queries have the item in their top k (compatible model, old gallery)
    query-density@k  mean cosine of the item to its k nearest bank queries: where queries land
    density@k+hubness@j   the sum of the two statistics' ranks
    confusion        a small regressor learned on the training pairs (ridge, old gallery vector -> the
                     compatible query that should retrieve it) predicts each item's query; the item's
                     benefit is how far that predicted query prefers another gallery item to it (the
                     margin, negated), and the order backfills that predicted distractor right after it
                     (both items of a would-be gain go in together)
    confusion-own    the same margin, without the distractor: under the score merge a query gains once its
                     own item is backfilled, so the items the compatible model most likely misses go first

`fit_benefit` chooses one on training pairs, never on evaluation items: the training items are dealt into
parts; each part in turn is a small gallery (old and new embeddings known there), the other parts'
compatible queries are its bank, and each candidate's order is scored by the area under its measured R@1
backfill curve (normalised gain, `gain_area`). The candidate with the largest mean area is kept, with the
table it was chosen on (`BenefitScorer.fit_report`). `BenefitScorer.order` then ranks a gallery's items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xbt.errors import InputError, SpaceMismatchError
from xbt.ranking.merge import ScoreCalibration
from xbt.ranking.nnn import top_k_mean

__all__ = [
    "CANDIDATES",
    "BenefitScorer",
    "benefit_order",
    "benefit_statistic",
    "closure_order",
    "confusion",
    "describe_candidates",
    "fit_benefit",
    "fit_benefit_pairs",
    "fit_query_regressor",
    "gain_area",
    "merged_top1_curve",
]

#: The statistics `fit_benefit` chooses among (see the module docstring).
CANDIDATES = ("density@1", "density@3", "density@5", "density@10", "density@20", "hubness@5", "query-density@10",
              "density@10+hubness@5", "confusion", "confusion-own")
#: The statistics that read the query regressor (`fit_query_regressor`).
_REGRESSED = ("confusion", "confusion-own")
#: Ridge penalty of the confusion statistic's query regressor (on unit vectors).
CONFUSION_RIDGE = 0.1
#: The fractions at which `fit_benefit` measures each candidate's curve.
FIT_FRACTIONS = tuple(i / 10 for i in range(11))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(x / np.maximum(norm, 1e-12), dtype=np.float32)


def density(gallery: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine to the k nearest *other* gallery items (exact, blockwise: O(n^2 d) time, bounded memory)."""
    return top_k_mean(gallery, gallery, k, exclude_self=True)


def hubness(gallery: np.ndarray, bank: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """How many bank queries have each gallery item in their top k."""
    n = len(gallery)
    counts = np.zeros(n)
    k = min(k, n)
    for start in range(0, len(bank), block):
        sims = bank[start : start + block] @ gallery.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(sims), 1))
        counts += np.bincount(top.ravel(), minlength=n)
    return counts


def _querydensity(gallery: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Mean similarity to the k nearest bank queries: NNN's statistic (`xbt.ranking.nnn.top_k_mean`)."""
    return top_k_mean(gallery, bank, k)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks in [0, 1) (ties broken by position): the scale-free form two statistics are summed in."""
    return np.argsort(np.argsort(x, kind="stable"), kind="stable") / max(1, len(x))


def _parse(name: str) -> list[tuple[str, int]]:
    if name in _REGRESSED:
        return [(name, 0)]
    parts = []
    for term in name.split("+"):
        kind, _, k = term.partition("@")
        if kind not in ("density", "hubness", "query-density") or not k.isdigit() or int(k) < 1:
            raise InputError(f"unknown benefit statistic {name!r}: use density@K, hubness@K, query-density@K,"
                             " a sum of two (density@10+hubness@5), confusion or confusion-own")
        parts.append((kind, int(k)))
    return parts


def fit_query_regressor(gallery_rows: np.ndarray, queries: np.ndarray, lam: float = CONFUSION_RIDGE) -> np.ndarray:
    """Ridge regression (with a bias row) from an item's old-space vector to the compatible query that should
    retrieve it: (dim + 1, dim)."""
    x = np.hstack([_unit(gallery_rows), np.ones((len(gallery_rows), 1), np.float32)]).astype(np.float64)
    penalty = lam * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(x.T @ x + penalty, x.T @ _unit(queries).astype(np.float64)).astype(np.float32)


def confusion(gallery: np.ndarray, regressor: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(benefit, partner): minus the margin by which each item's predicted query prefers it to the best other
    gallery item, and that other item (the predicted distractor)."""
    gallery = _unit(gallery)
    if regressor.shape != (gallery.shape[1] + 1, gallery.shape[1]):
        raise SpaceMismatchError(f"the confusion regressor is for {regressor.shape[1]}-d vectors, the gallery holds"
                                 f" {gallery.shape[1]}-d ones")
    n = len(gallery)
    benefit, partner = np.zeros(n), np.arange(n)
    if n < 2:
        return benefit, partner
    predicted = _unit(np.hstack([gallery, np.ones((n, 1), np.float32)]) @ regressor)
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = predicted[start:stop] @ gallery.T
        rows = np.arange(stop - start)
        own = sims[rows, np.arange(start, stop)].copy()
        sims[rows, np.arange(start, stop)] = -np.inf
        partner[start:stop] = np.argmax(sims, axis=1)
        benefit[start:stop] = sims[rows, partner[start:stop]] - own
    return benefit, partner


def closure_order(benefit: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Rows by benefit (largest first), each followed at once by its partner unless already placed."""
    placed = np.zeros(len(benefit), dtype=bool)
    order: list[int] = []
    for i in np.argsort(-benefit, kind="stable"):
        for j in (int(i), int(partner[i])):
            if not placed[j]:
                placed[j] = True
                order.append(j)
    return np.asarray(order, dtype=np.int64)


def benefit_statistic(name: str, gallery: np.ndarray, bank: np.ndarray | None = None,
                      regressor: np.ndarray | None = None) -> np.ndarray:
    """The statistic `name` (see CANDIDATES) of every row of `gallery` (old-space vectors); `bank`: the
    compatible model's queries (old space), needed by hubness and query-density; `regressor`
    (`fit_query_regressor`), needed by confusion. Larger = backfill sooner."""
    gallery = _unit(gallery)
    parts = _parse(name)
    if parts[0][0] in _REGRESSED:
        if regressor is None:
            raise InputError(f"the benefit statistic {name!r} needs its query regressor (fit_query_regressor)")
        return confusion(gallery, regressor)[0]
    values = []
    for kind, k in parts:
        if kind == "density":
            values.append(density(gallery, k))
            continue
        if bank is None or len(bank) == 0:
            raise InputError(f"the benefit statistic {name!r} needs a bank of compatible queries (training queries"
                             " through the compatible model); none was given")
        b = _unit(bank)
        if b.shape[1] != gallery.shape[1]:
            raise SpaceMismatchError(f"the query bank has dimension {b.shape[1]}, the gallery {gallery.shape[1]}")
        values.append(hubness(gallery, b, k) if kind == "hubness" else _querydensity(gallery, b, k))
    if len(values) == 1:
        return values[0].astype(np.float64)
    return np.asarray(np.sum([_ranks(v) for v in values], axis=0), dtype=np.float64)


def benefit_order(name: str, gallery: np.ndarray, bank: np.ndarray | None = None,
                  regressor: np.ndarray | None = None) -> np.ndarray:
    """The rows of `gallery` in the order of statistic `name`, largest first (confusion: with closure)."""
    if name == "confusion":
        if regressor is None:
            raise InputError("the benefit statistic 'confusion' needs its query regressor (fit_query_regressor)")
        return closure_order(*confusion(gallery, regressor))
    return np.argsort(-benefit_statistic(name, gallery, bank, regressor), kind="stable")


# --------------------------------------------------------------------------------------------------
# measuring an order (R@1 of the rank-slot merge, vectorised)
# --------------------------------------------------------------------------------------------------
def merged_top1_curve(old_gallery: np.ndarray, new_gallery: np.ndarray, compat_queries: np.ndarray,
                      new_queries: np.ndarray, positives: Sequence[Sequence[int]], order: np.ndarray,
                      fractions: Sequence[float] = FIT_FRACTIONS,
                      calibration: ScoreCalibration | None = None) -> np.ndarray:
    """R@1 (in [0, 1]) of the merged search at each fraction backfilled in `order`, the rule of
    `xbt.ranking.merge.merge_rankings` at depth 1 without its Python loop (`backfill_curve` gives all
    K). Without a calibration (the rank-slot rule) the merged top result is the compatible model's top t
    unless t is backfilled; then it is the new model's best backfilled item. With one (the score rule) it
    is the item of largest calibrated log-odds: new-space scores for backfilled items, old-space scores for
    the others."""
    n, n_q = len(old_gallery), len(compat_queries)
    pos = np.zeros((n_q, n), dtype=bool)
    for q, p in enumerate(positives):
        pos[q, list(p)] = True
    rank = np.empty(n, dtype=np.int64)
    rank[np.asarray(order)] = np.arange(n)
    old_scores = compat_queries @ old_gallery.T
    t = np.argmax(old_scores, axis=1)
    new_scores = new_queries @ new_gallery.T
    rows = np.arange(n_q)
    out = []
    if calibration is not None:
        old_logit, new_logit = calibration.logit("old", old_scores), calibration.logit("new", new_scores)
        for f in fractions:
            done = rank < round(f * n)
            top = np.argmax(np.where(done[None, :], new_logit, old_logit), axis=1)
            out.append(pos[rows, top].mean())
        return np.asarray(out, dtype=np.float64)
    for f in fractions:
        done = rank < round(f * n)
        if not done.any():
            out.append(pos[rows, t].mean())
            continue
        best_new = np.argmax(np.where(done[None, :], new_scores, -np.inf), axis=1)
        out.append(np.where(done[t], pos[rows, best_new], pos[rows, t]).mean())
    return np.asarray(out, dtype=np.float64)


def gain_area(curve: np.ndarray, fractions: Sequence[float] = FIT_FRACTIONS) -> float:
    """Area under the normalised gain (r(f) - r(0)) / (r(1) - r(0)) over the fraction backfilled: 1 when the
    whole gain comes at once, about 1/2 for a straight line, less for a late order. NaN when there is no gain."""
    curve = np.asarray(curve, dtype=np.float64)
    gain = curve[-1] - curve[0]
    if gain <= 0:
        return float("nan")
    return float(np.trapezoid((curve - curve[0]) / gain, np.asarray(fractions, dtype=np.float64)))


# --------------------------------------------------------------------------------------------------
# the scorer
# --------------------------------------------------------------------------------------------------
@dataclass
class BenefitScorer:
    """A chosen benefit statistic and the compatible query bank it reads. `order(gallery)`: the rows of an
    old-space gallery, the largest estimated benefit first."""

    statistic: str
    bank: np.ndarray | None = None
    space_id: str | None = None
    fit_report: dict[str, Any] = field(default_factory=dict)
    regressor: np.ndarray | None = None

    def __post_init__(self) -> None:
        _parse(self.statistic)
        if self.bank is not None:
            self.bank = _unit(self.bank)

    def score(self, gallery: np.ndarray) -> np.ndarray:
        gallery = np.asarray(gallery, dtype=np.float32)
        if gallery.ndim != 2:
            raise InputError("the gallery vectors must be a (items, dim) array")
        if self.bank is not None and gallery.shape[1] != self.bank.shape[1]:
            raise SpaceMismatchError(f"the benefit scorer was fitted for {self.bank.shape[1]}-d old-space vectors,"
                                     f" the gallery holds {gallery.shape[1]}-d ones")
        return benefit_statistic(self.statistic, gallery, self.bank, self.regressor)

    def order(self, gallery: np.ndarray) -> np.ndarray:
        """Row indices, the largest estimated benefit first (ties: gallery order); for confusion each item's
        predicted distractor right after it."""
        return benefit_order(self.statistic, np.asarray(gallery, dtype=np.float32), self.bank, self.regressor)

    def describe(self) -> dict[str, Any]:
        """What a migration records about the order it was given (no vectors)."""
        return {"statistic": self.statistic, "bank_size": 0 if self.bank is None else len(self.bank),
                "space_id": self.space_id, "fit_report": self.fit_report}


def restrict_positives(positives: Sequence[Sequence[int]], rows: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """The queries whose positives all lie in `rows`, with positives renumbered into `rows`."""
    where = {int(r): j for j, r in enumerate(rows)}
    keep, renumbered = [], []
    for q, p in enumerate(positives):
        if p and all(int(i) in where for i in p):
            keep.append(q)
            renumbered.append([where[int(i)] for i in p])
    return np.asarray(keep, dtype=np.int64), renumbered


def fit_benefit(
    old_gallery: np.ndarray,
    new_gallery: np.ndarray,
    compat_queries: np.ndarray,
    new_queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    candidates: Sequence[str] = CANDIDATES,
    n_parts: int = 5,
    seed: int = 0,
    space_id: str | None = None,
    calibration: ScoreCalibration | None = None,
) -> BenefitScorer:
    """Choose the benefit statistic on training pairs (module docstring). Row i of old_gallery (old model)
    and new_gallery (new model) is the same training item; compat_queries (old space) and new_queries are
    the two models' queries of the training pairs, `positives[q]` the rows that answer query q. The
    returned scorer's bank is every compatible training query. `calibration`: the candidates' curves are
    measured under the score merge with it (the rule the migration will serve by); none: the slot rule."""
    old_gallery, new_gallery = _unit(old_gallery), _unit(new_gallery)
    compat_queries, new_queries = _unit(compat_queries), _unit(new_queries)
    n, n_q = len(old_gallery), len(compat_queries)
    if len(new_gallery) != n or len(new_queries) != n_q or len(positives) != n_q:
        raise InputError("fit_benefit: old/new training galleries must have the same rows, and compat/new queries"
                         " and positives the same count")
    if compat_queries.shape[1] != old_gallery.shape[1]:
        raise SpaceMismatchError("the compatible queries must be in the old gallery's space (same dimension)")
    if not candidates:
        raise InputError("fit_benefit needs at least one candidate statistic")
    for name in candidates:
        _parse(name)
    n_parts = max(2, min(n_parts, n // 20))
    if n < 40:
        raise InputError(f"{n} training items are too few to choose a benefit statistic (at least 40; give more"
                         " --fit-pairs)")
    part_of = np.random.default_rng(seed).permutation(n) % n_parts
    table: dict[str, list[float]] = {name: [] for name in candidates}
    random_areas: list[float] = []
    used_parts = 0
    for part in range(n_parts):
        rows = np.flatnonzero(part_of == part)
        queries, pos = restrict_positives(positives, rows)
        bank_q, _ = restrict_positives(positives, np.flatnonzero(part_of != part))
        if len(queries) < 10:
            continue
        args = (old_gallery[rows], new_gallery[rows], compat_queries[queries], new_queries[queries], pos)
        rng = np.random.default_rng(seed + part)
        rand = np.mean([merged_top1_curve(*args, rng.permutation(len(rows)), calibration=calibration)
                        for _ in range(4)], axis=0)
        if rand[-1] <= rand[0]:
            continue  # this part shows no gain to order
        used_parts += 1
        random_areas.append(gain_area(rand))
        regressor = (_query_regressor(old_gallery, compat_queries, positives, bank_q)
                     if any(c in _REGRESSED for c in candidates) else None)
        for name in candidates:
            order = benefit_order(name, old_gallery[rows], compat_queries[bank_q], regressor)
            table[name].append(gain_area(merged_top1_curve(*args, order, calibration=calibration)))
    if not used_parts:
        raise InputError("the training pairs show no R@1 gain of the new model over the compatible one in any part:"
                         " there is nothing to learn an order from (give more or other --fit-pairs)")
    means = {name: float(np.nanmean(v)) for name, v in table.items()}
    best = max(candidates, key=lambda name: means[name])
    report = {"chosen": best, "mean_gain_area": means, "random_gain_area": float(np.mean(random_areas)),
              "parts": used_parts, "training_items": n, "training_queries": n_q,
              "merge": "slot" if calibration is None else "score"}
    regressor = _query_regressor(old_gallery, compat_queries, positives, np.arange(n_q)) if best in _REGRESSED else None
    return BenefitScorer(best, compat_queries, space_id, report, regressor)


def _query_regressor(gallery: np.ndarray, queries: np.ndarray, positives: Sequence[Sequence[int]],
                     which: np.ndarray) -> np.ndarray:
    """The confusion regressor fitted on queries `which` (each paired with its first positive item)."""
    rows = [int(q) for q in which if positives[q]]
    return fit_query_regressor(gallery[[int(positives[q][0]) for q in rows]], queries[rows])


def fit_benefit_pairs(old: Any, new: Any, compat: Any, modality: str, **options: Any) -> BenefitScorer:
    """`fit_benefit` from pair embeddings of the training pairs: `old` and `new` PairEmbeddings (old and new
    models), `compat` the compatible model's QueryVectors (old space). An image gallery (t2i: caption
    queries) is fitted on the training images, a caption gallery (i2t) on the training captions."""
    from xbt.metrics import image_to_text_positives, text_to_image_positives

    old.space.check(compat.space, "the compatible model's queries")
    index = list(old.caption_image_index)
    if list(new.caption_image_index) != index:
        raise InputError("old and new training embeddings must come from the same pairs in the same order")
    if modality == "image":
        return fit_benefit(old.images, new.images, compat.texts, new.texts, text_to_image_positives(index),
                           space_id=old.space.id, **options)
    if modality == "text":
        return fit_benefit(old.texts, new.texts, compat.images, new.images,
                           image_to_text_positives(index, len(old.images)), space_id=old.space.id, **options)
    raise InputError(f"a benefit order is for image or text galleries, not {modality!r}")


def describe_candidates(report: Mapping[str, Any]) -> str:
    """One line per candidate of a fit report, best first."""
    rows = sorted(report.get("mean_gain_area", {}).items(), key=lambda kv: -kv[1])
    lines = [f"  {name:<22} {area:.3f}" for name, area in rows]
    head = (f"benefit statistic chosen on {report.get('parts')} training parts (random: "
            f"{report.get('random_gain_area', float('nan')):.3f}):")
    return "\n".join([head, *lines])
