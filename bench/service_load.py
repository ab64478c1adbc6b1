"""The service under load: concurrent clients search by text and by image and add images over loopback for a
fixed time, against a real `xbt serve` process; 30% into the run, the server is SIGKILLed and restarted on
the same gallery while the clients keep going (retrying while it is down). At the end every acknowledged add must be in the gallery.

    python bench/service_load.py                       # 16 clients, 60 s, tiny open_clip (random weights)
    python bench/service_load.py --quick               # 4 clients, 6 s: a smoke run
    python bench/service_load.py --model testbed:old   # the testbed's old model on its eval images

Figures (bench/results/service_load.json): requests (answered), errors_5xx, lost_acknowledged, p50_ms and
p99_ms (of answered requests, all kinds), per-endpoint counts and latencies, requests/s, connection errors
(requests that met a dead server during the restart: not answered, not acknowledged), the restart's
timing, the gallery's consistency check, and the load average before and after (`uptime`), because the
two cores are shared with other jobs. Clients are asyncio tasks in this process (httpx), so the client
side costs little CPU; the server is one uvicorn process, as `xbt serve` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _harness import load_average, machine_info, now_iso  # noqa: E402
from ray_embed import synthetic_images, tiny_openclip  # noqa: E402

from xbt import load_model  # noqa: E402
from xbt.gallery.ingest import ingest, items_from_pairs  # noqa: E402
from xbt.gallery.store import Gallery  # noqa: E402

TOKEN = "load-bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORDS = ["red", "blue", "green", "small", "large", "a dog", "a cat", "a house", "a tree", "a car", "a bird", "a boat",
         "on a table", "in the snow", "at night", "with a hat", "two", "an old", "a happy", "a drawing of"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _png(rng: np.random.Generator, size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(size // 8, 0).repeat(size // 8, 1)).save(buf, "PNG")
    return buf.getvalue()


class Server:
    """`xbt serve` as a child process on a fixed loopback port (restarted on the same port after a kill)."""

    def __init__(self, gallery: Path, spec: str, port: int, log: Path):
        self.args = [sys.executable, "-m", "xbt.cli", "serve", "--gallery", str(gallery), "--model", spec,
                     "--port", str(port), "--max-k", "50"]
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> float:
        """Start and wait for /health; returns the seconds it took."""
        t0 = time.perf_counter()
        env = {**os.environ, "XBT_SERVE_TOKEN": TOKEN, "PYTHONPATH": os.pathsep.join(sys.path)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=env, stdout=out, stderr=subprocess.STDOUT)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xbt serve exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"xbt serve did not answer within {timeout} s; see {self.log}")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


async def client(n: int, url: str, deadline: float, mix: dict[str, float], queries: list[bytes], k: int,
                 records: list[tuple[str, float, int, float]], acked: list[str], conn_errors: list[tuple[str, float]],
                 t_start: float, seed: int) -> None:
    """One client: a loop of requests chosen by `mix`; each answered request is recorded (op, ms, status, t)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    ops, weights = list(mix), list(mix.values())
    i = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.perf_counter() < deadline:
            op = rng.choices(ops, weights)[0]
            t0 = time.perf_counter()
            try:
                if op == "search_text":
                    text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
                    r = await http.post("/search/text", json={"text": text, "k": k})
                elif op == "search_image":
                    r = await http.post("/search/image", data={"k": str(k)},
                                        files={"file": ("q.png", rng.choice(queries), "image/png")})
                else:
                    item_id = f"load-c{n}-{i}"
                    i += 1
                    r = await http.post("/items/image", headers=AUTH, data={"id": item_id},
                                        files={"file": (f"{item_id}.png", _png(np_rng), "image/png")})
                    if r.status_code == 200 and r.json().get("added") == [item_id]:
                        acked.append(item_id)
            except httpx.TransportError:
                conn_errors.append((op, time.perf_counter() - t_start))
                await asyncio.sleep(0.05)  # the server is down (the kill); try again shortly
                continue
            records.append((op, 1000 * (time.perf_counter() - t0), r.status_code, t0 - t_start))


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _summary(rows: list[tuple[str, float, int, float]], seconds: float) -> dict[str, Any]:
    ms = [r[1] for r in rows]
    return {"requests": len(rows), "rps": round(len(rows) / seconds, 2) if seconds else None,
            "p50_ms": _percentile(ms, 50), "p99_ms": _percentile(ms, 99), "max_ms": round(max(ms), 1) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
            "errors_5xx": sum(r[2] >= 500 for r in rows), "errors_4xx": sum(400 <= r[2] < 500 for r in rows)}


