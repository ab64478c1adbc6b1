"""A gallery in Milvus (pymilvus `MilvusClient`): Milvus Lite on a local file, or a Milvus server by URI,
behind the same interface as the embedded store (`xbt.gallery.base.GalleryBackend`).

Reference: `milvus:URI[#NAME]`. URI is a Milvus Lite file (`./photos.db`; one process at a time, the
engine holds a lock on it) or a server (`http://host:19530`; token from $XBT_MILVUS_TOKEN); NAME (default
"gallery") is the name the gallery is served under.

Layout: the gallery is a physical collection `NAME__<fingerprint[:12]>_<dim>d` and an alias NAME pointing
at it. Creating the alias is the commit point of `create` (a collection without it is a creation that was
interrupted, and is dropped by the next create). A migration fills a second collection, named the same
way for the new space, and its cut-over is one `alter_alias`: every client that opens NAME afterwards
gets the new space. An open `MilvusGallery` keeps talking to the physical collection it resolved, so the
stamp it checks is always the one of the vectors it searches.

Space stamping: the collection's properties hold the EmbeddingSpace (`xbt.space`) and every row carries
`space` = fingerprint/dim. `add` and `search` refuse vectors of any other space (same dimension included),
exactly as the embedded store; searches also filter on the row stamp, so a row written by another client
under another stamp is never returned. Rows: id (VARCHAR primary key), vector (FLOAT_VECTOR, inner
product on unit vectors), space, seq (insertion order, for oldest-first), added_at, payload (JSON).

Calibration (`calibrate`, NNN hubness reduction; `xbt.ranking.nnn`): the bias is folded into the
vector as one extra dimension, as in the embedded store: rows hold [g, bias] and a `calib` field naming
the calibration the bias belongs to ("" for none); a query of the calibrated model searches [q, -1]
(score q . g - bias) over the rows of that calibration, any other query [q, 0] (plain q . g). Why not a
scalar field: Milvus cannot add a per-row offset to a vector score, and re-ranking an over-fetched top-m
by q . g - bias is not exact (an item outside the raw top-m can enter the calibrated top-k); the extra
dimension is exact with FLAT and as good as the index otherwise. The bank of queries lives in its own
small collection (`COLLECTION_nnn_ID`), so items added later get their bias from it. Calibrating rewrites
every row (upsert) and then commits by setting the collection property `xbt.calibration`; rows whose
`calib` is not the committed calibration (an interrupted recalibration, a client that added rows with a
stale view) are searched in a second pass as [q, 0] and returned marked uncalibrated, so scores are never
mixed. Collections of format xbt.gallery.milvus/1 (no extra dimension) open as before but cannot be
calibrated: copy them into a new gallery (`xbt gallery export` / `import`).

Durability: `add` and `delete` return after the engine accepted the write. Milvus Lite appends it to its
write-ahead log and flushes it to the operating system before returning (it survives SIGKILL of the
process; an OS crash can lose the last writes, as its WAL does not fsync per batch); a Milvus server
acknowledges after its log. Consistency level Strong: a search sees every acknowledged write.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xbt.errors import InputError, XbtError
from xbt.gallery.index import IndexConfig
from xbt.gallery.media import prune_media
from xbt.gallery.store import (
    CONFLICT_HINT,
    Gallery,
    GalleryInfo,
    GallerySealedError,
    Hit,
    OnConflict,
    _check_ids,
    _payload_json,
    as_vectors,
    calibration_applies,
    calibration_stamp,
    item_biases,
)
from xbt.models.base import EmbeddingSpace

FORMAT = "xbt.gallery.milvus/2"  # vectors of dim + 1 (the calibration bias) and a `calib` field per row
FORMAT_V1 = "xbt.gallery.milvus/1"  # still read and written; cannot be calibrated
PREFIX = "milvus:"
DEFAULT_NAME = "gallery"
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,180}$")
_ID_CHUNK = 512  # ids per filter expression / get call
_ROW_CHUNK = 2048  # rows per insert call (512-d: 4 MiB of vectors, well under gRPC's message limit)
_MAX_K = 16384  # Milvus's largest top-k
SEALED_PROPERTY = "xbt.sealed"  # why the collection refuses writes (a migration's cut-over)


class MilvusError(XbtError):
    """The Milvus engine refused or failed an operation (the message says which and why)."""


@dataclass(frozen=True)
class MilvusRef:
    """A parsed `milvus:URI#NAME` reference (file URIs made absolute, so it opens from any folder)."""

    uri: str
    name: str

    @classmethod
    def parse(cls, text: str) -> MilvusRef:
        if not text.startswith(PREFIX):
            raise InputError(f"{text!r} is not a Milvus reference; write milvus:./FILE.db or milvus:http://HOST:19530#NAME")
        body = text[len(PREFIX):]
        uri, _, name = body.rpartition("#") if "#" in body else (body, "", DEFAULT_NAME)
        if not uri:
            raise InputError(f"{text!r} names no Milvus URI; write milvus:./FILE.db or milvus:http://HOST:19530#NAME")
        if not _NAME.match(name):
            raise InputError(f"Milvus name {name!r}: use letters, digits and underscores, starting with a letter")
        if not uri.startswith(SERVER_SCHEMES):
            if not uri.endswith(".db"):
                raise InputError(f"a Milvus Lite file must end in .db (pymilvus' rule); got {uri!r}")
            uri = str(Path(uri).expanduser().resolve())
        return cls(uri, name)

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(SERVER_SCHEMES)

    def with_name(self, name: str) -> MilvusRef:
        return MilvusRef(self.uri, name)

    def __str__(self) -> str:
        return f"{PREFIX}{self.uri}#{self.name}"


def physical_name(alias: str, space: EmbeddingSpace) -> str:
    """The collection that holds `alias`'s vectors of `space` (one per space: a migration adds the next)."""
    return f"{alias}__{space.fingerprint[:12]}_{space.dim}d"


