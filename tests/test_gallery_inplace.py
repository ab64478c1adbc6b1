"""`backfill_in_place` (issue 26, part 2): in a transformed gallery, transformed rows are replaced by their
native vectors (same id, provenance native) in a backfill order; each backfilled item's score becomes the
native one; reruns resume; a SIGKILL before any replace loses no row and duplicates none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gallery_support import unit_rows
from test_gallery_transform import LinearModel, skip_without_milvus

from xbt.errors import InputError, SpaceMismatchError
from xbt.gallery.index import IndexConfig
from xbt.gallery.ingest import GalleryRetriever
from xbt.gallery.inplace import backfill_in_place
from xbt.gallery.store import Gallery
from xbt.gallery.transform import PROVENANCE_KEY, fitted_map, transform_gallery, transform_status

N = 30
CAPTIONS = [f"caption number {i}" for i in range(N)]


def _transformed(root: Path) -> tuple[LinearModel, Path]:
    """A caption gallery of the old model, transformed into the new model's space by a fitted map."""
    old_model, new_model = LinearModel(16, 5, "old"), LinearModel(24, 6, "new")
    with Gallery.create(root / "old", old_model.space, IndexConfig(kind="flat"), "text") as old:
        old.add(old_model.encode_text(CAPTIONS).numpy(), [f"c{i:02d}" for i in range(N)],
                [{"caption": c, "n": i} for i, c in enumerate(CAPTIONS)], space=old_model.space)
        gmap = fitted_map("procrustes-text", old_model, new_model, fit_texts=[f"fit text {i}" for i in range(60)])
        transform_gallery(old, root / "new", gmap)
    return new_model, root / "new"


def test_backfilled_rows_become_native_in_order_and_a_rerun_finishes(tmp_path):
    new_model, path = _transformed(tmp_path)
    queries = unit_rows(5, 24, 3)
    with Gallery.open(path) as g:
        report = backfill_in_place(g, new_model, order="-field:n", batch_size=4, max_items=10)
        assert report["replaced"] == 10 and (report["transformed"], report["native"]) == (N - 10, 10)
        done = [f"c{i:02d}" for i in range(N - 1, N - 11, -1)]  # the ten largest n first
        rows = g.get(done, with_vectors=True)
        native = new_model.encode_text([rows[i]["payload"]["caption"] for i in done]).numpy()
        np.testing.assert_allclose(np.stack([rows[i]["vector"] for i in done]), native, atol=1e-6)
        assert all(PROVENANCE_KEY not in rows[i]["payload"] and rows[i]["payload"]["n"] >= 20 for i in done)
        hits = g.search(queries, N, space=new_model.space)[0]
        by_id = {h.id: h.score for h in hits}
        for i, vector in zip(done, native):  # each backfilled item's score is now the native one
            assert abs(by_id[i] - float(queries[0] @ vector)) < 1e-5
        served = GalleryRetriever(g, new_model).info()["transform"]  # what the service's /info shows
        assert (served["transformed"], served["native"]) == (N - 10, 10)
        rest = backfill_in_place(g, new_model, order="-field:n", batch_size=4)
        assert rest["replaced"] == N - 10 and (rest["transformed"], rest["native"]) == (0, N) and len(g) == N
        assert backfill_in_place(g, new_model)["replaced"] == 0


def test_a_row_deleted_while_its_batch_is_embedded_stays_deleted(tmp_path, monkeypatch):
    """Another writer deletes rows between the batch's read and its replace: the replace must not bring
    them back (it did with on_conflict="replace"). A second process deletes, so the embedded store's
    write transaction is what decides."""
    from xbt.gallery import inplace

    new_model, path = _transformed(tmp_path)
    real = inplace.embed_items
    victims = ["c03", "c05"]

    def embed_then_race(model, items, modality, batch_size):
        out = real(model, items, modality, batch_size)
        if any(it.id in victims for it in items):
            code = f"from xbt.gallery.store import Gallery\nwith Gallery.open({str(path)!r}) as g: g.delete({victims!r})"
            subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return out

    monkeypatch.setattr(inplace, "embed_items", embed_then_race)
    with Gallery.open(path) as g:
        report = backfill_in_place(g, new_model, order="id", batch_size=8)
        assert report["replaced"] == N - len(victims) and len(g) == N - len(victims)
        assert not g.present(victims) and (report["transformed"], report["native"]) == (0, N - len(victims))


def test_in_place_refuses_what_it_cannot_do(tmp_path):
    new_model, path = _transformed(tmp_path)
    with Gallery.open(path) as g:
        with pytest.raises(InputError, match="benefit order"):
            backfill_in_place(g, new_model, order="benefit")
        with pytest.raises(SpaceMismatchError):
            backfill_in_place(g, LinearModel(24, 7, "another"))
    with Gallery.open(tmp_path / "old") as old, pytest.raises(InputError, match="not made by `xbt gallery transform`"):
        backfill_in_place(old, LinearModel(16, 5, "old"))


_KILL_SCRIPT = """
import os, signal, sys
sys.path[:0] = {paths!r}
from test_gallery_transform import LinearModel, skip_without_milvus
from xbt.gallery.base import open_gallery
from xbt.gallery.inplace import backfill_in_place
from xbt.gallery.store import Gallery as backend

if sys.argv[2].startswith("milvus:"):
    from xbt.gallery.milvus import MilvusGallery as backend
kill_at, calls, real = int(sys.argv[1]), [0], backend.add
def add(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
backend.add = add
with open_gallery(sys.argv[2]) as g:
    backfill_in_place(g, LinearModel(24, 6, "new"), order="id", batch_size=8)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["embedded", "milvus"])
def test_an_in_place_backfill_killed_before_each_replace_resumes(tmp_path, backend):
    import shutil

    from xbt.gallery.base import copy_gallery, open_gallery

    skip_without_milvus(backend)
    new_model, path = _transformed(tmp_path)
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT.format(paths=[str(Path(__file__).parent), *sys.path]))

    def run(kill_at: int, target: str) -> subprocess.CompletedProcess:
        if backend == "milvus":
            from xbt.gallery.milvus import release_lite

            release_lite(target[len("milvus:"):].split("#")[0])  # Milvus Lite admits one process at a time
        return subprocess.run([sys.executable, str(script), str(kill_at), target], capture_output=True, text=True,
                              timeout=300, env={**os.environ})

    for kill_at in range(1, -(-N // 8) + 1):
        if backend == "milvus":
            target = f"milvus:{tmp_path / f'g{kill_at}.db'}#transformed"
            with Gallery.open(path) as transformed:
                copy_gallery(transformed, target)  # the stamp and the marked payloads travel with the rows
        else:
            target = str(tmp_path / f"g{kill_at}")
            shutil.copytree(path, target)
        killed = run(kill_at, target)
        assert killed.returncode == -9, killed.stderr
        with open_gallery(target) as g:
            status = transform_status(g)
            assert len(g) == N and g.verify() == [] and status is not None
            assert status["native"] == min(8 * (kill_at - 1), N)  # every acknowledged replace, no row lost
        rerun = run(0, target)
        assert rerun.returncode == 0, rerun.stderr
        with open_gallery(target) as g:
            assert len(g) == N and sorted(g.ids()) == sorted(set(g.ids())) and transform_status(g)["native"] == N  # type: ignore[index]
            rows = g.get(sorted(g.ids()), with_vectors=True)
            native = new_model.encode_text([r["payload"]["caption"] for r in rows.values()]).numpy()
            np.testing.assert_allclose(np.stack([r["vector"] for r in rows.values()]), native, atol=1e-6)
