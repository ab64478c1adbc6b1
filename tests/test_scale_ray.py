"""The Ray engine on a local Ray: the same vectors as the local engine, resumption at shard granularity,
and a gallery backfill whose embedding runs on Ray actors. One Ray session for the module (starting Ray
costs seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from gallery_support import make_images, save_tiny_openclip

from xbt.gallery.ingest import GalleryItem, ingest, items_from_folder
from xbt.gallery.store import Gallery
from xbt.specs import load_model
from xbt.scale.ray_embed import RayOptions, embed_items
from xbt.scale.vectors import Manifest, read_vectors

# Each test starts Ray (about 10 s here) and the first runs a whole job on it: minutes on 2 shared cores.
pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    # Two CPUs, as on the smallest machine this runs on; one actor with one CPU leaves the other to Ray
    # Data's own scheduling (a pool as large as the machine starves it and the job hangs).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield RayOptions(actors=1, cpus_per_actor=1.0, threads=1)
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_ray")
    spec_a = save_tiny_openclip(root / "model_a", seed=0)
    spec_b = save_tiny_openclip(root / "model_b", seed=1, embed_dim=48, width=48)
    images = make_images(root / "images", 10)
    return {"a": spec_a, "b": spec_b, "images": images}


def _items(images):
    items = [GalleryItem(p.stem, {"image": str(p)}) for p in images]
    return items + [GalleryItem("missing", {"image": str(images[0].parent / "nope.png")})]


def test_ray_engine_writes_the_same_vectors_as_the_local_engine_and_resumes(ray_session, tiny, tmp_path, xbt_home):
    items = _items(tiny["images"])
    local = embed_items(tiny["a"], items, tmp_path / "local", "image", shard_size=4)
    on_ray = embed_items(tiny["a"], items, tmp_path / "ray", "image", engine="ray", shard_size=4, ray_options=ray_session)
    assert on_ray.engine == "ray" and len(on_ray.written) == 3 and on_ray.space == local.space
    assert on_ray.failed.keys() == local.failed.keys() == {"missing"}
    ids_l, vec_l, pay_l, space_l = read_vectors(tmp_path / "local")
    ids_r, vec_r, pay_r, space_r = read_vectors(tmp_path / "ray")
    assert ids_r == ids_l and pay_r == pay_l and space_r == space_l
    np.testing.assert_allclose(vec_r, vec_l, atol=1e-5, rtol=1e-5)
    assert [s["name"] for s in Manifest.read(tmp_path / "ray").shards] == [s["name"] for s in Manifest.read(tmp_path / "local").shards]

    # Resume: delete one shard; only that shard is embedded again.
    names = [s["name"] for s in Manifest.read(tmp_path / "ray").shards]
    (tmp_path / "ray" / names[2]).unlink()
    again = embed_items(tiny["a"], items, tmp_path / "ray", "image", engine="ray", shard_size=4, ray_options=ray_session)
    assert again.written == [names[2]] and sorted(again.skipped) == sorted(names[:2])
    np.testing.assert_allclose(read_vectors(tmp_path / "ray")[1], vec_l, atol=1e-5, rtol=1e-5)


def test_cli_backfill_on_ray_fills_the_new_gallery_in_priority_order(ray_session, tiny, tmp_path, xbt_home):
    import json

    from typer.testing import CliRunner

    from xbt.cli import app
    from xbt.gallery.migration import Migration

    old_model, new_model = load_model(tiny["a"]), load_model(tiny["b"])
    with Gallery.create(tmp_path / "old", old_model.space, modality="image") as old:
        ingest(old, old_model, items_from_folder(tiny["images"][0].parent))
    # The Ray session of this module is joined, not restarted.
    result = CliRunner().invoke(app, ["gallery", "backfill", "--state", str(tmp_path / "mig"), "--model", tiny["b"],
                                      "--gallery", str(tmp_path / "old"), "--order", "newest", "--engine", "ray",
                                      "--shard-size", "3", "--actors", "1"])
    assert result.exit_code == 0, result.output
    progress = json.loads(result.stdout)
    assert progress["status"] == "complete" and progress["new_size"] == 10 and progress["position"] == 10
    migration = Migration(tmp_path / "mig")
    with Gallery.open(migration.new_gallery_path) as new:
        got = new.get(new.ids(), with_vectors=True)
    ids = sorted(got)
    expected = new_model.encode_image([got[i]["payload"]["image"] for i in ids]).numpy()
    np.testing.assert_allclose(np.stack([got[i]["vector"] for i in ids]), expected, atol=1e-5)
    manifest = Manifest.read(migration.path / "vectors")
    assert manifest.items == 10 and len(manifest.shards) == 4
    assert ray.is_initialized()