def stamp(space: EmbeddingSpace) -> str:
    """What every row carries: the full fingerprint and the dimension (what EmbeddingSpace.check compares)."""
    return f"{space.fingerprint}/{space.dim}"


_CLIENTS_LOCK = threading.Lock()


def connect(uri: str) -> Any:
    """A MilvusClient for a server URI or a Milvus Lite file (started in this process on first use)."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    if not os.environ.get("XBT_MILVUS_DEBUG"):  # refusals become MilvusError/InputError with the message;
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # pymilvus' own tracebacks are noise then
    # Milvus Lite's gRPC server keeps grpc's default ping policy (one ping per 5 minutes without data), so
    # pymilvus' 10 s keepalive gets the channel closed (GOAWAY too_many_pings) during a long call such as
    # an HNSW build at load, and the call is retried or lost: no keepalive pings to a Lite engine.
    options = {} if uri.startswith(SERVER_SCHEMES) else {"grpc.keepalive_time_ms": 2**31 - 1,
                                                          "grpc.keepalive_permit_without_calls": 0}
    with _CLIENTS_LOCK:
        try:
            return MilvusClient(uri=uri, token=os.environ.get("XBT_MILVUS_TOKEN", ""), grpc_options=options)
        except MilvusException as exc:
            hint = (" Milvus Lite serves one process at a time: is another process using this file? For shared"
                    " access run a Milvus server and use milvus:http://HOST:19530#NAME." if not uri.startswith(SERVER_SCHEMES)
                    else " Is the server running and reachable?")
            raise MilvusError(f"cannot open Milvus at {uri}: {exc}.{hint}") from exc


def release_lite(path: str | Path) -> None:
    """Stop this process's Milvus Lite engine for a file and free its lock (so another process may open
    it). Galleries still open on it stop working."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # pragma: no cover - milvus-lite is pinned
        return
    server_manager_instance.release_server(str(Path(path).expanduser().resolve()))


def _aliases(client: Any) -> set[str]:
    """Every alias the client's database holds (pymilvus answers a dict, despite its List hint)."""
    listed = client.list_aliases()
    return set(listed.get("aliases", []) if isinstance(listed, Mapping) else listed)


def _schema(client: Any, dim: int, description: str) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim + 1)  # [unit vector, calibration bias]
    schema.add_field("space", DataType.VARCHAR, max_length=256)
    schema.add_field("seq", DataType.INT64)
    schema.add_field("added_at", DataType.DOUBLE)
    schema.add_field("payload", DataType.JSON)
    # The calibration the row's bias belongs to; "" for none (also for a row written around xbt without it).
    schema.add_field("calib", DataType.VARCHAR, max_length=64, default_value="")
    return schema


def _bank_schema(client: Any, dim: int) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description="xbt calibration bank")
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _milvus_index(kind: str, config: IndexConfig, n: int) -> tuple[str, dict[str, Any]]:
    """Milvus index type and build parameters for an xbt index kind."""
    if kind == "hnsw":
        return "HNSW", {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction}
    if kind == "ivf":
        return "IVF_FLAT", {"nlist": config.ivf_nlist or max(1, config.nlist(max(n, 1)))}
    return "FLAT", {}


