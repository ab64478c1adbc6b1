"""Encoding throughput: xbt's encode pipeline against the bare model forward on the same inputs.

    python bench/encode_throughput.py                          # testbed:old, testbed:new, open_clip ViT-B-32
    python bench/encode_throughput.py --models testbed:old     # one model
    python bench/encode_throughput.py --quick                  # a smoke run

For images, four timings of the same N images at the same batch size (the pipeline's default):
  pipeline        `model.encode_image(paths)`: file decoding + preprocessing + forward + xbt's wrapper
  preprocess      decoding + the model's transform alone (`model.preprocess`)
  wrapper         `model.encode_image(pixels)`: preprocessed tensors through xbt's wrapper
  bare            `model.forward_image(batch)` in a plain loop under inference mode: no wrapper at all
For texts: pipeline = `model.encode_text(texts)`, tokenise = the tokenizer alone, bare = `forward_text`
on pre-tokenised batches.

Two overheads are reported. *Wrapper overhead* is what xbt's code adds to the work any caller must do:
images wrapper/bare - 1, texts pipeline/(tokenise + bare) - 1. The goal (at most 10%) is about that.
*Overhead incl. preprocessing* is pipeline/bare - 1: it adds decoding, resizing and tokenising, which a
caller of the bare model pays too, and is listed so nobody mistakes the forward rate for the end-to-end
one. The variants are timed round-robin and each overhead is the median of the per-round ratios, so that
load from other jobs on the machine falls on both sides of every ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import _harness as h

GOAL_PCT = 10.0
GOAL = f"xbt's encode pipeline adds at most {GOAL_PCT:g}% to the bare model forward (wrapper overhead)"
DEFAULT_MODELS = ("testbed:old", "testbed:new", "openclip:ViT-B-32")


def bench_inputs(n_images: int, n_texts: int, scratch: Path) -> tuple[list[str], list[str], str]:
    """The testbed's evaluation images and captions when it is built; otherwise synthetic PNGs and captions."""
    from xbt.errors import AssetMissingError

    try:
        from xbt.data.testbed import load_split

        pairs = load_split("eval")
        images = [p.image for p in pairs[:n_images]]
        texts = [p.caption for p in pairs]
        texts = (texts * (n_texts // len(texts) + 1))[:n_texts]
        return images, texts, "testbed eval split (real PNG/rendered clip art and captions)"
    except AssetMissingError:
        from PIL import Image

        rng = np.random.default_rng(0)
        images = []
        for i in range(n_images):
            path = scratch / f"img{i:04d}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).repeat(20, 0).repeat(20, 1)).save(path)
            images.append(str(path))
        words = ["a", "red", "small", "dog", "car", "tree", "house", "with", "on", "the", "blue", "cat"]
        texts = [" ".join(rng.choice(words, 6)) for _ in range(n_texts)]
        return images, texts, "synthetic 320x320 PNGs and 6-word captions (testbed not built)"


def chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def paired_overhead(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den - 1, in percent."""
    return 100 * (statistics.median(a / b for a, b in zip(num, den)) - 1)


def bench_model(spec: str, images: list[str], texts: list[str], repeats: int,
                image_batch: int, text_batch: int) -> dict[str, Any]:
    from xbt.models import load_model

    model = load_model(spec)
    model.eval()
    pixels = model.preprocess(images)
    image_slices, text_slices = chunks(len(images), image_batch), chunks(len(texts), text_batch)
    tokens = [model.tokenize(texts[s]) for s in text_slices]

    @torch.inference_mode()
    def bare_images() -> None:
        for s in image_slices:
            model.forward_image(pixels[s])

    @torch.inference_mode()
    def bare_texts() -> None:
        for t in tokens:
            model.forward_text(t)

    h.log(f"{spec}: images")
    image_t = h.interleaved({
        "pipeline": lambda: model.encode_image(images, batch_size=image_batch),
        "preprocess": lambda: model.preprocess(images),
        "wrapper": lambda: model.encode_image(pixels, batch_size=image_batch),
        "bare": bare_images,
    }, repeats)
    h.log(f"{spec}: texts")
    text_t = h.interleaved({
        "pipeline": lambda: model.encode_text(texts, batch_size=text_batch),
        "tokenise": lambda: [model.tokenize(texts[s]) for s in text_slices],
        "bare": bare_texts,
    }, repeats)
    ni, nt = len(images), len(texts)
    text_work = [t + b for t, b in zip(text_t["tokenise"].runs, text_t["bare"].runs)]
    return {
        "model": spec, "embed_dim": model.embed_dim,
        "images_per_s": {k: ni / v.median for k, v in image_t.items()},
        "texts_per_s": {k: nt / v.median for k, v in text_t.items()},
        "image_wrapper_overhead_pct": paired_overhead(image_t["wrapper"].runs, image_t["bare"].runs),
        "image_overhead_incl_preprocessing_pct": paired_overhead(image_t["pipeline"].runs, image_t["bare"].runs),
        "text_wrapper_overhead_pct": paired_overhead(text_t["pipeline"].runs, text_work),
        "text_overhead_incl_tokenising_pct": paired_overhead(text_t["pipeline"].runs, text_t["bare"].runs),
        "timings_s": {"images": {k: v.to_dict() for k, v in image_t.items()},
                      "texts": {k: v.to_dict() for k, v in text_t.items()}},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from xbt.errors import AssetMissingError

    n_images = args.n_images or (8 if args.quick else 32)
    n_texts = args.n_texts or (16 if args.quick else 64)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="xbt-bench-encode-") as tmp:
        images, texts, source = bench_inputs(n_images, n_texts, Path(tmp))
        for spec in models:
            try:
                result = bench_model(spec, images, texts, args.repeats, args.image_batch, args.text_batch)
            except AssetMissingError as exc:
                notes.append(f"{spec} skipped: {exc}")
                h.log(notes[-1])
                continue
            ips, tps = result["images_per_s"], result["texts_per_s"]
            rows.append({**result, "img_pipeline": ips["pipeline"], "img_wrapper": ips["wrapper"], "img_bare": ips["bare"],
                         "img_preprocess": ips["preprocess"], "txt_pipeline": tps["pipeline"], "txt_bare": tps["bare"],
                         "txt_tokenise": tps["tokenise"]})
    worst = max((max(r["image_wrapper_overhead_pct"], r["text_wrapper_overhead_pct"]) for r in rows), default=None)
    detail = "; ".join(
        f"{r['model']}: images {r['image_wrapper_overhead_pct']:+.1f}%, texts {r['text_wrapper_overhead_pct']:+.1f}% "
        f"(incl. preprocessing: images {r['image_overhead_incl_preprocessing_pct']:+.0f}%, texts "
        f"{r['text_overhead_incl_tokenising_pct']:+.0f}%)" for r in rows)
    if rows:
        slowest = max(rows, key=lambda r: r["image_overhead_incl_preprocessing_pct"])
        notes.append(
            f"Decoding and preprocessing cost the most relative to the forward for {slowest['model']} "
            f"({slowest['img_preprocess']:.0f} images/s through `preprocess` alone, against "
            f"{slowest['img_bare']:.1f} images/s for its forward): that share is PIL decoding, resizing and "
            "normalising on the CPU, which the bare model needs as well; it is not xbt's wrapper.")
    notes.append("Overheads are medians of per-round ratios (variants timed round-robin); a negative value is "
                 "noise: the wrapper then costs less than the run-to-run spread of the forward.")
    return {
        "figure": "encode",
        "title": "Encoding throughput: xbt's pipeline against the bare forward",
        "description": (f"{len(images)} images (batch {args.image_batch}) and {len(texts)} captions (batch "
                        f"{args.text_batch}) from the {source}; items per second from the median of n runs. "
                        "open_clip ViT-B-32 has random weights (no download): its speed is that of the trained model."),
        "params": {"n_images": len(images), "n_texts": len(texts), "image_batch": args.image_batch,
                   "text_batch": args.text_batch, "inputs": source, "models": models},
        "columns": [h.column("model", "model"),
                    h.column("img_pipeline", "images/s pipeline (paths)", "{:.1f}"),
                    h.column("img_wrapper", "images/s wrapper (tensors)", "{:.1f}"),
                    h.column("img_bare", "images/s bare forward", "{:.1f}"),
                    h.column("image_wrapper_overhead_pct", "image wrapper overhead", "{:+.1f}%"),
                    h.column("image_overhead_incl_preprocessing_pct", "image overhead incl. decode+preprocess", "{:+.0f}%"),
                    h.column("txt_pipeline", "texts/s pipeline", "{:.1f}"),
                    h.column("txt_bare", "texts/s bare forward", "{:.1f}"),
                    h.column("text_wrapper_overhead_pct", "text wrapper overhead", "{:+.1f}%"),
                    h.column("text_overhead_incl_tokenising_pct", "text overhead incl. tokenising", "{:+.0f}%")],
        "rows": rows,
        "goal": h.goal(GOAL, None if worst is None else worst <= GOAL_PCT,
                       detail or "no model could be loaded"),
        "notes": notes,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model specs")
    parser.add_argument("--n-images", type=int, default=None, help="images per run (default 32: one batch; quick 8)")
    parser.add_argument("--n-texts", type=int, default=None, help="captions per run (default 64: one batch; quick 16)")
    parser.add_argument("--image-batch", type=int, default=32, help="encode_image's default batch size")
    parser.add_argument("--text-batch", type=int, default=64, help="encode_text's default batch size")


if __name__ == "__main__":
    h.cli(run, __doc__, add_arguments)
