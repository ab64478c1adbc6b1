"""One evaluation run: every compatibility method on the same data, measured side by side.

    run = run_evaluation(old_model, new_model, eval_pairs, ["procrustes-text", "slerp", "compat:runs/xbt"],
                         fit_texts=corpus, fit_pairs=train_pairs, support_pairs=val_pairs)
    run.matrix            # the UpgradeMatrix: old->old, new->new, each method's new->old, with intervals
    run.compatible        # name -> the CompatibleModel each method became (save_pretrained to deploy it)
    run.to_results()      # the JSON document `xbt evaluate` writes (docs/results-schema.md)

A method is a peer's registry name or an unfitted CompatMethod (fitted here, on the training data
only), a `compat:PATH` spec, or a CompatibleModel. Every one becomes a CompatibleModel; those that run
the new model unadapted (every peer, XBT without LoRA) are evaluated by mapping the new model's cached
features, the others by encoding through the model. Embeddings go through the feature cache, so a
second run on the same data encodes nothing. With `fit_cache=FOLDER`, a peer fitted before on the
same data with the same settings is read back instead of fitted again (xbt.compat.fit_cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from xbt.compat.adapter import single_thread
from xbt.compat.base import CompatMethod, FitData
from xbt.compat.fit import fit_data, fit_image_items
from xbt.compat.fit_cache import PeerFitCache, UnreadableFit, fit_data_digest
from xbt.compat.maps import QueryMap
from xbt.compat.model import CompatibleModel
from xbt.compat.queries import compatible_queries
from xbt.compat.registry import PEER_METHODS, build_method
from xbt.data.pairs import Pair
from xbt.data.texts import load_texts
from xbt.errors import InputError
from xbt.data.distractors import GalleryExtra
from xbt.embed import DIRECTIONS, ExtraEmbeddings, PairEmbeddings, QueryVectors, embed_extras, embed_pairs
from xbt.eval.matrix import UpgradeMatrix, evaluate_upgrade
from xbt.metrics import DEFAULT_KS, estimate, hits_at_k, resampled_means, retrieval_ranks, retrieval_ranks_with_extras
from xbt.models.base import EmbeddingSpace, VLPModel
from xbt.models.device import describe, model_device, synchronize
from xbt.specs import load_model

RESULTS_SCHEMA = "xbt.results/1"
COST_BATCH_SIZES = (1, 256)
#: Seconds of repeated calls per batch size behind a query cost. The minimum over 0.1 s matched the one
#: over 0.3 s within run-to-run noise for the shipped maps (linear, residual MLP, SLERP, XBT's projections
#: at 512 -> 256, batch 1 and 256; see the commit that set it), at a third of the time.
COST_BUDGET_S = 0.1

MethodLike = Union[str, CompatMethod, CompatibleModel]


@dataclass
class MethodRecord:
    """What the report states about a method besides its recalls."""

    name: str
    kind: str  # peer (fitted in this run) | model (trained or loaded: compat:PATH)
    needs_old_model_at_query_time: bool
    fits_on: str
    query_cost_us: dict[int, float | None]  # batch size -> microseconds per query, on top of the encoder
    cost_note: str = ""
    fit_seconds: float | None = None  # a reused fit: the time its original fit took
    details: dict[str, Any] = field(default_factory=dict)
    fit_reused: bool = False  # a peer read back from the fit cache, not fitted in this run

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "needs_old_model_at_query_time": self.needs_old_model_at_query_time,
            "fits_on": self.fits_on, "query_cost_us": {str(b): c for b, c in self.query_cost_us.items()},
            "cost_note": self.cost_note, "fit_seconds": self.fit_seconds, "fit_reused": self.fit_reused,
            "details": self.details,
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
    compatible: dict[str, CompatibleModel] = field(default_factory=dict)  # not serialised: save_pretrained each
    # Not serialised either: what the matrix was computed from, for analyses on top of a run (pooling
    # hits over cross-validation folds, calibration): each method's queries and the old/new embeddings
    # of the evaluation pairs ("old", "new").
    queries: dict[str, QueryVectors] = field(default_factory=dict)
    embeddings: dict[str, PairEmbeddings] = field(default_factory=dict)
    # The gallery extras embedded by each model ("old", "new"), when the galleries have extras.
    extras: dict[str, ExtraEmbeddings] = field(default_factory=dict)

    def to_results(self) -> dict[str, Any]:
        """The results.json document (schema: docs/results-schema.md); strict JSON (NaN becomes null)."""
        from xbt.eval.recommend import recommend

        method, reason = recommend(self.matrix)
        results = {
            "schema": RESULTS_SCHEMA,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
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


# ----- query-time cost --------------------------------------------------------------------------------
def time_per_query_us(fn: Callable[[int], Any], batch_size: int, budget_s: float = COST_BUDGET_S,
                      max_calls: int = 2000) -> float:
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


def map_query_cost(query_map: QueryMap, batch_sizes: Sequence[int] = COST_BATCH_SIZES, seed: int = 0) -> dict[int, float]:
    """Microseconds per query a compatible model adds on top of its encoder(s): its query map + normalise
    (LoRA, if any, can be merged into the encoder's weights at no cost), at each batch size."""
    device = model_device(query_map)  # the inputs are made where the map runs (a GPU, after configure)
    generator = torch.Generator().manual_seed(seed)  # a CPU generator: the same inputs on every device
    largest = max(batch_sizes)
    new = torch.randn(largest, query_map.in_dim, generator=generator).to(device)  # cpu-only: drawn on the CPU, moved
    old = torch.randn(largest, query_map.out_dim, generator=generator).to(device)  # cpu-only: as above
    new, old = torch.nn.functional.normalize(new, dim=-1), torch.nn.functional.normalize(old, dim=-1)
    ensemble = old if query_map.needs_old_query else None

    @torch.inference_mode()
    def run(n: int) -> torch.Tensor:
        out = torch.nn.functional.normalize(query_map(new[:n], None if ensemble is None else ensemble[:n]), dim=-1)
        synchronize(device)  # a GPU runs asynchronously: the timer must wait for the result
        return out

    was_training = query_map.training
    query_map.eval()
    try:
        return {b: time_per_query_us(run, b) for b in batch_sizes}
    finally:
        query_map.train(was_training)


def query_cost(model: CompatibleModel, batch_sizes: Sequence[int] = COST_BATCH_SIZES, seed: int = 0) -> dict[int, float]:
    """Microseconds per query of a compatible model's map(s): with a map per tower, the costlier tower's
    (a query runs through one of them)."""
    costs = [map_query_cost(m, batch_sizes, seed) for m in dict.fromkeys(model.query_maps().values())]
    return {b: max(c[b] for c in costs) for b in batch_sizes}


def cost_note(model: CompatibleModel) -> str:
    maps = model.query_maps()
    what = (f"{maps['text'].kind} map" if model.shares_query_map
            else f"a map per tower (text queries: {maps['text'].kind}, image queries: {maps['image'].kind}; the costlier)")
    return f"{what} + normalise, per query" + ("; the old model encodes every query too"
                                               if model.needs_old_model_at_query_time else "")


# ----- method resolution ------------------------------------------------------------------------------
def _resolve_methods(
    methods: Sequence[MethodLike] | Mapping[str, MethodLike],
    new_space: EmbeddingSpace,
    old_space: EmbeddingSpace,
    method_options: Mapping[str, Mapping[str, Any]],
    like: VLPModel | None = None,
) -> dict[str, CompatMethod | CompatibleModel]:
    """name -> an unfitted peer or a compatible model: registry names are built, compat: specs loaded (on
    the device and at the precision of `like`, the new model, when given)."""
    items = list(methods.items()) if isinstance(methods, Mapping) else [(None, m) for m in methods]
    resolved: dict[str, CompatMethod | CompatibleModel] = {}
    for name, method in items:
        if isinstance(method, str):
            spec = method.strip()
            if spec.startswith("compat:"):
                method = load_model(spec)
                if like is not None:
                    method.configure(like.device, like.placement.precision, like.placement.num_workers)
                name = name or f"xbt:{Path(spec.removeprefix('compat:')).expanduser().name}"
            else:
                method = build_method(spec, new_space, old_space, **method_options.get(spec, {}))
                name = name or spec
        if not isinstance(method, (CompatMethod, CompatibleModel)):
            raise InputError(
                f"method {name or method!r} is a {type(method).__name__}; a method is a peer's name"
                f" ({', '.join(PEER_METHODS)}), a compat:PATH spec, a CompatMethod or a CompatibleModel")
        name = name or (method.name if isinstance(method, CompatMethod) else method.display_name)
        if name in resolved:
            raise InputError(f"method {name!r} is listed twice")
        resolved[name] = method
    return resolved


def map_queries(model: CompatibleModel, new_eval: PairEmbeddings, old_eval: PairEmbeddings) -> QueryVectors:
    """A map-only compatible model's queries from the new (and, for an ensemble, old) model's cached
    features of the evaluation items: no encoder runs."""
    ensemble = model.needs_old_model_at_query_time
    return QueryVectors(
        images=model.map_features(new_eval.images, old_eval.images if ensemble else None, tower="image"),
        texts=model.map_features(new_eval.texts, old_eval.texts if ensemble else None, tower="text"),
        space=model.space,
    )


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
    fit_cache: str | Path | None = None,
    fit_images: Sequence[Pair] = (),
    gallery_extra: GalleryExtra | None = None,
) -> EvaluationRun:
    """Embed everything once, fit each method on the training data only, and build the matrix.

    `gallery_extra`: unlabeled images and texts (xbt.data.distractors) added to every gallery that every
    system searches: embedded by the old model for old->old and every method, by the new model for the
    new->new ceiling; never queries, never fitted or tuned on.
    `fit_images`: unlabeled images (captions ignored) added to every image-side fit (procrustes-image and
    -both, the gallery-modality maps' text-query side, ...); they must not include evaluation items (a
    warning says so when they do).
    `data_efficiency`: numbers of training pairs at which the peers are refitted (on a seeded random
    subset) to trace recall against training data. `describe`: sources and specs to record verbatim.
    `skip_unfittable`: leave out (with a warning) peers whose training data was not given, e.g. the
    image-fitted ones when there is only a text corpus; otherwise that is an error. `fit_cache`: a
    folder of fitted peers (`PeerFitCache`): a peer fitted there before on the same data with the same
    settings is read back instead of fitted (its record says `fit_reused`, and its `fit_seconds` is the
    original fit's), a new fit is stored. The CompatMethod objects passed in stay unfitted when their fit
    is reused; the fitted models are in `run.compatible`. The data-efficiency refits are not cached.
    """
    if not eval_pairs:
        raise InputError("the evaluation set is empty")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    old_space, new_space = old_model.space, new_model.space
    resolved = _resolve_methods(methods, new_space, old_space, method_options or {}, like=new_model)
    old_eval = embed_pairs(old_model, eval_pairs, show_progress)
    new_eval = embed_pairs(new_model, eval_pairs, show_progress)
    support = None
    if support_pairs:
        support = (embed_pairs(new_model, support_pairs, show_progress), embed_pairs(old_model, support_pairs, show_progress))
    peers = {n: m for n, m in resolved.items() if isinstance(m, CompatMethod)}
    data = fit_data(old_model, new_model, fit_texts, fit_pairs, support, show_progress, fit_images) if peers else None
    extras: dict[str, ExtraEmbeddings] = {}
    if gallery_extra is not None:
        extras = {"old": embed_extras(old_model, gallery_extra, show_progress),
                  "new": embed_extras(new_model, gallery_extra, show_progress)}
    timings["embed"] = time.perf_counter() - t0

    queries: dict[str, QueryVectors] = {}
    records: dict[str, MethodRecord] = {}
    compatible: dict[str, CompatibleModel] = {}
    skipped: list[str] = []
    cache = PeerFitCache(fit_cache) if fit_cache is not None and peers else None
    data_digest = fit_data_digest(data) if cache is not None else ""
    for name, method in resolved.items():
        t = time.perf_counter()
        fit_seconds, reused = None, False
        if isinstance(method, CompatMethod):
            key = cache.key(method, (method_options or {}).get(method.name, {}), data_digest) if cache else None
            found = None
            if key is not None:
                try:
                    found = cache.load(key, new_model, old_model)
                except UnreadableFit as exc:
                    skipped.append(f"the cached fit of {name} ({cache.root / key}) could not be read ({exc});"
                                   " it was fitted again")
            if found is not None:
                (model, fit_seconds), reused = found, True
                fits_on = str(model.provenance.get("fits_on", method.fits_on))
            else:
                try:
                    method.fit(data)
                except InputError as exc:
                    if not skip_unfittable:
                        raise
                    skipped.append(f"{name} was left out: {exc}")
                    peers.pop(name, None)
                    continue
                fit_seconds = time.perf_counter() - t
                model = method.to_model(new_model, old_model if method.needs_old_model_at_query_time else None)
                fits_on = method.fits_on
                problem = cache.store(key, model, fit_seconds) if key is not None else None
                if problem:
                    skipped.append(f"the fit of {name} could not be stored in the fit cache {cache.root} ({problem})")
            kind = "peer"
        else:
            model, kind = method, "model"
            fits_on = str(model.provenance.get("fits_on", "trained (see the model's config)"))
        old_space.check(model.space, f"the queries of {name}")
        queries[name] = compatible_queries(model, eval_pairs, new_eval, old_eval, show_progress)
        compatible[name] = model
        details = dict(model.provenance.get("details", {})) | {"method": model.method}
        if kind == "model":
            details["spec"] = model.spec or None
        if not model.shares_query_map:
            details["query_maps"] = model.describe_query_maps()
        records[name] = MethodRecord(
            name, kind, model.needs_old_model_at_query_time, fits_on,
            query_cost(model, cost_batch_sizes, seed), cost_note(model), fit_seconds, details, fit_reused=reused,
        )
        timings[f"method:{name}"] = time.perf_counter() - t

    t = time.perf_counter()
    matrix = evaluate_upgrade(old_eval, new_eval, queries, ks, n_resamples, seed, extras.get("old"), extras.get("new"))
    matrix.method_info = {name: record.to_dict() for name, record in records.items()}
    timings["evaluate"] = time.perf_counter() - t

    curve: list[dict[str, Any]] = []
    if data_efficiency and peers:
        t = time.perf_counter()
        curve = data_efficiency_curve(
            old_model, new_model, old_eval, new_eval, peers, fit_texts, fit_pairs, support, data_efficiency,
            ks, n_resamples, seed, method_options or {}, extras.get("old"),
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
            "fit_images": {"source": description.get("fit_images"),
                           "n_images": len(fit_image_items(fit_pairs, fit_images)) - len(fit_pairs)},
            "support": {"source": description.get("support"), **_sizes(support_pairs or [])},
            "gallery_extra": gallery_extra_record(gallery_extra),
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
            **gallery_sizes(old_eval, extras.get("old")),
            **encoders_ran(old_model, new_model),
        },
        warnings=skipped + leakage_warnings(eval_pairs, fit_texts, fit_pairs, support_pairs or [], fit_images)
        + extra_overlap_warnings(eval_pairs, gallery_extra),
        timings_s=timings,
        data_efficiency=curve,
        compatible=compatible,
        queries=queries,
        embeddings={"old": old_eval, "new": new_eval},
        extras=extras,
    )


