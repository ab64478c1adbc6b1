"""Gallery search at scale: exact, HNSW and IVF over 100k and 1M synthetic 512-d unit vectors.

    python bench/gallery_search.py                       # 100k and 1M (about half an hour on two busy cores)
    python bench/gallery_search.py --sizes 100000        # one size
    python bench/gallery_search.py --quick               # 5k and 20k, seconds

The indexes are built by the gallery store's own builder (`xbt.gallery.index.VectorIndex.build`) and
searched through its `search` with its default parameters (HNSW M=32, efConstruction=200, efSearch=128;
IVF nlist=4*sqrt(n), nprobe=32), so the figures are what a gallery does. Each size runs in a fresh
process, so its memory figures are its own.

Build-time budget: a build that would take longer than --build-budget-s (default 600 s; judged on CPU
time / threads, i.e. on an idle machine) with the defaults is run with smaller, stated parameters instead. The decision is made from the previous size's
measured build time, extrapolated (HNSW: n log n; IVF k-means: training points x lists). For HNSW the
smaller settings (HNSW_LADDER) are timed on the same 20k vectors at the previous size, and the first one
projected to fit is used. The report states the parameters used and why.

Vectors ("clustered", the main rows): unit vectors from 1,000 fixed centres in a 64-d latent space
with Gaussian spread around each, mapped linearly into 512-d, plus isotropic noise: groups of related
items with variation inside each group, a low intrinsic dimension, as real embeddings have. Approximate
recall depends on the data, so at the smallest size HNSW and IVF are also measured on "unclustered"
vectors (a plain 64-d Gaussian latent: neighbours barely closer than strangers), a harder case. Queries
are fresh draws from the same distribution. Recall@10 is the overlap of an index's top 10 with the exact
top 10.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np

import _harness as h

DIM, LATENT, K = 512, 64, 10
KINDS = ("flat", "hnsw", "ivf")


# ----- data ------------------------------------------------------------------------------------------
def synthetic_vectors(n: int, seed: int, clusters: int = 1000, spread: float = 1.0, noise: float = 0.5,
                      dim: int = DIM, latent: int = LATENT, map_seed: int = 1234) -> np.ndarray:
    """n unit vectors: a latent point (one of `clusters` fixed centres + Gaussian spread, or a plain Gaussian
    when clusters=0) -> a fixed random linear map into `dim` -> + isotropic noise -> normalised.
    The centres and the map depend on `map_seed` only, so galleries and queries share them."""
    fixed = np.random.default_rng(map_seed)
    w = fixed.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    centres = fixed.standard_normal((max(clusters, 1), latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 50_000):  # in chunks: no float64 or full-size temporaries
        m = min(n, s + 50_000) - s
        z = rng.standard_normal((m, latent), dtype=np.float32)
        if clusters:
            z = centres[rng.integers(0, clusters, m)] + spread * z
        block = z @ w
        block += noise * rng.standard_normal((m, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s : s + m] = block
    return out


# ----- memory of an index, from its own arrays ---------------------------------------------------------
def index_bytes(index: faiss.Index) -> int:
    """Bytes an index holds in vectors, graph links, lists and ids (no copy: read off faiss's arrays)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return index.id_map.size() * 8 + index_bytes(index.index)
    if isinstance(index, faiss.IndexHNSW):
        g = index.hnsw
        return (g.neighbors.size() * 4 + g.offsets.size() * 8 + g.levels.size() * 4
                + index_bytes(index.storage))
    if isinstance(index, faiss.IndexIVF):
        return index.invlists.compute_ntotal() * (index.code_size + 8) + index_bytes(index.quantizer)
    if isinstance(index, faiss.IndexFlatCodes):
        return index.codes.size()
    raise TypeError(f"no byte count for {type(index).__name__}")


# ----- build-time budget -----------------------------------------------------------------------------
#: HNSW (M, efConstruction) from the store's default down: where the default would overrun the build budget
#: at the next size, the first of these projected to fit is used.
HNSW_LADDER = ((32, 200), (16, 64), (16, 40), (12, 32), (8, 32))
CALIBRATION_N = 20_000


def nlogn_ratio(n: int, measured_n: int) -> float:
    return (n * math.log(n)) / (measured_n * math.log(measured_n))


def ivf_work(n: int, nlist: int) -> float:
    """k-means on min(n, 256 nlist) points over nlist lists, then assigning all n vectors (the store's recipe)."""
    return min(n, 256 * nlist) * nlist + n * nlist


def calibrate_hnsw(vectors: np.ndarray, build_threads: int) -> list[dict[str, Any]]:
    """Build time of every rung of HNSW_LADDER on the same CALIBRATION_N vectors: their cost ratios."""
    from xbt.gallery.index import IndexConfig, VectorIndex

    sample = vectors[:CALIBRATION_N]
    out = []
    for m, efc in HNSW_LADDER:
        h.release_memory()
        with h.threads(build_threads), h.PeakMemory() as mem:
            VectorIndex.build(DIM, IndexConfig(kind="hnsw", hnsw_m=m, hnsw_ef_construction=efc),
                              np.arange(len(sample)), sample)
        out.append({"m": m, "ef_construction": efc, "n": len(sample), "build_s": mem.elapsed_s, "build_cpu_s": mem.cpu_s})
        h.log(f"calibration: HNSW M={m}, efConstruction={efc} on {len(sample):,} vectors: {mem.cpu_s:.1f} CPU s")
    return out


def budgeted_config(n: int, previous: dict[str, Any] | None, budget_s: float) -> tuple[Any, list[str]]:
    """The store's default IndexConfig, or reduced HNSW/IVF parameters where the default build, extrapolated
    from the previous size, would exceed the budget (HNSW: n log n, rungs scaled by their calibrated cost;
    IVF: k-means work). Builds are judged on CPU time / threads (their wall time on an idle machine), so
    that neither other jobs' load nor a paused process decides the parameters."""
    from xbt.gallery.index import IndexConfig

    default = IndexConfig()
    changes: dict[str, Any] = {}
    notes: list[str] = []
    rows = {row["kind"]: row for row in (previous or {}).get("rows", []) if row.get("default_params", True)}
    if "hnsw" in rows:
        row, prev_n = rows["hnsw"], previous["n"]
        projected = row["build_idle_s"] * nlogn_ratio(n, prev_n)
        if projected > budget_s:
            calibration = previous.get("hnsw_calibration") or []
            base = next((c["build_cpu_s"] for c in calibration if (c["m"], c["ef_construction"]) == HNSW_LADDER[0]), None)
            rungs = ([((c["m"], c["ef_construction"]), projected * c["build_cpu_s"] / base) for c in calibration[1:]]
                     if base else [])
            if not rungs:  # no calibration: the halfway rung, unmeasured
                rungs = [(HNSW_LADDER[1], float("nan"))]
            (m, efc), rung_s = next((r for r in rungs if r[1] <= budget_s), rungs[-1])
            changes.update(hnsw_m=m, hnsw_ef_construction=efc)
            how = (f"projected ~{rung_s / 60:.0f} min from the build times of each setting on the same "
                   f"{CALIBRATION_N:,} vectors" if rung_s == rung_s else "not calibrated")
            over = "" if rung_s <= budget_s else " (the cheapest setting tried; still over the budget)"
            notes.append(
                f"HNSW at {n:,}: the store's default M={default.hnsw_m}, efConstruction={default.hnsw_ef_construction} "
                f"would take ~{projected / 60:.0f} min to build ({row['build_idle_s']:.0f} s at {prev_n:,}, scaled by "
                f"n log n; CPU time / threads), over the {budget_s / 60:.0f}-min budget: built with M={m}, "
                f"efConstruction={efc} instead, {how}{over}. Its recall below is that of these cheaper settings.")
    if "ivf" in rows:
        row, prev_n = rows["ivf"], previous["n"]
        projected = row["build_idle_s"] * ivf_work(n, default.nlist(n)) / ivf_work(prev_n, default.nlist(prev_n))
        if projected > budget_s:
            nlist = int(math.sqrt(n))
            changes.update(ivf_nlist=nlist)
            reduced = row["build_idle_s"] * ivf_work(n, nlist) / ivf_work(prev_n, default.nlist(prev_n))
            notes.append(
                f"IVF at {n:,}: the store's default nlist=4*sqrt(n)={default.nlist(n)} would spend ~{projected / 60:.0f} "
                f"min in k-means ({row['build_idle_s']:.0f} s at {prev_n:,}, scaled by training points x lists), over "
                f"the budget: built with nlist=sqrt(n)={nlist} (projected ~{reduced / 60:.0f} min; nprobe unchanged).")
    return IndexConfig(**changes), notes


# ----- one size ---------------------------------------------------------------------------------------
def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(f[f >= 0]) & set(e)) for f, e in zip(found, exact)]
    return float(np.mean(hits) / exact.shape[1])


