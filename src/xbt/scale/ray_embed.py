"""Embedding at scale: items -> vector shards (parquet), on this process or on a Ray cluster.

Both engines run the same `ShardEmbedder` on the same shard plan (`xbt.scale.vectors.plan_shards`), so
they write the same vectors (up to the float noise of thread counts). With `engine="ray"` the shards
are rows of a Ray Dataset (`ray.data.from_items`), mapped by a pool of actors (`map_batches` with a
callable class): each actor loads the model once and embeds whole shards, writing each shard file
itself, so the driver never carries vectors. A shard is the unit of scheduling, of atomic writing and
of resumption: a rerun skips every shard already written for the same items in the same space.

On a cluster (`address="ray://head:10001"` or `"auto"`), the output folder and the image paths must be
reachable under the same paths from every node (a shared filesystem), and xbt must be installed there.

Gallery backfill on Ray (`backfill`): the migration's plan is embedded shard by shard in priority order,
each finished shard is added to the new-space gallery as it arrives (durable, so search during the
migration benefits at once), then `Migration.run` records the position and sweeps up whatever changed
in the old gallery meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbt.errors import InputError
from xbt.gallery.ingest import GalleryItem, embed_inputs, item_source
from xbt.models.base import EmbeddingSpace, VLPModel
from xbt.models.device import describe
from xbt.progress import progress_bar
from xbt.scale.vectors import (
    FORMAT,
    Manifest,
    ShardResult,
    ShardTask,
    plan_shards,
    read_shard,
    shard_meta,
    write_shard,
)

ENGINES = ("local", "ray")
# Variables a worker process needs to resolve a model spec the way this process does.
FORWARDED_ENV = ("XBT_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")


def worker_env() -> dict[str, str]:
    """The environment variables of this process that workers should share (set ones only)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


@dataclass(frozen=True)
class RayOptions:
    """How the Ray engine runs.

    address: None starts a local Ray (or reuses the one this process already joined); "auto" or
    "ray://HOST:10001" joins a cluster. actors: size of the fixed actor pool (default: the cluster's
    CPUs / cpus_per_actor, minus one so Ray Data's own tasks are never starved). threads: torch threads
    per actor (default: cpus_per_actor rounded up).

    gpus_per_actor > 0: each actor reserves that share of a GPU (0.5 = two actors per GPU), Ray makes
    its GPU the actor's only visible one, and the actor loads its one model there (device auto or cuda).
    By default the pool then has as many actors as the cluster's GPUs allow."""

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    threads: int | None = None
    num_cpus: int | None = None  # for a local Ray started here: how many CPUs it may use (default: all)
    gpus_per_actor: float = 0.0  # GPUs each actor reserves (fractions share a GPU); the actor's model runs there
    num_gpus: int | None = None  # for a local Ray started here: how many GPUs it may schedule (default: detected)

    def map_options(self) -> dict[str, Any]:
        """The resources each actor asks Ray for (`map_batches(num_cpus=..., num_gpus=...)`)."""
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise InputError("--cpus-per-actor must be above 0 and --gpus-per-actor 0 or more")
        options: dict[str, Any] = {"num_cpus": self.cpus_per_actor}
        if self.gpus_per_actor > 0:
            options["num_gpus"] = self.gpus_per_actor
        return options

    def actor_device(self, device: str) -> str:
        """The device an actor's model is configured on, for the driver's `--device`. An actor that reserves
        no GPU runs on the CPU: Ray (since 2.49) no longer hides the GPUs from actors that request none, so
        `auto` would put every CPU actor's model copy on cuda:0, with nothing reserved. An actor that reserves
        a GPU sees only its own, as cuda:0, so `cuda:N` cannot name it."""
        name = (device or "auto").strip().lower()
        if self.gpus_per_actor <= 0:
            if name.startswith("cuda"):
                raise InputError(f"--device {device} with Ray actors that reserve no GPU: give --gpus-per-actor"
                                 " (e.g. 1, or 0.5 for two actors per GPU), or use --device cpu / auto")
            return "cpu"
        if name == "cpu":
            raise InputError("--gpus-per-actor reserves GPUs for the actors: use --device auto or cuda, not cpu")
        if name.startswith("cuda:"):
            raise InputError(f"--device {device} with --gpus-per-actor: Ray gives each actor its own GPU, which"
                             " the actor sees as cuda:0; use --device cuda (or auto), and choose the GPUs with"
                             " CUDA_VISIBLE_DEVICES when Ray starts")
        return name