def gallery_sizes(gallery: PairEmbeddings, extras: ExtraEmbeddings | None) -> dict[str, int]:
    """The galleries every system searched: `gallery_images` (text-to-image) and `gallery_texts` (image-to-text)."""
    n_images = len(gallery.images) + (len(extras.images) if extras is not None else 0)
    n_texts = len(gallery.texts) + (len(extras.texts) if extras is not None else 0)
    return {"gallery_images": int(n_images), "gallery_texts": int(n_texts)}


def gallery_extra_record(extra: GalleryExtra | None) -> dict[str, Any] | None:
    if extra is None:
        return None
    return {"source": extra.source, "n_images": len(extra.images), "n_texts": len(extra.texts),
            "role": "gallery items only (never queries, never fitted or tuned on), in every system's galleries",
            "info": extra.info}


def extra_overlap_warnings(eval_pairs: Sequence[Pair], extra: GalleryExtra | None) -> list[str]:
    """Gallery extras that are evaluation items themselves (the same image file or caption): they would be
    counted as negatives although they are a query's own item."""
    if extra is None:
        return []
    captions = {p.caption.strip().lower() for p in eval_pairs}
    images = {str(Path(p.image).resolve()) for p in eval_pairs}
    shared_texts = sum(1 for t in extra.texts if t.strip().lower() in captions)
    shared_images = sum(1 for i in extra.images if str(Path(i).resolve()) in images)
    if not (shared_texts or shared_images):
        return []
    return [f"{shared_images} gallery-extra images and {shared_texts} gallery-extra texts are evaluation items"
            " themselves: they count as wrong answers, so every system's recall is understated"]