DATA = {"clustered": {"clusters": 1000}, "unclustered": {"clusters": 0}}


def bench_size(n: int, n_queries: int, n_single: int, repeats: int, build_threads: int,
               search_threads: int, config: Any, data: str = "clustered", calibrate: bool = False) -> dict[str, Any]:
    """Build and search every kind over n vectors; `calibrate`: also time the HNSW ladder (for the next size)."""
    from xbt.gallery.index import IndexConfig, VectorIndex

    h.log(f"{n:,} {data} vectors: generating")
    vectors = synthetic_vectors(n, seed=0, **DATA[data])
    queries = synthetic_vectors(n_queries, seed=1, **DATA[data])
    labels = np.arange(n, dtype=np.int64)
    rows, exact = [], None
    for kind in KINDS:
        cfg = IndexConfig(**{**config.to_dict(), "kind": kind})
        h.release_memory()
        h.log(f"{n:,} vectors: building {kind}")
        with h.threads(build_threads), h.PeakMemory() as mem:
            index = VectorIndex.build(DIM, cfg, labels, vectors)
        build_s = mem.elapsed_s
        h.log(f"{n:,} vectors: {kind} built in {build_s:.1f} s ({mem.cpu_s:.1f} CPU s); searching")
        with h.threads(search_threads):
            wall, cpu = h.interleaved({
                "batch": lambda: index.search(queries, K, cfg),
                "single": lambda: [index.search(queries[i : i + 1], K, cfg) for i in range(n_single)],
            }, repeats)
            _, found = index.search(queries, K, cfg)
        batch, single = wall["batch"], wall["single"]
        if kind == "flat":
            exact = found
        params = {"flat": "exact inner product",
                  "hnsw": f"M={cfg.hnsw_m}, efConstruction={cfg.hnsw_ef_construction}, efSearch={cfg.hnsw_ef_search}",
                  "ivf": f"nlist={cfg.nlist(n)}, nprobe={cfg.ivf_nprobe}"}[kind]
        default = IndexConfig()
        default_params = {"flat": True, "ivf": cfg.ivf_nlist is None,
                          "hnsw": (cfg.hnsw_m, cfg.hnsw_ef_construction) == (default.hnsw_m, default.hnsw_ef_construction)}
        rows.append({
            "n": n, "data": data, "kind": kind, "params": params, "default_params": default_params[kind],
            "build_s": build_s, "build_cpu_s": mem.cpu_s, "build_threads": build_threads,
            # the build's wall time on an idle machine with build_threads cores: what the budget is judged on
            "build_idle_s": mem.cpu_s / build_threads,
            "qps_batch": n_queries / batch.median, "qps_batch_cpu": n_queries / cpu["batch"].median,
            "latency_ms": single.median / n_single * 1e3, "latency_cpu_ms": cpu["single"].median / n_single * 1e3,
            "recall_at_10": recall_at_k(found, exact),
            "index_mib": index_bytes(index.index) / 2**20,
            "rss_delta_mib": mem.delta_mib, "build_peak_over_before_mib": mem.peak_over_before_mib,
            "search_timings_s": {"wall": {k: v.to_dict() for k, v in wall.items()},
                                 "cpu": {k: v.to_dict() for k, v in cpu.items()}},
        })
        index = None  # freed before the next kind is built (the timed lambdas above hold the name)
    result = {"n": n, "vectors_mib": vectors.nbytes / 2**20, "rows": rows}
    if calibrate and n >= CALIBRATION_N:
        result["hnsw_calibration"] = calibrate_hnsw(vectors, build_threads)
    return result


