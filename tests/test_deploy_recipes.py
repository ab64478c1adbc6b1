"""The recipes of docs/deploy.md (examples/deploy/): the exported map in front of faiss, Qdrant (local
mode) and Milvus (Lite) returns the same top-k ids as `xbt gallery search` with the compatible model, on
the same old gallery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS
from gallery_support import make_images, save_tiny_openclip
from typer.testing import CliRunner

from xbt.cli import app

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "examples" / "deploy"
QUERIES = CORPUS[:4]
K = 5


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """An old gallery of images (old tiny open_clip), a linear compatible model of the new one saved and
    exported as ONNX, and the new model's embeddings of QUERIES as a .npy."""
    import torch

    from xbt.compat.export import export_model
    from xbt.compat.maps import LinearMap
    from xbt.compat.model import CompatibleModel
    from xbt.specs import load_model

    root = tmp_path_factory.mktemp("deploy")
    old_spec = save_tiny_openclip(root / "old", seed=0)
    new_spec = save_tiny_openclip(root / "new", seed=1, embed_dim=48, width=48)
    new, old = load_model(new_spec), load_model(old_spec)
    query_map = LinearMap.from_arrays(torch.randn(48, 32, generator=torch.Generator().manual_seed(5)).numpy())
    CompatibleModel(new, query_map, old.space, new_spec).save_pretrained(root / "compat")
    export_model(load_model(f"compat:{root / 'compat'}"), root / "export", "onnx", encoders=False)
    np.save(root / "queries.npy", new.encode_text(QUERIES).numpy())
    images = make_images(root / "images", 24)
    return {"root": root, "old": old_spec, "compat": f"compat:{root / 'compat'}", "images": images[0].parent,
            "map": root / "export" / "text_map.onnx", "queries": root / "queries.npy"}


def build_gallery(deployment, out: str) -> None:
    result = CliRunner().invoke(app, ["gallery", "build", "--model", deployment["old"], "--data",
                                      str(deployment["images"]), "--out", out])
    assert result.exit_code == 0, result.output


def xbt_search_ids(deployment, gallery: str) -> list[list[str]]:
    """What `xbt gallery search` returns with the compatible model, one query at a time."""
    ids = []
    for text in QUERIES:
        result = CliRunner().invoke(app, ["gallery", "search", "--gallery", gallery, "--model", deployment["compat"],
                                          "--text", text, "-k", str(K)])
        assert result.exit_code == 0, result.output
        ids.append([hit["id"] for hit in json.loads(result.stdout)])
    return ids


def recipe(name: str):
    sys.path.insert(0, str(RECIPES))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(RECIPES))


def recipe_args(deployment) -> list[str]:
    return ["--map", str(deployment["map"]), "--queries", str(deployment["queries"]), "-k", str(K)]


def test_faiss_recipe_returns_the_ids_of_xbt_gallery_search(deployment, tmp_path):
    gallery = str(tmp_path / "gallery")
    build_gallery(deployment, gallery)
    expected = xbt_search_ids(deployment, gallery)
    index = tmp_path / "old.faiss"
    command = [sys.executable, str(RECIPES / "faiss_search.py"), "--index", str(index), *recipe_args(deployment)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "--gallery" in refused.stderr
    first = subprocess.run(command + ["--gallery", gallery], capture_output=True, text=True, env=env, check=True)
    assert json.loads(first.stdout) == expected and index.exists()
    again = subprocess.run(command, capture_output=True, text=True, env=env, check=True)  # the index file alone
    assert json.loads(again.stdout) == expected


def test_qdrant_recipe_returns_the_ids_of_xbt_gallery_search(deployment, tmp_path, capsys):
    gallery = str(tmp_path / "gallery")
    build_gallery(deployment, gallery)
    expected = xbt_search_ids(deployment, gallery)
    qdrant = recipe("qdrant_search")
    args = ["--qdrant-path", str(tmp_path / "qdrant"), "--collection", "photos", *recipe_args(deployment)]
    assert qdrant.main(args + ["--gallery", gallery]) == expected
    assert qdrant.main(args) == expected  # the collection as created: no gallery needed any more


def test_milvus_recipe_returns_the_ids_of_xbt_gallery_search(deployment, tmp_path):
    pytest.importorskip("milvus_lite")
    db = tmp_path / "g.db"
    gallery = f"milvus:{db}#photos"
    build_gallery(deployment, gallery)
    expected = xbt_search_ids(deployment, gallery)
    milvus = recipe("milvus_search")
    assert milvus.main(["--uri", str(db), "--collection", "photos", *recipe_args(deployment)]) == expected
