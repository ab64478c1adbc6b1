"""The faiss side of a gallery: which index kind for how many vectors (`IndexConfig`), and one small
wrapper (`VectorIndex`) that knows kinds, int64 labels, tombstones and its snapshot format. It holds no
durable state: the gallery store (`xbt.gallery.store`) owns the rows and rebuilds or syncs this from them.

Index choice (`IndexConfig`, kind="auto"): exact inner product (IndexFlatIP) up to `flat_max` vectors
(100k: a lone 512-d brute-force query takes ~5-10 ms on one core there, 9 ms in docs/benchmarks.md;
batched queries share each pass over the vectors); HNSW up to `hnsw_max` (5M: sub-ms queries
at recall ~0.99, but HNSW's build time and ~M*8 bytes/vector of links grow past that); IVF beyond
(trains in minutes and adds fast). The kind is decided when the index is built: at open without a
usable snapshot and at `compact()`. HNSW cannot remove vectors, so its deletes are tombstones filtered
at search (faiss IDSelector) until the next rebuild.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import faiss
import numpy as np

from xbt.errors import InputError

IVF_MIN_POINTS_PER_LIST = 39  # faiss k-means wants at least this many training points per centroid

IndexKind = Literal["auto", "flat", "hnsw", "ivf"]


@dataclass(frozen=True)
class IndexConfig:
    """How vectors are searched. `kind="auto"` picks by size: flat <= flat_max < hnsw <= hnsw_max < ivf."""

    kind: IndexKind = "auto"
    flat_max: int = 100_000
    hnsw_max: int = 5_000_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None  # None: 4 * sqrt(n), bounded by the training data
    ivf_nprobe: int = 32
    tombstone_rebuild_fraction: float = 0.3  # HNSW: rebuild when this share of the index is deleted

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "flat", "hnsw", "ivf"):
            raise InputError(f"index kind must be auto, flat, hnsw or ivf, not {self.kind!r}")
        if self.flat_max < 0 or self.hnsw_max < self.flat_max:
            raise InputError("index thresholds need 0 <= flat_max <= hnsw_max")
        if self.hnsw_m < 2 or self.hnsw_ef_search < 1 or self.ivf_nprobe < 1:
            raise InputError("hnsw_m must be >= 2, hnsw_ef_search and ivf_nprobe >= 1")

    def choose(self, n: int) -> str:
        """The index kind for a gallery of n vectors. IVF needs training data: below
        IVF_MIN_POINTS_PER_LIST vectors it falls back to exact search until the next rebuild."""
        kind = self.kind
        if kind == "auto":
            kind = "flat" if n <= self.flat_max else "hnsw" if n <= self.hnsw_max else "ivf"
        if kind == "ivf" and n < IVF_MIN_POINTS_PER_LIST:
            kind = "flat"
        return kind

    def nlist(self, n: int) -> int:
        wanted = self.ivf_nlist or max(1, int(4 * math.sqrt(max(n, 1))))
        return max(1, min(wanted, n // IVF_MIN_POINTS_PER_LIST))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexConfig:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


class VectorIndex:
    """A faiss index over int64 labels, plus the labels it holds (sorted) and its tombstones."""

    def __init__(self, index: faiss.Index, kind: str, labels: np.ndarray, tombstones: np.ndarray | None = None):
        self.index, self.kind = index, kind
        self.labels = np.asarray(labels, dtype=np.int64)
        self.tombstones = np.asarray(tombstones if tombstones is not None else [], dtype=np.int64)

    @classmethod
    def build(cls, dim: int, config: IndexConfig, labels: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        n = len(labels)
        kind = config.choose(n)
        if kind == "flat":
            index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = config.hnsw_ef_construction
            index = faiss.IndexIDMap(inner)
        else:
            nlist = config.nlist(n)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = vectors
            if n > 256 * nlist:
                pick = np.random.default_rng(0).choice(n, 256 * nlist, replace=False)
                sample = vectors[np.sort(pick)]
            index.train(sample)
        built = cls(index, kind, np.empty(0, dtype=np.int64))
        built.add(labels, vectors)
        return built

    @property
    def live_count(self) -> int:
        return len(self.labels) - len(self.tombstones)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        if len(labels) == 0:
            return
        labels = np.asarray(labels, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        grows = len(self.labels) == 0 or (labels[0] > self.labels[-1] and bool(np.all(np.diff(labels) > 0)))
        if not grows:  # a label is held once: adding one already held would make search return it twice
            labels, first = np.unique(labels, return_index=True)
            fresh = ~np.isin(labels, self.labels)
            labels, vectors = labels[fresh], vectors[first[fresh]]
            if len(labels) == 0:
                return
        self.index.add_with_ids(vectors, labels)
        if grows:
            self.labels = np.concatenate([self.labels, labels])  # the common case: labels only grow
        else:
            self.labels = np.union1d(self.labels, labels)

    def remove(self, labels: np.ndarray) -> None:
        labels = np.intersect1d(np.asarray(labels, dtype=np.int64), self.labels)
        labels = np.setdiff1d(labels, self.tombstones)
        if len(labels) == 0:
            return
        if self.kind == "hnsw":  # HNSW graphs cannot drop nodes: filter them at search until a rebuild
            self.tombstones = np.union1d(self.tombstones, labels)
            return
        self.index.remove_ids(faiss.IDSelectorBatch(labels))
        self.labels = np.setdiff1d(self.labels, labels)

    def search(self, queries: np.ndarray, k: int, config: IndexConfig) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.live_count)
        if k <= 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        keep: list[Any] = []  # the selector objects must outlive the search call
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            # Filtering by tombstones makes the graph walk skip nodes; widen it in proportion.
            live_share = max(self.live_count / max(len(self.labels), 1), 1e-3)
            params.efSearch = int(min(max(config.hnsw_ef_search, 2 * k) / live_share, 16384))
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = min(config.ivf_nprobe, self.index.nlist)
        else:
            params = faiss.SearchParameters()
        if len(self.tombstones):
            batch = faiss.IDSelectorBatch(self.tombstones)
            sel = faiss.IDSelectorNot(batch)
            keep += [batch, sel]
            params.sel = sel
        scores, labels = self.index.search(queries, k, params=params)
        return scores, labels

    # ---- snapshot ---------------------------------------------------------------------------------
    def to_bytes(self, meta: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        meta_bytes = np.frombuffer(json.dumps({**meta, "kind": self.kind}).encode(), dtype=np.uint8)
        np.savez(buf, faiss=faiss.serialize_index(self.index), labels=self.labels, tombstones=self.tombstones,
                 meta=meta_bytes)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[VectorIndex, dict[str, Any]]:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            index = faiss.deserialize_index(np.ascontiguousarray(z["faiss"]))
            built = cls(index, meta["kind"], z["labels"], z["tombstones"])
        if built.index.ntotal != len(built.labels):
            raise ValueError("snapshot labels and index size disagree")
        return built, meta
