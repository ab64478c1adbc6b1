"""Gallery-side calibration (NNN hubness reduction): the bias and the alpha choice (xbt.ranking.nnn),
the bias stored with real galleries (embedded SQLite + faiss, Milvus Lite) and applied by their search for
the query model it was made for, `xbt gallery calibrate` / `search` / `info`, and the service."""

from __future__ import annotations

import json
import sqlite3

import httpx
import numpy as np
import pytest
import torch
from gallery_support import make_images, running_server, save_tiny_openclip, unit_rows
from typer.testing import CliRunner

from xbt.errors import InputError
from xbt.ranking.nnn import calibrate_queries, choose_alpha, nnn_bias, top_k_mean
from xbt.embed import PairEmbeddings
from xbt.embed import QueryVectors
from xbt.eval.matrix import evaluate_upgrade, system_hits
from xbt.gallery.base import QueryModelView, copy_gallery, open_gallery
from xbt.gallery.index import IndexConfig
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

SPACE = EmbeddingSpace("test-space", 16, "ab" * 32)
MODEL = {"encoder_id": "compat-aaa", "spec": "compat:/models/a", "space_id": SPACE.id}
OTHER = "compat-bbb"


def _reference_bias(gallery: np.ndarray, bank: np.ndarray, alpha: float, k: int) -> np.ndarray:
    sims = gallery.astype(np.float64) @ bank.T.astype(np.float64)
    return alpha * np.sort(sims, axis=1)[:, ::-1][:, : min(k, len(bank))].mean(1)


def _exact_top(gallery: np.ndarray, queries: np.ndarray, k: int, bias: np.ndarray | None = None) -> list[list[int]]:
    scores = queries @ gallery.T - (0 if bias is None else bias[None, :])
    return [list(np.argsort(-row, kind="stable")[:k]) for row in scores]


# ----- the bias and the choice of alpha -------------------------------------------------------------------
def test_nnn_bias_is_alpha_times_the_mean_top_k_similarity_in_bounded_blocks():
    g, bank = unit_rows(300, 16, 0), unit_rows(70, 16, 1)
    ref = _reference_bias(g, bank, 0.5, 10)
    assert np.allclose(nnn_bias(g, bank, 0.5, 10), ref, atol=1e-5)
    # Blocks of 3 gallery rows (210 scores per block) give the very same values.
    assert np.allclose(nnn_bias(g, bank, 0.5, 10, max_score_elements=210), ref, atol=1e-5)
    assert np.allclose(top_k_mean(g, bank[:4], 10), _reference_bias(g, bank[:4], 1.0, 10), atol=1e-5)  # k capped
    assert not nnn_bias(g, bank, 0.0).any()
    for bad in (dict(alpha=-1.0), dict(alpha=float("nan")), dict(alpha=0.5, k=0)):
        with pytest.raises(ValueError):
            nnn_bias(g, bank, **bad)
    with pytest.raises(ValueError, match="empty"):
        nnn_bias(g, bank[:0], 0.5)
    with pytest.raises(ValueError, match="dimension"):
        nnn_bias(g, unit_rows(5, 8, 2), 0.5)


def _hub_world(seed: int, n: int = 60, dim: int = 16, hub: float = 1.0, noise: float = 1.0, shift: float = 1.0):
    """Pairs with hubs: a tenth of the images lean toward the direction `mu` that every text query also
    leans toward, so they sit near every query and crowd the top of every result list (the case NNN is for)."""
    rng = np.random.default_rng(seed)
    mu = unit_rows(1, dim, 999)[0]
    lean = np.zeros(n, np.float32)
    lean[: n // 10] = hub
    images = rng.standard_normal((n, dim)).astype(np.float32)
    images = images / np.linalg.norm(images, axis=1, keepdims=True) + lean[:, None] * mu
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = images + noise / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32) + shift * mu
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return PairEmbeddings(images.astype(np.float32), texts.astype(np.float32), list(range(n)), SPACE)


def _as_queries(emb: PairEmbeddings) -> QueryVectors:
    return QueryVectors(emb.images, emb.texts, SPACE)


