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


def shipped_configs() -> dict[str, Path]:
    """The configs that ship inside the package (src/xbt/configs/*.yaml), by name without the suffix."""
    folder = Path(__file__).with_name("configs")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_config(value: str | Path) -> Path:
    """A config file: a path that exists, or the name of a shipped config (`xbt-testbed`, with or
    without .yaml), so that an installed xbt works from any directory."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped:
        return shipped[name]
    from xbt.errors import InputError

    raise InputError(f"config {value} not found; give a YAML file, or one of the shipped configs: {', '.join(shipped)}")
