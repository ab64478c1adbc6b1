"""Vector shards: a folder of parquet files holding embedded items, the unit of work and of resumption.

Layout of a vectors folder::

    part-00000-<digest>.parquet   one shard: columns id (string), vector (list<float32>), payload (JSON string);
    part-00001-<digest>.parquet   its file metadata (key b"xbt") stamps the space, model, modality, and
    ...                           the items that could not be embedded (id -> why)
    vectors.json                  the manifest, written last: which shards make up the result

The item list is cut into fixed-size shards in a deterministic order (sorted by id, or a given priority
order); a shard's name carries a digest of exactly which items it holds, so a rerun recognises finished
shards and embeds only the missing ones. Each shard is written to a temporary file, fsynced, then renamed:
a shard file is complete or absent, never torn. Readers go by the manifest, never by listing files.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbt.durable import atomic_write_bytes
from xbt.errors import InputError
from xbt.gallery.base import GalleryBackend
from xbt.gallery.ingest import GalleryItem
from xbt.gallery.store import Gallery, OnConflict, is_gallery
from xbt.models.base import EmbeddingSpace

FORMAT = "xbt.vectors/1"
MANIFEST_NAME = "vectors.json"
META_KEY = b"xbt"


@dataclass(frozen=True)
class ShardTask:
    """One shard to embed: which items, in which order, under which file name."""

    index: int
    name: str
    digest: str
    ids: list[str]
    payloads: list[dict[str, Any]]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ShardTask:
        return cls(**json.loads(text))


@dataclass
class ShardResult:
    """What a worker did with a shard: written now, or skipped because an identical shard exists."""

    name: str
    status: str  # written | skipped
    rows: int
    failed: dict[str, str]
    space: dict[str, Any]
    seconds: float

    def to_row(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "rows": self.rows, "failed": json.dumps(self.failed),
                "space": json.dumps(self.space), "seconds": self.seconds}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ShardResult:
        return cls(str(row["name"]), str(row["status"]), int(row["rows"]), json.loads(row["failed"]),
                   json.loads(row["space"]), float(row["seconds"]))


def plan_shards(items: Sequence[GalleryItem], modality: str, shard_size: int, sort: bool = True) -> list[ShardTask]:
    """Cut the items into shards of `shard_size`, sorted by id (or in the given order when `sort` is False,
    e.g. a backfill's priority order). Same items, same order, same size: same shards."""
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1, not {shard_size}")
    if modality not in ("image", "text"):
        raise InputError(f"modality must be 'image' or 'text', not {modality!r}")
    ordered = sorted(items, key=lambda it: it.id) if sort else list(items)
    ids = [it.id for it in ordered]
    if len(set(ids)) != len(ids):
        raise InputError("the items contain duplicate ids; give each item one id")
    tasks = []
    for index, start in enumerate(range(0, len(ordered), shard_size)):
        chunk = ordered[start : start + shard_size]
        digest = hashlib.sha256()
        digest.update(modality.encode())
        for it in chunk:
            digest.update(b"\0" + it.id.encode() + b"\0" + json.dumps(it.payload, sort_keys=True, ensure_ascii=False).encode())
        hexdigest = digest.hexdigest()
        tasks.append(ShardTask(index, f"part-{index:05d}-{hexdigest[:16]}.parquet", hexdigest,
                               [it.id for it in chunk], [dict(it.payload) for it in chunk]))
    return tasks


# ----- one shard on disk --------------------------------------------------------------------------------
def write_shard(path: Path, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[Mapping[str, Any]],
                meta: Mapping[str, Any]) -> None:
    """Write a shard atomically (temporary file, fsync, rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(ids)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, 1), np.float32)
    dim = vectors.shape[1]
    if n * dim >= 2**31:
        raise InputError(f"a shard of {n} x {dim} floats is too large for one parquet list column; use a smaller shard size")
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    vector_col = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), type=pa.float32()))
    table = pa.table({
        "id": pa.array(list(ids), type=pa.string()),
        "vector": vector_col,
        "payload": pa.array([json.dumps(dict(p), ensure_ascii=False, sort_keys=True) for p in payloads], type=pa.string()),
    })
    table = table.replace_schema_metadata({META_KEY: json.dumps(dict(meta), ensure_ascii=False).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    atomic_write_bytes(path, buffer.getvalue())


def shard_meta(path: Path) -> dict[str, Any] | None:
    """A shard's xbt metadata (reads the parquet footer only), or None when absent or unreadable."""
    import pyarrow.parquet as pq

    try:
        raw = pq.read_schema(path).metadata or {}
        return json.loads(raw[META_KEY])
    except (OSError, KeyError, ValueError):
        return None
    except Exception:  # noqa: BLE001 - pyarrow raises its own error types for a corrupt footer
        return None


@dataclass
class Shard:
    """One shard read back: ids, (n, d) unit vectors, payloads and the space they were made in."""

    ids: list[str]
    vectors: np.ndarray
    payloads: list[dict[str, Any]]
    space: EmbeddingSpace
    meta: dict[str, Any]


def read_shard(path: Path) -> Shard:
    import pyarrow.parquet as pq

    meta = shard_meta(path)
    if meta is None or meta.get("format") != FORMAT:
        raise InputError(f"{path} is not an xbt vector shard ({FORMAT}); embed again with `xbt embed`")
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    space = EmbeddingSpace.from_dict(meta["space"])
    column = table.column("vector").combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False) if len(ids) else np.zeros(0, np.float32)
    vectors = np.asarray(values, dtype=np.float32).reshape(len(ids), space.dim)
    payloads = [json.loads(p) for p in table.column("payload").to_pylist()]
    return Shard(ids, vectors, payloads, space, meta)