def encoders_ran(old_model: VLPModel, new_model: VLPModel) -> dict[str, Any]:
    """Where and at what precision the encoders ran: `device` and `precision` (the new model's; the old
    model's too when it differs). Vectors cached by an earlier run at the same precision are reused."""
    new, old = describe(new_model), describe(old_model)
    ran: dict[str, Any] = {"device": new["device"], "precision": new["precision"]}
    if (old["device"], old["precision"]) != (new["device"], new["precision"]):
        ran |= {"old_device": old["device"], "old_precision": old["precision"]}
    return ran


def _sizes(pairs: Sequence[Pair]) -> dict[str, int]:
    return {"n_pairs": len(pairs), "n_images": len({p.image_id for p in pairs})}


def leakage_warnings(
    eval_pairs: Sequence[Pair], fit_texts: Sequence[str], fit_pairs: Sequence[Pair], support_pairs: Sequence[Pair],
    fit_images: Sequence[Pair] = (),
) -> list[str]:
    """Evaluation captions or images that also appear in the data methods are fitted or tuned on."""
    eval_captions = {p.caption.strip().lower() for p in eval_pairs}
    eval_images = {p.image for p in eval_pairs}
    found = []
    for what, texts, images in (
        ("the training texts", [*fit_texts, *(p.caption for p in fit_pairs)], [p.image for p in fit_pairs]),
        ("the unlabeled fit images", [], [p.image for p in fit_images]),
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
    old_extras: ExtraEmbeddings | None = None,
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
            q = map_queries(method.to_model(new_model, old_model), new_eval, old_eval)
            if old_extras is None:
                ranks = retrieval_ranks(q.images, q.texts, old_eval.images, old_eval.texts, old_eval.caption_image_index)
            else:
                ranks = retrieval_ranks_with_extras(q.images, q.texts, old_eval.images, old_eval.texts, old_eval.caption_image_index,
                                                    old_extras.images, old_extras.texts,
                                                    [(len(old_extras.images), len(old_extras.texts))])[0]
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
    "fit_images": ["testbed:vlp_old"],  # the openclipart renders, unlabeled: never an eval or val item
    "data_efficiency": [25, 50, 100, 200],
}


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
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
    fit_images: Sequence[str] = (),
    gallery_extra: Sequence[str] = (),
) -> EvaluationRun:
    """`run_evaluation` from model specs and dataset sources (what `xbt evaluate` takes); both models (and
    any compat: method) run on `device` at `precision`. `fit_images`: sources of unlabeled images for the
    image-side fits (their captions, if any, are not used). `gallery_extra`: sources of gallery extras
    (xbt.data.distractors.load_gallery_extra), added to every system's galleries."""
    from xbt.data.datasets import open_dataset, open_images
    from xbt.data.distractors import load_gallery_extra, merge_extras

    eval_pairs = open_dataset(data, split, image_root)
    unlabeled = [p for source in fit_images for p in open_images(source, image_root)]
    texts = [t for source in fit_text for t in load_texts(source, fit_split, image_root)]
    train_pairs = [p for source in fit_pairs for p in open_dataset(source, fit_split, image_root)]
    support_pairs = open_dataset(support, support_split, image_root) if support else None
    if data_efficiency and train_pairs:
        data_efficiency = [*data_efficiency, len(train_pairs)]
    return run_evaluation(
        load_model(old).configure(device, precision, num_workers), load_model(new).configure(device, precision, num_workers),
        eval_pairs, list(methods), texts, train_pairs, support_pairs,
        ks=ks, n_resamples=n_resamples, seed=seed, data_efficiency=data_efficiency,
        skip_unfittable=skip_unfittable, show_progress=show_progress, fit_images=unlabeled,
        gallery_extra=merge_extras([load_gallery_extra(s) for s in gallery_extra]) if gallery_extra else None,
        describe={
            "old": old, "new": new, "eval": _source(data, split), "fit_texts": ", ".join(fit_text) or None,
            "fit_images": ", ".join(fit_images) or None,
            "fit_pairs": ", ".join(_source(s, fit_split) for s in fit_pairs) or None,
            "support": _source(support, support_split) if support else None,
        },
    )


def _source(source: str, split: str | None) -> str:
    return f"{source} (split {split})" if split and not source.startswith("testbed:") else source