def test_calibrate_queries_is_what_the_matrix_searches_with_and_reduces_hubness():
    train, val, ev = _hub_world(1, 200), _hub_world(2), _hub_world(3)
    bank = _as_queries(train)
    calibrated = calibrate_queries(_as_queries(ev), ev, bank, {"t2i": 0.75, "i2t": 0.25})
    b = calibrated.gallery_bias
    assert np.allclose(b.images, _reference_bias(ev.images, train.texts, 0.75, 10), atol=1e-5)
    assert np.allclose(b.texts, _reference_bias(ev.texts, train.images, 0.25, 10), atol=1e-5)
    # The matrix ranks by q . g - bias: R@1 of text->image equals a direct computation.
    hits = system_hits(ev, ev, {"nnn": calibrated})["method:nnn"]["t2i"][1]
    top = [row[0] for row in _exact_top(ev.images, ev.texts, 1, b.images)]
    assert np.array_equal(hits, (np.array(top) == np.arange(len(top))).astype(float))
    # On val, alpha is chosen above 0 here (the hubs cost recall), and it helps the evaluation queries too.
    choice = choose_alpha(_as_queries(val), val, bank)
    assert choice.alpha["t2i"] > 0 and set(choice.scores["t2i"]) == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert choice.n_val_queries == {"t2i": 60, "i2t": 60}
    matrix = evaluate_upgrade(ev, ev, {"plain": _as_queries(ev),
                                       "nnn": calibrate_queries(_as_queries(ev), ev, bank, choice.alpha)}, n_resamples=50)
    assert matrix.methods["nnn"]["t2i"][1].recall.value > matrix.methods["plain"]["t2i"][1].recall.value


def test_choose_alpha_keeps_zero_when_calibration_cannot_help_and_checks_its_inputs():
    # Queries identical to their items: plain search is perfect, so every alpha ties at best and 0 wins.
    world = _hub_world(4)
    exact = PairEmbeddings(world.images, world.images.copy(), world.caption_image_index, SPACE)
    choice = choose_alpha(_as_queries(exact), exact, _as_queries(_hub_world(5)), directions=["t2i"])
    assert choice.alpha == {"t2i": 0.0} and choice.scores["t2i"][0.0] == 100.0
    with pytest.raises(ValueError, match="same val pairs"):
        choose_alpha(QueryVectors(world.images, world.texts[:5], SPACE), world, _as_queries(world))
    with pytest.raises(ValueError, match="directions"):
        choose_alpha(_as_queries(world), world, _as_queries(world), directions=["x2y"])
    other = EmbeddingSpace("other", 16, "cd" * 32)
    with pytest.raises(Exception, match="space"):
        calibrate_queries(_as_queries(world), world, QueryVectors(world.images, world.texts, other), 0.5)


# ----- the embedded store ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_embedded_store_applies_the_bias_for_its_model_only_and_biases_later_items(tmp_path, kind):
    x, bank, q = unit_rows(120, 16, 0), unit_rows(40, 16, 1), unit_rows(25, 16, 2)
    ids = [f"i{i}" for i in range(120)]
    with Gallery.create(tmp_path / "g", SPACE, IndexConfig(kind=kind), modality="image") as g:
        g.add(x[:100], ids[:100], space=SPACE)
        stamp = g.calibrate(bank, alpha=0.5, k=5, query_model=MODEL, space=SPACE, source="train")
        assert stamp["bank_size"] == 40 and stamp["query_model"] == MODEL and stamp["alpha"] == 0.5
        g.add(x[100:], ids[100:], space=SPACE)  # after calibration: biased from the stored bank
        bias = _reference_bias(x, bank, 0.5, 5)
        exact_cal, exact_plain = _exact_top(x, q, 10, bias), _exact_top(x, q, 10)
        cal = g.search(q, 10, space=SPACE, query_model=MODEL["encoder_id"])
        plain = g.search(q, 10, space=SPACE, query_model=OTHER)
        if kind == "flat":
            assert [[int(h.id[1:]) for h in row] for row in cal] == exact_cal
            assert [[int(h.id[1:]) for h in row] for row in plain] == exact_plain
            top = cal[0][0]
            assert top.score == pytest.approx(float(q[0] @ x[int(top.id[1:])] - bias[int(top.id[1:])]), abs=1e-5)
        else:  # HNSW: the calibrated ranking is found as well as the plain one
            found = np.mean([len({int(h.id[1:]) for h in r} & set(e)) / 10 for r, e in zip(cal, exact_cal)])
            assert found > 0.9
        assert all(h.calibrated is True for row in cal for h in row)
        assert all(h.calibrated is None for row in plain for h in row)
        assert g.info().calibration["uncalibrated_items"] == 0 and g.verify() == []
        assert g.delete(ids[:10]) == 10
    with sqlite3.connect(tmp_path / "g" / "gallery.db") as db:  # deleted items lose their bias
        assert db.execute("SELECT COUNT(*) FROM calibration_bias").fetchone()[0] == 110
        stored = dict(db.execute("SELECT i.id, b.bias FROM calibration_bias b JOIN items i USING(label)").fetchall())
    assert np.allclose([stored[i] for i in ids[10:]], bias[10:], atol=1e-5)
    with Gallery.open(tmp_path / "g") as g:  # reopened (from the snapshot): the same calibrated search
        again = g.search(q, 10, space=SPACE, query_model=MODEL["encoder_id"])
        if kind == "flat":
            assert [[int(h.id[1:]) for h in row] for row in again] == [[i for i in e if i >= 10][:10]
                                                                     for e in _exact_top(x, q, 20, bias)]
        assert g.clear_calibration() and g.calibration is None
        assert all(h.calibrated is None for h in g.search(q[:1], 5, space=SPACE, query_model=MODEL["encoder_id"])[0])
        with pytest.raises(InputError, match="empty"):
            g.calibrate(bank[:0], alpha=0.5, k=5, query_model=MODEL, space=SPACE)