@dataclass
class EmbedReport:
    """What an embedding run did. `written` shards were embedded now; `skipped` ones were already there."""

    out: str
    engine: str
    model: str
    space: dict[str, Any]
    modality: str
    items: int
    shards: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    embedded_items: int = 0
    seconds: float = 0.0  # the whole run, engine start and model loading included
    engine_start_s: float = 0.0  # starting (or joining) Ray; 0 for the local engine
    worker_seconds: float = 0.0  # summed over shards: time inside workers embedding and writing (steady state)

    def to_dict(self) -> dict[str, Any]:
        rate = self.embedded_items / self.seconds if self.seconds > 0 else None
        return {"out": self.out, "engine": self.engine, "model": self.model, "space": EmbeddingSpace.from_dict(self.space).id,
                "modality": self.modality, "items": self.items, "shards": self.shards, "written": len(self.written),
                "skipped": len(self.skipped), "failed": len(self.failed), "embedded_items": self.embedded_items,
                "seconds": round(self.seconds, 3), "engine_start_s": round(self.engine_start_s, 3),
                "worker_seconds": round(self.worker_seconds, 3), "items_per_s": round(rate, 2) if rate else None}


class ShardEmbedder:
    """Loads the model once; embeds a shard and writes its file, or skips a shard already written.

    The same class runs in-process (local engine) and as a Ray Data actor (its `__call__`)."""

    def __init__(self, model: str, out: str, modality: str, batch_size: int = 64, env: Mapping[str, str] | None = None,
                 threads: int | None = None, loaded: VLPModel | None = None, device: str = "auto",
                 precision: str = "fp32", num_workers: int = 0):
        os.environ.update(env or {})
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        from xbt.specs import load_model

        self.spec, self.out, self.modality, self.batch_size = model, Path(out), modality, batch_size
        self.model = loaded if loaded is not None else load_model(model).configure(device, precision, num_workers)
        self.space = self.model.space
        self.runtime = describe(self.model) | {"accelerators": _ray_gpu_ids()}

    def is_done(self, task: ShardTask) -> bool:
        """A shard file for exactly these items, made in this model's space, with every item accounted for."""
        meta = shard_meta(self.out / task.name)
        return (meta is not None and meta.get("format") == FORMAT and meta.get("digest") == task.digest
                and meta.get("space", {}).get("fingerprint") == self.space.fingerprint
                and meta.get("space", {}).get("dim") == self.space.dim
                and int(meta.get("rows", -1)) + len(meta.get("failed", {})) == len(task.ids))

    def embed(self, task: ShardTask) -> ShardResult:
        t0 = time.perf_counter()
        if self.is_done(task):
            meta = shard_meta(self.out / task.name) or {}
            return ShardResult(task.name, "skipped", int(meta["rows"]), dict(meta["failed"]), self.space.to_dict(),
                               time.perf_counter() - t0)
        failed: dict[str, str] = {}
        ok: list[int] = []
        sources: list[str] = []
        for i, (item_id, payload) in enumerate(zip(task.ids, task.payloads)):
            try:
                sources.append(item_source(GalleryItem(item_id, payload), self.modality))
                ok.append(i)
            except InputError as exc:
                failed[item_id] = str(exc)
        if sources:
            vectors, bad = embed_inputs(self.model, sources, self.modality, self.batch_size)
        else:
            vectors, bad = np.zeros((0, self.space.dim), np.float32), {}
        for position, why in bad.items():
            failed[task.ids[ok[position]]] = why
        good = [i for position, i in enumerate(ok) if position not in bad]
        meta = {"format": FORMAT, "space": self.space.to_dict(), "model": self.spec, "modality": self.modality,
                "shard": task.name, "index": task.index, "digest": task.digest, "rows": len(good), "failed": failed,
                "runtime": self.runtime}
        write_shard(self.out / task.name, [task.ids[i] for i in good], vectors, [task.payloads[i] for i in good], meta)
        return ShardResult(task.name, "written", len(good), failed, self.space.to_dict(), time.perf_counter() - t0)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        """Ray Data entry point: a batch of shard rows in, one result row per shard out."""
        rows = [self.embed(ShardTask.from_json(str(text))).to_row() for text in batch["task"]]
        return {key: [row[key] for row in rows] for key in ("name", "status", "rows", "failed", "space", "seconds")}


