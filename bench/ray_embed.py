"""Embedding throughput: the local engine against the Ray engine (a local Ray), and the cost of starting Ray.

    python bench/ray_embed.py                         # tiny open_clip on 400 images + testbed:old on 200 images
    python bench/ray_embed.py --skip-testbed          # the tiny model only (no testbed needed)
    python bench/ray_embed.py --n-tiny 2000 --n-testbed 500 --cpus 2

Every run writes into a fresh vectors folder and includes loading the model (in this process for the
local engine, in the actor for Ray), so `images_per_s` is end to end; `worker_images_per_s` is the rate
inside the workers (steady state), and the model's own load time and Ray's start-up are reported apart. Cores shared with other jobs make every figure noisy: the load
average at the start is recorded beside them. Writes bench/results/ray_embed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from xbt.gallery.ingest import GalleryItem, load_items
from xbt.specs import load_model
from xbt.scale.ray_embed import RayOptions, embed_items, start_ray


def tiny_openclip(folder: Path) -> str:
    """A randomly initialised small open_clip ViT saved as a local-dir (every Ray worker loads the same weights)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"openclip:local-dir:{folder}"


def synthetic_images(folder: Path, n: int) -> list[GalleryItem]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = folder / f"img{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(28, 0).repeat(28, 1)).save(path)
        items.append(GalleryItem(path.stem, {"image": str(path)}))
    return items


def timed_run(label: str, spec: str, items: list[GalleryItem], out: Path, engine: str, shard_size: int,
              options: RayOptions | None = None, threads: int | None = None) -> dict[str, Any]:
    import torch

    shutil.rmtree(out, ignore_errors=True)
    default_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    report = embed_items(spec, items, out, "image", engine=engine, shard_size=shard_size, ray_options=options,
                         threads=threads)
    torch.set_num_threads(default_threads)
    seconds = time.perf_counter() - t0
    row = {"run": label, "engine": engine, "items": len(items), "seconds": round(seconds, 2),
           "images_per_s": round(len(items) / seconds, 2), "shards": report.shards,
           # inside the workers only (no engine start, no model load); summed over actors, so for a pool of
           # n actors working in parallel the steady-state rate is about n times this
           "worker_images_per_s": round(len(items) / report.worker_seconds, 2) if report.worker_seconds else None}
    if options is not None:
        row.update(actors=options.actors, cpus_per_actor=options.cpus_per_actor, threads=options.threads)
    else:
        row.update(threads=threads or default_threads)
    print(json.dumps(row))
    return row


def bench_model(name: str, spec: str, items: list[GalleryItem], work: Path, shard_size: int, cpus: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_model(spec)
    load_s = time.perf_counter() - t0
    runs = [timed_run("local (this process, torch default threads)", spec, items, work / f"{name}-local", "local", shard_size),
            timed_run("local (this process, 1 torch thread)", spec, items, work / f"{name}-local1", "local", shard_size,
                      threads=1)]
    ray_configs = [
        ("ray: 1 actor, 1 CPU reserved, 1 torch thread", RayOptions(actors=1, cpus_per_actor=1.0, threads=1)),
        (f"ray: 1 actor, 1 CPU reserved, {cpus} torch threads", RayOptions(actors=1, cpus_per_actor=1.0, threads=cpus)),
        (f"ray: {cpus} actors, 0.5 CPU reserved each, 1 torch thread",
         RayOptions(actors=cpus, cpus_per_actor=0.5, threads=1)),
    ]
    for label, options in ray_configs:
        runs.append(timed_run(label, spec, items, work / f"{name}-ray-{len(runs)}", "ray", shard_size, options))
    return {"model": spec, "model_load_s": round(load_s, 2), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-tiny", type=int, default=400)
    parser.add_argument("--n-testbed", type=int, default=200)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--skip-testbed", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ray_embed.json")
    args = parser.parse_args()

    import ray

    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
                              "ray_version": ray.__version__}
    with tempfile.TemporaryDirectory(prefix="xbt-bench-ray-") as tmp:
        work = Path(tmp)
        tiny_spec = tiny_openclip(work / "tiny_model")
        tiny_items = synthetic_images(work / "images", args.n_tiny)
        testbed_items = None
        if not args.skip_testbed:
            testbed_items = load_items("testbed:eval", "image")[: args.n_testbed]

        # Ray's start-up, measured on its own: ray.init, then a job of one shard of one item (actor start
        # and model load included), against the same one-item job on the local engine.
        started, init_s = start_ray(RayOptions(num_cpus=args.cpus))
        one = RayOptions(actors=1, cpus_per_actor=1.0, threads=1)
        first_local = timed_run("one item, local", tiny_spec, tiny_items[:1], work / "one-local", "local", 1)
        first_ray = timed_run("one item, ray", tiny_spec, tiny_items[:1], work / "one-ray", "ray", 1, one)
        result["ray_start"] = {"ray_init_s": round(init_s, 2), "one_item_job_local_s": first_local["seconds"],
                               "one_item_job_ray_s": first_ray["seconds"],
                               "job_overhead_s": round(first_ray["seconds"] - first_local["seconds"], 2)}
        print(json.dumps(result["ray_start"]))

        result["tiny_openclip"] = bench_model("tiny", tiny_spec, tiny_items, work, args.shard_size, args.cpus)
        if testbed_items is not None:
            result["testbed_old"] = bench_model("testbed", "testbed:old", testbed_items, work, args.shard_size, args.cpus)
        if started:
            ray.shutdown()
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
