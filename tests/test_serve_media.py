"""The service's page, its thumbnails and its /info, over real HTTP (uvicorn on loopback, httpx).

Thumbnails are served by item id from images the gallery stored itself or that lie under an operator's
--media-root; every other path is refused, whatever the payload or the request says: `../`, absolute
paths, symlinks out of a root, URL-encoded and double-encoded tricks, NUL bytes, non-image files. /info
needs the token when the service has one and never shows an absolute server path. The page is static,
refers to nothing outside the service, and follows the token rules."""

from __future__ import annotations

import http.client
import io
import os
import re

import httpx
import numpy as np
import pytest
from gallery_support import photo_gallery, running_server, save_tiny_openclip
from PIL import Image

from xbt.errors import InputError
from xbt.gallery.ingest import GalleryRetriever
from xbt import load_model
from xbt.serve.app import ServeConfig, create_app, public_info
from xbt.serve.media import resolve_roots

TOKEN = "media-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = b"TOP-SECRET-BYTES"


def _png_bytes(colour: str = "red", size: tuple[int, int] = (60, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A gallery of images under photos/ (the media root), plus items whose payloads point elsewhere."""
    root = tmp_path_factory.mktemp("media")
    spec, model, photos, gallery = photo_gallery(root)  # the gallery is made before the traps below are laid
    outside = root / "outside"
    outside.mkdir()
    secret_png = outside / "secret.png"
    secret_png.write_bytes(_png_bytes("blue") + SECRET)  # a real image, outside every root
    (outside / "passwd").write_bytes(SECRET)
    (photos / "link-out.png").symlink_to(secret_png)  # a symlink inside the root, pointing out of it
    (photos / "dir-out").symlink_to(outside, target_is_directory=True)
    (photos / "fake.png").write_bytes(SECRET)  # under the root, but not an image
    (photos / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>')
    os.mkfifo(photos / "pipe.png")
    hostile = {
        "abs-outside": str(outside / "passwd"), "etc-passwd": "/etc/passwd",
        "dotdot": f"{photos}/../outside/secret.png", "relative-dotdot": "photos/../outside/secret.png",
        "link-out": str(photos / "link-out.png"), "dir-out": str(photos / "dir-out" / "secret.png"),
        "encoded": f"{photos}/%2e%2e/outside/secret.png", "double-encoded": f"{photos}/%252e%252e/outside/secret.png",
        "nul": f"{photos}/img000.png\x00/../../outside/secret.png", "not-an-image": str(photos / "fake.png"),
        "svg": str(photos / "vector.svg"), "fifo": str(photos / "pipe.png"), "folder": str(photos),
        "not-a-string": ["/etc/passwd"], "missing": str(photos / "nope.png"),
        "media-link-out": str(gallery.media_dir / "link.png"),
    }
    gallery.media_dir.mkdir(exist_ok=True)
    (gallery.media_dir / "link.png").symlink_to(secret_png)
    vectors = np.random.default_rng(0).standard_normal((len(hostile), model.space.dim)).astype(np.float32)
    gallery.add(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), list(hostile),
                [{"image": path} for path in hostile.values()], space=model.space)
    retriever = GalleryRetriever(gallery, model)
    config = ServeConfig(token=TOKEN)
    with running_server(create_app(retriever, config, resolve_roots([photos]))) as url:
        yield {"url": url, "root": root, "photos": photos, "gallery": gallery, "retriever": retriever,
               "hostile": hostile, "model": model, "spec": spec}
    gallery.close()


def _no_secret(response: httpx.Response) -> None:
    assert SECRET not in response.content
    assert b"root:" not in response.content


def test_thumbnails_of_items_under_the_root(world):
    r = httpx.get(f"{world['url']}/thumbnail", params={"id": "img002.png", "size": 20})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] in ("image/jpeg", "image/png")
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (40, 40)  # 20 snaps to the fixed size 64, and the 40x40 original is not enlarged
    assert abs(np.asarray(img.convert("RGB"), dtype=float).mean()
               - np.asarray(Image.open(world["photos"] / "img002.png").resize(img.size).convert("RGB"), dtype=float).mean()) < 8
    hits = httpx.post(f"{world['url']}/search/text", json={"text": "a picture", "k": 20}).json()["results"]
    by_id = {h["id"]: h["thumbnail"] for h in hits}
    assert by_id["img000.png"] == "/thumbnail?id=img000.png"
    for item in set(world["hostile"]) - {"not-an-image"}:  # that one is refused when it is decoded
        assert by_id.get(item) is None, item  # search results offer no thumbnail for a refused image


@pytest.mark.parametrize("item", ["abs-outside", "etc-passwd", "dotdot", "relative-dotdot", "link-out", "dir-out",
                                  "encoded", "double-encoded", "nul", "not-an-image", "svg", "fifo", "folder",
                                  "not-a-string", "missing", "media-link-out"])
def test_payload_paths_outside_the_roots_are_refused(world, item):
    r = httpx.get(f"{world['url']}/thumbnail", params={"id": item}, timeout=10)
    assert r.status_code == 404, (item, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    _no_secret(r)


@pytest.mark.parametrize("raw", [
    "/thumbnail?id=../outside/secret.png", "/thumbnail?id=..%2F..%2Foutside%2Fpasswd", "/thumbnail?id=%2e%2e%2fpasswd",
    "/thumbnail?id=%252e%252e%252fpasswd", "/thumbnail?id=/etc/passwd", "/thumbnail?id=img000.png%00../../passwd",
    "/thumbnail?id=%00", "/thumbnail?id=", "/thumbnail", "/thumbnail?id=img000.png&size=100000",
    "/thumbnail/../../../etc/passwd", "/thumbnail/%2e%2e/%2e%2e/etc/passwd", "/static/../app.py",
    "/static/%2e%2e%2fapp.py", "/static/..%2F..%2Fgallery%2Fstore.py", "/static/%252e%252e%252fapp.py",
    "/static/app.js%00.py", "/static/index.html", "/static/", "/media/../../etc/passwd", "/..%2f..%2fetc%2fpasswd",
])
def test_requests_cannot_name_a_path(world, raw):
    # http.client sends the target exactly as written (no normalisation of `..` or percent-escapes)
    host, port = httpx.URL(world["url"]).host, httpx.URL(world["url"]).port
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", raw)
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    assert 400 <= status < 500, (raw, status)
    assert SECRET not in body and b"root:" not in body
    assert b"import " not in body and b"def " not in body  # no Python source either


def test_uploaded_images_have_thumbnails_without_a_media_root(world, tmp_path):
    bare = create_app(world["retriever"], ServeConfig(token=TOKEN))  # no --media-root
    with running_server(bare) as url:
        upload = _png_bytes("green", (30, 20), "RGBA")
        r = httpx.post(f"{url}/items/image", headers=AUTH, files={"file": ("u.png", upload, "image/png")},
                       data={"id": "uploaded"})
        assert r.status_code == 200, r.text
        r = httpx.get(f"{url}/thumbnail", params={"id": "uploaded"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"  # transparency kept
        assert Image.open(io.BytesIO(r.content)).size == (30, 20)
        assert httpx.get(f"{url}/thumbnail", params={"id": "img000.png"}).status_code == 404  # photos/ not a root here
        hits = httpx.post(f"{url}/search/text", json={"text": "x", "k": 30}).json()["results"]
        assert {h["id"] for h in hits if h["thumbnail"]} == {"uploaded"}
    world["gallery"].delete(["uploaded"])


def test_media_roots_must_be_folders(world):
    with pytest.raises(InputError, match="not a folder"):
        resolve_roots([world["root"] / "nowhere"])
    with pytest.raises(InputError, match="not a folder"):
        resolve_roots([world["photos"] / "img000.png"])


def test_thumbnails_follow_the_read_rules(world):
    closed = create_app(world["retriever"], ServeConfig(token=TOKEN, open_read=False), resolve_roots([world["photos"]]))
    with running_server(closed) as url:
        assert httpx.get(f"{url}/thumbnail", params={"id": "img000.png"}).status_code == 401
        bad = {"Authorization": "Bearer not-the-token"}
        assert httpx.get(f"{url}/thumbnail", params={"id": "img000.png"}, headers=bad).status_code == 401
        assert httpx.get(f"{url}/thumbnail", params={"id": "img000.png"}, headers=AUTH).status_code == 200


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_info_needs_the_token_and_shows_no_server_path(world):
    url = world["url"]
    r = httpx.get(f"{url}/info")
    assert r.status_code == 401 and "--open-info" in r.json()["detail"]
    info = httpx.get(f"{url}/info", headers=AUTH).json()
    assert info["gallery"]["size"] == len(world["gallery"]) and info["gallery"]["path"] == "gallery"
    assert info["model"] == "openclip:local-dir:model"  # the spec, with its folder reduced to a name
    assert re.fullmatch(r"openclip:local-dir:model@[0-9a-f]{12}/32d", info["gallery"]["space_id"])
    root = str(world["root"])
    for text in _strings(info):
        assert root not in text and not re.search(r"(^|[:=@\s])/", text), text
    for policy, expected in ((ServeConfig(token=TOKEN, open_info=True), 200), (ServeConfig(token=None), 200),
                             (ServeConfig(token=TOKEN, open_read=False), 401)):
        with running_server(create_app(world["retriever"], policy)) as other:
            assert httpx.get(f"{other}/info").status_code == expected, policy
    with pytest.raises(InputError, match="--open-info with --closed-read"):
        ServeConfig(token=TOKEN, open_read=False, open_info=True)


def test_public_info_reduces_paths_to_names():
    doc = {"a": "/srv/galleries/old", "spec": "compat:/srv/runs/xbt", "ckpt": "openclip:ViT-B-32@/w/ckpt.pt",
           "nested": [{"p": "hf:/models/clip"}], "hub": "hf:openai/clip-vit-base-patch32", "space": "old@1/256d",
           "space_id": "openclip:local-dir:/srv/m@0123456789ab/32d", "n": 3, "none": None}
    assert public_info(doc) == {"a": "old", "spec": "compat:xbt", "ckpt": "openclip:ViT-B-32@ckpt.pt",
                                "nested": [{"p": "hf:clip"}], "hub": "hf:openai/clip-vit-base-patch32",
                                "space": "old@1/256d", "space_id": "openclip:local-dir:m@0123456789ab/32d", "n": 3,
                                "none": None}


def test_the_page_is_static_and_self_contained(world):
    url = world["url"]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert '<meta name="xbt-read" content="open">' in page.text and '<meta name="xbt-info" content="token">' in page.text
    refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert refs and all(not re.match(r"^[a-z]+://|^//", ref) for ref in refs), refs
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert not re.search(r"https?://|@import|url\(\s*['\"]?(?!data:)[a-z]+:", r.text), name  # nothing from elsewhere
    closed = create_app(world["retriever"], ServeConfig(token=TOKEN, open_read=False))
    with running_server(closed) as other:
        assert '<meta name="xbt-read" content="token">' in httpx.get(f"{other}/").text  # the page loads without the token
    assert "/" not in httpx.get(f"{url}/openapi.json").json()["paths"]  # the page is not part of the API


def test_search_beside_the_old_model(world, tmp_path):
    """`model: old` answers with the old model over the same gallery, when the service has it."""
    import torch

    from xbt.compat.maps import Projection
    from xbt.compat.model import CompatibleModel

    new_model = load_model(save_tiny_openclip(tmp_path / "new", seed=1))
    torch.manual_seed(0)
    compat = CompatibleModel(new_model, Projection(32, 32, "linear"), world["model"].space)
    served = GalleryRetriever(world["gallery"], compat)
    old = world["retriever"]
    app = create_app(served, ServeConfig(token=TOKEN, open_info=True), old=old)
    with running_server(app) as url:
        info = httpx.get(f"{url}/info").json()
        assert info["limits"]["compare_old_model"] is True and info["old_model"] == "openclip:local-dir:model"
        ids = {}
        for via, retriever in (("served", served), ("old", old)):
            got = httpx.post(f"{url}/search/text", json={"text": "a picture", "k": 5, "model": via}).json()["results"]
            ids[via] = [h["id"] for h in got]
            assert ids[via] == [h.id for h in retriever.search_texts(["a picture"], 5)[0]]
            image = httpx.post(f"{url}/search/image", files={"file": ("q.png", (world["photos"] / "img001.png").read_bytes())},
                               data={"k": "3", "model": via})
            assert [h["id"] for h in image.json()["results"]] == [h.id for h in retriever.search_images(
                [Image.open(world["photos"] / "img001.png")], 3)[0]]
        assert ids["served"] != ids["old"]
    r = httpx.post(f"{world['url']}/search/text", json={"text": "a picture", "model": "old"})
    assert r.status_code == 400 and "--old-model" in r.json()["detail"]
