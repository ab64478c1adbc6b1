"""Gallery insert and search throughput on Milvus Lite beside the embedded store, at 100k and 1M 512-d vectors.

    python bench/milvus.py --out bench/results/milvus.json              # 100k and 1M (run the 1M under nice)
    python bench/milvus.py --sizes 100000 --out /tmp/milvus-100k.json   # one size
    python bench/milvus.py --quick                                      # 5k, seconds

Both backends go through xbt's gallery interface (`xbt.gallery.store.Gallery`, `xbt.gallery.milvus.
MilvusGallery`), so the figures are what `xbt gallery add/search` does on each, stamps and payload JSON
included. Per size and backend, in a fresh process (its memory is its own, and a run over its time budget
is stopped without losing what it measured):

1. insert: `add` in batches of --batch vectors (each with an id and a small payload), then the step that
   makes the gallery ready to serve (embedded: `compact`, i.e. index rebuild + snapshot; Milvus: flush);
2. exact search (embedded: faiss IndexFlatIP; Milvus: FLAT): 100 queries in one call (batched), and single
   queries one at a time (latency); top 10;
3. ANN (sizes up to --ann-max-n only; an HNSW build over 1M 512-d vectors takes longer than this budget on
   two cores): HNSW (M=32, efConstruction=200, ef=128: the store's defaults) built by each backend's own
   engine (faiss in both), its build time, search times and recall@10 against the exact top 10.

Vectors: the clustered synthetic 512-d unit vectors of bench/gallery_search.py (queries: fresh draws).
The machine is shared: the load average at the start and end of every phase is recorded beside it.
A guard stops a child whose resident memory passes --max-rss-gib (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import _harness as h

DIM, K, N_QUERIES, N_SINGLE = 512, 10, 100, 20
BACKENDS = ("embedded", "milvus")


# ----- one backend at one size (a child process) -------------------------------------------------------------
def _du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _memory_guard(limit_gib: float, out: Path, result: dict[str, Any]) -> None:
    """Stop this process (after writing what it measured) if its resident memory passes the limit."""
    def watch() -> None:
        while True:
            rss = h.rss_mib() / 1024
            if rss > limit_gib:
                result["stopped"] = f"resident memory {rss:.1f} GiB passed the {limit_gib} GiB guard"
                h.write_json(out, result)
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def _phase(result: dict[str, Any], out: Path, name: str, data: dict[str, Any], t0: float, load0: list[float]) -> None:
    result["phases"][name] = {**data, "wall_s": round(time.perf_counter() - t0, 2),
                              "load_average": {"start": load0, "end": h.load_average()},
                              "peak_rss_mib": round(h.peak_rss_mib(), 1)}
    h.write_json(out, result)  # progressively: a run stopped by its budget keeps what it measured
    h.log(f"{result['backend']} n={result['n']:,}: {name} {json.dumps(result['phases'][name])}")


def _search_timings(search: Any, queries: np.ndarray, repeats: int) -> dict[str, Any]:
    batched = h.repeat(lambda: search(queries, K), repeats, warmup=1)
    singles = [h.repeat(lambda q=q: search(q[None, :], K), 1, warmup=0).median for q in queries[:N_SINGLE]]
    single = h.summarise(singles)
    return {"batched_queries": len(queries), "batched_s": round(batched.median, 4),
            "batched_queries_per_s": round(len(queries) / batched.median, 1),
            "single_query_median_ms": round(1000 * single.median, 2), "single_query_min_ms": round(1000 * single.min, 2),
            "single_queries": len(singles)}


def child(backend: str, n: int, batch: int, ann_max_n: int, repeats: int, out: Path, work: Path,
          max_rss_gib: float) -> None:
    from gallery_search import synthetic_vectors

    from xbt.gallery.index import IndexConfig
    from xbt.models.base import EmbeddingSpace

    result: dict[str, Any] = {"backend": backend, "n": n, "dim": DIM, "batch": batch, "phases": {}}
    _memory_guard(max_rss_gib, out, result)
    space = EmbeddingSpace("bench", DIM, "0" * 64)
    vectors = synthetic_vectors(n, seed=0)
    queries = synthetic_vectors(N_QUERIES, seed=1)
    scores = queries @ vectors.T
    part = np.argpartition(-scores, K, axis=1)[:, :K]  # the exact top 10 (order within it does not matter)
    exact_top = part
    del scores
    ids = [f"item{i:07d}" for i in range(n)]
    payloads = [{"image": f"/images/{i}.jpg"} for i in ids]
    if backend == "embedded":
        from xbt.gallery.store import Gallery

        ref: Any = work / "embedded"
        gallery: Any = Gallery.create(ref, space, IndexConfig(kind="flat"), "image")
        result["engine"] = "xbt.gallery.store (SQLite WAL synchronous=FULL + faiss)"
    else:
        from xbt.gallery.milvus import MilvusGallery

        ref = f"milvus:{work / 'bench.db'}#bench"
        gallery = MilvusGallery.create(ref, space, IndexConfig(kind="flat"), "image")
        result["engine"] = "Milvus Lite (in-process) via pymilvus MilvusClient"

    t0, load0 = time.perf_counter(), h.load_average()
    for start in range(0, n, batch):
        gallery.add(vectors[start : start + batch], ids[start : start + batch], payloads[start : start + batch],
                    space=space)
    insert_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    gallery.compact()
    ready_s = time.perf_counter() - t1
    _phase(result, out, "insert", {"insert_s": round(insert_s, 2), "vectors_per_s": round(n / insert_s, 1),
                                   "ready_s": round(ready_s, 2),
                                   "ready_step": "compact (index rebuild + snapshot)" if backend == "embedded" else "flush",
                                   "disk_bytes": _du_bytes(work)}, t0, load0)

    def search(q: np.ndarray, k: int) -> list[Any]:
        return gallery.search(q, k, space=space)

    t0, load0 = time.perf_counter(), h.load_average()
    timings = _search_timings(search, queries, repeats)
    found = [[int(hit.id[4:]) for hit in row] for row in search(queries, K)]
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, exact_top)]))
    _phase(result, out, "exact_search", {**timings, "index": "faiss IndexFlatIP" if backend == "embedded" else "FLAT",
                                         "recall_at_10": round(recall, 4)}, t0, load0)

    if n <= ann_max_n:
        config = IndexConfig(kind="hnsw")
        t0, load0 = time.perf_counter(), h.load_average()
        gallery.close()
        if backend == "embedded":
            from xbt.gallery.store import Gallery

            gallery = Gallery.open(ref, config)  # rebuilds the index as HNSW
        else:
            from xbt.gallery.milvus import MilvusGallery

            gallery = MilvusGallery.open(ref, config)  # drop_index + create_index HNSW + load
        build_s = time.perf_counter() - t0
        timings = _search_timings(search, queries, repeats)
        found = [[int(hit.id[4:]) for hit in row] for row in search(queries, K)]
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, exact_top)]))
        _phase(result, out, "hnsw_search", {"index": "HNSW M=32 efConstruction=200 ef=128", "build_s": round(build_s, 2),
                                            **timings, "recall_at_10": round(recall, 4)}, t0, load0)
    else:
        result["phases"]["hnsw_search"] = {"skipped": f"n > --ann-max-n ({ann_max_n:,}): the HNSW build would"
                                           " overrun the time budget on this machine"}
    gallery.close()
    result["finished"] = True
    h.write_json(out, result)


# ----- the figure -------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [5_000] if args.quick else args.sizes
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for backend in args.backends:
            work = Path(tempfile.mkdtemp(prefix=f"xbt-bench-milvus-{backend}-{n}-", dir=args.work_dir))
            part = work / "result.json"
            cmd = [sys.executable, __file__, "--child", backend, str(n), str(part), str(work),
                   "--batch", str(args.batch), "--ann-max-n", str(args.ann_max_n), "--repeats", str(args.repeats),
                   "--max-rss-gib", str(args.max_rss_gib), "--threads", str(args.threads)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(h.REPO / "src"), str(h.BENCH_DIR)])}
            h.log(f"{backend} n={n:,}: starting (budget {args.budget_s:.0f} s)")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, timeout=args.budget_s)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"stopped at the {args.budget_s:.0f} s budget"
            row = json.loads(part.read_text()) if part.exists() else {"backend": backend, "n": n, "phases": {}}
            row.update(status=status, child_wall_s=round(time.perf_counter() - t0, 1))
            rows.append(row)
            shutil.rmtree(work, ignore_errors=True)
    return {
        "figure": "milvus", "title": "Gallery insert and search: Milvus Lite beside the embedded store",
        "sizes": sizes, "dim": DIM, "k": K, "batch": args.batch, "rows": rows, "machine": h.machine_info(),
        "versions": _versions(),
        "notes": [
            "Milvus Lite 3.x is a pure-Python engine (pyarrow WAL + segments, faiss indexes) running inside the"
            " client process: its figures are not a Milvus server's.",
            "Insert = `add` calls in batches; each backend checks ids for conflicts first (one lookup per batch).",
            f"ANN (HNSW) is measured up to n = {args.ann_max_n:,} only.",
        ],
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("pymilvus", "milvus-lite", "faiss-cpu", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=2048, help="vectors per add call")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--ann-max-n", type=int, default=100_000, help="largest size at which HNSW is built")
    parser.add_argument("--budget-s", type=float, default=900.0, help="time budget of one backend at one size")
    parser.add_argument("--max-rss-gib", type=float, default=12.0, help="memory guard of one child process")
    parser.add_argument("--work-dir", default=None, help="where the galleries are written (default: the temp dir)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        p = argparse.ArgumentParser()
        p.add_argument("backend"), p.add_argument("n", type=int)
        p.add_argument("out", type=Path), p.add_argument("work", type=Path)
        add_arguments(p)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--threads", type=int, default=1)
        a = p.parse_args(sys.argv[2:])
        with h.threads(a.threads):
            child(a.backend, a.n, a.batch, a.ann_max_n, a.repeats, a.out, a.work, a.max_rss_gib)
    else:
        h.cli(run, __doc__.split("\n\n")[0], add_arguments)
