"""The cross-validated testbed evaluation: every Tux Paint caption group is an evaluation query once per seed.

    results = run_crossval(CrossValConfig(k=5, seeds=(0, 1, 2)), out="runs/cv")

For each seed and fold (xbt.data.folds): the fold's old and new testbed models are trained without the
fold's evaluation and val items (xbt.train.testbed.fold_models: heads on cached tower features, seconds),
every peer is fitted and every XBT variant trained on the fold's training data only, every choice (SLERP's
weight, the calibration's alpha, the old-query weight, epochs) is made on the fold's val split, and the
per-query hits of every system on the fold's evaluation gallery are saved (resumable: a finished fold is
never recomputed). Then the hits are pooled over folds (one query per caption group and direction), each
query's hit is averaged over the seeds, and the matrix is bootstrapped over the pooled queries, paired
across methods. The seed spread (the standard deviation over seeds of each seed's pooled figure) is
reported beside the interval. Galleries are the fold's evaluation items (about 141 with k = 5), so
recalls are higher than on the fixed split's 299-item gallery: compare methods within one protocol.

With gallery extras (`gallery_extra`, e.g. testbed:distractors: `xbt evaluate --testbed --folds 5
--gallery-extra testbed:distractors`), every gallery of every fold also holds them (the old model's for
old->old and every method, the fold's new model's for the ceiling; never queries, never fitted or tuned on),
and each fold is searched at its own size, at each of `gallery_sizes` and with every extra, in one pass over
the extras. Each size is pooled like the headline (the largest): its matrix, seed spread and paired
differences are under `crossval.gallery_sizes`, and a near-duplicate check of the extras against each
fold's evaluation items (cosine with the fold's new model) under `crossval.near_duplicates`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xbt.compat.registry import PEER_METHODS
from xbt.data.distractors import GalleryExtra
from xbt.data.folds import Fold, testbed_folds
from xbt.durable import atomic_write_bytes, atomic_write_text, code_digest
from xbt.errors import InputError
from xbt.eval.calibrated import CALIBRATED, calibrated_queries
from xbt.embed import DIRECTIONS, QueryVectors
from xbt.eval.matrix import UpgradeMatrix, matrix_from_hits, system_hits_at_sizes
from xbt.metrics import DEFAULT_KS, estimate, near_duplicates, resampled_means, update_gain
from xbt.eval.runner import RESULTS_SCHEMA, json_safe, run_evaluation
from xbt.compat.queries import compatible_queries
from xbt.paths import cache_dir, resolve_config

CV_FORMAT = "xbt.crossval/1"
OLD_QUERY = "+old-query"


@dataclass
class CrossValConfig:
    k: int = 5
    seeds: Sequence[int] = (0, 1, 2)
    peers: Sequence[str] = PEER_METHODS
    # XBT variants: name -> overrides of the base config (dotted paths, e.g. {"stage2.lora.enabled": False})
    xbt: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"xbt": {}})
    xbt_config: str = "xbt-testbed"
    calibrate: bool = True  # every method also searched with NNN calibration (alpha chosen on val)
    old_query: Sequence[str] = ("xbt",)  # XBT variants that also get the ensemble with the old query
    ks: Sequence[int] = DEFAULT_KS
    n_resamples: int = 1000
    # Fold splits whose images (captions ignored) are added, unlabeled, to every peer's image-side fit: e.g.
    # vlp_old (the openclipart renders; never an evaluated Tux Paint item nor a val item).
    fit_images: Sequence[str] = ()
    # Gallery extras (xbt.data.distractors sources, e.g. testbed:distractors): added to every gallery of every
    # fold, never queries. Each fold is then searched at its own gallery size, at each of `gallery_sizes`
    # (items per modality: the fold's items plus the first extras of one seeded order, the same for every
    # fold) and with every extra.
    gallery_extra: Sequence[str] = ()
    gallery_sizes: Sequence[int] = (1000,)

    def __post_init__(self) -> None:
        from xbt.data.folds import FOLD_SPLITS

        bad = [s for s in self.fit_images if s not in FOLD_SPLITS or s in ("eval", "val")]
        if bad:
            raise InputError(f"fit_images names fold splits to fit on ({', '.join(s for s in FOLD_SPLITS if s not in ('eval', 'val'))});"
                             f" not {', '.join(map(repr, bad))}: the evaluated and val items are never fitted on")

    def fold_key(self) -> str:
        """What a fold's saved hits depend on (the bootstrap settings do not)."""
        base = yaml.safe_load(resolve_config(self.xbt_config).read_text())
        doc = {"format": CV_FORMAT, "k": self.k, "peers": list(self.peers), "base": base,
               "xbt": {n: dict(o) for n, o in self.xbt.items()}, "calibrate": self.calibrate,
               "old_query": list(self.old_query), "ks": [int(k) for k in self.ks], "code": fold_code_digest()}
        if self.fit_images:  # absent when empty: folds saved before the option existed keep their key
            doc["fit_images"] = list(self.fit_images)
        if self.gallery_extra:  # likewise: the sources, their content and the sizes searched
            doc["gallery_extra"] = {"sources": list(self.gallery_extra), "digest": extras_digest(load_extras(self)),
                                    "sizes": [int(n) for n in self.gallery_sizes]}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_crossval_config(source: str | Path, **settings: Any) -> tuple[CrossValConfig, list[tuple[str, str]]]:
    """A cross-validation YAML (a file or a shipped name such as cv-testbed): the config (its fields, with
    `settings` such as k, seeds, ks, n_resamples given by the caller) and its `compare` list, the pairs of
    methods whose difference of mean gain is reported."""
    doc = yaml.safe_load(resolve_config(source).read_text()) or {}
    if not isinstance(doc, dict):
        raise InputError(f"{source}: a cross-validation config is a YAML mapping of CrossValConfig's fields")
    compare = [tuple(pair) for pair in doc.pop("compare", [])]
    if any(len(pair) != 2 for pair in compare):
        raise InputError(f"{source}: every `compare` entry is two method names [a, b]; quote names that hold a comma")
    unknown = sorted(set(doc) - set(CrossValConfig.__dataclass_fields__))
    if unknown:
        raise InputError(f"{source}: unknown field(s) {', '.join(unknown)}; a cross-validation config takes"
                         f" {', '.join(CrossValConfig.__dataclass_fields__)} and compare")
    return CrossValConfig(**(doc | settings)), compare


