"""Every method becomes a deployable compatible model: fit, save, load in a fresh process (same vectors),
put into a gallery, searched from the CLI and over HTTP; tampered artifacts and other spaces refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gallery_support import make_images, save_tiny_openclip
from typer.testing import CliRunner

from xbt.cli import app
from xbt.compat.fit import fit_peer
from xbt.compat.model import CompatibleModel, chain
from xbt.compat.registry import PEER_METHODS
from xbt.data.pairs import Pair
from xbt.errors import AssetMissingError, InputError, SpaceMismatchError
from xbt.specs import load_model

runner = CliRunner()
WORDS = ["red", "green", "blue", "small", "large", "round", "square", "bright", "dark", "striped"]
THINGS = ["apple", "car", "bird", "house", "tree", "cat", "boat", "lamp"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat_world")
    specs = {
        "old": save_tiny_openclip(root / "old", seed=0),
        "new": save_tiny_openclip(root / "new", seed=1, embed_dim=48, width=48),
        "imposter": save_tiny_openclip(root / "imposter", seed=5),  # the old model's dimension, other weights
    }
    images = make_images(root / "images", 24)
    captions = [f"a {WORDS[i % len(WORDS)]} {THINGS[i % len(THINGS)]}" for i in range(24)]
    pairs = [Pair(str(img), cap, f"im{i}") for i, (img, cap) in enumerate(zip(images, captions))]
    texts = [f"{w} {t}" for w in WORDS for t in THINGS]
    return {"root": root, "specs": specs, "train": pairs[:16], "support": pairs[16:], "texts": texts,
            "queries": captions[16:], "query_images": [str(p) for p in images[16:]]}


def _fit(world, name: str, old_spec: str | None = None) -> CompatibleModel:
    specs = world["specs"]
    options = {"epochs": 3, "hidden": 16} if name.startswith("adapter") else {}
    return fit_peer(name, load_model(old_spec or specs["old"]), load_model(specs["new"]), world["texts"],
                    world["train"], world["support"], **options)


@pytest.fixture(scope="module")
def saved(world) -> dict[str, Path]:
    folders = {}
    for name in PEER_METHODS:
        folder = world["root"] / "models" / name
        _fit(world, name).save_pretrained(folder)
        folders[name] = folder
    return folders


def test_every_peer_saves_and_loads_in_a_fresh_process_with_the_same_vectors(world, saved, tmp_path):
    expected = {}
    for name, folder in saved.items():
        model = load_model(f"compat:{folder}")
        assert model.space == load_model(world["specs"]["old"]).space and model.method == name
        config = json.loads((folder / "compat_config.json").read_text())
        per_tower = name.endswith("-gallery")  # a map per query tower (format 3), else one shared map
        files = {"map_text.safetensors", "map_image.safetensors"} if per_tower else {"map.safetensors"}
        assert set(os.listdir(folder)) == {"compat_config.json", *files}  # no pickle anywhere
        assert set(config["weights_sha256"]) == files and config["format"] == "xbt.compat/3"
        assert model.shares_query_map != per_tower
        ensemble = name.startswith("slerp")
        assert config["needs_old_model_at_query_time"] == ensemble
        assert ("old_model" in config) == ensemble
        expected[name] = (model.encode_text(world["queries"]).numpy(), model.encode_image(world["query_images"]).numpy())
    script = (
        "import json, sys, numpy as np\n"
        "from xbt.specs import load_model\n"
        "args = json.loads(sys.argv[1])\n"
        "for name, folder in args['folders'].items():\n"
        "    m = load_model('compat:' + folder)\n"
        "    np.save(f\"{args['out']}/{name}-text.npy\", m.encode_text(args['queries']).numpy())\n"
        "    np.save(f\"{args['out']}/{name}-image.npy\", m.encode_image(args['images']).numpy())\n"
    )
    args = {"folders": {n: str(f) for n, f in saved.items()}, "out": str(tmp_path), "queries": world["queries"],
            "images": world["query_images"]}
    env = os.environ | {"PYTHONPATH": str(Path("src").resolve())}
    subprocess.run([sys.executable, "-c", script, json.dumps(args)], check=True, env=env, timeout=600)
    for name, (text, image) in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{name}-text.npy"), text, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.load(tmp_path / f"{name}-image.npy"), image, atol=1e-6, err_msg=name)


def test_slerp_is_an_ensemble_that_loads_and_runs_the_old_model(world, saved):
    model = load_model(f"compat:{saved['slerp']}")
    old = load_model(world["specs"]["old"])
    assert model.needs_old_model_at_query_time and model.old_model.space == old.space
    weight = model.query_map.weight
    if weight == 0:  # the support split chose the old model alone: the ensemble returns its vectors
        np.testing.assert_allclose(model.encode_text(world["queries"]).numpy(),
                                   old.encode_text(world["queries"]).numpy(), atol=1e-5)
    with pytest.raises(InputError, match="ensemble"):
        model.forward_text(model.tokenize(["a red apple"]))


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_every_peer_serves_the_old_gallery_from_the_cli_and_a_same_dimension_imposter_is_refused(world, saved, tmp_path):
    specs = world["specs"]
    gallery = tmp_path / "gallery"
    assert _cli("gallery", "build", "--model", specs["old"], "--data", world["root"] / "images", "--out", gallery).exit_code == 0
    new_items = make_images(tmp_path / "new_items" / "extra", 3, seed=9)  # ids extra/img00N.png
    for name, folder in saved.items():
        hits = _cli("gallery", "search", "--gallery", gallery, "--model", f"compat:{folder}", "--text", "a red apple", "-k", "4")
        assert hits.exit_code == 0, (name, hits.output)
        assert len(json.loads(hits.stdout)) == 4
    added = _cli("gallery", "add", "--gallery", gallery, "--model", f"compat:{saved['procrustes-both']}",
                 "--data", tmp_path / "new_items")
    assert added.exit_code == 0, added.output
    info = _cli("gallery", "info", "--gallery", gallery, "--model", f"compat:{saved['slerp']}")
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["size"] == 24 + len(new_items)
    assert described["model"]["needs_old_model_at_query_time"] is True and described["model"]["old_model"] == specs["old"]
    # A compatible model into the imposter's space (same dimension as the old one) is refused.
    imposter = tmp_path / "imposter-compat"
    _fit(world, "procrustes-text", specs["imposter"]).save_pretrained(imposter)
    refused = _cli("gallery", "search", "--gallery", gallery, "--model", f"compat:{imposter}", "--text", "a car")
    assert refused.exit_code != 0 and "same dimension" in refused.output


def test_every_peer_is_served_over_http(world, saved, tmp_path):
    from fastapi.testclient import TestClient

    from xbt.gallery.ingest import GalleryRetriever, ingest, items_from_folder
    from xbt.gallery.store import Gallery
    from xbt.serve.app import create_app

    old = load_model(world["specs"]["old"])
    with Gallery.create(tmp_path / "g", old.space, modality="image") as gallery:
        ingest(gallery, old, items_from_folder(world["root"] / "images"))
    for name in ("procrustes-both", "slerp", "adapter"):
        retriever = GalleryRetriever(Gallery.open(tmp_path / "g"), load_model(f"compat:{saved[name]}"))
        with TestClient(create_app(retriever), base_url="http://127.0.0.1") as client:  # a Host the service answers
            r = client.post("/search/text", json={"text": "a blue bird", "k": 3})
            assert r.status_code == 200, r.text
            assert len(r.json()["results"]) == 3
        retriever.close()


def test_an_artifact_changed_in_place_is_refused(world, saved, tmp_path):
    import shutil

    folder = tmp_path / "affine"
    shutil.copytree(saved["affine"], folder)
    load_model(f"compat:{folder}")
    data = bytearray((folder / "map.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one weight changed, config untouched
    (folder / "map.safetensors").write_bytes(bytes(data))
    with pytest.raises(SpaceMismatchError, match="changed after"):
        load_model(f"compat:{folder}")
    (folder / "map.safetensors").unlink()
    with pytest.raises(AssetMissingError, match="incomplete"):
        load_model(f"compat:{folder}")


def test_a_chain_refuses_a_newer_half_retrained_in_place(world, tmp_path):
    specs = world["specs"]
    v1, v2 = load_model(specs["old"]), load_model(specs["imposter"])  # two 32-d generations
    v3 = load_model(specs["new"])
    _fit(world, "procrustes-both", specs["imposter"]).save_pretrained(tmp_path / "v3-v2")  # v3 -> v2
    older = fit_peer("procrustes-text", v1, v2, world["texts"])
    older.save_pretrained(tmp_path / "v2-v1")
    chained = chain(load_model(f"compat:{tmp_path / 'v3-v2'}"), load_model(f"compat:{tmp_path / 'v2-v1'}"))
    chained.save_pretrained(tmp_path / "v3-v1")
    reloaded = load_model(f"compat:{tmp_path / 'v3-v1'}")
    assert reloaded.space == v1.space
    torch.testing.assert_close(reloaded.encode_text(["a red car"]), chained.encode_text(["a red car"]))
    # The newer half is refitted in place (other data): the chain must not silently serve it.
    fit_peer("procrustes-text", v2, v3, world["texts"][:20]).save_pretrained(tmp_path / "v3-v2")
    with pytest.raises(SpaceMismatchError, match="changed"):
        load_model(f"compat:{tmp_path / 'v3-v1'}")
    with pytest.raises(InputError, match="ensemble"):
        chain(load_model(f"compat:{tmp_path / 'v3-v2'}"), _fit(world, "slerp"))


def test_a_model_with_text_adapters_is_evaluated_by_mapping_cached_image_features_and_encoding_texts(world):
    from xbt.compat.maps import Projection
    from xbt.embed import embed_pairs
    from xbt.compat.queries import compatible_queries

    specs, pairs = world["specs"], world["support"]
    old, new = load_model(specs["old"]), load_model(specs["new"])
    old_e, new_e = embed_pairs(old, pairs), embed_pairs(new, pairs)
    torch.manual_seed(0)
    model = CompatibleModel(load_model(specs["new"]), Projection(48, 32, "linear"), old.space)
    params = model.enable_lora("text", {"r": 2})
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # adapters that change the text tower
    assert model.runs_unadapted("image", new_e.space) and not model.runs_unadapted("text", new_e.space)
    queries = compatible_queries(model, pairs, new_e, old_e)
    images = [p.image for p in pairs]
    np.testing.assert_allclose(queries.images, model.encode_image(images).numpy(), atol=1e-5)
    np.testing.assert_allclose(queries.texts, model.encode_text([p.caption for p in pairs]).numpy(), atol=1e-6)
    assert not np.allclose(queries.texts, model.map_features(new_e.texts), atol=1e-3)  # the adapters count


def test_lora_layers_select_blocks_of_an_open_clip_text_tower(world):
    from xbt.compat.maps import Projection

    new = load_model(world["specs"]["new"])
    model = CompatibleModel(new, Projection(48, 32, "linear"), load_model(world["specs"]["old"]).space)
    model.enable_lora("text", {"r": 2, "layers": [0]})  # open_clip keeps its blocks in `resblocks`
    adapted = {n.split(".")[1] for n, _ in model._lora_module("text").named_parameters() if "lora_" in n}
    assert adapted == {"0"}


def test_fit_cli_takes_unlabeled_images_and_texts_and_gallery_info_names_each_towers_map(world, tmp_path):
    specs = world["specs"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(world["texts"]) + "\n")
    out = tmp_path / "gallery-maps"
    # no caption-image pair at all: texts for the image queries' map, unlabeled images for the text queries' map
    fitted = _cli("fit", "procrustes-gallery", "--old", specs["old"], "--new", specs["new"], "--out", out,
                  "--fit-text", corpus, "--fit-images", world["root"] / "images")  # --fit-text: the older spelling
    assert fitted.exit_code == 0, fitted.output
    assert "24 unlabeled images" in fitted.output and "a map per query tower" in fitted.output
    model = load_model(f"compat:{out}")
    assert not model.shares_query_map and model.describe_query_maps()["text"]["fitted_on"].startswith("image pairs")
    gallery = tmp_path / "gallery"
    assert _cli("gallery", "build", "--model", specs["old"], "--data", world["root"] / "images", "--out", gallery).exit_code == 0
    info = _cli("gallery", "info", "--gallery", gallery, "--model", f"compat:{out}")
    assert info.exit_code == 0, info.output
    maps = json.loads(info.stdout)["model"]["query_maps"]
    assert maps["shared"] is False and maps["text"]["searches"] == "old images" and maps["image"]["kind"] == "linear"
    hits = _cli("gallery", "search", "--gallery", gallery, "--model", f"compat:{out}", "--text", "a red apple", "-k", "3")
    assert hits.exit_code == 0 and len(json.loads(hits.stdout)) == 3
    without = _cli("fit", "procrustes-gallery", "--old", specs["old"], "--new", specs["new"], "--out", tmp_path / "x",
                   "--fit-texts", corpus)
    assert without.exit_code != 0 and "--fit-images" in without.output  # the image side has nothing to fit on
