"""Image-caption pairs: the one record every dataset reader produces and every trainer consumes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    """One image with one caption. `image_id` groups several captions of the same image."""

    image: str
    caption: str
    image_id: str
    source: str = ""


def write_pairs(path: Path, pairs: Iterable[Pair]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for pair in pairs:
            f.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_pairs(path: Path) -> list[Pair]:
    with Path(path).open() as f:
        return [Pair(**json.loads(line)) for line in f if line.strip()]


def unique_images(pairs: Sequence[Pair]) -> list[Pair]:
    """The first pair of each image_id, in order: the image gallery of a pair set."""
    seen: set[str] = set()
    out = []
    for pair in pairs:
        if pair.image_id not in seen:
            seen.add(pair.image_id)
            out.append(pair)
    return out
