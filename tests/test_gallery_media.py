"""Media follow their items (issue 27, item 4): an upload's file under a gallery's media/ is copied into the
gallery the item moves to (export/import, a migration's backfill, a write during a migration), so that after
the source is deleted every item still has its image; files no item names (deleted items, refused uploads)
are removed at compact once past the grace period; a resumed copy takes the source's current calibration.
Before the fix, each of these tests failed: the copies' payloads pointed into the source's media/, nothing
removed an orphan, and a resumed copy kept the calibration it had."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gallery_support import make_images, save_tiny_openclip, unit_rows

from xbt.compat.maps import Projection
from xbt.compat.model import CompatibleModel
from xbt.gallery.base import copy_gallery, open_gallery
from xbt.gallery.media import PRUNE_GRACE_S
from xbt.gallery.migrating import MigratingRetriever
from xbt.gallery.migration import Migration
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace
from xbt.specs import load_model

SPACE = EmbeddingSpace("media-test", 8, "e" * 16)
QM = {"encoder_id": "enc-1", "spec": "model-1", "space_id": SPACE.id}


def _upload(gallery, item_id: str, image: Path, vector: np.ndarray) -> Path:
    stored = gallery.store_media(image.read_bytes(), "png")
    gallery.add(vector[None], [item_id], [{"image": str(stored), "note": item_id}], space=SPACE)
    return stored


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("target", ["embedded", "milvus"])
def test_an_exported_gallery_keeps_its_images_after_the_source_is_deleted(tmp_path, target):
    images = make_images(tmp_path / "photos", 3)
    vectors = unit_rows(3, 8, seed=0)
    with Gallery.create(tmp_path / "src", SPACE, modality="image") as source:
        for i, image in enumerate(images):
            _upload(source, f"u{i}", image, vectors[i])
        ref = str(tmp_path / "copy") if target == "embedded" else f"milvus:{tmp_path / 'm.db'}#copy"
        copy_gallery(source, ref)
    shutil.rmtree(tmp_path / "src")
    with open_gallery(ref) as copy:
        for item_id, entry in copy.get(copy.ids()).items():
            path = Path(entry["payload"]["image"])
            assert path.is_file(), f"{item_id} lost its image with the source"
            assert path.parent == Path(copy.media_dir)


def test_compact_removes_media_no_item_names_after_the_grace_period(tmp_path):
    images = make_images(tmp_path / "photos", 3)
    vectors = unit_rows(3, 8, seed=1)
    with Gallery.create(tmp_path / "g", SPACE, modality="image") as g:
        kept = _upload(g, "keep", images[0], vectors[0])
        deleted = _upload(g, "gone", images[1], vectors[1])
        g.delete(["gone"])
        refused = g.store_media(images[2].read_bytes(), "png")  # an upload whose add was then refused
        fresh_orphan = g.store_media(b"\x89PNG fresh", "png")
        for path in (kept, deleted, refused):
            _age(path, PRUNE_GRACE_S + 60)
        g.compact()
        assert kept.is_file() and not deleted.exists() and not refused.exists()
        assert fresh_orphan.is_file(), "a file younger than the grace period may belong to an add in flight"


def test_a_resumed_copy_takes_the_sources_current_calibration(tmp_path):
    vectors = unit_rows(20, 8, seed=2)
    bank = unit_rows(30, 8, seed=3)
    with Gallery.create(tmp_path / "src", SPACE, modality="image") as source:
        source.add(vectors, [f"i{n}" for n in range(20)], space=SPACE)
        source.calibrate(bank, alpha=0.5, k=3, query_model=QM, space=SPACE)
        copy_gallery(source, tmp_path / "copy")
        source.calibrate(bank, alpha=1.0, k=5, query_model=QM, space=SPACE)  # recalibrated after the copy
        copy_gallery(source, tmp_path / "copy")  # the resumed (here: repeated) copy
        with Gallery.open(tmp_path / "copy") as copy:
            assert (copy.calibration["alpha"], copy.calibration["k"]) == (1.0, 5)
        source.clear_calibration()
        copy_gallery(source, tmp_path / "copy")
        with Gallery.open(tmp_path / "copy") as copy:
            assert copy.calibration is None


def test_uploads_made_during_a_migration_keep_their_images_after_the_cut_over(tmp_path):
    root = tmp_path / "models"
    old_model = load_model(save_tiny_openclip(root / "old", seed=0))
    new_model = load_model(save_tiny_openclip(root / "new", seed=1))
    torch.manual_seed(0)
    compat = CompatibleModel(new_model, Projection(32, 32, "linear"), old_model.space)
    images = make_images(tmp_path / "photos", 3)
    old = Gallery.create(tmp_path / "old", old_model.space, modality="image")
    stored = old.store_media(images[0].read_bytes(), "png")  # uploaded before the migration
    old.add(old_model.encode_image([images[0]]), ["before"], [{"image": str(stored)}], space=old_model.space)
    migration = Migration.start(tmp_path / "mig", old, new_model.space)
    new = Gallery.open(migration.new_gallery_path)
    retriever = MigratingRetriever(migration, compat, new_model, old=old, new=new)
    during = retriever.store_media(images[1].read_bytes(), "png")  # uploaded during the migration
    retriever.add("image", ["during"], [images[1]], [{"image": str(during)}])
    migration.run(new_model, old=old, new=new)
    migration.cut_over(old=old, new=new)
    retriever.close()
    shutil.rmtree(tmp_path / "old")  # the old gallery is retired
    with Gallery.open(tmp_path / "mig" / "gallery") as g:
        for item_id, entry in g.get(["before", "during"]).items():
            assert Path(entry["payload"]["image"]).is_file(), f"{item_id} lost its image with the old gallery"
