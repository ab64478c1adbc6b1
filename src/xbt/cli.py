"""The xbt command line: a thin layer over the library (the library never imports this module)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from xbt.errors import XbtError  # noqa: E402

app = typer.Typer(help="xbt: backfill-free upgrades of image-text retrieval systems.", no_args_is_help=True)
assets_app = typer.Typer(help="Install and check the shipped model towers and image-caption data.", no_args_is_help=True)
testbed_app = typer.Typer(help="The offline testbed: data splits and the old/new lit models.", no_args_is_help=True)
lit_app = typer.Typer(help="lit models: locked pretrained towers plus trained heads.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
app.add_typer(testbed_app, name="testbed")
app.add_typer(lit_app, name="lit")
console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(1)


# ----- where models run: one definition of --device / --precision / --num-workers for every command --------
Device = Annotated[str, typer.Option("--device", help="Where the models run: auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option("--precision", help="fp32, bf16 (CPU or GPU) or fp16 (GPU only): autocast for the forward passes; the weights, hence the embedding space, stay the same.")]
Workers = Annotated[int, typer.Option("--num-workers", help="Processes decoding and preprocessing images (DataLoader workers); 0 = in this process.")]


class _Runtime:
    """The device, precision and loader workers of one command, checked once; `load` gives configured models."""

    def __init__(self, device: str = "auto", precision: str = "fp32", num_workers: int = 0):
        from xbt.models.device import check_precision, resolve_device

        self.device = resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.num_workers = num_workers
        self.options = {"device": str(self.device), "precision": self.precision, "num_workers": num_workers}

    def load(self, spec: str):
        from xbt.specs import load_model

        return self.place(load_model(spec))

    def place(self, model):
        return model.configure(self.device, self.precision, self.num_workers)


@assets_app.command("install")
def assets_install(quiet: bool = typer.Option(False, "--quiet", help="Print only problems.")) -> None:
    """Reassemble the towers that ship in parts and report what is present."""
    from xbt.assets import install_assets

    try:
        status = install_assets()
    except XbtError as exc:
        _fail(exc)
    _print_assets(status, quiet)


@assets_app.command("check")
def assets_check() -> None:
    """Report every asset: where it is, or the command that installs it."""
    from xbt.assets import check_assets

    status = check_assets()
    _print_assets(status, quiet=False)
    if not all(s.ok for s in status):
        raise typer.Exit(1)


def _print_assets(status, quiet: bool) -> None:
    for s in status:
        if not s.ok:
            console.print(f"[yellow]missing[/] {s.name}: {s.detail}")
        elif not quiet:
            console.print(f"[green]ok[/] {s.name}: {s.detail}")


@testbed_app.command("build")
def testbed_build(
    models: str = typer.Option("old,new", help="Comma-separated testbed models to train: old, new, third."),
    force: bool = typer.Option(False, help="Rebuild splits and models even if cached."),
) -> None:
    """Build (or reuse) the testbed: render, split, cache tower features, train the lit models."""
    from xbt.train.testbed import build_testbed

    try:
        t0 = time.perf_counter()
        info = build_testbed([m.strip() for m in models.split(",") if m.strip()], force=force)
    except XbtError as exc:
        _fail(exc)
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
    from xbt.eval.embed import embed_pairs
    from xbt.eval.matrix import evaluate_upgrade, format_matrix
    from xbt.eval.runner import map_queries
    from xbt.specs import load_model

    try:
        pairs = load_split(split)
        runtime = _Runtime(device, precision)
        old, new = runtime.place(load_model("testbed:old")), runtime.place(load_model("testbed:new"))
        old_emb, new_emb = embed_pairs(old, pairs, True), embed_pairs(new, pairs, True)
        naive = NoAdaptation(new_emb.space, old_emb.space).to_model(new)
        matrix = evaluate_upgrade(old_emb, new_emb, {"no-adaptation": map_queries(naive, new_emb, old_emb)})
    except XbtError as exc:
        _fail(exc)
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
    from xbt.train.testbed import train_lit_model
    from xbt.train.lit import LitTrainConfig

    try:
        data = load_pairs(pairs)
        spec = TestbedModel(out.name, {"kind": "efficientnet-lite", "variant": image_tower},
                            {"kind": "sentence-transformers", "source": text_tower}, embed_dim, str(pairs))
        config = LitTrainConfig(embed_dim=embed_dim, epochs=epochs, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay, input_dropout=input_dropout, seed=seed)
        model, history = train_lit_model(spec, data, out, config)
    except XbtError as exc:
        _fail(exc)
    console.print(f"saved {out} (space {model.space.id}); final loss {history[-1]:.4f}")


@app.command("train")
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
    from xbt.paths import resolve_config
    from xbt.train.distributed import launch, process_group, under_torchrun
    from xbt.train.stages import XBTConfig, train_xbt

    if nproc > 1 and not under_torchrun():
        args = ["xbt.cli", "train", "--config", str(config), "--out", str(out), "--device", device, "--precision", precision,
                "--num-workers", str(num_workers)]
        args += ["--max-pairs", str(max_pairs)] if max_pairs is not None else []
        args += ["--seed", str(seed)] if seed is not None else []
        args += [x for item in set_ or [] for x in ("--set", item)]
        raise typer.Exit(launch(nproc, args))
    try:
        cfg = XBTConfig.from_file(resolve_config(config))
        if set_:
            import yaml

            from xbt.train.stages import apply_overrides

            pairs = [item.split("=", 1) for item in set_]
            if any(len(p) != 2 for p in pairs):
                raise XbtError(f"--set takes KEY=VALUE, e.g. stage2.lora.enabled=false; got {set_}")
            cfg = XBTConfig.from_dict(apply_overrides(cfg.to_dict(), {k: yaml.safe_load(v) for k, v in pairs}, "--set"))
        if max_pairs is not None:
            cfg.max_pairs = max_pairs
            if max_pairs == 0:
                cfg.stage2.enabled = False
        if seed is not None:
            cfg.seed = seed
        t0 = time.perf_counter()
        with process_group(device) as ctx:
            model = train_xbt(cfg, out, show_progress=ctx.is_main, distributed=ctx, precision=precision,
                              num_workers=num_workers)
    except XbtError as exc:
        _fail(exc)
    if ctx.is_main:
        how = f" on {ctx.world_size} processes ({ctx.device.type})" if ctx.distributed else ""
        console.print(f"compatible model saved to {out} in {time.perf_counter() - t0:.0f} s{how}; it emits vectors in {model.space.id}")


@app.command("chain")
def chain_command(
    newer: str = typer.Option(..., help="The compatible model of the newest generation into the middle one (v3 -> v2): compat:PATH."),
    older: str = typer.Option(..., help="The compatible model of the middle generation into the oldest (v2 -> v1): compat:PATH."),
    out: Path = typer.Option(..., "--out", help="Output folder of the chained model (load it as compat:OUT)."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """Chain two upgrades without retraining: v3 -> v2 space -> v1 space, serving a v1 gallery.

    The chained model runs the newest model (with its adapters) and both projections, and declares the
    oldest space. Only the newer model's folder is referenced; the older one's projection is copied."""
    from xbt.compat.model import chain
    from xbt.specs import load_compatible

    try:
        runtime = _Runtime(device, precision)  # checked here; the chain itself runs no model
        halves = [runtime.place(load_compatible(spec.removeprefix("compat:"))) for spec in (newer, older)]
        chained = chain(*halves)
        chained.save_pretrained(out)
    except XbtError as exc:
        _fail(exc)
    console.print(f"chained model saved to {out}: {chained.new_spec.removeprefix('compat:')} -> "
                  f"{halves[1].new_space_at_training.id} -> {chained.space.id}; load it as compat:{out}")


_FIT_TEXTS_HELP = "Texts both models embed for the text-side fits (.txt, a dataset's captions, testbed:text_corpus); repeatable."
_FIT_IMAGES_HELP = ("Unlabeled images both models embed for the image-side fits (a folder, a file list, any dataset"
                    " source; captions ignored), e.g. a sample of the gallery's kind of image, never its evaluated items; repeatable.")


def _sources(*options: Optional[list[str]]) -> list[str]:
    """The sources of an option and its hidden older spelling (e.g. --fit-texts and --fit-text), in order."""
    return [s for option in options for s in option or []]


@app.command("fit")
def fit_command(
    method: str = typer.Argument(..., help="A peer: procrustes-text, procrustes-image, procrustes-both, affine, adapter, slerp,"
                                 " no-adaptation, or a gallery-modality variant (procrustes-gallery, affine-gallery,"
                                 " adapter-gallery, slerp-gallery: text queries mapped by the image-fitted map)."),
    old: str = typer.Option(..., help="The old model's spec (the gallery's)."),
    new: str = typer.Option(..., help="The new model's spec."),
    out: Path = typer.Option(..., help="Folder to save the compatible model to (loads as compat:OUT)."),
    fit_pairs: Optional[list[str]] = typer.Option(None, help="Image-text pairs to fit on (any dataset source); repeatable."),
    fit_texts: Optional[list[str]] = typer.Option(None, "--fit-texts", help=_FIT_TEXTS_HELP),
    fit_text: Optional[list[str]] = typer.Option(None, "--fit-text", hidden=True),  # the older spelling
    fit_images: Optional[list[str]] = typer.Option(None, "--fit-images", help=_FIT_IMAGES_HELP),
    support: Optional[str] = typer.Option(None, help="Support pairs for the settings chosen on held-out data (SLERP's weight, the ridge, epochs)."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Fit one training-free peer and save it as a deployable compatible model, without the whole job."""
    from xbt.compat.fit import fit_image_items, fit_peer
    from xbt.data.datasets import open_dataset, open_images
    from xbt.data.texts import load_texts

    try:
        t0 = time.perf_counter()
        texts = [t for source in _sources(fit_texts, fit_text) for t in load_texts(source)]
        pairs = [p for source in fit_pairs or [] for p in open_dataset(source)]
        images = [p for source in fit_images or [] for p in open_images(source)]
        runtime = _Runtime(device, precision, num_workers)
        model = fit_peer(method, runtime.load(old), runtime.load(new), texts, pairs,
                         open_dataset(support) if support else None, show_progress=True, fit_images=images)
        model.save_pretrained(out)
    except XbtError as exc:
        _fail(exc)
    ensemble = " (an ensemble: it runs the old model on every query too)" if model.needs_old_model_at_query_time else ""
    n_unlabeled = len(fit_image_items(pairs, images)) - len(pairs)
    unlabeled = f" and {n_unlabeled} unlabeled images" if images else ""
    console.print(f"fitted {method} in {time.perf_counter() - t0:.1f} s on {len(texts)} texts, {len(pairs)} pairs{unlabeled}{ensemble}")
    if not model.shares_query_map:
        maps = model.describe_query_maps()
        console.print(f"a map per query tower: text queries {maps['text']['fitted_on']}; image queries {maps['image']['fitted_on']}")
    console.print(f"saved {out}: use it as --model compat:{out.resolve()} (space {model.space.id})")


