"""The gallery transform (`xbt.gallery.transform`) as a job over shards of the source collection, on this
process or on a Ray cluster, for galleries that outgrow one process.

The source's ids are cut into shards (sorted, so the same gallery gives the same shards). A worker (a
`ShardTransformer`: a Ray Data actor, or this process) opens the source gallery itself, reads its shard's
vectors and payloads, applies the old->new map, marks each row transformed (with the map's digest) and
writes the shard as one parquet file of the vectors format (`xbt.scale.vectors`, atomically). The driver
adds each finished shard to the new-space gallery as it arrives (payload media adopted, `on_conflict="skip"`),
so the driver never reads the source's vectors and the workers never write the gallery. Then one pass of
`transform_gallery` sweeps up what the source gained while the job ran (and, as every rerun of a transform
does, removes transformed rows whose item the source has deleted).

Resumable at shard granularity: a shard file made for the same ids and the same map is not made again, and
the gallery skips the ids it holds, so a killed job is run again as it was started. The workers must reach
the source under the same reference: a folder on a shared filesystem, or a Milvus server. A Milvus Lite
file admits one process, so it is refused on Ray (run the local engine, or serve the collection).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbt.errors import InputError
from xbt.gallery.base import GalleryBackend, gallery_ref, is_milvus, open_gallery
from xbt.gallery.media import adopt_media
from xbt.gallery.transform import PROVENANCE_KEY, GalleryMap, open_transform_target, transform_gallery
from xbt.progress import progress_bar
from xbt.scale.ray_embed import ENGINES, RayOptions, default_actors, start_ray, worker_env
from xbt.scale.vectors import FORMAT, ShardResult, read_shard, shard_meta, write_shard


@dataclass(frozen=True)
class TransformTask:
    """One shard of the source: its ids (sorted), and a digest of them and of the map."""

    index: int
    name: str
    digest: str
    ids: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> TransformTask:
        return cls(**json.loads(text))


def plan_transform(ids: Sequence[str], map_digest: str, shard_size: int) -> list[TransformTask]:
    """The source's ids, sorted, cut into shards of `shard_size`; same ids and map, same shards."""
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, not {shard_size}")
    ordered = sorted(ids)
    tasks = []
    for index, start in enumerate(range(0, len(ordered), shard_size)):
        chunk = ordered[start : start + shard_size]
        digest = hashlib.sha256(map_digest.encode())
        for item_id in chunk:
            digest.update(b"\0" + item_id.encode())
        hexdigest = digest.hexdigest()
        tasks.append(TransformTask(index, f"part-{index:05d}-{hexdigest[:16]}.parquet", hexdigest, chunk))
    return tasks


class ShardTransformer:
    """Opens the source gallery once; maps a shard and writes its file, or skips a shard already written.
    The same class runs in this process (local engine) and as a Ray Data actor (its `__call__`)."""

    def __init__(self, source: str, out: str, gmap: GalleryMap, env: Mapping[str, str] | None = None,
                 threads: int | None = None, opened: GalleryBackend | None = None):
        os.environ.update(env or {})
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.out, self.gmap = Path(out), gmap
        self.source = opened if opened is not None else open_gallery(source)
        self.provenance = {"kind": "transformed", "map": gmap.digest}

    def is_done(self, task: TransformTask) -> bool:
        meta = shard_meta(self.out / task.name)
        return meta is not None and meta.get("format") == FORMAT and meta.get("digest") == task.digest

    def transform(self, task: TransformTask) -> ShardResult:
        t0 = time.perf_counter()
        space = self.gmap.new_space.to_dict()
        if self.is_done(task):
            meta = shard_meta(self.out / task.name) or {}
            return ShardResult(task.name, "skipped", int(meta["rows"]), {}, space, time.perf_counter() - t0)
        stored = self.source.get(task.ids, with_vectors=True)
        ids = [i for i in task.ids if i in stored]  # deleted from the source since the plan: the sweep agrees
        vectors = (self.gmap.apply(np.stack([stored[i]["vector"] for i in ids])) if ids
                   else np.zeros((0, self.gmap.new_space.dim), np.float32))
        payloads = [{**(stored[i]["payload"] or {}), PROVENANCE_KEY: self.provenance} for i in ids]
        meta = {"format": FORMAT, "space": space, "kind": "transform", "map": self.gmap.digest, "shard": task.name,
                "index": task.index, "digest": task.digest, "rows": len(ids), "failed": {}}
        write_shard(self.out / task.name, ids, vectors, payloads, meta)
        return ShardResult(task.name, "written", len(ids), {}, space, time.perf_counter() - t0)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        """Ray Data entry point: a batch of shard rows in, one result row per shard out."""
        rows = [self.transform(TransformTask.from_json(str(text))).to_row() for text in batch["task"]]
        return {key: [row[key] for row in rows] for key in ("name", "status", "rows", "failed", "space", "seconds")}


