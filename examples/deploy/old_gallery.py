"""Reading an old xbt gallery's ids and vectors once, to load them into another database (the Qdrant and
faiss recipes). A gallery that already lives in your database needs none of this."""

from __future__ import annotations

import numpy as np


def read_gallery(ref: str) -> tuple[list[str], np.ndarray]:
    """(ids, (n, dim) float32 vectors) of an xbt gallery (a folder, or milvus:URI#NAME), in insertion order."""
    from xbt.gallery.base import open_gallery

    with open_gallery(ref) as gallery:
        ids = gallery.ids()
        rows = gallery.get(ids, with_vectors=True)
    return ids, np.stack([np.asarray(rows[i]["vector"], np.float32) for i in ids])
