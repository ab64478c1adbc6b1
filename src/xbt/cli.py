"""The xbt command line: a thin layer over the library (the library never imports this module)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    from xbt.data.testbed import build_testbed

    try:
        t0 = time.perf_counter()
        info = build_testbed([m.strip() for m in models.split(",") if m.strip()], force=force)
    except XbtError as exc:
        _fail(exc)
    console.print(f"testbed ready under {info['root']} in {time.perf_counter() - t0:.0f} s")
    console.print("split sizes: " + ", ".join(f"{k}={v}" for k, v in info["sizes"].items()))


@testbed_app.command("evaluate")
def testbed_evaluate(
    split: str = typer.Option("eval", help="Testbed split to evaluate on (eval for reporting, val for tuning)."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON here."),
) -> None:
    """Old and new models each in their own space, and new queries against the old gallery unadapted."""
    from xbt.compat.baselines import NoAdaptation
    from xbt.data.testbed import load_split
    from xbt.eval.embed import embed_pairs
    from xbt.eval.matrix import evaluate_upgrade, format_matrix
    from xbt.models import load_model

    try:
        pairs = load_split(split)
        old, new = load_model("testbed:old"), load_model("testbed:new")
        old_emb, new_emb = embed_pairs(old, pairs, True), embed_pairs(new, pairs, True)
        naive = NoAdaptation(new_emb.space, old_emb.space)
        matrix = evaluate_upgrade(old_emb, new_emb, {"no-adaptation": naive.transform_embeddings(new_emb)})
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
    from xbt.data.testbed import TestbedModel, train_lit_model
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


@app.command("demo")
def demo() -> None:
    """The offline end-to-end upgrade demo: testbed, old and new models, and how they compare."""
    testbed_build(models="old,new", force=False)
    testbed_evaluate(split="eval", out=None)


def main() -> None:
    try:
        app()
    except XbtError as exc:  # pragma: no cover - safety net
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