def _run_ray(tasks: Sequence[TransformTask], source: str, out: Path, gmap: GalleryMap,
             options: RayOptions) -> Iterable[ShardResult]:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows one bar over the shards
    dataset = ray.data.from_items([{"task": t.to_json()} for t in tasks], override_num_blocks=max(1, len(tasks)))
    results = dataset.map_batches(
        ShardTransformer,
        fn_constructor_kwargs={"source": source, "out": str(out), "gmap": gmap, "env": worker_env(),
                               "threads": options.threads or 1},
        batch_size=1,  # one shard per call: the unit of work and of resumption
        compute=ray.data.ActorPoolStrategy(size=options.actors or default_actors(options)),
        num_cpus=options.cpus_per_actor,
    )
    for row in results.iter_rows():
        yield ShardResult.from_row(row)


@dataclass
class TransformReport:
    """What a sharded transform did: shards written now or found written, rows added to the gallery by
    the shards and by the closing sweep, and where the time went."""

    engine: str
    shards: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: int = 0  # rows in the shards
    added: int = 0  # of those, added to the gallery now (the others it held already)
    sweep: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    engine_start_s: float = 0.0
    worker_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "shards": self.shards, "written": len(self.written), "skipped": len(self.skipped),
                "rows": self.rows, "added": self.added, "sweep": self.sweep, "seconds": round(self.seconds, 3),
                "engine_start_s": round(self.engine_start_s, 3), "worker_seconds": round(self.worker_seconds, 3),
                "rows_per_s": round(self.rows / self.seconds, 1) if self.seconds > 0 else None}


def transform_sharded(source: GalleryBackend, target: str | Path, gmap: GalleryMap, *, engine: str = "ray",
                      work: str | Path | None = None, shard_size: int = 65536, ray_options: RayOptions | None = None,
                      show_progress: bool = False) -> TransformReport:
    """`transform_gallery(source, target, gmap)` with the mapping done shard by shard by an engine (Ray:
    a pool of actors, each reading the source itself). Shard files go to `work` (default: TARGET.shards
    beside an embedded target); they may be deleted once the job is done."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    ref = gallery_ref(source)
    if engine == "ray" and is_milvus(ref) and ref.split("#", 1)[0].endswith(".db"):
        raise InputError(f"{ref} is a Milvus Lite file, which one process at a time may open: transform it with the"
                         " local engine, or serve the collection with Milvus and give its URI")
    if work is None:
        if is_milvus(str(target)):
            raise InputError("a transform into Milvus on an engine needs --work DIR for its shard files")
        work = Path(str(target) + ".shards")
    out = Path(work).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dest = open_transform_target(source, target, gmap)
    tasks = plan_transform(source.ids(), gmap.digest, shard_size)
    report = TransformReport(engine, len(tasks))
    t0 = time.perf_counter()
    started = False
    try:
        if engine == "local":
            local = ShardTransformer(ref, str(out), gmap, opened=source)
            results: Iterable[ShardResult] = (local.transform(t) for t in tasks)
        else:
            options = ray_options or RayOptions()
            started, report.engine_start_s = start_ray(options)
            results = _run_ray(tasks, ref, out, gmap, options)
        with progress_bar(len(tasks), f"transform ({engine})", show_progress) as advance:
            for result in results:
                (report.written if result.status == "written" else report.skipped).append(result.name)
                report.worker_seconds += result.seconds if result.status == "written" else 0.0
                shard = read_shard(out / result.name)
                report.rows += len(shard.ids)
                if shard.ids:
                    payloads = adopt_media(shard.payloads, source, dest)
                    report.added += len(dest.add(shard.vectors, shard.ids, payloads, space=gmap.new_space,
                                                 on_conflict="skip"))
                advance(1)
    finally:
        dest.close()
        if started:
            import ray

            ray.shutdown()
    missing = {t.name for t in tasks} - set(report.written) - set(report.skipped)
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) came back without a result; run the transform again to finish them")
    sweep = transform_gallery(source, target, gmap)
    report.sweep = {k: sweep[k] for k in ("written", "already_present", "removed") if k in sweep}
    report.seconds = time.perf_counter() - t0
    return report