def test_embedded_calibration_is_one_transaction_and_other_connections_pick_it_up(tmp_path, monkeypatch):
    import xbt.gallery.store as store

    x, bank, q = unit_rows(50, 16, 0), unit_rows(30, 16, 1), unit_rows(5, 16, 2)
    with Gallery.create(tmp_path / "g", SPACE, modality="image") as g, Gallery.open(tmp_path / "g") as reader:
        g.add(x, [f"i{i}" for i in range(50)], space=SPACE)
        first = g.calibrate(bank, alpha=0.25, k=5, query_model=MODEL, space=SPACE)
        # The other connection picks up the calibration (and its bias dimension) at its next read.
        hits = reader.search(q, 5, space=SPACE, query_model=MODEL["encoder_id"])
        assert [[int(h.id[1:]) for h in r] for r in hits] == _exact_top(x, q, 5, _reference_bias(x, bank, 0.25, 5))
        # A recalibration that fails at its last step (old biases and bank deleted, new ones written, the
        # stamp not yet) leaves the first one whole.
        calls = {"n": 0}

        def failing(self, key, value):
            calls["n"] += 1
            raise RuntimeError("killed mid-calibration")

        monkeypatch.setattr(store.Gallery, "_set_meta", failing)
        with pytest.raises(RuntimeError):
            g.calibrate(unit_rows(30, 16, 9), alpha=1.0, k=5, query_model={**MODEL, "encoder_id": OTHER}, space=SPACE)
        monkeypatch.undo()
        assert calls["n"] == 1 and g.calibration["id"] == first["id"]
        assert reader.calibration["id"] == first["id"]
        assert g.verify() == [] and g.info().calibration["uncalibrated_items"] == 0
        again = g.search(q, 5, space=SPACE, query_model=MODEL["encoder_id"])
        assert [[int(h.id[1:]) for h in r] for r in again] == _exact_top(x, q, 5, _reference_bias(x, bank, 0.25, 5))
    with sqlite3.connect(tmp_path / "g" / "gallery.db") as db:
        assert db.execute("SELECT COUNT(*) FROM calibration_bias").fetchone()[0] == 50
        assert db.execute("SELECT COUNT(*) FROM calibration_bank").fetchone()[0] == 30


def test_export_import_carries_the_calibration_to_milvus(tmp_path):
    x, bank, q = unit_rows(40, 16, 0), unit_rows(20, 16, 1), unit_rows(6, 16, 2)
    with Gallery.create(tmp_path / "g", SPACE, modality="image") as g:
        g.add(x, [f"i{i}" for i in range(40)], space=SPACE)
        g.calibrate(bank, alpha=0.5, k=5, query_model=MODEL, space=SPACE)
        info = copy_gallery(g, f"milvus:{tmp_path / 'm.db'}#photos")
    assert info.calibration["query_model"] == MODEL and info.calibration["uncalibrated_items"] == 0
    with open_gallery(f"milvus:{tmp_path / 'm.db'}#photos") as m:
        hits = m.search(q, 5, space=SPACE, query_model=MODEL["encoder_id"])
        assert [[int(h.id[1:]) for h in r] for r in hits] == _exact_top(x, q, 5, _reference_bias(x, bank, 0.5, 5))


