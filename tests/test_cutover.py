"""The seams of a migration's cut-over (issue 27, items 1 and 5), on the embedded store and on Milvus Lite:

- an item added to or deleted from the old gallery after the last backfill run (directly, as `xbt gallery
  add --gallery OLD` / `xbt gallery delete` do, or an add whose second write was killed) makes the cut-over
  refuse until a run sweeps it: nothing is lost, nothing deleted comes back;
- the cut-over seals the old gallery: a later write to it is refused with a message that names the new one;
- one runner at a time: a second `run` or `cut_over` of the same migration is refused while one holds it;
- the old gallery's NNN calibration for the compatible model applies to the searches served during the
  migration (it was silently off before).

Before these fixes, each test here failed: the cut-over flipped its status on a stale "complete" (the late
item was lost, the deleted one came back), nothing sealed the old gallery, two runners ran at once, and the
migrating retriever searched the old gallery without naming its query model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gallery_support import make_images, save_tiny_openclip

from xbt.compat.maps import Projection
from xbt.compat.model import CompatibleModel
from xbt.errors import InputError
from xbt.gallery.base import copy_gallery, describe_query_model, open_gallery
from xbt.gallery.ingest import ingest, items_from_folder
from xbt.gallery.migrating import MigratingRetriever
from xbt.gallery.migration import Migration
from xbt.gallery.store import Gallery, GallerySealedError
from xbt.specs import load_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cutover_models")
    old = load_model(save_tiny_openclip(root / "old", seed=0))
    new = load_model(save_tiny_openclip(root / "new", seed=1))
    torch.manual_seed(0)
    return {"old": old, "new": new, "compat": CompatibleModel(new, Projection(32, 32, "linear"), old.space)}


@pytest.fixture(params=["embedded", "milvus"])
def old_gallery(request, tmp_path, models):
    make_images(tmp_path / "photos", 8)
    with Gallery.create(tmp_path / "old", models["old"].space, modality="image") as embedded:
        ingest(embedded, models["old"], items_from_folder(tmp_path / "photos"))
        if request.param == "embedded":
            yield embedded
            return
        copy_gallery(embedded, f"milvus:{tmp_path / 'm.db'}#photos")
    with open_gallery(f"milvus:{tmp_path / 'm.db'}#photos") as milvus:
        yield milvus


def _add_directly(gallery, model, tmp_path, item_id: str) -> None:
    image = make_images(tmp_path / item_id, 1, seed=hash(item_id) % 1000)[0]
    gallery.add(model.encode_image([image]), [item_id], [{"image": str(image)}], space=model.space)


def test_a_late_add_to_the_old_gallery_blocks_the_cut_over_until_a_run_sweeps_it(tmp_path, models, old_gallery):
    migration = Migration.start(tmp_path / "mig", old_gallery, models["new"].space)
    with open_gallery(migration.new_gallery_ref) as new:
        assert migration.run(models["new"], old=old_gallery, new=new)["status"] == "complete"
        _add_directly(old_gallery, models["old"], tmp_path, "late-1")  # after the last run: the status is stale
        with pytest.raises(InputError, match="changed after the last backfill run.*not in the new one"):
            migration.cut_over(old=old_gallery, new=new)
        assert not migration.cut_over_done and old_gallery.sealed is None  # unsealed: writes go on
        _add_directly(old_gallery, models["old"], tmp_path, "late-2")
        migration.run(models["new"], old=old_gallery, new=new)
        migration.cut_over(old=old_gallery, new=new)
        assert migration.cut_over_done
        assert {"late-1", "late-2"} <= set(new.ids()) and sorted(new.ids()) == sorted(old_gallery.ids())
        with pytest.raises(GallerySealedError, match="cut over to the new space"):
            _add_directly(old_gallery, models["old"], tmp_path, "too-late")
        with pytest.raises(GallerySealedError):
            old_gallery.delete([old_gallery.ids()[0]])


def test_a_late_delete_from_the_old_gallery_does_not_come_back(tmp_path, models, old_gallery):
    migration = Migration.start(tmp_path / "mig", old_gallery, models["new"].space)
    with open_gallery(migration.new_gallery_ref) as new:
        migration.run(models["new"], old=old_gallery, new=new)
        gone = old_gallery.ids()[2]
        old_gallery.delete([gone])
        with pytest.raises(InputError, match="no longer in the old one"):
            migration.cut_over(old=old_gallery, new=new)
        migration.run(models["new"], old=old_gallery, new=new)
        migration.cut_over(old=old_gallery, new=new)
        assert gone not in new.ids() and sorted(new.ids()) == sorted(old_gallery.ids())


def test_an_add_whose_second_write_was_killed_is_swept_before_the_cut_over(tmp_path, models):
    make_images(tmp_path / "photos", 6)
    old = Gallery.create(tmp_path / "old", models["old"].space, modality="image")
    ingest(old, models["old"], items_from_folder(tmp_path / "photos"))
    migration = Migration.start(tmp_path / "mig", old, models["new"].space)
    new = Gallery.open(migration.new_gallery_path)
    migration.run(models["new"], old=old, new=new)
    retriever = MigratingRetriever(migration, models["compat"], models["new"], old=old, new=new)
    upload = make_images(tmp_path / "upload", 1, seed=9)[0]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the two writes")

    new.add = killed  # the old gallery acknowledges, the new one never hears of it
    with pytest.raises(KeyboardInterrupt):
        retriever.add("image", ["upload-1"], [upload], [{"image": str(upload)}])
    del new.add
    assert old.present(["upload-1"]) and not new.present(["upload-1"])
    with pytest.raises(InputError, match="not in the new one"):
        migration.cut_over(old=old, new=new)
    migration.run(models["new"], old=old, new=new)
    migration.cut_over(old=old, new=new)
    assert new.present(["upload-1"])
    retriever.close()


def test_one_runner_at_a_time(tmp_path, models):
    make_images(tmp_path / "photos", 4)
    with Gallery.create(tmp_path / "old", models["old"].space, modality="image") as old:
        ingest(old, models["old"], items_from_folder(tmp_path / "photos"))
        migration = Migration.start(tmp_path / "mig", old, models["new"].space)
        other = Migration(tmp_path / "mig")  # a second process's view: its own lock descriptor
        with other._runner():
            with pytest.raises(InputError, match="another process is running the migration"):
                migration.run(models["new"], old=old)
            with pytest.raises(InputError, match="another process is running the migration"):
                migration.cut_over(force=True)
        assert migration.run(models["new"], old=old)["status"] == "complete"  # released with its holder


def test_a_cut_over_killed_after_sealing_is_recovered_by_the_next_run(tmp_path, models):
    make_images(tmp_path / "photos", 4)
    with Gallery.create(tmp_path / "old", models["old"].space, modality="image") as old:
        ingest(old, models["old"], items_from_folder(tmp_path / "photos"))
        migration = Migration.start(tmp_path / "mig", old, models["new"].space)
        migration.run(models["new"], old=old)
        old.seal(migration._seal_reason())  # what a cut-over killed right after its seal leaves
        migration.run(models["new"], old=old)
        assert old.sealed is None
        old.seal("sealed by someone else")  # a seal this migration did not make is left alone
        migration.run(models["new"], old=old)
        assert old.sealed == "sealed by someone else"


def test_the_old_gallerys_nnn_calibration_applies_during_the_migration(tmp_path, models):
    compat, new_model = models["compat"], models["new"]
    make_images(tmp_path / "photos", 12)
    old = Gallery.create(tmp_path / "old", models["old"].space, modality="image")
    ingest(old, models["old"], items_from_folder(tmp_path / "photos"))
    bank = compat.encode_text([f"query number {i} about colours" for i in range(40)]).numpy()
    old.calibrate(bank, alpha=1.0, k=3, query_model=describe_query_model(compat), space=compat.space)
    migration = Migration.start(tmp_path / "mig", old, new_model.space)
    retriever = MigratingRetriever(migration, compat, new_model, old=old, new=Gallery.open(migration.new_gallery_path))
    queries = ["a red picture", "blue and green", "a dark square", "something bright"]
    q = compat.encode_text(queries).numpy()
    calibrated = [[h.id for h in row] for row in old.search(q, 12, space=compat.space, query_model=compat.encoder_id)]
    plain = [[h.id for h in row] for row in old.search(q, 12, space=compat.space)]
    assert calibrated != plain, "the calibration does not change these rankings: the test would prove nothing"
    served = [[h.id for h in row] for row in retriever.search_texts(queries, 12)]
    assert served == calibrated
    assert retriever.info()["nnn"]["applies"] is True
    scores = np.array([h.score for h in retriever.search_texts(queries[:1], 12)[0]])
    assert np.all(np.diff(scores) <= 1e-6)
    retriever.close()
