"""Recipe (b): the exported map in front of Qdrant (qdrant-client; here in local mode, a folder, no
server: give --url to use a server instead).

    python examples/deploy/qdrant_search.py --qdrant-path ./qdrant --collection photos --gallery old_gallery/ \
        --map deploy/text_map.onnx --queries new_queries.npy -k 10

The first run creates the collection from the old gallery (dot product, as the gallery searches unit
vectors; the xbt id in each point's payload); later runs only search. Prints one JSON list of ids per query.
"""

from __future__ import annotations

import numpy as np
from qdrant_client import QdrantClient, models
from old_gallery import read_gallery
from query_map import recipe_arguments, search_and_print


def load_gallery(client: QdrantClient, collection: str, gallery: str) -> None:
    ids, vectors = read_gallery(gallery)
    client.create_collection(collection, vectors_config=models.VectorParams(size=vectors.shape[1],
                                                                            distance=models.Distance.DOT))
    client.upsert(collection, points=[models.PointStruct(id=n, vector=v.tolist(), payload={"xbt_id": i})
                                      for n, (i, v) in enumerate(zip(ids, vectors))])


def search(client: QdrantClient, collection: str, queries: np.ndarray, k: int) -> list[list[str]]:
    return [[p.payload["xbt_id"] for p in client.query_points(collection, query=q.tolist(), limit=k).points]
            for q in queries]


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = recipe_arguments(__doc__.splitlines()[0])
    parser.add_argument("--qdrant-path", help="a local Qdrant folder (no server)")
    parser.add_argument("--url", help="a Qdrant server instead, e.g. http://localhost:6333")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--gallery", help="the old xbt gallery to create the collection from, if it does not exist")
    args = parser.parse_args(argv)
    client = QdrantClient(url=args.url) if args.url else QdrantClient(path=args.qdrant_path)
    if not client.collection_exists(args.collection):
        if not args.gallery:
            client.close()
            parser.error(f"no collection {args.collection!r}: give --gallery to create it from the old gallery")
        load_gallery(client, args.collection, args.gallery)
    return search_and_print(client, search, args.collection, args)


if __name__ == "__main__":
    main()
