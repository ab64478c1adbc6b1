"""Filling and querying a gallery with a model: item sources, batched ingestion, and `GalleryRetriever`
(a gallery plus the one model whose queries it answers, with the space guard checked up front)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xbt.data.images import ImageInput
from xbt.errors import InputError
from xbt.gallery.base import GalleryBackend, create_gallery, gallery_exists, is_milvus, open_gallery
from xbt.gallery.index import IndexConfig
from xbt.gallery.store import CONFLICT_HINT, Gallery, GalleryInfo, Hit, OnConflict, is_complete_gallery
from xbt.gallery.transform import transform_status
from xbt.models.base import VLPModel
from xbt.progress import progress_bar

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg"}
RESERVED_PAYLOAD_KEYS = ("image", "caption")  # what the item is; set by xbt, read by backfill


@dataclass(frozen=True)
class GalleryItem:
    """One item to embed: an image gallery embeds payload["image"] (a path), a caption gallery
    embeds payload["caption"]; any other payload fields travel along."""

    id: str
    payload: dict[str, Any]


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already stored (on_conflict="skip")
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, why): undecodable image, empty caption

    def to_dict(self) -> dict[str, Any]:
        return {"added": len(self.added), "skipped": len(self.skipped), "failed": [list(f) for f in self.failed]}


def model_name(model: VLPModel) -> str:
    return model.display_name


def describe_model(model: VLPModel) -> dict[str, Any]:
    """What a query model is, for `gallery info --model`, the service's /info and reports: an ensemble
    (SLERP) says that it loads and runs the old model on every query too."""
    needs_old = bool(getattr(model, "needs_old_model_at_query_time", False))
    described: dict[str, Any] = {"spec": model_name(model), "space_id": model.space.id,
                                 "method": getattr(model, "method", None), "needs_old_model_at_query_time": needs_old}
    old_model = getattr(model, "old_model", None)
    if needs_old and old_model is not None:
        described["old_model"] = model_name(old_model)
    maps = getattr(model, "describe_query_maps", None)
    if callable(maps):  # a compatible model: which map each query tower uses (one per tower, or one shared)
        described["query_maps"] = maps()
    return described


def check_model(gallery: Gallery, model: VLPModel) -> None:
    """The space guard: the model must emit vectors in the gallery's space (its own, or declared by a
    compatible model). Same dimension is not enough."""
    gallery.space.check(model.space, f"the vectors of model {model_name(model)!r}")


# ----- item sources -----------------------------------------------------------------------------------
def items_from_pairs(pairs: Sequence[Any], modality: str) -> list[GalleryItem]:
    """An image gallery (one item per image_id) or a caption gallery (one item per pair, id IMAGE_ID#N)."""
    if modality == "image":
        seen: dict[str, GalleryItem] = {}
        for p in pairs:
            if p.image_id not in seen:
                seen[p.image_id] = GalleryItem(p.image_id, {"image": p.image, "caption": p.caption})
        return list(seen.values())
    if modality == "text":
        counts: dict[str, int] = {}
        items = []
        for p in pairs:
            n = counts.get(p.image_id, 0)
            counts[p.image_id] = n + 1
            items.append(GalleryItem(f"{p.image_id}#{n}", {"caption": p.caption, "image_id": p.image_id, "image": p.image}))
        return items
    raise InputError(f"modality must be 'image' or 'text', not {modality!r}")


def items_from_folder(folder: Path) -> list[GalleryItem]:
    """Every image file under `folder` (recursively), id = its path relative to the folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [GalleryItem(p.relative_to(folder).as_posix(), {"image": str(p.resolve())}) for p in files]


def items_from_text_file(path: Path) -> list[GalleryItem]:
    """One caption per non-empty line, id = FILE_STEM:LINE."""
    items = [GalleryItem(f"{path.stem}:{n}", {"caption": line.strip()})
             for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not items:
        raise InputError(f"{path} holds no captions (one per line)")
    return items


def load_items(source: str | Path, modality: str, split: str | None = None) -> list[GalleryItem]:
    """Items from a plain folder of images, a .txt of captions (one per line), or any pair source that
    `xbt.data.datasets.open_dataset` reads (.jsonl/.csv, Karpathy JSON, captioned folder, shards, testbed:SPLIT)."""
    from xbt.data.datasets import FOLDER_METADATA, open_dataset

    path = Path(str(source)).expanduser()
    if path.is_dir() and not any((path / n).exists() for n in FOLDER_METADATA) and not any(path.glob("*.tar")):
        if modality != "image":
            raise InputError(f"{path} is a folder of images; a caption gallery needs a pairs file or a .txt of captions")
        return items_from_folder(path)
    if path.suffix == ".txt" and path.is_file():
        if modality != "text":
            raise InputError(f"{path} holds captions; use it for a caption gallery (modality text)")
        return items_from_text_file(path)
    return items_from_pairs(open_dataset(source, split), modality)


def item_source(item: GalleryItem, modality: str) -> str:
    key = "image" if modality == "image" else "caption"
    value = item.payload.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"item {item.id!r} has no {key!r} in its payload, so it cannot be embedded")
    return value


# ----- embedding --------------------------------------------------------------------------------------
def embed_items(model: VLPModel, items: Sequence[GalleryItem], modality: str,
                batch_size: int = 64) -> tuple[list[GalleryItem], np.ndarray, dict[str, str]]:
    """Embed items by their payload's image or caption: (the items embedded, their vectors, {id: why} for
    those without an input or whose input could not be embedded)."""
    sources, ok, failed = [], [], {}
    for it in items:
        try:
            sources.append(item_source(it, modality))
            ok.append(it)
        except InputError as exc:
            failed[it.id] = str(exc)
    if not ok:
        return [], np.zeros((0, model.embed_dim), np.float32), failed
    vectors, bad = embed_inputs(model, sources, modality, batch_size)
    failed.update({ok[i].id: why for i, why in bad.items()})
    return [it for i, it in enumerate(ok) if i not in bad], vectors, failed


def embed_inputs(
    model: VLPModel, inputs: Sequence[Any], modality: str, batch_size: int = 64
) -> tuple[np.ndarray, dict[int, str]]:
    """Embed images or captions; a bad input (undecodable image, empty caption) is reported by position
    instead of failing the batch. Returns (vectors of the good inputs, {position: why}). Images are decoded
    once, in the model's data-loader workers when it has any (`VLPModel.encode_image_items`)."""
    if modality == "image":
        vectors, failed = model.encode_image_items(list(inputs), batch_size=batch_size)
        return vectors.numpy(), failed

    def encode(xs: Sequence[Any]) -> Any:
        return model.encode_text(list(xs), batch_size=batch_size)

    try:
        return encode(inputs).numpy(), {}
    except InputError:
        pass
    vectors, failed = [], {}
    for i, x in enumerate(inputs):
        try:
            vectors.append(encode([x]).numpy())
        except InputError as exc:
            failed[i] = str(exc)
    out = np.concatenate(vectors) if vectors else np.empty((0, model.embed_dim), np.float32)
    return out, failed


