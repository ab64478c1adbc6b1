"""Helpers for the gallery, backfill and service tests: tiny open_clip models saved to disk (so that a
subprocess loads the very same weights, hence the same space) and small synthetic images."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import numpy as np
from conftest import tiny_openclip_config


def save_tiny_openclip(folder: Path, seed: int, embed_dim: int = 32, width: int = 32) -> str:
    """A randomly initialised tiny open_clip model written as an open_clip local-dir; returns its spec."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_openclip_config(embed_dim, width),
                                                              "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"openclip:local-dir:{folder}"


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct small PNGs (random colour blocks)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app, timeout: float = 20.0) -> Iterator[str]:
    """The app on a real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def acknowledged_lines(proc, what: str = "the worker", timeout: float = 120.0) -> tuple[list[str], threading.Thread]:
    """Collect the lines a subprocess prints whole, in the background (a line cut short by a kill was never
    acknowledged); once the process has printed READY, return that live list and the collecting thread
    (join it after the process ends to have every line)."""
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            if line.endswith("\n"):
                lines.append(line.rstrip("\n"))
                if line.startswith("READY"):
                    ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not ready.wait(timeout):
        proc.kill()
        raise AssertionError(f"{what} did not start: {proc.stderr.read() if proc.stderr else ''}")
    return lines, reader


def tiny_upgrade(tmp_path: Path) -> tuple[str, str, object, object, object]:
    """A tiny old and new open_clip model (seeds 0 and 1) and a linear compatible model of the new one into the
    old space, saved and loaded back: (old_spec, new_spec, old, new, compat)."""
    import torch

    from xbt.compat.maps import Projection
    from xbt.compat.model import CompatibleModel
    from xbt.specs import load_model

    root = tmp_path / "specs"
    old_spec, new_spec = save_tiny_openclip(root / "old", seed=0), save_tiny_openclip(root / "new", seed=1)
    old, new = load_model(old_spec), load_model(new_spec)
    torch.manual_seed(0)
    CompatibleModel(new, Projection(32, 32, "linear"), old.space).save_pretrained(tmp_path / "compat")
    return old_spec, new_spec, old, new, load_model(f"compat:{tmp_path / 'compat'}")


def photo_gallery(root: Path, n: int = 4, extra_images=None):
    """A tiny open_clip model (seed 0) and an image gallery of `n` photos under root/photos (plus whatever
    `extra_images(photos)` writes there first): (spec, model, photos, gallery); the caller closes the gallery."""
    from xbt.gallery.ingest import ingest, items_from_folder
    from xbt.gallery.store import Gallery
    from xbt.specs import load_model

    spec = save_tiny_openclip(root / "model", seed=0)
    model = load_model(spec)
    photos = root / "photos"
    make_images(photos, n)
    if extra_images is not None:
        extra_images(photos)
    gallery = Gallery.create(root / "gallery", model.space, modality="image")
    ingest(gallery, model, items_from_folder(photos))
    return spec, model, photos, gallery


def transposable_gallery(root: Path, n: int = 20) -> tuple[str, str, Path, list[Path]]:
    """Two tiny open_clip models (old, new), a compatible model whose orthogonal query map can be transposed
    (saved at root/compat) and an old-model image gallery of `n` items at root/g. Returns (old spec, new spec,
    gallery folder, its images)."""
    from xbt.compat.maps import LinearMap
    from xbt.compat.model import CompatibleModel
    from xbt.compat.procrustes import orthogonal_procrustes
    from xbt.gallery.store import Gallery
    from xbt.specs import load_model

    old_spec, new_spec = save_tiny_openclip(root / "old", seed=0), save_tiny_openclip(root / "new", seed=1)
    old, new = load_model(old_spec), load_model(new_spec)
    rotation = orthogonal_procrustes(unit_rows(64, 32, 1), unit_rows(64, 32, 2))
    CompatibleModel(new, LinearMap.from_arrays(rotation), old.space).save_pretrained(root / "compat")
    images = make_images(root / "images", n, seed=3)
    with Gallery.create(root / "g", old.space, modality="image") as g:
        g.add(old.encode_image(images).numpy(), [f"item{i:04d}" for i in range(n)],
              [{"image": str(p), "caption": f"c{i}"} for i, p in enumerate(images)], space=old.space)
    return old_spec, new_spec, root / "g", images