# ----- the whole folder -----------------------------------------------------------------------------------
@dataclass
class Manifest:
    """The finished result of an embedding run (`vectors.json`)."""

    model: str
    space: dict[str, Any]
    modality: str
    shard_size: int
    shards: list[dict[str, Any]]  # {name, rows, failed}
    items: int
    failed: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    created_at: float = field(default_factory=time.time)

    def write(self, folder: Path) -> None:
        atomic_write_bytes(folder / MANIFEST_NAME, (json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n").encode())

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise InputError(f"{folder} holds no finished vectors ({MANIFEST_NAME} missing); run `xbt embed` into it"
                             " (again, if it was interrupted: finished shards are kept)")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise InputError(f"{path} has format {data.get('format')!r}; this xbt reads {FORMAT}")
        return cls(**data)

    @property
    def embedding_space(self) -> EmbeddingSpace:
        return EmbeddingSpace.from_dict(self.space)


def iter_shards(folder: str | Path) -> Iterator[Shard]:
    """The shards of a finished vectors folder, in order, each checked against the manifest's space."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    for entry in manifest.shards:
        shard = read_shard(folder / entry["name"])
        manifest.embedding_space.check(shard.space, f"the vectors in {folder / entry['name']}")
        yield shard


def read_vectors(folder: str | Path) -> tuple[list[str], np.ndarray, list[dict[str, Any]], EmbeddingSpace]:
    """Everything in a finished vectors folder: (ids, vectors, payloads, space), in shard order."""
    manifest = Manifest.read(Path(folder))
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    payloads: list[dict[str, Any]] = []
    for shard in iter_shards(folder):
        ids += shard.ids
        blocks.append(shard.vectors)
        payloads += shard.payloads
    space = manifest.embedding_space
    vectors = np.concatenate(blocks) if blocks else np.zeros((0, space.dim), np.float32)
    return ids, vectors, payloads, space


def add_shard_to_gallery(gallery: GalleryBackend, shard: Shard, on_conflict: OnConflict = "skip") -> list[str]:
    """Store one shard's vectors; the gallery refuses them unless they were made in its space."""
    if not shard.ids:
        return []
    return gallery.add(shard.vectors, shard.ids, shard.payloads, space=shard.space, on_conflict=on_conflict)


def load_into_gallery(folder: str | Path, gallery: GalleryBackend, on_conflict: OnConflict = "skip") -> tuple[int, int]:
    """Add every shard of a finished vectors folder to a gallery (durable shard by shard, so an interrupted
    load resumes with `on_conflict="skip"`). Returns (added, already present)."""
    manifest = Manifest.read(Path(folder))
    if gallery.modality and gallery.modality != manifest.modality:
        raise InputError(f"{folder} holds {manifest.modality} vectors, but the gallery at {gallery.path} holds {gallery.modality}s")
    gallery.space.check(manifest.embedding_space, f"the vectors in {folder}")
    added = present = 0
    for shard in iter_shards(folder):
        n = len(add_shard_to_gallery(gallery, shard, on_conflict))
        added += n
        present += len(shard.ids) - n
    return added, present


def load_into_gallery_at(folder: str | Path, gallery: str | Path, modality: str,
                         on_conflict: OnConflict = "skip") -> tuple[int, int]:
    """`load_into_gallery` into the embedded gallery at `gallery`, created in the vectors' space (with `modality`)
    when there is none yet (`xbt embed --gallery`; resumable). Returns (added, already present)."""
    target = (Gallery.open(gallery) if is_gallery(gallery)
              else Gallery.create(gallery, Manifest.read(Path(folder)).embedding_space, modality=modality))
    with target:
        return load_into_gallery(folder, target, on_conflict)
