"""`xbt serve` (the HTTP service over a gallery or a migration) and `xbt embed` (vector shards, on this
machine or on Ray)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from xbt.cli.common import Device, Precision, Runtime, Workers, console, print_json
from xbt.errors import InputError


def serve(
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
    from xbt.serve.app import ServeConfig, serve as run_service
    from xbt.serve.hosts import allowed_hosts, check_listen_host
    from xbt.serve.launch import open_retrievers, serve_token, token_on_command_line
    from xbt.serve.media import resolve_roots

    check_listen_host(host, expose)  # before any model is loaded
    token = serve_token(token, token_file, token_on_command_line(sys.argv),
                        warn=lambda message: console.print(f"[yellow]warning:[/] {message}"))
    config = ServeConfig(token=token, open_read=open_read, open_info=open_info, max_k=max_k,
                         default_k=min(10, max_k), max_upload_bytes=int(max_upload_mb * (1 << 20)),
                         allowed_hosts=allowed_hosts(host, allowed_host),
                         **({"max_image_pixels": max_image_pixels} if max_image_pixels is not None else {}))
    roots = resolve_roots(media_root)
    runtime = Runtime(device, precision)
    retriever, old = open_retrievers(model, runtime.load, gallery=gallery, migration=migration, new_model=new_model,
                                     old_model=old_model)
    console.print(f"serving {retriever.info()['gallery']['space_id']} on http://{host}:{port} "
                  f"(search page at /, API schema at /openapi.json)")
    if expose:
        console.print(f"[yellow]warning:[/] reachable from other machines; requests are answered only when their Host "
                      f"names one of {', '.join(config.allowed_hosts)} (add --allowed-host NAME for each name clients use)")
    run_service(retriever, config, host=host, port=port, media_roots=roots, old=old, expose=expose)


def embed(
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
    from xbt.scale.ray_embed import ENGINES, RayOptions, embed_items
    from xbt.scale.vectors import load_into_gallery_at

    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    items = load_items(data, modality, split)
    options = RayOptions(address=address, actors=actors, cpus_per_actor=cpus_per_actor, threads=threads,
                         gpus_per_actor=gpus_per_actor)
    if engine == "local" or gpus_per_actor == 0:
        Runtime(device, precision, num_workers)  # checked here; a GPU actor resolves auto on its own node
    report = embed_items(model, items, out, modality, engine=engine, shard_size=shard_size, batch_size=batch_size,
                         ray_options=options, threads=threads, device=device, precision=precision,
                         num_workers=num_workers, show_progress=True)
    if gallery is not None:
        added, present = load_into_gallery_at(out, gallery, modality)
        console.print(f"gallery {gallery}: added {added}, already present {present}")
    for item_id, why in list(report.failed.items())[:10]:
        console.print(f"[yellow]failed[/] {item_id}: {why}")
    print_json(report.to_dict())
