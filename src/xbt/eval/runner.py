"""One evaluation run: every compatibility method on the same data, measured side by side.

    run = run_evaluation(old_model, new_model, eval_pairs, ["procrustes-text", "slerp", "compat:runs/xbt"],
                         fit_texts=corpus, fit_pairs=train_pairs, support_pairs=val_pairs)
    run.matrix            # the UpgradeMatrix: old->old, new->new, each method's new->old, with intervals
    run.to_results()      # the JSON document `xbt evaluate` writes (docs/results-schema.md)

A method is a peer's registry name (fitted here, on the training data only), a fitted or unfitted
CompatMethod, a model spec such as `compat:PATH` (an XBT model: a VLPModel emitting old-space vectors),
a VLPModel, or precomputed query vectors. Embeddings go through the feature cache, so a second run on
the same data encodes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from xbt.compat.adapter import single_thread
from xbt.compat.base import CompatMethod, FitData, l2_normalise
from xbt.compat.registry import PEER_METHODS, build_method
from xbt.data.pairs import Pair
from xbt.errors import InputError
from xbt.eval.embed import PairEmbeddings, embed_pairs, embed_texts
from xbt.eval.matrix import DIRECTIONS, QueryVectors, UpgradeMatrix, evaluate_upgrade
from xbt.eval.retrieval import DEFAULT_KS, estimate, hits_at_k, resampled_means, retrieval_ranks
from xbt.models.base import EmbeddingSpace, VLPModel

RESULTS_SCHEMA = "xbt.results/1"
COST_BATCH_SIZES = (1, 256)


@dataclass
class PrecomputedMethod:
    """Query vectors computed elsewhere (already in the old space), with what the report says about them."""

    queries: QueryVectors
    needs_old_model_at_query_time: bool = False
    fits_on: str = "unknown"
    query_cost_us: dict[int, float] | None = None


MethodLike = Union[str, CompatMethod, VLPModel, QueryVectors, PrecomputedMethod]


@dataclass
class MethodRecord:
    """What the report states about a method besides its recalls."""

    name: str
    kind: str  # peer | model | precomputed
    needs_old_model_at_query_time: bool
    fits_on: str
    query_cost_us: dict[int, float | None]  # batch size -> microseconds per query, on top of the encoder
    cost_note: str = ""
    fit_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "needs_old_model_at_query_time": self.needs_old_model_at_query_time,
            "fits_on": self.fits_on, "query_cost_us": {str(b): c for b, c in self.query_cost_us.items()},
            "cost_note": self.cost_note, "fit_seconds": self.fit_seconds, "details": self.details,
        }


@dataclass
class EvaluationRun:
    matrix: UpgradeMatrix
    methods: dict[str, MethodRecord]
    data: dict[str, Any]
    models: dict[str, Any]
    protocol: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    data_efficiency: list[dict[str, Any]] = field(default_factory=list)

    def to_results(self) -> dict[str, Any]:
        """The results.json document (schema: docs/results-schema.md); strict JSON (NaN becomes null)."""
        from xbt.eval.recommend import recommend

        method, reason = recommend(self.matrix)
        results = {
            "schema": RESULTS_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "models": self.models,
            "data": self.data,
            "protocol": self.protocol,
            "methods": {name: record.to_dict() for name, record in self.methods.items()},
            "matrix": self.matrix.to_dict(),
            "recommendation": {"method": method, "reason": reason},
            "data_efficiency": self.data_efficiency,
            "warnings": self.warnings,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }
        return json_safe(results)


def json_safe(value: Any) -> Any:
    """NaN and infinities become None (strict JSON has neither); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ----- embeddings -----------------------------------------------------------------------------------
def fit_data(
    old_model: VLPModel,
    new_model: VLPModel,
    fit_texts: Sequence[str],
    fit_pairs: Sequence[Pair],
    support: tuple[PairEmbeddings, PairEmbeddings] | None,
    show_progress: bool = False,
) -> FitData:
    """Paired training embeddings: every text of the corpus and of the training pairs (deduplicated) by
    both models, and every training image by both models."""
    texts = list(dict.fromkeys([*fit_texts, *(p.caption for p in fit_pairs)]))
    data = FitData(
        new_text=embed_texts(new_model, texts, show_progress), old_text=embed_texts(old_model, texts, show_progress),
        support=support,
    )
    if fit_pairs:
        data.new_image = embed_pairs(new_model, fit_pairs, show_progress).images
        data.old_image = embed_pairs(old_model, fit_pairs, show_progress).images
    return data


