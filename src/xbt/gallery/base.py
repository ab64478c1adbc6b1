"""The gallery interface both backends implement, and the one place a gallery reference is resolved.

A gallery reference is a folder (the embedded store, `xbt.gallery.store.Gallery`: SQLite + faiss, one
machine) or `milvus:URI[#COLLECTION]` (`xbt.gallery.milvus.MilvusGallery`: a Milvus Lite file such as
`milvus:./photos.db`, or a Milvus server such as `milvus:http://host:19530#photos`). Ingestion, search,
serving and the migration work on either through `GalleryBackend`; pymilvus is imported only when a
Milvus reference is opened.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xbt.errors import InputError
from xbt.gallery.index import IndexConfig
from xbt.gallery.store import Gallery, GalleryInfo, Hit, OnConflict, count_items, is_gallery
from xbt.models.base import EmbeddingSpace

MILVUS_PREFIX = "milvus:"


@runtime_checkable
class GalleryBackend(Protocol):
    """What ingestion, `GalleryRetriever`, `MigratingRetriever` and `Migration` use of a gallery."""

    space: EmbeddingSpace
    modality: str | None
    index_config: IndexConfig

    @property
    def path(self) -> Any: ...  # a folder (embedded) or a reference string (Milvus); for messages

    @property
    def extra(self) -> dict[str, Any]: ...

    def add(self, vectors: Any, ids: Sequence[str], payloads: Sequence[Mapping[str, Any] | None] | None = None, *,
            space: EmbeddingSpace, on_conflict: OnConflict = "error") -> list[str]: ...

    def delete(self, ids: Sequence[str]) -> int: ...

    def search(self, queries: Any, k: int, *, space: EmbeddingSpace) -> list[list[Hit]]: ...

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> dict[str, dict[str, Any]]: ...

    def present(self, ids: Sequence[str]) -> set[str]: ...

    def iter_items(self, batch: int = 1024) -> Iterator[tuple[str, dict[str, Any], float]]: ...

    def ids(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def info(self) -> GalleryInfo: ...

    def verify(self) -> list[str]: ...

    def compact(self) -> None: ...

    def store_media(self, data: bytes, suffix: str) -> Path: ...

    def close(self) -> None: ...

    def __enter__(self) -> GalleryBackend: ...

    def __exit__(self, *exc: object) -> None: ...


def is_milvus(ref: str | Path) -> bool:
    return str(ref).startswith(MILVUS_PREFIX)


def gallery_ref(gallery: GalleryBackend) -> str:
    """The reference that opens this very gallery again (absolute; the physical Milvus collection)."""
    ref = getattr(gallery, "ref", None)
    return str(ref) if ref is not None else str(Path(gallery.path).resolve())


def open_gallery(ref: str | Path, index: IndexConfig | None = None) -> GalleryBackend:
    """Open the gallery a reference names (a folder, or milvus:URI[#COLLECTION])."""
    if is_milvus(ref):
        from xbt.gallery.milvus import MilvusGallery

        return MilvusGallery.open(str(ref), index)
    return Gallery.open(ref, index)


def create_gallery(ref: str | Path, space: EmbeddingSpace, index: IndexConfig | None = None,
                   modality: str | None = None, extra: Mapping[str, Any] | None = None) -> GalleryBackend:
    """A new, empty gallery at a reference (refused where one exists)."""
    if is_milvus(ref):
        from xbt.gallery.milvus import MilvusGallery

        return MilvusGallery.create(str(ref), space, index, modality, extra)
    return Gallery.create(ref, space, index, modality, extra)  # type: ignore[arg-type]


def gallery_exists(ref: str | Path) -> bool:
    if is_milvus(ref):
        from xbt.gallery.milvus import MilvusGallery

        return MilvusGallery.exists(str(ref))
    return is_gallery(ref)


def gallery_size(ref: str | Path) -> int | None:
    """How many items the gallery at `ref` holds (None where there is none), cheaply."""
    if not gallery_exists(ref):
        return None
    if is_milvus(ref):
        with open_gallery(ref) as g:
            return len(g)
    return count_items(ref)


def copy_gallery(source: GalleryBackend, target: str | Path, *, batch: int = 1024,
                 index: IndexConfig | None = None) -> GalleryInfo:
    """Copy every item (vector, id, payload), oldest first, into the gallery at `target`, in the same space
    and modality (embedded <-> Milvus: `xbt gallery export` / `import`). Resumable: an existing target in the
    same space is completed (ids it holds are skipped); a target of another space is refused."""
    if batch < 1:
        raise InputError("batch must be at least 1")
    if gallery_exists(target):
        dest = open_gallery(target)
        try:
            dest.space.check(source.space, f"the gallery at {target}")
            if dest.modality != source.modality:
                raise InputError(f"the gallery at {target} holds {dest.modality}s, the source {source.modality}s")
        except BaseException:
            dest.close()
            raise
    else:
        dest = create_gallery(target, source.space, index or source.index_config, source.modality,
                              {**source.extra, "copied_from": gallery_ref(source)})
    try:
        ids = source.ids()
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            have = dest.present(chunk)
            todo = [i for i in chunk if i not in have]
            stored = source.get(todo, with_vectors=True)
            todo = [i for i in todo if i in stored]  # deleted from the source meanwhile
            if todo:
                dest.add(np.stack([stored[i]["vector"] for i in todo]), todo, [stored[i]["payload"] for i in todo],
                         space=source.space, on_conflict="skip")
        dest.compact()
        return dest.info()
    finally:
        dest.close()
