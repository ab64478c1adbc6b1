"""Thumbnails of gallery items, served without ever opening a path a client chose.

A request names an item by id only. The image path comes from that item's stored payload (which the
service's own clients cannot set: "image" is a reserved key) and is served only if its real location,
with every symlink resolved, lies inside an allowed root: the media folder of a served gallery (uploads
it stored itself) or a folder the operator named at start-up (`xbt serve --media-root`). The file is
opened without following a final symlink, must be a regular file of bounded size, and is decoded as a
raster image (no SVG: a vector file can reference other files) and re-encoded as a small thumbnail, so
the bytes sent are always a fresh PNG or JPEG, never the stored file itself.

Memory: thumbnails come in a few fixed sizes (a request snaps to one), so a client cannot make the server
decode one image again for every size it names; a JPEG is decoded at a reduced scale (PIL's draft mode)
when the thumbnail is much smaller than the image; and each decode holds one of the service's decode slots.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from xbt.errors import InputError
from xbt.serve.decode_slots import DecodeSlots

RASTER_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
MAX_SOURCE_BYTES = 64 << 20
# 16 MP: a 12 MP phone photo or a 4096 x 4096 picture passes; decoded it is at most 64 MB (RGBA).
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000
THUMBNAIL_SIZES = (64, 128, 256, 512)


def thumbnail_size(requested: int) -> int:
    """The fixed size a request snaps to: the smallest at least as large as asked for (else the largest)."""
    return next((s for s in THUMBNAIL_SIZES if s >= requested), THUMBNAIL_SIZES[-1])


class NoThumbnail(InputError):
    """The item has no image that this service may show (unknown id, no image, or outside every root)."""


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str


def resolve_roots(roots: Iterable[str | Path]) -> list[Path]:
    """The operator's --media-root folders, resolved once at start-up; each must be an existing folder."""
    out = []
    for root in roots:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise InputError(f"--media-root {root} is not a folder; name a folder that holds the gallery's images")
        out.append(path.resolve(strict=True))
    return out


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def allowed_path(raw: Any, roots: Sequence[Path]) -> Path | None:
    """The real path of a payload's image if it may be shown, else None (never raises on odd input)."""
    if not isinstance(raw, str) or not raw or "\x00" in raw or len(raw) > 4096:
        return None
    try:
        real = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, unencodable
        return None
    ok = _inside(real, roots) and real.suffix.lower() in RASTER_SUFFIXES and real.is_file()
    return real if ok else None


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes, refusing a final symlink (swapped in after the check), non-regular files and huge ones."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SOURCE_BYTES:
            raise NoThumbnail("the item's image is not a regular file of a readable size")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_SOURCE_BYTES + 1)
    finally:
        os.close(fd)