def _kind_at_creation(config: IndexConfig) -> str:
    """Milvus trains and builds indexes per segment itself, so an explicit kind is kept from the start;
    "auto" starts exact and is re-chosen by size at `compact()`."""
    return config.kind if config.kind in ("hnsw", "ivf", "flat") else config.choose(0)


@dataclass
class MilvusGalleryInfo(GalleryInfo):
    backend: str = "milvus"
    uri: str = ""
    collection: str = ""
    alias: str | None = None


class MilvusGallery:
    """A stamped gallery in one Milvus collection. Use `MilvusGallery.create` / `MilvusGallery.open`."""

    def __init__(self, ref: MilvusRef, client: Any, collection: str, alias: str | None):
        self._ref, self._client, self.collection, self.alias = ref, client, collection, alias
        self._lock = threading.RLock()
        props = self._describe()["properties"]
        if props.get("xbt.format") not in (FORMAT, FORMAT_V1):
            raise InputError(
                f"the Milvus collection {collection!r} at {ref.uri} is not an xbt gallery (format"
                f" {props.get('xbt.format')!r}); create one with `xbt gallery build` or MilvusGallery.create"
            )
        self.space = EmbeddingSpace.from_dict(json.loads(props["xbt.space"]))
        self._stamp = stamp(self.space)
        self.modality: str | None = props.get("xbt.modality") or None
        self.created_at = float(props.get("xbt.created_at", 0))
        self.index_config = IndexConfig.from_dict(json.loads(props.get("xbt.index", "{}")))
        self._extra = json.loads(props.get("xbt.extra", "{}"))
        self._kind = str(props.get("xbt.index_kind", "flat"))
        self._seq = 0
        self._padded = props.get("xbt.format") == FORMAT  # rows hold [vector, bias] and a calib field
        self._calibration: dict[str, Any] | None = json.loads(props["xbt.calibration"]) if props.get("xbt.calibration") else None
        self._bank: np.ndarray | None = None

    # ---- construction ---------------------------------------------------------------------------
    @staticmethod
    def _resolve(client: Any, name: str) -> tuple[str | None, str | None]:
        """(physical collection, alias): NAME is an alias (an xbt gallery) or a collection (a physical
        one, e.g. a migration's new collection before its cut-over); (None, None) when neither."""
        if name in _aliases(client):
            return client.describe_alias(name)["collection_name"], name
        if client.has_collection(name):
            return name, None
        return None, None

    @classmethod
    def exists(cls, ref: str) -> bool:
        parsed = MilvusRef.parse(ref)
        if parsed.lite and not Path(parsed.uri).exists():
            return False
        client = connect(parsed.uri)
        try:
            return cls._resolve(client, parsed.name)[0] is not None
        finally:
            client.close()

    @classmethod
    def open(cls, ref: str, index: IndexConfig | None = None) -> MilvusGallery:
        """Open the gallery a reference names; `index` replaces its stored index configuration (rebuilt)."""
        parsed = MilvusRef.parse(ref)
        if parsed.lite and not Path(parsed.uri).exists():
            raise InputError(f"no Milvus Lite file at {parsed.uri}; build a gallery there with `xbt gallery build`")
        client = connect(parsed.uri)
        try:
            collection, alias = cls._resolve(client, parsed.name)
            if collection is None:
                raise InputError(f"no gallery {parsed.name!r} in Milvus at {parsed.uri}; build one with `xbt gallery build`")
            gallery = cls(parsed, client, collection, alias)
            client.load_collection(collection)
        except BaseException:
            client.close()
            raise
        if index is not None and index != gallery.index_config:
            gallery._set_props({"xbt.index": json.dumps(index.to_dict())})
            gallery.index_config = index
            gallery.compact()
        return gallery

    @classmethod
    def create(cls, ref: str, space: EmbeddingSpace, index: IndexConfig | None = None, modality: str | None = None,
               extra: Mapping[str, Any] | None = None) -> MilvusGallery:
        """A new, empty gallery served under the reference's name."""
        parsed = MilvusRef.parse(ref)
        if modality not in (None, "image", "text"):
            raise InputError(f"modality must be 'image' or 'text', not {modality!r}")
        client = connect(parsed.uri)
        try:
            if cls._resolve(client, parsed.name)[0] is not None:
                raise InputError(f"Milvus at {parsed.uri} already holds {parsed.name!r}; open it, or choose another name")
            collection = physical_name(parsed.name, space)
            if client.has_collection(collection):  # a create interrupted before its alias: start it again
                client.drop_collection(collection)
            cls._create_collection(client, collection, space, index or IndexConfig(), modality, extra)
            client.create_alias(collection, parsed.name)  # the commit point
            gallery = cls(parsed, client, collection, parsed.name)
        except BaseException:
            client.close()
            raise
        return gallery

    @staticmethod
    def _create_collection(client: Any, collection: str, space: EmbeddingSpace, index: IndexConfig,
                           modality: str | None, extra: Mapping[str, Any] | None) -> None:
        kind = _kind_at_creation(index)
        index_type, params = _milvus_index(kind, index, 0)
        index_params = client.prepare_index_params()
        index_params.add_index("vector", index_type=index_type, metric_type="IP", params=params)
        props = {
            "xbt.format": FORMAT, "xbt.space": json.dumps(space.to_dict()), "xbt.modality": modality or "",
            "xbt.created_at": repr(time.time()), "xbt.index": json.dumps(index.to_dict()), "xbt.index_kind": kind,
            "xbt.extra": json.dumps(dict(extra or {})),
        }
        client.create_collection(collection, schema=_schema(client, space.dim, f"xbt gallery in space {space.id}"),
                                 index_params=index_params, consistency_level="Strong", properties=props)

    def create_successor(self, space: EmbeddingSpace, index: IndexConfig | None = None,
                         extra: Mapping[str, Any] | None = None) -> str:
        """A second, empty collection for a migration into `space` (not served until `serve_as`);
        returns its reference. One left by an interrupted start is emptied (dropped and made again)."""
        if self.alias is None:
            raise InputError(
                f"{self.collection!r} is not served under an alias, so a migration could not cut over to it;"
                " migrate a gallery built by xbt (open it by its name)"
            )
        collection = physical_name(self.alias, space)
        if collection == self.collection:
            raise InputError("the new model emits the gallery's own space: there is nothing to backfill")
        with self._lock:
            if self._client.has_collection(collection):
                self._client.drop_collection(collection)
            self._create_collection(self._client, collection, space, index or self.index_config, self.modality, extra)
        return str(self._ref.with_name(collection))

    def serve_as(self, alias: str) -> None:
        """Point `alias` (a name, or a milvus: reference on this engine) at this collection, atomically: a
        migration's cut-over. Idempotent."""
        if alias.startswith(PREFIX):
            target = MilvusRef.parse(alias)
            if target.uri != self._ref.uri:
                raise InputError(f"{alias} is on another Milvus than {self.ref}; an alias cannot cross engines")
            alias = target.name
        with self._lock:
            if alias in _aliases(self._client):
                self._client.alter_alias(self.collection, alias)
            else:
                self._client.create_alias(self.collection, alias)

    def __enter__(self) -> MilvusGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ---- meta ------------------------------------------------------------------------------------
    def _db(self) -> Any:
        if self._client is None:
            raise InputError(f"the gallery {self.ref} is closed; open it again")
        return self._client

    def _describe(self) -> dict[str, Any]:
        return self._db().describe_collection(self.collection)

    def _set_props(self, props: Mapping[str, str]) -> None:
        self._db().alter_collection_properties(self.collection, dict(props))

    @property
    def ref(self) -> str:
        """The reference of the physical collection (what a migration records)."""
        return str(self._ref.with_name(self.collection))

    @property
    def path(self) -> str:
        return str(self._ref)

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self._extra)

    @property
    def media_dir(self) -> Path:
        """Where uploads are kept: beside a Milvus Lite file. A server has no shared folder to offer."""
        if not self._ref.lite:
            raise InputError("uploads need a shared media store, which a Milvus server does not provide;"
                             " add items by image path or URL instead")
        return Path(self._ref.uri + ".media")

    # ---- writes ----------------------------------------------------------------------------------
    def _next_seqs(self, n: int) -> np.ndarray:
        """Increasing insertion numbers (time-based across processes, strictly increasing within one)."""
        start = max(time.time_ns(), self._seq + 1)
        self._seq = start + n - 1
        return np.arange(start, start + n, dtype=np.int64)

    def add(self, vectors: Any, ids: Sequence[str], payloads: Sequence[Mapping[str, Any] | None] | None = None, *,
            space: EmbeddingSpace, on_conflict: OnConflict = "error") -> list[str]:
        """Store vectors (made in `space`) under ids, with JSON payloads; returns the ids written. Refuses
        vectors of any other space (SpaceMismatchError), even of the same dimension."""
        self.space.check(space, "the vectors to add")
        ids = _check_ids(ids)
        x = as_vectors(vectors, self.space.dim, "the vectors to add")
        if len(x) != len(ids):
            raise InputError(f"{len(x)} vectors for {len(ids)} ids")
        payloads = list(payloads) if payloads is not None else [None] * len(ids)
        if len(payloads) != len(ids):
            raise InputError(f"{len(payloads)} payloads for {len(ids)} ids")
        if on_conflict not in ("error", "skip", "replace"):
            raise InputError(f"on_conflict must be error, skip or replace, not {on_conflict!r}")
        docs = [json.loads(_payload_json(p, i)) for p, i in zip(payloads, ids)]
        with self._lock:
            self._refuse_if_sealed()
            existing = self.present(ids)
            if existing and on_conflict == "error":
                shown = ", ".join(sorted(existing)[:5])
                raise InputError(f"{len(existing)} id(s) already in the gallery ({shown}); delete them first or use"
                                 f" {CONFLICT_HINT}")
            keep = [j for j, i in enumerate(ids) if not (on_conflict == "skip" and i in existing)]
            seqs, now = self._next_seqs(len(keep)), time.time()
            rows = [{"id": ids[j], "vector": x[j], "space": self._stamp, "seq": int(s), "added_at": now,
                     "payload": docs[j]} for j, s in zip(keep, seqs)]
            if self._padded:
                self._pad_rows(rows, x[keep])
            write = self._db().upsert if on_conflict == "replace" and existing else self._db().insert
            for start in range(0, len(rows), _ROW_CHUNK):
                self._call(write, self.collection, rows[start : start + _ROW_CHUNK])
            return [ids[j] for j in keep]

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items by id (unknown ids are ignored); returns how many went."""
        ids = _check_ids(ids, unique=False)
        with self._lock:
            self._refuse_if_sealed()
            there = sorted(self.present(ids))
            for start in range(0, len(there), _ID_CHUNK):
                self._call(self._db().delete, self.collection, ids=there[start : start + _ID_CHUNK])
            return len(there)

    # ---- sealing (a migration's cut-over) -----------------------------------------------------------
    def seal(self, reason: str) -> None:
        """Refuse later adds and deletes with `reason` (a collection property every write reads first, under
        this object's write lock, which the seal takes too: no write of this process is in flight once it
        returns). Milvus has no transactions: a write by another process that read the property just before
        the seal may still land after the cut-over compared the two collections; run one writer process per
        Milvus collection during a cut-over."""
        with self._lock:
            self._set_props({SEALED_PROPERTY: reason})

    def unseal(self) -> None:
        self._db().drop_collection_properties(self.collection, [SEALED_PROPERTY])

    @property
    def sealed(self) -> str | None:
        return self._describe()["properties"].get(SEALED_PROPERTY) or None

    def _refuse_if_sealed(self) -> None:
        reason = self.sealed
        if reason:
            raise GallerySealedError(f"the gallery at {self.ref} takes no more writes: {reason}")

    # ---- calibration -----------------------------------------------------------------------------
    @property
    def calibration(self) -> dict[str, Any] | None:
        """The stamp of this gallery's calibration (None: not calibrated), as read at open / `refresh`."""
        return dict(self._calibration) if self._calibration else None

    def _bank_name(self, calibration_id: str) -> str:
        return f"{self.collection}_nnn_{calibration_id[:16]}"

    def calibration_bank(self) -> np.ndarray | None:
        """The calibration's bank of queries (None: not calibrated, or its bank collection is gone)."""
        with self._lock:
            self._refresh_calibration()
            bank = self._bank_vectors() if self._calibration else None
            return None if bank is None else bank.copy()

    def _bank_vectors(self) -> np.ndarray | None:
        """The committed calibration's bank (read from its collection once); None if it is missing."""
        assert self._calibration is not None
        if self._bank is None:
            name = self._bank_name(self._calibration["id"])
            db = self._db()
            if not db.has_collection(name):
                return None
            self._call(db.load_collection, name)
            rows: list[dict[str, Any]] = []
            it = self._call(db.query_iterator, name, batch_size=4096, filter="", output_fields=["row", "vector"])
            try:
                while page := it.next():
                    rows += page
            finally:
                it.close()
            rows.sort(key=lambda r: int(r["row"]))
            if len(rows) != int(self._calibration["bank_size"]):
                return None
            self._bank = np.asarray([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), self.space.dim)
        return self._bank

    def _pad_rows(self, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Rows of a /2 collection: [vector, bias of the committed calibration] and its id ([vector, 0] and
        "" without one, or when its bank cannot be read: such rows are searched uncalibrated)."""
        self._refresh_calibration()
        bank = self._bank_vectors() if self._calibration else None
        if self._calibration and bank is not None and len(rows):
            biases = item_biases(vectors, bank, self._calibration["alpha"], self._calibration["k"])
            calib = self._calibration["id"]
        else:
            biases, calib = np.zeros(len(rows), np.float32), ""
        for row, v, b in zip(rows, vectors, biases):
            row["vector"] = np.append(v, np.float32(b)).astype(np.float32)
            row["calib"] = calib

    def _refresh_calibration(self) -> None:
        props = self._describe()["properties"]
        calibration = json.loads(props["xbt.calibration"]) if props.get("xbt.calibration") else None
        if (calibration or {}).get("id") != (self._calibration or {}).get("id"):
            self._calibration, self._bank = calibration, None

    def calibrate(self, bank: Any, *, alpha: float, k: int, query_model: Mapping[str, Any], space: EmbeddingSpace,
                  source: str | None = None, batch: int = _ROW_CHUNK) -> dict[str, Any]:
        """Calibrate the gallery for one query model (NNN; see the module's doc): stores the bank in its own
        collection, rewrites every row as [vector, bias] under the new calibration's id, then commits the
        stamp (collection property). Replaces an earlier calibration; an interrupted run leaves the previous
        one in force (rows it rewrote are searched uncalibrated until it is run again). Returns the stamp."""
        self.space.check(space, "the bank of queries")
        if not self._padded:
            raise InputError(f"{self.ref} is a gallery of format {FORMAT_V1}, which has no room for a calibration"
                             " bias; copy it into a new gallery (`xbt gallery export` / `import`) and calibrate that")
        bank = as_vectors(bank, self.space.dim, "the bank of queries")
        if len(bank) == 0:
            raise InputError("the bank of queries is empty: give training pairs (--queries) to calibrate with")
        calibration_stamp(alpha=alpha, k=k, bank_size=len(bank), query_model=query_model)  # checks the arguments
        with self._lock:
            db = self._db()
            new_id = calibration_stamp(alpha=alpha, k=k, bank_size=len(bank), query_model=query_model)["id"]
            bank_name = self._bank_name(new_id)
            index_params = db.prepare_index_params()
            index_params.add_index("vector", index_type="FLAT", metric_type="IP")
            self._call(db.create_collection, bank_name, schema=_bank_schema(db, self.space.dim),
                       index_params=index_params, consistency_level="Strong")
            for start in range(0, len(bank), _ROW_CHUNK):
                self._call(db.insert, bank_name, [{"row": start + i, "vector": v}
                                                  for i, v in enumerate(bank[start : start + _ROW_CHUNK])])
            self._call(db.flush, bank_name)
            biases = self._rewrite_biases(bank, alpha, k, new_id, batch)
            stamp = {**calibration_stamp(alpha=alpha, k=k, bank_size=len(bank), query_model=query_model,
                                         source=source, bias=biases), "id": new_id}
            self._set_props({"xbt.calibration": json.dumps(stamp)})  # the commit point
            self._calibration, self._bank = stamp, bank
            self._drop_banks(keep=bank_name)
            return dict(stamp)

    def _rewrite_biases(self, bank: np.ndarray, alpha: float, k: int, calibration_id: str, batch: int) -> np.ndarray:
        """Rewrite each row as [vector, bias] under `calibration_id`, a page of rows at a time (memory bounded
        by the page, not the collection). Just before a page is written, its rows are read again: a row
        deleted or replaced (another seq) since the scan is left as its writer made it, so a concurrent
        delete is never resurrected nor a replace reverted (a replaced row is given its bias by the writer
        once the stamp commits, or searched uncalibrated until then). Returns the biases written."""
        written: list[np.ndarray] = []
        it = self._call(self._db().query_iterator, self.collection, batch_size=batch, filter="",
                        output_fields=["id", "seq", "vector"])
        try:
            while True:
                page = it.next()
                if not page:
                    break
                vectors = np.asarray([r["vector"] for r in page], dtype=np.float32).reshape(len(page), -1)[:, : self.space.dim]
                biases = item_biases(vectors, bank, alpha, k)
                now = {str(r["id"]): r for r in self._call(self._db().get, self.collection, ids=[r["id"] for r in page],
                                                           output_fields=["id", "seq", "space", "added_at", "payload"])}
                chunk = [{"id": r["id"], "vector": np.append(v, np.float32(b)).astype(np.float32),
                          "space": now[r["id"]]["space"], "seq": int(r["seq"]), "added_at": float(now[r["id"]]["added_at"]),
                          "payload": now[r["id"]].get("payload") or {}, "calib": calibration_id}
                         for r, v, b in zip(page, vectors, biases)
                         if r["id"] in now and int(now[r["id"]]["seq"]) == int(r["seq"])]
                if chunk:
                    self._call(self._db().upsert, self.collection, chunk)
                written.append(biases)
        finally:
            it.close()
        return np.concatenate(written) if written else np.zeros(0, np.float32)

    def _drop_banks(self, keep: str | None) -> None:
        """Drop this collection's bank collections but `keep` (left by earlier or interrupted calibrations)."""
        db = self._db()
        prefix = f"{self.collection}_nnn_"
        for name in db.list_collections():
            if name.startswith(prefix) and name != keep:
                self._call(db.drop_collection, name)

    def clear_calibration(self) -> bool:
        """Remove the calibration (rows keep their bias values but are searched plainly); False if none."""
        with self._lock:
            self._refresh_calibration()
            if not self._calibration:
                return False
            self._set_props({"xbt.calibration": ""})
            self._calibration, self._bank = None, None
            self._drop_banks(keep=None)
            return True

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, **kwargs)
        except MilvusException as exc:
            raise MilvusError(f"Milvus refused {getattr(fn, '__name__', 'a call')} on {self.ref}: {exc}") from exc

    # ---- reads -----------------------------------------------------------------------------------
    def _search_params(self, kind: str, k: int) -> dict[str, Any]:
        if kind == "hnsw":
            return {"metric_type": "IP", "params": {"ef": max(self.index_config.hnsw_ef_search, k)}}
        if kind == "ivf":
            return {"metric_type": "IP", "params": {"nprobe": self.index_config.ivf_nprobe}}
        return {"metric_type": "IP"}

    @property
    def index_kind(self) -> str:
        """The kind the collection's index was built as (read at open, changed by `compact`)."""
        return self._kind

    def search(self, queries: Any, k: int, *, space: EmbeddingSpace, query_model: str | None = None) -> list[list[Hit]]:
        """Top-k items by inner product (cosine) per query row. Queries must come from this gallery's
        space: SpaceMismatchError otherwise, whatever their dimension. `query_model`: the encoder id of
        the model that made the queries; when the gallery is calibrated for it, scores are q . g - bias[g]
        (hits calibrated=True; rows of no or another calibration: plain q . g, calibrated=False)."""
        self.space.check(space, "the query vectors")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive integer; got {k!r}")
        q = as_vectors(queries, self.space.dim, "the query vectors")
        k = min(int(k), _MAX_K)
        applies = self._padded and calibration_applies(self._calibration, query_model)
        space_filter = f'space == "{self._stamp}"'
        with self._lock:
            if not applies:
                data = np.concatenate([q, np.zeros((len(q), 1), np.float32)], axis=1) if self._padded else q
                return self._search(data, k, space_filter, None)
            assert self._calibration is not None
            calib = self._calibration["id"]
            hits = self._search(np.concatenate([q, -np.ones((len(q), 1), np.float32)], axis=1), k,
                                f'{space_filter} and calib == "{calib}"', True)
            others = self._call(self._db().query, self.collection, filter=f'calib != "{calib}"', output_fields=["count(*)"])
            if int(others[0]["count(*)"]) == 0:
                return hits
            plain = self._search(np.concatenate([q, np.zeros((len(q), 1), np.float32)], axis=1), k,
                                 f'{space_filter} and calib != "{calib}"', False)
        return [sorted(a + b, key=lambda h: -h.score)[:k] for a, b in zip(hits, plain)]

    def _search(self, data: np.ndarray, k: int, expr: str, calibrated: bool | None) -> list[list[Hit]]:
        result = self._call(self._db().search, self.collection, data=[row for row in data], limit=k,
                            filter=expr, output_fields=["payload"], anns_field="vector",
                            search_params=self._search_params(self.index_kind, k))
        return [[Hit(str(h["id"]), float(h["distance"]), dict(h["entity"].get("payload") or {}), self.space.id,
                     calibrated) for h in row] for row in result]

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> dict[str, dict[str, Any]]:
        """{id: {"payload": ..., "added_at": ..., ["vector": ...]}} for the ids that are stored."""
        fields = ["id", "payload", "added_at"] + (["vector"] if with_vectors else [])
        out: dict[str, dict[str, Any]] = {}
        ids = list(dict.fromkeys(ids))
        with self._lock:
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                for row in self._call(self._db().get, self.collection, ids=chunk, output_fields=fields):
                    entry: dict[str, Any] = {"payload": dict(row.get("payload") or {}), "added_at": float(row["added_at"])}
                    if with_vectors:
                        entry["vector"] = np.asarray(row["vector"], dtype=np.float32)[: self.space.dim]
                    out[str(row["id"])] = entry
        return out

    def present(self, ids: Sequence[str]) -> set[str]:
        """The subset of ids that are stored."""
        ids = list(dict.fromkeys(ids))
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(ids), _ID_CHUNK):
                rows = self._call(self._db().get, self.collection, ids=ids[start : start + _ID_CHUNK], output_fields=["id"])
                found.update(str(r["id"]) for r in rows)
        return found

    def _scan(self, fields: list[str], batch: int = 4096) -> list[dict[str, Any]]:
        """Every row's `fields` (plus seq), oldest first. Milvus has no ORDER BY: the rows are sorted here."""
        rows: list[dict[str, Any]] = []
        with self._lock:
            it = self._call(self._db().query_iterator, self.collection, batch_size=batch, filter="",
                            output_fields=list(dict.fromkeys(["id", "seq", *fields])))
            try:
                while True:
                    page = it.next()
                    if not page:
                        break
                    rows += page
            finally:
                it.close()
        rows.sort(key=lambda r: (int(r["seq"]), str(r["id"])))
        return rows

    def iter_items(self, batch: int = 1024) -> Iterator[tuple[str, dict[str, Any], float]]:
        """(id, payload, added_at) of every item, oldest first."""
        for r in self._scan(["payload", "added_at"], max(batch, 1)):
            yield str(r["id"]), dict(r.get("payload") or {}), float(r["added_at"])

    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self._scan([])]

    def __len__(self) -> int:
        with self._lock:
            rows = self._call(self._db().query, self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def info(self) -> MilvusGalleryInfo:
        n = len(self)
        with self._lock:
            self._refresh_calibration()
            calibration = None
            if self._calibration:
                others = self._call(self._db().query, self.collection, filter=f'calib != "{self._calibration["id"]}"',
                                    output_fields=["count(*)"])
                calibration = {**self._calibration, "uncalibrated_items": int(others[0]["count(*)"])}
        return MilvusGalleryInfo(
            path=self.path, format=FORMAT, space=self.space.to_dict(), space_id=self.space.id, modality=self.modality,
            size=n, index_kind=self.index_kind, index_config=self.index_config.to_dict(),
            recommended_kind=self.index_config.choose(n), tombstones=0, created_at=self.created_at, extra=self.extra,
            uri=self._ref.uri, collection=self.collection, alias=self.alias, calibration=calibration,
        )

    def verify(self) -> list[str]:
        """Problems found by a full scan (empty when consistent): row stamps, vector norms, the alias."""
        problems: list[str] = []
        rows = self._scan(["space", "vector"])
        bad = [r["id"] for r in rows if r["space"] != self._stamp]
        if bad:
            problems.append(f"{len(bad)} rows stamped with another space (e.g. {bad[0]!r})")
        norms = np.array([np.linalg.norm(np.asarray(r["vector"])[: self.space.dim]) for r in rows]) if rows else np.ones(0)
        if len(norms) and np.abs(norms - 1).max() > 1e-3:
            problems.append(f"{int((np.abs(norms - 1) > 1e-3).sum())} vectors are not of unit length")
        if self.alias is not None and self._resolve(self._db(), self.alias)[0] != self.collection:
            problems.append(f"the alias {self.alias!r} no longer points at {self.collection!r} (a cut-over since?)")
        return problems

    def compact(self) -> None:
        """Flush the log; re-choose the index kind by size (as the embedded store does at compact) and
        rebuild the index when it changes (IVF: always, to re-train its lists on the data now there); remove
        media no item names (`prune_media`)."""
        with self._lock:
            db = self._db()
            self._call(db.flush, self.collection)
            prune_media(self)
            n = len(self)
            kind = self.index_config.choose(n)
            if kind == self.index_kind and kind != "ivf":
                return
            index_type, params = _milvus_index(kind, self.index_config, n)
            self._call(db.release_collection, self.collection)
            for name in db.list_indexes(self.collection):
                self._call(db.drop_index, self.collection, name)
            index_params = db.prepare_index_params()
            index_params.add_index("vector", index_type=index_type, metric_type="IP", params=params)
            try:
                self._call(db.create_index, self.collection, index_params)
            except MilvusError:  # a create retried by the client after it had already taken effect is fine
                if (db.describe_index(self.collection, "vector") or {}).get("index_type") != index_type:
                    raise
            self._set_props({"xbt.index_kind": kind})
            self._kind = kind
            self._call(db.load_collection, self.collection)

    def refresh(self) -> None:
        """Pick up a calibration made by another client (the rows are the engine's state)."""
        with self._lock:
            self._refresh_calibration()

    # Uploaded bytes are kept, named by content, in `media_dir`: the embedded store's very code.
    store_media = Gallery.store_media
