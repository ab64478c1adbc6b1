"""`xbt gallery transform` (issue 26, part 1): an old-space gallery carried into the new space by an old->new
map. At 0% backfilled a gallery transformed by the transpose of an orthogonal query map ranks exactly as
the old gallery searched through that query map; maps of the wrong shape or spaces are refused; payloads,
media and provenance follow the rows; an interrupted transform resumes, and a SIGKILL before any of its
steps loses and duplicates nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from gallery_support import unit_rows
from torch import nn

from xbt.compat.maps import LinearMap
from xbt.compat.model import CompatibleModel
from xbt.compat.procrustes import orthogonal_procrustes
from xbt.errors import InputError, SpaceMismatchError
from xbt.gallery.index import IndexConfig
from xbt.gallery.store import Gallery
from xbt.gallery.transform import (
    PROVENANCE_KEY,
    GalleryMap,
    fitted_map,
    transform_gallery,
    transform_status,
    transposed_query_map,
)
from xbt.models.base import EmbeddingSpace, VLPModel

OLD_DIM, NEW_DIM, N = 16, 24, 150
OLD_SPACE = EmbeddingSpace("old-model", OLD_DIM, "f" * 64)


class LinearModel(VLPModel):
    """Both towers one fixed linear map of a latent vector (texts and images given as latent vectors)."""

    def __init__(self, dim: int, seed: int, name: str):
        super().__init__()
        self.dim, self.spec = dim, name
        self.proj = nn.Linear(8, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(np.random.default_rng(seed).standard_normal((dim, 8))))

    @property
    def embed_dim(self) -> int:
        return self.dim

    @property
    def image_transform(self):
        return lambda img: torch.zeros(8)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.random.default_rng(zlib.crc32(t.encode())).standard_normal(8)).float()
                            for t in texts])  # the same latent in every process (str hashes are salted)

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)

    def forward_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens)


def _procrustes_model(new_model: VLPModel, old_space: EmbeddingSpace = OLD_SPACE) -> CompatibleModel:
    """A Procrustes query map new -> old (fitted on random pairs: any rotation will do here)."""
    x, y = unit_rows(64, NEW_DIM, 1), unit_rows(64, old_space.dim, 2)
    rotation = orthogonal_procrustes(x, y)[:NEW_DIM, : old_space.dim]
    return CompatibleModel(new_model, LinearMap.from_arrays(rotation), old_space, method="procrustes-text")


def _old_gallery(folder: Path, n: int = N, space: EmbeddingSpace = OLD_SPACE) -> Gallery:
    g = Gallery.create(folder, space, IndexConfig(kind="flat"), "image")
    g.add(unit_rows(n, space.dim, 3), [f"item{i:04d}" for i in range(n)], [{"caption": f"c{i}"} for i in range(n)],
          space=space)
    return g


def _ranking(hits) -> list[list[str]]:
    return [[h.id for h in row] for row in hits]


def test_transposed_orthogonal_map_ranks_as_the_query_side_map(tmp_path):
    new_model = LinearModel(NEW_DIM, 0, "new")
    compat = _procrustes_model(new_model)
    gmap = transposed_query_map(compat, "text")
    with _old_gallery(tmp_path / "old") as old:
        report = transform_gallery(old, tmp_path / "new", gmap, batch=40)
        assert report["written"] == N and report["already_present"] == 0
        queries = unit_rows(30, NEW_DIM, 7)  # native new-model query vectors
        query_side = compat.query_map.apply(queries)  # what the old gallery is searched with today
        expected = old.search(query_side, 10, space=OLD_SPACE)
    with Gallery.open(tmp_path / "new") as new:
        assert new.space == new_model.space and len(new) == N
        got = new.search(queries, 10, space=new_model.space)
        stored = new.get(["item0003"], with_vectors=True)["item0003"]
    assert _ranking(got) == _ranking(expected)
    # <q, R^T g> = <q R, g>: the query side normalises q R (shorter than q where the new space is the
    # larger), so its scores are these divided by |q R|, one factor per query, which leaves each ranking
    scale = np.linalg.norm(queries @ compat.query_map.weight.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose([[h.score for h in r] for r in got],
                               scale * np.array([[h.score for h in r] for r in expected]), atol=1e-5)
    assert abs(np.linalg.norm(stored["vector"]) - 1) < 1e-5  # renormalised
    assert stored["payload"]["caption"] == "c3"
    assert stored["payload"][PROVENANCE_KEY] == {"kind": "transformed", "map": gmap.digest}


def test_info_counts_transformed_and_native_rows_and_media_follow(tmp_path):
    new_model = LinearModel(NEW_DIM, 0, "new")
    gmap = transposed_query_map(_procrustes_model(new_model), "text")
    with _old_gallery(tmp_path / "old", n=5) as old:
        image = old.store_media(b"\x89PNG fake bytes", "png")
        old.add(unit_rows(1, OLD_DIM, 9), ["with-image"], [{"image": str(image)}], space=OLD_SPACE)
        assert transform_status(old) is None  # no transform made it
        transform_gallery(old, tmp_path / "new", gmap)
    with Gallery.open(tmp_path / "new") as new:
        assert transform_status(new) == {"transformed": 6, "native": 0, "map": gmap.digest, "made_by": gmap.made_by,
                                         "source": str((tmp_path / "old").resolve())}
        new.add(unit_rows(1, NEW_DIM, 4), ["native-1"], [{"caption": "new"}], space=new_model.space)
        assert transform_status(new)["native"] == 1  # type: ignore[index]
        moved = Path(new.get(["with-image"])["with-image"]["payload"]["image"])
        assert moved.parent == new.media_dir and moved.read_bytes() == b"\x89PNG fake bytes"


def test_maps_of_the_wrong_shape_or_spaces_are_refused(tmp_path):
    new_model = LinearModel(NEW_DIM, 0, "new")
    with pytest.raises(SpaceMismatchError, match="must map 16-d vectors"):
        GalleryMap(LinearMap.from_arrays(np.zeros((OLD_DIM, NEW_DIM + 1), np.float32)), OLD_SPACE, new_model.space, "x")
    other = EmbeddingSpace("another-old-model", OLD_DIM, "e" * 64)
    gmap = transposed_query_map(_procrustes_model(new_model, other), "text")
    with _old_gallery(tmp_path / "old", n=3) as old, pytest.raises(SpaceMismatchError, match="use a map made for"):
        transform_gallery(old, tmp_path / "new", gmap)
    assert not (tmp_path / "new").exists()
    # an affine (non-orthogonal) query map cannot be transposed; nor can a map with a bias
    skew = CompatibleModel(new_model, LinearMap.from_arrays(2 * np.eye(NEW_DIM, OLD_DIM, dtype=np.float32)), OLD_SPACE)
    with pytest.raises(InputError, match="not orthogonal"):
        transposed_query_map(skew, "text")
    biased = CompatibleModel(new_model, LinearMap.from_arrays(np.eye(NEW_DIM, OLD_DIM, dtype=np.float32),
                                                              np.ones(OLD_DIM, np.float32)), OLD_SPACE)
    with pytest.raises(InputError, match="with a bias"):
        transposed_query_map(biased, "text")


def test_a_rerun_resumes_and_another_map_is_refused(tmp_path, monkeypatch):
    new_model = LinearModel(NEW_DIM, 0, "new")
    gmap = transposed_query_map(_procrustes_model(new_model), "text")
    with _old_gallery(tmp_path / "old") as old:
        import xbt.gallery.transform as transform

        real, calls = transform._transform_batch, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(transform, "_transform_batch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            transform_gallery(old, tmp_path / "new", gmap, batch=40)
        monkeypatch.setattr(transform, "_transform_batch", real)
        assert len(Gallery.open(tmp_path / "new")) == 80
        report = transform_gallery(old, tmp_path / "new", gmap, batch=40)
        assert (report["written"], report["already_present"]) == (N - 80, 80)
        assert report["info"]["size"] == N
        refit = GalleryMap(LinearMap.from_arrays(-gmap.linear.weight.numpy()), OLD_SPACE, new_model.space, "flipped")
        with pytest.raises(InputError, match="choose a new --out, or rerun with the map that made it"):
            transform_gallery(old, tmp_path / "new", refit)


def test_an_old_to_new_map_fitted_with_compat_procrustes(tmp_path):
    old_model, new_model = LinearModel(OLD_DIM, 5, "old"), LinearModel(NEW_DIM, 6, "new")
    texts = [f"text {i}" for i in range(80)]
    gmap = fitted_map("procrustes-text", old_model, new_model, fit_texts=texts)
    assert (gmap.old_space, gmap.new_space) == (old_model.space, new_model.space)
    old_vectors = old_model.encode_text(texts[:10]).numpy()
    new_vectors = new_model.encode_text(texts[:10]).numpy()
    mapped = gmap.apply(old_vectors)
    # a rotation of an 8-d latent world: the map carries each text's old vector close to its new one
    assert np.mean(np.sum(mapped * new_vectors, axis=1)) > 0.9
    with pytest.raises(InputError, match="--fit must be one of"):
        fitted_map("slerp", old_model, new_model, fit_texts=texts)


def test_milvus_to_milvus_ranks_as_the_query_side_map_and_resumes(tmp_path):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from xbt.gallery.base import copy_gallery, open_gallery

    new_model = LinearModel(NEW_DIM, 0, "new")
    compat = _procrustes_model(new_model)
    gmap = transposed_query_map(compat, "text")
    old_ref, new_ref = f"milvus:{tmp_path / 'g.db'}#old", f"milvus:{tmp_path / 'g.db'}#transformed"
    with _old_gallery(tmp_path / "embedded") as embedded:
        copy_gallery(embedded, old_ref, index=IndexConfig(kind="flat"))
    queries = unit_rows(20, NEW_DIM, 7)
    with open_gallery(old_ref) as old:
        first = old.ids()[:70]
        report = transform_gallery(old, new_ref, gmap, batch=50)
        assert report["written"] == N
        again = transform_gallery(old, new_ref, gmap, batch=50)
        assert (again["written"], again["already_present"]) == (0, N)
        expected = old.search(compat.query_map.apply(queries), 10, space=OLD_SPACE)
    with open_gallery(new_ref) as new:
        assert new.space == new_model.space and len(new) == N
        assert _ranking(new.search(queries, 10, space=new_model.space)) == _ranking(expected)
        assert transform_status(new)["transformed"] == N  # type: ignore[index]
        assert new.get(first[:1])[first[0]]["payload"][PROVENANCE_KEY]["map"] == gmap.digest


# ----- kill safety: a real SIGKILL before each of the transform's writing steps ----------------------------
_KILL_SCRIPT = """
import os, signal, sys
sys.path[:0] = {paths!r}
from test_gallery_transform import LinearModel, _procrustes_model
from xbt.gallery.store import Gallery
from xbt.gallery.transform import transform_gallery, transposed_query_map