#: The seed of the one order of the extras whose prefixes make the intermediate gallery sizes.
EXTRAS_ORDER_SEED = 0
#: Cosine (the fold's new model) at or above which an extra counts as a near-duplicate of an evaluation item.
NEAR_DUPLICATE_COSINE = 0.95
_EXTRAS: dict[tuple[str, ...], GalleryExtra] = {}


def load_extras(cfg: CrossValConfig) -> GalleryExtra | None:
    """The configuration's gallery extras, merged, in one seeded order (so that the first n of them are a
    random subset, the same for every fold and seed); loaded once per process."""
    if not cfg.gallery_extra:
        return None
    key = tuple(cfg.gallery_extra)
    if key not in _EXTRAS:
        from xbt.data.distractors import load_gallery_extra, merge_extras

        extra = merge_extras([load_gallery_extra(s) for s in cfg.gallery_extra])
        rng = np.random.default_rng(EXTRAS_ORDER_SEED)
        extra.images = [extra.images[i] for i in rng.permutation(len(extra.images))]
        extra.texts = [extra.texts[i] for i in rng.permutation(len(extra.texts))]
        _EXTRAS[key] = extra
    return _EXTRAS[key]


def extras_digest(extra: GalleryExtra | None) -> str:
    """What the extras are (their image paths and texts, in order): part of a fold's key."""
    if extra is None:
        return ""
    return hashlib.sha256(json.dumps([extra.images, extra.texts]).encode()).hexdigest()[:16]


def extra_sizes(cfg: CrossValConfig, n_images: int, n_texts: int, extra: GalleryExtra) -> list[tuple[int, int]]:
    """The numbers of extra (images, texts) at each gallery size searched: none (the fold's own galleries), each
    of `cfg.gallery_sizes` (items per modality, the fold's included) that lies between, and every extra."""
    sizes = [(0, 0)]
    for total in sorted(int(n) for n in cfg.gallery_sizes):
        a, b = total - n_images, total - n_texts
        if 0 < a < len(extra.images) and 0 < b < len(extra.texts):
            sizes.append((a, b))
    sizes.append((len(extra.images), len(extra.texts)))
    return list(dict.fromkeys(sizes))


def fold_code_digest() -> str:
    """The code a fold's hits come from (models, data, methods, training, evaluation): part of the fold's key,
    so hits saved by older code are computed again, never mixed into a page made by newer code."""
    return code_digest("xbt.compat", "xbt.data", "xbt.eval", "xbt.models", "xbt.specs", "xbt.train")


