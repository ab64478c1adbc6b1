"""Helpers for the service's tests: `xbt serve` as a real subprocess on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
from gallery_support import free_port


def start_serve(args: Sequence[str], env: dict[str, str] | None = None, port: int | None = None,
                log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `python -m xbt.cli serve ARGS --port P`; returns the process and its base URL once /health answers."""
    port = port or free_port()
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "250", **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "xbt.cli", "serve", *map(str, args), "--port", str(port)],
                            env=full_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"xbt serve exited with status {proc.returncode}\n{detail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("xbt serve did not come up within 180 s")
        time.sleep(0.2)


@contextmanager
def serving(args: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[str]:
    """`xbt serve ARGS` for the duration of the block; yields its base URL."""
    proc, url = start_serve(args, env, log=log)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
