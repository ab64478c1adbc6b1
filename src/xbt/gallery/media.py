"""Media that follow their items. A gallery keeps the bytes it was handed (uploads) under its own media/
folder, named by content (`store_media`), and an item's payload names that file by path. When items move
to another gallery (an export or import with `copy_gallery`, a migration's backfill, a write during a
migration), the files they name under the source's media/ are copied under the destination's media/ and
their payloads rewritten to point there, so deleting the source later loses no image. Files no item names
any more (deleted items, refused uploads) are removed by `prune_media` (run by a gallery's `compact`),
once older than a grace period: an upload's file is written before the item that names it is added.

Only the payload field `image` names media (what the service's upload and `xbt gallery add` write)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from xbt.durable import fsync_path
from xbt.errors import InputError

MEDIA_FIELD = "image"
#: A media file younger than this is never pruned: its item may be on its way (the upload writes first).
PRUNE_GRACE_S = 3600.0


def _media_dir(gallery: Any) -> Path | None:
    try:
        return Path(gallery.media_dir)
    except InputError:  # a Milvus server keeps no media folder (its media_dir refuses): nothing to follow
        return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().parent == folder.resolve()
    except OSError:
        return False


def adopt_media(payloads: Iterable[Mapping[str, Any] | None], source: Any, dest: Any) -> list[dict[str, Any] | None]:
    """The payloads as `dest` should store them: each file named under `source`'s media/ copied under
    `dest`'s media/ (same content name; written then renamed, fsynced) and the payload pointing at the copy.
    Payloads naming anything else are returned unchanged."""
    src_dir, dst_dir = _media_dir(source), _media_dir(dest)
    out: list[dict[str, Any] | None] = []
    for payload in payloads:
        named = (payload or {}).get(MEDIA_FIELD)
        if (payload is None or not isinstance(named, str) or src_dir is None or dst_dir is None
                or src_dir.resolve() == dst_dir.resolve() or not _inside(Path(named), src_dir)):
            out.append(dict(payload) if payload is not None else None)
            continue
        copy = dst_dir / Path(named).name
        if not copy.exists() and Path(named).exists():
            dst_dir.mkdir(parents=True, exist_ok=True)
            tmp = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
            shutil.copyfile(named, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, copy)
            fsync_path(dst_dir)
        out.append({**payload, MEDIA_FIELD: str(copy)})
    return out


def prune_media(gallery: Any, grace_s: float = PRUNE_GRACE_S) -> list[str]:
    """Remove the files under the gallery's media/ that no item names and that are older than `grace_s`;
    returns their names."""
    folder = _media_dir(gallery)
    if folder is None or not folder.is_dir():
        return []
    named = set()
    for _, payload, _ in gallery.iter_items():
        value = (payload or {}).get(MEDIA_FIELD)
        if isinstance(value, str):
            named.add(Path(value).name)
    cutoff = time.time() - grace_s
    removed = []
    for file in folder.iterdir():
        if file.is_file() and not file.name.startswith(".") and file.name not in named and file.stat().st_mtime < cutoff:
            file.unlink(missing_ok=True)
            removed.append(file.name)
    return sorted(removed)
