"""Measuring and running upgrades: `xbt evaluate` (every method side by side, or cross-validated on the
testbed), `xbt recommend`, and the main job: `xbt upgrade` on your models and data, `xbt demo` on the testbed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from xbt.cli.common import Device, FitImages, FitTexts, FitTextsOld, Precision, Runtime, Workers, console, sources, split_list
from xbt.errors import InputError


def evaluate(
    old: Optional[str] = typer.Option(None, help="Old model spec (the gallery's model), e.g. openclip:ViT-B-32@openai."),
    new: Optional[str] = typer.Option(None, help="New model spec, e.g. openclip:ViT-L-14@openai."),
    data: Optional[str] = typer.Option(None, help="Evaluation pairs: CSV/JSONL, Karpathy JSON, image folder, .tar shards, testbed:eval."),
    split: Optional[str] = typer.Option(None, help="Split of --data (Karpathy JSON: test, val, ...; default test)."),
    image_root: Optional[str] = typer.Option(None, help="Folder that relative image paths resolve against."),
    fit_texts: FitTexts = None,
    fit_text: FitTextsOld = None,
    fit_images: FitImages = None,
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
    from xbt.eval.report import write_report
    from xbt.eval.runner import TESTBED_DEFAULTS, evaluate_from_specs

    command = "xbt " + " ".join(sys.argv[1:])
    k_values = [int(k) for k in ks.split(",")]
    if folds is not None:
        if not testbed:
            raise InputError("--folds cross-validates the offline testbed: add --testbed")
        _crossval(cv_config, folds, seeds, k_values, resamples, command, out, markdown, gallery_extra or [])
        return
    defaults: dict[str, Any] = TESTBED_DEFAULTS if testbed else {}
    old, new, data = old or defaults.get("old"), new or defaults.get("new"), data or defaults.get("data")
    if not (old and new and data):
        raise InputError("give --old, --new and --data (or --testbed for the offline testbed)")
    method_list, all_peers = _methods(methods)
    sizes = [int(x) for x in data_efficiency.split(",") if x.strip()] if data_efficiency else defaults.get("data_efficiency", [])
    run = evaluate_from_specs(
        old, new, data, split, image_root, sources(fit_texts, fit_text) or defaults.get("fit_text", []),
        fit_pairs or defaults.get("fit_pairs", []), fit_split, support or defaults.get("support"), support_split, method_list,
        ks=k_values, n_resamples=resamples, seed=seed, data_efficiency=sizes, skip_unfittable=all_peers, show_progress=True,
        fit_images=fit_images or defaults.get("fit_images", []), gallery_extra=gallery_extra or [],
        **Runtime(device, precision, num_workers).options,
    )
    results = run.to_results() | {"command": command}
    _print_results(results, write_report(results, out, markdown), warnings=True, recommendation=show_recommendation)


def _methods(methods: str) -> tuple[list[str], bool]:
    """--methods as names ('peers': every peer, and then a peer lacking its training data is skipped, not an error)."""
    from xbt.compat.registry import PEER_METHODS

    named = split_list(methods)
    return list(dict.fromkeys(x for m in named for x in (PEER_METHODS if m == "peers" else [m]))), "peers" in named


def _crossval(cv_config: str, folds: int, seeds: int, ks: list[int], resamples: int, command: str, out: Path,
              markdown: Optional[Path], gallery_extra: list[str]) -> None:
    """`xbt evaluate --testbed --folds K`: run (or resume) every fold (under XBT_HOME/runs), pooled."""
    from xbt.eval.crossval import read_crossval_config, run_crossval
    from xbt.eval.report import write_report

    extra: dict[str, Any] = {"gallery_extra": list(gallery_extra)} if gallery_extra else {}
    cfg, compare = read_crossval_config(cv_config, k=folds, seeds=tuple(range(seeds)), ks=ks, n_resamples=resamples, **extra)
    results = run_crossval(cfg, show_progress=True, command=command, compare=compare)
    _print_results(results, write_report(results, out, markdown), warnings=False, recommendation=False)


def _print_results(results: dict[str, Any], paths: dict[str, Any], warnings: bool, recommendation: bool) -> None:
    from xbt.eval.report import format_summary

    print(format_summary(results))
    for warning in results["warnings"] if warnings else []:
        console.print(f"[yellow]warning:[/] {warning}")
    if recommendation:
        rec = results["recommendation"]
        console.print(f"[bold]recommended:[/] {rec['method'] or 'none'}. {rec['reason']}")
    console.print("wrote " + ", ".join(str(p) for k, p in paths.items() if not k.startswith("figure:")))


def recommend(
    results_json: Path = typer.Argument(..., help="A results.json written by xbt evaluate."),
    allow_old_model: bool = typer.Option(True, "--allow-old-model/--no-old-model", help="Consider ensembles (SLERP) that keep the old encoder."),
) -> None:
    """Name the method that passes the compatibility criterion in every cell with the highest mean update gain."""
    from xbt.eval.recommend import matrix_from_results, recommend as choose

    try:
        matrix = matrix_from_results(json.loads(results_json.read_text()))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{results_json} is not a results.json written by xbt evaluate ({exc})") from exc
    method, reason = choose(matrix, allow_old_model_at_query_time=allow_old_model)
    print(method or "none")
    console.print(reason)
    if method is None:
        raise typer.Exit(2)


def upgrade(
    old: str = typer.Option(..., help="The old model's spec (its vectors fill the gallery)."),
    new: str = typer.Option(..., help="The new model's spec."),
    data: str = typer.Option(..., help="Evaluation data: the gallery items and queries (never trained on)."),
    fit_pairs: str = typer.Option(..., help="Image-text pairs for training (XBT stage 2, image-fitted peers)."),
    fit_texts: FitTexts = None,
    fit_text: FitTextsOld = None,
    fit_images: FitImages = None,
    support: Optional[str] = typer.Option(None, help="Support pairs for the choices made on held-out data (SLERP's weight, NNN's alpha; not the evaluation data)."),
    config: Optional[str] = typer.Option(None, help="XBT config: a YAML file or a shipped config name (its old/new/data fields are overridden). Default: by the new model's backend, xbt-testbed for testbed:, xbt-clip for openclip: and hf:; any other model needs one."),
    out: Path = typer.Option(Path("outputs/upgrade"), help="Where the report, pictures and summary go."),
    examples: int = typer.Option(4, help="Example queries to draw."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """The whole upgrade on your own models and data: old galleries, XBT, peers, report, pictures."""
    from xbt.pipeline import UpgradeJob, xbt_config_for

    texts = sources(fit_texts, fit_text)
    if not texts:
        raise typer.BadParameter("give the text corpus: --fit-texts SOURCE (repeatable)", param_hint="'--fit-texts'")
    options = Runtime(device, precision, num_workers).options
    _run_upgrade(UpgradeJob(old=old, new=new, eval_data=data, fit_pairs=fit_pairs,
                            fit_texts=texts[0] if len(texts) == 1 else texts, fit_images=list(fit_images or []),
                            support=support, xbt_config=config or xbt_config_for(new), n_example_queries=examples,
                            **options), out)


def demo(
    out: Path = typer.Option(Path("outputs/demo"), help="Where the report, pictures and summary go."),
    config: str = typer.Option("xbt-testbed", help="XBT config: a YAML file or a shipped config name."),
    device: Device = "auto",
    precision: Precision = "fp32",
    num_workers: Workers = 0,
) -> None:
    """The offline end-to-end upgrade on the testbed: build it, upgrade, evaluate, show what changed."""
    from xbt.pipeline import UpgradeJob

    _run_upgrade(UpgradeJob.testbed(xbt_config=config, **Runtime(device, precision, num_workers).options), out)


def _run_upgrade(job: Any, out: Path) -> None:
    import time

    from xbt.pipeline import run_upgrade

    t0 = time.perf_counter()
    summary = run_upgrade(job, out, log=lambda line: console.print(f"[bold cyan]{line}[/]"))
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


def _print_summary(summary: dict[str, Any]) -> None:
    """Old, upgraded (XBT), ceiling, per cell, with the criterion and the update gain."""
    m = summary["matrix"]
    table = Table(title="Upgrade without backfill: recall (%) with 95% bootstrap intervals")
    for col in ("direction", "K", "old->old", "XBT new->old", "ceiling new->new", "criterion", "update gain"):
        table.add_column(col)
    names = {"t2i": "text->image", "i2t": "image->text"}

    def fmt(e: dict[str, Any]) -> str:  # a gain is undefined (None) when new->new ties old->old
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
