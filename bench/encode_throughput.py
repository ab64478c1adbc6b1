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

The goal (at most 10%) is about the *wrapper overhead*: what xbt's code adds to the work any caller of the
model must do anyway (decode and preprocess, or tokenise, then forward). It is measured two ways:
  directly   the wrapper's own CPU time with the model's forward (and tokenizer) stubbed out on the
             instance, as a share of the bare work: precise, and what the verdict uses;
  paired     images wrapper/bare - 1, texts pipeline/(tokenise + bare) - 1, on CPU time (one thread: the
             cost itself, without the share of a busy machine other jobs took); a cross-check whose
             run-to-run noise on a shared machine (several %) is larger than the overhead itself.
*Overhead incl. preprocessing* is pipeline/bare - 1: it adds decoding, resizing and tokenising, which a
caller of the bare model pays too, and is listed so nobody mistakes the forward rate for the end-to-end
one. The variants are timed round-robin and each overhead is the median of the per-round ratios, so that
load from other jobs on the machine falls on both sides of every ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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


def ratio_range(num: list[float], den: list[float]) -> tuple[float, float]:
    """Smallest and largest per-round num/den - 1, in percent: the noise band of a paired overhead."""
    ratios = [100 * (a / b - 1) for a, b in zip(num, den)]
    return min(ratios), max(ratios)


def wrapper_own_cost_s(model: Any, images: list[str] | torch.Tensor, texts: list[str] | None, batch: int,
                       repeats: int) -> float:
    """CPU seconds xbt's encode wrapper spends per call when the model's own work costs nothing: the
    forward (and for texts the tokenizer, which a caller of the bare model runs too) replaced, on this
    instance only, by returning outputs computed beforehand. This is the wrapper's overhead measured
    directly, below the run-to-run noise of timing whole forwards on a shared machine."""
    outputs = torch.randn(batch, model.embed_dim)

    def precomputed(inputs: Any) -> torch.Tensor:  # one row per input of the batch, as the forward returns
        return outputs[: len(inputs)]

    name = "forward_text" if texts is not None else "forward_image"
    # for texts, the stubbed tokenizer hands the batch of strings on, so the forward stub can count them
    stubs = {name: precomputed} | ({"tokenize": lambda batch_texts: list(batch_texts)} if texts is not None else {})
    for attr, fn in stubs.items():
        object.__setattr__(model, attr, fn)
    try:
        call = ((lambda: model.encode_text(texts, batch_size=batch)) if texts is not None
                else (lambda: model.encode_image(images, batch_size=batch)))
        return h.repeat_fast(call, repeats, target_s=0.05, clock=time.thread_time).median
    finally:
        for attr in stubs:
            object.__delattr__(model, attr)


