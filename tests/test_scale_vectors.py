"""Vector shards and the local engine: the shard plan, the parquet format, resumption at shard granularity,
loading into a gallery, backfill through shards, and the `xbt embed` command."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gallery_support import make_images, save_tiny_openclip

from xbt.errors import InputError, SpaceMismatchError
from xbt.gallery.ingest import GalleryItem, items_from_folder
from xbt.gallery.store import Gallery
from xbt.specs import load_model
from xbt.models.base import EmbeddingSpace
from xbt.scale.ray_embed import backfill, embed_items
from xbt.scale.vectors import MANIFEST_NAME, Manifest, load_into_gallery, plan_shards, read_shard, read_vectors, write_shard


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_vectors")
    spec_a = save_tiny_openclip(root / "model_a", seed=0)
    spec_b = save_tiny_openclip(root / "model_b", seed=1, embed_dim=48, width=48)
    images = make_images(root / "images", 11)
    return {"a": spec_a, "b": spec_b, "images": images, "model_a": load_model(spec_a), "model_b": load_model(spec_b)}


def _items(images):
    return [GalleryItem(p.stem, {"image": str(p), "rank": i}) for i, p in enumerate(images)]


def test_plan_is_deterministic_sorted_and_names_its_content():
    items = [GalleryItem(f"id{i}", {"caption": f"text {i}"}) for i in (5, 3, 9, 1, 7)]
    a = plan_shards(items, "text", 2)
    b = plan_shards(list(reversed(items)), "text", 2)
    assert [t.ids for t in a] == [["id1", "id3"], ["id5", "id7"], ["id9"]]
    assert [t.name for t in a] == [t.name for t in b]  # the order items arrive in does not matter
    changed = plan_shards([*items[:-1], GalleryItem("id7", {"caption": "other"})], "text", 2)
    assert [t.name for t in changed][0] == a[0].name and changed[1].name != a[1].name  # content in the name
    assert [t.ids for t in plan_shards(items, "text", 2, sort=False)][0] == ["id5", "id3"]  # priority order kept
    with pytest.raises(InputError, match="duplicate"):
        plan_shards(items + items[:1], "text", 2)
    with pytest.raises(InputError, match="shard size"):
        plan_shards(items, "text", 0)


def test_shard_format_is_plain_parquet_with_the_space_stamped(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    space = EmbeddingSpace("m", 4, "f" * 64)
    meta = {"format": "xbt.vectors/1", "space": space.to_dict(), "rows": 3, "failed": {"x": "bad"}}
    write_shard(tmp_path / "s.parquet", ["a", "b", "c"], vectors, [{"k": 1}, {}, {"k": 3}], meta)
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.schema.field("vector").type == pa.list_(pa.float32())
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert json.loads(table.schema.metadata[b"xbt"])["space"]["fingerprint"] == "f" * 64
    shard = read_shard(tmp_path / "s.parquet")
    np.testing.assert_array_equal(shard.vectors, vectors)
    assert shard.payloads == [{"k": 1}, {}, {"k": 3}] and shard.space == space and shard.meta["failed"] == {"x": "bad"}
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temporary file left behind


def test_local_engine_writes_the_models_vectors_and_resumes_by_shard(tiny, tmp_path, xbt_home):
    items = _items(tiny["images"])
    out = tmp_path / "vectors"
    first = embed_items(tiny["a"], items, out, "image", shard_size=4, loaded=tiny["model_a"])
    assert (first.shards, len(first.written), first.skipped, first.embedded_items) == (3, 3, [], 11)
    ids, vectors, payloads, space = read_vectors(out)
    assert ids == sorted(p.stem for p in tiny["images"]) and space == tiny["model_a"].space
    expected = tiny["model_a"].encode_image([str(next(p for p in tiny["images"] if p.stem == i)) for i in ids]).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert payloads[0] == {"image": str(tiny["images"][0]), "rank": 0}

    # Delete one shard: a rerun embeds only that one and leaves the others' files untouched.
    names = [s["name"] for s in Manifest.read(out).shards]
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    (out / names[1]).unlink()
    second = embed_items(tiny["a"], items, out, "image", shard_size=4, loaded=tiny["model_a"])
    assert second.written == [names[1]] and sorted(second.skipped) == sorted([names[0], names[2]])
    assert second.embedded_items == 4
    assert all(os.stat(out / n).st_mtime_ns == stamps[n] for n in (names[0], names[2]))
    np.testing.assert_allclose(read_vectors(out)[1], vectors, atol=1e-6)

    # Another model's shards are never reused, even for the same items.
    third = embed_items(tiny["b"], items, out, "image", shard_size=4, loaded=tiny["model_b"])
    assert len(third.written) == 3 and read_vectors(out)[3] == tiny["model_b"].space


def test_items_that_cannot_be_embedded_are_recorded_not_fatal(tiny, tmp_path, xbt_home):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    items = [*_items(tiny["images"][:3]), GalleryItem("zz-broken", {"image": str(broken)}), GalleryItem("zz-none", {})]
    report = embed_items(tiny["a"], items, tmp_path / "v", "image", shard_size=10, loaded=tiny["model_a"])
    assert sorted(report.failed) == ["zz-broken", "zz-none"]
    ids, vectors, _, _ = read_vectors(tmp_path / "v")
    assert len(ids) == 3 and vectors.shape == (3, 32)
    # The shard accounts for every item, so a rerun does not retry it forever.
    assert embed_items(tiny["a"], items, tmp_path / "v", "image", shard_size=10, loaded=tiny["model_a"]).written == []


def test_load_into_gallery_checks_the_space_and_resumes(tiny, tmp_path, xbt_home):
    out = tmp_path / "v"
    embed_items(tiny["a"], _items(tiny["images"]), out, "image", shard_size=5, loaded=tiny["model_a"])
    with Gallery.create(tmp_path / "g", tiny["model_a"].space, modality="image") as gallery:
        assert load_into_gallery(out, gallery) == (11, 0)
        assert load_into_gallery(out, gallery) == (0, 11)  # a rerun adds nothing twice
        hits = gallery.search(tiny["model_a"].encode_image([tiny["images"][4]]), 1, space=tiny["model_a"].space)
        assert hits[0][0].id == tiny["images"][4].stem and hits[0][0].payload["rank"] == 4
    with Gallery.create(tmp_path / "other", EmbeddingSpace("x", 32, "0" * 64), modality="image") as other:
        with pytest.raises(SpaceMismatchError):
            load_into_gallery(out, other)  # same dimension, other space: refused
    (out / MANIFEST_NAME).unlink()
    with Gallery.open(tmp_path / "g") as gallery, pytest.raises(InputError, match="run `xbt embed`"):
        load_into_gallery(out, gallery)


def test_backfill_through_shards_fills_the_new_gallery_like_the_model(tiny, tmp_path, xbt_home):
    from xbt.gallery.migration import Migration
    from xbt.gallery.ingest import ingest

    old_model, new_model = tiny["model_a"], tiny["model_b"]
    with Gallery.create(tmp_path / "old", old_model.space, modality="image") as old:
        ingest(old, old_model, items_from_folder(tiny["images"][0].parent))
        migration = Migration.start(tmp_path / "mig", old, new_model.space, order="newest")
    progress = backfill(migration, tiny["b"], engine="local", shard_size=4, new_model=new_model)
    assert progress["status"] == "complete" and progress["new_size"] == 11 and progress["position"] == 11
    with Gallery.open(migration.new_gallery_path) as new:
        got = new.get(new.ids(), with_vectors=True)
    for entry in got.values():
        expected = new_model.encode_image([entry["payload"]["image"]]).numpy()[0]
        np.testing.assert_allclose(entry["vector"], expected, atol=1e-5)
    # The shards follow the migration's priority order (newest first), not the id order.
    first = read_shard(migration.path / "vectors" / Manifest.read(migration.path / "vectors").shards[0]["name"])
    assert first.ids == migration.plan()[:4]
    with Gallery.open(tmp_path / "old") as old:
        second = Migration.start(tmp_path / "mig2", old, new_model.space)
    with pytest.raises(SpaceMismatchError):  # a model of another space never writes into the new gallery
        backfill(second, tiny["a"], engine="local", new_model=old_model)


def test_cli_embed_writes_shards_and_builds_a_gallery(tiny, tmp_path, xbt_home):
    from typer.testing import CliRunner

    from xbt.cli import app

    folder = tiny["images"][0].parent
    runner = CliRunner()
    result = runner.invoke(app, ["embed", "--model", tiny["a"], "--data", str(folder), "--out", str(tmp_path / "v"),
                                 "--shard-size", "4", "--gallery", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] == 3 and report["items"] == 11 and report["engine"] == "local"
    with Gallery.open(tmp_path / "g") as gallery:
        assert len(gallery) == 11 and gallery.space == tiny["model_a"].space and gallery.modality == "image"
    again = runner.invoke(app, ["embed", "--model", tiny["a"], "--data", str(folder), "--out", str(tmp_path / "v"),
                                "--shard-size", "4", "--gallery", str(tmp_path / "g")])
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 3
    bad = runner.invoke(app, ["embed", "--model", tiny["a"], "--data", str(folder), "--out", str(tmp_path / "v2"),
                              "--engine", "spark"])
    assert bad.exit_code == 1 and "engine" in bad.output
