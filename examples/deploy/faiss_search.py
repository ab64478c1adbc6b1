"""Recipe (c): the exported map in front of a faiss index file of the old gallery's vectors.

    python examples/deploy/faiss_search.py --index old.faiss --gallery old_gallery/ \
        --map deploy/text_map.onnx --queries new_queries.npy -k 10

The first run writes old.faiss (exact inner product, as the gallery searches unit vectors) and
old.faiss.ids.json from the gallery; later runs only read them. Prints one JSON list of ids per query.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
from old_gallery import read_gallery
from query_map import mapped_queries, recipe_arguments


def write_index(gallery: str, index_file: Path) -> None:
    ids, vectors = read_gallery(gallery)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(index_file))
    Path(f"{index_file}.ids.json").write_text(json.dumps(ids))


def search(index_file: Path, queries: np.ndarray, k: int) -> list[list[str]]:
    index = faiss.read_index(str(index_file))
    ids = json.loads(Path(f"{index_file}.ids.json").read_text())
    _, rows = index.search(np.ascontiguousarray(queries, np.float32), k)
    return [[ids[r] for r in row if r >= 0] for row in rows]


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = recipe_arguments(__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True, help="the faiss index file (written from --gallery if absent)")
    parser.add_argument("--gallery", help="the old xbt gallery to write the index file from")
    args = parser.parse_args(argv)
    if not args.index.exists():
        if not args.gallery:
            parser.error(f"{args.index} does not exist: give --gallery to write it from the old gallery")
        write_index(args.gallery, args.index)
    hits = search(args.index, mapped_queries(args), args.k)
    print(json.dumps(hits))
    return hits


if __name__ == "__main__":
    main()
