"""`xbt gallery`: stamped galleries (a folder, or a Milvus collection): build, add, search, calibrate, info,
delete, transform, export and import. The migration commands (backfill, cutover, backfill-curve) are in
`xbt.cli.migration`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from xbt.cli.common import App, Device, Precision, Runtime, Workers, console, print_json
from xbt.errors import InputError

gallery_app = App(help="Stamped galleries: build, add, search, info, backfill and cut-over.", no_args_is_help=True)
_BACKEND: dict[str, Optional[str]] = {"backend": "embedded", "uri": None}


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
        raise InputError(f"--backend must be embedded or milvus, not {backend!r}")
    if backend == "milvus" and not uri:
        raise InputError("--backend milvus needs --uri (http://HOST:19530, or ./FILE.db for Milvus Lite)")
    _BACKEND.update(backend=backend, uri=uri)


def gallery_ref(gallery: str) -> str:
    """A --gallery value as a reference `xbt.gallery.base.open_gallery` resolves (see `gallery_options`)."""
    if _BACKEND["backend"] == "milvus" and not gallery.startswith("milvus:"):
        return f"milvus:{_BACKEND['uri']}#{gallery}"
    return gallery


def report_ingest(report: Any) -> None:
    console.print(f"added {len(report.added)}, skipped {len(report.skipped)} existing, failed {len(report.failed)}")
    for item_id, why in report.failed[:10]:
        console.print(f"[yellow]failed[/] {item_id}: {why}")


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
    from xbt.gallery.index import IndexConfig
    from xbt.gallery.ingest import build_gallery, build_record, load_items

    items = load_items(data, modality, split)
    vlp = Runtime(device, precision, num_workers).load(model)
    index_config = IndexConfig(kind=index)  # type: ignore[arg-type]  # IndexConfig checks the kind
    report, info = build_gallery(gallery_ref(out), vlp, items, build_record(data, split, modality), index=index_config,
                                 batch_size=batch_size, show_progress=True, log=console.print, label=out)
    report_ingest(report)
    console.print(f"gallery {out}: {info.size} items in space {info.space_id}, index {info.index_kind}")


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

    with open_gallery(gallery_ref(gallery)) as g:
        items = load_items(data, g.modality or "image", split)
        report = ingest(g, Runtime(device, precision, num_workers).load(model), items, batch_size=batch_size,  # type: ignore[arg-type]  # GalleryBackend (Milvus or embedded) where the Gallery type is named
                        on_conflict=on_conflict, show_progress=True)  # type: ignore[arg-type]  # ingest checks on_conflict
    report_ingest(report)


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
        raise InputError("give exactly one of --text or --image")
    with open_gallery(gallery_ref(gallery)) as g:
        vlp = Runtime(device, precision).load(model)
        view = QueryModelView(g, vlp)  # a calibration made for this model applies; one for another is ignored
        retriever = GalleryRetriever(view, vlp)  # type: ignore[arg-type]  # a view searches like the gallery it wraps
        hits = retriever.search_texts([text], k) if text is not None else retriever.search_images([image], k)  # type: ignore[list-item]  # one of the two is given
        status = view.calibration_status() if g.calibration else None
    if status is not None:
        console.print(("" if status["applies"] else "[yellow]note:[/] ") + status["message"])
    print_json([h.to_dict() for h in hits[0]])


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
    from xbt.data.datasets import open_dataset
    from xbt.eval.calibrated import gallery_bank
    from xbt.gallery.base import describe_query_model, open_gallery
    from xbt.gallery.ingest import built_from, check_model

    with open_gallery(gallery_ref(gallery)) as g:
        if clear:
            console.print("calibration removed" if g.clear_calibration() else "the gallery was not calibrated")
            return
        _check_calibrate_options(g, gallery, queries, split, alpha, val, val_split, gallery_model)
        assert queries is not None
        if built_from(g, queries, split):
            console.print("[yellow]warning:[/] the bank comes from the very pairs the gallery was built from;"
                          " make it from training queries, not from the queries the gallery will be searched with")
        runtime = Runtime(device, precision, num_workers)
        vlp = runtime.load(model)
        check_model(g, vlp)  # type: ignore[arg-type]  # GalleryBackend (Milvus or embedded) where the Gallery type is named
        pairs = _pairs(queries, split, open_dataset)
        gm, vp = None, None
        if val is not None and gallery_model is not None:
            gm = runtime.load(gallery_model)
            check_model(g, gm)  # type: ignore[arg-type]  # GalleryBackend (Milvus or embedded) where the Gallery type is named
            vp = _pairs(val, val_split, open_dataset)
        bank, alpha, chosen = gallery_bank(vlp, g.modality or "", pairs, alpha=alpha, val_pairs=vp, gallery_model=gm, k=k,
                                           show_progress=True)
        source = f"{queries}" + (f" (split {split})" if split else "")
        stamp = g.calibrate(bank, alpha=alpha, k=k, query_model=describe_query_model(vlp), space=vlp.space, source=source)
    if chosen is not None:
        direction = next(iter(chosen.alpha))
        scores = ", ".join(f"{a:g}: {v:.1f}" for a, v in chosen.scores[direction].items())
        console.print(f"alpha {alpha:g} chosen on {chosen.n_val_queries[direction]} val {direction} queries"
                      f" (mean R@1/5/10 per alpha: {scores})")
    print_json({"calibration": stamp, **({"val": chosen.to_dict()} if chosen is not None else {})})


def _check_calibrate_options(g: Any, gallery: str, queries: Optional[str], split: Optional[str], alpha: Optional[float],
                             val: Optional[str], val_split: Optional[str], gallery_model: Optional[str]) -> None:
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


def _pairs(source: str, split: Optional[str], open_dataset: Any) -> Any:
    pairs = open_dataset(source, split)
    if not pairs:
        raise InputError(f"{source} holds no pairs")
    return pairs


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

    with open_gallery(gallery_ref(gallery)) as g:
        info = g.info().to_dict()
        if model is not None:
            query_model = Runtime(device, precision).load(model)
            check_model(g, query_model)  # type: ignore[arg-type]  # GalleryBackend (Milvus or embedded) where the Gallery type is named
            info = QueryModelView(g, query_model).info().to_dict()  # says whether the calibration applies
            info["model"] = describe_model(query_model) | {"runtime": describe(query_model)}
        transformed = transform_status(g)  # a transformed gallery: how many rows are still transformed
        if transformed is not None:
            info["transform"] = transformed
        problems = g.verify() if verify else None
    if problems is not None:
        info["problems"] = problems
    print_json(info)
    if problems:
        raise typer.Exit(1)


@gallery_app.command("delete")
def gallery_delete(
    gallery: str = typer.Option(..., help="The gallery: a folder, or milvus:URI#NAME."),
    ids: list[str] = typer.Argument(..., help="Ids to remove."),
) -> None:
    """Remove items by id."""
    from xbt.gallery.base import open_gallery

    with open_gallery(gallery_ref(gallery)) as g:
        n = g.delete(ids)
    console.print(f"deleted {n}")


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
    fit_texts: Optional[Path] = typer.Option(None, "--fit-texts", help="--fit: a text file of unlabeled texts (one a line) both models embed."),
    fit_images: Optional[Path] = typer.Option(None, help="--fit: a folder of unlabeled images both models embed."),
    batch_size: int = typer.Option(1024, help="Vectors read, mapped and written per batch (bounds the memory)."),
    engine: str = typer.Option("local", help="local (this process), or ray: Ray actors map shards of the source (each opens it: a shared folder or a Milvus server), this process writes them."),
    shard_size: int = typer.Option(65536, help="--engine ray: ids per shard (the unit of work and of resumption)."),
    work: Optional[Path] = typer.Option(None, help="--engine ray: the folder of shard files (default: OUT.shards beside a folder gallery)."),
    address: Optional[str] = typer.Option(None, help="--engine ray: the cluster to join (ray://HOST:10001 or auto); default: a local Ray."),
    actors: Optional[int] = typer.Option(None, help="--engine ray: size of the actor pool."),
    device: Device = "auto",
    precision: Precision = "fp32",
) -> None:
    """Move a gallery into the new space without re-encoding: map every stored vector old -> new into a new
    gallery, payloads and media carried over, each row marked transformed (with the map's digest). Resumable
    and kill-safe: run it again after an interruption. A rerun also removes transformed rows whose item the
    source has deleted since."""
    from xbt.gallery.base import open_gallery
    from xbt.gallery.transform import transform_gallery

    if (map_model is None) == (fit is None):
        raise InputError("give --map compat:DIR (an orthogonal query map, transposed) or --fit METHOD (an old->new map fitted here)")
    runtime = Runtime(device, precision)
    with open_gallery(gallery_ref(gallery)) as g:
        gmap = _transform_map(g, runtime, map_model, fit, old, new, fit_pairs, fit_split, fit_texts, fit_images)
        if engine == "local" and work is None:
            report = transform_gallery(g, gallery_ref(out), gmap, batch=batch_size, show_progress=True)
        else:
            from xbt.scale.ray_embed import RayOptions
            from xbt.scale.ray_transform import transform_sharded

            report = transform_sharded(g, gallery_ref(out), gmap, engine=engine, work=work, shard_size=shard_size,
                                       ray_options=RayOptions(address=address, actors=actors),
                                       show_progress=True).to_dict()
    print_json(report)


def _transform_map(g: Any, runtime: Runtime, map_model: Optional[str], fit: Optional[str], old: Optional[str],
                   new: Optional[str], fit_pairs: Optional[str], fit_split: Optional[str], fit_texts: Optional[Path],
                   fit_images: Optional[Path]) -> Any:
    """The old -> new map of `gallery transform`: a compatible model's orthogonal query map transposed, or fitted here."""
    from xbt.compat.model import CompatibleModel
    from xbt.data.datasets import open_dataset
    from xbt.gallery.ingest import items_from_folder
    from xbt.gallery.transform import fitted_map, query_tower, transposed_query_map

    if map_model is not None:
        model = runtime.load(map_model)
        if not isinstance(model, CompatibleModel):
            raise InputError(f"--map {map_model} is not a compatible model; give compat:DIR, or fit a map with --fit")
        return transposed_query_map(model, query_tower(g.modality))
    if old is None or new is None or (fit_pairs, fit_texts, fit_images) == (None, None, None):
        raise InputError("--fit needs --old, --new and data both embed: --fit-pairs, --fit-texts and/or --fit-images")
    pairs = open_dataset(fit_pairs, fit_split) if fit_pairs is not None else []
    texts = [t.strip() for t in fit_texts.read_text().splitlines() if t.strip()] if fit_texts else []
    images = [it.payload["image"] for it in items_from_folder(fit_images)] if fit_images else []
    return fitted_map(fit, runtime.load(old), runtime.load(new), fit_texts=texts, fit_pairs=pairs,  # type: ignore[arg-type]  # open_dataset's pairs
                      fit_images=images, show_progress=True)


@gallery_app.command("export")
def gallery_export(
    gallery: str = typer.Option(..., help="The gallery to copy: a folder, or milvus:URI#NAME."),
    out: str = typer.Option(..., help="Where to: a new folder (embedded store) or milvus:URI#NAME."),
    batch_size: int = typer.Option(1024, help="Items copied per batch."),
) -> None:
    """Copy a gallery to the other backend (embedded <-> Milvus): vectors, ids, payloads, space, order.
    Resumable: run it again after an interruption."""
    _copy_gallery(gallery_ref(gallery), out, batch_size)


@gallery_app.command("import")
def gallery_import(
    gallery: str = typer.Option(..., help="The gallery to fill: a new folder, or milvus:URI#NAME."),
    source: str = typer.Option(..., help="The gallery to copy from: a folder, or milvus:URI#NAME."),
    batch_size: int = typer.Option(1024, help="Items copied per batch."),
) -> None:
    """Copy a gallery from the other backend into this one (see `export`)."""
    _copy_gallery(source, gallery_ref(gallery), batch_size)


def _copy_gallery(source: str, target: str, batch_size: int) -> None:
    from xbt.gallery.base import copy_gallery, open_gallery

    with open_gallery(source) as src:
        info = copy_gallery(src, target, batch=batch_size)
    console.print(f"gallery {target}: {info.size} items in space {info.space_id}, index {info.index_kind}")
