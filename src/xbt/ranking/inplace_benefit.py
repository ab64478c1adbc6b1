"""Which rows of a transformed gallery to backfill first (issue 26, part 3): an estimate, per row, of how much
replacing its transformed vector T(old) by the exact new-model vector buys, in FastFill's spirit (predict where
the transformation serves worst), computed from what the gallery holds, the transformed vectors, never from
the new model's vectors of the gallery.

In one space there is no merge coupling (`xbt.ranking.inplace_curve`): an item's benefit is its own queries'
gain, so the statistics aim at the items the transformation serves worst:

    density@k       mean cosine of the row to its k nearest other rows (crowded first)
    sparsity@k      the same, negated (isolated first)
    error-head      a ridge head T(old) -> ||T(old) - new||, fitted on a re-embedded sample (items both models
                    embedded: training pairs, unlabeled images, texts): the predicted transformation error
                    (FastFill's sigma without retraining the map)
    correction      ||unit(A T(old)) - T(old)||, A a ridge correction T(old) -> new fitted on the same sample:
                    how far a second, unconstrained map would move the row
    bootstrap       the spread of K corrections fitted on bootstrap resamples of the sample: the map's own
                    uncertainty about the row
    hubness@k       how many native training queries (a bank) have the row in their top k: a transformed hub
                    is the wrong top result of many queries, and its native vector may release them
    confusion-own   a ridge head T(old) -> the native query that should find the item (training pairs); the
                    margin by which that predicted query prefers another row, negated (likely misses first)

`fit_inplace_benefit` chooses one on training pairs only (never evaluation items): the training items are dealt
into parts, each part in turn is a small transformed gallery whose native vectors are known, the heads are
fitted without it (the other parts + the sample), and each candidate's order is scored by the area under its
measured R@1 in-place curve (normalised gain, `xbt.ranking.benefit.gain_area`); when no part shows a gain the first
candidate is kept (`fit_report["no_gain"]`). The scorer saves to a folder
(`save` / `load`: JSON + safetensors with its sha256, no pickle) for `xbt gallery backfill --in-place --order
benefit`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbt.errors import InputError, SpaceMismatchError
from xbt.ranking.benefit import density, gain_area, hubness, restrict_positives
from xbt.ranking.inplace_curve import RowCalibration, inplace_top1_curve

Array = np.ndarray[Any, Any]

CANDIDATES = ("density@1", "density@5", "density@10", "sparsity@1", "sparsity@5", "hubness@1", "hubness@5",
              "error-head", "correction", "bootstrap", "confusion-own")
#: Which learned arrays each statistic reads.
_NEEDS = {"error-head": ("error_head",), "correction": ("correction",), "bootstrap": ("bootstrap",),
          "confusion-own": ("query_head",), "hubness": ("query_bank",)}
FIT_FRACTIONS = tuple(i / 10 for i in range(11))
RIDGE = 1.0
QUERY_RIDGE = 0.1
N_BOOTSTRAP = 3
SCORER_FORMAT = "xbt.inplace-benefit/1"
_WEIGHTS = "scorer.safetensors"
_CONFIG = "scorer.json"


def _unit(x: Array) -> Array:
    x = np.asarray(x, dtype=np.float32)
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def _ridge(x: Array, y: Array, lam: float) -> Array:
    """(dim + 1, out) ridge weights with an unpenalised bias row, float32."""
    xb = np.hstack([x, np.ones((len(x), 1))]).astype(np.float32)
    penalty = lam * np.eye(xb.shape[1])
    penalty[-1, -1] = 0.0
    gram = (xb.T @ xb).astype(np.float64)  # float32 products (the cost), a float64 solve
    return np.linalg.solve(gram + penalty, (xb.T @ np.asarray(y, np.float32)).astype(np.float64)).astype(np.float32)


def _predict(weights: Array, x: Array) -> Array:
    return np.asarray(np.hstack([x, np.ones((len(x), 1), np.float32)]) @ weights)


def _parse_k(name: str) -> tuple[str, int]:
    kind, _, k = name.partition("@")
    if kind in ("density", "sparsity", "hubness") and k.isdigit() and int(k) >= 1:
        return kind, int(k)
    if name in _NEEDS and name != "hubness":
        return name, 0
    raise InputError(f"unknown in-place benefit statistic {name!r}: use {', '.join(CANDIDATES)} (density@K, sparsity@K)")


def fit_heads(sample_transformed: Array, sample_native: Array, query_items: Array | None = None,
              queries: Array | None = None, seed: int = 0, n_bootstrap: int = N_BOOTSTRAP) -> dict[str, Array]:
    """The learned arrays of the statistics: from a re-embedded sample (row i of `sample_transformed` is T(old)
    of an item, of `sample_native` its new-model vector) the error head, the correction and its bootstrap
    resamples; from training pairs (`query_items[j]`: T(old) of the item query j should find, `queries[j]`
    that native query) the query head."""
    t, n = _unit(sample_transformed), _unit(sample_native)
    if t.shape != n.shape or len(t) < 10:
        raise InputError("the re-embedded sample needs at least 10 items, transformed and native rows alike")
    heads = {"error_head": _ridge(t, np.linalg.norm(t - n, axis=1, keepdims=True), RIDGE),
             "correction": _ridge(t, n, RIDGE)}
    rng = np.random.default_rng(seed)
    heads["bootstrap"] = np.stack([_ridge(t[s], n[s], RIDGE) for s in
                                   (rng.integers(0, len(t), len(t)) for _ in range(n_bootstrap))])
    if query_items is not None and queries is not None and len(queries):
        heads["query_head"] = _ridge(_unit(query_items), _unit(queries), QUERY_RIDGE)
        heads["query_bank"] = _unit(queries)
    return heads


def inplace_statistic(name: str, transformed: Array, heads: dict[str, Array]) -> Array:
    """The statistic `name` of every row of a transformed gallery (larger = backfill sooner)."""
    kind, k = _parse_k(name)
    t = _unit(transformed)
    for need in _NEEDS.get(kind, ()):
        if need not in heads:
            raise InputError(f"the in-place benefit statistic {name!r} needs its fitted {need.replace('_', ' ')}")
    if kind in ("density", "sparsity"):
        d = np.asarray(density(t, k), dtype=np.float64)
        return d if kind == "density" else -d
    if kind == "hubness":
        return np.asarray(hubness(t, _unit(heads["query_bank"]), k), dtype=np.float64)
    if name == "error-head":
        return _predict(heads["error_head"], t)[:, 0].astype(np.float64)
    if name == "correction":
        return np.asarray(np.linalg.norm(_unit(_predict(heads["correction"], t)) - t, axis=1), dtype=np.float64)
    if name == "bootstrap":
        preds = np.stack([_unit(_predict(w, t)) for w in heads["bootstrap"]])
        return np.asarray(np.linalg.norm(preds - preds.mean(axis=0), axis=2).mean(axis=0), dtype=np.float64)
    # confusion-own: minus the margin of the predicted query for its own row over the best other row
    predicted = _unit(_predict(heads["query_head"], t))
    out = np.zeros(len(t))
    for start in range(0, len(t), 1024):
        sims = predicted[start : start + 1024] @ t.T
        rows = np.arange(len(sims))
        own = sims[rows, start + rows].copy()
        sims[rows, start + rows] = -np.inf
        out[start : start + len(sims)] = sims.max(axis=1) - own if len(t) > 1 else 0.0
    return out


@dataclass
class InplaceBenefitScorer:
    """A chosen statistic and the learned arrays it reads. `order(transformed)`: the rows of a transformed gallery,
    the largest estimated benefit first (ties: gallery order)."""

    statistic: str
    heads: dict[str, Array] = field(default_factory=dict)
    dim: int = 0
    space_id: str | None = None
    fit_report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _parse_k(self.statistic)

    def score(self, transformed: Array) -> Array:
        transformed = np.asarray(transformed, dtype=np.float32)
        if transformed.ndim != 2:
            raise InputError("the gallery vectors must be a (items, dim) array")
        if self.dim and transformed.shape[1] != self.dim:
            raise SpaceMismatchError(f"the in-place benefit scorer was fitted for {self.dim}-d new-space vectors, the"
                                     f" gallery holds {transformed.shape[1]}-d ones")
        return inplace_statistic(self.statistic, transformed, self.heads)

    def order(self, transformed: Array) -> Array:
        return np.argsort(-self.score(transformed), kind="stable")

    def describe(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "dim": self.dim, "space_id": self.space_id, "fit_report": self.fit_report}

    def save(self, folder: str | Path) -> Path:
        """scorer.json (statistic, space, fit report, sha256 of the weights) + scorer.safetensors, each written
        whole (temp file + rename)."""
        from safetensors.numpy import save_file

        from xbt.durable import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / _WEIGHTS
        tmp = folder / (_WEIGHTS + ".tmp")
        needed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.heads.items()
                  if k in _NEEDS.get(_parse_k(self.statistic)[0], ())}
        save_file(needed or {"none": np.zeros(1, np.float32)}, str(tmp))
        tmp.replace(weights)
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        atomic_write_text(folder / _CONFIG, json.dumps({"format": SCORER_FORMAT, **self.describe(), "sha256": digest},
                                                       indent=1, default=float) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> InplaceBenefitScorer:
        from safetensors.numpy import load_file

        folder = Path(folder)
        try:
            config = json.loads((folder / _CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"no in-place benefit scorer at {folder}: {exc}") from exc
        if config.get("format") != SCORER_FORMAT:
            raise InputError(f"{folder} holds no in-place benefit scorer of format {SCORER_FORMAT}")
        weights = folder / _WEIGHTS
        if hashlib.sha256(weights.read_bytes()).hexdigest() != config.get("sha256"):
            raise InputError(f"{weights} does not match the sha256 its scorer.json records: damaged or replaced")
        heads = {k: v for k, v in load_file(str(weights)).items() if k != "none"}
        return cls(str(config["statistic"]), heads, int(config.get("dim", 0)), config.get("space_id"),
                   dict(config.get("fit_report", {})))


def _query_pairs(transformed: Array, queries: Array, positives: Sequence[Sequence[int]], which: Array) -> tuple[Array, Array]:
    which = np.asarray([q for q in which if positives[int(q)]], dtype=np.int64)
    return transformed[[int(positives[int(q)][0]) for q in which]], queries[which]


def fit_inplace_benefit(
    transformed: Array,
    native: Array,
    queries: Array,
    positives: Sequence[Sequence[int]],
    sample_transformed: Array | None = None,
    sample_native: Array | None = None,
    candidates: Sequence[str] = CANDIDATES,
    n_parts: int = 5,
    seed: int = 0,
    space_id: str | None = None,
    calibration: RowCalibration | None = None,
    head_cache: dict[int, dict[str, Array]] | None = None,
) -> InplaceBenefitScorer:
    """Choose the statistic on training pairs (module docstring): row i of `transformed` is T(old) of training item
    i and of `native` its new-model vector, `queries` the native queries of the training pairs, `positives[q]`
    the rows answering query q; `sample_*`: more re-embedded items (unlabeled images, texts) for the heads.
    `calibration`: the transformed rows' score map the gallery will be searched with. `head_cache`: a dict the
    heads of each part (they do not depend on the calibration) are kept in, to choose again under another
    calibration from the same data without refitting them."""
    transformed, native, queries = _unit(transformed), _unit(native), _unit(queries)
    n = len(transformed)
    if native.shape != transformed.shape or len(positives) != len(queries):
        raise InputError("fit_inplace_benefit: transformed and native rows must match, one positives list per query")
    if n < 40:
        raise InputError(f"{n} training items are too few to choose an in-place benefit statistic (at least 40)")
    for name in candidates:
        _parse_k(name)
    extra_t = _unit(sample_transformed) if sample_transformed is not None else transformed[:0]
    extra_n = _unit(sample_native) if sample_native is not None else native[:0]
    n_parts = max(2, min(n_parts, n // 20))
    part_of = np.random.default_rng(seed).permutation(n) % n_parts
    table: dict[str, list[float]] = {name: [] for name in candidates}
    random_areas: list[float] = []
    for part in range(n_parts):
        rows, other = np.flatnonzero(part_of == part), np.flatnonzero(part_of != part)
        qs, pos = restrict_positives(positives, rows)
        other_q, _ = restrict_positives(positives, other)
        if len(qs) < 10:
            continue
        args = (transformed[rows], native[rows], queries[qs], pos)
        rng = np.random.default_rng(seed + part)
        rand = np.mean([inplace_top1_curve(*args, rng.permutation(len(rows)), FIT_FRACTIONS, calibration)
                        for _ in range(4)], axis=0)
        if rand[-1] <= rand[0]:
            continue
        random_areas.append(gain_area(rand, FIT_FRACTIONS))
        heads = head_cache.get(part) if head_cache is not None else None
        if heads is None:
            heads = fit_heads(np.concatenate([extra_t, transformed[other]]), np.concatenate([extra_n, native[other]]),
                              *_query_pairs(transformed, queries, positives, other_q), seed=seed + part)
            if head_cache is not None:
                head_cache[part] = heads
        for name in candidates:
            order = np.argsort(-inplace_statistic(name, transformed[rows], heads), kind="stable")
            table[name].append(gain_area(inplace_top1_curve(*args, order, FIT_FRACTIONS, calibration), FIT_FRACTIONS))
    # No part shows a gain (the new model finds nothing more than the transformed rows on these pairs): nothing to
    # choose by, so the first candidate is kept and the report says so (`no_gain`).
    means = {name: float(np.nanmean(v)) if v else float("nan") for name, v in table.items()}
    best = max(candidates, key=lambda name: means[name]) if random_areas else candidates[0]
    heads = head_cache.get(-1) if head_cache is not None else None
    if heads is None:
        heads = fit_heads(np.concatenate([extra_t, transformed]), np.concatenate([extra_n, native]),
                          *_query_pairs(transformed, queries, positives, np.arange(len(queries))), seed=seed)
        if head_cache is not None:
            head_cache[-1] = heads
    report = {"chosen": best, "mean_gain_area": means, "no_gain": not random_areas,
              "random_gain_area": float(np.mean(random_areas)) if random_areas else float("nan"),
              "parts": len(random_areas), "training_items": n, "training_queries": len(queries),
              "sample_items": len(extra_t), "calibrated": calibration is not None}
    return InplaceBenefitScorer(best, heads, transformed.shape[1], space_id, report)
