"""The two rules that merge an old-space ranking with a new-space one while a gallery is backfilled, and
the score calibration the second one needs. The served search (`xbt.gallery.migrating.MigratingRetriever`)
and the offline measurement of a backfill (`xbt.eval.backfill_curve`) both call `merge_rankings`:

    slot    `slot_merge`: slots the compatible model's ranking (over the complete old gallery) gives to
            backfilled items are refilled, in order, by the new model's ranking over the backfilled items.
            No score of one space meets the other's. A query whose compatible top-1 t is wrong gains at
            R@1 only when t *and* its true item p are both backfilled: about f^2 of them at fraction f.
    score   `score_merge`: each space's inner products are mapped to P(match) by a monotone calibration
            fitted on training pairs (`ScoreCalibration`, `fit_score_calibration`: Platt scaling, one for
            the compatible queries against the old gallery, one for the new queries against the new
            gallery); the merged ranking is the union of the old-gallery hits of the items NOT yet
            backfilled and the new-gallery hits of the backfilled ones, by calibrated score. A query gains
            once its own item is backfilled and the new model is confident about it: about f of them.
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from xbt.errors import InputError, SpaceMismatchError
from xbt.metrics import image_to_text_positives, text_to_image_positives

#: The merge rules (module docstring).
MERGE_RULES = ("slot", "score")
#: Candidates per training query that the calibration is fitted on (each space's top ones plus the positives).
CALIBRATION_DEPTH = 50
CALIBRATION_FORMAT = "xbt.merge-calibration/1"

T = TypeVar("T", bound=Hashable)


# --------------------------------------------------------------------------------------------------
# the merge rules
# --------------------------------------------------------------------------------------------------
def slot_merge(old_ranking: Sequence[T], backfilled: Container[T], new_ranking: Sequence[T]) -> list[tuple[T, str]]:
    """Merge an old-space ranking over the complete old gallery with a new-space ranking over the
    backfilled items: slots the old ranking gives to backfilled items are refilled, in order, by the new
    ranking. Returns (item, "old" | "new") pairs, best first. No score of one space meets the other's."""
    fill = iter(new_ranking)
    merged: list[tuple[T, str]] = []
    seen: set[T] = set()  # an item backfilled between the two searches must not appear twice
    for item in old_ranking:
        if item in backfilled:
            nxt = next(fill, None)
            while nxt is not None and nxt in seen:
                nxt = next(fill, None)
            if nxt is not None:
                merged.append((nxt, "new"))
                seen.add(nxt)
        elif item not in seen:
            merged.append((item, "old"))
            seen.add(item)
    return merged


@dataclass(frozen=True)
class ScoreCalibration:
    """Monotone maps of each space's inner-product score s to P(match) = sigmoid(a s + b) (Platt scaling):
    `old` = (a, b) of the compatible model's queries against the old gallery (space `old_space`), `new` of
    the new model's queries against the new gallery (space `new_space`); `query_modality`: the queries it
    was fitted for ("text": an image gallery searched by captions; "image": a caption gallery). `report`:
    what it was fitted on (no vectors)."""

    old_space: str
    new_space: str
    old: tuple[float, float]
    new: tuple[float, float]
    query_modality: str = ""
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (a, b) in (("old", self.old), ("new", self.new)):
            if not (np.isfinite(a) and np.isfinite(b)) or a <= 0:
                raise InputError(f"a merge calibration's {name}-space map must be increasing (a > 0, finite); got"
                                 f" a={a}, b={b}")
        if self.old_space == self.new_space:
            raise InputError("a merge calibration joins two spaces; both are " + self.old_space)

    def logit(self, source: str, scores: Any) -> np.ndarray:
        """a s + b of the space `source` ("old" | "new"): the log-odds of a match (merging compares these)."""
        a, b = self.old if source == "old" else self.new
        return a * np.asarray(scores, dtype=np.float64) + b

    def probability(self, source: str, scores: Any) -> np.ndarray:
        return np.asarray(1.0 / (1.0 + np.exp(-self.logit(source, scores))), dtype=np.float64)

    def check(self, old_space: str, new_space: str, what: str = "this migration") -> None:
        """Refuse a calibration fitted for other spaces."""
        if (old_space, new_space) != (self.old_space, self.new_space):
            raise SpaceMismatchError(f"the merge calibration was fitted for spaces {self.old_space} -> {self.new_space};"
                                     f" {what} joins {old_space} -> {new_space}: fit it with these models")

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "kind": "platt", "old_space": self.old_space, "new_space": self.new_space,
                "old": list(self.old), "new": list(self.new), "query_modality": self.query_modality, "report": self.report}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreCalibration:
        if data.get("format") != CALIBRATION_FORMAT or data.get("kind") != "platt":
            raise InputError(f"not a merge calibration of format {CALIBRATION_FORMAT} (got {data.get('format')!r},"
                             f" kind {data.get('kind')!r})")
        try:
            return cls(str(data["old_space"]), str(data["new_space"]), (float(data["old"][0]), float(data["old"][1])),
                       (float(data["new"][0]), float(data["new"][1])), str(data.get("query_modality", "")),
                       dict(data.get("report", {})))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InputError(f"a malformed merge calibration: {exc}") from exc