def xbt_code_digest() -> str:
    """The code a fold's XBT run comes from: part of its folder's key under XBT_HOME/runs/cv-xbt."""
    return code_digest("xbt.compat", "xbt.data", "xbt.models", "xbt.train")


def xbt_config_for(cfg: CrossValConfig, variant: str, seed: int) -> dict[str, Any]:
    """The base XBT config with a variant's dotted-path overrides and the seed applied."""
    from xbt.train.config import apply_overrides

    doc = yaml.safe_load(resolve_config(cfg.xbt_config).read_text())
    return apply_overrides(doc, cfg.xbt[variant], f"XBT variant {variant!r}") | {"seed": seed}


# ----- one fold -------------------------------------------------------------------------------------
def train_fold_xbt(cfg: CrossValConfig, variant: str, fold: Fold, old, new, show_progress: bool = False):
    """The fold's XBT variant, trained on the fold's data only; kept under XBT_HOME/runs by (fold, config),
    so a variant shared by two cross-validation configs trains once (and a killed training resumes)."""
    from xbt.compat.model import CONFIG_NAME
    from xbt.specs import load_compatible
    from xbt.train.config import XBTConfig
    from xbt.train.stages import train_xbt

    doc = xbt_config_for(cfg, variant, fold.seed) | {"old": old.spec, "new": new.spec,
                                                      "train_pairs": f"{fold.name}/train", "text_corpus": f"{fold.name}/text_corpus"}
    keyed = doc | {"code": xbt_code_digest()}  # a run by older code is trained again, not reused
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out = cache_dir("runs", "cv-xbt") / f"{fold.name.replace('/', '-')}-{digest}"
    lora = doc["stage2"]["enabled"] and doc["stage2"]["lora"]["enabled"]
    adapted = copy.deepcopy(new) if lora else new  # LoRA goes into a copy; `new` stays the plain new model
    if (out / CONFIG_NAME).exists() and (out / "training_report.json").exists():
        return load_compatible(out, new_model=adapted)
    return train_xbt(XBTConfig.from_dict(doc), out, old=old, new=adapted, show_progress=show_progress,
                     train_pairs=fold.train, text_corpus=fold.text_corpus)


def _calibrated(model, queries: QueryVectors, fold: Fold, old, new, eval_old, extras=None) -> tuple[QueryVectors, dict[str, float]]:
    """The method's evaluation queries searched with NNN calibration; alpha chosen on the fold's val split
    (the bank: the method's queries of the fold's training pairs). Gallery extras get their bias from the
    same bank and alpha: nothing is chosen on them."""
    calibrated, choice = calibrated_queries(model, queries, eval_old, old, new, fold.train, fold.val, extras=extras)
    return calibrated, choice.alpha  # per direction


