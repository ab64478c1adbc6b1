"""The main job's printed `xbt serve` command gives a page with pictures (issue 27, item 10): the gallery's images
live outside its media/ folder (the testbed's under /usr/share/tuxpaint and the rendered-SVG cache), so the
command names the folders that hold them (--media-root), and, run as printed, every hit has a thumbnail."""

from __future__ import annotations

import io
import shlex
from pathlib import Path

import httpx
from gallery_support import make_images, save_tiny_openclip
from PIL import Image
from serve_support import serving

from xbt import pipeline
from xbt.gallery.ingest import ingest, items_from_folder
from xbt.gallery.store import Gallery
from xbt.specs import load_model


def _printed_serve(commands: list[str]) -> list[str]:
    """The serve line's arguments after `xbt serve`, split as a shell would (the trailing comment dropped)."""
    line = next(c for c in commands if c.startswith("xbt serve "))
    argv = shlex.split(line, comments=True)
    assert argv[:2] == ["xbt", "serve"]
    return argv[2:]


def test_the_printed_serve_command_shows_every_picture(tmp_path):
    spec = save_tiny_openclip(tmp_path / "model", seed=0)
    model = load_model(spec)
    # Two sources far apart, as the testbed's (a system folder and a cache), both outside the gallery's media/.
    stamps, rendered = tmp_path / "share" / "stamps with space" / "animals", tmp_path / "cache" / "render" / "ab"
    images = make_images(stamps, 3) + make_images(rendered, 3, seed=1)
    for i, path in enumerate(images[3:]):
        path.rename(path.with_name(f"svg{i}.png"))
    with Gallery.create(tmp_path / "gallery", model.space, modality="image") as g:
        ingest(g, model, items_from_folder(stamps) + items_from_folder(rendered))
        files = [item["payload"]["image"] for item in g.get([p.name for p in stamps.iterdir()]).values()]
        files += [item["payload"]["image"] for item in g.get([p.name for p in rendered.iterdir()]).values()]
    assert len(files) == 6

    commands = pipeline.deploy_commands(spec, tmp_path / "gallery", tmp_path / "captions", "a picture", False,
                                        image_files=files)
    args = _printed_serve(commands)  # run as printed; serve_support adds its own --port after the printed one
    with serving(args, log=tmp_path / "serve.log") as url:
        hits = httpx.post(f"{url}/search/text", json={"text": "a picture", "k": 6}).json()["results"]
        assert len(hits) == 6 and all(h["thumbnail"] for h in hits), hits
        for hit in hits:
            r = httpx.get(url + hit["thumbnail"])
            assert r.status_code == 200 and r.headers["content-type"] in ("image/png", "image/jpeg")
            assert Image.open(io.BytesIO(r.content)).size == (40, 40)


def test_media_roots_cover_far_apart_sources_without_opening_the_machine(tmp_path):
    from xbt.serve.media import covering_folders

    files = ["/usr/share/tuxpaint/stamps/animals/cat.png", "/usr/share/tuxpaint/stamps/food/apple.png",
             "/home/u/.cache/xbt/testbed/render/ab/x.png", "/home/u/.cache/xbt/testbed/render/cd/y.png"]
    assert covering_folders(files) == [Path("/home/u/.cache/xbt/testbed/render"), Path("/usr/share/tuxpaint/stamps")]
    assert covering_folders(["/srv/photos/a.png"]) == [Path("/srv/photos")]
    assert covering_folders(["/a.png", "/b/c.png"]) == [Path("/")]  # a file directly under / needs / itself
    assert covering_folders([]) == []
    line = next(c for c in pipeline.deploy_commands("compat:/m", Path("/g"), Path("/c"), "q", False, image_files=files)
                if c.startswith("xbt serve "))
    assert "--media-root /home/u/.cache/xbt/testbed/render --media-root /usr/share/tuxpaint/stamps" in line
