"""Evaluation scaling: time and peak memory of the retrieval evaluation from 1k to 100k gallery items.

    python bench/evaluation.py                              # 1k, 3k, 10k, 30k, 100k images (+ as many captions)
    python bench/evaluation.py --sizes 1000,10000           # chosen sizes
    python bench/evaluation.py --quick                      # 500 to 2k, seconds

What is timed is `xbt.eval.matrix.evaluate_upgrade`: the whole compatibility matrix (old->old, new->new and
one method's new->old, in both directions: exact search over every item, R@1/5/10, 1,000 paired bootstrap
resamples). The data is bench/eval_scaling.py's synthetic world (one caption per image, 256-d old and
512-d new embeddings of a shared latent; Procrustes fitted on 20k text pairs), made once per size in a
fresh process; only the evaluation is timed. Exact search is quadratic in the gallery size, so larger
sizes get fewer runs: after the first run, repeats continue while they fit in --size-budget-s (n is
stated per size). Peak memory is the evaluation's own: the peak-RSS mark is reset before each run and
the embeddings held before it are subtracted ("working set"); the total peak is listed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import _harness as h

METHOD = "procrustes-text"


def world(n_images: int, seed: int = 0) -> tuple[Any, Any, dict[str, Any], float]:
    """Old/new embeddings of n images and n captions and one method's queries (eval_scaling's generator)."""
    from eval_scaling import synthetic_world

    from xbt.compat.base import FitData
    from xbt.compat.registry import build_method
    from xbt.embed import PairEmbeddings
    from xbt.models.base import EmbeddingSpace

    latent, old_dim, new_dim = 64, 256, 512
    z, zc, w_old, w_new, embed = synthetic_world(n_images, 1, latent, old_dim, new_dim, seed)
    old_space, new_space = EmbeddingSpace("synthetic-old", old_dim, "0" * 64), EmbeddingSpace("synthetic-new", new_dim, "1" * 64)
    index = list(range(n_images))
    old = PairEmbeddings(embed(z, w_old, 1.5), embed(zc, w_old, 1.5), index, old_space)
    new = PairEmbeddings(embed(z, w_new, 0.7), embed(zc, w_new, 0.7), index, new_space)
    train_z = np.random.default_rng(1).standard_normal((20_000, latent), dtype=np.float32)
    fit = FitData(new_text=embed(train_z, w_new, 0.7), old_text=embed(train_z, w_old, 1.5))
    queries = {METHOD: build_method(METHOD, new_space, old_space).fit(fit).transform_embeddings(new, old)}
    held = sum(a.nbytes for e in (old, new, *queries.values()) for a in (e.images, e.texts)) / 2**20
    return old, new, queries, held


def bench_size(n: int, repeats: int, budget_s: float, resamples: int) -> dict[str, Any]:
    from xbt.eval.matrix import evaluate_upgrade

    h.log(f"{n:,} images: making the data")
    old, new, queries, held_mib = world(n)
    runs, cpus, peaks, overs = [], [], [], []
    while len(runs) < repeats:
        with h.PeakMemory() as mem:
            evaluate_upgrade(old, new, queries, n_resamples=resamples)
        runs.append(mem.elapsed_s)
        cpus.append(mem.cpu_s)
        peaks.append(mem.peak_mib)
        overs.append(mem.peak_over_before_mib)
        h.log(f"{n:,} images: run {len(runs)} took {mem.elapsed_s:.1f} s, peak {mem.peak_mib:.0f} MiB")
        if sum(runs) + statistics.median(runs) > budget_s:
            break
    t = h.summarise(runs)
    return {"n_images": n, "n_captions": n, "evaluate_s": t.median, "evaluate_min_s": t.min, "n": t.n,
            "evaluate_cpu_s": statistics.median(cpus),
            "runs_s": t.runs, "embeddings_mib": held_mib, "peak_rss_mib": statistics.median(peaks),
            "working_set_mib": statistics.median(overs), "peak_reset_supported": mem.reset}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker_size:
        return bench_size(args.worker_size, args.repeats, args.size_budget_s, args.resamples)
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [500, 1000, 2000] if args.quick else [1_000, 3_000, 10_000, 30_000, 100_000])
    rows = []
    with tempfile.TemporaryDirectory(prefix="xbt-bench-eval-") as tmp:
        for n in sorted(sizes):
            out = Path(tmp) / f"{n}.json"
            h.run_script(__file__, ["--worker-size", n, "--repeats", args.repeats, "--threads", args.threads,
                                    "--size-budget-s", args.size_budget_s, "--resamples", args.resamples, "--out", out])
            rows.append(json.loads(out.read_text()))
    for row in rows:
        row["items_per_s"] = 2 * row["n_images"] / row["evaluate_s"]
    notes = []
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        exponent = np.log(b["evaluate_cpu_s"] / a["evaluate_cpu_s"]) / np.log(b["n_images"] / a["n_images"])
        notes.append(f"From {a['n_images']:,} to {b['n_images']:,} items the CPU time grows as n^{exponent:.2f}: exact "
                     "search scores every query against every item (n^2 work), which dominates at these sizes.")
        first, last = rows[0], rows[-1]
        notes.append(f"Memory: the evaluation's working set (over the embeddings it is given) is "
                     f"{first['working_set_mib']:.0f} MiB at {first['n_images']:,} items and "
                     f"{last['working_set_mib']:.0f} MiB at {last['n_images']:,}, while the embeddings grow from "
                     f"{first['embeddings_mib']:.0f} to {last['embeddings_mib']:.0f} MiB: search scores blocks of "
                     "queries (at most 2^24 scores, 64 MiB, at a time) and the bootstrap draws its resamples in chunks.")
    if rows and not rows[0]["peak_reset_supported"]:
        notes.append("This kernel cannot reset the peak-RSS mark: peaks count from process start (data making included).")
    notes.append(f"On {args.threads} thread(s). Each size runs in a fresh process; n (runs) per size is in the table.")
    return {
        "figure": "evaluation",
        "title": "Evaluation scaling: the compatibility matrix from 1k to 100k items",
        "description": (f"`evaluate_upgrade` over n images and n captions (old->old, new->new, {METHOD}: both directions, "
                        f"R@1/5/10, {args.resamples} bootstrap resamples); median of n runs (n per size: "
                        f"repeats while they fit in {args.size_budget_s:.0f} s)."),
        "params": {"sizes": sizes, "method": METHOD, "resamples": args.resamples, "size_budget_s": args.size_budget_s},
        "columns": [h.column("n_images", "images (= captions)", "{:,}"), h.column("n", "runs (n)"),
                    h.column("evaluate_s", "seconds (median)", "{:.2f}"),
                    h.column("evaluate_cpu_s", "CPU seconds (median)", "{:.2f}"),
                    h.column("items_per_s", "items/s", "{:,.0f}"),
                    h.column("embeddings_mib", "embeddings held MiB", "{:,.0f}"),
                    h.column("working_set_mib", "evaluation working set MiB", "{:,.0f}"),
                    h.column("peak_rss_mib", "peak RSS MiB", "{:,.0f}")],
        "rows": rows,
        "goal": None,
        "notes": notes,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=None, help="comma-separated numbers of images (default 1k to 100k)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (the evaluation's default)")
    parser.add_argument("--size-budget-s", type=float, default=600.0,
                        help="after the first run at a size, repeat only while the runs fit in this many seconds")
    parser.add_argument("--worker-size", type=int, default=0, help=argparse.SUPPRESS)


if __name__ == "__main__":
    h.cli(run, __doc__, add_arguments)
