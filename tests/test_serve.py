"""The HTTP service over real HTTP: a uvicorn server on a free loopback port, called with httpx.

Bad input of every kind gets a 4xx JSON error (never a 5xx); writing needs the bearer token; reading can
be closed; the service never opens a client-supplied path; `xbt serve` starts it from the command line."""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest
from gallery_support import make_images, running_server, save_tiny_openclip
from PIL import Image
from serve_support import serving, start_serve

from xbt.errors import InputError
from xbt.gallery.ingest import GalleryRetriever, ingest, items_from_folder
from xbt.gallery.store import Gallery
from xbt.specs import load_model
from xbt.serve.app import ServeConfig, create_app, public_info, read_token_file

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = dict(max_k=20, max_upload_bytes=200_000, max_image_pixels=1_000_000, max_text_chars=200)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    spec = save_tiny_openclip(root / "model", seed=0)
    model = load_model(spec)
    images = make_images(root / "photos", 5)
    gallery = Gallery.create(root / "gallery", model.space, modality="image")
    ingest(gallery, model, items_from_folder(root / "photos"))
    retriever = GalleryRetriever(gallery, model)
    with running_server(create_app(retriever, ServeConfig(token=TOKEN, **LIMITS))) as url:
        yield {"url": url, "images": images, "gallery": gallery, "retriever": retriever, "spec": spec, "root": root}
    gallery.close()


