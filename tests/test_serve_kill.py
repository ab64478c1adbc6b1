"""The service killed while it ingests: `xbt serve` (a real process) takes image uploads from concurrent
clients and is SIGKILLed at a seeded random moment, again and again, each time restarted on the same
gallery. After every kill: every acknowledged add is in the gallery with its stored image, the gallery
passes its full consistency check, and the restarted service finds the acknowledged items by search.

Rounds: XBT_SERVE_KILLS (default 20)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gallery_support import make_images, save_tiny_openclip
from PIL import Image
from serve_support import start_serve

from xbt import load_model
from xbt.gallery.ingest import ingest, items_from_folder
from xbt.gallery.store import Gallery

pytestmark = pytest.mark.slow

TOKEN = "kill-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 4


def upload_bytes(item_id: str) -> bytes:
    """A distinct small PNG per id (8x8 random colour blocks, scaled up), the same every time."""
    rng = np.random.default_rng(int(hashlib.sha256(item_id.encode()).hexdigest()[:8], 16))
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _client(url: str, prefix: str, acknowledged: list[str], attempted: list[str], stop: threading.Event) -> None:
    n = 0
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            item_id = f"{prefix}-{n}"
            n += 1
            attempted.append(item_id)
            try:
                r = client.post(f"{url}/items/image", headers=AUTH, data={"id": item_id},
                                files={"file": (f"{item_id}.png", upload_bytes(item_id), "image/png")})
            except httpx.HTTPError:
                return  # the server is gone: this add's fate is unknown, so it is not acknowledged
            assert r.status_code == 200, r.text  # never a 5xx, never a refusal
            assert r.json()["added"] == [item_id]
            acknowledged.append(item_id)


def test_kill_the_service_while_it_ingests(tmp_path):
    rounds = int(os.environ.get("XBT_SERVE_KILLS", "20"))
    rng = random.Random(1234)
    spec = save_tiny_openclip(tmp_path / "model", seed=0)
    model = load_model(spec)
    make_images(tmp_path / "photos", 4)
    with Gallery.create(tmp_path / "gallery", model.space, modality="image") as g:
        ingest(g, model, items_from_folder(tmp_path / "photos"))
    args = ["--gallery", tmp_path / "gallery", "--model", spec]
    acknowledged: list[str] = []
    attempted_total = 0
    checked_by_search = 0
    for round_ in range(rounds):
        proc, url = start_serve(args, env={"XBT_SERVE_TOKEN": TOKEN}, log=tmp_path / "serve.log")
        try:
            # the restarted service serves what was acknowledged before the last kill
            for item_id in rng.sample(acknowledged, min(3, len(acknowledged))):
                r = httpx.post(f"{url}/search/image", data={"k": "1"},
                               files={"file": ("q.png", upload_bytes(item_id), "image/png")}, timeout=30)
                assert r.status_code == 200 and r.json()["results"][0]["id"] == item_id, (round_, item_id, r.text)
                checked_by_search += 1
            stop = threading.Event()
            acks: list[list[str]] = [[] for _ in range(CLIENTS)]
            tries: list[list[str]] = [[] for _ in range(CLIENTS)]
            threads = [threading.Thread(target=_client, args=(url, f"r{round_}c{c}", acks[c], tries[c], stop), daemon=True)
                       for c in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 3.0))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        acknowledged += [i for a in acks for i in a]
        attempted_total += sum(len(t) for t in tries)
        with Gallery.open(tmp_path / "gallery") as g:
            assert g.verify() == [], round_
            missing = set(acknowledged) - g.present(acknowledged)
            assert not missing, f"round {round_}: {len(missing)} acknowledged adds lost, e.g. {sorted(missing)[:3]}"
            stored = g.get(acknowledged[-50:])
            for item_id, entry in stored.items():  # the image each acknowledged add points at is whole
                path = Path(entry["payload"]["image"])
                assert path.parent == g.media_dir and path.read_bytes() == upload_bytes(item_id)
    print(f"\n{rounds} kills, {attempted_total} adds attempted, {len(acknowledged)} acknowledged, 0 lost;"
          f" {checked_by_search} found again by search after a restart")
    assert len(acknowledged) > rounds  # the clients did get adds through between kills
