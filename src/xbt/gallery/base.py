"""The gallery interface both backends implement, and the one place a gallery reference is resolved.

A gallery reference is a folder (the embedded store, `xbt.gallery.store.Gallery`: SQLite + faiss, one
machine) or `milvus:URI[#COLLECTION]` (`xbt.gallery.milvus.MilvusGallery`: a Milvus Lite file such as
`milvus:./photos.db`, or a Milvus server such as `milvus:http://host:19530#photos`). Both extend one base
class, `xbt.gallery.backend.GalleryBase` (validation, search, calibration, seals and info, written once);
ingestion, search, serving and the migration work on either through `GalleryBackend`, the typing interface
that the base implements and `QueryModelView` satisfies too. pymilvus is imported only when a Milvus
reference is opened.

Calibration (`xbt gallery calibrate`): a gallery holds at most one, made for one query model (identified
by its encoder id: a compatible model declares the old space, so the space alone cannot tell it from the
old model). `search(..., query_model=ID)` applies it when ID is that model's; `QueryModelView` binds a
gallery to the model that searches it (what `GalleryRetriever`, `xbt gallery search` and the service use),
and its `info()` says whether the calibration applies and why not.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xbt.errors import InputError
from xbt.gallery.index import IndexConfig
from xbt.gallery.media import adopt_media
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

    def seal(self, reason: str) -> None: ...  # refuse later adds and deletes (a migration's cut-over)

    def unseal(self) -> None: ...

    @property
    def sealed(self) -> str | None: ...

    def search(self, queries: Any, k: int, *, space: EmbeddingSpace, query_model: str | None = None) -> list[list[Hit]]: ...

    @property
    def calibration(self) -> dict[str, Any] | None: ...

    def calibrate(self, bank: Any, *, alpha: float, k: int, query_model: Mapping[str, Any], space: EmbeddingSpace,
                  source: str | None = None) -> dict[str, Any]: ...

    def calibration_bank(self) -> np.ndarray | None: ...

    def clear_calibration(self) -> bool: ...

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> dict[str, dict[str, Any]]: ...

    def present(self, ids: Sequence[str]) -> set[str]: ...

    def iter_items(self, batch: int = 1024) -> Iterator[tuple[str, dict[str, Any], float]]: ...

    def ids(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def count_payload(self, key: str, field: str, value: str) -> int: ...  # payload[key][field] == value

    def info(self) -> GalleryInfo: ...

    def verify(self) -> list[str]: ...

    def compact(self) -> None: ...

    def store_media(self, data: bytes, suffix: str) -> Path: ...

    def close(self) -> None: ...

    def __enter__(self) -> GalleryBackend: ...

    def __exit__(self, *exc: object) -> None: ...


def describe_query_model(model: Any) -> dict[str, str]:
    """What a calibration is stamped with: the query model's encoder id (what it computes: a compatible
    model's map and towers, not just the old space it declares), spec and space id."""
    return {"encoder_id": str(model.encoder_id), "spec": str(model.display_name), "space_id": model.space.id}


def calibration_status(calibration: Mapping[str, Any] | None, query_model: Mapping[str, str]) -> dict[str, Any]:
    """Whether a gallery's calibration applies to a query model's searches, and a sentence saying so."""
    if not calibration:
        return {"applies": False, "message": "the gallery is not calibrated: plain inner-product scores"}
    made_for = calibration["query_model"]
    if made_for["encoder_id"] == query_model["encoder_id"]:
        return {"applies": True, "message": f"calibrated for this query model (NNN, alpha {calibration['alpha']},"
                                            f" k {calibration['k']}, bank of {calibration['bank_size']} queries)"}
    return {"applies": False, "message": (
        f"the gallery's calibration was made for another query model ({made_for['spec']}, encoder"
        f" {made_for['encoder_id']}); {query_model['spec']} searches it uncalibrated (plain inner product)."
        f" Run `xbt gallery calibrate --model {query_model['spec']} ...` to calibrate it for this model")}


class QueryModelView:
    """A gallery as one query model searches it: `search` names that model (so a calibration made for it
    applies, and one made for another model is ignored), `info()` adds whether it applies. Everything else
    is the gallery's own. Two retrievers of one gallery (the served model and the old model) each get a
    view: nothing about the gallery itself changes."""

    def __init__(self, gallery: GalleryBackend, model: Any):
        self.gallery = gallery
        self.query_model = describe_query_model(model)

    def search(self, queries: Any, k: int, *, space: EmbeddingSpace, query_model: str | None = None) -> list[list[Hit]]:
        return self.gallery.search(queries, k, space=space, query_model=query_model or self.query_model["encoder_id"])

    def calibration_status(self) -> dict[str, Any]:
        return calibration_status(self.gallery.calibration, self.query_model)

    def info(self) -> GalleryInfo:
        info = self.gallery.info()
        if info.calibration:
            info.calibration = {**info.calibration, **calibration_status(info.calibration, self.query_model)}
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gallery, name)

    def __len__(self) -> int:
        return len(self.gallery)

    def __enter__(self) -> QueryModelView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.gallery.close()


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
    return Gallery.create(ref, space, index, modality, extra)  # type: ignore[arg-type]  # Gallery.create checks the modality


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
                payloads = adopt_media([stored[i]["payload"] for i in todo], source, dest)  # images follow items
                dest.add(np.stack([stored[i]["vector"] for i in todo]), todo, payloads, space=source.space,
                         on_conflict="skip")
        calibration, bank = source.calibration, source.calibration_bank()
        if calibration and bank is not None:
            # A resumed copy may hold an earlier calibration of the source: the copy's records which one it is.
            copied = f"{calibration.get('bank_source') or 'a query bank'} (copied: calibration {calibration['id']})"
            if (dest.calibration or {}).get("bank_source") != copied:
                dest.calibrate(bank, alpha=calibration["alpha"], k=calibration["k"],
                               query_model=calibration["query_model"], space=source.space, source=copied)
        elif dest.calibration:
            dest.clear_calibration()  # the source's calibration was cleared since the copy began
        dest.compact()
        return dest.info()
    finally:
        dest.close()
