"""What every recipe shares: new-model query embeddings -> old-space queries, by the map that
`xbt export compat:DIR --format onnx` wrote, in onnxruntime. No xbt needed at query time."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def map_queries(map_file: str | Path, new: np.ndarray, old: np.ndarray | None = None) -> np.ndarray:
    """(n, new_dim) new-model embeddings [+ (n, old_dim) old-model ones, for an ensemble] -> (n, old_dim)
    unit vectors in the old gallery's space."""
    session = ort.InferenceSession(str(map_file), providers=["CPUExecutionProvider"])
    feeds = {"new": np.asarray(new, np.float32)}
    if "old" in [i.name for i in session.get_inputs()]:
        if old is None:
            raise SystemExit(f"{map_file} is an ensemble (its metadata say xbt.inputs=new,old): give the old"
                             " model's embeddings of the same queries with --old-queries")
        feeds["old"] = np.asarray(old, np.float32)
    return session.run(["query"], feeds)[0]


def recipe_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--map", required=True, help="text_map.onnx (or image_map.onnx) from `xbt export`")
    parser.add_argument("--queries", required=True, help="the new model's query embeddings, an (n, new_dim) .npy")
    parser.add_argument("--old-queries", help="an ensemble's second input: the old model's embeddings (.npy)")
    parser.add_argument("-k", type=int, default=10, help="how many ids per query")
    return parser


def mapped_queries(args: argparse.Namespace) -> np.ndarray:
    old = np.load(args.old_queries) if args.old_queries else None
    return map_queries(args.map, np.load(args.queries), old)


def search_and_print(client: Any, search: Callable[..., list[list[str]]], collection: str,
                     args: argparse.Namespace) -> list[list[str]]:
    """Map the queries, search the database's collection, close the client, print the ids as JSON."""
    try:
        hits = search(client, collection, mapped_queries(args), args.k)
    finally:
        client.close()
    print(json.dumps(hits))
    return hits
