"""The GPU check (issue 16): run it once on a CUDA machine, a few minutes at most.

    python bench/gpu_check.py                  # -> bench/results/gpu.json
    python bench/gpu_check.py --smoke-on-cpu --out /tmp/gpu-smoke.json   # the same code on the CPU, tiny sizes

On CUDA it measures, with open_clip ViT-B-32 and ViT-L-14 (random weights: the speed is that of trained
ones), at fp32 / bf16 / fp16 through xbt's own encoders (`VLPModel.configure` + `encode_image` /
`encode_text`): images/s (preprocessed pixels, and PNG files decoded by DataLoader workers), texts/s and
peak GPU memory; GPU vectors against CPU fp32 vectors of the same weights (cosine, max |difference|, the
embedding space unchanged), a compatible model's map on the GPU, and a few XBT training steps on the GPU
(steps/s, peak memory). The figure is written after every step, and a step that fails (out of memory, a
crash) is recorded with its error while the next steps run: a run cut short keeps what it finished
(`"complete": false` until the end). Without CUDA it writes {"measured": false, "reason": "not measured: no GPU
was lent"} and exits 0: no figure is ever made up. `--smoke-on-cpu` runs the measuring code on the CPU with
tiny sizes (to check the script itself); its output is marked `"smoke": true` and is not a GPU figure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from _harness import load_average, machine_info  # noqa: E402

NOT_MEASURED = "not measured: no GPU was lent"
CAPTIONS = ["a red apple on a wooden table", "two dogs playing in the snow", "a city street at night with lights",
            "a bowl of soup", "an old man reading a newspaper", "a small boat on a calm lake", "a cat asleep", "a kite"]
# Agreement with CPU fp32 vectors expected of each precision (cosine of the same input's two vectors).
MIN_COSINE = {"fp32": 0.9999, "bf16": 0.99, "fp16": 0.995}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _rate(fn, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Items/s of fn() (n items per call): one warm-up call, then the median of `repeats` timed calls."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"items_per_s": round(n / times[len(times) // 2], 1), "best_items_per_s": round(n / times[0], 1),
            "n_items": n, "repeats": repeats}


def _agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    return {"min_cosine": round(float((reference * other).sum(-1).min()), 6),
            "max_abs_diff": round(float((reference - other).abs().max()), 6)}


def _png_files(folder: Path, n: int, size: int = 256) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def encode_figures(name: str, device: torch.device, precisions: list[str], n_images: int, n_texts: int,
                   n_check: int, workers: int, files: list[str], repeats: int) -> dict[str, Any]:
    """Throughput, memory and GPU-vs-CPU agreement of one open_clip architecture at each precision."""
    from xbt.compat.maps import LinearMap
    from xbt.compat.model import CompatibleModel
    from xbt.specs import load_model

    torch.manual_seed(0)
    model = load_model(f"openclip:{name}")  # random weights
    size = model.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pixels = torch.randn(n_images, 3, size, size)
    texts = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(n_texts)]
    check_pixels, check_texts = pixels[:n_check], texts[:n_check]
    space = model.space
    cpu_images = model.encode_image(check_pixels)  # the reference: CPU fp32
    cpu_texts = model.encode_text(check_texts)
    row: dict[str, Any] = {"model": f"openclip:{name} (random weights)", "image_size": size, "precisions": {}}
    for precision in precisions:
        model.configure(device, precision, num_workers=workers)
        _reset_peak(device)
        images = _rate(lambda: model.encode_image(pixels), n_images, device, repeats)
        text = _rate(lambda: model.encode_text(texts), n_texts, device, repeats)
        entry: dict[str, Any] = {"images_from_pixels": images, "texts": text, "peak_gpu_memory_gib": _peak_gib(device)}
        if files:
            entry["images_from_png_files"] = _rate(lambda: model.encode_image(files), len(files), device, 1)
            entry["images_from_png_files"]["num_workers"] = workers
        image_agree = _agreement(cpu_images, model.encode_image(check_pixels))
        text_agree = _agreement(cpu_texts, model.encode_text(check_texts))
        entry["vs_cpu_fp32"] = {"images": image_agree, "texts": text_agree, "min_cosine_expected": MIN_COSINE[precision],
                                "within_tolerance": min(image_agree["min_cosine"], text_agree["min_cosine"]) >= MIN_COSINE[precision]}
        model.invalidate_space()
        entry["space_unchanged"] = model.space == space
        row["precisions"][precision] = entry
    # a compatible model (map-only) on the device: its map runs there too, on encoded and on cached vectors
    model.configure(device, "fp32")
    compat = CompatibleModel(model, LinearMap(model.embed_dim, model.embed_dim), space, method="no-adaptation")
    torch.nn.init.eye_(compat.query_map.weight)
    mapped = compat.map_features(cpu_texts.numpy())
    row["compatible_model_on_device"] = {
        "map_device": str(compat.query_map.weight.device),
        "encode_vs_cpu": _agreement(cpu_texts, compat.encode_text(check_texts)),
        "map_features_vs_input": _agreement(cpu_texts, torch.from_numpy(mapped)),
    }
    model.to("cpu")  # frees its GPU memory before the next architecture
    _reset_peak(device)
    return row


def training_figures(device: torch.device, old_name: str, new_name: str, precision: str, n_pairs: int,
                     batch_size: int, work: Path) -> dict[str, Any]:
    """A few XBT steps (stage 1 and stage 2 with LoRA) on the device through xbt's own training program."""
    import yaml

    from xbt.specs import load_model
    from xbt.train.distributed import DistContext
    from xbt.train.config import XBTConfig
    from xbt.train.stages import train_xbt

    files = _png_files(work / "train", n_pairs, size=64)
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": f, "caption": f"{CAPTIONS[i % len(CAPTIONS)]} {i}",
                                         "image_id": str(i)}) + "\n" for i, f in enumerate(files)))
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(f"{CAPTIONS[i % len(CAPTIONS)]} number {i}" for i in range(4 * n_pairs)) + "\n")
    cfg = XBTConfig.from_dict(yaml.safe_load((BENCH.parent / "src/xbt/configs/xbt-clip.yaml").read_text()) | {
        "old": f"openclip:{old_name}", "new": f"openclip:{new_name}", "train_pairs": str(pairs), "text_corpus": str(corpus)})
    cfg.stage1.epochs, cfg.stage1.batch_size = 2, batch_size
    cfg.stage2.epochs, cfg.stage2.batch_size = 2, batch_size
    torch.manual_seed(0)
    old = load_model(cfg.old).configure(device, precision)
    new = load_model(cfg.new).configure(device, precision)
    kwargs: dict[str, Any] = {"old": old, "new": new, "show_progress": False, "distributed": DistContext.local(device)}
    if "precision" in inspect.signature(train_xbt).parameters:
        kwargs["precision"] = precision
    _reset_peak(device)
    t0 = time.perf_counter()
    train_xbt(cfg, work / "run", **kwargs)
    total = time.perf_counter() - t0
    report = json.loads((work / "run" / "training_report.json").read_text())
    steps = {stage: -(-n // batch_size) * 2 for stage, n in (("stage1", 4 * n_pairs), ("stage2", n_pairs))}
    timings = report.get("timings", {})
    return {
        "old": cfg.old, "new": cfg.new, "precision": precision if "precision" in kwargs else "fp32 (training precision not wired)",
        "n_pairs": n_pairs, "batch_size": batch_size, "steps": steps, "seconds_total": round(total, 2),
        "timings": timings,
        "stage2_steps_per_s": round(steps["stage2"] / timings["stage2_s"], 3) if timings.get("stage2_s") else None,
        "stage1_steps_per_s": round(steps["stage1"] / timings["stage1_s"], 3) if timings.get("stage1_s") else None,
        "peak_gpu_memory_gib": _peak_gib(device),
    }


def run_step(figure: dict[str, Any], out: Path, section: str, label: dict[str, Any], measure) -> None:
    """One step of the check: measure() appended to figure[section] (or, when it raises, `label` with the
    error: the next steps still run), and the figure written at once, so a run cut short (out of memory, a
    timeout, a kill) keeps every step it finished."""
    t0 = time.perf_counter()
    try:
        entry = measure()
    except Exception as exc:  # noqa: BLE001 - recorded in the figure; the run goes on with the next step
        entry = label | {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         "traceback": traceback.format_exc().splitlines()[-6:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    entry["step_seconds"] = round(time.perf_counter() - t0, 2)
    figure.setdefault(section, []).append(entry)
    figure["steps_done"] = figure.get("steps_done", 0) + 1
    _write(out, figure)


def within_tolerance(figure: dict[str, Any]) -> bool | None:
    """Every measured precision within its cosine tolerance with the space unchanged (None: none measured)."""
    entries = [e for row in figure.get("encoding", []) for e in row.get("precisions", {}).values()]
    if not entries:
        return None
    return all(e["vs_cpu_fp32"]["within_tolerance"] and e["space_unchanged"] for e in entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "gpu.json")
    parser.add_argument("--smoke-on-cpu", action="store_true", help="run the measuring code on the CPU, tiny sizes")
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers for the PNG-file figure")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    figure: dict[str, Any] = {"schema": "xbt.gpu_check/1", "created": started, "machine": machine_info(),
                              "load_average_start": load_average(), "script": "bench/gpu_check.py"}
    if not torch.cuda.is_available() and not args.smoke_on_cpu:
        figure |= {"measured": False, "reason": NOT_MEASURED}
        _write(args.out, figure)
        print(NOT_MEASURED)
        return 0
    smoke = not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    names = ["ViT-B-32"] if smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = ["fp32", "bf16"] if smoke else ["fp32", "bf16", "fp16"]
    n_images, n_texts = (8, 16) if smoke else (args.images, args.texts)
    workers = 2 if smoke else args.workers
    figure |= {"measured": not smoke, "smoke": smoke, "device": str(device), "complete": False,
               "gpu": None if smoke else torch.cuda.get_device_name(0)}
    _write(args.out, figure)  # from the first second on, the file says what ran where
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["XBT_HOME"] = str(work / "xbt_home")  # the feature cache of the training figure stays here
        files = _png_files(work / "png", 4 if smoke else 512)
        for name in names:
            run_step(figure, args.out, "encoding", {"model": f"openclip:{name}"},
                     lambda: encode_figures(name, device, precisions, n_images, n_texts, 4 if smoke else 64, workers,
                                            files, 1 if smoke else 3))
        for p in ([] if args.skip_training else ["bf16"] if smoke else ["fp32", "bf16", "fp16"]):
            run_step(figure, args.out, "training", {"precision": p},
                     lambda: training_figures(device, "ViT-B-32", names[-1], p, 8 if smoke else 512,
                                              4 if smoke else 128, work / f"train-{p}"))
    figure["seconds"] = round(time.perf_counter() - t0, 1)
    figure["load_average_end"] = load_average()
    figure["all_within_tolerance"] = within_tolerance(figure)
    figure["errors"] = sum("error" in e for section in ("encoding", "training") for e in figure.get(section, []))
    figure["complete"] = True
    _write(args.out, figure)
    print(json.dumps({"out": str(args.out), "seconds": figure["seconds"], "errors": figure["errors"],
                      "all_within_tolerance": figure["all_within_tolerance"]}))
    return 0


def _write(path: Path, figure: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figure, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