def _png(path: Path | None = None, size: tuple[int, int] = (40, 40), colour: str = "red") -> bytes:
    img = Image.open(path) if path else Image.new("RGB", size, colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "detail" in response.json()


def test_health_info_and_openapi(service):
    url = service["url"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{url}/info", headers=AUTH).json()
    assert info["gallery"]["size"] == 5 and info["gallery"]["index_kind"] == "flat"
    assert info["limits"]["max_k"] == 20 and info["limits"]["writable"] is True
    schema = httpx.get(f"{url}/openapi.json").json()
    assert {"/search/text", "/search/image", "/items/text", "/items/image", "/items/delete"} <= set(schema["paths"])
    text_search = schema["components"]["schemas"]["TextSearch"]
    assert text_search["additionalProperties"] is False and text_search["properties"]["k"]["maximum"] == 20


def test_search_by_text_and_by_image(service):
    url = service["url"]
    r = httpx.post(f"{url}/search/text", json={"text": "a colourful picture", "k": 3})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 3 and set(results[0]) == {"id", "score", "payload", "space", "thumbnail", "gallery", "calibrated"}
    assert [x["score"] for x in results] == sorted((x["score"] for x in results), reverse=True)
    r = httpx.post(f"{url}/search/image", files={"file": ("q.png", _png(service["images"][3]), "image/png")}, data={"k": "2"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == "img003.png"
    assert len(httpx.post(f"{url}/search/text", json={"text": "x", "k": 20}).json()["results"]) <= 20


@pytest.mark.parametrize("body", [
    {"text": ""}, {"text": "   \n\t"}, {"text": "ok", "k": 0}, {"text": "ok", "k": 21}, {"text": "ok", "k": -3},
    {"text": "ok", "k": "many"}, {"text": "ok", "extra": 1}, {"k": 3}, {"text": ["a", "list"]}, {"text": "x" * 201}, [],
])
def test_bad_text_searches_are_4xx_json(service, body):
    _assert_error(httpx.post(f"{service['url']}/search/text", json=body), 422)


def test_bad_uploads_are_4xx_json(service):
    url = service["url"]
    not_image = httpx.post(f"{url}/search/image", files={"file": ("a.png", b"this is text, not an image", "image/png")})
    _assert_error(not_image, 415)
    empty = httpx.post(f"{url}/search/image", files={"file": ("a.png", b"", "image/png")})
    _assert_error(empty, 415)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>'
    _assert_error(httpx.post(f"{url}/search/image", files={"file": ("a.svg", svg, "image/svg+xml")}), 415)
    oversized = httpx.post(f"{url}/search/image", files={"file": ("big.png", os.urandom(300_000), "image/png")})
    _assert_error(oversized, 413)
    too_many_pixels = httpx.post(f"{url}/search/image", files={"file": ("wide.png", _png(size=(2000, 1000)), "image/png")})
    _assert_error(too_many_pixels, 415)
    truncated = httpx.post(f"{url}/search/image", files={"file": ("cut.png", _png(size=(50, 50))[:60], "image/png")})
    _assert_error(truncated, 415)
    _assert_error(httpx.post(f"{url}/search/image", data={"k": "3"}), 422)  # no file
    extra = httpx.post(f"{url}/search/image", files={"file": ("a.png", _png(), "image/png")}, data={"k": "3", "path": "/etc/passwd"})
    _assert_error(extra, 422)
    _assert_error(httpx.post(f"{url}/search/text", content=b"{not json", headers={"content-type": "application/json"}), 422)


def test_writing_needs_the_token(service):
    url = service["url"]
    body = {"items": [{"id": "t1", "caption": "a caption"}]}
    _assert_error(httpx.post(f"{url}/items/text", json=body), 401)
    _assert_error(httpx.post(f"{url}/items/text", json=body, headers={"Authorization": "Bearer wrong-token"}), 401)
    _assert_error(httpx.post(f"{url}/items/delete", json={"ids": ["img000.png"]}), 401)
    _assert_error(httpx.post(f"{url}/items/image", files={"file": ("a.png", _png(), "image/png")}, data={"id": "x"}), 401)
    assert len(service["gallery"]) == 5


def test_add_search_delete_an_uploaded_image(service):
    url, gallery = service["url"], service["gallery"]
    upload = _png(size=(36, 36), colour="purple")
    r = httpx.post(f"{url}/items/image", headers=AUTH, files={"file": ("p.png", upload, "image/png")},
                   data={"id": "uploaded-1", "payload": '{"owner": "test"}'})
    assert r.status_code == 200, r.text
    assert r.json() == {"added": ["uploaded-1"], "skipped": []}
    stored = gallery.get(["uploaded-1"])["uploaded-1"]["payload"]
    assert stored["owner"] == "test" and Path(stored["image"]).parent == gallery.media_dir
    assert Path(stored["image"]).read_bytes() == upload  # kept for a later backfill
    r = httpx.post(f"{url}/search/image", files={"file": ("q.png", upload, "image/png")}, data={"k": "1"})
    assert r.json()["results"][0]["id"] == "uploaded-1"
    again = httpx.post(f"{url}/items/image", headers=AUTH, files={"file": ("p.png", upload, "image/png")}, data={"id": "uploaded-1"})
    _assert_error(again, 400)
    r = httpx.post(f"{url}/items/delete", headers=AUTH, json={"ids": ["uploaded-1", "never-was"]})
    assert r.json() == {"deleted": 1}
    r = httpx.post(f"{url}/search/image", files={"file": ("q.png", upload, "image/png")}, data={"k": "5"})
    assert "uploaded-1" not in [x["id"] for x in r.json()["results"]]


def test_clients_cannot_point_the_service_at_a_file(service):
    url = service["url"]
    for payload in ('{"image": "/etc/passwd"}', '{"caption": "x"}', "[1, 2]", "not json"):
        r = httpx.post(f"{url}/items/image", headers=AUTH, files={"file": ("a.png", _png(), "image/png")},
                       data={"id": "sneaky", "payload": payload})
        _assert_error(r, 400)
    r = httpx.post(f"{url}/items/text", headers=AUTH, json={"items": [{"id": "s", "caption": "c", "payload": {"image": "/etc/passwd"}}]})
    _assert_error(r, 422)
    assert not service["gallery"].present(["sneaky", "s"])


def test_a_caption_cannot_enter_an_image_gallery(service):
    r = httpx.post(f"{service['url']}/items/text", headers=AUTH, json={"items": [{"id": "c1", "caption": "a caption"}]})
    _assert_error(r, 400)
    assert "holds images" in r.json()["detail"]


def test_closed_reading_and_read_only_services(service):
    closed = create_app(service["retriever"], ServeConfig(token=TOKEN, open_read=False))
    with running_server(closed) as url:
        _assert_error(httpx.post(f"{url}/search/text", json={"text": "hello"}), 401)
        _assert_error(httpx.get(f"{url}/info"), 401)
        assert httpx.post(f"{url}/search/text", json={"text": "hello"}, headers=AUTH).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(InputError, match="closed reading needs a token"):
        ServeConfig(token=None, open_read=False)
    with pytest.raises(InputError, match="8 characters"):
        ServeConfig(token="short")
    read_only = create_app(service["retriever"], ServeConfig(token=None))
    with running_server(read_only) as url:
        _assert_error(httpx.post(f"{url}/items/text", json={"items": [{"id": "a", "caption": "b"}]}, headers=AUTH), 403)
        assert httpx.post(f"{url}/search/text", json={"text": "hello"}).status_code == 200


def test_xbt_serve_command_starts_the_service_on_loopback(service):
    gallery_dir = service["root"] / "cli_gallery"
    model = load_model(service["spec"])
    with Gallery.create(gallery_dir, model.space, modality="image") as g:
        ingest(g, model, items_from_folder(service["root"] / "photos"))
    args = ["--gallery", gallery_dir, "--model", service["spec"]]
    with serving(args, env={"XBT_SERVE_TOKEN": TOKEN}, log=service["root"] / "serve-env.log") as url:
        r = httpx.post(f"{url}/search/image", files={"file": ("q.png", _png(service["images"][1]), "image/png")})
        assert r.json()["results"][0]["id"] == "img001.png"
        assert r.json()["results"][0]["thumbnail"] is None  # photos/ is not a --media-root here
        r = httpx.post(f"{url}/items/delete", json={"ids": ["img001.png"]}, headers=AUTH)  # token from the environment
        assert r.json() == {"deleted": 1}
        assert httpx.get(f"{url}/info").status_code == 401  # closed by default when there is a token


def test_xbt_serve_with_a_token_file_media_roots_and_the_old_model(service, tmp_path):
    """The options of the page: --token-file, --closed-read, --media-root, --old-model."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    args = ["--gallery", service["root"] / "gallery", "--model", service["spec"], "--closed-read",
            "--token-file", token_file, "--media-root", service["root"] / "photos", "--old-model", service["spec"]]
    env = {"XBT_SERVE_TOKEN": ""}
    with pytest.raises(RuntimeError, match="readable by others"):
        start_serve(args, env=env, log=tmp_path / "refused.log")
    token_file.chmod(0o600)
    with serving(args, env=env, log=tmp_path / "serve.log") as url:
        assert httpx.get(f"{url}/").status_code == 200  # the page loads; it asks for the token
        assert httpx.post(f"{url}/search/text", json={"text": "a picture"}).status_code == 401
        info = httpx.get(f"{url}/info", headers=AUTH).json()
        assert info["limits"]["compare_old_model"] and not info["limits"]["open_read"]
        hits = httpx.post(f"{url}/search/text", json={"text": "a picture", "k": 3, "model": "old"}, headers=AUTH)
        thumb = hits.json()["results"][0]["thumbnail"]
        assert thumb.startswith("/thumbnail?id=")
        assert httpx.get(url + thumb).status_code == 401
        assert httpx.get(url + thumb, headers=AUTH).headers["content-type"] in ("image/png", "image/jpeg")
    with pytest.raises(RuntimeError, match="not a folder"):
        start_serve([*args[:-4], "--media-root", tmp_path / "missing"], env=env, log=tmp_path / "missing.log")


def test_token_files_must_be_private_and_not_empty(tmp_path):
    path = tmp_path / "t"
    with pytest.raises(InputError, match="cannot read"):
        read_token_file(path)
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(InputError, match="empty"):
        read_token_file(path)
    path.write_text("  secret-token-1  \nignored\n")
    assert read_token_file(path) == "secret-token-1"
    path.chmod(0o640)
    with pytest.raises(InputError, match="chmod 600"):
        read_token_file(path)


def test_service_during_a_migration_and_after_the_cut_over(service, tmp_path):
    """The same HTTP API over a MigratingRetriever: merged results while the backfill runs, the new space
    alone once it is cut over (seen by the running service without a restart)."""
    import torch

    from xbt.compat.maps import Projection
    from xbt.compat.model import CompatibleModel
    from xbt.gallery.migrating import MigratingRetriever
    from xbt.gallery.migration import Migration

    old_model = load_model(service["spec"])
    new_model = load_model(save_tiny_openclip(tmp_path / "new", seed=1))
    torch.manual_seed(0)
    compat = CompatibleModel(new_model, Projection(32, 32, "linear"), old_model.space)
    old_dir = service["root"] / "migrating_gallery"
    with Gallery.create(old_dir, old_model.space, modality="image") as g:
        ingest(g, old_model, items_from_folder(service["root"] / "photos"))
        migration = Migration.start(tmp_path / "mig", g, new_model.space)
    migration.run(new_model, max_items=2)
    retriever = MigratingRetriever(Migration(tmp_path / "mig"), compat, new_model)
    with running_server(create_app(retriever, ServeConfig(token=TOKEN))) as url:
        info = httpx.get(f"{url}/info", headers=AUTH).json()
        assert info["mode"] == "migrating" and info["migration"]["position"] == 2 and info["migration"]["plan_size"] == 5
        results = httpx.post(f"{url}/search/text", json={"text": "a picture", "k": 5}).json()["results"]
        old_space, new_space = public_info(old_model.space.id), public_info(new_model.space.id)  # hits show no server path
        assert len(results) == 5 and {r["space"] for r in results} <= {old_space, new_space}
        assert all(r["gallery"] == ("new" if r["space"] == new_space else "old") for r in results)
        migration.run(new_model)
        migration.cut_over()  # another process would do this; the service reads the state file
        assert httpx.get(f"{url}/info", headers=AUTH).json()["mode"] == "cut-over"
        results = httpx.post(f"{url}/search/text", json={"text": "a picture", "k": 5}).json()["results"]
        assert {r["space"] for r in results} == {new_space}
    retriever.close()
