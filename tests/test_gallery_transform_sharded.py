"""The gallery transform as a sharded job (issue 26, part 1: "for galleries that outgrow one machine it runs
as a Ray job over shards of the collection"): the same rows as the one-process transform, resumable at
shard granularity, the closing sweep follows the source's adds and deletes, and Milvus Lite is refused on
Ray. The Ray engine itself runs on a local Ray (slow: starting Ray costs seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from gallery_support import unit_rows

from xbt.compat.maps import LinearMap
from xbt.errors import InputError
from xbt.gallery.index import IndexConfig
from xbt.gallery.store import Gallery
from xbt.gallery.transform import PROVENANCE_KEY, GalleryMap, transform_gallery, transform_status
from xbt.models.base import EmbeddingSpace
from xbt.scale import ray_transform
from xbt.scale.ray_embed import RayOptions
from xbt.scale.ray_transform import plan_transform, transform_sharded

OLD = EmbeddingSpace("old-model", 16, "a" * 64)
NEW = EmbeddingSpace("new-model", 24, "b" * 64)
N = 130


def _gmap() -> GalleryMap:
    weight = np.random.default_rng(5).standard_normal((OLD.dim, NEW.dim)).astype(np.float32)
    return GalleryMap(LinearMap.from_arrays(weight), OLD, NEW, "a random old->new map")


def _old(folder, n: int = N) -> Gallery:
    g = Gallery.create(folder, OLD, IndexConfig(kind="flat"), "image")
    g.add(unit_rows(n, OLD.dim, 3), [f"item{i:04d}" for i in range(n)], [{"caption": f"c{i}"} for i in range(n)], space=OLD)
    return g


def _rows(folder) -> dict[str, tuple[np.ndarray, dict]]:
    with Gallery.open(folder) as g:
        got = g.get(g.ids(), with_vectors=True)
    return {i: (r["vector"], r["payload"]) for i, r in got.items()}


def test_the_sharded_transform_writes_what_the_one_process_transform_writes(tmp_path):
    gmap = _gmap()
    with _old(tmp_path / "old") as old:
        transform_gallery(old, tmp_path / "plain", gmap)
        report = transform_sharded(old, tmp_path / "sharded", gmap, engine="local", shard_size=40)
    assert report.shards == 4 and len(report.written) == 4 and report.rows == report.added == N
    assert report.sweep == {"written": 0, "already_present": N, "removed": 0}
    plain, sharded = _rows(tmp_path / "plain"), _rows(tmp_path / "sharded")
    assert plain.keys() == sharded.keys() and len(sharded) == N
    for item_id, (vector, payload) in plain.items():
        np.testing.assert_allclose(sharded[item_id][0], vector, atol=1e-6)
        assert sharded[item_id][1] == payload and payload[PROVENANCE_KEY]["map"] == gmap.digest
    with Gallery.open(tmp_path / "sharded") as new:
        assert new.space == NEW and transform_status(new)["transformed"] == N


def test_a_rerun_makes_only_the_missing_shards_and_adds_only_the_missing_rows(tmp_path):
    gmap = _gmap()
    with _old(tmp_path / "old") as old:
        first = transform_sharded(old, tmp_path / "new", gmap, engine="local", shard_size=50)
        work = tmp_path / "new.shards"
        lost = sorted(work.glob("part-00001-*.parquet"))
        assert len(lost) == 1 and first.shards == 3
        lost[0].unlink()  # as if the job was killed before this shard was written ...
        with Gallery.open(tmp_path / "new") as new:  # ... and before some rows reached the gallery
            new.delete([f"item{i:04d}" for i in range(120, 130)])
        again = transform_sharded(old, tmp_path / "new", gmap, engine="local", shard_size=50)
    assert again.written == [lost[0].name] and len(again.skipped) == 2
    assert again.added == 10 and again.rows == N
    assert len(_rows(tmp_path / "new")) == N


def test_the_closing_sweep_follows_adds_and_deletes_of_the_source_but_keeps_native_rows(tmp_path):
    gmap = _gmap()
    with _old(tmp_path / "old") as old:
        transform_sharded(old, tmp_path / "new", gmap, engine="local", shard_size=64)
        old.delete(["item0000", "item0001", "item0002"])
        old.add(unit_rows(2, OLD.dim, 9), ["late0", "late1"], [{"caption": "late"}] * 2, space=OLD)
        with Gallery.open(tmp_path / "new") as new:  # item0005 was backfilled in place: native now
            new.add(unit_rows(1, NEW.dim, 4), ["item0005"], [{"caption": "c5"}], space=NEW, on_conflict="replace")
        old.delete(["item0005"])
        report = transform_gallery(old, tmp_path / "new", gmap)
    assert report["written"] == 2 and report["removed"] == 3
    rows = _rows(tmp_path / "new")
    assert {"late0", "late1", "item0005"} <= rows.keys() and not {"item0000", "item0001", "item0002"} & rows.keys()
    assert len(rows) == N - 3 + 2


def test_plan_is_deterministic_and_keyed_on_the_map():
    ids = [f"x{i}" for i in range(10)]
    a, b = plan_transform(ids, "m1", 4), plan_transform(list(reversed(ids)), "m1", 4)
    assert [t.name for t in a] == [t.name for t in b] and [len(t.ids) for t in a] == [4, 4, 2]
    assert {t.name for t in plan_transform(ids, "m2", 4)}.isdisjoint(t.name for t in a)
    with pytest.raises(InputError, match="shard size"):
        plan_transform(ids, "m1", 0)


def test_a_milvus_lite_source_is_refused_on_ray(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_transform, "gallery_ref", lambda g: "milvus:/data/photos.db#photos")
    with _old(tmp_path / "old") as old, pytest.raises(InputError, match="Milvus Lite"):
        transform_sharded(old, tmp_path / "new", _gmap(), engine="ray")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_the_ray_engine_writes_the_same_rows_as_the_local_engine(tmp_path, xbt_home):
    ray = pytest.importorskip("ray")
    gmap = _gmap()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        with _old(tmp_path / "old") as old:
            local = transform_sharded(old, tmp_path / "local", gmap, engine="local", shard_size=40)
            on_ray = transform_sharded(old, tmp_path / "ray", gmap, engine="ray", shard_size=40,
                                       ray_options=RayOptions(actors=1, cpus_per_actor=1.0, threads=1))
    finally:
        ray.shutdown()
    assert on_ray.engine == "ray" and len(on_ray.written) == local.shards == 4 and on_ray.added == N
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert a.keys() == b.keys()
    for item_id, (vector, payload) in a.items():
        np.testing.assert_allclose(b[item_id][0], vector, atol=1e-6)
        assert b[item_id][1] == payload


def test_the_command_line_runs_the_sharded_transform(tmp_path, xbt_home):
    """`xbt gallery transform --work DIR` runs the sharded job (here the local engine; --engine ray the same
    on actors) with a map fitted old -> new: the rows of the one-process transform."""
    from gallery_support import save_tiny_openclip
    from typer.testing import CliRunner

    from xbt.cli import app
    from xbt.specs import load_model

    old_spec = save_tiny_openclip(tmp_path / "a", seed=0)
    new_spec = save_tiny_openclip(tmp_path / "b", seed=1, embed_dim=48, width=48)
    old_model = load_model(old_spec)
    captions = [f"a caption about thing {i}" for i in range(60)]
    with Gallery.create(tmp_path / "old", old_model.space, IndexConfig(kind="flat"), "text") as g:
        g.add(old_model.encode_text(captions).numpy(), [f"c{i:02d}" for i in range(60)], [{"caption": c} for c in captions],
              space=old_model.space)
    (tmp_path / "texts.txt").write_text("\n".join(f"fit text number {i}" for i in range(80)))
    common = ["gallery", "transform", "--gallery", str(tmp_path / "old"), "--fit", "procrustes-text", "--old", old_spec,
              "--new", new_spec, "--fit-texts", str(tmp_path / "texts.txt")]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "new"), "--work", str(tmp_path / "shards"),
                                      "--shard-size", "25"])
    assert result.exit_code == 0, result.output
    assert '"shards": 3' in result.output and len(list((tmp_path / "shards").glob("part-*.parquet"))) == 3
    plain = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    a, b = _rows(tmp_path / "new"), _rows(tmp_path / "plain")
    assert a.keys() == b.keys() and len(a) == 60
    for item_id, (vector, payload) in b.items():
        np.testing.assert_allclose(a[item_id][0], vector, atol=1e-5)
        assert a[item_id][1] == payload
    bad = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "new2"), "--engine", "spark"])
    assert bad.exit_code == 1 and "engine must be one of" in bad.output
