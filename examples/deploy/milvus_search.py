"""Recipe (a): the exported map in front of Milvus, searching the old gallery where it already lives (an
xbt Milvus gallery, `milvus:URI#NAME`, or any collection of the old model's vectors in a FLOAT_VECTOR
field `vector`, inner product).

    python examples/deploy/milvus_search.py --uri ./photos.db --collection photos \
        --map deploy/text_map.onnx --queries new_queries.npy -k 10

Prints one JSON list of ids per query.
"""

from __future__ import annotations

import numpy as np
from pymilvus import MilvusClient
from query_map import recipe_arguments, search_and_print


def search(client: MilvusClient, collection: str, queries: np.ndarray, k: int) -> list[list[str]]:
    field = next(f for f in client.describe_collection(collection)["fields"] if f["name"] == "vector")
    dim = int(field["params"]["dim"])
    # An xbt gallery stores [vector, bias] (one extra dimension for its NNN calibration): a plain query is [q, 0].
    data = np.pad(queries, ((0, 0), (0, dim - queries.shape[1]))).astype(np.float32)
    rows = client.search(collection, data=[row.tolist() for row in data], limit=k, anns_field="vector")
    return [[str(hit["id"]) for hit in row] for row in rows]


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = recipe_arguments(__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True, help="a Milvus Lite file (.db) or a server, e.g. http://localhost:19530")
    parser.add_argument("--collection", required=True, help="the collection or alias (an xbt gallery's NAME)")
    args = parser.parse_args(argv)
    return search_and_print(MilvusClient(uri=args.uri), search, args.collection, args)


if __name__ == "__main__":
    main()