# ----- engines ---------------------------------------------------------------------------------------------
def _run_local(tasks: Sequence[ShardTask], embedder: ShardEmbedder, show_progress: bool) -> Iterable[ShardResult]:
    with progress_bar(sum(len(t.ids) for t in tasks), f"embedding {embedder.modality}s (local)", show_progress) as advance:
        for task in tasks:
            result = embedder.embed(task)
            advance(len(task.ids))
            yield result


def _ray_gpu_ids() -> list[str]:
    """The GPUs Ray gave this actor (empty outside Ray or without GPUs)."""
    try:
        import ray

        return [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return []


def default_actors(options: RayOptions) -> int:
    """The actor pool's size when not given: the cluster's GPUs per actor share, or its CPUs minus one."""
    import ray

    resources = ray.cluster_resources()
    if options.gpus_per_actor > 0:
        gpus = resources.get("GPU", 0)
        if gpus < options.gpus_per_actor:
            raise InputError(f"--gpus-per-actor {options.gpus_per_actor}: the Ray cluster has {gpus:g} GPU(s)")
        return max(1, int(gpus // options.gpus_per_actor))
    cpus = resources.get("CPU", 1)
    return max(1, int((cpus - 1) // options.cpus_per_actor))


def start_ray(options: RayOptions) -> tuple[bool, float]:
    """Join (or start) Ray; returns (whether this call started it, seconds spent)."""
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        return False, 0.0
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
    if options.address:
        kwargs["address"] = options.address
    else:
        if options.num_cpus:
            kwargs["num_cpus"] = options.num_cpus
        if options.num_gpus is not None:
            kwargs["num_gpus"] = options.num_gpus
    ray.init(**kwargs)
    return True, time.perf_counter() - t0


def _run_ray(tasks: Sequence[ShardTask], model: str, out: Path, modality: str, batch_size: int, env: Mapping[str, str],
             options: RayOptions, show_progress: bool, runtime: Mapping[str, Any]) -> Iterable[ShardResult]:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    actors = options.actors or default_actors(options)
    threads = options.threads or max(1, int(np.ceil(options.cpus_per_actor)))
    dataset = ray.data.from_items([{"task": t.to_json()} for t in tasks], override_num_blocks=max(1, len(tasks)))
    results = dataset.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={"model": model, "out": str(out), "modality": modality, "batch_size": batch_size,
                               "env": dict(env), "threads": threads, **runtime},
        batch_size=1,  # one shard per call: a shard is the unit of work and of resumption
        compute=ray.data.ActorPoolStrategy(size=actors),  # a fixed pool: each actor loads the model once
        **options.map_options(),  # num_cpus, and num_gpus: Ray pins each actor to its GPU(s)
    )
    for row in results.iter_rows():
        yield ShardResult.from_row(row)


def embed_items(
    model: str,
    items: Sequence[GalleryItem],
    out: str | Path,
    modality: str = "image",
    *,
    engine: str = "local",
    shard_size: int = 1024,
    batch_size: int = 64,
    sort: bool = True,
    ray_options: RayOptions | None = None,
    on_shard: Callable[[ShardResult], None] | None = None,
    loaded: VLPModel | None = None,
    threads: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
    show_progress: bool = False,
) -> EmbedReport:
    """Embed items (payload["image"] paths, or payload["caption"] texts) with a model into a vectors folder.

    Resumable: shards already written for the same items and the same model space are skipped.
    `on_shard` is called in the driver as each shard finishes (e.g. to add it to a gallery at once).
    `loaded`: an already loaded model for the local engine (Ray actors always load `model` themselves).
    `threads`: torch threads of this process for the local engine (Ray actors: `RayOptions.threads`);
    on cores shared with other work, fewer threads are often faster. `device` / `precision` / `num_workers`:
    where each worker's model runs (auto: the GPU Ray gave the actor, if any), see `xbt.models.device`."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan_shards(items, modality, shard_size, sort=sort)
    runtime = {"device": device, "precision": precision, "num_workers": num_workers}
    if engine == "ray":  # checked before Ray starts; the actors get a device they can use
        runtime["device"] = (ray_options or RayOptions()).actor_device(device)
    report = EmbedReport(str(out), engine, model, {}, modality, len(items), len(tasks))
    env = worker_env()
    t0 = time.perf_counter()
    started = False
    try:
        if engine == "local":
            embedder = ShardEmbedder(model, str(out), modality, batch_size, env, threads=threads, loaded=loaded, **runtime)
            results = _run_local(tasks, embedder, show_progress)
        else:
            options = ray_options or RayOptions()
            started, report.engine_start_s = start_ray(options)
            results = _run_ray(tasks, model, out, modality, batch_size, env, options, show_progress, runtime)
        sizes = {t.name: len(t.ids) for t in tasks}
        spaces: set[tuple[str, int]] = set()
        by_name: dict[str, ShardResult] = {}
        for result in results:
            by_name[result.name] = result
            spaces.add((result.space["fingerprint"], result.space["dim"]))
            if len(spaces) > 1:
                raise InputError(f"the workers loaded {model!r} with different weights (spaces {sorted(spaces)});"
                                 " every worker must resolve the model spec to the same files")
            report.space = result.space
            (report.written if result.status == "written" else report.skipped).append(result.name)
            if result.status == "written":
                report.embedded_items += sizes[result.name]
                report.worker_seconds += result.seconds
            report.failed.update(result.failed)
            if on_shard is not None:
                on_shard(result)
    finally:
        if started:
            import ray

            ray.shutdown()
    report.seconds = time.perf_counter() - t0
    missing = [t.name for t in tasks if t.name not in by_name]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) came back without a result (e.g. {missing[0]}); run again to finish them")
    if not tasks:
        report.space = (loaded or _load_for_space(model)).space.to_dict()
    Manifest(model, report.space, modality, shard_size,
             [{"name": t.name, "rows": by_name[t.name].rows, "failed": len(by_name[t.name].failed)} for t in tasks],
             len(items), report.failed).write(out)
    return report


def _load_for_space(model: str) -> VLPModel:
    from xbt.specs import load_model

    return load_model(model)


# ----- gallery backfill on an engine -------------------------------------------------------------------------
def backfill(
    migration: Any,
    model: str,
    *,
    engine: str = "ray",
    shard_size: int = 1024,
    batch_size: int = 64,
    ray_options: RayOptions | None = None,
    new_model: VLPModel | None = None,
    device: str = "auto",
    precision: str = "fp32",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Run a `xbt.gallery.migration.Migration` with the embedding done by an engine (Ray: many actors).

    The plan is embedded in priority order into `<migration>/vectors`, shard by shard; each shard lands in
    the new gallery as soon as it is done. Resumable like the migration itself. Returns its progress()."""
    from xbt.gallery.store import Gallery
    from xbt.specs import load_model
    from xbt.scale.vectors import add_shard_to_gallery

    if migration.cut_over_done:
        return migration.progress()
    local = new_model or load_model(model).configure(device, precision)
    migration.new_space.check(local.space, f"the vectors of the new model {model!r}")
    with Gallery.open(migration.old_gallery_path) as old, Gallery.open(migration.new_gallery_path) as new:
        modality = new.modality or "image"
        plan = migration.plan()
        stored = old.get(plan)
        items = [GalleryItem(i, stored[i]["payload"]) for i in plan if i in stored]
        vectors_dir = migration.path / "vectors"

        def add(result: ShardResult) -> None:
            add_shard_to_gallery(new, read_shard(vectors_dir / result.name), on_conflict="skip")

        embed_items(model, items, vectors_dir, modality, engine=engine, shard_size=shard_size, batch_size=batch_size,
                    sort=False, ray_options=ray_options, on_shard=add, loaded=local, device=device, precision=precision,
                    show_progress=show_progress)
        # Every planned item is now in the new gallery (or failed): this walks the plan without embedding,
        # records the position, and embeds only what changed in the old gallery meanwhile.
        return migration.run(local, batch_size=batch_size, old=old, new=new, show_progress=show_progress)