kill_at, calls = int(sys.argv[1]), [0]
def step(real):
    def wrapped(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)
    return wrapped
backend = Gallery
if sys.argv[3].startswith("milvus:"):
    from xbt.gallery.milvus import MilvusGallery as backend
backend.add, backend.compact = step(backend.add), step(backend.compact)
gmap = transposed_query_map(_procrustes_model(LinearModel(24, 0, "new")), "text")
with Gallery.open(sys.argv[2]) as old:
    transform_gallery(old, sys.argv[3], gmap, batch=40)
"""


def skip_without_milvus(backend: str) -> None:
    """The Milvus variant of a test needs pymilvus and Milvus Lite (pinned in the lock)."""
    if backend == "milvus":
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")


def _run_transform(script: Path, kill_at: int, old: Path, new: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), str(kill_at), str(old), new], capture_output=True,
                          text=True, timeout=300, env={**os.environ})


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["embedded", "milvus"])
def test_a_transform_killed_before_each_step_resumes_without_loss_or_duplicates(tmp_path, backend):
    from xbt.gallery.base import open_gallery

    skip_without_milvus(backend)
    _old_gallery(tmp_path / "old").close()
    new_model = LinearModel(NEW_DIM, 0, "new")
    gmap = transposed_query_map(_procrustes_model(new_model), "text")
    with Gallery.open(tmp_path / "old") as old:
        transform_gallery(old, tmp_path / "clean", gmap, batch=40)  # the uninterrupted run, to compare with
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT.format(paths=[str(Path(__file__).parent), *sys.path]))
    batches = -(-N // 40)
    for kill_at in range(1, batches + 2):  # SIGKILL before each batch's add, then before the compaction
        target = f"milvus:{tmp_path / f'new{kill_at}.db'}#new" if backend == "milvus" else str(tmp_path / f"new{kill_at}")
        killed = _run_transform(script, kill_at, tmp_path / "old", target)
        assert killed.returncode == -9, killed.stderr
        with open_gallery(target) as new:  # Milvus Lite's lock died with the process
            ids = new.ids()
            assert len(ids) == len(set(ids)) == min(40 * (kill_at - 1), N)  # every acknowledged batch, once
            assert new.verify() == []
        _release(target)
        rerun = _run_transform(script, 0, tmp_path / "old", target)  # the same command, no manual step
        assert rerun.returncode == 0, rerun.stderr
        with open_gallery(target) as new, Gallery.open(tmp_path / "clean") as clean:
            assert sorted(new.ids()) == sorted(clean.ids()) and transform_status(new)["transformed"] == N  # type: ignore[index]
            a, b = new.get(new.ids(), with_vectors=True), clean.get(clean.ids(), with_vectors=True)
            for i in a:
                np.testing.assert_array_equal(a[i]["vector"], b[i]["vector"])
                assert a[i]["payload"] == b[i]["payload"]
        _release(target)


def _release(target: str) -> None:
    """Hand a Milvus Lite file back (it admits one process at a time) before a subprocess opens it."""
    if target.startswith("milvus:"):
        from xbt.gallery.milvus import release_lite

        release_lite(target[len("milvus:"):].split("#")[0])


# ----- the command line ------------------------------------------------------------------------------------
def test_the_command_transforms_resumes_reports_and_refuses(tmp_path):
    import json

    from gallery_support import make_images, transposable_gallery
    from typer.testing import CliRunner

    from xbt.cli import app
    from xbt.specs import load_model

    old_spec, new_spec, _gallery, images = transposable_gallery(tmp_path)
    new = load_model(new_spec)
    runner = CliRunner()

    def cli(*args: str, ok: bool = True) -> str:
        result = runner.invoke(app, list(args))
        assert (result.exit_code == 0) == ok, f"{args}: {result.output}"
        return result.stdout if ok else result.output

    common = ["gallery", "transform", "--gallery", str(tmp_path / "g"), "--device", "cpu"]
    assert "give --map compat:DIR" in " ".join(cli(*common, "--out", str(tmp_path / "t"), ok=False).split())
    out = json.loads(cli(*common, "--out", str(tmp_path / "t"), "--map", f"compat:{tmp_path / 'compat'}"))
    assert out["written"] == 20 and out["info"]["space"] == new.space.to_dict()
    again = json.loads(cli(*common, "--out", str(tmp_path / "t"), "--map", f"compat:{tmp_path / 'compat'}"))
    assert (again["written"], again["already_present"]) == (0, 20)
    info = json.loads(cli("gallery", "info", "--gallery", str(tmp_path / "t")))
    assert (info["transform"]["transformed"], info["transform"]["native"]) == (20, 0)
    hits = json.loads(cli("gallery", "search", "--gallery", str(tmp_path / "t"), "--model", new_spec, "--text", "a red",
                          "--k", "3", "--device", "cpu"))
    assert len(hits) == 3 and all(h["payload"][PROVENANCE_KEY]["kind"] == "transformed" for h in hits)
    backfill = ["gallery", "backfill", "--in-place", "--gallery", str(tmp_path / "t"), "--model", new_spec, "--device", "cpu"]
    assert "no --state" in " ".join(cli(*backfill, "--state", str(tmp_path / "mig"), ok=False).split())
    half = json.loads(cli(*backfill, "--order", "id", "--max-items", "5", "--batch-size", "4"))
    assert (half["replaced"], half["transformed"], half["native"], half["failed"]) == (5, 15, 5, {})
    info = json.loads(cli("gallery", "info", "--gallery", str(tmp_path / "t")))
    assert (info["transform"]["transformed"], info["transform"]["native"]) == (15, 5)
    with Gallery.open(tmp_path / "t") as t:
        stored = t.get(["item0000"], with_vectors=True)["item0000"]
    np.testing.assert_allclose(stored["vector"], new.encode_image([images[0]]).numpy()[0], atol=1e-5)
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"a photo of thing {i}\n" for i in range(40)))
    fit = ["--fit", "procrustes-text", "--old", old_spec, "--new", new_spec, "--fit-texts", str(texts)]
    refused = cli(*common, "--out", str(tmp_path / "t"), *fit, ok=False)  # another map than the one that made t
    assert "choose a new --out, or rerun with the map that made it" in " ".join(refused.split())
    fitted = json.loads(cli(*common, "--out", str(tmp_path / "f"), *fit))
    assert fitted["written"] == 20 and "procrustes-text fitted old->new on 40 texts" in fitted["made_by"]
    make_images(tmp_path / "unlabeled", 40, seed=9)
    by_images = json.loads(cli(*common, "--out", str(tmp_path / "i"), "--fit", "procrustes-image", "--old", old_spec,
                               "--new", new_spec, "--fit-images", str(tmp_path / "unlabeled")))
    assert by_images["written"] == 20 and "on 0 texts and 40 images" in by_images["made_by"]
    assert by_images["map"] != fitted["map"]


@pytest.mark.parametrize("backend", ["embedded", pytest.param("milvus", marks=pytest.mark.slow)])
def test_transform_status_counts_by_query_without_reading_payloads(tmp_path, backend, monkeypatch):
    """The rows still transformed are counted by the backend's query on the payload mark: no payload is read
    into Python (a gallery of millions would be read whole at every /info)."""
    gmap = GalleryMap(LinearMap.from_arrays(np.eye(OLD_DIM, NEW_DIM, dtype=np.float32)), OLD_SPACE,
                      LinearModel(NEW_DIM, 0, "new").space, "pad")
    target = tmp_path / "new" if backend == "embedded" else f"milvus:{tmp_path / 'm.db'}#new"
    skip_without_milvus(backend)
    with _old_gallery(tmp_path / "old", n=20) as old:
        transform_gallery(old, target, gmap)
    from xbt.gallery.base import open_gallery

    with open_gallery(target) as g:
        g.add(unit_rows(3, NEW_DIM, 8), ["item0001", "item0002", "extra"], [{"caption": "x"}, None, {"k": {"kind": "transformed"}}],
              space=gmap.new_space, on_conflict="replace")
        monkeypatch.setattr(type(g), "iter_items", lambda *a, **k: pytest.fail("payloads read"))
        status = transform_status(g)
    assert (status["transformed"], status["native"]) == (18, 3) and status["map"] == gmap.digest
