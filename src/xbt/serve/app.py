"""The HTTP service: search a stamped gallery by text or by an uploaded image, add and delete items.

Safety rules it keeps: every input is validated by a pydantic model with `extra="forbid"` and bounds
(k, text length, upload size, pixels) published in the OpenAPI schema; bad input gets a 4xx JSON error,
never a 5xx; writing needs the bearer token given at start (no token: writing is disabled); reading is
open or needs the same token, by configuration; `/info` needs the token whenever the service has one
(unless the operator opens it) and never shows absolute server paths; uploads are decoded from memory
as raster images only (no SVG: a vector file can reference local files), and no client-supplied path is
ever opened; item payloads may not set the reserved keys ("image", "caption") that backfill reads from
disk; thumbnails are served by item id, only from allowed roots (`xbt.serve.media`).
`GET /` is a small search page (static files shipped in the package, nothing fetched from elsewhere); the
API is described by /openapi.json (no /docs page: FastAPI's loads its scripts from a CDN).
The server listens on 127.0.0.1 unless told otherwise (another address needs `expose`), and answers only
requests whose Host header names it (`xbt.serve.hosts`: against DNS rebinding). Decoding images, uploads and
thumbnails alike, is bounded in pixels and in how many run at once (`xbt.serve.decode_slots`).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime, and
# they name models defined inside create_app.
import hmac
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from xbt.errors import InputError, SpaceMismatchError, XbtError
from xbt.gallery.ingest import RESERVED_PAYLOAD_KEYS
from xbt.gallery.store import MAX_ID_CHARS, Hit
from xbt.serve.decode_slots import DecodeSlots, ServiceBusy, release_large_buffers_at_once
from xbt.serve.hosts import LOOPBACK_HOSTS, check_listen_host
from xbt.serve.media import DEFAULT_MAX_IMAGE_PIXELS, THUMBNAIL_SIZES, NoThumbnail, ThumbnailStore, open_raster

log = logging.getLogger("xbt.serve")

JSON_BODY_LIMIT = 1 << 20  # bytes of a JSON request
FORM_OVERHEAD = 64 << 10  # multipart boundaries and the small form fields beside the file


class Retriever(Protocol):
    """What the service serves: `GalleryRetriever` (one gallery) or `MigratingRetriever` (a backfill)."""

    def search_texts(self, texts: list[str], k: int) -> list[list[Hit]]: ...
    def search_images(self, images: list[Any], k: int) -> list[list[Hit]]: ...
    def add(self, modality: str, ids: list[str], inputs: list[Any], payloads: list[dict[str, Any]],
            on_conflict: Any = "error") -> list[str]: ...
    def delete(self, ids: list[str]) -> int: ...
    def info(self) -> dict[str, Any]: ...
    def store_media(self, data: bytes, suffix: str) -> Any: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class ServeConfig:
    """Limits and access. `token=None` disables every writing endpoint. `/info` (model specs, index
    settings, limits: what an operator needs, not a searcher) needs the token whenever there is one,
    unless `open_info`; a service without a token has nothing to require, so its /info is open.
    `max_concurrent_decodes` images are held decoded at once (uploads and thumbnails together; a request
    that waits `decode_wait_s` for a slot gets 503);
    `allowed_hosts`: the Host header names answered (`xbt.serve.hosts.allowed_hosts`)."""

    token: str | None = None
    open_read: bool = True
    open_info: bool = False
    max_k: int = 100
    default_k: int = 10
    max_upload_bytes: int = 8 << 20
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_concurrent_decodes: int = 4
    decode_wait_s: float = 60.0
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_text_chars: int = 1000
    max_batch: int = 64
    max_payload_bytes: int = 16 << 10

    def __post_init__(self) -> None:
        if self.max_k < 1 or not 1 <= self.default_k <= self.max_k:
            raise InputError("need 1 <= default_k <= max_k")
        if self.token is not None and len(self.token) < 8:
            raise InputError("the bearer token must have at least 8 characters")
        if not self.open_read and self.token is None:
            raise InputError("closed reading needs a token (XBT_SERVE_TOKEN or --token-file); without one nobody could search")
        if self.max_image_pixels < 64 * 64:
            raise InputError(f"--max-image-pixels {self.max_image_pixels} is too small to take any useful image; give at least 4096")
        if self.max_concurrent_decodes < 1:
            raise InputError("max_concurrent_decodes must be at least 1")
        if not self.allowed_hosts:
            raise InputError("allowed_hosts is empty: no request could be answered; allow at least 127.0.0.1")
        if self.open_info and not self.open_read:
            raise InputError("--open-info with --closed-read would show the gallery to whoever cannot search it; choose one")

    @property
    def info_needs_token(self) -> bool:
        return self.token is not None and not self.open_info


def read_token_file(path: Path) -> str:
    """The bearer token from the first line of a file that only its owner can read (a token given on the
    command line is visible to every user of the machine through ps and /proc, and stays in shell history)."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise InputError(f"the token file {path} is readable by others; make it private: chmod 600 {path}")
    token = lines[0].strip() if lines else ""
    if not token:
        raise InputError(f"the token file {path} is empty; put the token on its first line")
    return token


