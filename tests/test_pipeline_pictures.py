"""The main job's example pictures: drawn from the vectors given (the evaluation's), in the gallery's space, and
drawn again only when what a picture shows changed."""

from __future__ import annotations

import pytest
from gallery_support import make_images, unit_rows

from xbt import pipeline
from xbt.errors import SpaceMismatchError
from xbt.gallery import Gallery
from xbt.models.base import EmbeddingSpace

SPACE = EmbeddingSpace("pictures-test", 8, "a" * 64)


@pytest.fixture()
def image_gallery(tmp_path):
    images = make_images(tmp_path / "img", 6)
    gallery = Gallery.create(tmp_path / "g", SPACE, modality="image")
    gallery.add(unit_rows(6, 8, 0), [f"i{n}" for n in range(6)], [{"image": str(p)} for p in images], space=SPACE)
    return gallery, images


def test_pictures_are_drawn_once_and_again_when_what_they_show_changes(image_gallery, tmp_path, monkeypatch):
    gallery, images = image_gallery
    queries, truth = ["a red block", "a blue block"], [{"i0"}, {"i3"}]
    vectors = unit_rows(2, 8, 1)
    rows = [("old", gallery, vectors, SPACE), ("upgraded", gallery, vectors[::-1].copy(), SPACE)]
    out = tmp_path / "examples"
    paths = pipeline.example_grids(rows, queries, "text", truth, out, k=3)
    assert [p.name for p in paths] == ["text-query-1.png", "text-query-2.png"]
    assert all(p.stat().st_size > 1000 for p in paths)

    drawn = []
    real_draw = pipeline._draw_example
    monkeypatch.setattr(pipeline, "_draw_example", lambda path, *a: (drawn.append(path.name), real_draw(path, *a)))
    assert pipeline.example_grids(rows, queries, "text", truth, out, k=3) == paths and drawn == []  # nothing changed
    moved = [rows[0], ("upgraded", gallery, vectors.copy(), SPACE)]  # query 1's second row now ranks other items
    pipeline.example_grids(moved, queries, "text", truth, out, k=3)
    assert drawn == ["text-query-1.png", "text-query-2.png"]
    drawn.clear()
    paths[1].unlink()  # a missing picture is drawn again
    pipeline.example_grids(moved, queries, "text", truth, out, k=3)
    assert drawn == ["text-query-2.png"]
    drawn.clear()
    images[int(gallery.search(vectors[:1], 1, space=SPACE)[0][0].id[1:])].write_bytes(images[5].read_bytes() + b"\0")
    pipeline.example_grids(moved, queries, "text", truth, out, k=3)  # an image shown in query 1 changed on disk
    assert "text-query-1.png" in drawn


def test_picture_vectors_from_another_space_are_refused(image_gallery, tmp_path):
    gallery, _ = image_gallery
    other = EmbeddingSpace("another", 8, "b" * 64)
    with pytest.raises(SpaceMismatchError):
        pipeline.example_grids([("new", gallery, unit_rows(1, 8, 2), other)], ["q"], "text", [set()], tmp_path / "x")
