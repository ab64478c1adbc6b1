"""Galleries filled and searched with real (tiny, random) open_clip models: the CLI commands, ingestion
with a compatible model into the old space, the space guard on models, and chained compatible models."""

from __future__ import annotations

import json

import pytest
import torch
from gallery_support import make_images, save_tiny_openclip
from typer.testing import CliRunner

from xbt.cli import app
from xbt.compat.maps import Projection
from xbt.compat.model import CompatibleModel
from xbt.errors import SpaceMismatchError
from xbt.gallery.ingest import GalleryRetriever, ingest, items_from_folder, load_items
from xbt.gallery.store import Gallery
from xbt.specs import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "old": save_tiny_openclip(root / "old", seed=0),
        "new": save_tiny_openclip(root / "new", seed=1),  # same dimension as old, other weights
        "third": save_tiny_openclip(root / "third", seed=2, embed_dim=48, width=48),
    }


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.stdout


def test_cli_build_info_search(tmp_path, specs):
    images = make_images(tmp_path / "photos", 6)
    _cli("gallery", "build", "--model", specs["old"], "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "g"))
    info = json.loads(_cli("gallery", "info", "--gallery", str(tmp_path / "g"), "--verify"))
    assert info["size"] == 6 and info["index_kind"] == "flat" and info["modality"] == "image"
    assert info["space_id"] == load_model(specs["old"]).space.id and info["problems"] == []
    hits = json.loads(_cli("gallery", "search", "--gallery", str(tmp_path / "g"), "--model", specs["old"],
                           "--image", str(images[2]), "-k", "3"))
    assert [h["id"] for h in hits][0] == "img002.png" and len(hits) == 3
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[0]["payload"]["image"] == str(images[2].resolve())
    hits = json.loads(_cli("gallery", "search", "--gallery", str(tmp_path / "g"), "--model", specs["old"],
                           "--text", "a red square", "-k", "10"))
    assert len(hits) == 6 and all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))