# ----- the figure ------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One size, in this process (run by `run` in a fresh interpreter per size)."""
    from xbt.gallery.index import IndexConfig

    config = IndexConfig.from_dict(json.loads(args.index_config)) if args.index_config else IndexConfig()
    return bench_size(args.worker_size, args.n_queries, args.n_single, args.repeats, args.build_threads,
                      args.threads, config, args.data, args.calibrate)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker_size:
        return worker(args)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([5_000, 20_000] if args.quick else [100_000, 1_000_000])
    results, notes, previous = [], [], None
    with tempfile.TemporaryDirectory(prefix="xbt-bench-gallery-") as tmp:
        # (size, data): every size on clustered vectors; the smallest also on unclustered ones
        plan = [(n, "clustered") for n in sorted(sizes)] + [(min(sizes), "unclustered")]
        for n, data in plan:
            config, changed = budgeted_config(n, previous, args.build_budget_s) if data == "clustered" else (None, [])
            notes += changed
            out = Path(tmp) / f"size-{n}-{data}.json"
            larger = any(m > n for m in sizes)
            h.run_script(__file__, ["--worker-size", n, "--data", data, "--n-queries", args.n_queries,
                                    "--n-single", args.n_single, "--repeats", args.repeats, "--threads", args.threads,
                                    "--build-threads", args.build_threads, "--out", out]
                         + (["--index-config", json.dumps(config.to_dict())] if config is not None else [])
                         + (["--calibrate"] if data == "clustered" and larger else []))
            result = json.loads(out.read_text())
            if data == "clustered":
                previous = result
            results.append(result)
    rows = [{**row, "vectors_mib": r["vectors_mib"]} for r in results for row in r["rows"]]
    for r in results:
        if r["rows"][0]["data"] != "clustered":
            continue
        flat = next(row for row in r["rows"] if row["kind"] == "flat")
        expect = " (the store's docstring says ~5 ms at 100k on one core)" if r["n"] == 100_000 else ""
        notes.append(f"Exact search over {r['n']:,} vectors: {flat['latency_cpu_ms']:.1f} ms of CPU per single query "
                     f"({flat['latency_ms']:.1f} ms wall) on {args.threads} thread(s){expect}: a lone query streams all "
                     f"{r['vectors_mib']:,.0f} MiB of vectors from memory, while a batch shares each pass over them "
                     "among many queries (matrix multiply), hence the batch rate.")
    notes.append("Memory: 'index' is what the index holds (vectors, links, lists, ids), read off faiss's arrays; "
                 "'RSS growth' is the process's resident memory after the build minus before it (IVF's includes "
                 "k-means scratch). None of these kinds compresses the vectors: each holds a full float32 copy, "
                 f"n x {DIM * 4 // 1024} KiB, so a 1M-item gallery needs ~2 GiB of RAM for its index alone.")
    return {
        "figure": "gallery",
        "title": "Gallery search: exact, HNSW and IVF",
        "description": (f"{DIM}-d synthetic unit vectors ('clustered': 1,000 centres in a 64-d latent, spread, noise; "
                        f"'unclustered': a plain 64-d latent, a harder case), {args.n_queries} held-out queries, "
                        f"k={K}. Builds on {args.build_threads} thread(s), timed once (n=1); searches on "
                        f"{args.threads} thread(s), median of n runs: a batch of {args.n_queries} queries "
                        f"(queries/s) and {args.n_single} queries one at a time (latency)."),
        "params": {"sizes": sizes, "dim": DIM, "k": K, "n_queries": args.n_queries, "n_single": args.n_single,
                   "build_threads": args.build_threads, "search_threads": args.threads,
                   "build_budget_s": args.build_budget_s},
        "columns": [h.column("n", "vectors", "{:,}"), h.column("data", "data"), h.column("kind", "index"),
                    h.column("params", "parameters"),
                    h.column("build_s", "build s (n=1)", "{:.1f}"),
                    h.column("build_cpu_s", "build CPU s", "{:.1f}"),
                    h.column("qps_batch", "queries/s, batch", "{:,.0f}"),
                    h.column("qps_batch_cpu", "queries/s per core (CPU time), batch", "{:,.0f}"),
                    h.column("latency_ms", "ms/query, single", "{:.2f}"),
                    h.column("latency_cpu_ms", "CPU ms/query, single", "{:.2f}"),
                    h.column("recall_at_10", "recall@10 vs exact", "{:.3f}"),
                    h.column("index_mib", "index MiB", "{:,.0f}"),
                    h.column("rss_delta_mib", "RSS growth MiB", "{:,.0f}")],
        "rows": rows,
        "goal": None,
        "notes": notes,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=None, help="comma-separated gallery sizes (default 100000,1000000)")
    parser.add_argument("--n-queries", type=int, default=None, help="batch of held-out queries (default 1000, quick 200)")
    parser.add_argument("--n-single", type=int, default=None, help="queries timed one at a time (default 100, quick 20)")
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1,
                        help="threads for building (default: every core; builds run once)")
    parser.add_argument("--build-budget-s", type=float, default=600.0,
                        help="reduce HNSW/IVF parameters where the default build is projected to exceed this")
    parser.add_argument("--worker-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", choices=sorted(DATA), default="clustered", help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index-config", default="", help=argparse.SUPPRESS)


def main() -> None:
    def run_with_defaults(args: argparse.Namespace) -> dict[str, Any]:
        args.n_queries = args.n_queries or (200 if args.quick else 1000)
        args.n_single = args.n_single or (20 if args.quick else 100)
        return run(args)

    h.cli(run_with_defaults, __doc__, add_arguments)


if __name__ == "__main__":
    main()
