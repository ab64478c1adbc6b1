"""The Milvus backend against the real engine (Milvus Lite, in-process, on a file in tmp_path): add, delete,
search (exact and HNSW / IVF), payloads, info, the space guard (collection stamp and row stamps, same
dimension included), export/import with the embedded store, the progressive backfill with its alias
cut-over, and a backfill SIGKILLed mid-run that resumes with nothing acknowledged lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gallery_support import make_images, save_tiny_openclip, unit_rows
from test_backfill_kill import WORKER as BACKFILL_WORKER
from test_backfill_kill import kill_mid_backfill

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from xbt.errors import InputError, SpaceMismatchError  # noqa: E402
from xbt.ranking.merge import slot_merge  # noqa: E402
from xbt.gallery.base import copy_gallery, open_gallery  # noqa: E402
from xbt.gallery.ingest import ingest, items_from_folder  # noqa: E402
from xbt.gallery.migrating import MigratingRetriever  # noqa: E402
from xbt.gallery.migration import Migration  # noqa: E402
from xbt.gallery.milvus import MilvusGallery, MilvusRef, connect, release_lite, stamp  # noqa: E402
from xbt.gallery.index import IndexConfig  # noqa: E402
from xbt.gallery.store import Gallery  # noqa: E402
from xbt.specs import load_model  # noqa: E402
from xbt.models.base import EmbeddingSpace  # noqa: E402

SPACE = EmbeddingSpace("old", 16, "a" * 64)
TWIN = EmbeddingSpace("other", 16, "b" * 64)  # same dimension, other weights


def _ref(tmp_path, name: str = "photos") -> str:
    return f"milvus:{tmp_path / 'g.db'}#{name}"


def _exact_top(gallery: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    return [list(np.argsort(-row, kind="stable")[:k]) for row in queries @ gallery.T]


# ----- the store -------------------------------------------------------------------------------------------
def test_add_search_get_delete_payloads_info(tmp_path):
    x = unit_rows(60, 16, 0)
    ids = [f"item{i:02d}" for i in range(60)]
    with MilvusGallery.create(_ref(tmp_path), SPACE, modality="image", extra={"note": "t"}) as g:
        assert g.add(x, ids, [{"image": f"/p/{i}.png", "n": i} for i in range(60)], space=SPACE) == ids
        queries = unit_rows(5, 16, 1)
        hits = g.search(queries, 7, space=SPACE)
        assert [[h.id for h in row] for row in hits] == [[ids[j] for j in top] for top in _exact_top(x, queries, 7)]
        assert hits[0][0].space == SPACE.id and hits[0][0].payload["n"] == ids.index(hits[0][0].id)
        assert abs(hits[0][0].score - float(queries[0] @ x[ids.index(hits[0][0].id)])) < 1e-5
        got = g.get(["item03", "nope"], with_vectors=True)
        assert list(got) == ["item03"] and got["item03"]["payload"] == {"image": "/p/3.png", "n": 3}
        np.testing.assert_allclose(got["item03"]["vector"], x[3], atol=1e-6)
        assert g.ids() == ids and [i for i, _, _ in g.iter_items()] == ids  # oldest first
        with pytest.raises(InputError, match="already in the gallery"):
            g.add(x[:1], ["item00"], space=SPACE)
        assert g.add(x[1:3], ["item00", "fresh"], space=SPACE, on_conflict="skip") == ["fresh"]
        assert g.add(x[5:6], ["item00"], [{"image": "/p/new.png"}], space=SPACE, on_conflict="replace") == ["item00"]
        assert g.get(["item00"])["item00"]["payload"] == {"image": "/p/new.png"}
        assert g.delete(["item01", "item02", "never-there"]) == 2
        assert len(g) == 59 and g.present(["item01", "item04"]) == {"item04"}
        assert all(h.id not in ("item01", "item02") for row in g.search(x[:3], 59, space=SPACE) for h in row)
        with pytest.raises(InputError):
            g.add(x[:2], ["a", "a"], space=SPACE)
        with pytest.raises(InputError, match="JSON"):
            g.add(x[:1], ["a"], [{"bad": object()}], space=SPACE)
        info = g.info().to_dict()
        assert info["backend"] == "milvus" and info["size"] == 59 and info["space"] == SPACE.to_dict()
        assert info["modality"] == "image" and info["alias"] == "photos" and info["extra"] == {"note": "t"}
        assert g.verify() == []
    with open_gallery(_ref(tmp_path)) as again:  # the stamp, modality and rows come back from the engine
        assert again.space == SPACE and again.modality == "image" and len(again) == 59
    with pytest.raises(InputError, match="already holds"):
        MilvusGallery.create(_ref(tmp_path), SPACE)
    with pytest.raises(InputError, match="no gallery"):
        open_gallery(_ref(tmp_path, "absent"))


def test_space_guard_on_collection_and_rows(tmp_path):
    x = unit_rows(10, 16, 0)
    with MilvusGallery.create(_ref(tmp_path), SPACE, modality="text") as g:
        g.add(x, [str(i) for i in range(10)], space=SPACE)
        with pytest.raises(SpaceMismatchError, match="same dimension"):
            g.add(x[:1], ["twin"], space=TWIN)
        with pytest.raises(SpaceMismatchError, match="same dimension"):
            g.search(x[:1], 3, space=TWIN)
        with pytest.raises(InputError, match="shape"):
            g.add(unit_rows(1, 8, 0), ["short"], space=SPACE)
        props = connect(str(tmp_path / "g.db")).describe_collection("photos")["properties"]
        assert EmbeddingSpace.from_dict(json.loads(props["xbt.space"])) == SPACE
        # A row written around xbt with another stamp is never served, and `verify` names it.
        client = connect(str(tmp_path / "g.db"))
        client.insert(g.collection, [{"id": "stray", "vector": np.append(x[0], 0), "space": stamp(TWIN), "seq": 0, "added_at": 0.0,
                                      "payload": {}}])
        assert all(h.id != "stray" for h in g.search(x[:1], 11, space=SPACE)[0])
        assert any("another space" in p for p in g.verify())
    assert open_gallery(_ref(tmp_path)).space != TWIN


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_index_recall_and_auto_choice(tmp_path, kind):
    x = unit_rows(3000, 16, 0)
    ids = [str(i) for i in range(len(x))]
    with MilvusGallery.create(_ref(tmp_path), SPACE, IndexConfig(kind=kind), "image") as g:
        g.add(x, ids, space=SPACE)
        g.compact()
        assert g.info().index_kind == kind
        queries = unit_rows(50, 16, 1)
        found = [[int(h.id) for h in row] for row in g.search(queries, 10, space=SPACE)]
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, _exact_top(x, queries, 10))])
        assert recall >= 0.9, recall
    with MilvusGallery.create(_ref(tmp_path, "auto"), SPACE, IndexConfig(flat_max=1000), "image") as g:
        g.add(x[:1500], ids[:1500], space=SPACE)
        assert g.info().index_kind == "flat"  # exact until compact re-chooses by size
        g.compact()
        assert g.info().index_kind == "hnsw" and g.info().recommended_kind == "hnsw"


def test_references_are_checked():
    with pytest.raises(InputError, match=r"\.db"):
        MilvusRef.parse("milvus:./gallery")
    with pytest.raises(InputError, match="letters"):
        MilvusRef.parse("milvus:./g.db#bad-name")
    assert MilvusRef.parse("milvus:http://host:19530#photos") == MilvusRef("http://host:19530", "photos")
    assert MilvusRef.parse("milvus:http://host:19530").name == "gallery"


# ----- export / import ---------------------------------------------------------------------------------------
def test_export_import_between_backends_keeps_space_order_and_payloads(tmp_path):
    x = unit_rows(40, 16, 3)
    ids = [f"i{i}" for i in range(40)][::-1]
    with Gallery.create(tmp_path / "embedded", SPACE, modality="image") as emb:
        emb.add(x, ids, [{"image": f"/p/{i}.png"} for i in ids], space=SPACE)
        info = copy_gallery(emb, _ref(tmp_path, "copy"))
        assert info.size == 40 and info.space == SPACE.to_dict()
    with open_gallery(_ref(tmp_path, "copy")) as mil:
        assert mil.ids() == ids and mil.modality == "image"
        q = unit_rows(3, 16, 4)
        with Gallery.open(tmp_path / "embedded") as emb:
            assert [[h.id for h in r] for r in mil.search(q, 5, space=SPACE)] == \
                   [[h.id for h in r] for r in emb.search(q, 5, space=SPACE)]
        back = copy_gallery(mil, tmp_path / "back")
        assert back.size == 40
    with Gallery.open(tmp_path / "back") as b, Gallery.open(tmp_path / "embedded") as emb:
        assert b.ids() == ids and b.space == SPACE
        np.testing.assert_allclose(b.get(ids[:5], True)[ids[0]]["vector"], emb.get(ids[:5], True)[ids[0]]["vector"])
    with MilvusGallery.create(_ref(tmp_path, "twin"), TWIN, modality="image") as twin:
        with Gallery.open(tmp_path / "embedded") as emb, pytest.raises(SpaceMismatchError):
            copy_gallery(emb, _ref(tmp_path, "twin"))
        assert len(twin) == 0


def test_cli_build_search_info_export_import(tmp_path, xbt_home):
    from typer.testing import CliRunner

    from xbt.cli import app

    spec = save_tiny_openclip(tmp_path / "m", seed=0)
    make_images(tmp_path / "photos", 5)
    db = tmp_path / "cli.db"
    run = CliRunner().invoke
    r = run(app, ["gallery", "build", "--model", spec, "--data", str(tmp_path / "photos"), "--out", f"milvus:{db}#pics"])
    assert r.exit_code == 0, r.output
    r = run(app, ["gallery", "--backend", "milvus", "--uri", str(db), "info", "--gallery", "pics"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["size"] == 5 and json.loads(r.stdout)["backend"] == "milvus"
    r = run(app, ["gallery", "search", "--gallery", f"milvus:{db}#pics", "--model", spec, "--text", "a photo", "-k", "3"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 3
    r = run(app, ["gallery", "export", "--gallery", f"milvus:{db}#pics", "--out", str(tmp_path / "folder")])
    assert r.exit_code == 0, r.output
    r = run(app, ["gallery", "--backend", "milvus", "--uri", str(db), "import", "--gallery", "again",
                  "--source", str(tmp_path / "folder")])
    assert r.exit_code == 0, r.output
    with open_gallery(tmp_path / "folder") as a, open_gallery(f"milvus:{db}#again") as b:
        assert a.ids() == b.ids() and a.space == b.space
    r = run(app, ["gallery", "--backend", "milvus", "info", "--gallery", "pics"])
    assert r.exit_code == 1 and "--uri" in r.output


def test_xbt_serve_on_a_milvus_gallery(tmp_path, xbt_home):
    """`xbt serve --gallery milvus:FILE#NAME`: search by text and image, upload (kept beside the Lite file,
    shown as a thumbnail), delete, all written to the engine; a Milvus server has no media folder."""
    import io

    import httpx
    from PIL import Image
    from serve_support import serving

    spec = save_tiny_openclip(tmp_path / "m", seed=0)
    model = load_model(spec)
    images = make_images(tmp_path / "photos", 6)
    ref = _ref(tmp_path)
    with MilvusGallery.create(ref, model.space, modality="image") as g:
        ingest(g, model, items_from_folder(tmp_path / "photos"))
    release_lite(tmp_path / "g.db")  # Milvus Lite serves one process: hand the file to the service
    token = "milvus-serve-token"
    auth = {"Authorization": f"Bearer {token}"}
    upload = io.BytesIO()
    Image.new("RGB", (30, 30), "purple").save(upload, format="PNG")
    args = ["--gallery", ref, "--model", spec, "--open-info"]
    # Behaviour, not latency (a first search takes 0.4 s here when idle, over httpx's 5 s default on a loaded
    # 2-core CI machine): a generous client timeout.
    with serving(args, env={"XBT_SERVE_TOKEN": token}, log=tmp_path / "serve.log") as url, \
            httpx.Client(timeout=60) as http:
        info = http.get(f"{url}/info").json()
        assert info["gallery"]["backend"] == "milvus" and info["gallery"]["size"] == 6
        hits = http.post(f"{url}/search/text", json={"text": "a picture", "k": 4}).json()["results"]
        from xbt.serve.app import public_info

        assert len(hits) == 4 and {h["space"] for h in hits} == {public_info(model.space.id)}  # no server path
        with images[2].open("rb") as f:
            r = http.post(f"{url}/search/image", files={"file": ("q.png", f.read(), "image/png")}, data={"k": "1"})
        assert r.json()["results"][0]["id"] == "img002.png"
        r = http.post(f"{url}/items/image", headers=auth, files={"file": ("p.png", upload.getvalue(), "image/png")},
                       data={"id": "up-1"})
        assert r.status_code == 200, r.text
        r = http.post(f"{url}/search/image", files={"file": ("q.png", upload.getvalue(), "image/png")}, data={"k": "1"})
        top = r.json()["results"][0]
        assert top["id"] == "up-1" and top["thumbnail"].startswith("/thumbnail?id=")
        assert http.get(url + top["thumbnail"]).headers["content-type"] in ("image/png", "image/jpeg")
        assert http.post(f"{url}/items/delete", headers=auth, json={"ids": ["img000.png"]}).json() == {"deleted": 1}
    with open_gallery(ref) as g:  # what the service wrote is in the engine
        assert len(g) == 6 and g.present(["up-1", "img000.png"]) == {"up-1"}
        stored = g.get(["up-1"])["up-1"]["payload"]["image"]
        assert Path(stored).parent == (tmp_path / "g.db.media").resolve()
    # A gallery on a Milvus server (not started here: only its reference is needed) has no media folder:
    # uploads are refused with what to do instead, and the service shows thumbnails from --media-root only.
    from xbt.serve.media import ThumbnailStore

    server = MilvusGallery.__new__(MilvusGallery)
    server._ref = MilvusRef.parse("milvus:http://milvus.example:19530#photos")
    with pytest.raises(InputError, match="shared media store"):
        server.media_dir  # noqa: B018
    assert ThumbnailStore([server], [tmp_path.resolve()], 1000).roots() == [tmp_path.resolve()]


# ----- the progressive backfill on Milvus ------------------------------------------------------------------
@pytest.fixture()
def milvus_migration(tmp_path):
    """An old-space Milvus gallery of 12 images and a migration into a new model's space."""
    old_model = load_model(save_tiny_openclip(tmp_path / "old", seed=0))
    new_spec = save_tiny_openclip(tmp_path / "new", seed=1)
    new_model = load_model(new_spec)
    make_images(tmp_path / "photos", 12)
    with MilvusGallery.create(_ref(tmp_path), old_model.space, modality="image") as old:
        ingest(old, old_model, items_from_folder(tmp_path / "photos"))
        migration = Migration.start(tmp_path / "mig", old, new_model.space, order="id")
    return migration, old_model, new_model, new_spec


