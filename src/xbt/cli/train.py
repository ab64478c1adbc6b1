"""Making compatible models: `xbt train` (XBT), `xbt fit` (one peer), `xbt chain`, `xbt export`, and the
models they start from: `xbt testbed` (the offline testbed's lit models) and `xbt lit train`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from xbt.errors import InputError
from xbt.cli.common import App, Device, FitImages, FitTexts, FitTextsOld, Precision, Runtime, Workers, console, sources, split_list

testbed_app = App(help="The offline testbed: data splits and the old/new lit models.", no_args_is_help=True)
lit_app = App(help="lit models: locked pretrained towers plus trained heads.", no_args_is_help=True)


@testbed_app.command("build")
def testbed_build(
    models: str = typer.Option("old,new", help="Comma-separated testbed models to train: old, new, third."),
    force: bool = typer.Option(False, help="Rebuild splits and models even if cached."),
) -> None:
    """Build (or reuse) the testbed: render, split, cache tower features, train the lit models."""
    from xbt.train.testbed import build_testbed

    t0 = time.perf_counter()
    info = build_testbed(split_list(models), force=force)
    console.print(f"testbed ready under {info['root']} in {time.perf_counter() - t0:.0f} s")
    console.print("split sizes: " + ", ".join(f"{k}={v}" for k, v in info["sizes"].items()))
    if info["left_out"].get("svgs_not_rendered"):
        console.print(f"[yellow]left out[/] {info['left_out']['svgs_not_rendered']} SVGs that could not be rendered"
                      f" (examples in {info['root']}/splits/manifest.json)")


@testbed_app.command("evaluate")
def testbed_evaluate(
    split: str = typer.Option("eval", help="Testbed split to evaluate on (eval for reporting, val for tuning)."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON here."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """Old and new models each in their own space, and new queries against the old gallery unadapted."""
    from xbt.compat.baselines import NoAdaptation
    from xbt.data.testbed import load_split
    from xbt.embed import embed_pairs
    from xbt.eval.matrix import evaluate_upgrade, format_matrix
    from xbt.eval.runner import map_queries

    pairs = load_split(split)
    runtime = Runtime(device, precision)
    old, new = runtime.load("testbed:old"), runtime.load("testbed:new")
    old_emb, new_emb = embed_pairs(old, pairs, True), embed_pairs(new, pairs, True)
    naive = NoAdaptation(new_emb.space, old_emb.space).to_model(new)
    matrix = evaluate_upgrade(old_emb, new_emb, {"no-adaptation": map_queries(naive, new_emb, old_emb)})
    print(format_matrix(matrix))
    if out:
        out.write_text(json.dumps(matrix.to_dict(), indent=2))


@lit_app.command("train")
def lit_train(
    pairs: Path = typer.Option(..., help="Pairs file (JSONL with image, caption[, image_id])."),
    out: Path = typer.Option(..., help="Folder to write the model to (config.json + model.safetensors)."),
    image_tower: str = typer.Option("lite0", help="EfficientNet-Lite variant: lite0, lite1, lite2."),
    text_tower: str = typer.Option("asset:all-MiniLM-L6-v2", help="sentence-transformers folder or asset:NAME."),
    embed_dim: int = typer.Option(256, help="Joint embedding dimension."),
    epochs: int = typer.Option(60),
    batch_size: int = typer.Option(1024),
    lr: float = typer.Option(2e-3),
    weight_decay: float = typer.Option(0.5),
    input_dropout: float = typer.Option(0.3),
    seed: int = typer.Option(0),
) -> None:
    """Train a lit model's heads (symmetric InfoNCE, learnable temperature) on cached tower features."""
    from xbt.data.datasets import load_pairs
    from xbt.data.testbed import TestbedModel
    from xbt.train.lit import LitTrainConfig
    from xbt.train.testbed import train_lit_model

    spec = TestbedModel(out.name, {"kind": "efficientnet-lite", "variant": image_tower},
                        {"kind": "sentence-transformers", "source": text_tower}, embed_dim, str(pairs))
    config = LitTrainConfig(embed_dim=embed_dim, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, input_dropout=input_dropout, seed=seed)
    model, history = train_lit_model(spec, load_pairs(pairs), out, config)
    console.print(f"saved {out} (space {model.space.id}); final loss {history[-1]:.4f}")


