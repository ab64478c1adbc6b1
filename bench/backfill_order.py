"""Which items to backfill first, on the cross-validated testbed protocol: R@1/5/10 of the rank-slot merge
against the fraction of the gallery backfilled, for the random, oldest-first and benefit orders, pooled
over the folds, with 95% bootstrap intervals; the area under each curve and the fraction backfilled at
which R@1 reaches old + 0.8 x (new - old) (`fraction_for_80pct_gain`).

    bench/python.sh  ->  PY;  flock /tmp/xbt-heavy.lock $PY bench/backfill_order.py          # the committed figures
    $PY bench/backfill_order.py --folds 5 --out docs/results/backfill-order-testbed        # .json, .md, .png

Per fold (`xbt.data.folds.testbed_folds`, `xbt.train.testbed.fold_models`):
    gallery           the fold's evaluation items (old-model vectors; images for t2i, captions for i2t)
    old / new models  the fold's testbed models, trained without the fold's evaluation and val items
    compatible model  --compat (procrustes-both) fitted on the fold's training pairs (--corpus: and its text
                      corpus, whose ~1900 texts both fold models then embed: minutes per fold on CPU)
    benefit scorer    `xbt.eval.benefit.fit_benefit_pairs` on the fold's training pairs (never the
                      evaluation items): the statistic is chosen there, its query bank is the compatible
                      model's queries of those pairs
    random            --n-random random orders, hits averaged; oldest: the gallery's insertion order (on the
                      testbed the fold's evaluation list, itself a seeded shuffle of caption groups)
    oracle            a ceiling, not deployable: the order by each item's measured benefit (`oracle_order`)
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
from xbt.eval.backfill_curve import (
    curve_from_hits,
    direction_sets,
    format_orders,
    order_curves,
    order_hits,
    orders_to_dict,
    plot_orders,
    pool_order_hits,
)
from xbt.eval.benefit import fit_benefit_pairs
from xbt.eval.embed import embed_pairs
from xbt.eval.runner import compatible_queries, json_safe
from xbt.train.testbed import fold_models

ORDERS = ("random", "oldest", "benefit", "oracle")


def oracle_order(sets) -> np.ndarray:
    """NOT deployable, a ceiling: the order by each item's measured benefit, which needs what the benefit order
    must do without (the new model's gallery vectors and the evaluated queries themselves). Per item: +1 for
    its own query that the compatible model misses and the new model finds at R@1, +1 for each such query
    whose wrong compatible top result it is (its slot must open), -1 for its own query that only the
    compatible model finds."""
    old_g, new_g, compat_q, new_q, positives = sets
    compat_top = np.argmax(compat_q @ old_g.T, axis=1)
    new_top = np.argmax(new_q @ new_g.T, axis=1)
    value = np.zeros(len(old_g))
    for q, pos in enumerate(positives):
        compat_hit, new_hit = compat_top[q] in pos, new_top[q] in pos
        if new_hit and not compat_hit:
            value[list(pos)] += 1
            value[compat_top[q]] += 1
        elif compat_hit and not new_hit:
            value[list(pos)] -= 1
    return np.argsort(-value, kind="stable")


def run_fold(fold, compat_name: str, fractions: list[float], n_random: int, seed: int, corpus: bool) -> dict[str, Any]:
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
    t_embed = time.perf_counter() - t_e
    t1 = time.perf_counter()
    scorers = {d: fit_benefit_pairs(old_fit, new_fit, fit_queries, modality, seed=seed)
               for d, modality in (("t2i", "image"), ("i2t", "text"))}
    t_fit = time.perf_counter() - t1
    sizes = {"t2i": len(old_eval.images), "i2t": len(old_eval.texts)}
    rng = np.random.default_rng([seed, fold.index])
    orders = {
        "random": {d: [rng.permutation(n) for _ in range(n_random)] for d, n in sizes.items()},
        "oldest": {d: np.arange(n) for d, n in sizes.items()},
        "benefit": {"t2i": scorers["t2i"].order(old_eval.images), "i2t": scorers["i2t"].order(old_eval.texts)},
        "oracle": {d: oracle_order(sets) for d, sets in direction_sets(old_eval, queries, new_eval).items()},
    }
    t2 = time.perf_counter()
    hits = order_hits(old_eval, queries, new_eval, orders, fractions, seed=seed)
    return {
        "hits": hits,
        "meta": {
            "fold": fold.name, "sizes": {"eval": len(fold.eval), "train": len(fold.train)},
            "models": {n: m.spec for n, m in models.items()}, "compat": compat_name, "compat_fit_texts": "text corpus + training captions" if corpus else "training captions",
            "benefit_scorer": {d: s.describe() for d, s in scorers.items()},
            "timings_s": {"models": round(t_models, 1), "compat_fit": round(t_compat, 1), "embed": round(t_embed, 1),
                          "benefit_fit": round(t_fit, 1),
                          "curves": round(time.perf_counter() - t2, 1)},
        },
    }


def _save_fold(path: Path, key: str, r: dict[str, Any]) -> None:
    flat = {f"{o}|{d}|{f!r}|{k}": v for o, per in r["hits"].items() for d, h in per.items() for f, row in h.items()
            for k, v in row.items()}
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
            o, d, f, k = name.split("|")
            hits.setdefault(o, {}).setdefault(d, {}).setdefault(float(f), {})[int(k)] = z[name]
    return {"hits": hits, "meta": saved["meta"]}


def fold_summary(hits: dict, seed: int) -> dict[str, Any]:
    """Each fold's own R@1 gain fraction (no intervals: a spread across folds)."""
    out: dict[str, Any] = {}
    for o, per in hits.items():
        for d, h in per.items():
            c = curve_from_hits(h, d, o, seed, n_resamples=0)
            out.setdefault(o, {})[d] = {"fraction_for_80pct_gain": c.gain_fraction.value if c.gain_fraction else None,
                                        "gain_area_r1": c.gain_area[1].value, "r1_at_0": c.recall[1][0].value,
                                        "r1_at_1": c.recall[1][-1].value}
    return out


def write_page(result: dict[str, Any], path: Path, png_name: str) -> None:
    p = result["protocol"]
    s = result["summary"]
    used = p.get("folds_used", list(range(len(result["folds"]))))
    written = (f"Written by `{p['command']}` ({p['date']}, load average {p['load_average_start']} at the start,"
               f" {p['load_average_end']} at the end; {p['elapsed_s']:.0f} s).")
    protocol = (f"Protocol: {p['folds']} folds of the testbed (`xbt.data.folds`, seed {p['fold_seed']}); per fold the"
                " gallery is the fold's evaluation items, the old/new models are the fold's testbed models (trained"
                f" without them), the compatible model is {p['compat']} fitted on {p.get('compat_fit', 'the fold training pairs')}, and the"
                " benefit scorer is chosen on the fold's training pairs only. The folds' per-query hits are pooled"
                f" ({s['random']['t2i']['n_queries']} t2i and {s['random']['i2t']['n_queries']} i2t queries); intervals"
                f" are 95% bootstrap over the pooled queries ({p['n_resamples']} resamples). Random: {p['n_random']}"
                " random orders averaged per fold. Oldest: insertion order (on the testbed the fold's evaluation list,"
                " a seeded shuffle of caption groups: in effect one more random order). Oracle: a ceiling, not"
                " deployable (each item's measured benefit, from the new gallery vectors and the evaluated queries)."
                f" Fractions {', '.join(f'{x:g}' for x in p['fractions'][:3])}, ..., 1.")
    terms = ("`fraction_for_80pct_gain`: the smallest fraction backfilled at which R@1 reaches old + 0.8 x (new - old),"
             " linearly interpolated between measured fractions (old = R@1 at 0% backfilled, i.e. compatible queries"
             " on the old gallery; new = R@1 at 100%, the new model alone). Gain area: the area under (R@1(f) -"
             " R@1(0)) / (R@1(1) - R@1(0)), 1 if all the gain came at once, 0.5 for a straight line. Area R@1: the"
             " mean R@1 served over the migration.")
    partial = (f"**Only fold{'s' if len(used) > 1 else ''} {', '.join(map(str, used))} of the {p['folds']} folds"
               " ran** (the others did not: see the reading below).")
    lines = [
        "# Which items to backfill first (cross-validated testbed)", "", written, "", protocol, "", terms, "",
        *([] if len(used) == p["folds"] else [partial, ""]),
        "| order | direction | R@1 at 0% | R@1 at 100% | fraction for 80% of the gain | gain area (R@1) | area R@1 (%) |",
        "|---|---|---|---|---|---|---|",
    ]

    def est(e: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
        if not e or e.get("value") is None:
            return "-"
        if e.get("low") is None or e.get("high") is None:
            return fmt.format(e["value"])
        return f"{fmt.format(e['value'])} [{fmt.format(e['low'])}, {fmt.format(e['high'])}]"

    for o, per in s.items():
        for d, row in per.items():
            lines.append(f"| {o} | {d} | {row['r1_at_0']:.1f} | {row['r1_at_1']:.1f} | {est(row['fraction_for_80pct_gain'])} |"
                         f" {est(row['gain_area_r1'])} | {est(row['area_r1'], '{:.1f}')} |")
    lines += ["", "Per fold (R@1 fraction for 80% of the gain; no intervals):", "",
              "| order | direction | " + " | ".join(f"fold {i}" for i in used) + " |",
              "|---|---|" + "---|" * len(used)]
    for o in s:
        for d in s[o]:
            vals = [f["summary"][o][d]["fraction_for_80pct_gain"] for f in result["folds"]]
            lines.append(f"| {o} | {d} | " + " | ".join("-" if v is None or not np.isfinite(v) else f"{v:.2f}" for v in vals) + " |")
    chosen = [f"fold {used[i]}: t2i {f['meta']['benefit_scorer']['t2i']['statistic']}, i2t {f['meta']['benefit_scorer']['i2t']['statistic']}"
              for i, f in enumerate(result["folds"])]
    lines += ["", "Benefit statistic chosen per fold (on its training pairs): " + "; ".join(chosen) + ".", "",
              f"![backfill curves]({png_name})", "", result.get("notes", ""), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--compat", default="procrustes-both", help="The compatible model: a peer of xbt.compat.registry, fitted per fold.")
    parser.add_argument("--corpus", action="store_true", help="Fit the compatible model on the fold's text corpus too (its texts are embedded by both fold models: minutes per fold on CPU); default: the training pairs only.")
    parser.add_argument("--steps", type=int, default=20, help="Fractions 0, 1/steps, ..., 1.")
    parser.add_argument("--n-random", type=int, default=5)
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-folds", default="", help="Comma-separated fold indices (a quick look; the figures use all).")
    parser.add_argument("--out", default="docs/results/backfill-order-testbed", help="Output stem: writes STEM.json, STEM.md, STEM.png.")
    parser.add_argument("--work", default="", help="Keep each fold's hits here and reuse them on a rerun with the same settings (a run stopped part-way resumes).")
    parser.add_argument("--notes", default="", help="A paragraph appended to the page (the reading of the figures).")
    args = parser.parse_args()
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    fractions = [i / args.steps for i in range(args.steps + 1)]
    folds = testbed_folds(args.folds, args.fold_seed)
    if args.only_folds:
        folds = [folds[int(i)] for i in args.only_folds.split(",")]
    per_fold = []
    key = json.dumps([args.compat, args.corpus, fractions, args.n_random, args.seed, list(ORDERS)])
    for fold in folds:
        cached = Path(args.work) / f"k{args.folds}-s{args.fold_seed}-fold{fold.index}" if args.work else None
        r = _load_fold(cached, key) if cached else None
        if r is None:
            r = run_fold(fold, args.compat, fractions, args.n_random, args.seed, args.corpus)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                _save_fold(cached, key, r)
        r["summary"] = fold_summary(r["hits"], args.seed)
        per_fold.append(r)
        print(f"{fold.name}: {json.dumps(r['meta']['timings_s'])} "
              + "; ".join(f"{o} {d} {v['fraction_for_80pct_gain']}" for o, per in r["summary"].items() for d, v in per.items()),
              flush=True)
    curves = order_curves(pool_order_hits([r["hits"] for r in per_fold]), seed=args.seed, n_resamples=args.n_resamples)
    print(format_orders(curves))
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "protocol": {
            "command": "python bench/backfill_order.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "folds": args.folds, "fold_seed": args.fold_seed, "folds_used": [f.index for f in folds], "compat": args.compat,
            "compat_fit": "the fold's training pairs" + (" and text corpus" if args.corpus else ""),
            "fractions": fractions, "n_random": args.n_random, "n_resamples": args.n_resamples, "seed": args.seed,
            "orders": list(ORDERS), "gallery": "the fold's evaluation items", "benefit_fit": "the fold's training pairs",
            "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "elapsed_s": round(time.perf_counter() - t0, 1),
        },
        **orders_to_dict(curves),
        "folds": [{"meta": r["meta"], "summary": r["summary"]} for r in per_fold],
        "notes": args.notes,
    }
    stem.with_suffix(".json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
    plot_orders(curves, stem.with_suffix(".png"),
                title=(f"backfill order, {args.folds}-fold cross-validated testbed ({args.compat}), "
                       + ("pooled over the folds" if len(folds) == args.folds else
                          f"fold{'s' if len(folds) > 1 else ''} {', '.join(str(f.index) for f in folds)} only")))
    write_page(result, stem.with_suffix(".md"), stem.with_suffix(".png").name)
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
