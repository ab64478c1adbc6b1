"""Where xbt keeps what it generates: everything lives under XBT_HOME, outside any checkout."""

from __future__ import annotations

import os
from pathlib import Path


def xbt_home() -> Path:
    """The cache root: $XBT_HOME, default ~/.cache/xbt."""
    return Path(os.environ.get("XBT_HOME", Path.home() / ".cache" / "xbt")).expanduser()


def cache_dir(*parts: str) -> Path:
    """A sub-folder of XBT_HOME, created on demand."""
    path = xbt_home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
