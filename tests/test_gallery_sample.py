"""Fit data from the gallery itself (issue 24, item 3): `xbt fit ... --from-gallery G --sample N` re-embeds N
gallery items with the new model beside their stored old vectors (no labels, no captions), fits on them, and
keeps the new vectors so a backfill loads them (`--preload`) instead of encoding them again."""

from __future__ import annotations

import numpy as np
import pytest
from gallery_support import make_images, save_tiny_openclip
from typer.testing import CliRunner

from xbt.cli import app
from xbt.errors import InputError
from xbt.gallery.ingest import GalleryItem, ingest
from xbt.gallery.store import Gallery
from xbt.scale.sample import sample_gallery
from xbt.scale.vectors import Manifest, read_vectors
from xbt.specs import load_model

N = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    old_spec = save_tiny_openclip(root / "old", seed=0)
    new_spec = save_tiny_openclip(root / "new", seed=1, embed_dim=48, width=48)
    images = make_images(root / "images", N)
    old = load_model(old_spec)
    with Gallery.create(root / "gallery", old.space, modality="image") as g:
        ingest(g, old, [GalleryItem(p.stem, {"image": str(p)}) for p in images])
    return {"root": root, "old": old_spec, "new": new_spec, "gallery": root / "gallery"}


def test_a_sample_pairs_stored_old_vectors_with_the_new_models_vectors_of_the_same_items(setup, xbt_home):
    new = load_model(setup["new"])
    with Gallery.open(setup["gallery"]) as g:
        sample = sample_gallery(g, new, 5, seed=3)
        again = sample_gallery(g, new, 5, seed=3)
        stored = g.get(sample.ids, with_vectors=True)
        with pytest.raises(InputError, match="gallery's own model"):
            sample_gallery(g, load_model(setup["old"]), 5)
    assert len(sample.ids) == 5 and sample.ids == again.ids and sample.modality == "image"
    np.testing.assert_allclose(sample.old, np.stack([stored[i]["vector"] for i in sample.ids]))
    native = new.encode_image([stored[i]["payload"]["image"] for i in sample.ids]).numpy()
    np.testing.assert_allclose(sample.new, native, atol=1e-5)
    data = sample.fit_data()
    assert data.new_image.shape == (5, 48) and data.old_image.shape == (5, 32) and len(data.new_text) == 0


def test_fit_from_gallery_then_a_backfill_preloads_the_kept_vectors(setup, tmp_path, xbt_home):
    runner = CliRunner()
    out, kept = tmp_path / "model", tmp_path / "kept"
    fit = runner.invoke(app, ["fit", "procrustes-image", "--old", setup["old"], "--new", setup["new"], "--out", str(out),
                              "--from-gallery", str(setup["gallery"]), "--sample", "8", "--keep", str(kept)])
    assert fit.exit_code == 0, fit.output
    assert "sampled 8 images" in fit.output and (out / "compat_config.json").exists()
    assert Manifest.read(kept).items == 8
    ids, vectors, _payloads, space = read_vectors(kept)
    backfill = runner.invoke(app, ["gallery", "backfill", "--state", str(tmp_path / "migration"), "--gallery",
                                   str(setup["gallery"]), "--model", setup["new"], "--preload", str(kept)])
    assert backfill.exit_code == 0, backfill.output
    assert "preloaded 8 vectors" in backfill.output
    from xbt.gallery.migration import Migration

    migration = Migration(tmp_path / "migration")
    with Gallery.open(migration.new_gallery_path) as new_gallery:
        assert len(new_gallery) == N and new_gallery.space == space
        rows = new_gallery.get(ids, with_vectors=True)
    np.testing.assert_allclose(np.stack([rows[i]["vector"] for i in ids]), vectors, atol=1e-6)
    wrong = runner.invoke(app, ["fit", "procrustes-image", "--old", setup["new"], "--new", setup["old"], "--out",
                                str(tmp_path / "m2"), "--from-gallery", str(setup["gallery"])])
    assert wrong.exit_code == 1 and "give --old the model that built it" in " ".join(wrong.output.split())


def test_keep_without_a_gallery_sample_is_refused(setup, tmp_path, xbt_home):
    result = CliRunner().invoke(app, ["fit", "procrustes-image", "--old", setup["old"], "--new", setup["new"], "--out",
                                      str(tmp_path / "m"), "--keep", str(tmp_path / "kept")])
    assert result.exit_code == 1 and "give --from-gallery" in " ".join(result.output.split())
    assert not (tmp_path / "m").exists()