@app.command("export")
def export_command(
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

    try:
        manifest = export_model(load_model(model if model.startswith("compat:") else f"compat:{model}"), out, fmt,
                                encoders=encoders)
    except XbtError as exc:
        _fail(exc)
    for tower, entry in manifest["towers"].items():
        check = entry["map"].get("check")
        console.print(f"{tower}: {out / entry['map']['file']}" + (f" (onnxruntime: max |diff| {check['max_abs_diff']:.1e})" if check else ""))
        encoder = entry.get("encoder")
        if encoder:
            console.print(f"{tower} encoder: {out / encoder['file']}" if encoder["exported"] else f"[yellow]{tower} encoder not exported:[/] {escape(encoder['why'])}")
    console.print(f"{out / 'export.json'}: spaces {manifest['new_space']} -> {manifest['old_space']}, digest {manifest['artifact_digest'][:12]}")


@app.command("embed")
def embed_command(
    model: str = typer.Option(..., help="Model spec, e.g. openclip:ViT-B-32@openai, testbed:old, compat:PATH."),
    data: str = typer.Option(..., help="A folder of images, a .txt of captions, or a pair source (.jsonl/.csv, testbed:eval, ...)."),
    out: Path = typer.Option(..., help="Folder for the vector shards (parquet) and vectors.json; rerun to resume."),
    modality: str = typer.Option("image", help="image: embed the images; text: the captions."),
    split: Optional[str] = typer.Option(None, help="Split of --data, where the source has splits."),
    engine: str = typer.Option("local", help="local (this process) or ray (actors on a Ray cluster)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (ray://HOST:10001 or auto); default: a local Ray."),
    shard_size: int = typer.Option(1024, help="Items per shard: the unit of work, of atomic writing and of resumption."),
    batch_size: int = typer.Option(64, help="Items per model forward pass."),
    actors: Optional[int] = typer.Option(None, help="Ray: size of the actor pool (default: by the cluster's CPUs)."),
    cpus_per_actor: float = typer.Option(1.0, help="Ray: CPUs each actor reserves (fractions allowed)."),
    threads: Optional[int] = typer.Option(None, help="Torch threads (local: this process; Ray: per actor, default its CPUs rounded up)."),
    gallery: Optional[Path] = typer.Option(None, help="Also add the vectors to this gallery (created if missing; resumable)."),
    gpus_per_actor: float = typer.Option(0.0, help="Ray: GPUs each actor reserves (0.5 = two actors share a GPU); its model runs there."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Embed a data source into parquet vector shards, on this machine or on Ray; optionally load a gallery."""
    from xbt.gallery.ingest import load_items
    from xbt.gallery.store import Gallery, is_gallery
    from xbt.scale.ray_embed import ENGINES, RayOptions, embed_items
    from xbt.scale.vectors import Manifest, load_into_gallery

    try:
        if engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        items = load_items(data, modality, split)
        options = RayOptions(address=address, actors=actors, cpus_per_actor=cpus_per_actor, threads=threads,
                             gpus_per_actor=gpus_per_actor)
        if engine == "local" or gpus_per_actor == 0:
            _Runtime(device, precision, num_workers)  # checked here; a GPU actor resolves auto on its own node
        report = embed_items(model, items, out, modality, engine=engine, shard_size=shard_size, batch_size=batch_size,
                             ray_options=options, threads=threads, device=device, precision=precision,
                             num_workers=num_workers, show_progress=True)
        if gallery is not None:
            manifest = Manifest.read(out)
            target = (Gallery.open(gallery) if is_gallery(gallery)
                      else Gallery.create(gallery, manifest.embedding_space, modality=modality))  # type: ignore[arg-type]
            with target:
                added, present = load_into_gallery(out, target)
            console.print(f"gallery {gallery}: added {added}, already present {present}")
    except (XbtError, ValueError) as exc:
        _fail(exc)
    for item_id, why in list(report.failed.items())[:10]:
        console.print(f"[yellow]failed[/] {item_id}: {why}")
    _print_json(report.to_dict())


@app.command("evaluate")
def evaluate(
    old: Optional[str] = typer.Option(None, help="Old model spec (the gallery's model), e.g. openclip:ViT-B-32@openai."),
    new: Optional[str] = typer.Option(None, help="New model spec, e.g. openclip:ViT-L-14@openai."),
    data: Optional[str] = typer.Option(None, help="Evaluation pairs: CSV/JSONL, Karpathy JSON, image folder, .tar shards, testbed:eval."),
    split: Optional[str] = typer.Option(None, help="Split of --data (Karpathy JSON: test, val, ...; default test)."),
    image_root: Optional[str] = typer.Option(None, help="Folder that relative image paths resolve against."),
    fit_texts: Optional[list[str]] = typer.Option(None, "--fit-texts", help=_FIT_TEXTS_HELP),
    fit_text: Optional[list[str]] = typer.Option(None, "--fit-text", hidden=True),  # the older spelling
    fit_images: Optional[list[str]] = typer.Option(None, "--fit-images", help=_FIT_IMAGES_HELP),
    fit_pairs: Optional[list[str]] = typer.Option(None, help="Training image-text pairs to fit on (any dataset source); repeatable."),
    fit_split: Optional[str] = typer.Option(None, help="Split of --fit-pairs / --fit-texts (Karpathy: train, or train,restval)."),
    support: Optional[str] = typer.Option(None, help="Support pairs on which SLERP chooses its weight (never the evaluation split)."),
    support_split: Optional[str] = typer.Option(None, help="Split of --support (Karpathy: val)."),
    methods: str = typer.Option("peers", help="Comma-separated: peer names, compat:PATH (XBT models), or 'peers' for all peers."),
    gallery_extra: Optional[list[str]] = typer.Option(None, "--gallery-extra", help=(
        "Extra gallery items every system searches, never queries (a sample of your real gallery): images (a folder), "
        "texts (.txt), pairs (any dataset source), or testbed:distractors; repeatable.")),
    out: Path = typer.Option(..., help="Folder for results.json, report.md, report.html and figures/."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the Markdown report here (e.g. docs/results/testbed.md)."),
    ks: str = typer.Option("1,5,10", help="Recall@K values."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples of the queries."),
    seed: int = typer.Option(0),
    data_efficiency: Optional[str] = typer.Option(None, help="Training-pair counts for the data-efficiency curve, e.g. 50,100,200."),
    testbed: bool = typer.Option(False, "--testbed", help="Defaults for the offline testbed (eval split, text corpus + xbt_train, val support)."),
    folds: Optional[int] = typer.Option(None, help="With --testbed: cross-validate over K folds of the Tux Paint items (models retrained per fold), pooled."),
    seeds: int = typer.Option(1, help="With --folds: repeat over this many seeds (fold deal and training), report the seed spread."),
    cv_config: str = typer.Option("cv-testbed", help="With --folds: the methods and XBT variants to cross-validate (a YAML file or a shipped name)."),
    show_recommendation: bool = typer.Option(True, "--recommend/--no-recommend", help="Print the recommended method."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Every method side by side: old->old, new->new and each method's new->old, with intervals and a report."""
    from xbt.compat.registry import PEER_METHODS
    from xbt.eval.report import format_summary, write_report
    from xbt.eval.runner import TESTBED_DEFAULTS, evaluate_from_specs

    if folds is not None:
        if not testbed:
            _fail(ValueError("--folds cross-validates the offline testbed: add --testbed"))
        results = _crossval(folds, seeds, cv_config, resamples, [int(k) for k in ks.split(",")], out, gallery_extra or [])
        paths = write_report(results, out, markdown)
        print(format_summary(results))
        console.print("wrote " + ", ".join(str(p) for k, p in paths.items() if not k.startswith("figure:")))
        return
    defaults = TESTBED_DEFAULTS if testbed else {}
    old, new, data = old or defaults.get("old"), new or defaults.get("new"), data or defaults.get("data")
    if not (old and new and data):
        _fail(ValueError("give --old, --new and --data (or --testbed for the offline testbed)"))
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    all_peers = "peers" in method_list  # then peers lacking their training data are skipped, not an error
    method_list = list(dict.fromkeys(x for m in method_list for x in (PEER_METHODS if m == "peers" else [m])))
    try:
        sizes = [int(x) for x in data_efficiency.split(",") if x.strip()] if data_efficiency else defaults.get("data_efficiency", [])
        texts = _sources(fit_texts, fit_text)
        run = evaluate_from_specs(
            old, new, data, split, image_root, texts or defaults.get("fit_text", []), fit_pairs or defaults.get("fit_pairs", []),
            fit_split, support or defaults.get("support"), support_split, method_list,
            ks=[int(k) for k in ks.split(",")], n_resamples=resamples, seed=seed, data_efficiency=sizes,
            skip_unfittable=all_peers, show_progress=True, fit_images=fit_images or defaults.get("fit_images", []),
            gallery_extra=gallery_extra or [], **_Runtime(device, precision, num_workers).options,
        )
        results = run.to_results() | {"command": "xbt " + " ".join(sys.argv[1:])}
        paths = write_report(results, out, markdown)
    except (XbtError, ValueError) as exc:
        _fail(exc)
    print(format_summary(results))
    for warning in results["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    if show_recommendation:
        rec = results["recommendation"]
        console.print(f"[bold]recommended:[/] {rec['method'] or 'none'}. {rec['reason']}")
    console.print("wrote " + ", ".join(str(p) for k, p in paths.items() if not k.startswith("figure:")))


def _crossval(folds: int, seeds: int, cv_config: str, resamples: int, ks: list[int], out: Path,
              gallery_extra: list[str] | None = None) -> dict:
    """`xbt evaluate --testbed --folds K`: run (or resume) every fold (under XBT_HOME/runs), pooled."""
    import yaml

    from xbt.eval.crossval import CrossValConfig, run_crossval

    try:
        from xbt.paths import resolve_config

        doc = yaml.safe_load(resolve_config(cv_config).read_text()) or {}
        compare = [tuple(pair) for pair in doc.pop("compare", [])]
        if any(len(pair) != 2 for pair in compare):
            raise ValueError(f"{cv_config}: every `compare` entry is two method names [a, b]; quote names that hold a comma")
        if gallery_extra:
            doc["gallery_extra"] = list(gallery_extra)
        cfg = CrossValConfig(k=folds, seeds=tuple(range(seeds)), ks=ks, n_resamples=resamples, **doc)
        return run_crossval(cfg, show_progress=True, command="xbt " + " ".join(sys.argv[1:]), compare=compare)
    except (XbtError, ValueError, TypeError) as exc:
        _fail(exc)


@app.command("recommend")
def recommend_command(
    results_json: Path = typer.Argument(..., help="A results.json written by xbt evaluate."),
    allow_old_model: bool = typer.Option(True, "--allow-old-model/--no-old-model", help="Consider ensembles (SLERP) that keep the old encoder."),
) -> None:
    """Name the method that passes the compatibility criterion in every cell with the highest mean update gain."""
    from xbt.eval.recommend import matrix_from_results, recommend

    try:
        matrix = matrix_from_results(json.loads(results_json.read_text()))
    except (OSError, KeyError, ValueError) as exc:
        _fail(ValueError(f"{results_json} is not a results.json written by xbt evaluate ({exc})"))
    method, reason = recommend(matrix, allow_old_model_at_query_time=allow_old_model)
    print(method or "none")
    console.print(reason)
    if method is None:
        raise typer.Exit(2)


@app.command("upgrade")
def upgrade(
    old: str = typer.Option(..., help="The old model's spec (its vectors fill the gallery)."),
    new: str = typer.Option(..., help="The new model's spec."),
    data: str = typer.Option(..., help="Evaluation data: the gallery items and queries (never trained on)."),
    fit_pairs: str = typer.Option(..., help="Image-text pairs for training (XBT stage 2, image-fitted peers)."),
    fit_texts: list[str] = typer.Option(..., "--fit-texts", help="Text corpus for the text-only stage and the text-side fits (.txt or a dataset); repeatable."),
    fit_images: Optional[list[str]] = typer.Option(None, "--fit-images", help=_FIT_IMAGES_HELP),
    support: Optional[str] = typer.Option(None, help="Support pairs for the choices made on held-out data (SLERP's weight, NNN's alpha; not the evaluation data)."),
    config: str = typer.Option("xbt-testbed", help="XBT config: a YAML file or a shipped config name (its old/new/data fields are overridden)."),
    out: Path = typer.Option(Path("outputs/upgrade"), help="Where the report, pictures and summary go."),
    examples: int = typer.Option(4, help="Example queries to draw."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """The whole upgrade on your own models and data: old galleries, XBT, peers, report, pictures."""
    from xbt.pipeline import UpgradeJob

    options = _runtime_options(device, precision, num_workers)
    _run_upgrade(UpgradeJob(old=old, new=new, eval_data=data, fit_pairs=fit_pairs,
                            fit_texts=fit_texts[0] if len(fit_texts) == 1 else list(fit_texts), fit_images=list(fit_images or []),
                            support=support, xbt_config=config, n_example_queries=examples, **options), out)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("outputs/demo"), help="Where the report, pictures and summary go."),
    config: str = typer.Option("xbt-testbed", help="XBT config: a YAML file or a shipped config name."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """The offline end-to-end upgrade on the testbed: build it, upgrade, evaluate, show what changed."""
    from xbt.pipeline import UpgradeJob

    _run_upgrade(UpgradeJob.testbed(xbt_config=config, **_runtime_options(device, precision, num_workers)), out)


def _runtime_options(device: str, precision: str, num_workers: int) -> dict:
    try:
        return _Runtime(device, precision, num_workers).options
    except XbtError as exc:
        _fail(exc)
        raise


def _run_upgrade(job, out: Path) -> None:
    from xbt.pipeline import run_upgrade

    t0 = time.perf_counter()
    try:
        summary = run_upgrade(job, out, log=lambda line: console.print(f"[bold cyan]{line}[/]"))
    except XbtError as exc:
        _fail(exc)
    _print_summary(summary)
    console.print(f"total {time.perf_counter() - t0:.0f} s")
    console.print(f"report: {summary['report']['markdown']}  |  {summary['report']['html']}")
    console.print(f"example pictures: {Path(summary['examples'][0]).parent}/ ({len(summary['examples'])} PNG)")
    models = summary["models"]
    console.print(f"compatible models (one per method, each loads as compat:DIR): {Path(models['models']['XBT']).parent}/")
    if models.get("spec"):
        console.print(f"[bold]to deploy the recommended model ({models['method']}):[/]")
        for line in summary["deploy_commands"]:
            console.print(f"  {line}", soft_wrap=True, highlight=False)
    else:
        console.print("[yellow]no method passed the compatibility criterion in every cell: nothing is recommended[/]")


def _print_summary(summary: dict) -> None:
    """Old, upgraded (XBT), ceiling, per cell, with the criterion and the update gain."""
    m = summary["matrix"]
    table = Table(title="Upgrade without backfill: recall (%) with 95% bootstrap intervals")
    for col in ("direction", "K", "old->old", "XBT new->old", "ceiling new->new", "criterion", "update gain"):
        table.add_column(col)
    names = {"t2i": "text->image", "i2t": "image->text"}

    def fmt(e):  # a gain is undefined (None) when new->new ties old->old
        if e.get("value") is None:
            return "n/a"
        return f"{e['value']:.1f} [{e['low']:.1f}, {e['high']:.1f}]"

    for d in ("t2i", "i2t"):
        for k in m["ks"]:
            cell = m["methods"]["XBT"][d][str(k)]
            verdict = "PASS (confident)" if cell["passes_confidently"] else ("pass" if cell["passes"] else "FAIL")
            table.add_row(names[d], f"R@{k}", fmt(m["old_old"][d][str(k)]), fmt(cell["recall"]),
                          fmt(m["new_new"][d][str(k)]), verdict, fmt(cell["gain"]) + " %")
    console.print(table)
    rec = summary.get("recommendation") or {}
    if rec:
        console.print(f"recommended: [bold]{rec.get('method')}[/] — {rec.get('reason')}")


# ----- galleries and the service (a thin layer over xbt.gallery and xbt.serve) -----------------------------
gallery_app = typer.Typer(help="Stamped galleries: build, add, search, info, backfill and cut-over.", no_args_is_help=True)
app.add_typer(gallery_app, name="gallery")
_GALLERY_BACKEND: dict[str, Optional[str]] = {"backend": "embedded", "uri": None}


@gallery_app.callback()
def gallery_options(
    backend: str = typer.Option("embedded", envvar="XBT_GALLERY_BACKEND",
                                help="embedded: --gallery is a folder; milvus: --gallery names a collection at --uri."),
    uri: Optional[str] = typer.Option(None, envvar="XBT_MILVUS_URI",
                                      help="Milvus: a server (http://HOST:19530) or a Milvus Lite file (./FILE.db)."),
) -> None:
    """Galleries are folders (embedded store) or Milvus collections: `--backend milvus --uri URI`, or give
    a gallery as milvus:URI#NAME (milvus:./FILE.db for Milvus Lite) in any command."""
    if backend not in ("embedded", "milvus"):
        _fail(ValueError(f"--backend must be embedded or milvus, not {backend!r}"))
    if backend == "milvus" and not uri:
        _fail(ValueError("--backend milvus needs --uri (http://HOST:19530, or ./FILE.db for Milvus Lite)"))
    _GALLERY_BACKEND.update(backend=backend, uri=uri)


def _gallery_ref(gallery: str) -> str:
    """A --gallery value as a reference `xbt.gallery.base.open_gallery` resolves (see `gallery_options`)."""
    if _GALLERY_BACKEND["backend"] == "milvus" and not gallery.startswith("milvus:"):
        return f"milvus:{_GALLERY_BACKEND['uri']}#{gallery}"
    return gallery


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@gallery_app.command("build")
def gallery_build(
    model: str = typer.Option(..., help="Model spec whose space the gallery is stamped with (e.g. testbed:old)."),
    data: str = typer.Option(..., help="A folder of images, a .txt of captions, or a pair source (.jsonl/.csv, testbed:eval, ...)."),
    out: str = typer.Option(..., help="New folder for the gallery, or milvus:URI#NAME (see `xbt gallery --help`)."),
    modality: str = typer.Option("image", help="image: a gallery of images (text queries find images); text: of captions."),
    split: Optional[str] = typer.Option(None, help="Split of --data, where the source has splits."),
    index: str = typer.Option("auto", help="Index kind: auto (by size), flat (exact), hnsw or ivf."),
    batch_size: int = typer.Option(64, help="Items embedded per batch (each batch is durable once added)."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Embed a data source with a model into a new gallery; its index kind is chosen by size.

    Rerun the same command after an interruption and it resumes: the items already stored are kept and
    skipped (not embedded again), the rest are added, nothing is duplicated."""
    from xbt.gallery.base import create_gallery, gallery_exists, is_milvus, open_gallery
    from xbt.gallery.index import IndexConfig
    from xbt.gallery.ingest import ingest, load_items
    from xbt.gallery.store import is_complete_gallery

    try:
        items = load_items(data, modality, split)
        vlp = _Runtime(device, precision, num_workers).load(model)
        ref = _gallery_ref(out)
        source = Path(data).expanduser()
        build = {"data": str(source.resolve()) if source.exists() else data, "split": split, "modality": modality}
        stored: set[str] = set()
        if gallery_exists(ref) if is_milvus(ref) else is_complete_gallery(ref):
            gallery = open_gallery(ref, IndexConfig(kind=index))
            try:
                stored = _resumable_build(gallery, out, vlp, build, [it.id for it in items])
            except BaseException:
                gallery.close()
                raise
            if stored:
                console.print(f"resuming the build of {out}: {len(stored)} of {len(items)} items already stored")
        else:
            gallery = create_gallery(ref, vlp.space, IndexConfig(kind=index), modality, extra={"build": build})
        with gallery:
            report = ingest(gallery, vlp, [it for it in items if it.id not in stored], batch_size=batch_size,
                            on_conflict="skip", show_progress=True)
            report.skipped += sorted(stored)
            gallery.compact()
            info = gallery.info()
    except XbtError as exc:
        _fail(exc)
    _report_ingest(report)
    console.print(f"gallery {out}: {info.size} items in space {info.space_id}, index {info.index_kind}")


def _resumable_build(gallery, out: str, vlp, build: dict, ids: list[str]) -> set[str]:
    """The ids already stored, if `gallery` is an earlier, interrupted run of this very build (same data,
    split, modality and space); otherwise refuse, since `build` never adds to someone else's gallery."""
    from xbt.errors import InputError

    gallery.space.check(vlp.space, f"the gallery at {out} (an earlier build with another model?)")
    recorded = gallery.extra.get("build")
    if recorded != build:
        made = f" (built from {recorded['data']})" if isinstance(recorded, dict) and "data" in recorded else ""
        raise InputError(f"{out} already holds a gallery{made}; add items to it with `xbt gallery add --on-conflict skip`,"
                         " or choose another --out")
    return gallery.present(ids)


def _report_ingest(report) -> None:
    console.print(f"added {len(report.added)}, skipped {len(report.skipped)} existing, failed {len(report.failed)}")
    for item_id, why in report.failed[:10]:
        console.print(f"[yellow]failed[/] {item_id}: {why}")


@gallery_app.command("add")
def gallery_add(
    gallery: str = typer.Option(..., help="The gallery: a folder, or milvus:URI#NAME."),
    model: str = typer.Option(..., help="A model emitting the gallery's space: the old model, or a compatible model (compat:PATH)."),
    data: str = typer.Option(..., help="Items to add (same kinds of source as `build`)."),
    split: Optional[str] = typer.Option(None, help="Split of --data."),
    on_conflict: str = typer.Option("error", help="An id already stored: error, skip or replace."),
    batch_size: int = typer.Option(64),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Ingest new items; with a compatible new model they land in the old space, no backfill needed."""
    from xbt.gallery.base import open_gallery
    from xbt.gallery.ingest import ingest, load_items

    try:
        with open_gallery(_gallery_ref(gallery)) as g:
            items = load_items(data, g.modality or "image", split)
            report = ingest(g, _Runtime(device, precision, num_workers).load(model), items, batch_size=batch_size,
                            on_conflict=on_conflict,  # type: ignore[arg-type]
                            show_progress=True)
    except XbtError as exc:
        _fail(exc)
    _report_ingest(report)


@gallery_app.command("search")
def gallery_search(
    gallery: str = typer.Option(..., help="The gallery: a folder, or milvus:URI#NAME."),
    model: str = typer.Option(..., help="A model emitting the gallery's space (old model or compatible model)."),
    text: Optional[str] = typer.Option(None, help="Search by this caption."),
    image: Optional[Path] = typer.Option(None, help="Search by this image file."),
    k: int = typer.Option(10, "-k", "--k", help="How many results."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """Search a gallery by text or image; prints the hits as JSON."""
    from xbt.gallery.base import QueryModelView, open_gallery
    from xbt.gallery.ingest import GalleryRetriever

    if (text is None) == (image is None):
        _fail(ValueError("give exactly one of --text or --image"))
    try:
        with open_gallery(_gallery_ref(gallery)) as g:
            vlp = _Runtime(device, precision).load(model)
            view = QueryModelView(g, vlp)  # a calibration made for this model applies; one for another is ignored
            retriever = GalleryRetriever(view, vlp)
            hits = retriever.search_texts([text], k) if text is not None else retriever.search_images([image], k)
            status = view.calibration_status() if g.calibration else None
    except XbtError as exc:
        _fail(exc)
    if status is not None:
        console.print(("" if status["applies"] else "[yellow]note:[/] ") + status["message"])
    _print_json([h.to_dict() for h in hits[0]])


@gallery_app.command("calibrate")
def gallery_calibrate(
    gallery: str = typer.Option(..., help="The gallery: a folder, or milvus:URI#NAME."),
    model: str = typer.Option(..., help="The query model the calibration is for (the one that will search: e.g. compat:PATH)."),
    queries: Optional[str] = typer.Option(None, help="Training pairs whose captions (image gallery) or images (caption gallery) the query model embeds as the bank of queries; never the evaluation queries."),
    split: Optional[str] = typer.Option(None, help="Split of --queries (e.g. train)."),
    alpha: Optional[float] = typer.Option(None, help="NNN's weight: each item's score is lowered by alpha x the mean of its top-k similarities to the bank."),
    val: Optional[str] = typer.Option(None, help="Choose alpha from 0, .25, .5, .75, 1 on these val pairs (with --gallery-model) instead of giving --alpha."),
    val_split: Optional[str] = typer.Option(None, help="Split of --val (e.g. val)."),
    gallery_model: Optional[str] = typer.Option(None, help="With --val: the gallery's own model, which embeds the val pairs as the val gallery."),
    k: int = typer.Option(10, "--k", help="How many of the bank's nearest queries each item's bias averages."),
    clear: bool = typer.Option(False, "--clear", help="Remove the gallery's calibration instead."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Calibrate a gallery for one query model (hubness reduction, NNN): each item's bias is computed once
    from a bank of training queries and stored with the gallery (items added later get theirs from the
    stored bank); searches by that model (`gallery search`, the service) apply it, other models' ignore it."""
    import numpy as np

    from xbt.data.datasets import open_dataset
    from xbt.data.pairs import unique_images
    from xbt.errors import InputError
    from xbt.eval.calibration import choose_alpha
    from xbt.eval.embed import PairEmbeddings, caption_image_index, embed_images, embed_texts
    from xbt.eval.matrix import QueryVectors
    from xbt.gallery.base import describe_query_model, open_gallery
    from xbt.gallery.ingest import check_model

    try:
        with open_gallery(_gallery_ref(gallery)) as g:
            if clear:
                console.print("calibration removed" if g.clear_calibration() else "the gallery was not calibrated")
                return
            if queries is None:
                raise InputError("give --queries: training pairs to make the bank of queries from")
            if (alpha is None) == (val is None):
                raise InputError("give --alpha A, or --val SOURCE (with --gallery-model) to choose alpha on val pairs")
            if val is not None and gallery_model is None:
                raise InputError("--val needs --gallery-model: the gallery's own model embeds the val pairs as the val gallery")
            if g.modality not in ("image", "text"):
                raise InputError(f"the gallery at {gallery} has no modality; calibration needs an image or a caption gallery")
            if val is not None and (val, val_split) == (queries, split):
                raise InputError("--val and --queries name the same pairs; choose alpha on pairs the bank does not come from")
            built = g.extra.get("build") or {}
            if isinstance(built, dict) and built.get("data") in (queries, str(Path(queries).expanduser().resolve())) \
                    and built.get("split") == split:
                console.print("[yellow]warning:[/] the bank comes from the very pairs the gallery was built from;"
                              " make it from training queries, not from the queries the gallery will be searched with")
            runtime = _Runtime(device, precision, num_workers)
            vlp = runtime.load(model)
            check_model(g, vlp)
            pairs = open_dataset(queries, split)
            if not pairs:
                raise InputError(f"{queries} holds no pairs")
            direction = "t2i" if g.modality == "image" else "i2t"
            bank = (embed_texts(vlp, [p.caption for p in pairs], show_progress=True) if direction == "t2i"
                    else embed_images(vlp, pairs, show_progress=True))
            chosen = None
            if val is not None:
                gm = runtime.load(gallery_model)
                check_model(g, gm)
                vp = open_dataset(val, val_split)
                if not vp:
                    raise InputError(f"{val} holds no pairs")
                d, n_img = g.space.dim, len(unique_images(vp))
                empty = np.zeros((0, d), np.float32)
                if direction == "t2i":
                    val_gallery = PairEmbeddings(embed_images(gm, vp), np.zeros((len(vp), d), np.float32),
                                                 caption_image_index(vp), gm.space)
                    val_queries = QueryVectors(np.zeros((n_img, d), np.float32), embed_texts(vlp, [p.caption for p in vp]), vlp.space)
                    bank_q = QueryVectors(empty, bank, vlp.space)
                else:
                    val_gallery = PairEmbeddings(np.zeros((n_img, d), np.float32), embed_texts(gm, [p.caption for p in vp]),
                                                 caption_image_index(vp), gm.space)
                    val_queries = QueryVectors(embed_images(vlp, vp), np.zeros((len(vp), d), np.float32), vlp.space)
                    bank_q = QueryVectors(bank, empty, vlp.space)
                chosen = choose_alpha(val_queries, val_gallery, bank_q, k=k, directions=[direction])
                alpha = chosen.alpha[direction]
            source = f"{queries}" + (f" (split {split})" if split else "")
            stamp = g.calibrate(bank, alpha=float(alpha), k=k, query_model=describe_query_model(vlp), space=vlp.space,
                                source=source)
    except (XbtError, ValueError) as exc:
        _fail(exc)
    if chosen is not None:
        scores = ", ".join(f"{a:g}: {v:.1f}" for a, v in chosen.scores[direction].items())
        console.print(f"alpha {alpha:g} chosen on {chosen.n_val_queries[direction]} val {direction} queries"
                      f" (mean R@1/5/10 per alpha: {scores})")
    _print_json({"calibration": stamp, **({"val": chosen.to_dict()} if chosen is not None else {})})


@gallery_app.command("info")
def gallery_info(
    gallery: str = typer.Option(..., help="The gallery: a folder, or milvus:URI#NAME."),
    verify: bool = typer.Option(False, "--verify", help="Also check every stamp, checksum and the index (slow)."),
    model: Optional[str] = typer.Option(None, help="Also describe this query model and check that it may search the gallery."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """A gallery's space, size and index kind (JSON); with --model, what that model is (an ensemble says it
    needs the old model at query time) after the space guard accepted it."""
    from xbt.gallery.base import QueryModelView, open_gallery
    from xbt.gallery.ingest import check_model, describe_model
    from xbt.gallery.transform import transform_status
    from xbt.models.device import describe

    try:
        with open_gallery(_gallery_ref(gallery)) as g:
            info = g.info().to_dict()
            if model is not None:
                query_model = _Runtime(device, precision).load(model)
                check_model(g, query_model)
                info = QueryModelView(g, query_model).info().to_dict()  # says whether the calibration applies
                info["model"] = describe_model(query_model) | {"runtime": describe(query_model)}
            transformed = transform_status(g)  # a transformed gallery: how many rows are still transformed
            if transformed is not None:
                info["transform"] = transformed
            problems = g.verify() if verify else None
    except XbtError as exc:
        _fail(exc)
    if problems is not None:
        info["problems"] = problems
    _print_json(info)
    if problems:
        raise typer.Exit(1)


@gallery_app.command("delete")
def gallery_delete(
    gallery: str = typer.Option(..., help="The gallery: a folder, or milvus:URI#NAME."),
    ids: list[str] = typer.Argument(..., help="Ids to remove."),
) -> None:
    """Remove items by id."""
    from xbt.gallery.base import open_gallery

    try:
        with open_gallery(_gallery_ref(gallery)) as g:
            n = g.delete(ids)
    except XbtError as exc:
        _fail(exc)
    console.print(f"deleted {n}")


def _fit_benefit(runtime: _Runtime, old_spec: Optional[str], new_model, compat_spec: Optional[str], fit_pairs: Optional[str],
                 modality: str, fit_split: Optional[str] = None, old_model=None, compat_model=None, calibration=None):
    """The benefit scorer of `--order benefit`: chosen on the training pairs' embeddings by the old, new and
    compatible models (`xbt.eval.benefit.fit_benefit_pairs`), under the score merge when a `calibration` is
    given (the rule the migration will serve by); the fit report goes to the console."""
    from xbt.data.datasets import open_dataset
    from xbt.eval.benefit import describe_candidates, fit_benefit_pairs
    from xbt.eval.embed import embed_pairs
    from xbt.eval.runner import compatible_queries

    missing = [flag for flag, value in (("--compat", compat_spec or compat_model), ("--old-model", old_spec or old_model),
                                        ("--fit-pairs", fit_pairs)) if not value]
    if missing:
        raise ValueError(f"the benefit order is estimated from training pairs: give {', '.join(missing)}"
                         " (the compatible model, the gallery's own model and the training pairs)")
    old_model = old_model or runtime.load(old_spec)
    compat_model = compat_model or runtime.load(compat_spec)
    old_model.space.check(compat_model.space, f"the compatible model {compat_spec!r}")
    pairs = open_dataset(fit_pairs, fit_split)
    old_fit, new_fit = embed_pairs(old_model, pairs, True), embed_pairs(new_model, pairs, True)
    scorer = fit_benefit_pairs(old_fit, new_fit, compatible_queries(compat_model, pairs, new_fit, old_fit, True), modality,
                               calibration=calibration)
    console.print(describe_candidates(scorer.fit_report))
    return scorer


def _fit_merge_calibration(runtime: _Runtime, old_model, new_model, compat_model, pairs_source: str, modality: str,
                           compat_name: str = ""):
    """The score merge's calibration (`xbt.eval.backfill_curve.fit_score_calibration_pairs`) on `pairs_source`,
    embedded by the old, new and compatible models; what it fitted goes to the console."""
    from xbt.data.datasets import open_dataset
    from xbt.eval.backfill_curve import fit_score_calibration_pairs
    from xbt.eval.embed import embed_pairs
    from xbt.eval.runner import compatible_queries

    old_model.space.check(compat_model.space, f"the compatible model {compat_name!r}")
    pairs = open_dataset(pairs_source)
    old_fit, new_fit = embed_pairs(old_model, pairs, True), embed_pairs(new_model, pairs, True)
    calibration = fit_score_calibration_pairs(old_fit, new_fit, compatible_queries(compat_model, pairs, new_fit, old_fit, True),
                                              modality)
    calibration.report["pairs"] = pairs_source
    console.print(f"score merge calibrated on {len(pairs)} pairs ({pairs_source}): log-odds old {calibration.old[0]:.2f} s"
                  f" {calibration.old[1]:+.2f}, new {calibration.new[0]:.2f} s {calibration.new[1]:+.2f}")
    return calibration


_CALIBRATE_HELP = ("Serve the migration's search by the calibrated score merge (measured to serve more R@1 during the"
                   " migration than the rank-slot rule: docs/results/backfill-order-testbed.md): pairs (any source"
                   " `xbt evaluate` reads) to fit each space's score -> P(match) map on. They must be pairs the NEW"
                   " model was not trained on (e.g. testbed:val): on its own training pairs it looks surer than it is"
                   " and the merge then serves less than either model. Needs --compat and --old-model. Without it: the"
                   " rank-slot rule.")


@gallery_app.command("backfill")
def gallery_backfill(
    state: Optional[Path] = typer.Option(None, help="Migration folder (created on the first run; resumed afterwards); not with --in-place."),
    in_place: bool = typer.Option(False, "--in-place", help="In a gallery `xbt gallery transform` made (--gallery): replace transformed rows by native ones, same ids, no second gallery and no cut-over (--order, --batch-size, --max-items apply)."),
    model: str = typer.Option(..., help="The new model (its own space: the gallery being built)."),
    gallery: Optional[str] = typer.Option(None, help="The old gallery (needed on the first run only); on Milvus the new vectors go to a second collection, and the cut-over moves the gallery's alias to it."),
    order: str = typer.Option("oldest", help="Priority: oldest, newest, id, field:NAME, -field:NAME, benefit (the largest estimated benefit first: needs --compat, --old-model and --fit-pairs), or @FILE of ids (one a line)."),
    compat: Optional[str] = typer.Option(None, help="--order benefit: the compatible model (new -> old space) whose queries the gallery serves meanwhile."),
    old_model: Optional[str] = typer.Option(None, help="--order benefit: the gallery's own (old) model, to embed --fit-pairs."),
    fit_pairs: Optional[str] = typer.Option(None, help="--order benefit: training pairs (any source `xbt evaluate` reads, e.g. testbed:xbt_train) on which the benefit estimate is chosen; never the evaluation items."),
    calibrate_pairs: Optional[str] = typer.Option(None, help=_CALIBRATE_HELP),
    batch_size: int = typer.Option(64),
    max_items: Optional[int] = typer.Option(None, help="Stop after this many items (run again to go on)."),
    cut_over: bool = typer.Option(False, "--cut-over", help="Cut over to the new space when complete."),
    engine: str = typer.Option("local", help="local, or ray: embed the plan in shards on Ray actors (see `xbt embed`)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (ray://HOST:10001 or auto); default: a local Ray."),
    shard_size: int = typer.Option(1024, help="Ray: items per shard (the unit of work and of resumption)."),
    actors: Optional[int] = typer.Option(None, help="Ray: size of the actor pool."),
    gpus_per_actor: float = typer.Option(0.0, help="Ray: GPUs each actor reserves (fractions share a GPU)."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Re-embed the old gallery with the new model into a new-space gallery, resumably, in priority order
    (or, --in-place, replace a transformed gallery's rows by native ones)."""
    from xbt.gallery.base import open_gallery
    from xbt.gallery.inplace import backfill_in_place
    from xbt.gallery.migration import STATE_NAME, Migration

    try:
        if in_place:
            if gallery is None or state is not None or cut_over or engine != "local":
                raise ValueError("--in-place works on --gallery (a transformed gallery) alone: no --state, --cut-over"
                                 " or --engine ray")
            new_model = _Runtime(device, precision, num_workers).load(model)
            ids = ([line.strip() for line in Path(order[1:]).read_text().splitlines() if line.strip()]
                   if order.startswith("@") else order)
            with open_gallery(_gallery_ref(gallery)) as g:
                _print_json(backfill_in_place(g, new_model, ids, batch_size=batch_size, max_items=max_items,
                                              show_progress=True))
            return
        if state is None:
            raise ValueError("give --state DIR (the migration folder), or --in-place for a transformed gallery")
        new_model = _Runtime(device, precision, num_workers).load(model)
        if not (state / STATE_NAME).exists():
            if gallery is None:
                _fail(ValueError(f"{state} holds no migration yet; give --gallery (the old gallery) to start one"))
            priority: object = order
            if order.startswith("@"):
                priority = [line.strip() for line in Path(order[1:]).read_text().splitlines() if line.strip()]
            with open_gallery(_gallery_ref(gallery)) as old:
                scorer = calibration = None
                runtime = _Runtime(device, precision, num_workers)
                if calibrate_pairs:
                    missing = [f for f, v in (("--compat", compat), ("--old-model", old_model)) if not v]
                    if missing:
                        raise ValueError(f"the score merge is calibrated with the models the migration serves by: give"
                                         f" {' and '.join(missing)}")
                    calibration = _fit_merge_calibration(runtime, runtime.load(old_model), new_model, runtime.load(compat),
                                                         calibrate_pairs, old.modality or "image", compat or "")
                if order == "benefit":
                    scorer = _fit_benefit(runtime, old_model, new_model, compat, fit_pairs, old.modality or "image",
                                          calibration=calibration)
                Migration.start(state, old, new_model.space, priority, benefit=scorer,  # type: ignore[arg-type]
                                calibration=calibration)
        migration = Migration(state)
        if engine == "ray":
            from xbt.scale.ray_embed import RayOptions, backfill

            if max_items is not None:
                _fail(ValueError("--max-items spreads a local backfill over several runs; with --engine ray, omit it"))
            progress = backfill(migration, model, engine="ray", shard_size=shard_size, batch_size=batch_size,
                                ray_options=RayOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor),
                                new_model=new_model, device=device, precision=precision, show_progress=True)
        elif engine == "local":
            progress = migration.run(new_model, batch_size=batch_size, max_items=max_items, show_progress=True)
        else:
            _fail(ValueError(f"--engine must be local or ray, not {engine!r}"))
        if cut_over and progress["status"] == "complete":
            progress = migration.cut_over()
    except (XbtError, OSError, ValueError) as exc:
        _fail(exc)
    _print_json(progress)


@gallery_app.command("transform")
def gallery_transform(
    gallery: str = typer.Option(..., help="The old-space gallery: a folder, or milvus:URI#NAME."),
    out: str = typer.Option(..., help="The new-space gallery to write: a new folder or milvus:URI#NAME (an interrupted run's: resumed)."),
    map_model: Optional[str] = typer.Option(None, "--map", help="A compatible model (compat:DIR) whose query map is orthogonal (Procrustes): its transpose maps old -> new."),
    fit: Optional[str] = typer.Option(None, help="Or fit an old->new map: procrustes-text, procrustes-image, procrustes-both or affine (needs --old, --new, --fit-pairs and/or --fit-texts)."),
    old: Optional[str] = typer.Option(None, help="--fit: the gallery's (old) model."),
    new: Optional[str] = typer.Option(None, help="--fit: the new model."),
    fit_pairs: Optional[str] = typer.Option(None, help="--fit: training pairs (images and captions) both models embed, e.g. testbed:xbt_train; never the evaluation items."),
    fit_split: Optional[str] = typer.Option(None, help="Split of --fit-pairs."),
    fit_texts: Optional[Path] = typer.Option(None, help="--fit: a text file of unlabeled texts (one a line) both models embed."),
    fit_images: Optional[Path] = typer.Option(None, help="--fit: a folder of unlabeled images both models embed."),
    batch_size: int = typer.Option(1024, help="Vectors read, mapped and written per batch (bounds the memory)."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """Move a gallery into the new space without re-encoding: map every stored vector old -> new into a new
    gallery, payloads and media carried over, each row marked transformed (with the map's digest). Resumable
    and kill-safe: run it again after an interruption."""
    from xbt.compat.model import CompatibleModel
    from xbt.data.datasets import open_dataset
    from xbt.errors import InputError
    from xbt.gallery.base import open_gallery
    from xbt.gallery.ingest import items_from_folder
    from xbt.gallery.transform import fitted_map, query_tower, transform_gallery, transposed_query_map

    try:
        if (map_model is None) == (fit is None):
            raise InputError("give --map compat:DIR (an orthogonal query map, transposed) or --fit METHOD (an old->new map fitted here)")
        runtime = _Runtime(device, precision)
        with open_gallery(_gallery_ref(gallery)) as g:
            if map_model is not None:
                model = runtime.load(map_model)
                if not isinstance(model, CompatibleModel):
                    raise InputError(f"--map {map_model} is not a compatible model; give compat:DIR, or fit a map with --fit")
                gmap = transposed_query_map(model, query_tower(g.modality))
            else:
                if old is None or new is None or (fit_pairs, fit_texts, fit_images) == (None, None, None):
                    raise InputError("--fit needs --old, --new and data both embed: --fit-pairs, --fit-texts and/or --fit-images")
                pairs = open_dataset(fit_pairs, fit_split) if fit_pairs is not None else []
                texts = [t.strip() for t in fit_texts.read_text().splitlines() if t.strip()] if fit_texts else []
                images = [it.payload["image"] for it in items_from_folder(fit_images)] if fit_images else []
                gmap = fitted_map(fit, runtime.load(old), runtime.load(new), fit_texts=texts, fit_pairs=pairs,
                                  fit_images=images, show_progress=True)
            report = transform_gallery(g, _gallery_ref(out), gmap, batch=batch_size, show_progress=True)
    except (XbtError, OSError) as exc:
        _fail(exc)
    _print_json(report)


@gallery_app.command("export")
def gallery_export(
    gallery: str = typer.Option(..., help="The gallery to copy: a folder, or milvus:URI#NAME."),
    out: str = typer.Option(..., help="Where to: a new folder (embedded store) or milvus:URI#NAME."),
    batch_size: int = typer.Option(1024, help="Items copied per batch."),
) -> None:
    """Copy a gallery to the other backend (embedded <-> Milvus): vectors, ids, payloads, space, order.
    Resumable: run it again after an interruption."""
    _copy_gallery(_gallery_ref(gallery), out, batch_size)


@gallery_app.command("import")
def gallery_import(
    gallery: str = typer.Option(..., help="The gallery to fill: a new folder, or milvus:URI#NAME."),
    source: str = typer.Option(..., help="The gallery to copy from: a folder, or milvus:URI#NAME."),
    batch_size: int = typer.Option(1024, help="Items copied per batch."),
) -> None:
    """Copy a gallery from the other backend into this one (see `export`)."""
    _copy_gallery(source, _gallery_ref(gallery), batch_size)


def _copy_gallery(source: str, target: str, batch_size: int) -> None:
    from xbt.gallery.base import copy_gallery, open_gallery

    try:
        with open_gallery(source) as src:
            info = copy_gallery(src, target, batch=batch_size)
    except XbtError as exc:
        _fail(exc)
    console.print(f"gallery {target}: {info.size} items in space {info.space_id}, index {info.index_kind}")


@gallery_app.command("cutover")
def gallery_cutover(
    state: Path = typer.Option(..., help="The migration folder."),
    force: bool = typer.Option(False, "--force", help="Cut over even with items that could not be re-embedded."),
) -> None:
    """Switch serving to the new-space gallery, atomically (refused until the backfill is complete)."""
    from xbt.gallery.migration import Migration

    try:
        progress = Migration(state).cut_over(force=force)
    except XbtError as exc:
        _fail(exc)
    _print_json(progress)


@gallery_app.command("backfill-curve")
def gallery_backfill_curve(
    old: str = typer.Option(..., help="The old model (the gallery's), e.g. testbed:old."),
    new: str = typer.Option(..., help="The new model, e.g. testbed:new."),
    compat: str = typer.Option(..., help="The compatible model (new -> old space), e.g. compat:PATH."),
    data: str = typer.Option("testbed:eval", help="Evaluation pairs (any source `xbt evaluate` reads)."),
    split: Optional[str] = typer.Option(None, help="Split of --data."),
    orders: str = typer.Option("random", help="Comma-separated backfill orders to compare: random, oldest (insertion order), newest, benefit (needs --fit-pairs)."),
    fit_pairs: Optional[str] = typer.Option(None, help="Training pairs the benefit order is estimated on (e.g. testbed:xbt_train); never the evaluation pairs."),
    merge: str = typer.Option("slot", help="The merge rule measured: slot (rank slots) or score (calibrated scores: needs --calibrate-pairs)."),
    calibrate_pairs: Optional[str] = typer.Option(None, help="--merge score: pairs the calibration is fitted on, never the evaluation pairs, and not the new model's training pairs (e.g. testbed:val)."),
    steps: int = typer.Option(10, help="Fractions measured: 0, 1/steps, ..., 1."),
    n_random: int = typer.Option(5, help="Random orders averaged for `random`."),
    seed: int = typer.Option(0, help="Seed of the random orders and the bootstrap."),
    out: Optional[Path] = typer.Option(None, help="Write the curves (per order and direction, with areas and the fraction for 80% of the R@1 gain) as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Draw R@1/5/10 against the fraction backfilled, one line per order (matplotlib; .png, .svg or .pdf)."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """Retrieval quality during a migration: R@K of the merged search against the fraction backfilled, per order."""
    import numpy as np

    from xbt.data.datasets import open_dataset
    from xbt.eval.backfill_curve import format_curves, format_orders, order_curves, order_hits, orders_to_dict, plot_orders
    from xbt.eval.embed import embed_pairs
    from xbt.eval.runner import compatible_queries

    names = [o.strip() for o in orders.split(",") if o.strip()]
    try:
        unknown = [o for o in names if o not in ("random", "oldest", "newest", "benefit")]
        if unknown or not names:
            raise ValueError(f"--orders takes random, oldest, newest and benefit, not {', '.join(unknown) or 'nothing'}")
        if steps < 1:
            raise ValueError("--steps must be at least 1")
        if merge not in ("slot", "score"):
            raise ValueError(f"--merge takes slot or score, not {merge!r}")
        if (merge == "score") != bool(calibrate_pairs):
            raise ValueError("--merge score needs --calibrate-pairs (and --calibrate-pairs is for --merge score)")
        pairs = open_dataset(data, split)
        runtime = _Runtime(device, precision, num_workers)
        old_model, new_model, compat_model = runtime.load(old), runtime.load(new), runtime.load(compat)
        old_model.space.check(compat_model.space, f"the compatible model {compat!r}")
        old_eval, new_eval = embed_pairs(old_model, pairs, True), embed_pairs(new_model, pairs, True)
        queries = compatible_queries(compat_model, pairs, new_eval, old_eval, True)
        sizes = {"t2i": len(old_eval.images), "i2t": len(old_eval.texts)}
        rng = np.random.default_rng(seed)
        chosen: dict[str, dict] = {}
        for name in names:
            if name == "random":
                chosen[name] = {d: [rng.permutation(n) for _ in range(max(1, n_random))] for d, n in sizes.items()}
            elif name == "oldest":
                chosen[name] = {d: np.arange(n) for d, n in sizes.items()}
            elif name == "newest":
                chosen[name] = {d: np.arange(n)[::-1] for d, n in sizes.items()}
            else:
                fitted = {d: _fit_benefit(runtime, None, new_model, None, fit_pairs, modality, old_model=old_model,
                                          compat_model=compat_model)
                          for d, modality in (("t2i", "image"), ("i2t", "text"))}
                chosen[name] = {"t2i": fitted["t2i"].order(old_eval.images), "i2t": fitted["i2t"].order(old_eval.texts)}
                scorers = {d: sc.describe() for d, sc in fitted.items()}
        calibrations = None
        if merge == "score":
            calibrations = {d: _fit_merge_calibration(runtime, old_model, new_model, compat_model, calibrate_pairs or "",
                                                      modality, compat)
                            for d, modality in (("t2i", "image"), ("i2t", "text"))}
        fractions = [i / steps for i in range(steps + 1)]
        curves = order_curves(order_hits(old_eval, queries, new_eval, chosen, fractions, seed=seed, merge=merge,
                                         calibrations=calibrations), seed=seed)
    except (XbtError, ValueError) as exc:
        _fail(exc)
    if names == ["random"]:
        for k in (1, 5, 10):
            print(format_curves(curves["random"], k) + "\n")
    print(format_orders(curves))
    result = {"protocol": {"old": old, "new": new, "compat": compat, "data": data, "split": split, "orders": names,
                           "fit_pairs": fit_pairs, "merge": merge, "calibrate_pairs": calibrate_pairs, "n_random": n_random,
                           "seed": seed, "fractions": fractions},
              **orders_to_dict(curves)}
    if calibrations:
        result["score_calibration"] = {d: c.to_dict() for d, c in calibrations.items()}
    if "benefit" in names:
        result["benefit_scorer"] = scorers
    if out:
        out.write_text(json.dumps(result, indent=2, default=str))
    if plot:
        plot_orders(curves, plot, title=f"backfill order: {data} ({compat}, {merge} merge)")
        console.print(f"plot written to {plot}")


@app.command("serve")
def serve_command(
    gallery: Optional[str] = typer.Option(None, help="The gallery: a folder, or milvus:URI#NAME (a Milvus server such as milvus:http://host:19530#photos, or a Milvus Lite file milvus:./photos.db#photos); not needed with --migration."),
    model: str = typer.Option(..., help="A model emitting the gallery's space: the old model or a compatible model."),
    migration: Optional[Path] = typer.Option(None, help="Serve during a backfill: this migration folder (with --new-model)."),
    new_model: Optional[str] = typer.Option(None, help="The new model, for --migration."),
    old_model: Optional[str] = typer.Option(None, help="The old gallery's own model: the page can show its results beside the served model's."),
    media_root: list[Path] = typer.Option([], "--media-root", help="A folder whose images may be shown as thumbnails (repeatable); uploads in the gallery's media/ always may."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default; any other needs --expose)."),
    expose: bool = typer.Option(False, "--expose", help="Allow a --host other machines can reach (the search is open to them unless --closed-read)."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="A name clients may use in the Host header besides localhost, 127.0.0.1, [::1] and --host (repeatable; '*.example.org', or '*' for any). Other names are refused (DNS rebinding)."),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, envvar="XBT_SERVE_TOKEN", help="Bearer token for writing (and closed reading); prefer the XBT_SERVE_TOKEN variable or --token-file: a command line is visible to every user of the machine. Without a token the service is read-only."),
    token_file: Optional[Path] = typer.Option(None, help="Read the bearer token from this file (first line; not readable by group or others)."),
    open_read: bool = typer.Option(True, "--open-read/--closed-read", help="Whether searching needs the token."),
    open_info: bool = typer.Option(False, "--open-info/--closed-info", help="Whether /info (models, index, limits) is readable without the token."),
    max_k: int = typer.Option(100, help="Largest k a client may ask for."),
    max_upload_mb: float = typer.Option(8.0, help="Largest image upload, in MiB."),
    max_image_pixels: Optional[int] = typer.Option(None, help="Largest image (width x height) decoded, uploads and thumbnails alike (default 16,000,000); each takes up to 4 bytes a pixel while decoded."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """The HTTP service (FastAPI on uvicorn): a search page at /, search by text or image, add and delete
    items, thumbnails, health, info."""
    from xbt.errors import InputError
    from xbt.gallery.base import QueryModelView, open_gallery
    from xbt.gallery.ingest import GalleryRetriever
    from xbt.gallery.migrating import MigratingRetriever
    from xbt.gallery.migration import Migration
    from xbt.serve.app import ServeConfig, read_token_file, serve
    from xbt.serve.hosts import allowed_hosts, check_listen_host
    from xbt.serve.media import resolve_roots

    token = token or None  # an empty XBT_SERVE_TOKEN is no token
    try:
        check_listen_host(host, expose)  # before any model is loaded
        if token_file is not None:
            if token is not None:
                raise InputError("give the token one way: --token-file, or XBT_SERVE_TOKEN (or --token), not both")
            token = read_token_file(token_file)
        elif token is not None and any(a == "--token" or a.startswith("--token=") for a in sys.argv):
            console.print("[yellow]warning:[/] --token on the command line is visible to every user of this machine "
                          "(ps, /proc) and stays in shell history; prefer XBT_SERVE_TOKEN or --token-file")
        config = ServeConfig(token=token, open_read=open_read, open_info=open_info, max_k=max_k,
                             default_k=min(10, max_k), max_upload_bytes=int(max_upload_mb * (1 << 20)),
                             allowed_hosts=allowed_hosts(host, allowed_host),
                             **({"max_image_pixels": max_image_pixels} if max_image_pixels is not None else {}))
        roots = resolve_roots(media_root)
        runtime = _Runtime(device, precision)
        if migration is not None:
            if new_model is None:
                _fail(ValueError("--migration needs --new-model"))
            retriever = MigratingRetriever(Migration(migration), runtime.load(model), runtime.load(new_model))
            old_gallery = retriever.old
        else:
            if gallery is None:
                _fail(ValueError("give --gallery (or --migration with --new-model)"))
            served_model = runtime.load(model)
            # Each model searches through its own view: a calibration applies to the model it was made for.
            retriever = GalleryRetriever(QueryModelView(open_gallery(gallery), served_model), served_model)
            old_gallery = retriever.gallery.gallery
        old_vlp = runtime.load(old_model) if old_model else None
        old = GalleryRetriever(QueryModelView(old_gallery, old_vlp), old_vlp) if old_vlp is not None else None
        served = [retriever.compat_model, retriever.new_model] if migration is not None else [retriever.model]
        for loaded in [*served, *([old_vlp] if old_vlp is not None else [])]:
            loaded.build_towers()  # every weight loaded now, not on the first query
    except XbtError as exc:
        _fail(exc)
    console.print(f"serving {retriever.info()['gallery']['space_id']} on http://{host}:{port} "
                  f"(search page at /, API schema at /openapi.json)")
    if expose:
        console.print(f"[yellow]warning:[/] reachable from other machines; requests are answered only when their Host "
                      f"names one of {', '.join(config.allowed_hosts)} (add --allowed-host NAME for each name clients use)")
    serve(retriever, config, host=host, port=port, media_roots=roots, old=old, expose=expose)


def main() -> None:
    try:
        app()
    except XbtError as exc:  # pragma: no cover - safety net
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