def test_cli_caption_gallery_from_pairs(tmp_path, specs):
    images = make_images(tmp_path / "img", 3)
    captions = ["a dog on grass", "a red car", "two birds", "a blue car"]
    rows = [{"image": str(images[i % 3]), "caption": c, "image_id": f"im{i % 3}"} for i, c in enumerate(captions)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _cli("gallery", "build", "--model", specs["old"], "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "g"),
         "--modality", "text")
    with Gallery.open(tmp_path / "g") as g:
        assert sorted(g.ids()) == ["im0#0", "im0#1", "im1#0", "im2#0"]
        assert g.get(["im0#1"])["im0#1"]["payload"]["caption"] == "a blue car"
    hits = json.loads(_cli("gallery", "search", "--gallery", str(tmp_path / "g"), "--model", specs["old"],
                           "--text", "a red car", "-k", "1"))
    assert hits[0]["id"] == "im1#0"


def test_compatible_model_ingests_into_the_old_space_and_others_are_refused(tmp_path, specs):
    make_images(tmp_path / "old_photos", 4)
    make_images(tmp_path / "new_photos" / "batch2", 3, seed=7)
    old, new = load_model(specs["old"]), load_model(specs["new"])
    compat = CompatibleModel(new, Projection(new.embed_dim, old.embed_dim, "linear"), old.space)
    compat.save_pretrained(tmp_path / "compat")
    gallery = str(tmp_path / "g")
    _cli("gallery", "build", "--model", specs["old"], "--data", str(tmp_path / "old_photos"), "--out", gallery)

    refused = runner.invoke(app, ["gallery", "add", "--gallery", gallery, "--model", specs["new"],
                                  "--data", str(tmp_path / "new_photos")])
    assert refused.exit_code == 1 and "same dimension" in refused.output

    compat_spec = f"compat:{tmp_path / 'compat'}"
    _cli("gallery", "add", "--gallery", gallery, "--model", compat_spec, "--data", str(tmp_path / "new_photos"))
    again = runner.invoke(app, ["gallery", "add", "--gallery", gallery, "--model", compat_spec,
                                "--data", str(tmp_path / "new_photos")])
    assert again.exit_code == 1 and "already in the gallery" in again.output
    _cli("gallery", "add", "--gallery", gallery, "--model", compat_spec, "--data", str(tmp_path / "new_photos"),
         "--on-conflict", "replace")
    with Gallery.open(gallery) as g:
        assert g.verify() == [] and len(g) == 7
        assert sorted(g.ids())[:3] == ["batch2/img000.png", "batch2/img001.png", "batch2/img002.png"]
        retriever = GalleryRetriever(g, compat)
        query = tmp_path / "new_photos" / "batch2" / "img001.png"
        assert retriever.search_images([query], 1)[0][0].id == "batch2/img001.png"
        with pytest.raises(SpaceMismatchError, match="same dimension"):
            GalleryRetriever(g, new)


def test_ingest_reports_undecodable_items_and_keeps_the_rest(tmp_path, specs):
    make_images(tmp_path / "photos", 3)
    (tmp_path / "photos" / "broken.png").write_bytes(b"not really a png")
    model = load_model(specs["old"])
    with Gallery.create(tmp_path / "g", model.space, modality="image") as g:
        report = ingest(g, model, items_from_folder(tmp_path / "photos"), batch_size=2)
        assert sorted(report.added) == ["img000.png", "img001.png", "img002.png"]
        assert [i for i, _ in report.failed] == ["broken.png"] and "cannot decode" in report.failed[0][1]
        assert len(g) == 3


def test_load_items_refuses_a_folder_for_a_caption_gallery(tmp_path):
    make_images(tmp_path / "photos", 1)
    with pytest.raises(Exception, match="folder of images"):
        load_items(tmp_path / "photos", "text")


def test_chained_compatible_models_serve_the_first_gallery(tmp_path, specs):
    """v1 gallery; v2 made compatible with v1; v3 made compatible with v2. Nesting the compatible models
    (v3 -> v2 space -> v1 space) gives a model that declares v1's space: the v1 gallery accepts it."""
    v1, v2, v3 = load_model(specs["old"]), load_model(specs["new"]), load_model(specs["third"])
    torch.manual_seed(0)
    c21 = CompatibleModel(v2, Projection(32, 32, "linear"), v1.space)
    c32 = CompatibleModel(v3, Projection(48, 32, "linear"), v2.space)
    chain = CompatibleModel(c32, c21.projection, v1.space)
    make_images(tmp_path / "photos", 4)
    with Gallery.create(tmp_path / "g", v1.space, modality="image") as g:
        ingest(g, v1, items_from_folder(tmp_path / "photos"))
        assert chain.space == v1.space
        hits = GalleryRetriever(g, chain).search_texts(["a photo"], 2)[0]
        assert len(hits) == 2 and hits[0].space == v1.space.id
        with pytest.raises(SpaceMismatchError):
            GalleryRetriever(g, c32)  # one step only: v2's space
        with pytest.raises(SpaceMismatchError):
            GalleryRetriever(g, v3)
    texts = ["a red car", "two birds"]
    step = torch.nn.functional.normalize(c32.encode_text(texts), dim=-1)
    expected = torch.nn.functional.normalize(c21.projection(step), dim=-1)
    torch.testing.assert_close(chain.encode_text(texts), expected, atol=1e-5, rtol=1e-5)


def test_cli_chain_saves_a_model_that_serves_the_first_gallery(tmp_path, specs, monkeypatch):
    """`xbt chain` composes v3->v2 and v2->v1 into one folder; loaded as compat:, from another working
    directory, it searches the v1 gallery. The wrong order and a plain model are refused, nothing written."""
    v1, v2, v3 = load_model(specs["old"]), load_model(specs["new"]), load_model(specs["third"])
    torch.manual_seed(0)
    c21 = CompatibleModel(v2, Projection(32, 32, "mlp", hidden=8), v1.space)
    c32 = CompatibleModel(v3, Projection(48, 32, "linear"), v2.space)
    torch.nn.init.normal_(c21.projection.mlp[-1].weight, std=0.1)  # a residual that is not zero
    c21.save_pretrained(tmp_path / "c21")
    c32.save_pretrained(tmp_path / "c32")
    monkeypatch.chdir(tmp_path)
    _cli("chain", "--newer", "compat:c32", "--older", "c21", "--out", "c31")
    make_images(tmp_path / "photos", 4)
    _cli("gallery", "build", "--model", specs["old"], "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "g"))
    monkeypatch.chdir(tmp_path / "photos")  # the chain names its newer half by an absolute path
    chained = load_model(f"compat:{tmp_path / 'c31'}")
    saved = json.loads((tmp_path / "c31" / "compat_config.json").read_text())
    assert chained.space == v1.space and saved["lora"] == []
    assert [half["spec"] for half in saved["chain"]] == [f"compat:{(tmp_path / name).resolve()}" for name in ("c32", "c21")]
    assert all(len(half["digest"]) == 64 for half in saved["chain"])  # both halves' artifacts, by sha256
    texts = ["a red car", "two birds"]
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(c21.projection(c32.encode_text(texts)), dim=-1)
    torch.testing.assert_close(chained.encode_text(texts), expected, atol=1e-5, rtol=1e-5)
    hits = json.loads(_cli("gallery", "search", "--gallery", str(tmp_path / "g"), "--model", f"compat:{tmp_path / 'c31'}",
                           "--text", "a red car", "-k", "2"))
    assert len(hits) == 2
    c21_path, c32_path = str(tmp_path / "c21"), str(tmp_path / "c32")
    for newer, older, message in ((c21_path, c32_path, "live in space"), (specs["third"], c21_path, "not an xbt compatible model")):
        refused = runner.invoke(app, ["chain", "--newer", newer, "--older", older, "--out", str(tmp_path / "bad")])
        assert refused.exit_code == 1 and message in " ".join(refused.output.split())  # rich wraps lines
        assert not (tmp_path / "bad").exists()