def open_raster(data: bytes, max_pixels: int, error: type[InputError], what: str,
                draft: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """A decoded PIL image and its lower-case format from bytes: raster formats only, the pixel count checked
    before decoding; anything else raises `error` (a 4xx for the service), never a decoder's own exception.
    `draft`: the caller needs no more than this size, so a JPEG may be decoded at a reduced scale (at least
    this large); other formats decode in full."""
    if not data:
        raise error(f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = (img.format or "").upper()
        if fmt not in RASTER_FORMATS:
            raise error(f"{what} must be a {', '.join(sorted(RASTER_FORMATS))} image, not {fmt or 'unknown'}")
        if img.width * img.height > max_pixels:
            raise error(f"{what} is {img.width}x{img.height}; at most {max_pixels} pixels are accepted")
        if draft is not None and fmt == "JPEG":
            img.draft("RGB" if img.mode == "RGB" else None, draft)
        img.load()
    except error:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise error(f"{what} is not a readable image: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise assorted errors on hostile input
        raise error(f"{what} is not a readable image ({type(exc).__name__})") from exc
    return img, fmt.lower()


def make_thumbnail(data: bytes, size: int, max_pixels: int) -> Thumbnail:
    """A PNG (images with transparency) or JPEG of at most size x size pixels, from raster bytes."""
    img, _ = open_raster(data, max_pixels, NoThumbnail, "the item's image", draft=(size, size))
    img.thumbnail((size, size))
    alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    img = img.convert("RGBA" if alpha else "RGB")
    buf = io.BytesIO()
    if alpha:
        img.save(buf, format="PNG")
        return Thumbnail(buf.getvalue(), "image/png")
    img.save(buf, format="JPEG", quality=85)
    return Thumbnail(buf.getvalue(), "image/jpeg")


class ThumbnailStore:
    """Finds an item's image in the served galleries, checks it against the roots, and caches thumbnails
    (keyed by real path, fixed size and modification time, so a replaced file is seen). Decodes take a slot
    of `slots` (shared with the service's uploads)."""

    def __init__(self, galleries: Sequence[Any], media_roots: Sequence[Path], max_pixels: int, cache_items: int = 512,
                 slots: DecodeSlots | None = None):
        self.galleries = list(galleries)
        self.media_roots = list(media_roots)
        self.max_pixels = max_pixels
        self.slots = slots or DecodeSlots(4)
        self._cache: OrderedDict[tuple[str, int, int, int], Thumbnail] = OrderedDict()
        self._cache_items = cache_items
        self._lock = threading.Lock()

    def roots(self) -> list[Path]:
        """Every gallery's media folder (resolved now: it may be created after start-up) and the operator's
        roots. A gallery on a Milvus server has no media folder (uploads to it are refused): none of its own."""
        found = []
        for g in self.galleries:
            try:
                found.append(Path(g.media_dir).resolve())
            except InputError:
                continue
        return found + self.media_roots

    def image_paths(self, payloads: Sequence[dict[str, Any]]) -> list[Path | None]:
        """For search results: which payloads name an image this service may show."""
        roots = self.roots()
        return [allowed_path(p.get("image"), roots) for p in payloads]

    def _payload(self, item_id: str) -> dict[str, Any] | None:
        for gallery in self.galleries:
            found = gallery.get([item_id]).get(item_id)
            if found is not None:
                return found["payload"]
        return None

    def thumbnail(self, item_id: str, size: int) -> Thumbnail:
        """The item's thumbnail at the fixed size `size` snaps to (`thumbnail_size`)."""
        size = thumbnail_size(size)
        payload = self._payload(item_id)
        if payload is None:
            raise NoThumbnail(f"no item {item_id!r} in this gallery")
        path = allowed_path(payload.get("image"), self.roots())
        if path is None:
            raise NoThumbnail(f"item {item_id!r} has no image this service may show (see xbt serve --media-root)")
        try:
            info = path.stat()
            key = (str(path), size, info.st_mtime_ns, info.st_size)
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            with self.slots.slot():
                thumb = make_thumbnail(_read_regular_file(path), size, self.max_pixels)
        except OSError as exc:
            raise NoThumbnail(f"the image of item {item_id!r} cannot be read ({exc.strerror or type(exc).__name__})") from exc
        with self._lock:
            self._cache[key] = thumb
            while len(self._cache) > self._cache_items:
                self._cache.popitem(last=False)
        return thumb


def covering_folders(files: Iterable[str | Path], min_depth: int = 3) -> list[Path]:
    """A few folders that together hold every file (by real path): what `xbt serve --media-root` must name
    for a gallery whose images live outside its media/ folder. Files under one folder at least `min_depth`
    levels below / share it; a common folder shallower than that (such as / for /usr/share/... and
    /home/...) is split by its next level instead, so no root opens more of the machine than it must."""
    folders = sorted({Path(f).expanduser().resolve().parent for f in files if f})

    def cover(group: list[Path]) -> list[Path]:
        common = Path(os.path.commonpath(group))
        if len(common.parts) - 1 >= min_depth or common in group:
            return [common]
        by_next: dict[tuple[str, ...], list[Path]] = {}
        for folder in group:
            by_next.setdefault(folder.parts[: len(common.parts) + 1], []).append(folder)
        return [root for part in by_next.values() for root in cover(part)]

    return cover(folders) if folders else []