def run_fold(cfg: CrossValConfig, fold: Fold, out: Path, show_progress: bool = False) -> dict[str, Any]:
    """Every system's per-query hits on one fold (saved under `out`; reused if saved with the same key)."""
    from xbt.train.testbed import fold_models

    meta_path, hits_path = out / "fold.json", out / "hits.npz"
    key = cfg.fold_key()
    if meta_path.exists() and hits_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            with np.load(hits_path) as saved:
                meta["hits"] = {name: saved[name] for name in saved.files}
            return meta
    timings: dict[str, float] = {}
    t = time.perf_counter()
    models = fold_models(fold, show_progress)
    old, new = models["old"], models["new"]
    fit_images = [p for split in cfg.fit_images for p in getattr(fold, split)]
    if fit_images:  # the fold's heads over the towers' cached features of these images: no tower runs again
        from xbt.embed import prime_lit_cache

        for model in (old, new):
            prime_lit_cache(model, fit_images)
    # Gallery extras: embedded in run_evaluation by the fold's heads over the towers' cached features (no tower runs again).
    extra = load_extras(cfg)
    near = None
    if extra is not None:  # extras that are near-duplicates of this fold's evaluation items leave its galleries
        t_near = time.perf_counter()
        extra, near = drop_near_duplicates(extra, new, fold.eval)
        timings["near_duplicates"] = time.perf_counter() - t_near
    timings["models"] = time.perf_counter() - t
    methods: dict[str, Any] = {name: name for name in cfg.peers}
    for variant in cfg.xbt:
        t = time.perf_counter()
        methods[variant] = train_fold_xbt(cfg, variant, fold, old, new, show_progress)
        timings[f"train:{variant}"] = time.perf_counter() - t
    t = time.perf_counter()
    run = run_evaluation(old, new, fold.eval, methods, fit_texts=fold.text_corpus, fit_pairs=fold.train,
                         support_pairs=fold.val, ks=cfg.ks, n_resamples=10, seed=fold.seed, cost_batch_sizes=(256,),
                         skip_unfittable=True, show_progress=show_progress, fit_images=fit_images, gallery_extra=extra)
    timings["evaluate"] = time.perf_counter() - t
    timings["evaluate:embed"] = run.timings_s.get("embed", 0.0)
    queries = dict(run.queries)
    choices: dict[str, Any] = {}
    for variant in cfg.old_query:
        if variant not in run.compatible:
            raise InputError(f"old_query names {variant!r}, which is not an XBT variant of this run")
        from xbt.compat.old_query import choose_old_query_weight, with_old_query

        weight, _ = choose_old_query_weight(run.compatible[variant], old, fold.val)
        ensemble = with_old_query(run.compatible[variant], old, weight)
        run.compatible[variant + OLD_QUERY] = ensemble
        queries[variant + OLD_QUERY] = compatible_queries(ensemble, fold.eval, run.embeddings["new"], run.embeddings["old"])
        choices[variant + OLD_QUERY] = {"old_query_weight": weight}
    if cfg.calibrate:
        t = time.perf_counter()
        for name in list(queries):
            queries[name + CALIBRATED], alpha = _calibrated(
                run.compatible[name], queries[name], fold, old, new, run.embeddings["old"], run.extras.get("old"))
            choices.setdefault(name + CALIBRATED, {})["alpha"] = alpha
        timings["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    eval_old, eval_new = run.embeddings["old"], run.embeddings["new"]
    sizes = extra_sizes(cfg, len(eval_old.images), len(eval_old.texts), extra) if extra is not None else [(0, 0)]
    by_size = system_hits_at_sizes(eval_old, eval_new, queries, cfg.ks, run.extras.get("old"), run.extras.get("new"), sizes)
    hits = by_size[-1]  # every extra: the fold's headline galleries
    flat = {f"{s}|{d}|{k}": v for s, table in hits.items() for d, row in table.items() for k, v in row.items()}
    gallery = []
    for i, ((a, b), table) in enumerate(zip(sizes, by_size)):
        gallery.append({"label": size_label(i, len(sizes)), "extra_images": a, "extra_texts": b,
                        "gallery_images": len(eval_old.images) + a, "gallery_texts": len(eval_old.texts) + b})
        if i < len(sizes) - 1:
            flat |= {f"{gallery[-1]['label']}#{s}|{d}|{k}": v for s, t2 in table.items() for d, row in t2.items()
                     for k, v in row.items()}
    if extra is not None:
        timings["search_sizes"] = time.perf_counter() - t
    records = {name: record.to_dict() for name, record in run.methods.items()}
    for name in queries:
        if name not in records:  # derived systems: the record of what they derive from
            base = name.removesuffix(CALIBRATED).removesuffix(OLD_QUERY)
            records[name] = dict(records[base]) | {"derived_from": base}
            if OLD_QUERY in name:
                records[name]["needs_old_model_at_query_time"] = True
    meta = {
        "key": key, "code": fold_code_digest(), "fold": fold.name, "seed": fold.seed, "index": fold.index,
        "query_ids": [p.image_id for p in fold.eval],
        "sizes": {"eval": len(fold.eval), "val": len(fold.val), "train": len(fold.train), "text_corpus": len(fold.text_corpus),
                  "fit_images": run.data["fit_images"]["n_images"]},
        "models": {n: {"spec": m.spec, "space_id": m.space.id} for n, m in models.items()},
        "methods": records, "choices": choices, "warnings": run.warnings,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    if extra is not None:
        meta["gallery_sizes"] = gallery
        meta["near_duplicates"] = near
    if len(set(meta["query_ids"])) != len(fold.eval):
        raise InputError(f"fold {fold.name}: evaluation items are not one image per caption")
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    atomic_write_bytes(hits_path, buffer.getvalue())
    atomic_write_text(meta_path, json.dumps(json_safe(meta), indent=1))
    return meta | {"hits": flat}


def size_label(i: int, n: int) -> str:
    """The name of the i-th of n gallery sizes a fold was searched at: "fold" (no extras), "size1", ..., "full"."""
    return "fold" if i == 0 else ("full" if i == n - 1 else f"size{i}")


def near_duplicate_check(extra: GalleryExtra, extras_new, eval_new, eval_pairs: Sequence[Any],
                         threshold: float = NEAR_DUPLICATE_COSINE) -> dict[str, Any]:
    """The extras against the fold's evaluation items, embedded by the fold's new model: each extra image's
    highest cosine to any evaluation image, each extra text's to any evaluation caption (flagged ones named)."""
    from xbt.data.pairs import unique_images

    out: dict[str, Any] = {"model": "the fold's new model"}
    for side, rows, refs, names, ref_names in (
            ("images", extras_new.images, eval_new.images, extra.images, [p.image for p in unique_images(eval_pairs)]),
            ("texts", extras_new.texts, eval_new.texts, extra.texts, [p.caption for p in eval_pairs])):
        check = near_duplicates(rows, refs, threshold)
        for f in check["flagged"]:
            f["item_name"], f["reference_name"] = names[f["item"]], ref_names[f["reference"]]
        out[side] = check
    return out


def drop_near_duplicates(extra: GalleryExtra, new, eval_pairs: Sequence[Any],
                         threshold: float = NEAR_DUPLICATE_COSINE) -> tuple[GalleryExtra, dict[str, Any]]:
    """The extras without those at or above `threshold` (cosine, the fold's new model) to any of the fold's
    evaluation items (the same picture or caption as a query's own item would count as a wrong answer for
    every system alike), and the check (`near_duplicate_check`, with what was dropped). Every system's
    galleries hold the same remaining extras."""
    from xbt.embed import embed_extras, embed_pairs

    check = near_duplicate_check(extra, embed_extras(new, extra), embed_pairs(new, eval_pairs), eval_pairs, threshold)
    drop_images, drop_texts = set(check["images"]["indices"]), set(check["texts"]["indices"])
    kept = GalleryExtra([p for i, p in enumerate(extra.images) if i not in drop_images],
                        [t for i, t in enumerate(extra.texts) if i not in drop_texts], extra.source, extra.info)
    check["dropped"] = {"images": len(drop_images), "texts": len(drop_texts)}
    return kept, check


def sized_hits(fold: Mapping[str, Any], label: str) -> dict[str, Any]:
    """A fold's record with its hits at the gallery size `label` in place of the headline ones."""
    if label == "full":
        return fold
    prefix = label + "#"
    return dict(fold) | {"hits": {n.removeprefix(prefix): v for n, v in fold["hits"].items() if n.startswith(prefix)}}


# ----- pooling ----------------------------------------------------------------------------------------
def pool_hits(folds: Sequence[Mapping[str, Any]], ks: Sequence[int]) -> tuple[list[str], dict[str, dict[str, dict[int, np.ndarray]]]]:
    """One seed's folds -> (query ids, sorted; system -> direction -> K -> hits in that order)."""
    systems = [set(n.split("|")[0] for n in f["hits"] if "#" not in n) for f in folds]
    if any(s != systems[0] for s in systems):
        raise InputError("the folds of a seed evaluated different systems; rerun the missing ones")
    ids = [i for f in folds for i in f["query_ids"]]
    order = np.argsort(ids, kind="stable")
    pooled = {
        s: {d: {int(k): np.concatenate([f["hits"][f"{s}|{d}|{k}"] for f in folds])[order] for k in ks} for d in DIRECTIONS}
        for s in sorted(systems[0])
    }
    return [ids[i] for i in order], pooled


def seed_spread(per_seed: Sequence[UpgradeMatrix]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each seed's pooled figures (recalls and mean gain)."""
    def stats(values: list[float]) -> dict[str, float]:
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(np.nanmean(a)), "sd": float(np.nanstd(a, ddof=1)) if len(a) > 1 else 0.0,
                "values": [float(v) for v in a]}

    first = per_seed[0]
    out: dict[str, Any] = {"old_old": {}, "new_new": {}, "methods": {}}
    for d in DIRECTIONS:
        for k in first.ks:
            out["old_old"][f"{d}@{k}"] = stats([m.old_old[d][k].value for m in per_seed])
            out["new_new"][f"{d}@{k}"] = stats([m.new_new[d][k].value for m in per_seed])
    for name in first.methods:
        cells = {f"{d}@{k}": stats([m.methods[name][d][k].recall.value for m in per_seed]) for d in DIRECTIONS for k in first.ks}
        out["methods"][name] = {"recall": cells, "mean_gain": stats([m.mean_gain(name) for m in per_seed])}
    return out


def differences_vs(matrix_hits: Mapping[str, Any], a: str, b: str, ks: Sequence[int], n_resamples: int, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap interval of mean update gain(a) - mean update gain(b) over the six cells, on the
    pooled queries (both directions resampled, each with its own resamples as in the matrix)."""
    diffs = []
    points = []
    for d in DIRECTIONS:
        systems = ["old", "new", "method:" + a, "method:" + b]
        columns = np.stack([matrix_hits[s][d][int(k)] for s in systems for k in ks], axis=1)
        samples, point = resampled_means(columns, n_resamples, seed), columns.mean(0)
        nk = len(ks)
        for j in range(nk):
            o, n, ga, gb = (j, nk + j, 2 * nk + j, 3 * nk + j)
            diffs.append(update_gain(samples[:, ga], samples[:, o], samples[:, n]) - update_gain(samples[:, gb], samples[:, o], samples[:, n]))
            points.append(float(update_gain(point[ga], point[o], point[n]) - update_gain(point[gb], point[o], point[n])))
    e = estimate(np.nanmean(np.stack(diffs, axis=1), axis=1), float(np.nanmean(points)))
    return {"a": a, "b": b, "mean_gain_difference": e.to_dict(), "above_zero": bool(e.low > 0)}


def run_crossval(cfg: CrossValConfig, work_dir: str | Path | None = None, show_progress: bool = False,
                 command: str | None = None, compare: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Every fold of every seed (resumable: saved under `work_dir`, default XBT_HOME/runs/cv-KEY), pooled:
    the results.json document (schema xbt.results/1, with a `crossval` section: folds, seeds, per-fold
    sizes and choices, the seed spread and the requested paired differences of mean gain)."""
    from xbt.eval.recommend import recommend

    out = Path(work_dir) if work_dir is not None else cache_dir("runs") / f"cv-{cfg.fold_key()}"
    started = time.perf_counter()
    seed_folds: list[list[dict[str, Any]]] = []
    fold_meta = []
    for seed in cfg.seeds:
        folds = []
        for fold in testbed_folds(cfg.k, seed):
            folds.append(run_fold(cfg, fold, out / f"seed{seed}" / f"fold{fold.index}", show_progress))
            if show_progress:
                print(f"seed {seed} fold {fold.index}: done ({folds[-1]['timings_s']})", flush=True)
        seed_folds.append(folds)
        fold_meta += [{k: v for k, v in f.items() if k != "hits"} for f in folds]
    ids0, per_seed_matrix, mean_hits, matrix = _pooled(cfg, seed_folds, "full")
    records = _pooled_records(fold_meta)
    matrix.method_info = records
    method, reason = recommend(matrix)
    n = len(ids0 or [])
    extra = load_extras(cfg)
    sizes_section = _gallery_sizes_section(cfg, seed_folds, fold_meta, compare, records) if extra is not None else None
    results = {
        "schema": RESULTS_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "models": {"old": {"spec": "testbed:old recipe, retrained per fold (lit:…/cv/…/models/old)", "space_id": "per fold"},
                   "new": {"spec": "testbed:new recipe, retrained per fold (lit:…/cv/…/models/new)", "space_id": "per fold"}},
        "data": {
            "eval": {"source": f"testbed Tux Paint caption groups, {cfg.k} folds, pooled", "n_pairs": n, "n_images": n},
            "fit_texts": {"source": "each fold's text corpus (openclipart + training captions)",
                          "n_texts": int(np.mean([m["sizes"]["text_corpus"] for m in fold_meta]))},
            "fit_pairs": {"source": "each fold's Tux Paint training pairs", "n_pairs": int(np.mean([m["sizes"]["train"] for m in fold_meta])),
                          "n_images": int(np.mean([m["sizes"]["train"] for m in fold_meta]))},
            "fit_images": {"source": (f"each fold's {' + '.join(cfg.fit_images)} images, unlabeled (captions not used),"
                                      " for the image-side fits") if cfg.fit_images else None,
                           "n_images": int(np.mean([m["sizes"].get("fit_images", 0) for m in fold_meta]))},
            "support": {"source": "each fold's val split (every choice is made here)", "n_pairs": int(np.mean([m["sizes"]["val"] for m in fold_meta])),
                        "n_images": int(np.mean([m["sizes"]["val"] for m in fold_meta]))},
            "gallery_extra": ({"source": extra.source, "n_images": len(extra.images), "n_texts": len(extra.texts),
                               "role": "gallery items only, in every gallery of every fold (never queries, never fitted or"
                                       " tuned on; NNN's bank and alpha come from each fold's training and val data)",
                               "info": extra.info} if extra is not None else None),
        },
        "protocol": {
            "ks": [int(k) for k in cfg.ks], "n_resamples": cfg.n_resamples, "seed": 0, "confidence": 0.95, "search": "exact",
            "interval": "percentile bootstrap over the pooled queries (each query's hit averaged over seeds), paired across methods",
            "criterion": "M(new->old) > M(old->old) per cell; confident when the interval of the difference is above 0",
            "gain": "(M(new->old) - M(old->old)) / (M(new->new) - M(old->old)), percent",
            "cost_batch_sizes": [256], "device": "cpu", "precision": "fp32",
            # the galleries every system searched (per fold, the headline matrix's), as `xbt evaluate` records them
            "gallery_images": int(min(_full(m)["gallery_images"] for m in fold_meta)),
            "gallery_texts": int(min(_full(m)["gallery_texts"] for m in fold_meta)),
        },
        "methods": records,
        "matrix": matrix.to_dict(),
        "recommendation": {"method": method, "reason": reason},
        "data_efficiency": data_efficiency_rows(matrix, int(np.mean([m["sizes"]["train"] for m in fold_meta]))),
        "warnings": sorted({w for m in fold_meta for w in m.get("warnings", [])}),
        "timings_s": {"total": round(time.perf_counter() - started, 1)},
        "crossval": {
            "folds": cfg.k, "seeds": list(cfg.seeds), "pooled_queries": {"t2i": n, "i2t": n},
            "gallery_per_fold": [m["sizes"]["eval"] for m in fold_meta if m["seed"] == cfg.seeds[0]],
            "config": {"peers": list(cfg.peers), "xbt": {k: dict(v) for k, v in cfg.xbt.items()}, "xbt_config": cfg.xbt_config,
                       "calibrate": cfg.calibrate, "old_query": list(cfg.old_query), "fit_images": list(cfg.fit_images)},
            "folds_detail": [{k: m.get(k) for k in ("fold", "sizes", "choices", "timings_s", "code")} for m in fold_meta],
            # the code every fold's hits came from (one digest: fold hits saved by other code are recomputed)
            "code": sorted({m.get("code") or "unknown" for m in fold_meta}),
            "seed_spread": seed_spread(per_seed_matrix),
            "differences": [differences_vs(mean_hits, a, b, cfg.ks, cfg.n_resamples) for a, b in compare],
        },
    }
    if sizes_section is not None:
        results["crossval"]["gallery_sizes"] = sizes_section
        results["crossval"]["near_duplicates"] = _near_duplicate_summary(fold_meta)
        results["crossval"]["timings_s"] = {key: round(float(np.sum([m["timings_s"].get(key, 0.0) for m in fold_meta])), 1)
                                            for key in sorted({key for m in fold_meta for key in m["timings_s"]})}
    return json_safe(results)


def _full(meta: Mapping[str, Any]) -> dict[str, int]:
    """A fold's headline gallery sizes (with every extra; its own items when it has none)."""
    if meta.get("gallery_sizes"):
        return dict(meta["gallery_sizes"][-1])
    return {"gallery_images": int(meta["sizes"]["eval"]), "gallery_texts": int(meta["sizes"]["eval"])}


def _pooled(cfg: CrossValConfig, seed_folds: Sequence[Sequence[Mapping[str, Any]]], label: str):
    """(query ids, each seed's matrix, the seed-averaged hits, their matrix) at the gallery size `label`."""
    per_seed_hits, per_seed_matrix = [], []
    ids0 = None
    for seed, folds in zip(cfg.seeds, seed_folds):
        ids, pooled = pool_hits([sized_hits(f, label) for f in folds], cfg.ks)
        if ids0 is not None and ids != ids0:
            raise InputError("seeds pooled different evaluation queries")
        ids0 = ids
        per_seed_hits.append(pooled)
        per_seed_matrix.append(matrix_from_hits(pooled, cfg.ks, cfg.n_resamples, seed))
    # Each query's hit averaged over the seeds, then one paired bootstrap over the pooled queries.
    systems = per_seed_hits[0].keys()
    mean_hits = {s: {d: {int(k): np.mean([h[s][d][int(k)] for h in per_seed_hits], axis=0) for k in cfg.ks}
                     for d in DIRECTIONS} for s in systems}
    return ids0, per_seed_matrix, mean_hits, matrix_from_hits(mean_hits, cfg.ks, cfg.n_resamples, 0)


def _gallery_sizes_section(cfg: CrossValConfig, seed_folds, fold_meta, compare, records) -> list[dict[str, Any]]:
    """Every gallery size the folds were searched at, smallest first: the sizes (per fold), the pooled matrix,
    each method's mean update gain, the seed spread and the paired differences asked for."""
    labels = [g["label"] for g in fold_meta[0]["gallery_sizes"]]
    section = []
    for label in labels:
        per_fold = [next(g for g in m["gallery_sizes"] if g["label"] == label) for m in fold_meta]
        _, per_seed_matrix, mean_hits, matrix = _pooled(cfg, seed_folds, label)
        matrix.method_info = records
        section.append({
            "label": label,
            "gallery_images": {"min": min(g["gallery_images"] for g in per_fold), "max": max(g["gallery_images"] for g in per_fold)},
            "gallery_texts": {"min": min(g["gallery_texts"] for g in per_fold), "max": max(g["gallery_texts"] for g in per_fold)},
            "extra_images": per_fold[0]["extra_images"], "extra_texts": per_fold[0]["extra_texts"],
            "mean_gain": {name: matrix.mean_gain(name) for name in matrix.methods},
            "matrix": {k: v for k, v in matrix.to_dict().items() if k != "method_info"},
            "seed_spread": seed_spread(per_seed_matrix),
            "differences": [differences_vs(mean_hits, a, b, cfg.ks, cfg.n_resamples) for a, b in compare],
        })
    return section


def _near_duplicate_summary(fold_meta: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The folds' near-duplicate checks together: per modality, the largest cosine of any extra to any
    evaluation item and the extras at or above the threshold, over every fold."""
    out: dict[str, Any] = {"threshold": NEAR_DUPLICATE_COSINE, "model": "each fold's new model",
                           "action": "extras at or above the threshold to any of a fold's evaluation items are left out of"
                                     " that fold's galleries (every system's alike)"}
    for side in ("images", "texts"):
        checks = [m["near_duplicates"][side] for m in fold_meta if m.get("near_duplicates")]
        out[side] = {"max_cosine": max(c["max"] for c in checks if c["max"] is not None),
                     "median_of_fold_medians": float(np.median([c["quantiles"]["0.5"] for c in checks])),
                     "folds_with_any": sum(1 for c in checks if c["n_at_or_above"]),
                     "at_or_above_per_fold": [c["n_at_or_above"] for c in checks],
                     "dropped_per_fold": [m["near_duplicates"].get("dropped", {}).get(side, 0) for m in fold_meta
                                          if m.get("near_duplicates")],
                     "examples": [dict(f, fold=m["fold"]) for m in fold_meta if m.get("near_duplicates")
                                  for f in m["near_duplicates"][side]["flagged"][:3]][:10]}
    return out


def data_efficiency_rows(matrix: UpgradeMatrix, n_all: int) -> list[dict[str, Any]]:
    """The data-efficiency curve from variants named NAME@N (trained on N of the fold's pairs), with NAME
    itself as the point at all pairs (`n_all`: the folds' mean training size). Rows as `xbt evaluate`'s."""
    curves: dict[str, dict[int, str]] = {}
    for name in matrix.methods:
        base, _, n = name.rpartition("@")
        if base and n.isdigit():
            curves.setdefault(base, {})[int(n)] = name
    rows = []
    for base, points in curves.items():
        if base in matrix.methods:
            points[n_all] = base
        for n, name in sorted(points.items()):
            for d in DIRECTIONS:
                for k in matrix.ks:
                    r = matrix.methods[name][d][k].recall
                    rows.append({"method": base, "n_pairs": n, "direction": d, "k": int(k), "recall": r.value, "low": r.low, "high": r.high})
    return rows


def _pooled_records(fold_meta: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A method's record over folds: the first fold's, with the query cost as the median over folds."""
    records: dict[str, Any] = {}
    for name in fold_meta[0]["methods"]:
        first = dict(fold_meta[0]["methods"][name])
        costs = [m["methods"][name]["query_cost_us"].get("256") for m in fold_meta if name in m["methods"]]
        costs = [c for c in costs if c is not None]
        first["query_cost_us"] = {"256": float(np.median(costs)) if costs else None}
        first["fit_seconds"] = None
        first["fits_on"] = first.get("fits_on", "") + " (each fold's own)"
        records[name] = first
    return records


__all__ = ["CrossValConfig", "pool_hits", "run_crossval", "run_fold", "seed_spread", "xbt_config_for"]