def train(
    config: str = typer.Option(..., "--config", help="XBT config: a YAML file, or a shipped config's name (xbt-testbed)."),
    out: Path = typer.Option(..., "--out", help="Output folder: the compatible model, checkpoints, training report."),
    max_pairs: Optional[int] = typer.Option(None, help="Override: use only N image-text pairs (0 = stage 1 only)."),
    seed: Optional[int] = typer.Option(None, help="Override the config's seed."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value by dotted path, e.g. --set stage2.lora.enabled=false (YAML value); repeatable."),
    nproc: int = typer.Option(1, "--nproc", help="Data-parallel processes on this machine (launches torchrun; one per GPU)."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when torch sees one), cpu (gloo between processes) or cuda (one GPU per process, NCCL)."),
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Train a compatible model (XBT: text-only projection pretraining, then LoRA + projection on pairs).

    A run killed mid-way resumes from its last checkpoint when started again with the same config and --out.
    With --nproc N (or when started by torchrun) the global batch is split across processes and the
    result matches a single-process run."""
    from xbt.train.distributed import launch, process_group, under_torchrun
    from xbt.train.config import load_xbt_config
    from xbt.train.stages import train_xbt

    if nproc > 1 and not under_torchrun():
        args = ["xbt.cli", "train", "--config", str(config), "--out", str(out), "--device", device, "--precision", precision,
                "--num-workers", str(num_workers)]
        args += ["--max-pairs", str(max_pairs)] if max_pairs is not None else []
        args += ["--seed", str(seed)] if seed is not None else []
        args += [x for item in set_ or [] for x in ("--set", item)]
        raise typer.Exit(launch(nproc, args))
    cfg = load_xbt_config(config, set_ or [], max_pairs, seed)
    t0 = time.perf_counter()
    with process_group(device) as ctx:
        model = train_xbt(cfg, out, show_progress=ctx.is_main, distributed=ctx, precision=precision, num_workers=num_workers)
    if ctx.is_main:
        how = f" on {ctx.world_size} processes ({ctx.device.type})" if ctx.distributed else ""
        console.print(f"compatible model saved to {out} in {time.perf_counter() - t0:.0f} s{how}; it emits vectors in {model.space.id}")


def chain(
    newer: str = typer.Option(..., help="The compatible model of the newest generation into the middle one (v3 -> v2): compat:PATH."),
    older: str = typer.Option(..., help="The compatible model of the middle generation into the oldest (v2 -> v1): compat:PATH."),
    out: Path = typer.Option(..., "--out", help="Output folder of the chained model (load it as compat:OUT)."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """Chain two upgrades without retraining: v3 -> v2 space -> v1 space, serving a v1 gallery.

    The chained model runs the newest model (with its adapters) and both projections, and declares the
    oldest space. Only the newer model's folder is referenced; the older one's projection is copied."""
    from xbt.compat.model import chain as chain_models
    from xbt.specs import load_compatible

    runtime = Runtime(device, precision)  # checked here; the chain itself runs no model
    halves = [runtime.place(load_compatible(spec.removeprefix("compat:"))) for spec in (newer, older)]
    chained = chain_models(*halves)
    chained.save_pretrained(out)
    console.print(f"chained model saved to {out}: {chained.new_spec.removeprefix('compat:')} -> "
                  f"{halves[1].new_space_at_training.id} -> {chained.space.id}; load it as compat:{out}")


def fit(
    method: str = typer.Argument(..., help="A peer: procrustes-text, procrustes-image, procrustes-both, affine, adapter, slerp,"
                                 " no-adaptation, or a gallery-modality variant (procrustes-gallery, affine-gallery,"
                                 " adapter-gallery, slerp-gallery: text queries mapped by the image-fitted map)."),
    old: str = typer.Option(..., help="The old model's spec (the gallery's)."),
    new: str = typer.Option(..., help="The new model's spec."),
    out: Path = typer.Option(..., help="Folder to save the compatible model to (loads as compat:OUT)."),
    fit_pairs: Optional[list[str]] = typer.Option(None, help="Image-text pairs to fit on (any dataset source); repeatable."),
    fit_texts: FitTexts = None,
    fit_text: FitTextsOld = None,
    fit_images: FitImages = None,
    support: Optional[str] = typer.Option(None, help="Support pairs for the settings chosen on held-out data (SLERP's weight, the ridge, epochs)."),
    from_gallery: Optional[str] = typer.Option(None, help="Also fit on a sample of this gallery (its stored old vectors, and the new model's of the same items: no labels). An image gallery feeds the image side (the map its text queries need), a caption gallery the text side."),
    sample: int = typer.Option(3000, help="--from-gallery: how many of its items to re-embed with the new model."),
    sample_seed: int = typer.Option(0, help="--from-gallery: the seed of the sample."),
    keep: Optional[Path] = typer.Option(None, help="--from-gallery: write the sample's new vectors here (a vectors folder), so a backfill loads them (`xbt gallery backfill --preload DIR`) instead of encoding them again."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Fit one training-free peer and save it as a deployable compatible model, without the whole job."""
    from xbt.compat.fit import fit_image_items, fit_peer
    from xbt.data.datasets import open_dataset, open_images
    from xbt.data.texts import load_texts

    t0 = time.perf_counter()
    texts = [t for source in sources(fit_texts, fit_text) for t in load_texts(source)]
    pairs = [p for source in fit_pairs or [] for p in open_dataset(source)]
    images = [p for source in fit_images or [] for p in open_images(source)]
    if keep is not None and not from_gallery:
        raise InputError("--keep keeps the new vectors of a --from-gallery sample: give --from-gallery GALLERY too")
    runtime = Runtime(device, precision, num_workers)
    old_model, new_model = runtime.load(old), runtime.load(new)
    extra = _gallery_sample(from_gallery, old_model, new_model, sample, sample_seed, keep) if from_gallery else None
    model = fit_peer(method, old_model, new_model, texts, pairs,
                     open_dataset(support) if support else None, show_progress=True, fit_images=images, extra=extra)
    model.save_pretrained(out)
    ensemble = " (an ensemble: it runs the old model on every query too)" if model.needs_old_model_at_query_time else ""
    n_unlabeled = len(fit_image_items(pairs, images)) - len(pairs)
    unlabeled = f" and {n_unlabeled} unlabeled images" if images else ""
    console.print(f"fitted {method} in {time.perf_counter() - t0:.1f} s on {len(texts)} texts, {len(pairs)} pairs{unlabeled}{ensemble}")
    if not model.shares_query_map:
        maps = model.describe_query_maps()
        console.print(f"a map per query tower: text queries {maps['text']['fitted_on']}; image queries {maps['image']['fitted_on']}")
    console.print(f"saved {out}: use it as --model compat:{out.resolve()} (space {model.space.id})")


def _gallery_sample(gallery: str, old_model: Any, new_model: Any, n: int, seed: int, keep: Optional[Path]) -> Any:
    """`fit --from-gallery`: the sample as fit data (its new vectors kept where asked)."""
    from xbt.gallery.base import open_gallery
    from xbt.scale.sample import sample_gallery

    with open_gallery(gallery) as g:
        old_model.space.check(g.space, f"the gallery at {gallery} (give --old the model that built it)")
        drawn = sample_gallery(g, new_model, n, seed=seed)
    console.print(f"sampled {len(drawn.ids)} {drawn.modality}s of {gallery} (re-embedded by the new model;"
                  f" {len(drawn.failed)} could not be)")
    if keep is not None:
        drawn.keep(keep)
        console.print(f"kept their new vectors in {keep}: `xbt gallery backfill ... --preload {keep}` loads them")
    return drawn.fit_data()


def export(
    model: str = typer.Argument(..., help="The compatible model to export: compat:DIR."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (graphs, checked in onnxruntime), npz or safetensors (the map as plain arrays + JSON)."),
    out: Path = typer.Option(..., "--out", help="Folder to write to (one file set per tower, and export.json)."),
    encoders: bool = typer.Option(True, "--encoders/--no-encoders", help="With onnx: also the whole query encoder of each tower, where the backend traces."),
) -> None:
    """Export the query side for a search stack that does not run xbt (docs/deploy.md): new-model embedding
    in, old-space query vector out, for each tower; every ONNX graph is checked against the model."""
    from rich.markup import escape

    from xbt.compat.export import export_model
    from xbt.specs import load_model

    compatible = load_model(model if model.startswith("compat:") else f"compat:{model}")
    manifest = export_model(compatible, out, fmt, encoders=encoders)  # type: ignore[arg-type]  # export_model checks the kind
    for tower, entry in manifest["towers"].items():
        check = entry["map"].get("check")
        console.print(f"{tower}: {out / entry['map']['file']}" + (f" (onnxruntime: max |diff| {check['max_abs_diff']:.1e})" if check else ""))
        encoder = entry.get("encoder")
        if encoder:
            console.print(f"{tower} encoder: {out / encoder['file']}" if encoder["exported"] else f"[yellow]{tower} encoder not exported:[/] {escape(encoder['why'])}")
    console.print(f"{out / 'export.json'}: spaces {manifest['new_space']} -> {manifest['old_space']}, digest {manifest['artifact_digest'][:12]}")