class UnsupportedImage(InputError):
    """An upload that is not a raster image xbt decodes."""


def decode_upload(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """A PIL image and its format from uploaded bytes; raster formats only, size-checked before decoding."""
    return open_raster(data, max_pixels, UnsupportedImage, "the uploaded file")


def _check_payload(payload: dict[str, Any], limit: int) -> dict[str, Any]:
    reserved = [k for k in RESERVED_PAYLOAD_KEYS if k in payload]
    if reserved:
        raise ValueError(f"payload keys {reserved} are reserved (xbt sets them from the item itself)")
    try:
        size = len(json.dumps(payload, allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"payload is not plain JSON: {exc}") from exc
    if size > limit:
        raise ValueError(f"payload is {size} bytes of JSON; at most {limit} are accepted")
    return payload


# An absolute path inside a string; it ends at "@" too, so that a space id "spec@fingerprint/dim" keeps its tail.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s:,;\"'@]*")


def _strip_paths(text: str) -> str:
    """Every absolute path inside a string replaced by its last component ("compat:/srv/runs/xbt" -> "compat:xbt",
    "openclip:local-dir:/srv/m@0123456789ab/32d" -> "openclip:local-dir:m@0123456789ab/32d")."""
    return _ABSOLUTE_PATH.sub(lambda m: PurePosixPath(m.group(0)).name or "/", text)


def public_info(value: Any) -> Any:
    """A copy of an info document with no absolute server path in it (names only), at any depth."""
    if isinstance(value, dict):
        return {k: public_info(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_info(v) for v in value]
    return _strip_paths(value) if isinstance(value, str) else value


def public_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """An item's payload as a client sees it: the image path xbt stored (the reserved "image" key: a file on
    the server) reduced to its name; every other field as it was given (captions and client fields are
    content, not server paths, and are not rewritten)."""
    image = payload.get("image")
    return {**payload, "image": _strip_paths(image)} if isinstance(image, str) else payload


def _galleries(retriever: Any) -> list[Any]:
    """The Gallery objects a retriever serves: `.gallery` (one gallery) or `.old`/`.new` (a migration)."""
    found = [getattr(retriever, name, None) for name in ("new", "old", "gallery")]
    return list({id(g): g for g in found if g is not None}.values())


_PAGE_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page talks to this service only: no other origin, no inline script, no plugins, no framing.
_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
             "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


def _static(name: str) -> bytes:
    return resources.files("xbt.serve").joinpath("static", name).read_bytes()


def create_app(retriever: Retriever, config: ServeConfig | None = None, media_roots: Sequence[Path] = (),
               old: Retriever | None = None) -> FastAPI:
    """The FastAPI application over a retriever (the space guard already ran when it was made).

    `media_roots`: resolved folders (`xbt.serve.media.resolve_roots`) besides the galleries' own media
    folders whose images may be shown as thumbnails. `old`: the same old gallery searched by the old
    model, so the page can show the served model's results beside the old model's (`"model": "old"`)."""
    config = config or ServeConfig()
    decodes = DecodeSlots(config.max_concurrent_decodes, config.decode_wait_s)
    thumbnails = ThumbnailStore(_galleries(retriever), list(media_roots), config.max_image_pixels, slots=decodes)
    page_html = (_static("index.html").decode()
                 .replace("__XBT_READ__", "open" if config.open_read else "token")
                 .replace("__XBT_INFO__", "token" if config.info_needs_token else "open")).encode()
    page_files = {name: _static(name) for name in _PAGE_FILES}
    # During a migration, which gallery a hit came from, by its space (fixed for the life of the service).
    served = retriever.info()
    origin = ({served["gallery"]["space_id"]: "old", served["new_gallery"]["space_id"]: "new"}
              if "new_gallery" in served and served.get("mode") != "single" else {})
    Text = Annotated[str, Field(min_length=1, max_length=config.max_text_chars, pattern=r"\S")]
    ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"\S")]
    K = Annotated[int, Field(ge=1, le=config.max_k)]
    Via = Annotated[Literal["served", "old"], Field(description="'old': the old model on the old gallery "
                                                                 "(only when the service was started with --old-model)")]
    Payload = Annotated[dict[str, JsonValue], Field(default_factory=dict)]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class TextSearch(Strict):
        """A caption to search by; k results (1..max_k)."""

        text: Text
        k: K = config.default_k
        model: Via = "served"

    class ImageSearch(Strict):
        file: UploadFile
        k: K = config.default_k
        model: Via = "served"

    class TextItem(Strict):
        id: ItemId
        caption: Text
        payload: Payload

        @field_validator("payload")
        @classmethod
        def _payload(cls, v: dict[str, Any]) -> dict[str, Any]:
            return _check_payload(v, config.max_payload_bytes)

    class AddTexts(Strict):
        items: Annotated[list[TextItem], Field(min_length=1, max_length=config.max_batch)]
        on_conflict: Literal["error", "skip", "replace"] = "error"

    class AddImage(Strict):
        file: UploadFile
        id: ItemId
        payload: Annotated[str, Field(max_length=config.max_payload_bytes, description="a JSON object")] = "{}"
        on_conflict: Literal["error", "skip", "replace"] = "error"

    class DeleteItems(Strict):
        ids: Annotated[list[ItemId], Field(min_length=1, max_length=1000)]

    class HitOut(BaseModel):
        id: str
        score: float
        payload: dict[str, Any]
        space: str
        thumbnail: str | None = Field(None, description="URL of the item's thumbnail, when it has one this service shows")
        gallery: Literal["old", "new"] | None = Field(None, description="during a migration: the gallery the hit came from")
        calibrated: bool | None = Field(None, description="true: the score is lowered by the item's calibration bias (the"
                                        " gallery is calibrated for this query model); false: it is, but this item has no"
                                        " bias; null: no calibration applies (see /info)")

    class SearchOut(BaseModel):
        results: list[HitOut]

    class AddOut(BaseModel):
        added: list[str]
        skipped: list[str]

    class DeleteOut(BaseModel):
        deleted: int

    class Health(BaseModel):
        status: str

    app = FastAPI(
        title="xbt gallery service",
        version="1",
        description="Search a stamped image/caption gallery by text or image; add and delete items.",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; the schema stays at /openapi.json
    )
    bearer = HTTPBearer(auto_error=False, description="the token given to `xbt serve --token`")
    errors = {400: {"description": "bad input"}, 401: {"description": "missing or wrong token"},
              403: {"description": "writing disabled"}, 409: {"description": "embedding space mismatch"},
              411: {"description": "length required"}, 413: {"description": "too large"},
              415: {"description": "not a supported image"}, 503: {"description": "busy decoding images: retry"}}

    def _token_ok(credentials: HTTPAuthorizationCredentials | None) -> bool:
        return (
            config.token is not None and credentials is not None and credentials.scheme.lower() == "bearer"
            and hmac.compare_digest(credentials.credentials.encode(), config.token.encode())
        )

    def require_write(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if config.token is None:
            raise HTTPException(403, "this service was started without a token, so writing is disabled")
        if not _token_ok(credentials):
            raise HTTPException(401, "writing needs the service's bearer token", headers={"WWW-Authenticate": "Bearer"})

    def require_read(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if not config.open_read and not _token_ok(credentials):
            raise HTTPException(401, "reading needs the service's bearer token", headers={"WWW-Authenticate": "Bearer"})

    def require_info(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if config.info_needs_token and not _token_ok(credentials):
            raise HTTPException(401, "/info needs the service's bearer token (the operator can open it: --open-info)",
                                headers={"WWW-Authenticate": "Bearer"})

    # ---- errors: always JSON, never a traceback -----------------------------------------------------
    def _status_handler(status: int) -> Any:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return handler

    # The most specific class wins (Starlette walks the exception's MRO).
    for error, status in ((UnsupportedImage, 415), (NoThumbnail, 404), (InputError, 400), (SpaceMismatchError, 409),
                          (XbtError, 400)):
        app.add_exception_handler(error, _status_handler(status))

    @app.exception_handler(ServiceBusy)
    async def _busy(request: Request, exc: ServiceBusy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next: Any) -> Any:
        """Refuse oversized bodies from their declared length, before reading them."""
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            multipart = request.headers.get("content-type", "").startswith("multipart/")
            limit = config.max_upload_bytes + FORM_OVERHEAD if multipart else JSON_BODY_LIMIT
            if length is None:
                if "chunked" in request.headers.get("transfer-encoding", "").lower():
                    return JSONResponse({"detail": "send a Content-Length header"}, status_code=411)
            else:
                try:
                    n = int(length)
                except ValueError:
                    return JSONResponse({"detail": "bad Content-Length"}, status_code=400)
                if n > limit:
                    return JSONResponse({"detail": f"request body of {n} bytes; at most {limit} accepted"}, status_code=413)
        return await call_next(request)

    # Outermost: a request naming a host this service is not (DNS rebinding) gets 400 before anything else.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts), www_redirect=False)

    def _read_upload(file: UploadFile) -> bytes:
        data = file.file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, f"the upload exceeds {config.max_upload_bytes} bytes")
        return data

    def _hits(results: list[list[Hit]]) -> dict[str, Any]:
        """Hits as the API shows them: like /info, with no absolute server path (the payload's image path and
        the space id reduced to their last component); whether an image is shown is decided on the real path."""
        hits = results[0]
        shown = thumbnails.image_paths([h.payload for h in hits])
        return {"results": [{**h.to_dict(), "payload": public_payload(h.payload), "space": public_info(h.space),
                             "thumbnail": f"/thumbnail?id={quote(h.id, safe='')}" if path else None,
                             "gallery": origin.get(h.space)} for h, path in zip(hits, shown, strict=True)]}

    def _searcher(via: str) -> Retriever:
        if via == "old":
            if old is None:
                raise InputError("this service was started without --old-model, so it cannot search with the old model")
            return old
        return retriever

    def _page(body: bytes, media_type: str) -> Response:
        return Response(body, media_type=media_type, headers={
            "Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})

    # ---- the page ----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> Response:
        """The search page (static; it calls the JSON API below with the token the user gives it)."""
        return _page(page_html, "text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    def page_file(name: str) -> Response:
        if name not in page_files:  # a fixed list: no path from the request reaches the filesystem
            raise HTTPException(404, "no such file")
        return _page(page_files[name], _PAGE_FILES[name])

    # ---- endpoints ---------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/info", dependencies=[Depends(require_info)], responses=errors, tags=["service"])
    def info() -> dict[str, Any]:
        """The gallery (space, size, index), the model, and this service's limits. Needs the token when the
        service has one (unless started with --open-info); paths are reduced to their last component."""
        extra = {"old_model": old.info()["model"]} if old is not None else {}
        return public_info({**retriever.info(), **extra, "limits": {
            "max_k": config.max_k, "default_k": config.default_k, "max_upload_bytes": config.max_upload_bytes,
            "max_text_chars": config.max_text_chars, "max_image_pixels": config.max_image_pixels,
            "thumbnail_sizes": list(THUMBNAIL_SIZES), "open_read": config.open_read, "writable": config.token is not None,
            "compare_old_model": old is not None}})

    @app.get("/thumbnail", dependencies=[Depends(require_read)], tags=["search"],
             responses={**errors, 200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "a thumbnail"},
                        404: {"description": "no image this service may show"}})
    def thumbnail(id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS)],
                  size: Annotated[int, Query(ge=16, le=512, description=f"snapped up to one of {list(THUMBNAIL_SIZES)}")] = 256,
                  ) -> Response:
        """A small PNG/JPEG of an item's image, by item id, at one of a few fixed sizes. Only images under a
        served gallery's media folder or an operator's --media-root are shown; the request never names a path."""
        thumb = thumbnails.thumbnail(id, size)
        return Response(thumb.data, media_type=thumb.media_type,
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})

    @app.post("/search/text", response_model=SearchOut, dependencies=[Depends(require_read)], responses=errors,
              tags=["search"])
    def search_text(query: TextSearch) -> dict[str, Any]:
        """The k gallery items nearest to a caption."""
        return _hits(_searcher(query.model).search_texts([query.text], query.k))

    @app.post("/search/image", response_model=SearchOut, dependencies=[Depends(require_read)], responses=errors,
              tags=["search"])
    def search_image(form: Annotated[ImageSearch, Form()]) -> dict[str, Any]:
        """The k gallery items nearest to an uploaded image (PNG, JPEG, GIF, WebP, BMP, TIFF)."""
        data = _read_upload(form.file)
        with decodes.slot():  # held until the pixels are embedded
            img, _ = decode_upload(data, config.max_image_pixels)
            results = _searcher(form.model).search_images([img], form.k)
            del img
        return _hits(results)

    @app.post("/items/text", response_model=AddOut, dependencies=[Depends(require_write)], responses=errors,
              tags=["items"])
    def add_texts(body: AddTexts) -> dict[str, Any]:
        """Embed captions and store them (a caption gallery)."""
        ids = [it.id for it in body.items]
        if len(set(ids)) != len(ids):
            raise InputError("the items repeat an id; give each item one id")
        payloads = [{**it.payload, "caption": it.caption} for it in body.items]
        added = retriever.add("text", ids, [it.caption for it in body.items], payloads, body.on_conflict)
        return {"added": added, "skipped": [i for i in ids if i not in set(added)]}

    @app.post("/items/image", response_model=AddOut, dependencies=[Depends(require_write)], responses=errors,
              tags=["items"])
    def add_image(form: Annotated[AddImage, Form()]) -> dict[str, Any]:
        """Embed an uploaded image and store it (an image gallery); the bytes are kept under the gallery's
        media/ folder so a later backfill can re-embed them."""
        try:
            payload = json.loads(form.payload)
        except ValueError as exc:
            raise InputError(f"payload must be a JSON object: {exc}") from exc
        if not isinstance(payload, dict):
            raise InputError("payload must be a JSON object")
        try:
            payload = _check_payload(payload, config.max_payload_bytes)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        data = _read_upload(form.file)
        with decodes.slot():  # held until the pixels are embedded
            img, fmt = decode_upload(data, config.max_image_pixels)
            path = retriever.store_media(data, fmt)
            added = retriever.add("image", [form.id], [img], [{**payload, "image": str(path)}], form.on_conflict)
            del img
        return {"added": added, "skipped": [i for i in [form.id] if i not in added]}

    @app.post("/items/delete", response_model=DeleteOut, dependencies=[Depends(require_write)], responses=errors,
              tags=["items"])
    def delete_items(body: DeleteItems) -> dict[str, int]:
        """Remove items by id (unknown ids are ignored)."""
        return {"deleted": retriever.delete(list(dict.fromkeys(body.ids)))}

    return app


def serve(retriever: Retriever, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", media_roots: Sequence[Path] = (), old: Retriever | None = None,
          expose: bool = False) -> None:
    """Run the service with uvicorn until interrupted. A non-loopback `host` needs `expose=True`."""
    import uvicorn

    check_listen_host(host, expose)
    release_large_buffers_at_once()  # decoded images' memory goes back to the system when freed
    if expose:
        log.warning("listening on %s: the service is reachable from other machines", host)
    try:
        uvicorn.run(create_app(retriever, config, media_roots, old), host=host, port=port, log_level=log_level)
    finally:
        close = getattr(retriever, "close", None)
        if callable(close):
            close()  # saves the index snapshot, so the next start is fast