def test_backfill_merges_rankings_and_cuts_over_by_alias(tmp_path, milvus_migration):
    migration, old_model, new_model, _ = milvus_migration
    assert migration.new_gallery_ref.startswith("milvus:") and migration.new_gallery_ref != migration.old_gallery_ref
    with pytest.raises(InputError, match="Milvus"):
        migration.old_gallery_path  # noqa: B018 - folder-only tools are refused, not misled
    # The old model stands in for the compatible model: it emits the old space.
    retriever = MigratingRetriever(migration, old_model, new_model)
    text = ["a picture"]
    compat_only = [h.id for h in retriever.search_texts(text, 6)[0]]
    with open_gallery(_ref(tmp_path)) as served:
        assert compat_only == [h.id for h in served.search(old_model.encode_text(text).numpy(), 6, space=old_model.space)[0]]
    progress = migration.run(new_model, batch_size=2, max_items=5)
    assert progress["status"] == "backfilling" and progress["new_size"] == 5
    old_ids = [h.id for h in retriever.old.search(old_model.encode_text(text).numpy(), 6, space=old_model.space)[0]]
    done = retriever.new.present(old_ids)
    fill = [h.id for h in retriever.new.search(new_model.encode_text(text).numpy(), len(done), space=new_model.space)[0]]
    merged = retriever.search_texts(text, 6)[0]
    assert [h.id for h in merged] == [i for i, _ in slot_merge(old_ids, done, fill)]
    assert {h.space for h in merged} <= {old_model.space.id, new_model.space.id}
    # Written during the migration: to both collections, so it needs no backfill.
    added = retriever.add("image", ["late"], [str(tmp_path / "photos" / "img000.png")],
                          [{"image": str(tmp_path / "photos" / "img000.png")}])
    assert added == ["late"] and "late" in retriever.new.present(["late"])
    with pytest.raises(InputError, match="not complete"):
        migration.cut_over()
    assert migration.run(new_model, batch_size=4)["status"] == "complete"
    assert migration.cut_over()["status"] == "cut-over"
    with open_gallery(_ref(tmp_path)) as served:  # the name now serves the new space
        assert served.space == new_model.space and len(served) == 13
    assert retriever.search_texts(text, 3)[0][0].space == new_model.space.id
    retriever.close()