def build_gallery(work: Path, model_spec: str, n_items: int) -> tuple[str, Path, list[bytes], str]:
    """The gallery to serve, its model spec, query images, and a description of both."""
    if model_spec == "tiny":
        spec = tiny_openclip(work / "tiny_model")
        items = synthetic_images(work / "images", n_items)
        what = f"tiny open_clip ViT (random weights, 64-d, 64 px), {n_items} synthetic images"
    else:
        from xbt.data.datasets import open_dataset

        spec = model_spec
        pairs = open_dataset("testbed:eval", None)
        items = items_from_pairs(pairs, "image")[:n_items]
        what = f"{model_spec}, {len(items)} images of testbed:eval"
    model = load_model(spec)
    gallery_dir = work / "gallery"
    with Gallery.create(gallery_dir, model.space, modality="image") as g:
        ingest(g, model, items)
    queries = [Path(it.payload["image"]).read_bytes() for it in items[:32]]
    return spec, gallery_dir, queries, what


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="xbt-bench-serve-"))
    spec, gallery_dir, queries, what = build_gallery(work, args.model, args.items)
    with Gallery.open(gallery_dir) as g:
        size_before = len(g)
    server = Server(gallery_dir, spec, _free_port(), work / "serve.log")
    load_start, uptime_start = load_average(), _uptime()
    startup_s = server.start()
    mix = {"search_text": args.text_share, "search_image": args.image_share, "add": args.add_share}
    records: list[tuple[str, float, int, float]] = []
    acked: list[str] = []
    conn_errors: list[tuple[str, float]] = []
    restart: dict[str, Any] = {}

    async def main() -> float:
        t_start = time.perf_counter()
        deadline = t_start + args.seconds
        tasks = [asyncio.create_task(client(c, server.url, deadline, mix, queries, args.k, records, acked, conn_errors,
                                            t_start, seed=args.seed + c)) for c in range(args.clients)]
        async def kill_and_restart() -> None:
            await asyncio.sleep(args.kill_at * args.seconds)
            restart["killed_at_s"] = round(time.perf_counter() - t_start, 2)
            restart["acknowledged_adds_before_kill"] = len(acked)
            server.kill()
            restart["restart_s"] = round(await asyncio.to_thread(server.start), 2)
            restart["back_at_s"] = round(time.perf_counter() - t_start, 2)

        killer = asyncio.create_task(kill_and_restart()) if args.kill_at is not None else None
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_start  # the clients' time; a restart still under way is awaited below
        if killer is not None:
            await killer
        return wall

    wall = asyncio.run(main())
    server.stop()
    load_end, uptime_end = load_average(), _uptime()
    with Gallery.open(gallery_dir) as g:
        present = g.present(acked)
        problems = g.verify()
        size_after = len(g)
    lost = sorted(set(acked) - present)
    overall = _summary(records, wall)
    result = {
        "figure": "service_load", "created": now_iso(), "quick": args.quick,
        "setup": what, "model": spec if args.model != "tiny" else "tiny open_clip (random weights)",
        "clients": args.clients, "seconds": round(wall, 2), "k": args.k, "mix": mix,
        "requests": overall["requests"], "errors_5xx": overall["errors_5xx"], "lost_acknowledged": len(lost),
        "p50_ms": overall["p50_ms"], "p99_ms": overall["p99_ms"], "rps": overall["rps"],
        "errors_4xx": overall["errors_4xx"], "connection_errors": len(conn_errors),
        "acknowledged_adds": len(acked), "lost_examples": lost[:5],
        "gallery": {"size_before": size_before, "size_after": size_after, "verify_problems": problems},
        "by_endpoint": {op: _summary([r for r in records if r[0] == op], wall) for op in mix},
        "restart": {**restart, "startup_s": round(startup_s, 2),
                    "connection_errors_by_endpoint": {op: sum(e[0] == op for e in conn_errors) for op in mix},
                    "before_kill": _summary([r for r in records if r[3] < restart["killed_at_s"]], restart["killed_at_s"]),
                    "after_restart": _summary([r for r in records if r[3] >= restart["back_at_s"]],
                                              max(wall - restart["back_at_s"], 0.0))}
        if args.kill_at is not None else None,
        "load_average": {"start": load_start, "end": load_end}, "uptime": {"start": uptime_start, "end": uptime_end},
        "machine": {k: v for k, v in machine_info().items() if k in ("cpu", "cores", "memory_gib", "os", "versions")},
        "server_log": str(work / "serve.log"),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 clients, 6 s, 200 items (a smoke run)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--items", type=int, default=1000, help="gallery size at the start")
    parser.add_argument("--model", default="tiny", help="'tiny' (random-weight open_clip) or a spec such as testbed:old")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--text-share", type=float, default=0.45)
    parser.add_argument("--image-share", type=float, default=0.35)
    parser.add_argument("--add-share", type=float, default=0.20)
    parser.add_argument("--kill-at", type=float, default=0.3, help="SIGKILL the server at this fraction of the run, then restart it")
    parser.add_argument("--no-kill", dest="kill_at", action="store_const", const=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/service_load.json (a --quick run: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.items = min(args.clients, 4), min(args.seconds, 6.0), min(args.items, 200)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="xbt-bench-quick-")) if args.quick else BENCH_DIR / "results") / "service_load.json"
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("requests", "rps", "errors_5xx", "lost_acknowledged", "p50_ms", "p99_ms",
                                             "clients", "seconds", "connection_errors", "acknowledged_adds")}))
    print(f"written to {args.out}")
    if result["errors_5xx"] or result["lost_acknowledged"] or result["gallery"]["verify_problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
