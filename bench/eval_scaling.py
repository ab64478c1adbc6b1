"""Evaluation at gallery scale: a synthetic 100k-image gallery through the full compatibility matrix.

Checks that exact search in blocks and the chunked bootstrap keep memory bounded: the peak resident
memory should be the embeddings themselves plus a fixed working set, whatever the gallery size.

    python bench/eval_scaling.py                      # 100k images, 1 caption each, 256-d old / 512-d new
    python bench/eval_scaling.py --n-images 20000     # quicker

Prints the timings and the peak RSS, and writes them to bench/results/eval_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from pathlib import Path

import numpy as np

from xbt.compat.base import FitData
from xbt.compat.support import l2_normalise
from xbt.compat.registry import build_method
from xbt.embed import PairEmbeddings
from xbt.eval.matrix import evaluate_upgrade, format_matrix
from xbt.models.base import EmbeddingSpace


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_world(n_images: int, captions: int, latent: int, old_dim: int, new_dim: int, seed: int):
    """A shared latent per image; each model sees it through its own random map, the old one more noisily."""
    rng = np.random.default_rng(seed)
    w_old = rng.standard_normal((latent, old_dim)).astype(np.float32) / np.sqrt(latent)
    w_new = rng.standard_normal((latent, new_dim)).astype(np.float32) / np.sqrt(latent)

    def embed(z: np.ndarray, w: np.ndarray, noise: float) -> np.ndarray:
        out = np.empty((len(z), w.shape[1]), dtype=np.float32)
        for s in range(0, len(z), 20000):  # in chunks: no float64 temporaries of the whole set
            block = z[s : s + 20000] @ w
            block += noise * rng.standard_normal(block.shape, dtype=np.float32)
            out[s : s + 20000] = l2_normalise(block)
        return out

    z = rng.standard_normal((n_images, latent), dtype=np.float32)
    zc = np.repeat(z, captions, axis=0) + 0.5 * rng.standard_normal((n_images * captions, latent), dtype=np.float32)
    return z, zc, w_old, w_new, embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=100_000)
    parser.add_argument("--captions", type=int, default=1, help="captions per image")
    parser.add_argument("--old-dim", type=int, default=256)
    parser.add_argument("--new-dim", type=int, default=512)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--methods", default="procrustes-text", help="comma-separated peers (no slerp: no support set here)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_scaling.json")
    args = parser.parse_args()

    t0 = time.perf_counter()
    z, zc, w_old, w_new, embed = synthetic_world(args.n_images, args.captions, args.latent, args.old_dim, args.new_dim, 0)
    old_space = EmbeddingSpace("synthetic-old", args.old_dim, "0" * 64)
    new_space = EmbeddingSpace("synthetic-new", args.new_dim, "1" * 64)
    index = np.repeat(np.arange(args.n_images), args.captions).tolist()
    old = PairEmbeddings(embed(z, w_old, 1.5), embed(zc, w_old, 1.5), index, old_space)
    new = PairEmbeddings(embed(z, w_new, 0.7), embed(zc, w_new, 0.7), index, new_space)
    train_z = np.random.default_rng(1).standard_normal((20_000, args.latent), dtype=np.float32)
    fit = FitData(new_text=embed(train_z, w_new, 0.7), old_text=embed(train_z, w_old, 1.5))
    del z, zc
    queries = {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method = build_method(name, new_space, old_space).fit(fit)
        queries[name] = method.transform_embeddings(new, old)
    embeddings_mib = sum(a.nbytes for e in (old, new) for a in (e.images, e.texts)) / 2**20
    embeddings_mib += sum(a.nbytes for q in queries.values() for a in (q.images, q.texts)) / 2**20
    setup_s, rss_before = time.perf_counter() - t0, current_rss_mib()
    print(f"data ready in {setup_s:.0f} s: {args.n_images} images, {len(index)} captions; "
          f"embeddings {embeddings_mib:.0f} MiB; RSS {rss_before:.0f} MiB (peak so far {rss_mib():.0f} MiB)", flush=True)

    t1 = time.perf_counter()
    stop = threading.Event()

    def report_memory() -> None:  # a heartbeat, so a long run shows it is alive and how much it holds
        while not stop.wait(60):
            print(f"  {time.perf_counter() - t1:.0f} s: RSS {current_rss_mib():.0f} MiB, peak {rss_mib():.0f} MiB", flush=True)

    threading.Thread(target=report_memory, daemon=True).start()
    matrix = evaluate_upgrade(old, new, queries, n_resamples=args.resamples)
    stop.set()
    evaluate_s = time.perf_counter() - t1
    peak = rss_mib()
    print(format_matrix(matrix), flush=True)
    print(f"evaluation: {evaluate_s:.0f} s; peak RSS {peak:.0f} MiB "
          f"(+{peak - rss_before:.0f} MiB over the {rss_before:.0f} MiB held before evaluating)")
    record = {
        "n_images": args.n_images, "n_captions": len(index), "old_dim": args.old_dim, "new_dim": args.new_dim,
        "methods": list(queries), "n_resamples": args.resamples, "setup_s": round(setup_s, 1),
        "evaluate_s": round(evaluate_s, 1), "embeddings_mib": round(embeddings_mib), "rss_before_evaluate_mib": round(rss_before),
        "peak_rss_mib": round(peak), "evaluation_overhead_mib": round(peak - rss_before),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
