"""A content-addressed feature cache: encode each item once per encoder, keep it across runs and crashes.

Layout: XBT_HOME/features/<encoder cache id>/shard-*.npz, each shard holding `keys` (content hashes)
and `vectors`. A shard is written after every chunk, so an interrupted job keeps what it finished and
resumes with the rest: to a temporary file `.tmp-<hex>` (a name the shard glob never matches), fsynced,
renamed into place, and the folder fsynced; a reader sees a whole shard or none. A shard that cannot be
read all the same (a disk fault, a copy cut short, a crash of an older xbt) is moved to `quarantine/`
with a warning when the cache is opened: its items are computed again, and the cache keeps working.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from xbt.durable import fsync_path
from xbt.paths import cache_dir


def text_key(text: str) -> str:
    return hashlib.sha256(("text\0" + text).encode()).hexdigest()


def file_key(path: str | Path) -> str:
    digest = hashlib.sha256(b"file\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def device_cache_tag(device) -> str:
    """What a feature cache key adds for vectors made on `device` (a torch.device): nothing on the CPU (so
    caches made before devices were told apart stay valid); on a GPU its kind and whether TF32 matmuls /
    convolutions were allowed, since fp32 vectors made there differ from the CPU's beyond float rounding."""
    if device.type == "cpu":
        return ""
    import torch

    if device.type != "cuda":
        return f"-{device.type}"
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return "-cuda-tf32" if tf32 else "-cuda"


SHARD_GLOB = "shard-*.npz"
TMP_PREFIX = ".tmp-"
QUARANTINE = "quarantine"
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that died: removed at open


def _read_shard(shard: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, vectors) of a shard; ValueError if it is not a whole, well-formed one. An OSError (the file
    could not be read now: too many open files, an I/O error, a permission) is raised as it is: it says
    nothing about the shard's content, so the shard is not quarantined for it."""
    try:
        with np.load(shard, allow_pickle=False) as data:
            keys, vectors = data["keys"], data["vectors"]
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib and numpy errors alike: a damaged file
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors) or vectors.dtype != np.float32:
        raise ValueError(f"keys {keys.shape} and vectors {vectors.shape} {vectors.dtype} do not make a shard")
    return keys, vectors


class FeatureCache:
    def __init__(self, encoder_id: str, root: Path | None = None):
        self.dir = (root or cache_dir("features")) / encoder_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, np.ndarray] = {}
        self.quarantined: list[Path] = []
        self.unreadable: list[Path] = []  # shards an OSError kept from being read (left in place)
        for shard in sorted(self.dir.glob(SHARD_GLOB)):
            if shard.name.endswith(".tmp.npz"):  # an older xbt's temporary name: never a finished shard
                self._quarantine(shard, "an unfinished temporary file")
                continue
            try:
                keys, vectors = _read_shard(shard)
            except ValueError as exc:
                self._quarantine(shard, str(exc))
                continue
            except FileNotFoundError:
                continue  # another process opening the cache quarantined it meanwhile
            except OSError as exc:  # not the shard's fault: keep it, compute its items this time, say so
                self.unreadable.append(shard)
                warnings.warn(f"feature cache {self.dir}: could not read shard {shard.name} now ({exc}); it is kept,"
                              " and its items are computed again in this run", stacklevel=2)
                continue
            for key, vec in zip(keys, vectors):
                self._index[str(key)] = vec
        now = time.time()
        for tmp in self.dir.glob(TMP_PREFIX + "*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass  # another process finished or removed it

    def _quarantine(self, shard: Path, why: str) -> None:
        target = self.dir / QUARANTINE / shard.name
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(shard, target)
        except FileNotFoundError:
            return  # another process opening the cache moved it first
        self.quarantined.append(target)
        warnings.warn(f"feature cache {self.dir}: unreadable shard {shard.name} ({why}) moved to {target};"
                      " its items will be computed again", stacklevel=3)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _write_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        """Whole or not at all: a temporary file outside the shard glob, fsynced, renamed, folder fsynced."""
        name = uuid.uuid4().hex
        tmp, final = self.dir / f"{TMP_PREFIX}{name}", self.dir / f"shard-{name}.npz"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.array(keys), vectors=vectors.astype(np.float32))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(self.dir)

    def get_or_compute(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], np.ndarray],
        chunk_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Vectors for `keys` in order; `compute(indices)` encodes the items not cached yet."""
        missing, seen = [], set()
        for i, key in enumerate(keys):
            if key not in self._index and key not in seen:
                missing.append(i)
                seen.add(key)
        if progress:
            progress(len(keys) - len(missing))
        for start in range(0, len(missing), chunk_size):
            chunk = missing[start : start + chunk_size]
            vectors = np.asarray(compute(chunk), dtype=np.float32)
            if vectors.shape[0] != len(chunk):
                raise RuntimeError(f"encoder returned {vectors.shape[0]} vectors for {len(chunk)} items")
            chunk_keys = [keys[i] for i in chunk]
            self._write_shard(chunk_keys, vectors)
            self._index.update(zip(chunk_keys, vectors))
            if progress:
                progress(len(chunk))
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._index[k] for k in keys])


def cached_features(
    encoder_id: str,
    encode: Callable[[list[str]], np.ndarray],
    items: Sequence[str],
    modality: str,
    chunk_size: int = 256,
    label: str = "features",
    show_progress: bool = True,
) -> np.ndarray:
    """`encode(items) -> (n, d)` applied once per distinct content (an image file's bytes, a text's
    characters), cached under `encoder_id`; a chunk is durable as soon as it is computed."""
    from xbt.progress import progress_bar

    key = file_key if modality == "image" else text_key
    keys = [key(item) for item in items]
    with progress_bar(len(items), label, show_progress) as advance:
        return FeatureCache(encoder_id).get_or_compute(keys, lambda idx: encode([items[i] for i in idx]), chunk_size, advance)


def cached_image_features(encoder_id: str, encode: Callable[[list[str]], np.ndarray], images: Sequence[str],
                          label: str = "image features", show_progress: bool = True) -> np.ndarray:
    return cached_features(encoder_id, encode, images, "image", label=label, show_progress=show_progress)


def cached_text_features(encoder_id: str, encode: Callable[[list[str]], np.ndarray], texts: Sequence[str],
                         label: str = "text features", show_progress: bool = True) -> np.ndarray:
    return cached_features(encoder_id, encode, texts, "text", chunk_size=512, label=label, show_progress=show_progress)
