"""The in-place (gallery-side) migration's backfill curve beside the query-side one, on the cross-validated
testbed protocol (issue 26, part 3): R@1/5/10 against the fraction of the gallery backfilled, per strategy and
order, pooled over the folds, with 95% bootstrap intervals over the pooled queries; the area under each curve
and the fraction backfilled at which R@1 reaches start + 0.8 x (new - start) (`fraction_for_80pct_gain`).

    bench/python.sh  ->  PY;  flock /tmp/xbt-heavy.lock $PY bench/backfill_transformed.py   # the committed figures
    $PY bench/backfill_transformed.py --out docs/results/backfill-transformed-testbed   # .json, .md, .png

Per fold (`xbt.data.folds.testbed_folds`, `xbt.train.testbed.fold_models`), as bench/backfill_order.py:
    gallery            the fold's evaluation items (images for t2i, captions for i2t)
    query map          procrustes-gallery (`xbt.compat.gallery_modality`) fitted on the fold's training pairs, its
                       text corpus and its vlp_old images (unlabeled), as the cross-validation's cv-testbed config
    in-place, RT       the gallery's old vectors mapped by R^T (`xbt.gallery.transform.transposed_query_map`): the
                       image gallery by the transpose of the map fitted on images (the text tower's), the caption
                       gallery by the one fitted on texts; native new-model queries; a backfilled row gets its
                       exact new-model vector (`xbt.ranking.inplace_curve`)
    in-place, affine   the same with an old->new ridge affine map fitted directly (`xbt.gallery.transform.fitted_map`
                       "affine", on the gallery's modality: training + vlp_old images, or training captions + corpus)
    +cal               transformed rows' scores put on the native scale, s -> a s + b (`fit_row_calibration`, Platt
                       on the fold's val pairs, which neither fold model saw); deployable as a scaled vector + one
                       extra dimension
    benefit            `xbt.ranking.inplace_benefit.fit_inplace_benefit`, chosen on the fold's training pairs (and the
                       re-embedded vlp_old images / corpus texts for its heads), never the evaluation items
    benefit-val        the same choice made on the fold's val pairs (80 items neither fold model trained on; the
                       training pairs are the new model's own, on which it looks better than it is), never eval
    query-side         the same procrustes-gallery queries on the old gallery, merged with the new gallery's
                       backfilled items by the slot rule or the calibrated score rule (calibration on val), the
                       orders of bench/backfill_order.py (benefit chosen on the training pairs)
    oracle             a ceiling, not deployable (the measured benefit per item, from the new vectors and the
                       evaluated queries)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backfill_order import oracle_order  # noqa: E402  (the query-side oracle, reused)

from xbt.compat.fit import fit_peer  # noqa: E402
from xbt.data.folds import testbed_folds  # noqa: E402
from xbt.eval.backfill_curve import (  # noqa: E402
    area_difference,
    direction_sets,
    format_orders,
    order_curves,
    order_hits,
    orders_to_dict,
    plot_orders,
    pool_order_hits,
)
from xbt.ranking.merge import fit_score_calibration_pairs  # noqa: E402
from xbt.ranking.benefit import fit_benefit_pairs  # noqa: E402
from xbt.embed import embed_images, embed_pairs, embed_texts, prime_lit_cache  # noqa: E402
from xbt.ranking.inplace_benefit import CANDIDATES, fit_inplace_benefit, inplace_statistic  # noqa: E402
from xbt.ranking.inplace_curve import fit_row_calibration, inplace_direction_sets, inplace_hits, inplace_oracle_order  # noqa: E402
from xbt.eval.migration_strategy import migration_costs, recommend_strategy  # noqa: E402
from xbt.compat.queries import compatible_queries  # noqa: E402
from xbt.eval.runner import json_safe  # noqa: E402
from xbt.gallery.transform import fitted_map, transposed_query_map  # noqa: E402
from xbt.train.testbed import fold_models  # noqa: E402

COMPAT = "procrustes-gallery"
MODALITY = {"t2i": "image", "i2t": "text"}
TOWER = {"t2i": "text", "i2t": "image"}  # the query tower whose map fits the direction's gallery


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_fold(fold, fractions: list[float], n_random: int, seed: int, maps: list[str], diagnostics: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    models = fold_models(fold)
    old, new = models["old"], models["new"]
    for model in (old, new):
        prime_lit_cache(model, fold.vlp_old)
    compat = fit_peer(COMPAT, old, new, fit_texts=fold.text_corpus, fit_pairs=fold.train, fit_images=fold.vlp_old)
    emb = {split: {name: embed_pairs(m, getattr(fold, split)) for name, m in (("old", old), ("new", new))}
           for split in ("eval", "train", "val")}
    sample = {"t2i": {name: embed_images(m, fold.vlp_old) for name, m in (("old", old), ("new", new))},
              "i2t": {name: embed_texts(m, fold.text_corpus) for name, m in (("old", old), ("new", new))}}
    t_prep = time.perf_counter() - t0

    # ---- the old->new maps, per direction --------------------------------------------------------
    gallery_maps: dict[str, dict[str, Any]] = {}
    made_by: dict[str, dict[str, str]] = {}
    for m in maps:
        for d in ("t2i", "i2t"):
            if m == "RT":
                gmap = transposed_query_map(compat, TOWER[d])
            elif m == "affine":
                gmap = (fitted_map("affine", old, new, fit_pairs=fold.train, fit_images=[p.image for p in fold.vlp_old],
                                   fit_on="image") if d == "t2i" else
                        fitted_map("affine", old, new, fit_texts=fold.text_corpus, fit_pairs=fold.train, fit_on="text"))
            else:
                raise SystemExit(f"unknown map {m!r}")
            gallery_maps.setdefault(m, {})[d] = gmap.apply
            made_by.setdefault(m, {})[d] = gmap.made_by

    # ---- in-place hits ---------------------------------------------------------------------------
    rng = np.random.default_rng([seed, fold.index])
    n = {"t2i": len(emb["eval"]["old"].images), "i2t": len(emb["eval"]["old"].texts)}
    random_orders = {d: [rng.permutation(k) for _ in range(n_random)] for d, k in n.items()}
    hits: dict[str, Any] = {}
    meta_scorers: dict[str, Any] = {}
    meta_cal: dict[str, Any] = {}
    diag: dict[str, Any] = {}
    t1 = time.perf_counter()
    head_caches: dict[tuple[str, str], dict[int, Any]] = {}
    for m in maps:
        ev = inplace_direction_sets(emb["eval"]["old"], emb["eval"]["new"], gallery_maps[m])
        tr = inplace_direction_sets(emb["train"]["old"], emb["train"]["new"], gallery_maps[m])
        va = inplace_direction_sets(emb["val"]["old"], emb["val"]["new"], gallery_maps[m])
        for cal_name in ("", "+cal"):
            strategy = f"inplace-{m}{cal_name}"
            per: dict[str, Any] = {}
            for d in ("t2i", "i2t"):
                cal = fit_row_calibration(va[d][0], va[d][1], va[d][2], va[d][3]) if cal_name else None
                scorer = fit_inplace_benefit(tr[d][0], tr[d][1], tr[d][2], tr[d][3],
                                             sample_transformed=gallery_maps[m][d](sample[d]["old"]),
                                             sample_native=sample[d]["new"], seed=seed, calibration=cal,
                                             head_cache=head_caches.setdefault((m, d), {}))
                meta_scorers.setdefault(strategy, {})[d] = scorer.describe()
                # the same choice on the fold's val pairs (80 items neither fold model trained on; heads from the
                # other val parts + the sample): a check of the training pairs' bias, not the committed order
                scorer_val = fit_inplace_benefit(va[d][0], va[d][1], va[d][2], va[d][3],
                                                 sample_transformed=gallery_maps[m][d](sample[d]["old"]),
                                                 sample_native=sample[d]["new"], seed=seed, calibration=cal, n_parts=4)
                meta_scorers.setdefault(strategy + " (val)", {})[d] = scorer_val.describe()
                if cal is not None:
                    meta_cal.setdefault(strategy, {})[d] = cal.to_dict()
                t, nat, q, pos = ev[d]
                orders = {"random": random_orders[d], "oldest": np.arange(n[d]), "benefit": scorer.order(t), "benefit-val": scorer_val.order(t),
                          "oracle": inplace_oracle_order(t, nat, q, pos, cal)}
                if diagnostics and not cal_name:  # every candidate's order on the evaluation items: NOT a choice
                    for name in CANDIDATES:
                        stat = inplace_statistic(name, t, scorer.heads)
                        orders[f"stat:{name}"] = np.argsort(-stat, kind="stable")
                    orders["stat:true-error"] = np.argsort(-np.linalg.norm(_unit(t) - nat, axis=1), kind="stable")
                for o, order in orders.items():
                    per.setdefault(o, {})[d] = inplace_hits(t, nat, q, pos, fractions, order, seed=seed, calibration=cal)
            hits[strategy] = {o: v for o, v in per.items() if not o.startswith("stat:")}
            if diagnostics and not cal_name:
                diag[strategy] = {o: v for o, v in per.items() if o.startswith("stat:") or o == "random"}
    t_inplace = time.perf_counter() - t1

    # ---- query-side hits (the same queries through the same maps, on the old gallery) -----------
    t2 = time.perf_counter()
    queries = compatible_queries(compat, fold.eval, emb["eval"]["new"], emb["eval"]["old"])
    fit_q = compatible_queries(compat, fold.train, emb["train"]["new"], emb["train"]["old"])
    val_q = compatible_queries(compat, fold.val, emb["val"]["new"], emb["val"]["old"])
    cals = {d: fit_score_calibration_pairs(emb["val"]["old"], emb["val"]["new"], val_q, MODALITY[d]) for d in MODALITY}
    slot_scorers = {d: fit_benefit_pairs(emb["train"]["old"], emb["train"]["new"], fit_q, MODALITY[d], seed=seed) for d in MODALITY}
    score_scorers = {d: fit_benefit_pairs(emb["train"]["old"], emb["train"]["new"], fit_q, MODALITY[d], seed=seed,
                                          calibration=cals[d]) for d in MODALITY}
    galleries = {"t2i": emb["eval"]["old"].images, "i2t": emb["eval"]["old"].texts}
    sets = direction_sets(emb["eval"]["old"], queries, emb["eval"]["new"])
    for merge, scorers in (("slot", slot_scorers), ("score", score_scorers)):
        orders = {"random": random_orders, "oldest": {d: np.arange(k) for d, k in n.items()},
                  "benefit": {d: scorers[d].order(galleries[d]) for d in n},
                  "oracle": {d: oracle_order(sets[d], merge) for d in n}}
        hits[f"query-side-{merge}"] = order_hits(emb["eval"]["old"], queries, emb["eval"]["new"], orders, fractions,
                                                 seed=seed, merge=merge, calibrations=cals if merge == "score" else None)
    t_query = time.perf_counter() - t2
    # at 0% backfilled the RT gallery must rank as the query-side map does (<q, R^T g> = <R q, g>)
    check = {d: float(np.abs(hits["inplace-RT"]["random"][d][0.0][1] - hits["query-side-slot"]["random"][d][0.0][1]).max())
             for d in n} if "RT" in maps else {}
    return {
        "hits": hits, "diagnostics": diag,
        "meta": {"fold": fold.name, "sizes": {"eval": len(fold.eval), "train": len(fold.train), "val": len(fold.val),
                                              "vlp_old_images": len(sample["t2i"]["old"]), "corpus_texts": len(fold.text_corpus)},
                 "maps": made_by, "inplace_benefit": meta_scorers, "row_calibration": meta_cal,
                 "query_side_benefit": {"slot": {d: s.describe() for d, s in slot_scorers.items()},
                                        "score": {d: s.describe() for d, s in score_scorers.items()}},
                 "score_calibration": {d: c.to_dict() for d, c in cals.items()},
                 "rt_equals_query_side_at_0": check,
                 "timings_s": {"prepare": round(t_prep, 1), "inplace": round(t_inplace, 1), "query_side": round(t_query, 1)}},
    }


def _est(e: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not e or e.get("value") is None or not np.isfinite(e["value"]):
        return "-"
    if e.get("low") is None or e.get("high") is None or not np.isfinite(e["low"]):
        return fmt.format(e["value"])
    return f"{fmt.format(e['value'])} [{fmt.format(e['low'])}, {fmt.format(e['high'])}]"


def _fig_block(summary: dict[str, Any]) -> list[str]:
    lines = ["| strategy | order | direction | R@1 at 0% | R@1 at 100% | fraction for 80% of the gain | gain area (R@1) | area R@1 (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for s, per_s in summary.items():
        for o, per in per_s.items():
            for d, row in per.items():
                lines.append(f"| {s} | {o} | {d} | {row['r1_at_0']:.1f} | {row['r1_at_1']:.1f} |"
                             f" {_est(row['fraction_for_80pct_gain'])} | {_est(row['gain_area_r1'])} |"
                             f" {_est(row['area_r1'], '{:.1f}')} |")
    return lines


def write_page(result: dict[str, Any], path: Path, pngs: list[str]) -> None:
    p = result["protocol"]
    first = result["strategies"][next(iter(result["strategies"]))]["summary"]["random"]
    lines = [
        "# Backfilling in place: the transformed gallery's backfill curve beside the query-side one (cross-validated testbed)", "",
        f"Written by `{p['command']}` ({p['date']}, load average {p['load_average_start']} at the start,"
        f" {p['load_average_end']} at the end; {p['elapsed_s']:.0f} s).", "",
        f"Protocol: {p['folds']} folds of the testbed (`xbt.data.folds`, seed {p['fold_seed']}), the fold models; per fold the"
        " gallery is the fold's evaluation items; the query map is procrustes-gallery fitted on the fold's training pairs,"
        " text corpus and vlp_old images (the cv-testbed configuration). The folds' per-query hits are pooled"
        f" ({first['t2i']['n_queries']} t2i and {first['i2t']['n_queries']} i2t queries); intervals are 95% bootstrap over the"
        f" pooled queries ({p['n_resamples']} resamples). Random: {p['n_random']} random orders averaged per fold (the same"
        " orders for every strategy). Oldest: insertion order (on the testbed a seeded shuffle: in effect one more random"
        " order). Oracle: a ceiling, not deployable. Fractions 0, 0.05, ..., 1.", "",
        "Strategies: **inplace-RT**: the old gallery vectors mapped once by R^T, the transpose of the gallery-modality"
        " Procrustes map (the image gallery by the map fitted on images, the caption gallery by the one fitted on texts),"
        " native new-model queries, a backfilled row replaced by its exact new-model vector (one space, no merge rule);"
        " **inplace-affine**: the same with an old->new ridge affine map fitted directly on the gallery's modality"
        " (training + vlp_old images; training captions + corpus texts); **+cal**: the transformed rows' scores put on"
        " the native rows' scale, s -> a s + b (Platt on the fold's val pairs; deployable as the stored vector scaled by a"
        " and one extra dimension holding b); **query-side-slot / -score**: the same procrustes-gallery queries on the"
        " untouched old gallery, backfilled items served from a second, new gallery and merged by the rank-slot or the"
        " calibrated score rule (docs/results/backfill-order-testbed.md), the benefit order of `xbt.ranking.benefit`.", "",
        "`fraction_for_80pct_gain`: the smallest fraction backfilled at which R@1 reaches R@1(0) + 0.8 x (R@1(1) - R@1(0)),"
        " interpolated (the strategy's own start: compare starts in the R@1 at 0% column, and whole migrations by area R@1,"
        " the mean R@1 served over the migration). Gain area: the area under the normalised gain (0.5: a straight line).", "",
        "## Every strategy and order", "", *_fig_block({s: b["summary"] for s, b in result["strategies"].items()}), "",
    ]
    if result.get("paired"):
        lines += ["## Paired differences of area R@1 (points, pooled queries)", "", "| comparison | direction | area R@1 a - b |", "|---|---|---|"]
        for name, per in result["paired"].items():
            for d, e in per.items():
                lines.append(f"| {name} | {d} | {_est(e, '{:+.1f}')} |")
        lines.append("")
    if result.get("diagnostics"):
        lines += ["## Every benefit candidate on the evaluation items (a diagnostic, NOT how the order was chosen)", "",
                  "Each candidate statistic of `xbt.ranking.inplace_benefit` with the fold's heads, and the true transformation"
                  " error ||T(old) - new|| (not deployable), as orders of the raw in-place gallery:", "",
                  *_fig_block(result["diagnostics"]), ""]
    chosen = []
    for f in result["folds"]:
        per = f["meta"]["inplace_benefit"]
        chosen.append(f"{f['meta']['fold']}: " + "; ".join(f"{s} " + ", ".join(f"{d} {v['statistic']}" for d, v in dd.items())
                                                          for s, dd in per.items()))
    lines += ["## What the benefit order chose, per fold (on the training pairs)", "", *[f"- {c}" for c in chosen], ""]
    rec = result.get("recommendation")
    if rec:
        lines += ["## Which strategy (`xbt.eval.migration_strategy`)", "",
                  f"Compared: {rec['compared']} (paired, pooled queries); rates from `{rec['rates']['source']}`:"
                  f" {rec['rates']['transform_vectors_per_s']:,.0f} vectors/s transformed through the embedded store,"
                  f" {rec['rates']['encode_images_per_s']:.1f} images/s encoded by the testbed's new model (one CPU core).", "",
                  "| gallery items | strategy | vectors written before serving | peak vectors stored | hours before serving |"
                  " hours to encode every item | merge rule | ends in the new space |", "|---|---|---|---|---|---|---|---|"]
        for items, r in rec.items():
            if not items.isdigit():
                continue
            for name, c in r["costs"].items():
                lines.append(f"| {int(items):,} | {name} | {c['vectors_written_before_serving']:,} | {c['peak_vectors_stored']:,} |"
                             f" {c['seconds_before_serving'] / 3600:.2f} | {c['seconds_to_encode_everything'] / 3600:,.0f} |"
                             f" {'yes' if c['merge_rule'] else 'no'} | {'yes' if c['ends_in_new_space'] else 'no'} |")
        first = next(r for k, r in rec.items() if k.isdigit())
        lines += ["", f"Pick: **{first['pick']}**: {first['why']}.", "", *[f"- {x}" for x in first["reasons"][:-1]], ""]
    ref = result.get("reference")
    if ref:
        lines += ["## Reference: the committed query-side study (procrustes-both, docs/results/backfill-order-testbed.json)", "",
                  *_fig_block(ref), ""]
    lines += [f"![{png}]({png})" for png in pngs]
    lines += ["", result.get("notes", ""), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--maps", default="RT,affine")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-random", type=int, default=5)
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-folds", default="")
    parser.add_argument("--no-diagnostics", action="store_true")
    parser.add_argument("--out", default="docs/results/backfill-transformed-testbed")
    parser.add_argument("--reference", default="docs/results/backfill-order-testbed.json")
    parser.add_argument("--notes-file", default="")
    parser.add_argument("--rates", default="bench/results/transform.json", help="Measured transform and encoding rates (bench/transform.py) for the cost of each strategy.")
    args = parser.parse_args()
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    fractions = [i / args.steps for i in range(args.steps + 1)]
    folds = testbed_folds(args.folds, args.fold_seed)
    if args.only_folds:
        folds = [folds[int(i)] for i in args.only_folds.split(",")]
    maps = [m.strip() for m in args.maps.split(",") if m.strip()]
    per_fold = []
    for fold in folds:
        r = run_fold(fold, fractions, args.n_random, args.seed, maps, not args.no_diagnostics)
        per_fold.append(r)
        print(f"{fold.name}: {json.dumps(r['meta']['timings_s'])} RT==query-side at 0: {r['meta']['rt_equals_query_side_at_0']}", flush=True)
    strategies = list(per_fold[0]["hits"])
    pooled = {s: pool_order_hits([r["hits"][s] for r in per_fold]) for s in strategies}
    curves = {s: order_curves(pooled[s], seed=args.seed, n_resamples=args.n_resamples) for s in strategies}
    for s in strategies:
        print(f"{s}:\n{format_orders(curves[s])}", flush=True)
    diagnostics: dict[str, Any] = {}
    if not args.no_diagnostics:
        for s in per_fold[0]["diagnostics"]:
            pooled_d = pool_order_hits([r["diagnostics"][s] for r in per_fold])
            diagnostics[s] = orders_to_dict(order_curves(pooled_d, seed=args.seed, n_resamples=args.n_resamples))["summary"]
    paired: dict[str, Any] = {}
    pairs = [(f"{s} benefit - {s} random", (s, "benefit"), (s, "random")) for s in strategies]
    pairs += [(f"{s} benefit-val - {s} random", (s, "benefit-val"), (s, "random")) for s in strategies if s.startswith("inplace")]
    if "inplace-RT" in pooled:
        pairs += [("inplace-RT random - query-side-score random", ("inplace-RT", "random"), ("query-side-score", "random")),
                  ("inplace-RT benefit - query-side-score benefit", ("inplace-RT", "benefit"), ("query-side-score", "benefit")),
                  ("inplace-RT+cal random - inplace-RT random", ("inplace-RT+cal", "random"), ("inplace-RT", "random"))]
    if "inplace-affine" in pooled and "inplace-RT" in pooled:
        pairs += [("inplace-affine random - inplace-RT random", ("inplace-affine", "random"), ("inplace-RT", "random"))]
    for name, (sa, oa), (sb, ob) in pairs:
        if sa in pooled and sb in pooled:
            paired[name] = {d: area_difference(pooled[sa][oa][d], pooled[sb][ob][d], 1, args.seed, args.n_resamples).to_dict()
                            for d in ("t2i", "i2t")}
    # which strategy, for a gallery of the user's size: in place in an arbitrary order (random: the benefit order does
    # not help in place) against the query-side calibrated score merge with its benefit order
    recommendation: dict[str, Any] = {}
    if "inplace-RT" in pooled and Path(args.rates).exists():
        rates = json.loads(Path(args.rates).read_text())
        diff = {d: area_difference(pooled["inplace-RT"]["random"][d], pooled["query-side-score"]["benefit"][d], 1,
                                   args.seed, args.n_resamples).to_dict() for d in ("t2i", "i2t")}
        r1 = {"in-place": {d: curves["inplace-RT"]["random"][d].recall[1][0].value for d in ("t2i", "i2t")},
              "query-side": {d: curves["query-side-score"]["benefit"][d].recall[1][0].value for d in ("t2i", "i2t")}}
        for items in (1_000_000, 100_000_000):
            recommendation[str(items)] = recommend_strategy(
                diff, r1, migration_costs(items, rates["store"]["vectors_per_s"], rates["encode"]["images_per_s"]))
        recommendation["compared"] = "inplace-RT random vs query-side-score benefit"
        recommendation["rates"] = {"transform_vectors_per_s": rates["store"]["vectors_per_s"],
                                   "encode_images_per_s": rates["encode"]["images_per_s"], "source": args.rates}
    reference = None
    if args.reference and Path(args.reference).exists():
        ref = json.loads(Path(args.reference).read_text())
        reference = {f"committed query-side {m} (procrustes-both)": block["summary"] for m, block in ref["merges"].items()}
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "protocol": {
            "command": "python bench/backfill_transformed.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "folds": args.folds, "fold_seed": args.fold_seed,
            "folds_used": [f.index for f in folds], "query_map": COMPAT, "maps": maps, "fractions": fractions,
            "n_random": args.n_random, "n_resamples": args.n_resamples, "seed": args.seed,
            "benefit_fit": "the fold's training pairs (+ vlp_old images / corpus texts re-embedded for the heads)",
            "row_calibration_fit": "the fold's val pairs", "gallery": "the fold's evaluation items",
            "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "elapsed_s": round(time.perf_counter() - t0, 1),
        },
        "strategies": {s: orders_to_dict(curves[s]) for s in strategies},
        "paired": paired, "diagnostics": diagnostics, "reference": reference, "recommendation": recommendation,
        "folds": [{"meta": r["meta"]} for r in per_fold],
        "notes": Path(args.notes_file).read_text() if args.notes_file else "",
    }
    stem.with_suffix(".json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    # the plot: the in-place strategies' orders beside the query-side's best, R@1/5/10
    show = {f"{s} {o}": curves[s][o] for s, o in (("inplace-RT", "random"), ("inplace-RT", "benefit"), ("inplace-RT", "oracle"),
                                                  ("inplace-RT+cal", "random"), ("inplace-affine", "benefit"), ("inplace-affine", "benefit-val"),
                                                  ("query-side-score", "benefit"), ("query-side-score", "random"),
                                                  ("query-side-slot", "oracle"))
            if s in curves}
    png = stem.with_suffix(".png")
    plot_orders(show, png, title=f"in-place vs query-side backfill, {args.folds}-fold cross-validated testbed ({COMPAT})")
    write_page(result, stem.with_suffix(".md"), [png.name])
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
