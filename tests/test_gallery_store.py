"""The gallery store: add/delete/search/reopen, index kinds by size, the space guard, recovery from stale
or damaged index snapshots, and writes from another connection."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from gallery_support import unit_rows

from xbt.errors import InputError, SpaceMismatchError
from xbt.gallery.index import IndexConfig
from xbt.gallery.store import DB_NAME, SNAPSHOT_NAME, Gallery, GalleryCorruptError
from xbt.models.base import EmbeddingSpace

DIM = 16
SPACE = EmbeddingSpace("old-model", DIM, "a" * 64)
TWIN = EmbeddingSpace("other-model", DIM, "b" * 64)  # same dimension, other weights


def _fill(g: Gallery, n: int, start: int = 0, seed: int = 0) -> np.ndarray:
    x = unit_rows(n, DIM, seed)
    g.add(x, [f"item{i}" for i in range(start, start + n)], [{"n": i} for i in range(start, start + n)], space=SPACE)
    return x


def _top_ids(g: Gallery, queries: np.ndarray, k: int = 5) -> list[list[str]]:
    return [[h.id for h in hits] for hits in g.search(queries, k, space=SPACE)]


def test_add_search_reopen_gives_the_same_results(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE, modality="image") as g:
        x = _fill(g, 60)
        before = g.search(x[:7], 5, space=SPACE)
        assert [hits[0].id for hits in before] == [f"item{i}" for i in range(7)]  # each vector finds itself
        assert before[3][0].payload == {"n": 3} and before[3][0].space == SPACE.id
        assert before[0][0].score == pytest.approx(1.0, abs=1e-5)
    with Gallery.open(tmp_path / "g") as g:
        after = g.search(x[:7], 5, space=SPACE)
        assert len(g) == 60 and g.modality == "image" and g.space == SPACE
        assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
        np.testing.assert_allclose([[h.score for h in r] for r in after], [[h.score for h in r] for r in before], atol=1e-6)
        assert g.verify() == []


def test_index_kind_is_chosen_by_size_and_configurable(tmp_path):
    config = IndexConfig(flat_max=30, hnsw_max=80)
    assert [config.choose(n) for n in (0, 30, 31, 80, 81)] == ["flat", "flat", "hnsw", "hnsw", "ivf"]
    with Gallery.create(tmp_path / "g", SPACE, config) as g:
        x = _fill(g, 20)
        assert g.info().index_kind == "flat"
        x = np.concatenate([x, _fill(g, 30, start=20, seed=1)])
        assert g.info().index_kind == "flat" and g.info().recommended_kind == "hnsw"  # switches at rebuild time
        g.compact()
        assert g.info().index_kind == "hnsw"
        x = np.concatenate([x, _fill(g, 50, start=50, seed=2)])
        g.compact()
        assert g.info().index_kind == "ivf"
        assert _top_ids(g, x, 1) == [[f"item{i}"] for i in range(100)]
    with Gallery.open(tmp_path / "g", IndexConfig(kind="hnsw")) as g:  # an explicit kind overrides the size rule
        assert g.info().index_kind == "hnsw" and g.info().index_config["kind"] == "hnsw"
        assert _top_ids(g, x[:10], 1) == [[f"item{i}"] for i in range(10)]
    with Gallery.open(tmp_path / "g") as g:  # the override was stored
        assert g.info().index_kind == "hnsw"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_deleted_items_never_come_back(tmp_path, kind):
    with Gallery.create(tmp_path / "g", SPACE, IndexConfig(kind=kind, ivf_nprobe=64)) as g:
        x = _fill(g, 80)
        g.compact()
        assert g.info().index_kind == kind
        gone = [f"item{i}" for i in range(0, 80, 5)]  # 20%: below the HNSW rebuild threshold
        assert g.delete(gone + ["no-such-id"]) == len(gone)
        assert len(g) == 80 - len(gone)
        found = {h.id for hits in g.search(x, 10, space=SPACE) for h in hits}
        assert not found & set(gone)
        assert g.info().tombstones == (len(gone) if kind == "hnsw" else 0)
        assert g.verify() == []
    with Gallery.open(tmp_path / "g") as g:
        found = {h.id for hits in g.search(x, 10, space=SPACE) for h in hits}
        assert not found & set(gone) and len(g) == 80 - len(gone)
        g.compact()
        assert g.info().tombstones == 0
        assert _top_ids(g, x[1:2], 1) == [["item1"]]


def test_hnsw_rebuilds_when_many_are_deleted(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE, IndexConfig(kind="hnsw", tombstone_rebuild_fraction=0.3)) as g:
        x = _fill(g, 40)
        g.delete([f"item{i}" for i in range(20)])
        assert g.info().tombstones == 0  # 50% > 30%: the index was rebuilt without them
        assert _top_ids(g, x[25:26], 1) == [["item25"]]


def test_on_conflict(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE) as g:
        x = _fill(g, 5)
        with pytest.raises(InputError, match="already in the gallery"):
            g.add(x[:2], ["item0", "fresh"], space=SPACE)
        assert len(g) == 5 and not g.present(["fresh"])  # the failed batch left nothing behind
        assert g.add(x[:2], ["item0", "fresh"], [{"v": 2}, {"v": 2}], space=SPACE, on_conflict="skip") == ["fresh"]
        assert g.get(["item0"])["item0"]["payload"] == {"n": 0}
        y = unit_rows(1, DIM, seed=9)
        g.add(y, ["item0"], [{"v": 3}], space=SPACE, on_conflict="replace")
        assert g.get(["item0"])["item0"]["payload"] == {"v": 3}
        assert g.search(y, 1, space=SPACE)[0][0].id == "item0"
        assert g.search(x[:1], 1, space=SPACE)[0][0].id != "item0" or g.search(x[:1], 1, space=SPACE)[0][0].score < 0.999
        assert len(g) == 6 and g.verify() == []


def test_space_guard_refuses_same_dimension_other_weights(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE) as g:
        x = _fill(g, 10)
        with pytest.raises(SpaceMismatchError, match="same dimension"):
            g.search(x[:1], 3, space=TWIN)
        with pytest.raises(SpaceMismatchError, match="same dimension"):
            g.add(x[:1], ["twin"], space=TWIN)
        with pytest.raises(SpaceMismatchError):
            g.search(unit_rows(1, 8, 0), 3, space=EmbeddingSpace("small", 8, "a" * 64))
        # A compatible model declares the gallery's space itself (its name may differ): accepted.
        declared = EmbeddingSpace("compat:new->old", DIM, SPACE.fingerprint)
        assert g.search(x[:1], 1, space=declared)[0][0].id == "item0"
        g.add(unit_rows(1, DIM, 5), ["from-compat"], space=declared)
        assert len(g) == 11 and not g.present(["twin"])


def test_rows_of_another_space_are_refused_even_by_raw_sql(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE) as g:
        _fill(g, 3)
    conn = sqlite3.connect(tmp_path / "g" / DB_NAME)
    conn.execute("INSERT INTO spaces(key, name, dim, fingerprint) VALUES (2, 'intruder', ?, ?)", (DIM, "c" * 64))
    blob = unit_rows(1, DIM, 0).tobytes()
    with pytest.raises(sqlite3.DatabaseError, match="another embedding space"):
        conn.execute("INSERT INTO items(id, space, vector, crc, payload, added_at) VALUES ('x', 2, ?, 0, '{}', 0)", (blob,))
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        conn.execute("UPDATE items SET vector = ? WHERE id = 'item0'", (blob,))
    conn.rollback()
    conn.close()
    with Gallery.open(tmp_path / "g") as g:
        assert len(g) == 3 and g.verify() == []


def test_stale_or_damaged_snapshots_are_repaired(tmp_path):
    g = Gallery.create(tmp_path / "g", SPACE)
    x = _fill(g, 30)
    g.save_index()
    y = _fill(g, 10, start=30, seed=1)
    g.delete(["item0", "item1"])
    g._db().close()  # a crash: no snapshot of the last writes  # noqa: SLF001
    g._conn = None  # noqa: SLF001
    with Gallery.open(tmp_path / "g") as g2:
        assert len(g2) == 38 and g2.verify() == []
        assert _top_ids(g2, y[:3], 1) == [["item30"], ["item31"], ["item32"]]
        assert "item0" not in {h.id for h in g2.search(x[0:1], 5, space=SPACE)[0]}
    (tmp_path / "g" / SNAPSHOT_NAME).write_bytes(b"not a snapshot")
    with Gallery.open(tmp_path / "g") as g3:
        assert len(g3) == 38 and g3.verify() == [] and _top_ids(g3, x[5:6], 1) == [["item5"]]


def test_writes_from_another_connection_are_seen(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE) as a, Gallery.open(tmp_path / "g") as b:
        x = _fill(a, 5)
        assert _top_ids(b, x[:1], 1) == [["item0"]]  # b catches up with a's commit
        b.delete(["item0"])
        assert "item0" not in _top_ids(a, x[:1], 5)[0]
        assert a.verify() == [] and b.verify() == []


def test_bad_input_is_refused_with_a_message(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE) as g:
        x = unit_rows(2, DIM, 0)
        cases = [
            (lambda: g.add(unit_rows(2, 8, 0), ["a", "b"], space=SPACE), "shape"),
            (lambda: g.add(np.full((1, DIM), np.nan), ["a"], space=SPACE), "NaN"),
            (lambda: g.add(np.zeros((1, DIM)), ["a"], space=SPACE), "zero vector"),
            (lambda: g.add(x, ["a", "a"], space=SPACE), "duplicates"),
            (lambda: g.add(x, ["a", ""], space=SPACE), "non-empty"),
            (lambda: g.add(x, ["a", "b"], [{"ok": 1}, ["not", "a", "dict"]], space=SPACE), "JSON object"),
            (lambda: g.add(x, ["a", "b"], [{"x": object()}, {}], space=SPACE), "JSON-serialisable"),
            (lambda: g.add(x, ["a"], space=SPACE), "2 vectors for 1 ids"),
            (lambda: g.search(x, 0, space=SPACE), "positive integer"),
        ]
        for call, message in cases:
            with pytest.raises(InputError, match=message):
                call()
        assert len(g) == 0
        assert g.search(x, 3, space=SPACE) == [[], []]  # an empty gallery answers with nothing
    with pytest.raises(InputError, match="already holds a gallery"):
        Gallery.create(tmp_path / "g", SPACE)
    with pytest.raises(InputError, match="no gallery"):
        Gallery.open(tmp_path / "nothing-here")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / DB_NAME).write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(GalleryCorruptError):
        Gallery.open(tmp_path / "junk")


def test_media_is_stored_by_content(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE) as g:
        a = g.store_media(b"\x89PNG fake", "png")
        assert a.parent == g.media_dir and a.read_bytes() == b"\x89PNG fake"
        assert g.store_media(b"\x89PNG fake", "png") == a
        with pytest.raises(InputError):
            g.store_media(b"x", "../etc")


def test_a_create_killed_before_its_commit_can_be_redone(tmp_path):
    (tmp_path / "g").mkdir()
    conn = sqlite3.connect(tmp_path / "g" / DB_NAME)  # what a create killed mid-transaction leaves
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    with pytest.raises(GalleryCorruptError, match="interrupted"):
        Gallery.open(tmp_path / "g")
    with Gallery.create(tmp_path / "g", SPACE) as g:
        _fill(g, 3)
    with Gallery.open(tmp_path / "g") as g:
        assert len(g) == 3