# ----- query-time cost --------------------------------------------------------------------------------
def time_per_query_us(fn: Callable[[int], Any], batch_size: int, budget_s: float = 0.3, max_calls: int = 2000) -> float:
    """Best wall time of repeated `fn(batch_size)` calls, divided by the batch, in microseconds, on one
    thread. The minimum (as timeit advises) is what the code costs; slower runs measure other load."""
    with single_thread():
        fn(batch_size)
        times = []
        start = time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < max_calls):
            t0 = time.perf_counter()
            fn(batch_size)
            times.append(time.perf_counter() - t0)
    return float(min(times) / batch_size * 1e6)


def method_query_cost(method: CompatMethod, batch_sizes: Sequence[int] = COST_BATCH_SIZES, seed: int = 0) -> dict[int, float]:
    """Microseconds per query the method adds on top of the encoder(s): map + normalise, at each batch size."""
    rng = np.random.default_rng(seed)
    largest = max(batch_sizes)
    new = l2_normalise(rng.standard_normal((largest, method.new_space.dim))).astype(np.float32)
    old = l2_normalise(rng.standard_normal((largest, method.old_space.dim))).astype(np.float32)
    ensemble = method.needs_old_model_at_query_time
    return {
        b: time_per_query_us(lambda n: method.transform(new[:n], "text", old[:n] if ensemble else None), b)
        for b in batch_sizes
    }


