"""The exported query map in onnxruntime beside the torch map xbt runs: microseconds per query at batch 1
and batch 256, on one thread.

    python bench/export.py --out bench/results/export.json   # 512-d new -> 256-d old, as on the testbed
    python bench/export.py --quick                            # a smoke run

For each kind of map (the Procrustes rotation, the residual adapter, XBT's mlp projection, SLERP with its
second input) the map gets random weights, is exported by `xbt.compat.export` (the very graph `xbt export`
writes) and timed both ways on the same unit vectors, NumPy in and out: torch as `CompatibleModel.map_features`
runs it (`QueryMap.apply`), onnxruntime as a deployment runs it (`InferenceSession.run`, one intra-op
thread, CPU). The machine is shared (two cores, five engineers): the load average is recorded beside every
row, and CPU time of the one thread is listed beside wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import _harness as h
from query_cost import measure

KINDS = ("procrustes", "adapter", "xbt-mlp", "slerp")
BATCHES = (1, 256)


def build_map(kind: str, new_dim: int, old_dim: int, hidden: int):
    from xbt.compat.maps import LinearMap, Projection, ResidualMap, SlerpMap

    query_map = {"procrustes": lambda: LinearMap(new_dim, old_dim),
                 "adapter": lambda: ResidualMap(new_dim, old_dim, hidden=512),
                 "xbt-mlp": lambda: Projection(new_dim, old_dim, "mlp", hidden),
                 "slerp": lambda: SlerpMap(new_dim, old_dim, 0.5)}[kind]()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained weights are not zero; keep the timed arithmetic honest
        for p in query_map.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return query_map.eval()


def export_graph(query_map, folder: Path, kind: str) -> Path:
    from xbt.compat.export import export_map_onnx

    file = folder / f"{kind}.onnx"
    export_map_onnx(query_map, file, {"xbt.tower": "text", "xbt.method": kind})
    return file


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    new_dim, old_dim, hidden = args.new_dim, args.old_dim, args.hidden
    rng = np.random.default_rng(1)  # the new (and, for SLERP, old) embeddings of 256 queries, any scale
    new, old = (rng.standard_normal((max(BATCHES), dim)).astype(np.float32) for dim in (new_dim, old_dim))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(kinds) - set(KINDS):
        raise SystemExit(f"--kinds: choose from {', '.join(KINDS)}")
    target_s = 0.02 if args.quick else 0.1
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            query_map = build_map(kind, new_dim, old_dim, hidden)
            session = ort.InferenceSession(str(export_graph(query_map, Path(tmp), kind)), options,
                                           providers=["CPUExecutionProvider"])
            ensemble = query_map.needs_old_query
            for batch in BATCHES:
                feeds = {"new": new[:batch]} | ({"old": old[:batch]} if ensemble else {})
                got = session.run(["query"], feeds)[0]
                want = query_map.apply(new[:batch], old[:batch] if ensemble else None)
                runners = {"torch": lambda: query_map.apply(new[:batch], old[:batch] if ensemble else None),
                           "onnxruntime": lambda: session.run(["query"], feeds)}
                row: dict[str, Any] = {"map": kind, "batch": batch, "max_abs_diff": float(np.abs(got - want).max()),
                                       "load_average": h.load_average()}
                for name, fn in runners.items():
                    h.log(f"{kind}, batch {batch}, {name}")
                    wall = measure(fn, batch, args.repeats, target_s)
                    row[f"{name}_us"], row[f"{name}_min_us"] = wall["us_per_query"], wall["min_us_per_query"]
                    row[f"{name}_cpu_us"] = measure(fn, batch, args.repeats, target_s, time.thread_time)["us_per_query"]
                row["speedup"] = row["torch_us"] / row["onnxruntime_us"]
                rows.append(row)
    return {
        "figure": "export",
        "title": "The exported query map: onnxruntime beside torch",
        "description": (f"Microseconds per query of the query map alone (normalise, map, normalise), {new_dim}-d new ->"
                        f" {old_dim}-d old, median (min) of n timed runs of many back-to-back calls, one thread."
                        " torch: QueryMap.apply as xbt runs it; onnxruntime: the graph `xbt export` writes."
                        " max_abs_diff: the two outputs' largest difference on the timed batch."),
        "params": {"new_dim": new_dim, "old_dim": old_dim, "hidden": hidden, "batches": list(BATCHES),
                   "onnxruntime": ort.__version__, "torch": torch.__version__, "machine": h.machine_info()},
        "columns": [h.column("map", "map"), h.column("batch", "batch"),
                    h.column("torch_us", "torch µs/query: median (min)", "{torch_us:.2f} ({torch_min_us:.2f})"),
                    h.column("onnxruntime_us", "onnxruntime µs/query: median (min)",
                             "{onnxruntime_us:.2f} ({onnxruntime_min_us:.2f})"),
                    h.column("torch_cpu_us", "torch CPU µs/query", "{:.2f}"),
                    h.column("onnxruntime_cpu_us", "onnxruntime CPU µs/query", "{:.2f}"),
                    h.column("speedup", "torch / onnxruntime", "{:.2f}"),
                    h.column("load_average", "load average (1, 5, 15 min)")],
        "rows": rows,
        "goal": h.goal("onnxruntime reproduces the torch map (max |diff| <= 1e-5) at batch 1 and 256",
                       all(r["max_abs_diff"] <= 1e-5 for r in rows),
                       f"largest difference {max(r['max_abs_diff'] for r in rows):.1e}"),
        "notes": ["SLERP's figure is its map only: a query also needs the old model's encoder.",
                  "Measured on a shared 2-core machine: compare rows measured at similar load averages."],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    h.add_map_dimensions(parser)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")


if __name__ == "__main__":
    h.cli(run, __doc__, add_arguments)