# ----- Milvus Lite ----------------------------------------------------------------------------------------
def test_milvus_applies_the_bias_for_its_model_and_an_interrupted_recalibration_never_mixes_scores(tmp_path, monkeypatch):
    from xbt.gallery.milvus import MilvusGallery

    x, bank, q = unit_rows(80, 16, 0), unit_rows(30, 16, 1), unit_rows(10, 16, 2)
    ids = [f"i{i}" for i in range(80)]
    ref = f"milvus:{tmp_path / 'g.db'}#photos"
    with MilvusGallery.create(ref, SPACE, modality="image") as g:
        g.add(x[:60], ids[:60], space=SPACE)
        g.calibrate(bank, alpha=0.5, k=5, query_model=MODEL, space=SPACE)
        g.add(x[60:], ids[60:], space=SPACE)
        bias = _reference_bias(x, bank, 0.5, 5)
        cal = g.search(q, 10, space=SPACE, query_model=MODEL["encoder_id"])
        assert [[int(h.id[1:]) for h in r] for r in cal] == _exact_top(x, q, 10, bias)
        assert all(h.calibrated is True for r in cal for h in r)
        plain = g.search(q, 10, space=SPACE, query_model=OTHER)
        assert [[int(h.id[1:]) for h in r] for r in plain] == _exact_top(x, q, 10)
        assert np.allclose(g.get(["i3"], with_vectors=True)["i3"]["vector"], x[3], atol=1e-6)  # no bias in sight
        assert g.delete(ids[:5]) == 5 and g.verify() == []
        # A recalibration killed before its commit: the first calibration stays in force; the rows it
        # rewrote are searched with plain scores and marked uncalibrated, never with another bias.
        monkeypatch.setattr(MilvusGallery, "_set_props", lambda self, props: (_ for _ in ()).throw(RuntimeError("kill")))
        with pytest.raises(RuntimeError):
            g.calibrate(unit_rows(30, 16, 7), alpha=1.0, k=5, query_model=MODEL, space=SPACE)
        monkeypatch.undo()
        g.refresh()
        hits = g.search(q, 10, space=SPACE, query_model=MODEL["encoder_id"])
        live = np.arange(5, 80)
        expect = [[int(live[i]) for i in row] for row in _exact_top(x[5:], q, 10)]  # every row plain now
        assert [[int(h.id[1:]) for h in r] for r in hits] == expect
        assert all(h.calibrated is False for r in hits for h in r)
        assert g.info().calibration["uncalibrated_items"] == 75
        g.calibrate(bank, alpha=0.5, k=5, query_model=MODEL, space=SPACE)  # run again: whole again
        hits = g.search(q, 10, space=SPACE, query_model=MODEL["encoder_id"])
        assert [[int(h.id[1:]) for h in r] for r in hits] == [[int(live[i]) for i in row]
                                                            for row in _exact_top(x[5:], q, 10, bias[5:])]
        assert g.info().calibration["uncalibrated_items"] == 0
        banks = [c for c in g._db().list_collections() if "_nnn_" in c]
        assert len(banks) == 1  # the interrupted run's bank was dropped


# ----- the command line and the service -------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny old model, a compatible model (new model + a linear map into the old space), and pairs."""
    from xbt.compat.maps import Projection
    from xbt.compat.model import CompatibleModel
    from xbt.specs import load_model

    root = tmp_path_factory.mktemp("calibration")
    old_spec, new_spec = save_tiny_openclip(root / "old", seed=0), save_tiny_openclip(root / "new", seed=1)
    old, new = load_model(old_spec), load_model(new_spec)
    torch.manual_seed(0)
    CompatibleModel(new, Projection(new.embed_dim, old.embed_dim, "linear"), old.space).save_pretrained(root / "compat")
    images = make_images(root / "img", 12)
    words = ["red", "blue", "green", "big", "small", "dark", "two", "one", "old", "new", "round", "flat"]

    def pairs(name: str, picks: range) -> str:
        rows = [{"image": str(images[i]), "caption": f"a {words[i]} square {j}", "image_id": f"im{i}"}
                for i in picks for j in range(2)]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(root / name)

    return {"old": old_spec, "compat": f"compat:{root / 'compat'}", "root": root,
            "gallery_pairs": pairs("gallery.jsonl", range(0, 6)), "train": pairs("train.jsonl", range(6, 12)),
            "val": pairs("val.jsonl", range(0, 6))}