def ingest(
    gallery: Gallery,
    model: VLPModel,
    items: Sequence[GalleryItem],
    *,
    batch_size: int = 64,
    on_conflict: OnConflict = "error",
    show_progress: bool = False,
) -> IngestReport:
    """Embed items with `model` and add them, batch by batch (each batch durable when added).

    The model must emit the gallery's space: the old model itself, or a compatible new model that
    declares it (ingesting new items into the old space without a backfill)."""
    check_model(gallery, model)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise InputError("the items contain duplicate ids; give each item one id")
    modality = gallery.modality
    if modality not in ("image", "text"):
        raise InputError(f"the gallery at {gallery.path} has no modality; create it with modality 'image' or 'text'")
    if on_conflict == "error":
        clash = gallery.present(ids)
        if clash:
            raise InputError(f"{len(clash)} item(s) already in the gallery (e.g. {sorted(clash)[0]!r}); use {CONFLICT_HINT}")
    report = IngestReport()
    with progress_bar(len(items), f"embedding {modality}s into {gallery.space.id}", show_progress) as advance:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            sources, ok = [], []
            for it in batch:
                try:
                    sources.append(item_source(it, modality))
                    ok.append(it)
                except InputError as exc:
                    report.failed.append((it.id, str(exc)))
            vectors, failed = embed_inputs(model, sources, modality, batch_size)
            good = [it for i, it in enumerate(ok) if i not in failed]
            report.failed += [(ok[i].id, why) for i, why in failed.items()]
            if good:
                added = gallery.add(vectors, [it.id for it in good], [it.payload for it in good],
                                    space=model.space, on_conflict=on_conflict)
                report.added += added
                report.skipped += [it.id for it in good if it.id not in set(added)]
            advance(len(batch))
    return report


# ----- `xbt gallery build`: a new gallery, or the resumption of an interrupted build ------------------------
def build_record(data: str, split: str | None, modality: str) -> dict[str, Any]:
    """What a gallery records about the build that made it: the source (absolute, when a path), split, modality."""
    source = Path(data).expanduser()
    return {"data": str(source.resolve()) if source.exists() else data, "split": split, "modality": modality}


