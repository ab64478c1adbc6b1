"""Which items to backfill first, and which merge rule to serve by meanwhile, on the cross-validated
testbed protocol: R@1/5/10 of the merged search (the rank-slot rule and the calibrated score rule,
`xbt.ranking.merge.merge_rankings`) against the fraction of the gallery backfilled, for the random,
oldest-first, benefit and oracle orders, pooled over the folds, with 95% bootstrap intervals; the area
under each curve, the fraction backfilled at which R@1 reaches old + 0.8 x (new - old)
(`fraction_for_80pct_gain`), and the paired difference of area R@1 score - slot per order.

    bench/python.sh  ->  PY;  flock /tmp/xbt-heavy.lock $PY bench/backfill_order.py --benefit-merge   # the committed figures
    $PY bench/backfill_order.py --folds 5 --out docs/results/backfill-order-testbed   # .json, .md, .png, -score.png
    $PY bench/backfill_order.py --calibrate-on train ...   # the score rule calibrated on the new model's own training pairs

Per fold (`xbt.data.folds.testbed_folds`, `xbt.train.testbed.fold_models`):
    gallery           the fold's evaluation items (old-model vectors; images for t2i, captions for i2t)
    old / new models  the fold's testbed models, trained without the fold's evaluation and val items
    compatible model  --compat (procrustes-both) fitted on the fold's training pairs (--corpus: and its text
                      corpus, whose ~1900 texts both fold models then embed: minutes per fold on CPU)
    benefit scorer    `xbt.ranking.benefit.fit_benefit_pairs` on the fold's training pairs (never the
                      evaluation items): the statistic is chosen there (under the slot rule; with
                      --benefit-merge score also a scorer chosen under the score rule, order "benefit-score"),
                      its query bank is the compatible model's queries of those pairs
    score calibration `xbt.ranking.merge.fit_score_calibration_pairs` per direction on --calibrate-on
                      (train: the fold's training pairs, which the fold's new model was trained on; val: the
                      fold's val pairs, which neither fold model saw)
    random            --n-random random orders, hits averaged; oldest: the gallery's insertion order (on the
                      testbed the fold's evaluation list, itself a seeded shuffle of caption groups)
    oracle            a ceiling, not deployable: the order by each item's measured benefit under the
                      merge rule it is measured with (`oracle_order`)
The per-query hits of the folds are pooled (every testbed caption group is an evaluation query once).
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

from xbt.compat.fit import fit_peer
from xbt.data.folds import testbed_folds
from xbt.ranking.merge import MERGE_RULES, fit_score_calibration_pairs
from xbt.eval.backfill_curve import area_difference, curve_from_hits, direction_sets, format_orders, order_curves, order_hits, orders_to_dict, plot_orders, pool_order_hits
from xbt.ranking.benefit import fit_benefit_pairs
from xbt.embed import embed_pairs
from xbt.compat.queries import compatible_queries
from xbt.eval.runner import json_safe
from xbt.train.testbed import fold_models

ORDERS = ("random", "oldest", "benefit", "oracle")


def oracle_order(sets, merge: str = "slot") -> np.ndarray:
    """NOT deployable, a ceiling: the order by each item's measured benefit, which needs what the benefit order
    must do without (the new model's gallery vectors and the evaluated queries themselves). Per item: +1 for
    its own query that the compatible model misses and the new model finds at R@1, -1 for its own query that
    only the compatible model finds; under the slot rule also +1 for each gaining query whose wrong
    compatible top result it is (its slot must open); under the score rule an item's benefit is its own
    queries' gain only."""
    old_g, new_g, compat_q, new_q, positives = sets
    compat_top = np.argmax(compat_q @ old_g.T, axis=1)
    new_top = np.argmax(new_q @ new_g.T, axis=1)
    value = np.zeros(len(old_g))
    for q, pos in enumerate(positives):
        compat_hit, new_hit = compat_top[q] in pos, new_top[q] in pos
        if new_hit and not compat_hit:
            value[list(pos)] += 1
            if merge == "slot":
                value[compat_top[q]] += 1
        elif compat_hit and not new_hit:
            value[list(pos)] -= 1
    return np.argsort(-value, kind="stable")


def run_fold(fold, compat_name: str, fractions: list[float], n_random: int, seed: int, corpus: bool,
             merges: list[str], calibrate_on: str, benefit_merge: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    models = fold_models(fold)
    old, new = models["old"], models["new"]
    t_models = time.perf_counter() - t0
    t_c = time.perf_counter()
    compat = fit_peer(compat_name, old, new, fit_texts=fold.text_corpus if corpus else (), fit_pairs=fold.train)
    t_compat = time.perf_counter() - t_c
    t_e = time.perf_counter()
    old_eval, new_eval = embed_pairs(old, fold.eval), embed_pairs(new, fold.eval)
    queries = compatible_queries(compat, fold.eval, new_eval, old_eval)
    old_fit, new_fit = embed_pairs(old, fold.train), embed_pairs(new, fold.train)
    fit_queries = compatible_queries(compat, fold.train, new_fit, old_fit)
    if calibrate_on == "train":
        old_cal, new_cal, cal_queries = old_fit, new_fit, fit_queries
    else:
        old_cal, new_cal = embed_pairs(old, fold.val), embed_pairs(new, fold.val)
        cal_queries = compatible_queries(compat, fold.val, new_cal, old_cal)
    t_embed = time.perf_counter() - t_e
    modalities = (("t2i", "image"), ("i2t", "text"))
    calibrations = {d: fit_score_calibration_pairs(old_cal, new_cal, cal_queries, m) for d, m in modalities}
    t1 = time.perf_counter()
    scorers = {d: fit_benefit_pairs(old_fit, new_fit, fit_queries, modality, seed=seed) for d, modality in modalities}
    scorers_score = ({d: fit_benefit_pairs(old_fit, new_fit, fit_queries, modality, seed=seed,
                                           calibration=calibrations[d]) for d, modality in modalities}
                     if benefit_merge else {})
    t_fit = time.perf_counter() - t1
    sizes = {"t2i": len(old_eval.images), "i2t": len(old_eval.texts)}
    galleries = {"t2i": old_eval.images, "i2t": old_eval.texts}
    rng = np.random.default_rng([seed, fold.index])
    common = {
        "random": {d: [rng.permutation(n) for _ in range(n_random)] for d, n in sizes.items()},
        "oldest": {d: np.arange(n) for d, n in sizes.items()},
        "benefit": {d: scorers[d].order(galleries[d]) for d in sizes},
        **({"benefit-score": {d: scorers_score[d].order(galleries[d]) for d in sizes}} if benefit_merge else {}),
    }
    sets = direction_sets(old_eval, queries, new_eval)
    t2 = time.perf_counter()
    hits = {}
    for merge in merges:
        orders = {**common, "oracle": {d: oracle_order(sets[d], merge) for d in sets}}
        hits[merge] = order_hits(old_eval, queries, new_eval, orders, fractions, seed=seed, merge=merge,
                                 calibrations=calibrations if merge == "score" else None)
    return {
        "hits": hits,
        "meta": {
            "fold": fold.name, "sizes": {"eval": len(fold.eval), "train": len(fold.train), "val": len(fold.val)},
            "models": {n: m.spec for n, m in models.items()}, "compat": compat_name, "compat_fit_texts": "text corpus + training captions" if corpus else "training captions",
            "benefit_scorer": {d: s.describe() for d, s in scorers.items()},
            **({"benefit_scorer_score": {d: s.describe() for d, s in scorers_score.items()}} if benefit_merge else {}),
            "score_calibration": {d: c.to_dict() for d, c in calibrations.items()}, "calibrated_on": calibrate_on,
            "timings_s": {"models": round(t_models, 1), "compat_fit": round(t_compat, 1), "embed": round(t_embed, 1),
                          "benefit_fit": round(t_fit, 1),
                          "curves": round(time.perf_counter() - t2, 1)},
        },
    }


def _save_fold(path: Path, key: str, r: dict[str, Any]) -> None:
    flat = {f"{m}|{o}|{d}|{f!r}|{k}": v for m, per_merge in r["hits"].items() for o, per in per_merge.items()
            for d, h in per.items() for f, row in h.items() for k, v in row.items()}
    np.savez(path.with_suffix(".npz"), **flat)
    path.with_suffix(".json").write_text(json.dumps(json_safe({"key": key, "meta": r["meta"]}), indent=1))


def _load_fold(path: Path, key: str) -> dict[str, Any] | None:
    if not (path.with_suffix(".json").exists() and path.with_suffix(".npz").exists()):
        return None
    saved = json.loads(path.with_suffix(".json").read_text())
    if saved.get("key") != key:
        return None
    hits: dict[str, Any] = {}
    with np.load(path.with_suffix(".npz")) as z:
        for name in z.files:
            m, o, d, f, k = name.split("|")
            hits.setdefault(m, {}).setdefault(o, {}).setdefault(d, {}).setdefault(float(f), {})[int(k)] = z[name]
    return {"hits": hits, "meta": saved["meta"]}


def fold_summary(hits: dict, seed: int) -> dict[str, Any]:
    """Each fold's own R@1 gain fraction per merge rule and order (no intervals: a spread across folds)."""
    out: dict[str, Any] = {}
    for m, per_merge in hits.items():
        for o, per in per_merge.items():
            for d, h in per.items():
                c = curve_from_hits(h, d, o, seed, n_resamples=0)
                out.setdefault(m, {}).setdefault(o, {})[d] = {
                    "fraction_for_80pct_gain": c.gain_fraction.value if c.gain_fraction else None,
                    "gain_area_r1": c.gain_area[1].value, "area_r1": c.area[1].value, "r1_at_0": c.recall[1][0].value,
                    "r1_at_1": c.recall[1][-1].value}
    return out


def _est(e: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not e or e.get("value") is None:
        return "-"
    if e.get("low") is None or e.get("high") is None:
        return fmt.format(e["value"])
    return f"{fmt.format(e['value'])} [{fmt.format(e['low'])}, {fmt.format(e['high'])}]"


def write_page(result: dict[str, Any], path: Path, png_names: dict[str, str]) -> None:
    p = result["protocol"]
    merges = result["merges"]
    first = next(iter(merges.values()))["summary"]
    used = p.get("folds_used", list(range(len(result["folds"]))))
    written = (f"Written by `{p['command']}` ({p['date']}, load average {p['load_average_start']} at the start,"
               f" {p['load_average_end']} at the end; {p['elapsed_s']:.0f} s).")
    protocol = (f"Protocol: {p['folds']} folds of the testbed (`xbt.data.folds`, seed {p['fold_seed']}); per fold the"
                " gallery is the fold's evaluation items, the old/new models are the fold's testbed models (trained"
                f" without them), the compatible model is {p['compat']} fitted on {p.get('compat_fit', 'the fold training pairs')}, and the"
                " benefit scorer is chosen on the fold's training pairs only. The folds' per-query hits are pooled"
                f" ({first['random']['t2i']['n_queries']} t2i and {first['random']['i2t']['n_queries']} i2t queries); intervals"
                f" are 95% bootstrap over the pooled queries ({p['n_resamples']} resamples). Random: {p['n_random']}"
                " random orders averaged per fold (the same orders under both rules). Oldest: insertion order (on the testbed the fold's evaluation list,"
                " a seeded shuffle of caption groups: in effect one more random order). Oracle: a ceiling, not"
                " deployable (each item's measured benefit under the rule measured, from the new gallery vectors and"
                f" the evaluated queries). Fractions {', '.join(f'{x:g}' for x in p['fractions'][:3])}, ..., 1.")
    rules = ("Merge rules (`xbt.ranking.merge.merge_rankings`): **slot**, the rank-slot rule (slots the"
             " compatible ranking gives to backfilled items are refilled by the new model's ranking over the"
             " backfilled items); **score**, the calibrated score rule (each space's inner products mapped to"
             " P(match) by Platt scaling fitted on " + ("the fold's training pairs" if p.get("calibrate_on") == "train"
                                                       else "the fold's val pairs") + ", one map for the compatible"
             " queries against the old gallery and one for the new queries against the new gallery; the merged"
             " ranking is the union of the old-gallery hits of items not yet backfilled and the new-gallery hits of"
             " backfilled items, by calibrated score).")
    terms = ("`fraction_for_80pct_gain`: the smallest fraction backfilled at which R@1 reaches old + 0.8 x (new - old),"
             " linearly interpolated between measured fractions (old = R@1 at 0% backfilled, i.e. compatible queries"
             " on the old gallery; new = R@1 at 100%, the new model alone). Gain area: the area under (R@1(f) -"
             " R@1(0)) / (R@1(1) - R@1(0)), 1 if all the gain came at once, 0.5 for a straight line. Area R@1: the"
             " mean R@1 served over the migration.")
    partial = (f"**Only fold{'s' if len(used) > 1 else ''} {', '.join(map(str, used))} of the {p['folds']} folds"
               " ran** (the others did not: see the reading below).")
    lines = [
        "# Which items to backfill first, and how to merge meanwhile (cross-validated testbed)", "", written, "",
        protocol, "", rules, "", terms, "",
        *([] if len(used) == p["folds"] else [partial, ""]),
        "| merge | order | direction | R@1 at 0% | R@1 at 100% | fraction for 80% of the gain | gain area (R@1) | area R@1 (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, block in merges.items():
        for o, per in block["summary"].items():
            for d, row in per.items():
                lines.append(f"| {m} | {o} | {d} | {row['r1_at_0']:.1f} | {row['r1_at_1']:.1f} |"
                             f" {_est(row['fraction_for_80pct_gain'])} | {_est(row['gain_area_r1'])} |"
                             f" {_est(row['area_r1'], '{:.1f}')} |")
    if result.get("score_vs_slot"):
        lines += ["", "Paired difference of area R@1 (points), score rule - slot rule, per query over the pooled"
                  " queries (the same queries and, except the oracle, the same orders):", "",
                  "| order | direction | area R@1 score - slot (points) |", "|---|---|---|"]
        for o, per in result["score_vs_slot"].items():
            for d, e in per.items():
                lines.append(f"| {o} | {d} | {_est(e['area_r1'], '{:+.1f}')} |")
    if result.get("vs_random"):
        lines += ["", "Paired difference of area R@1 (points), each order - random, under the same rule (pooled queries):",
                  "", "| merge | order | direction | area R@1 order - random (points) |", "|---|---|---|---|"]
        for m, per_merge in result["vs_random"].items():
            for o, per in per_merge.items():
                for d, e in per.items():
                    lines.append(f"| {m} | {o} | {d} | {_est(e['area_r1'], '{:+.1f}')} |")
    lines += ["", "Per fold (R@1 fraction for 80% of the gain; no intervals):", "",
              "| merge | order | direction | " + " | ".join(f"fold {i}" for i in used) + " |",
              "|---|---|---|" + "---|" * len(used)]
    for m, block in merges.items():
        for o in block["summary"]:
            for d in block["summary"][o]:
                vals = [f["summary"][m][o][d]["fraction_for_80pct_gain"] for f in result["folds"]]
                lines.append(f"| {m} | {o} | {d} | " + " | ".join("-" if v is None or not np.isfinite(v) else f"{v:.2f}"
                                                                  for v in vals) + " |")
    chosen = [f"fold {used[i]}: t2i {f['meta']['benefit_scorer']['t2i']['statistic']}, i2t {f['meta']['benefit_scorer']['i2t']['statistic']}"
              for i, f in enumerate(result["folds"])]
    lines += ["", "Benefit statistic chosen per fold (on its training pairs, under the slot rule): " + "; ".join(chosen) + "."]
    if "benefit_scorer_score" in result["folds"][0]["meta"]:
        chosen = [f"fold {used[i]}: t2i {f['meta']['benefit_scorer_score']['t2i']['statistic']}, i2t"
                  f" {f['meta']['benefit_scorer_score']['i2t']['statistic']}" for i, f in enumerate(result["folds"])]
        lines += ["", "Benefit statistic chosen per fold under the score rule (order `benefit-score`): " + "; ".join(chosen) + "."]
    cals = []
    for i, f in enumerate(result["folds"]):
        c = f["meta"]["score_calibration"]
        cals.append(f"fold {used[i]}: " + ", ".join(
            f"{d} old {c[d]['old'][0]:.1f}s{c[d]['old'][1]:+.1f}, new {c[d]['new'][0]:.1f}s{c[d]['new'][1]:+.1f}" for d in c))
    lines += ["", "Score calibrations (log-odds of a match = a s + b, per fold and direction): " + "; ".join(cals) + ".", ""]
    lines += [f"![backfill curves, {m} rule]({png})" for m, png in png_names.items()]
    lines += ["", result.get("notes", ""), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--compat", default="procrustes-both", help="The compatible model: a peer of xbt.compat.registry, fitted per fold.")
    parser.add_argument("--corpus", action="store_true", help="Fit the compatible model on the fold's text corpus too (its texts are embedded by both fold models: minutes per fold on CPU); default: the training pairs only.")
    parser.add_argument("--merge", default="slot,score", help="Comma-separated merge rules to measure: slot, score.")
    parser.add_argument("--calibrate-on", choices=("train", "val"), default="val", help="The pairs the score rule's calibration is fitted on: the fold's training pairs (the new model's own training data) or its val pairs (seen by neither fold model).")
    parser.add_argument("--benefit-merge", action="store_true", help="Also the order `benefit-score`: the benefit statistic chosen under the score rule.")
    parser.add_argument("--steps", type=int, default=20, help="Fractions 0, 1/steps, ..., 1.")
    parser.add_argument("--n-random", type=int, default=5)
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-folds", default="", help="Comma-separated fold indices (a quick look; the figures use all).")
    parser.add_argument("--out", default="docs/results/backfill-order-testbed", help="Output stem: writes STEM.json, STEM.md, STEM.png (slot rule) and STEM-score.png.")
    parser.add_argument("--work", default="", help="Keep each fold's hits here and reuse them on a rerun with the same settings (a run stopped part-way resumes).")
    parser.add_argument("--notes", default="", help="A paragraph appended to the page (the reading of the figures).")
    parser.add_argument("--notes-file", default="", help="Read the notes from this file.")
    args = parser.parse_args()
    merges = [m.strip() for m in args.merge.split(",") if m.strip()]
    if not merges or any(m not in MERGE_RULES for m in merges):
        parser.error(f"--merge takes {', '.join(MERGE_RULES)}, not {args.merge!r}")
    notes = Path(args.notes_file).read_text() if args.notes_file else args.notes
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    fractions = [i / args.steps for i in range(args.steps + 1)]
    folds = testbed_folds(args.folds, args.fold_seed)
    if args.only_folds:
        folds = [folds[int(i)] for i in args.only_folds.split(",")]
    per_fold = []
    key = json.dumps([args.compat, args.corpus, fractions, args.n_random, args.seed, list(ORDERS), merges,
                      args.calibrate_on, args.benefit_merge])
    for fold in folds:
        cached = Path(args.work) / f"k{args.folds}-s{args.fold_seed}-fold{fold.index}" if args.work else None
        r = _load_fold(cached, key) if cached else None
        if r is None:
            r = run_fold(fold, args.compat, fractions, args.n_random, args.seed, args.corpus, merges, args.calibrate_on,
                         args.benefit_merge)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                _save_fold(cached, key, r)
        r["summary"] = fold_summary(r["hits"], args.seed)
        per_fold.append(r)
        print(f"{fold.name}: {json.dumps(r['meta']['timings_s'])} "
              + "; ".join(f"{m} {o} {d} {v['fraction_for_80pct_gain']:.2f}" for m, pm in r["summary"].items()
                          for o, per in pm.items() for d, v in per.items()), flush=True)
    pooled = {m: pool_order_hits([r["hits"][m] for r in per_fold]) for m in merges}
    curves = {m: order_curves(pooled[m], seed=args.seed, n_resamples=args.n_resamples) for m in merges}
    for m in merges:
        print(f"merge {m}:\n{format_orders(curves[m])}")
    paired: dict[str, Any] = {}
    if {"slot", "score"} <= set(merges):
        for o in pooled["slot"]:
            for d in pooled["slot"][o]:
                e = area_difference(pooled["score"][o][d], pooled["slot"][o][d], 1, args.seed, args.n_resamples)
                paired.setdefault(o, {})[d] = {"area_r1": e.to_dict()}
                print(f"area R@1 score - slot, {o} {d}: {e}")
    vs_random: dict[str, Any] = {}
    for m in merges:
        for o in pooled[m]:
            if o != "random":
                for d in pooled[m][o]:
                    e = area_difference(pooled[m][o][d], pooled[m]["random"][d], 1, args.seed, args.n_resamples)
                    vs_random.setdefault(m, {}).setdefault(o, {})[d] = {"area_r1": e.to_dict()}
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "protocol": {
            "command": "python bench/backfill_order.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "folds": args.folds, "fold_seed": args.fold_seed, "folds_used": [f.index for f in folds], "compat": args.compat,
            "compat_fit": "the fold's training pairs" + (" and text corpus" if args.corpus else ""),
            "fractions": fractions, "n_random": args.n_random, "n_resamples": args.n_resamples, "seed": args.seed,
            "orders": list(next(iter(pooled.values()))), "merges": merges, "calibrate_on": args.calibrate_on,
            "gallery": "the fold's evaluation items", "benefit_fit": "the fold's training pairs",
            "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "elapsed_s": round(time.perf_counter() - t0, 1),
        },
        "merges": {m: orders_to_dict(curves[m]) for m in merges},
        "score_vs_slot": paired,
        "vs_random": vs_random,
        "folds": [{"meta": r["meta"], "summary": r["summary"]} for r in per_fold],
        "notes": notes,
    }
    stem.with_suffix(".json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    pngs = {}
    for m in merges:
        png = stem.with_suffix(".png") if m == "slot" else stem.parent / f"{stem.name}-{m}.png"
        plot_orders(curves[m], png,
                    title=(f"backfill order, {m} merge, {args.folds}-fold cross-validated testbed ({args.compat}), "
                           + ("pooled over the folds" if len(folds) == args.folds else
                              f"fold{'s' if len(folds) > 1 else ''} {', '.join(str(f.index) for f in folds)} only")))
        pngs[m] = png.name
    write_page(result, stem.with_suffix(".md"), pngs)
    print(f"wrote {stem}.json, .md, " + ", ".join(pngs.values()))


if __name__ == "__main__":
    main()