def score_merge(old_hits: Sequence[tuple[T, float]], backfilled: Container[T], new_hits: Sequence[tuple[T, float]],
                calibration: ScoreCalibration) -> list[tuple[T, str]]:
    """Merge by calibrated score: the old-space hits (item, score) of items NOT backfilled and the new-space
    hits of backfilled items, each score mapped to its space's log-odds of a match (`calibration`), best
    first; on a tie the old hit first. Returns (item, "old" | "new") pairs. Each side's own order is kept
    (the maps are increasing); an item on both sides (backfilled between the two searches) appears once."""
    entries = [(float(v), 0, j, item, "old") for j, ((item, _), v) in
               enumerate(zip(old_hits, calibration.logit("old", [s for _, s in old_hits]))) if item not in backfilled]
    entries += [(float(v), 1, j, item, "new") for j, ((item, _), v) in
                enumerate(zip(new_hits, calibration.logit("new", [s for _, s in new_hits])))]
    entries.sort(key=lambda e: (-e[0], e[1], e[2]))
    merged: list[tuple[T, str]] = []
    seen: set[T] = set()
    for _, _, _, item, source in entries:
        if item not in seen:
            seen.add(item)
            merged.append((item, source))
    return merged


def merge_rankings(old_hits: Sequence[tuple[T, float]], backfilled: Container[T], new_hits: Sequence[tuple[T, float]],
                   calibration: ScoreCalibration | None = None) -> list[tuple[T, str]]:
    """The one merge of a search during a migration: `score_merge` with a calibration, `slot_merge` without.
    Hits are (item, score) best first: for the slot rule `old_hits` is the ranking over the complete old
    gallery; for the score rule it needs (at least) the top items that are not backfilled."""
    if calibration is None:
        return slot_merge([i for i, _ in old_hits], backfilled, [i for i, _ in new_hits])
    return score_merge(old_hits, backfilled, new_hits, calibration)


def check_merge(merge: str, calibration: Any) -> None:
    if merge not in MERGE_RULES:
        raise InputError(f"unknown merge rule {merge!r}: use {' or '.join(MERGE_RULES)}")
    if merge == "score" and calibration is None:
        raise InputError("merge 'score' needs a ScoreCalibration (fit_score_calibration on training pairs)")
    if merge == "slot" and calibration is not None:
        raise InputError("a score calibration is used by merge 'score' only; pass merge='score' or no calibration")


# ---- fitting the calibration -----------------------------------------------------------------------
def _fit_platt(scores: np.ndarray, labels: np.ndarray, ridge: float = 1e-6, iterations: int = 100) -> tuple[float, float]:
    """Logistic regression of labels on one score (Newton's method on the standardised score, a tiny ridge
    on the slope so separable data stay finite): (a, b) of P = sigmoid(a s + b)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if y.min() == y.max():
        raise InputError("the calibration's candidates are all positives or all negatives: nothing to fit")
    mu, sd = s.mean(), s.std()
    if sd <= 0:
        raise InputError("every calibration score is the same: the model separates nothing")
    x = np.stack([(s - mu) / sd, np.ones_like(s)], axis=1)
    w = np.array([0.0, np.log(y.mean() / (1 - y.mean()))])
    reg = np.diag([ridge * len(s), 0.0])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -40, 40)))
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0] / sd), float(w[1] - w[0] * mu / sd)


def _candidates(scores: np.ndarray, positives: Sequence[Sequence[int]], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of each query's top-`depth` items (a positive ranked below them is left out: adding
    it would tie low scores to matches, a selection bias; the merge never decides about it)."""
    top = top_k_indices(scores, depth)
    out_s, out_y = [], []
    for q, p in enumerate(positives):
        pos = {int(i) for i in p}
        out_s.append(scores[q, top[q]])
        out_y.append(np.fromiter((int(r) in pos for r in top[q]), dtype=np.float64, count=top.shape[1]))
    return np.concatenate(out_s), np.concatenate(out_y)