runner = CliRunner()


def _cli(*args: str) -> str:
    result = runner.invoke(app_cli(), list(args))
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.stdout


def app_cli():
    from xbt.cli import app

    return app


def test_cli_calibrate_search_info_and_the_service(tmp_path, world):
    from xbt.embed import embed_texts
    from xbt.gallery.ingest import GalleryRetriever
    from xbt.serve.app import ServeConfig, create_app
    from xbt.specs import load_model

    g = str(tmp_path / "g")
    _cli("gallery", "build", "--model", world["old"], "--data", world["gallery_pairs"], "--out", g)
    refused = runner.invoke(app_cli(), ["gallery", "calibrate", "--gallery", g, "--model", world["compat"],
                                        "--queries", world["train"]])
    assert refused.exit_code == 1 and "--alpha" in refused.output
    out = json.loads(_cli("gallery", "calibrate", "--gallery", g, "--model", world["compat"], "--queries", world["train"],
                          "--alpha", "0.5", "--k", "3"))
    compat, old = load_model(world["compat"]), load_model(world["old"])
    stamp = out["calibration"]
    assert stamp["query_model"]["encoder_id"] == compat.encoder_id and stamp["bank_size"] == 12 and stamp["k"] == 3
    # The bias is the compatible model's bank of training captions, applied to its searches only.
    train_captions = [json.loads(line)["caption"] for line in open(world["train"])]
    bank = embed_texts(compat, train_captions)
    with Gallery.open(g) as gal:
        vectors = {i: gal.get([i], with_vectors=True)[i]["vector"] for i in gal.ids()}
    query = compat.encode_text(["a red square"]).numpy()[0]
    expected = {i: float(query @ v - 0.5 * top_k_mean(v[None], bank, 3)[0]) for i, v in vectors.items()}
    result = runner.invoke(app_cli(), ["gallery", "search", "--gallery", g, "--model", world["compat"],
                                       "--text", "a red square", "-k", "6"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert [h["id"] for h in hits] == sorted(expected, key=lambda i: -expected[i])
    assert all(h["calibrated"] is True for h in hits)
    assert [h["score"] for h in hits] == pytest.approx(sorted(expected.values(), reverse=True), abs=1e-4)
    result = runner.invoke(app_cli(), ["gallery", "search", "--gallery", g, "--model", world["old"], "--text", "a red square"])
    assert result.exit_code == 0 and "another query model" in result.output
    assert all(h["calibrated"] is None for h in json.loads(result.stdout))
    info = json.loads(_cli("gallery", "info", "--gallery", g, "--model", world["old"]))
    assert info["calibration"]["applies"] is False and "uncalibrated" in info["calibration"]["message"]
    info = json.loads(_cli("gallery", "info", "--gallery", g, "--model", world["compat"]))
    assert info["calibration"]["applies"] is True

    # alpha chosen on val pairs (never on the queries the gallery is searched with): one of the grid.
    out = json.loads(_cli("gallery", "calibrate", "--gallery", g, "--model", world["compat"], "--queries", world["train"],
                          "--val", world["val"], "--gallery-model", world["old"]))
    assert out["calibration"]["alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0) and out["val"]["n_val_queries"] == {"t2i": 12}
    alpha = out["calibration"]["alpha"]

    # The service: the served (compatible) model's searches are calibrated, the old model's are not.
    gallery = Gallery.open(g)
    retriever = GalleryRetriever(QueryModelView(gallery, compat), compat)
    old_retriever = GalleryRetriever(QueryModelView(gallery, old), old)
    with running_server(create_app(retriever, ServeConfig(token=None), old=old_retriever)) as url:
        served = httpx.post(f"{url}/search/text", json={"text": "a red square", "k": 3}).json()["results"]
        assert all(h["calibrated"] is True for h in served)
        by_old = httpx.post(f"{url}/search/text", json={"text": "a red square", "k": 3, "model": "old"}).json()["results"]
        assert all(h["calibrated"] is None for h in by_old)
        info = httpx.get(f"{url}/info").json()
        assert info["gallery"]["calibration"]["applies"] is True and info["gallery"]["calibration"]["alpha"] == alpha
    gallery.close()
    _cli("gallery", "calibrate", "--gallery", g, "--model", world["compat"], "--clear")
    with Gallery.open(g) as gal:
        assert gal.calibration is None


# ----- SIGKILL during calibration and adds ----------------------------------------------------------------
_KILL_WORKER = """
import sys
import numpy as np
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

space = EmbeddingSpace("test-space", 16, "ab" * 32)
model = {"encoder_id": "compat-aaa", "spec": "compat:/models/a", "space_id": space.id}
rng = np.random.default_rng(int(sys.argv[2]))
with Gallery.open(sys.argv[1]) as g:
    print("READY", flush=True)
    for step in range(10_000):
        if step % 3 == 2:  # items added while calibrated: biased from the stored bank in their own commit
            x = rng.standard_normal((50, 16)).astype(np.float32)
            g.add(x, [f"s{sys.argv[2]}-{step}-{i}" for i in range(50)], space=space)
            print("ADDED", step, flush=True)
        else:
            bank = rng.standard_normal((int(rng.integers(20, 200)), 16)).astype(np.float32)
            stamp = g.calibrate(bank, alpha=float(rng.choice([0.25, 0.5, 1.0])), k=int(rng.integers(1, 12)),
                                query_model=model, space=space)
            print("CALIBRATED", stamp["id"], flush=True)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_during_calibration_leaves_one_whole_calibration(tmp_path, seed):
    import os
    import subprocess
    import sys
    import time

    from gallery_support import acknowledged_lines

    with Gallery.create(tmp_path / "g", SPACE, modality="image") as g:
        g.add(unit_rows(3000, 16, 0), [f"i{i}" for i in range(3000)], space=SPACE)
    script = tmp_path / "worker.py"
    script.write_text(_KILL_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "g"), str(seed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, reader = acknowledged_lines(proc, "the calibrating worker")
    deadline = time.monotonic() + 60
    while not any(line.startswith("CALIBRATED") for line in lines) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(float(np.random.default_rng(seed).uniform(0.0, 1.5)))
    proc.kill()
    proc.wait()
    reader.join(10)
    acknowledged = [line.split()[1] for line in lines if line.startswith("CALIBRATED")]
    added = sum(1 for line in lines if line.startswith("ADDED"))
    assert acknowledged, f"the worker never calibrated: {proc.stderr.read()}"
    with Gallery.open(tmp_path / "g") as g:
        stamp = g.calibration
        # The stamp is the last acknowledged calibration, or a later one that committed just before the kill.
        assert stamp is not None and (stamp["id"] == acknowledged[-1] or stamp["id"] not in acknowledged[:-1])
        assert g.verify() == [] and len(g) >= 3000 + 50 * added
        ids = g.ids()
        vectors = np.stack([g.get([i], with_vectors=True)[i]["vector"] for i in ids])
        bank = g.calibration_bank()
        assert len(bank) == stamp["bank_size"]
        expected = _reference_bias(vectors, bank, stamp["alpha"], stamp["k"])
    with sqlite3.connect(tmp_path / "g" / "gallery.db") as db:
        stored = dict(db.execute("SELECT i.id, b.bias FROM calibration_bias b JOIN items i USING(label)").fetchall())
    # Every item, those added after the calibration included, carries the bias of the stamp's bank and alpha.
    assert len(stored) == len(ids)
    assert np.allclose([stored[i] for i in ids], expected, atol=1e-4)


def test_cli_calibrate_a_milvus_gallery(tmp_path, world):
    g = f"milvus:{tmp_path / 'm.db'}#photos"
    _cli("gallery", "build", "--model", world["old"], "--data", world["gallery_pairs"], "--out", g)
    stamp = json.loads(_cli("gallery", "calibrate", "--gallery", g, "--model", world["compat"], "--queries", world["train"],
                            "--alpha", "0.75"))["calibration"]
    assert stamp["alpha"] == 0.75 and stamp["bank_size"] == 12
    hits = json.loads(_cli("gallery", "search", "--gallery", g, "--model", world["compat"], "--text", "a red square"))
    assert len(hits) == 6 and all(h["calibrated"] is True for h in hits)
    hits = json.loads(_cli("gallery", "search", "--gallery", g, "--model", world["old"], "--text", "a red square"))
    assert all(h["calibrated"] is None for h in hits)
    info = json.loads(_cli("gallery", "info", "--gallery", g, "--verify"))
    assert info["calibration"]["id"] == stamp["id"] and info["problems"] == []
