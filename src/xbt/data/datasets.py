"""Reading pair sets a user already has. Every reader returns a list of Pair."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from xbt.data.pairs import Pair
from xbt.errors import InputError


def _pair(row: dict, base: Path, where: str) -> Pair:
    image = str(row.get("image") or row.get("image_path") or row.get("filepath") or "").strip()
    caption = str(row.get("caption") or row.get("text") or "").strip()
    if not image or not caption:
        raise InputError(f"{where}: each row needs an image path and a non-empty caption (columns image, caption)")
    path = Path(image)
    if not path.is_absolute():
        path = base / path
    return Pair(str(path), caption, str(row.get("image_id") or path), source=str(base))


def load_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a .jsonl or .csv file with columns image, caption[, image_id]; relative paths are
    resolved against the file's folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"pairs file not found: {path}")
    base = path.parent
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((json.loads(line), f"{path}:{n}"))
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path}:{n} is not valid JSON: {exc}") from exc
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = [(row, f"{path}:{n}") for n, row in enumerate(csv.DictReader(f), 2)]
    else:
        raise InputError(f"unknown pairs format {path.suffix!r}: use .jsonl or .csv (image, caption[, image_id])")
    pairs = [_pair(row, base, where) for row, where in rows]
    if not pairs:
        raise InputError(f"{path} holds no pairs")
    return pairs
