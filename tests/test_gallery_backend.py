"""The one gallery base (`xbt.gallery.backend.GalleryBase`): both backends extend it, it implements the
`GalleryBackend` interface, neither backend imports the other's private names, and the checks written once
there refuse the same inputs, with the same messages, on the embedded store and on Milvus Lite."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
from gallery_support import unit_rows

from xbt.errors import InputError, SpaceMismatchError
from xbt.gallery.backend import GalleryBase, GallerySealedError
from xbt.gallery.base import GalleryBackend
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

SPACE = EmbeddingSpace("old", 8, "a" * 64)
TWIN = EmbeddingSpace("other", 8, "b" * 64)  # same dimension, other weights
GALLERY = Path(__file__).resolve().parents[1] / "src" / "xbt" / "gallery"
MODEL = {"encoder_id": "enc", "spec": "m", "space_id": SPACE.id}


def test_both_backends_extend_the_base_which_implements_the_interface():
    from xbt.gallery.milvus import MilvusGallery

    assert issubclass(Gallery, GalleryBase) and issubclass(MilvusGallery, GalleryBase)
    interface = {name for name in dir(GalleryBackend) if not name.startswith("_")} | set(GalleryBackend.__annotations__)
    missing = sorted(name for name in interface if not hasattr(GalleryBase, name)
                     and name not in inspect.get_annotations(GalleryBase))
    assert missing == [], f"GalleryBase lacks {missing} of GalleryBackend"
    for backend in (Gallery, MilvusGallery):
        assert not getattr(backend, "__abstractmethods__", None), backend


@pytest.mark.parametrize("module", ["store.py", "milvus.py", "backend.py", "store_db.py", "milvus_engine.py"])
def test_no_private_import_across_gallery_modules(module):
    tree = ast.parse((GALLERY / module).read_text())
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("xbt.") for alias in node.names if alias.name.startswith("_")]
    assert private == []
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    other = {"store.py": "xbt.gallery.milvus", "milvus.py": "xbt.gallery.store"}.get(module)
    assert other is None or not any(m == other or (m or "").startswith(other + "_") for m in imported)


def _open(kind: str, tmp_path: Path) -> GalleryBase:
    if kind == "embedded":
        return Gallery.create(tmp_path / "g", SPACE, modality="image")
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from xbt.gallery.milvus import MilvusGallery

    return MilvusGallery.create(f"milvus:{tmp_path / 'g.db'}#photos", SPACE, modality="image")


@pytest.mark.parametrize("kind", ["embedded", "milvus"])
def test_the_same_refusals_on_both_backends(tmp_path, kind):
    x = unit_rows(6, 8, 0)
    ids = [f"i{i}" for i in range(6)]
    with _open(kind, tmp_path) as g:
        refusals = [
            (lambda: g.add(x, ids, space=TWIN), SpaceMismatchError, None),
            (lambda: g.add(x[:, :4], ids, space=SPACE), InputError, r"shape \(n, 8\)"),
            (lambda: g.add(np.where(np.eye(6, 8) > 0, np.nan, x), ids, space=SPACE), InputError, "NaN"),
            (lambda: g.add(np.zeros((6, 8)), ids, space=SPACE), InputError, "zero vector"),
            (lambda: g.add(x, "i0", space=SPACE), InputError, "not one string"),
            (lambda: g.add(x, ["i0"] * 6, space=SPACE), InputError, "duplicates"),
            (lambda: g.add(x, ids[:5], space=SPACE), InputError, "6 vectors for 5 ids"),
            (lambda: g.add(x, ids, [{}] * 5, space=SPACE), InputError, "5 payloads for 6 ids"),
            (lambda: g.add(x, ids, ["text"] * 6, space=SPACE), InputError, "must be a JSON object"),
            (lambda: g.add(x, ids, space=SPACE, on_conflict="merge"), InputError, "on_conflict"),
            (lambda: g.search(x, 0, space=SPACE), InputError, "positive integer"),
            (lambda: g.search(x, 3, space=TWIN), SpaceMismatchError, None),
            (lambda: g.calibrate(x[:0], alpha=0.5, k=3, query_model=MODEL, space=SPACE), InputError, "empty"),
            (lambda: g.calibrate(x, alpha=-1, k=3, query_model=MODEL, space=SPACE), InputError, "alpha"),
            (lambda: g.calibrate(x, alpha=0.5, k=3, query_model={"spec": "m"}, space=SPACE), InputError, "encoder_id"),
        ]
        for call, error, match in refusals:
            with pytest.raises(error, match=match):
                call()
        assert len(g) == 0 and g.calibration is None
        assert g.add(x, ids, [{"n": i} for i in range(6)], space=SPACE) == ids
        with pytest.raises(InputError, match="already in the gallery"):
            g.add(x[:1], ids[:1], space=SPACE)
        assert g.add(x[:2], ids[:2], space=SPACE, on_conflict="skip") == []
        g.seal("cut over")
        with pytest.raises(GallerySealedError, match="takes no more writes: cut over"):
            g.delete(ids[:1])
        assert g.sealed == "cut over"
        g.unseal()
        assert g.sealed is None and g.delete(ids[:1] + ["never"]) == 1
        info = g.info()
        assert (info.size, info.space_id, info.modality, info.calibration) == (5, SPACE.id, "image", None)