ADD_WORKER = r'''
import sys
import numpy as np
from xbt.gallery.milvus import MilvusGallery

g = MilvusGallery.open(sys.argv[1])
rng = np.random.default_rng(0)
for n in range(10_000):  # each printed id was returned by add (acknowledged)
    ids = [f"w{n}-{j}" for j in range(3)]
    g.add(rng.standard_normal((3, g.space.dim)), ids, space=g.space)
    print("ACK " + " ".join(ids), flush=True)
'''


def _spawn(tmp_path, worker: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_backfill_killed_mid_run_resumes_with_nothing_acknowledged_lost(tmp_path, milvus_migration):
    migration, _, new_model, new_spec = milvus_migration
    release_lite(tmp_path / "g.db")  # Milvus Lite serves one process: hand the file to the worker
    proc = _spawn(tmp_path, BACKFILL_WORKER, str(tmp_path / "mig"), new_spec)  # the embedded test's worker, as is
    kill_mid_backfill(proc, tmp_path / "mig", after_position=6, jitter_s=0.2)  # two batches (of 3) acknowledged
    state, plan = Migration(tmp_path / "mig").state, migration.plan()
    with open_gallery(migration.new_gallery_ref) as new:  # the lock died with the worker
        done = set(new.ids())
        assert set(plan[: state["position"]]) <= done  # every acknowledged batch is there
        assert done <= set(plan[: state["position"] + 3]) and len(done) < 12  # at most the batch in flight
    progress = Migration(tmp_path / "mig").run(new_model, batch_size=3)
    assert progress["status"] == "complete" and progress["new_size"] == 12
    with open_gallery(migration.new_gallery_ref) as new, open_gallery(_ref(tmp_path)) as old:
        assert sorted(new.ids()) == sorted(old.ids()) and new.verify() == []
        sample = plan[::5]
        stored = new.get(sample, with_vectors=True)
        direct = new_model.encode_image([stored[i]["payload"]["image"] for i in sample]).numpy()
        np.testing.assert_allclose(np.stack([stored[i]["vector"] for i in sample]), direct, atol=1e-5)
    assert Migration(tmp_path / "mig").cut_over()["status"] == "cut-over"

    # Plain adds: every id the worker saw acknowledged survives its SIGKILL.
    release_lite(tmp_path / "g.db")
    proc = _spawn(tmp_path, ADD_WORKER, _ref(tmp_path))
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        while len(acked) < 30:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            acked += line.split()[1:]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    with open_gallery(_ref(tmp_path)) as served:
        assert set(acked) <= served.present(acked + ["never"]) and served.verify() == []


def test_calibrate_neither_reverts_a_concurrent_replace_nor_resurrects_a_concurrent_delete(tmp_path, monkeypatch):
    """A Milvus Lite file admits one process, so the interleaving is made directly: while `calibrate` computes
    the biases of the rows it read, a writer deletes one of them and replaces another. Before the fix,
    calibrate rewrote every row it had read (the deleted item came back, the replaced one got its old vector
    back) and read the whole collection into memory first."""
    from xbt.gallery import backend as backend_module

    x = unit_rows(30, 16, 0)
    ids = [f"item{i:02d}" for i in range(30)]
    fresh = unit_rows(1, 16, 7)
    qm = {"encoder_id": "enc", "spec": "m", "space_id": SPACE.id}
    with MilvusGallery.create(_ref(tmp_path), SPACE, modality="image") as g:
        g.add(x, ids, [{"n": i} for i in range(30)], space=SPACE)
        real = backend_module.nnn_bias
        raced = []

        def racing_biases(vectors, bank, alpha, k):
            if not raced:  # the writer strikes once, after the rows were read and before they are rewritten
                raced.append(True)
                g.delete(["item03"])
                g.add(fresh, ["item05"], [{"n": "new"}], space=SPACE, on_conflict="replace")
            return real(vectors, bank, alpha, k)

        monkeypatch.setattr(backend_module, "nnn_bias", racing_biases)
        g.calibrate(unit_rows(20, 16, 3), alpha=0.5, k=3, query_model=qm, space=SPACE, batch=8)
        assert raced
        assert "item03" not in g.ids(), "a concurrent delete was resurrected"
        got = g.get(["item05"], with_vectors=True)["item05"]
        assert got["payload"] == {"n": "new"}
        np.testing.assert_allclose(got["vector"], fresh[0], atol=1e-6)  # not reverted
        assert len(g) == 29 and g.verify() == []
