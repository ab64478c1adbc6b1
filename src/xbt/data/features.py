"""A content-addressed feature cache: encode each item once per encoder, keep it across runs and crashes.

Layout: XBT_HOME/features/<encoder cache id>/shard-*.npz, each shard holding `keys` (content hashes)
and `vectors`. Shards are written atomically after every chunk, so an interrupted job keeps what it
finished and resumes with the rest.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from xbt.paths import cache_dir


def text_key(text: str) -> str:
    return hashlib.sha256(("text\0" + text).encode()).hexdigest()


def file_key(path: str | Path) -> str:
    digest = hashlib.sha256(b"file\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, encoder_id: str, root: Path | None = None):
        self.dir = (root or cache_dir("features")) / encoder_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            with np.load(shard) as data:
                for key, vec in zip(data["keys"], data["vectors"]):
                    self._index[str(key)] = vec

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _write_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        final = self.dir / f"shard-{uuid.uuid4().hex}.npz"
        tmp = final.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys), vectors=vectors.astype(np.float32))
        os.replace(tmp, final)

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