def fit_score_calibration(
    old_gallery: np.ndarray,
    new_gallery: np.ndarray,
    compat_queries: np.ndarray,
    new_queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    old_space: str,
    new_space: str,
    query_modality: str = "",
    depth: int = CALIBRATION_DEPTH,
    block: int = 512,
) -> ScoreCalibration:
    """Platt scaling of each space's inner products into P(match), on training pairs (never the evaluated
    queries): row i of old_gallery (old model) and new_gallery (new model) is the same training item,
    compat_queries (old space) and new_queries the two models' queries of the training pairs, `positives[q]`
    the rows that answer query q. Each space's map is fitted on every query's top `depth` items in that
    space (the region where the merge decides), labelled match / no match."""
    old_gallery, new_gallery = np.asarray(old_gallery, np.float32), np.asarray(new_gallery, np.float32)
    compat_queries, new_queries = np.asarray(compat_queries, np.float32), np.asarray(new_queries, np.float32)
    n, n_q = len(old_gallery), len(compat_queries)
    if len(new_gallery) != n or len(new_queries) != n_q or len(positives) != n_q:
        raise InputError("fit_score_calibration: old/new training galleries must have the same rows, and compat/new"
                         " queries and positives the same count")
    if compat_queries.shape[1] != old_gallery.shape[1] or new_queries.shape[1] != new_gallery.shape[1]:
        raise SpaceMismatchError("compat queries must match the old gallery's dimension, new queries the new gallery's")
    if n < 10 or n_q < 10:
        raise InputError(f"{n} training items and {n_q} queries are too few to calibrate the merge (at least 10 each)")
    if depth < 2:
        raise InputError("the calibration depth must be at least 2")
    maps: dict[str, tuple[float, float]] = {}
    report: dict[str, Any] = {"training_items": n, "training_queries": n_q, "depth": depth}
    for name, q, g in (("old", compat_queries, old_gallery), ("new", new_queries, new_gallery)):
        parts = [_candidates(q[s : s + block] @ g.T, positives[s : s + block], depth) for s in range(0, n_q, block)]
        scores, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        a, b = _fit_platt(scores, labels)
        if a <= 0:
            raise InputError(f"on the calibration pairs the {name} model's scores do not rise with a match (slope"
                             f" {a:.3g}): it cannot be calibrated for the merge")
        p = 1 / (1 + np.exp(-np.clip(a * scores + b, -40, 40)))
        report[name] = {"candidates": int(len(scores)), "positives": int(labels.sum()),
                        "log_loss": float(-np.mean(labels * np.log(p + 1e-12) + (1 - labels) * np.log(1 - p + 1e-12)))}
        maps[name] = (a, b)
    return ScoreCalibration(old_space, new_space, maps["old"], maps["new"], query_modality, report)


def fit_score_calibration_pairs(old: Any, new: Any, compat: Any, modality: str, **options: Any) -> ScoreCalibration:
    """`fit_score_calibration` from pair embeddings of training pairs: `old` and `new` PairEmbeddings (old and
    new models), `compat` the compatible model's QueryVectors (old space). `modality`: the gallery's (an
    image gallery is searched by captions, a caption gallery by images)."""
    old.space.check(compat.space, "the compatible model's queries")
    if new.space == old.space:
        raise InputError(f"the 'new' embeddings are of the old space {old.space.id}: pass the new model's own embeddings")
    index = list(old.caption_image_index)
    if list(new.caption_image_index) != index:
        raise InputError("old and new training embeddings must come from the same pairs in the same order")
    if modality == "image":
        return fit_score_calibration(old.images, new.images, compat.texts, new.texts, text_to_image_positives(index),
                                     old.space.id, new.space.id, "text", **options)
    if modality == "text":
        return fit_score_calibration(old.texts, new.texts, compat.images, new.images,
                                     image_to_text_positives(index, len(old.images)), old.space.id, new.space.id,
                                     "image", **options)
    raise InputError(f"a merge calibration is for image or text galleries, not {modality!r}")


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row, best first (stable among equal scores)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
