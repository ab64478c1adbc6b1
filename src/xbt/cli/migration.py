"""`xbt gallery backfill`, `cutover` and `backfill-curve`: moving a gallery to the new model's space, and
measuring the quality served while it moves (the library: `xbt.gallery.migration`, `xbt.eval.backfill_orders`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from xbt.cli.common import Device, Precision, Runtime, Workers, console, print_json, split_list
from xbt.cli.gallery import gallery_app, gallery_ref
from xbt.errors import InputError
from xbt.gallery.backend import OnConflict

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
    benefit_scorer: Optional[Path] = typer.Option(None, help="--in-place --order benefit: the in-place benefit scorer's folder (xbt.gallery.inplace_benefit), fitted there on the first run (needs --compat, whose transposed query map made the gallery, --old-model and --fit-pairs) and loaded on every later one."),
    preload: Optional[Path] = typer.Option(None, help="A vectors folder of new-model vectors made already (`xbt fit --from-gallery ... --keep DIR`, `xbt embed`): added to the new gallery first (in place: they replace the transformed rows), so the backfill does not encode those items again."),
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
    from xbt.gallery.migration import STATE_NAME, Migration

    if in_place:
        if gallery is None or state is not None or cut_over or engine != "local":
            raise InputError("--in-place works on --gallery (a transformed gallery) alone: no --state, --cut-over"
                             " or --engine ray")
        if preload is not None:
            _preload(preload, gallery_ref(gallery), "update")
        _backfill_in_place(gallery, model, Runtime(device, precision, num_workers), order, batch_size, max_items,
                           benefit_scorer, compat, old_model, fit_pairs)
        return
    if state is None:
        raise InputError("give --state DIR (the migration folder), or --in-place for a transformed gallery")
    if benefit_scorer is not None:
        raise InputError("--benefit-scorer is the in-place benefit order's: add --in-place (a migration into a second"
                         " gallery fits its benefit order from --compat, --old-model and --fit-pairs)")
    runtime = Runtime(device, precision, num_workers)
    new_model = runtime.load(model)
    if not (state / STATE_NAME).exists():
        _start(state, gallery, new_model, order, runtime, compat, old_model, fit_pairs, calibrate_pairs)
    migration = Migration(state)
    if preload is not None:
        _preload(preload, migration.new_gallery_ref, "skip")
    if engine == "ray":
        if max_items is not None:
            raise InputError("--max-items spreads a local backfill over several runs; with --engine ray, omit it")
        progress = _backfill_on_ray(migration, model, new_model, shard_size, batch_size, address, actors, gpus_per_actor,
                                    device, precision)
    elif engine == "local":
        progress = migration.run(new_model, batch_size=batch_size, max_items=max_items, show_progress=True)
    else:
        raise InputError(f"--engine must be local or ray, not {engine!r}")
    print_json(migration.cut_over() if cut_over and progress["status"] == "complete" else progress)


def _start(state: Path, gallery: Optional[str], new_model: Any, order: str, runtime: Runtime, compat: Optional[str],
           old_model: Optional[str], fit_pairs: Optional[str], calibrate_pairs: Optional[str]) -> None:
    from xbt.gallery.base import open_gallery
    from xbt.gallery.migration import parse_order, start_migration

    if gallery is None:
        raise InputError(f"{state} holds no migration yet; give --gallery (the old gallery) to start one")
    with open_gallery(gallery_ref(gallery)) as old:
        start_migration(state, old, new_model, parse_order(order), load=runtime.load, compat=compat, old_model=old_model,
                        fit_pairs=fit_pairs, calibrate_pairs=calibrate_pairs, log=console.print)


def _backfill_on_ray(migration: Any, model: str, new_model: Any, shard_size: int, batch_size: int, address: Optional[str],
                     actors: Optional[int], gpus_per_actor: float, device: str, precision: str) -> dict[str, Any]:
    from xbt.scale.ray_embed import RayOptions, backfill

    ray = RayOptions(address=address, actors=actors, gpus_per_actor=gpus_per_actor)
    return backfill(migration, model, engine="ray", shard_size=shard_size, batch_size=batch_size, ray_options=ray,
                    new_model=new_model, device=device, precision=precision, show_progress=True)


def _preload(folder: Path, gallery: str, on_conflict: OnConflict) -> None:
    from xbt.gallery.base import open_gallery
    from xbt.scale.vectors import load_into_gallery

    with open_gallery(gallery) as g:
        added, present = load_into_gallery(folder, g, on_conflict)
    console.print(f"preloaded {added} vectors from {folder} ({present} not written: present already, or not in a"
                  " transformed gallery)")


def _backfill_in_place(gallery: str, model: str, runtime: Runtime, order: str, batch_size: int, max_items: Optional[int],
                       benefit_scorer: Optional[Path], compat: Optional[str], old_model: Optional[str],
                       fit_pairs: Optional[str]) -> None:
    from xbt.gallery.base import open_gallery
    from xbt.gallery.inplace import backfill_in_place
    from xbt.gallery.inplace_benefit import inplace_benefit_from_specs
    from xbt.gallery.migration import parse_order

    new_model = runtime.load(model)
    with open_gallery(gallery_ref(gallery)) as g:
        scorer = None
        if order == "benefit":
            scorer = inplace_benefit_from_specs(g, benefit_scorer, new_model, runtime.load, compat, old_model, fit_pairs)
            console.print(f"in-place benefit order: {scorer.statistic} (chosen on"
                          f" {scorer.fit_report.get('training_items')} training items)")
        print_json(backfill_in_place(g, new_model, parse_order(order), batch_size=batch_size, max_items=max_items,
                                     show_progress=True, benefit=scorer))


@gallery_app.command("cutover")
def gallery_cutover(
    state: Path = typer.Option(..., help="The migration folder."),
    force: bool = typer.Option(False, "--force", help="Cut over even with items that could not be re-embedded."),
) -> None:
    """Switch serving to the new-space gallery, atomically (refused until the backfill is complete)."""
    from xbt.gallery.migration import Migration

    print_json(Migration(state).cut_over(force=force))


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
    from xbt.data.datasets import open_dataset
    from xbt.eval.backfill_curve import format_curves, format_orders, orders_to_dict, plot_orders
    from xbt.eval.backfill_orders import check_curve_options, measure_orders

    names = split_list(orders)
    check_curve_options(names, steps, merge, calibrate_pairs)
    pairs = open_dataset(data, split)
    runtime = Runtime(device, precision, num_workers)
    measured = measure_orders(
        runtime.load(old), runtime.load(new), runtime.load(compat), pairs, names,
        fit_pairs=open_dataset(fit_pairs) if fit_pairs and "benefit" in names else None, merge=merge,
        calibrate_pairs=open_dataset(calibrate_pairs) if calibrate_pairs else None, calibrate_source=calibrate_pairs or "",
        steps=steps, n_random=n_random, seed=seed, compat_name=compat, log=console.print)
    curves = measured["curves"]
    if names == ["random"]:
        for k in (1, 5, 10):
            print(format_curves(curves["random"], k) + "\n")
    print(format_orders(curves))
    result: dict[str, Any] = {
        "protocol": {"old": old, "new": new, "compat": compat, "data": data, "split": split, "orders": names,
                     "fit_pairs": fit_pairs, "merge": merge, "calibrate_pairs": calibrate_pairs, "n_random": n_random,
                     "seed": seed, "fractions": measured["fractions"]},
        **orders_to_dict(curves)}
    if "score_calibration" in measured:
        result["score_calibration"] = {d: c.to_dict() for d, c in measured["score_calibration"].items()}
    if "benefit_scorer" in measured:
        result["benefit_scorer"] = measured["benefit_scorer"]
    if out:
        out.write_text(json.dumps(result, indent=2, default=str))
    if plot:
        plot_orders(curves, plot, title=f"backfill order: {data} ({compat}, {merge} merge)")
        console.print(f"plot written to {plot}")