def built_from(gallery: GalleryBackend, source: str, split: str | None) -> bool:
    """Whether `gallery` was built (`build_gallery`) from these very pairs: a bank of queries made from them
    would calibrate the gallery on the queries it will be searched with."""
    built = gallery.extra.get("build") or {}
    return (isinstance(built, dict) and built.get("data") in (source, str(Path(source).expanduser().resolve()))
            and built.get("split") == split)


def build_gallery(ref: str, model: VLPModel, items: Sequence[GalleryItem], record: Mapping[str, Any], *,
                  index: IndexConfig | None = None, batch_size: int = 64, show_progress: bool = False,
                  log: Callable[[str], None] | None = None, label: str | None = None) -> tuple[IngestReport, GalleryInfo]:
    """Embed `items` with `model` into a new gallery at `ref`, stamped with its space and the build `record`
    (`build_record`). Resumable: where `ref` holds an earlier, interrupted run of this very build (same record,
    same space) the items already stored are kept and skipped, the rest added; a gallery made otherwise is
    refused, since a build never adds to someone else's gallery. Compacts the index at the end. `label`: how
    messages name the gallery (default `ref`)."""
    label = label or ref
    stored: set[str] = set()
    if gallery_exists(ref) if is_milvus(ref) else is_complete_gallery(ref):
        gallery = open_gallery(ref, index)
        try:
            stored = _resumable(gallery, label, model, record, [it.id for it in items])
        except BaseException:
            gallery.close()
            raise
        if stored and log is not None:
            log(f"resuming the build of {label}: {len(stored)} of {len(items)} items already stored")
    else:
        gallery = create_gallery(ref, model.space, index, str(record["modality"]), extra={"build": dict(record)})
    with gallery:
        report = ingest(gallery, model, [it for it in items if it.id not in stored], batch_size=batch_size,
                        on_conflict="skip", show_progress=show_progress)
        report.skipped += sorted(stored)
        gallery.compact()
        return report, gallery.info()


def _resumable(gallery: GalleryBackend, label: str, model: VLPModel, record: Mapping[str, Any], ids: list[str]) -> set[str]:
    """The ids already stored, if `gallery` is an earlier, interrupted run of this very build; otherwise refuse."""
    gallery.space.check(model.space, f"the gallery at {label} (an earlier build with another model?)")
    recorded = gallery.extra.get("build")
    if recorded != record:
        made = f" (built from {recorded['data']})" if isinstance(recorded, dict) and "data" in recorded else ""
        raise InputError(f"{label} already holds a gallery{made}; add items to it with `xbt gallery add --on-conflict skip`,"
                         " or choose another --out")
    return gallery.present(ids)


# ----- serving ------------------------------------------------------------------------------------------
class GalleryRetriever:
    """A gallery and the model that queries and feeds it. The space guard runs once, at construction:
    a model of any other space is refused before anything is served."""

    def __init__(self, gallery: Gallery, model: VLPModel):
        check_model(gallery, model)
        self.gallery, self.model = gallery, model
        self._model_lock = threading.Lock()

    def _encode(self, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        with self._model_lock:
            if modality == "image":
                return self.model.encode_image(list(inputs)).numpy()
            return self.model.encode_text(list(inputs)).numpy()

    def search_texts(self, texts: Sequence[str], k: int) -> list[list[Hit]]:
        return self.gallery.search(self._encode("text", texts), k, space=self.model.space)

    def search_images(self, images: Sequence[ImageInput], k: int) -> list[list[Hit]]:
        return self.gallery.search(self._encode("image", images), k, space=self.model.space)

    def _check_modality(self, modality: str) -> None:
        if self.gallery.modality and self.gallery.modality != modality:
            raise InputError(f"this gallery holds {self.gallery.modality}s; it cannot store a {modality}")

    def add(self, modality: str, ids: Sequence[str], inputs: Sequence[Any],
            payloads: Sequence[Mapping[str, Any]], on_conflict: OnConflict = "error") -> list[str]:
        """Embed captions (modality text) or images (PIL) and store them with their payloads, which
        must already name their source (payload["caption"] or payload["image"])."""
        self._check_modality(modality)
        return self.gallery.add(self._encode(modality, inputs), ids, payloads, space=self.model.space,
                                on_conflict=on_conflict)

    def delete(self, ids: Sequence[str]) -> int:
        return self.gallery.delete(ids)

    def store_media(self, data: bytes, suffix: str) -> Path:
        return self.gallery.store_media(data, suffix)

    def close(self) -> None:
        self.gallery.close()

    def info(self) -> dict[str, Any]:
        info = {"gallery": self.gallery.info().to_dict(), "model": model_name(self.model),
                "query_model": describe_model(self.model), "mode": "single"}
        transformed = transform_status(self.gallery)  # a transformed gallery: how many rows are not native yet
        return info if transformed is None else {**info, "transform": transformed}