def model_query_cost(model: VLPModel, batch_sizes: Sequence[int] = COST_BATCH_SIZES) -> tuple[dict[int, float | None], str]:
    """A compatible model's cost on top of its encoder is its projection (LoRA can be merged into the
    encoder's weights at no cost); a model without a separate projection cannot be split this way."""
    projection = getattr(model, "projection", None)
    if not isinstance(projection, torch.nn.Module) or not hasattr(projection, "in_dim"):
        return {b: None for b in batch_sizes}, "not separable from the encoder"
    x = torch.nn.functional.normalize(torch.randn(max(batch_sizes), projection.in_dim), dim=-1)

    @torch.inference_mode()
    def run(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(projection(x[:n]), dim=-1)

    was_training = projection.training
    projection.eval()
    try:
        return {b: time_per_query_us(run, b) for b in batch_sizes}, "projection (LoRA, if any, merged into the encoder)"
    finally:
        projection.train(was_training)


# ----- method resolution ------------------------------------------------------------------------------
def _resolve_methods(
    methods: Sequence[MethodLike] | Mapping[str, MethodLike],
    new_space: EmbeddingSpace,
    old_space: EmbeddingSpace,
    method_options: Mapping[str, Mapping[str, Any]],
) -> dict[str, MethodLike]:
    """name -> method object: registry names are built, model specs loaded, everything else kept."""
    from xbt.models import load_model

    items = list(methods.items()) if isinstance(methods, Mapping) else [(None, m) for m in methods]
    resolved: dict[str, MethodLike] = {}
    for name, method in items:
        if isinstance(method, str):
            spec = method.strip()
            if spec in PEER_METHODS:
                method = build_method(spec, new_space, old_space, **method_options.get(spec, {}))
                name = name or spec
            elif ":" in spec:
                kind, _, rest = spec.partition(":")
                method = load_model(spec)
                name = name or (f"xbt:{Path(rest).expanduser().name}" if kind == "compat" else spec)
            else:
                method = build_method(spec, new_space, old_space)  # raises the "unknown method" message
        if name is None:
            if isinstance(method, CompatMethod):
                name = method.name
            elif isinstance(method, VLPModel):
                name = method.spec or type(method).__name__
            else:
                raise InputError("precomputed query vectors need a name: pass methods as a mapping {name: vectors}")
        if name in resolved:
            raise InputError(f"method {name!r} is listed twice")
        resolved[name] = method
    return resolved


# ----- the run ---------------------------------------------------------------------------------------
def run_evaluation(
    old_model: VLPModel,
    new_model: VLPModel,
    eval_pairs: Sequence[Pair],
    methods: Sequence[MethodLike] | Mapping[str, MethodLike] = PEER_METHODS,
    fit_texts: Sequence[str] = (),
    fit_pairs: Sequence[Pair] = (),
    support_pairs: Sequence[Pair] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    cost_batch_sizes: Sequence[int] = COST_BATCH_SIZES,
    data_efficiency: Sequence[int] = (),
    describe: Mapping[str, Any] | None = None,
    skip_unfittable: bool = False,
    show_progress: bool = False,
) -> EvaluationRun:
    """Embed everything once, fit each method on the training data only, and build the matrix.

    `data_efficiency`: numbers of training pairs at which the peers are refitted (on a seeded random
    subset) to trace recall against training data. `describe`: sources and specs to record verbatim.
    `skip_unfittable`: leave out (with a warning) peers whose training data was not given, e.g. the
    image-fitted ones when there is only a text corpus; otherwise that is an error.
    """
    if not eval_pairs:
        raise InputError("the evaluation set is empty")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    old_space, new_space = old_model.space, new_model.space
    resolved = _resolve_methods(methods, new_space, old_space, method_options or {})
    old_eval = embed_pairs(old_model, eval_pairs, show_progress)
    new_eval = embed_pairs(new_model, eval_pairs, show_progress)
    support = None
    if support_pairs:
        support = (embed_pairs(new_model, support_pairs, show_progress), embed_pairs(old_model, support_pairs, show_progress))
    peers = {n: m for n, m in resolved.items() if isinstance(m, CompatMethod)}
    data = fit_data(old_model, new_model, fit_texts, fit_pairs, support, show_progress) if peers else None
    timings["embed"] = time.perf_counter() - t0

    queries: dict[str, QueryVectors] = {}
    records: dict[str, MethodRecord] = {}
    skipped: list[str] = []
    for name, method in resolved.items():
        t = time.perf_counter()
        if isinstance(method, CompatMethod):
            try:
                method.fit(data)
            except InputError as exc:
                if not skip_unfittable:
                    raise
                skipped.append(f"{name} was left out: {exc}")
                peers.pop(name, None)
                continue
            fit_seconds = time.perf_counter() - t
            queries[name] = method.transform_embeddings(new_eval, old_eval)
            records[name] = MethodRecord(
                name, "peer", method.needs_old_model_at_query_time, method.fits_on,
                method_query_cost(method, cost_batch_sizes, seed), "map + normalise, per query",
                fit_seconds, _method_details(method),
            )
        elif isinstance(method, VLPModel):
            old_space.check(method.space, f"the queries of {name}")
            queries[name] = model_queries(method, eval_pairs, show_progress)
            cost, note = model_query_cost(method, cost_batch_sizes)
            records[name] = MethodRecord(
                name, "model", bool(getattr(method, "needs_old_model_at_query_time", False)),
                str(getattr(method, "fits_on", "trained (see the model's config)")), cost, note,
                details={"spec": getattr(method, "spec", "")},
            )
        else:
            pre = method if isinstance(method, PrecomputedMethod) else PrecomputedMethod(method)
            queries[name] = pre.queries
            cost = dict(pre.query_cost_us) if pre.query_cost_us else {b: None for b in cost_batch_sizes}
            records[name] = MethodRecord(name, "precomputed", pre.needs_old_model_at_query_time, pre.fits_on, cost)
        timings[f"method:{name}"] = time.perf_counter() - t

    t = time.perf_counter()
    matrix = evaluate_upgrade(old_eval, new_eval, queries, ks, n_resamples, seed)
    matrix.method_info = {name: record.to_dict() for name, record in records.items()}
    timings["evaluate"] = time.perf_counter() - t

    curve: list[dict[str, Any]] = []
    if data_efficiency and peers:
        t = time.perf_counter()
        curve = data_efficiency_curve(
            old_model, new_model, old_eval, new_eval, peers, fit_texts, fit_pairs, support, data_efficiency,
            ks, n_resamples, seed, method_options or {},
        )
        timings["data_efficiency"] = time.perf_counter() - t

    description = dict(describe or {})
    return EvaluationRun(
        matrix=matrix,
        methods=records,
        data={
            "eval": {"source": description.get("eval"), **_sizes(eval_pairs)},
            "fit_texts": {"source": description.get("fit_texts"), "n_texts": len(fit_texts)},
            "fit_pairs": {"source": description.get("fit_pairs"), **_sizes(fit_pairs)},
            "support": {"source": description.get("support"), **_sizes(support_pairs or [])},
        },
        models={
            "old": {"spec": description.get("old", old_model.spec), "space": old_space.to_dict(), "space_id": old_space.id},
            "new": {"spec": description.get("new", new_model.spec), "space": new_space.to_dict(), "space_id": new_space.id},
        },
        protocol={
            "ks": list(ks), "n_resamples": n_resamples, "seed": seed, "confidence": 0.95, "search": "exact",
            "interval": "percentile bootstrap over queries, paired across methods",
            "criterion": "M(new->old) > M(old->old) per cell; confident when the interval of the difference is above 0",
            "gain": "(M(new->old) - M(old->old)) / (M(new->new) - M(old->old)), percent",
            "cost_batch_sizes": list(cost_batch_sizes),
        },
        warnings=skipped + leakage_warnings(eval_pairs, fit_texts, fit_pairs, support_pairs or []),
        timings_s=timings,
        data_efficiency=curve,
    )


def model_queries(model: VLPModel, pairs: Sequence[Pair], show_progress: bool = False) -> QueryVectors:
    """A model's own query vectors, cached under its `encoder_id` (a compatible model's differs from the
    old model's, although both declare the old space)."""
    embeddings = embed_pairs(model, pairs, show_progress)
    return QueryVectors(images=embeddings.images, texts=embeddings.texts)


def _method_details(method: CompatMethod) -> dict[str, Any]:
    """The settings a method was fitted with or chose, for the record (e.g. SLERP's weight)."""
    details: dict[str, Any] = {}
    for attr in ("fit_on", "ridge", "hidden", "epochs", "best_epoch"):
        if getattr(method, attr, None) is not None:
            details[attr] = getattr(method, attr)
    weight = getattr(method, "weight", None)
    if isinstance(weight, (int, float)):
        details["weight"] = float(weight)
    if getattr(method, "support_scores", None):
        details["support_scores"] = {str(k): round(v, 5) for k, v in method.support_scores.items()}
    if getattr(method, "history", None):
        details["final_loss"] = float(method.history[-1])
    return details


def _sizes(pairs: Sequence[Pair]) -> dict[str, int]:
    return {"n_pairs": len(pairs), "n_images": len({p.image_id for p in pairs})}


def leakage_warnings(
    eval_pairs: Sequence[Pair], fit_texts: Sequence[str], fit_pairs: Sequence[Pair], support_pairs: Sequence[Pair]
) -> list[str]:
    """Evaluation captions or images that also appear in the data methods are fitted or tuned on."""
    eval_captions = {p.caption.strip().lower() for p in eval_pairs}
    eval_images = {p.image for p in eval_pairs}
    found = []
    for what, texts, images in (
        ("the training texts", [*fit_texts, *(p.caption for p in fit_pairs)], [p.image for p in fit_pairs]),
        ("the support split", [p.caption for p in support_pairs], [p.image for p in support_pairs]),
    ):
        shared_captions = eval_captions & {t.strip().lower() for t in texts}
        shared_images = eval_images & set(images)
        if shared_captions or shared_images:
            found.append(
                f"{len(shared_captions)} evaluation captions and {len(shared_images)} evaluation images also appear in"
                f" {what}: the figures of methods fitted on them are optimistic"
            )
    return found


# ----- data efficiency ------------------------------------------------------------------------------
def data_efficiency_curve(
    old_model: VLPModel,
    new_model: VLPModel,
    old_eval: PairEmbeddings,
    new_eval: PairEmbeddings,
    peers: Mapping[str, CompatMethod],
    fit_texts: Sequence[str],
    fit_pairs: Sequence[Pair],
    support: tuple[PairEmbeddings, PairEmbeddings] | None,
    sizes: Sequence[int],
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Recall of each peer refitted on n training pairs (a seeded random subset; the text corpus is kept
    whole), for each n in `sizes` that the training set allows. Rows: {method, n_pairs, direction, k,
    recall, low, high}. Methods that need no image pairs are flat up to the captions they gain."""
    order = np.random.default_rng(seed).permutation(len(fit_pairs))
    points = sorted({int(n) for n in sizes if 0 < int(n) <= len(fit_pairs)})
    rows: list[dict[str, Any]] = []
    for n in points:
        subset = [fit_pairs[i] for i in sorted(order[:n])]
        data = fit_data(old_model, new_model, fit_texts, subset, support)
        for name, template in peers.items():
            if template.fits_on == "nothing":
                continue
            method = _refit_copy(name, template, data, method_options or {})
            if method is None:
                continue
            q = method.transform_embeddings(new_eval, old_eval)
            ranks = retrieval_ranks(q.images, q.texts, old_eval.images, old_eval.texts, old_eval.caption_image_index)
            for d in DIRECTIONS:
                hits = hits_at_k(ranks[d], ks)
                columns = np.stack([hits[k] for k in ks], axis=1)
                samples = resampled_means(columns, n_resamples, seed)
                for j, k in enumerate(ks):
                    e = estimate(100 * samples[:, j], 100 * columns[:, j].mean())
                    rows.append({"method": name, "n_pairs": n, "direction": d, "k": int(k),
                                 "recall": e.value, "low": e.low, "high": e.high})
    return rows


def _refit_copy(name: str, template: CompatMethod, data: FitData, options: Mapping[str, Mapping[str, Any]]) -> CompatMethod | None:
    """A fresh instance of a peer fitted on `data` (the template keeps its own fit); None if it cannot be rebuilt."""
    try:
        method = build_method(name, template.new_space, template.old_space, **options.get(name, {}))
    except InputError:
        return None
    return method.fit(data)


# ----- from what a user types ----------------------------------------------------------------------
#: `xbt evaluate --testbed`: the offline testbed's protocol in one command.
TESTBED_DEFAULTS: dict[str, Any] = {
    "old": "testbed:old", "new": "testbed:new", "data": "testbed:eval",
    "fit_text": ["testbed:text_corpus"], "fit_pairs": ["testbed:xbt_train"], "support": "testbed:val",
    "data_efficiency": [25, 50, 100, 200],
}


def load_texts(source: str, split: str | None = None, image_root: str | None = None) -> list[str]:
    """A text corpus: `testbed:text_corpus`, a .txt file (one text per line), or the captions of any dataset."""
    from xbt.data.datasets import open_dataset

    if source == "testbed:text_corpus":
        from xbt.data.testbed import load_text_corpus

        return load_text_corpus()
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError(f"text corpus not found: {path}")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise InputError(f"{path} holds no text")
        return texts
    return list(dict.fromkeys(p.caption for p in open_dataset(source, split, image_root)))


def evaluate_from_specs(
    old: str,
    new: str,
    data: str,
    split: str | None = None,
    image_root: str | None = None,
    fit_text: Sequence[str] = (),
    fit_pairs: Sequence[str] = (),
    fit_split: str | None = None,
    support: str | None = None,
    support_split: str | None = None,
    methods: Sequence[str] = PEER_METHODS,
    ks: Sequence[int] = DEFAULT_KS,
    n_resamples: int = 1000,
    seed: int = 0,
    data_efficiency: Sequence[int] = (),
    skip_unfittable: bool = False,
    show_progress: bool = False,
) -> EvaluationRun:
    """`run_evaluation` from model specs and dataset sources (what `xbt evaluate` takes)."""
    from xbt.data.datasets import open_dataset
    from xbt.models import load_model

    eval_pairs = open_dataset(data, split, image_root)
    texts = [t for source in fit_text for t in load_texts(source, fit_split, image_root)]
    train_pairs = [p for source in fit_pairs for p in open_dataset(source, fit_split, image_root)]
    support_pairs = open_dataset(support, support_split, image_root) if support else None
    if data_efficiency and train_pairs:
        data_efficiency = [*data_efficiency, len(train_pairs)]
    return run_evaluation(
        load_model(old), load_model(new), eval_pairs, list(methods), texts, train_pairs, support_pairs,
        ks=ks, n_resamples=n_resamples, seed=seed, data_efficiency=data_efficiency,
        skip_unfittable=skip_unfittable, show_progress=show_progress,
        describe={
            "old": old, "new": new, "eval": _source(data, split), "fit_texts": ", ".join(fit_text) or None,
            "fit_pairs": ", ".join(_source(s, fit_split) for s in fit_pairs) or None,
            "support": _source(support, support_split) if support else None,
        },
    )


def _source(source: str, split: str | None) -> str:
    return f"{source} (split {split})" if split and not source.startswith("testbed:") else source
