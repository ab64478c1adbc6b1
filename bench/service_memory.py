"""Peak memory of `xbt serve` under worst-case image uploads: 32 clients at once each upload a small PNG that
decodes to the largest picture the server accepts (its default pixel limit), to /search/image, for a few rounds.
Anyone who may search can send these, so the server's peak resident memory under them is what an
unauthenticated client can make it use.

    python bench/service_memory.py --label after                   # the code on the path now
    PYTHONPATH=/tmp/xbt-base/src python bench/service_memory.py --label before   # an older checkout's code

The label names the section of bench/results/service_memory.json the run fills (`before` / `after`, each with
`peak_rss_mb`, the server's VmHWM from /proc); the file keeps the other label's section and the headline
figures `peak_rss_mb_before` / `peak_rss_mb_after`. The machine's load average (start and end) is recorded
beside each figure: the two cores are shared. A safety cap kills the server if its RSS passes --cap-mb (the
figure then says so), so a run cannot take the whole machine's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _harness import load_average, machine_info, now_iso, write_json  # noqa: E402
from service_load import Server, _free_port, _uptime, build_gallery  # noqa: E402

from xbt.serve.app import ServeConfig  # noqa: E402


def worst_case_png(pixels: int) -> tuple[bytes, tuple[int, int]]:
    """An RGB PNG of at most `pixels` pixels (nearly square), one colour: a few tens of KB that decode to all of them."""
    from PIL import Image

    width = math.isqrt(pixels)
    height = pixels // width
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buf, format="PNG", optimize=True)
    return buf.getvalue(), (width, height)


def _status_mb(pid: int, field: str) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Watch(threading.Thread):
    """Samples the server's RSS; kills it if it passes the cap (so the machine's other jobs keep their memory)."""

    def __init__(self, server: Server, cap_mb: float):
        super().__init__(daemon=True)
        self.server, self.cap_mb = server, cap_mb
        self.max_sampled_mb = 0.0
        self.capped = False
        self.done = threading.Event()

    def run(self) -> None:
        pid = self.server.proc.pid
        while not self.done.is_set():
            rss = _status_mb(pid, "VmRSS")
            if rss is None:
                return
            self.max_sampled_mb = max(self.max_sampled_mb, rss)
            if rss > self.cap_mb:
                self.capped = True
                self.server.kill()
                return
            time.sleep(0.02)


async def upload_rounds(url: str, png: bytes, clients: int, rounds: int) -> dict[str, int]:
    """`clients` concurrent uploads, `rounds` times over; the answers counted by status."""
    statuses: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        async def one() -> None:
            try:
                r = await http.post("/search/image", data={"k": "5"}, files={"file": ("big.png", png, "image/png")})
                key = str(r.status_code)
            except httpx.TransportError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1

        for _ in range(rounds):
            await asyncio.gather(*(one() for _ in range(clients)))
    return statuses


def run(args: argparse.Namespace) -> dict[str, Any]:
    pixels = args.pixels or ServeConfig().max_image_pixels
    png, (width, height) = worst_case_png(pixels)
    work = Path(tempfile.mkdtemp(prefix="xbt-bench-memory-"))
    spec, gallery_dir, _, what = build_gallery(work, "tiny", 50)
    server = Server(gallery_dir, spec, _free_port(), work / "serve.log")
    server.start()
    idle_mb = _status_mb(server.proc.pid, "VmRSS")
    load_start, uptime_start = load_average(), _uptime()
    watch = Watch(server, args.cap_mb)
    watch.start()
    t0 = time.perf_counter()
    statuses = asyncio.run(upload_rounds(server.url, png, args.clients, args.rounds))
    seconds = time.perf_counter() - t0
    peak_mb = _status_mb(server.proc.pid, "VmHWM")
    watch.done.set()
    watch.join()
    load_end, uptime_end = load_average(), _uptime()
    server.stop()
    return {
        "created": now_iso(), "label": args.label, "code": sys.modules["xbt"].__file__,
        "setup": what, "clients": args.clients, "rounds": args.rounds, "endpoint": "/search/image",
        "upload": {"bytes": len(png), "width": width, "height": height, "pixels": width * height,
                   "server_default_max_image_pixels": ServeConfig().max_image_pixels},
        "peak_rss_mb": round(peak_mb if peak_mb is not None else watch.max_sampled_mb, 1),
        "max_sampled_rss_mb": round(watch.max_sampled_mb, 1), "idle_rss_mb": round(idle_mb or 0.0, 1),
        "killed_at_cap_mb": args.cap_mb if watch.capped else None,
        "statuses": statuses, "seconds": round(seconds, 2),
        "load_average": {"start": load_start, "end": load_end}, "uptime": {"start": uptime_start, "end": uptime_end},
        "machine": {k: v for k, v in machine_info().items() if k in ("cpu", "cores", "memory_gib", "os")},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", choices=["before", "after"], required=True, help="the section of the results it fills")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pixels", type=int, default=None, help="pixels of the upload (default: the server's limit)")
    parser.add_argument("--cap-mb", type=float, default=12_000, help="kill the server past this RSS (MB)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "service_memory.json")
    args = parser.parse_args(argv)
    figure = run(args)
    try:
        results = json.loads(args.out.read_text())
    except (OSError, ValueError):
        results = {"figure": "service_memory", "goal": "peak server RSS under 2 GB after"}
    results[args.label] = figure
    results[f"peak_rss_mb_{args.label}"] = figure["peak_rss_mb"]
    after = results.get("peak_rss_mb_after")
    results["goal_met"] = after is not None and after < 2048 and results["after"]["killed_at_cap_mb"] is None
    write_json(args.out, results)
    print(json.dumps(figure, indent=1))


if __name__ == "__main__":
    main()
