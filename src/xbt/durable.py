"""Files that survive a kill: fsync, write-then-rename, content digests. The one home of the crash-safety
primitives that the gallery store, the feature cache, training checkpoints and saved models share."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import threading
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename or a new entry in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write-then-rename with fsyncs: a reader sees the old file or the new one, never a torn one. The
    temporary name is unique per process and thread, so two writers never share one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def code_digest(*modules: str) -> str:
    """sha256 of the source of these modules or packages (dotted names; a package counts every .py file
    under it) and of numpy's and torch's versions: the key of a cached result that this code produced, so a
    rerun after a code change computes it again instead of serving the older code's result."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"no module {name!r} to digest")
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for file in files:
            digest.update(f"{name}/{file.relative_to(origin.parent).as_posix()}:".encode())
            digest.update(file.read_bytes())
    for package in ("numpy", "torch"):
        digest.update(f"{package}=={importlib.metadata.version(package)};".encode())
    return digest.hexdigest()