def bench_model(spec: str, images: list[str], texts: list[str], repeats: int,
                image_batch: int, text_batch: int) -> list[dict[str, Any]]:
    """Two rows (images, texts) for one model."""
    from xbt.specs import load_model

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
    iw, ic = h.interleaved({
        "pipeline": lambda: model.encode_image(images, batch_size=image_batch),
        "preprocess": lambda: model.preprocess(images),
        "wrapper": lambda: model.encode_image(pixels, batch_size=image_batch),
        "bare": bare_images,
    }, repeats)
    h.log(f"{spec}: texts")
    tw, tc = h.interleaved({
        "pipeline": lambda: model.encode_text(texts, batch_size=text_batch),
        "tokenise": lambda: [model.tokenize(texts[s]) for s in text_slices],
        "bare": bare_texts,
    }, repeats)
    # what a caller of the bare model does for texts: tokenise, then forward
    text_work = {k: [a + b for a, b in zip(t["tokenise"].runs, t["bare"].runs)] for k, t in (("wall", tw), ("cpu", tc))}
    h.log(f"{spec}: the wrapper's own work")
    own_image_s = wrapper_own_cost_s(model, pixels, None, image_batch, repeats)
    own_text_s = wrapper_own_cost_s(model, None, texts, text_batch, repeats)
    ni, nt = len(images), len(texts)
    image_row = {
        "model": spec, "input": f"{ni} images",
        "pipeline_per_s": ni / iw["pipeline"].median, "wrapper_per_s": ni / iw["wrapper"].median,
        "bare_per_s": ni / iw["bare"].median, "bare_per_cpu_s": ni / ic["bare"].median,
        "prepare_per_s": ni / iw["preprocess"].median,
        "wrapper_own_ms": own_image_s * 1e3, "wrapper_own_pct": 100 * own_image_s / ic["bare"].median,
        "wrapper_overhead_pct": paired_overhead(ic["wrapper"].runs, ic["bare"].runs),
        "wrapper_overhead_range_pct": ratio_range(ic["wrapper"].runs, ic["bare"].runs),
        "wrapper_overhead_wall_pct": paired_overhead(iw["wrapper"].runs, iw["bare"].runs),
        "overhead_incl_prep_pct": paired_overhead(ic["pipeline"].runs, ic["bare"].runs),
        "timings_s": {"wall": {k: v.to_dict() for k, v in iw.items()}, "cpu": {k: v.to_dict() for k, v in ic.items()}},
    }
    text_row = {
        "model": spec, "input": f"{nt} captions",
        "pipeline_per_s": nt / tw["pipeline"].median, "wrapper_per_s": None,
        "bare_per_s": nt / tw["bare"].median, "bare_per_cpu_s": nt / tc["bare"].median,
        "prepare_per_s": nt / tw["tokenise"].median,
        "wrapper_own_ms": own_text_s * 1e3, "wrapper_own_pct": 100 * own_text_s / statistics.median(text_work["cpu"]),
        "wrapper_overhead_pct": paired_overhead(tc["pipeline"].runs, text_work["cpu"]),
        "wrapper_overhead_range_pct": ratio_range(tc["pipeline"].runs, text_work["cpu"]),
        "wrapper_overhead_wall_pct": paired_overhead(tw["pipeline"].runs, text_work["wall"]),
        "overhead_incl_prep_pct": paired_overhead(tc["pipeline"].runs, tc["bare"].runs),
        "timings_s": {"wall": {k: v.to_dict() for k, v in tw.items()}, "cpu": {k: v.to_dict() for k, v in tc.items()}},
    }
    return [image_row, text_row]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from xbt.errors import AssetMissingError

    n_images = args.n_images or (8 if args.quick else 32)
    n_texts = args.n_texts or (16 if args.quick else 64)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="xbt-bench-encode-") as tmp:
        images, texts, source = bench_inputs(n_images, n_texts, Path(tmp))
        for spec in models:
            try:
                rows += bench_model(spec, images, texts, args.repeats, args.image_batch, args.text_batch)
            except AssetMissingError as exc:
                notes.append(f"{spec} skipped: {exc}")
                h.log(notes[-1])
    worst = max((r["wrapper_own_pct"] for r in rows), default=None)
    worst_paired = max((r["wrapper_overhead_pct"] for r in rows), default=None)
    detail = "; ".join(f"{r['model']} {r['input'].split()[-1]}: {r['wrapper_own_pct']:.2f}% "
                       f"({r['wrapper_own_ms']:.2f} ms per call)" for r in rows)
    if rows:
        lo = min(r["wrapper_overhead_range_pct"][0] for r in rows)
        hi = max(r["wrapper_overhead_range_pct"][1] for r in rows)
        detail = (f"Measured directly (the wrapper's own CPU time with the model's work stubbed out), as a share of "
                  f"the bare work: {detail}. Cross-check, timing whole runs: median paired overheads of at most "
                  f"{worst_paired:+.1f}% ('wrapper overhead' column), within a run-to-run noise band of "
                  f"{lo:+.0f}% to {hi:+.0f}% on this shared machine.")
    image_rows = [r for r in rows if r["input"].endswith("images")]
    if image_rows:
        slowest = max(image_rows, key=lambda r: r["overhead_incl_prep_pct"])
        notes.append(
            f"Decoding and preprocessing add the most for {slowest['model']} ({slowest['overhead_incl_prep_pct']:+.0f}% "
            f"over its forward; `preprocess` alone runs at {slowest['prepare_per_s']:.0f} images/s): PIL decoding, "
            "resizing and normalising on the CPU, which a caller of the bare model pays as well. It is not xbt's "
            "wrapper, and it is what a data-loader with worker processes would overlap with the forward.")
    waited = [r["bare_per_cpu_s"] / r["bare_per_s"] for r in rows]
    if waited and statistics.median(waited) > 1.3:
        notes.append(f"Wall-clock rates were a median {statistics.median(waited):.1f}x lower than CPU-time rates "
                     "('per core' column): the process waited for a core that other jobs held. The per-core rate is "
                     "what one idle core of this CPU would do.")
    notes.append("Overheads are medians of per-round ratios (the variants are timed round-robin); a negative "
                 "value is noise: the wrapper then costs less than the run-to-run spread of the forward.")
    return {
        "figure": "encode",
        "title": "Encoding throughput: xbt's pipeline against the bare forward",
        "description": (f"{len(images)} images (batch {args.image_batch}) and {len(texts)} captions (batch "
                        f"{args.text_batch}) from the {source}; items per second from the median of n runs, wall "
                        "time, and per core from CPU time. pipeline = `encode_image(paths)` / `encode_text(texts)`; "
                        "wrapper = `encode_image(pixel tensor)`; bare = `forward_image` / `forward_text` on "
                        "preprocessed pixels / tokens in a plain loop; prepare = decoding + transform / tokenising "
                        "alone. Wrapper overhead = wrapper / bare - 1 (images), pipeline / (tokenise + bare) - 1 "
                        "(texts), on CPU time, median of per-round ratios; the wrapper's own work is its CPU time "
                        "with the model's forward (and tokenizer) stubbed out, as a share of the bare work. "
                        "Overhead incl. preparation = pipeline / bare - 1. open_clip ViT-B-32 "
                        "has random weights (nothing downloaded): its speed is that of the trained model."),
        "params": {"n_images": len(images), "n_texts": len(texts), "image_batch": args.image_batch,
                   "text_batch": args.text_batch, "inputs": source, "models": models},
        "columns": [h.column("model", "model"), h.column("input", "input"),
                    h.column("pipeline_per_s", "pipeline /s", "{:.1f}"),
                    h.column("wrapper_per_s", "wrapper /s", "{:.1f}"),
                    h.column("bare_per_s", "bare forward /s", "{:.1f}"),
                    h.column("bare_per_cpu_s", "bare forward /s per core (CPU time)", "{:.1f}"),
                    h.column("prepare_per_s", "prepare alone /s", "{:.0f}"),
                    h.column("wrapper_own_pct", "wrapper's own work (direct)", "{wrapper_own_pct:.2f}% ({wrapper_own_ms:.2f} ms)"),
                    h.column("wrapper_overhead_pct", "wrapper overhead (paired runs)", "{:+.1f}%"),
                    h.column("overhead_incl_prep_pct", "overhead incl. preparation", "{:+.0f}%")],
        "rows": rows,
        "goal": h.goal(GOAL, None if worst is None else worst <= GOAL_PCT, detail or "no model could be loaded"),
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
