"""Gallery transform throughput (issue 26): vectors per second carried old -> new by a map, beside image
encoding per second with the testbed's new model, which is what re-encoding the gallery would cost instead.

    python bench/transform.py --out bench/results/transform.json     # 1M x 512 map, 20k-row store, 32 images
    python bench/transform.py --quick                                 # a smoke run

Three figures, each on one thread by default (`--threads`; the machine is shared):
  map          `GalleryMap.apply` (normalise, x W, normalise) on N random old-space vectors, in batches of
               `--batch` generated outside the timed region: the arithmetic of the transform alone
  store        `transform_gallery` from an embedded store of `--store-rows` vectors into a new one: reading,
               mapping, payloads and the durable (fsynced) adds, then the index build at the end
  encode       `testbed:new`'s `encode_image` on `--images` testbed images (files decoded, preprocessed,
               forward), on this CPU; a small sample (the figure is a rate)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import _harness as h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=1_000_000, help="vectors the map carries (the map figure)")
    parser.add_argument("--old-dim", type=int, default=512)
    parser.add_argument("--new-dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8192, help="vectors per batch (the transform's memory bound)")
    parser.add_argument("--store-rows", type=int, default=20_000, help="rows of the embedded-store figure")
    parser.add_argument("--images", type=int, default=32, help="testbed images the new model encodes")
    parser.add_argument("--model", default="testbed:new")


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _gallery_map(old_dim: int, new_dim: int) -> Any:
    from xbt.compat.maps import LinearMap
    from xbt.compat.procrustes import orthogonal_procrustes
    from xbt.gallery.transform import GalleryMap
    from xbt.models.base import EmbeddingSpace

    rng = np.random.default_rng(0)
    rotation = orthogonal_procrustes(_unit(rng, 2048, old_dim), _unit(rng, 2048, new_dim))[:old_dim, :new_dim]
    return GalleryMap(LinearMap.from_arrays(rotation.astype(np.float32)), EmbeddingSpace("bench-old", old_dim, "0" * 64),
                      EmbeddingSpace("bench-new", new_dim, "1" * 64), "bench: a random Procrustes rotation")


def map_figure(rows: int, old_dim: int, new_dim: int, batch: int) -> dict[str, Any]:
    gmap, rng = _gallery_map(old_dim, new_dim), np.random.default_rng(1)
    block = _unit(rng, batch, old_dim)
    gmap.apply(block)  # warm-up
    timed = 0.0
    for start in range(0, rows, batch):
        x = block[: min(batch, rows - start)]
        x = x + np.float32(start % 7) * 1e-3  # a fresh array each batch, made outside the timed region
        t0 = time.perf_counter()
        gmap.apply(x)
        timed += time.perf_counter() - t0
    return {"rows": rows, "old_dim": old_dim, "new_dim": new_dim, "batch": batch, "seconds": round(timed, 3),
            "vectors_per_s": round(rows / timed, 1)}


def store_figure(rows: int, old_dim: int, new_dim: int, batch: int) -> dict[str, Any]:
    from xbt.gallery.index import IndexConfig
    from xbt.gallery.store import Gallery
    from xbt.gallery.transform import transform_gallery

    gmap, rng = _gallery_map(old_dim, new_dim), np.random.default_rng(2)
    with tempfile.TemporaryDirectory() as scratch:
        with Gallery.create(Path(scratch) / "old", gmap.old_space, IndexConfig(kind="flat"), "image") as old:
            for start in range(0, rows, batch):
                n = min(batch, rows - start)
                old.add(_unit(rng, n, old_dim), [f"item{start + i:08d}" for i in range(n)],
                        [{"caption": f"caption {start + i}"} for i in range(n)], space=gmap.old_space)
            t0 = time.perf_counter()
            report = transform_gallery(old, Path(scratch) / "new", gmap, batch=batch)
            seconds = time.perf_counter() - t0
    assert report["written"] == rows
    return {"rows": rows, "old_dim": old_dim, "new_dim": new_dim, "batch": batch, "seconds": round(seconds, 3),
            "vectors_per_s": round(rows / seconds, 1),
            "includes": "reads, map, payload rewrite, fsynced SQLite adds, the final index build and snapshot"}


def encode_figure(spec: str, n_images: int) -> dict[str, Any]:
    from encode_throughput import bench_inputs

    from xbt.specs import load_model

    with tempfile.TemporaryDirectory() as scratch:
        images, _, source = bench_inputs(n_images, 1, Path(scratch))
        model = load_model(spec)
        model.configure("cpu")
        model.encode_image(images[:4])  # warm-up (towers built, first-call costs)
        t0 = time.perf_counter()
        model.encode_image(images)
        seconds = time.perf_counter() - t0
    return {"model": spec, "images": len(images), "inputs": source, "device": "cpu", "seconds": round(seconds, 3),
            "images_per_s": round(len(images) / seconds, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.rows, args.store_rows, args.images, args.batch = 20_000, 2_000, 4, 1024
    h.log(f"map: {args.rows} x {args.old_dim} -> {args.new_dim}")
    mapped = map_figure(args.rows, args.old_dim, args.new_dim, args.batch)
    h.log(f"store: {args.store_rows} rows")
    stored = store_figure(args.store_rows, args.old_dim, args.new_dim, args.batch)
    h.log(f"encode: {args.images} images with {args.model}")
    encoded = encode_figure(args.model, args.images)
    return {
        "schema": "xbt.bench.transform/1", "created": h.now_iso(), "machine": h.machine_info(),
        "map": mapped, "store": stored, "encode": encoded,
        "transform_vs_encode": round(mapped["vectors_per_s"] / encoded["images_per_s"], 1),
        "note": ("vectors/s of the map alone and through the embedded store, against images/s the new model encodes"
                 " on the same CPU: the ratio is how many times cheaper the transform is than re-encoding, per item"),
    }


if __name__ == "__main__":
    h.cli(run, __doc__ or "", add_arguments)
