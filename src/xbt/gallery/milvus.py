"""A gallery in Milvus (pymilvus `MilvusClient`): Milvus Lite on a local file, or a Milvus server by URI,
extending the gallery base the embedded store extends (`xbt.gallery.backend.GalleryBase`: validation,
search, calibration, seals and info are written there once); the reference, the client and the collection
layouts live in `xbt.gallery.milvus_engine`.

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
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xbt.errors import InputError
from xbt.gallery.backend import GalleryBase, GalleryInfo, Hit, bias_column, check_modality
from xbt.gallery.index import IndexConfig
from xbt.gallery.media import prune_media
from xbt.gallery.milvus_engine import (
    DEFAULT_NAME,
    PREFIX,
    SERVER_SCHEMES,
    MilvusError,
    MilvusRef,
    aliases,
    bank_schema,
    collection_schema,
    connect,
    kind_at_creation,
    milvus_index,
    physical_name,
    release_lite,
    stamp,
)
from xbt.models.base import EmbeddingSpace

__all__ = ["DEFAULT_NAME", "FORMAT", "FORMAT_V1", "PREFIX", "SERVER_SCHEMES", "MilvusError", "MilvusGallery",
           "MilvusGalleryInfo", "MilvusRef", "connect", "physical_name", "release_lite", "stamp"]

FORMAT = "xbt.gallery.milvus/2"  # vectors of dim + 1 (the calibration bias) and a `calib` field per row
FORMAT_V1 = "xbt.gallery.milvus/1"  # still read and written; cannot be calibrated
_ID_CHUNK = 512  # ids per filter expression / get call
_ROW_CHUNK = 2048  # rows per insert call (512-d: 4 MiB of vectors, well under gRPC's message limit)
SEALED_PROPERTY = "xbt.sealed"  # why the collection refuses writes (a migration's cut-over)


@dataclass
class MilvusGalleryInfo(GalleryInfo):
    backend: str = "milvus"
    uri: str = ""
    collection: str = ""
    alias: str | None = None


class MilvusGallery(GalleryBase):
    """A stamped gallery in one Milvus collection. Use `MilvusGallery.create` / `MilvusGallery.open`."""

    format_name = FORMAT
    max_k = 16384  # Milvus's largest top-k
    calibration_batch = _ROW_CHUNK
    info_type = MilvusGalleryInfo

    def __init__(self, ref: MilvusRef, client: Any, collection: str, alias: str | None):
        self._ref, self._client, self.collection, self.alias = ref, client, collection, alias
        props = self._describe()["properties"]
        if props.get("xbt.format") not in (FORMAT, FORMAT_V1):
            raise InputError(
                f"the Milvus collection {collection!r} at {ref.uri} is not an xbt gallery (format"
                f" {props.get('xbt.format')!r}); create one with `xbt gallery build` or MilvusGallery.create"
            )
        super().__init__(space=EmbeddingSpace.from_dict(json.loads(props["xbt.space"])), modality=props.get("xbt.modality"),
                         created_at=float(props.get("xbt.created_at", 0)),
                         index_config=IndexConfig.from_dict(json.loads(props.get("xbt.index", "{}"))),
                         extra_json=props.get("xbt.extra", "{}"), calibration_json=props.get("xbt.calibration"))
        self._stamp = stamp(self.space)
        self._kind = str(props.get("xbt.index_kind", "flat"))
        self._seq = 0
        self._padded = props.get("xbt.format") == FORMAT  # rows hold [vector, bias] and a calib field

    # ---- construction ---------------------------------------------------------------------------
    @staticmethod
    def _resolve(client: Any, name: str) -> tuple[str | None, str | None]:
        """(physical collection, alias): NAME is an alias (an xbt gallery) or a collection (a physical
        one, e.g. a migration's new collection before its cut-over); (None, None) when neither."""
        if name in aliases(client):
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
        check_modality(modality)
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
        kind = kind_at_creation(index)
        index_type, params = milvus_index(kind, index, 0)
        index_params = client.prepare_index_params()
        index_params.add_index("vector", index_type=index_type, metric_type="IP", params=params)
        props = {
            "xbt.format": FORMAT, "xbt.space": json.dumps(space.to_dict()), "xbt.modality": modality or "",
            "xbt.created_at": repr(time.time()), "xbt.index": json.dumps(index.to_dict()), "xbt.index_kind": kind,
            "xbt.extra": json.dumps(dict(extra or {})),
        }
        client.create_collection(collection, schema=collection_schema(client, space.dim, f"xbt gallery in space {space.id}"),
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
            if alias in aliases(self._client):
                self._client.alter_alias(self.collection, alias)
            else:
                self._client.create_alias(self.collection, alias)

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

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, **kwargs)
        except MilvusException as exc:
            raise MilvusError(f"Milvus refused {getattr(fn, '__name__', 'a call')} on {self.ref}: {exc}") from exc

    @contextmanager
    def _session(self, write: bool) -> Iterator[None]:
        """Milvus has no transactions: a session is this object's lock (Consistency level Strong: every
        acknowledged write is seen)."""
        with self._lock:
            yield

    @property
    def ref(self) -> str:
        """The reference of the physical collection (what a migration records)."""
        return str(self._ref.with_name(self.collection))

    def _where(self) -> str:
        return self.ref

    @property
    def path(self) -> str:
        return str(self._ref)

    @property
    def media_dir(self) -> Path:
        """Where uploads are kept: beside a Milvus Lite file. A server has no shared folder to offer."""
        if not self._ref.lite:
            raise InputError("uploads need a shared media store, which a Milvus server does not provide;"
                             " add items by image path or URL instead")
        return Path(self._ref.uri + ".media")

    @property
    def index_kind(self) -> str:
        """The kind the collection's index was built as (read at open, changed by `compact`)."""
        return self._kind

    def _info_fields(self) -> dict[str, Any]:
        return {"uri": self._ref.uri, "collection": self.collection, "alias": self.alias}

    # ---- writes ----------------------------------------------------------------------------------
    def _next_seqs(self, n: int) -> np.ndarray:
        """Increasing insertion numbers (time-based across processes, strictly increasing within one)."""
        start = max(time.time_ns(), self._seq + 1)
        self._seq = start + n - 1
        return np.arange(start, start + n, dtype=np.int64)

    def _insert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[str], replace: set[str]) -> None:
        """Returns after the engine accepted the write (see the module's doc); a replace is an upsert."""
        seqs, now = self._next_seqs(len(ids)), time.time()
        rows = [{"id": i, "vector": v, "space": self._stamp, "seq": int(s), "added_at": now, "payload": json.loads(p)}
                for i, v, p, s in zip(ids, vectors, payloads, seqs)]
        if self._padded:
            self._pad_rows(rows, vectors)
        write = self._db().upsert if replace else self._db().insert
        for start in range(0, len(rows), _ROW_CHUNK):
            self._call(write, self.collection, rows[start : start + _ROW_CHUNK])

    def _pad_rows(self, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Rows of a /2 collection: [vector, bias of the committed calibration] and its id ([vector, 0] and
        "" without one, or when its bank cannot be read: such rows are searched uncalibrated)."""
        self._refresh_calibration()
        biases = self._new_item_biases(vectors) if rows else None
        calib = self._calibration["id"] if biases is not None and self._calibration else ""
        if biases is None:
            biases = np.zeros(len(rows), np.float32)
        for row, v, b in zip(rows, vectors, biases):
            row["vector"] = np.append(v, np.float32(b)).astype(np.float32)
            row["calib"] = calib

    def _delete(self, ids: Sequence[str]) -> int:
        there = sorted(self._present(ids))
        for start in range(0, len(there), _ID_CHUNK):
            self._call(self._db().delete, self.collection, ids=there[start : start + _ID_CHUNK])
        return len(there)

    # ---- sealing (a migration's cut-over) -----------------------------------------------------------
    # A collection property every write reads first, under this object's lock, which the seal takes too: no
    # write of this process is in flight once `seal` returns. Milvus has no transactions: a write by another
    # process that read the property just before the seal may still land after the cut-over compared the two
    # collections; run one writer process per Milvus collection during a cut-over.
    def _read_seal(self) -> str | None:
        return self._describe()["properties"].get(SEALED_PROPERTY) or None

    def _write_seal(self, reason: str | None) -> None:
        if reason is None:
            self._db().drop_collection_properties(self.collection, [SEALED_PROPERTY])
        else:
            self._set_props({SEALED_PROPERTY: reason})

    # ---- calibration: the bank in its own collection, every row rewritten as [vector, bias] under the new
    # calibration's id, then the stamp committed (collection property). An interrupted run leaves the
    # previous one in force (rows it rewrote are searched uncalibrated until it is run again). ------------
    @property
    def _calibratable(self) -> bool:
        return self._padded

    def _check_calibratable(self) -> None:
        if not self._padded:
            raise InputError(f"{self.ref} is a gallery of format {FORMAT_V1}, which has no room for a calibration"
                             " bias; copy it into a new gallery (`xbt gallery export` / `import`) and calibrate that")

    def _sync_calibration(self) -> None:
        self._refresh_calibration()

    def _refresh_calibration(self) -> None:
        props = self._describe()["properties"]
        calibration = json.loads(props["xbt.calibration"]) if props.get("xbt.calibration") else None
        if (calibration or {}).get("id") != (self._calibration or {}).get("id"):
            self._calibration, self._bank = calibration, None

    def _bank_name(self, calibration_id: str) -> str:
        return f"{self.collection}_nnn_{calibration_id[:16]}"

    def _read_bank(self) -> np.ndarray | None:
        """The committed calibration's bank, from its collection; None if it is missing or incomplete."""
        assert self._calibration is not None
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
        return np.asarray([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), self.space.dim)

    def _begin_calibration(self, calibration_id: str, bank: np.ndarray) -> None:
        db = self._db()
        bank_name = self._bank_name(calibration_id)
        index_params = db.prepare_index_params()
        index_params.add_index("vector", index_type="FLAT", metric_type="IP")
        self._call(db.create_collection, bank_name, schema=bank_schema(db, self.space.dim),
                   index_params=index_params, consistency_level="Strong")
        for start in range(0, len(bank), _ROW_CHUNK):
            self._call(db.insert, bank_name, [{"row": start + i, "vector": v}
                                              for i, v in enumerate(bank[start : start + _ROW_CHUNK])])
        self._call(db.flush, bank_name)

    def _calibration_pages(self, batch: int) -> Iterator[tuple[list[dict[str, Any]], np.ndarray]]:
        """A page of rows at a time (memory bounded by the page, not the collection)."""
        it = self._call(self._db().query_iterator, self.collection, batch_size=batch, filter="",
                        output_fields=["id", "seq", "vector"])
        try:
            while page := it.next():
                yield page, np.asarray([r["vector"] for r in page], dtype=np.float32).reshape(len(page), -1)[:, : self.space.dim]
        finally:
            it.close()

    def _write_biases(self, keys: list[dict[str, Any]], vectors: np.ndarray, biases: np.ndarray,
                      calibration_id: str) -> None:
        """Rewrite each row of the page as [vector, bias] under `calibration_id`. Just before, its rows are
        read again: a row deleted or replaced (another seq) since the scan is left as its writer made it, so a
        concurrent delete is never resurrected nor a replace reverted (a replaced row is given its bias by the
        writer once the stamp commits, or searched uncalibrated until then)."""
        now = {str(r["id"]): r for r in self._call(self._db().get, self.collection, ids=[r["id"] for r in keys],
                                                   output_fields=["id", "seq", "space", "added_at", "payload"])}
        chunk = [{"id": r["id"], "vector": np.append(v, np.float32(b)).astype(np.float32),
                  "space": now[r["id"]]["space"], "seq": int(r["seq"]), "added_at": float(now[r["id"]]["added_at"]),
                  "payload": now[r["id"]].get("payload") or {}, "calib": calibration_id}
                 for r, v, b in zip(keys, vectors, biases)
                 if r["id"] in now and int(now[r["id"]]["seq"]) == int(r["seq"])]
        if chunk:
            self._call(self._db().upsert, self.collection, chunk)

    def _commit_calibration(self, stamp: dict[str, Any]) -> None:
        self._set_props({"xbt.calibration": json.dumps(stamp)})

    def _erase_calibration(self) -> None:
        """Rows keep their bias values but are searched plainly."""
        self._set_props({"xbt.calibration": ""})

    def _calibration_changed(self) -> None:
        """Drop this collection's bank collections but the committed calibration's (left by earlier or
        interrupted calibrations)."""
        keep = self._bank_name(self._calibration["id"]) if self._calibration else None
        db = self._db()
        prefix = f"{self.collection}_nnn_"
        for name in db.list_collections():
            if name.startswith(prefix) and name != keep:
                self._call(db.drop_collection, name)

    def _uncalibrated_items(self) -> int:
        assert self._calibration is not None
        return self._count(f'calib != "{self._calibration["id"]}"')

    def _count(self, expr: str) -> int:
        rows = self._call(self._db().query, self.collection, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    # ---- reads -----------------------------------------------------------------------------------
    def _search_params(self, kind: str, k: int) -> dict[str, Any]:
        if kind == "hnsw":
            return {"metric_type": "IP", "params": {"ef": max(self.index_config.hnsw_ef_search, k)}}
        if kind == "ivf":
            return {"metric_type": "IP", "params": {"nprobe": self.index_config.ivf_nprobe}}
        return {"metric_type": "IP"}

    def _search(self, queries: np.ndarray, k: int, applies: bool) -> list[list[Hit]]:
        """Every row is filtered on its space stamp. Calibrated: the rows of the committed calibration as
        [q, -1], and (a second pass, where there are any) the rows of none or another as [q, 0], marked
        uncalibrated: scores are never mixed."""
        space_filter = f'space == "{self._stamp}"'
        if not applies:
            return self._search_rows(bias_column(queries, 0.0) if self._padded else queries, k, space_filter, None)
        assert self._calibration is not None
        calib = self._calibration["id"]
        hits = self._search_rows(bias_column(queries, -1.0), k, f'{space_filter} and calib == "{calib}"', True)
        if self._count(f'calib != "{calib}"') == 0:
            return hits
        plain = self._search_rows(bias_column(queries, 0.0), k, f'{space_filter} and calib != "{calib}"', False)
        return [sorted(a + b, key=lambda h: -h.score)[:k] for a, b in zip(hits, plain)]

    def _search_rows(self, data: np.ndarray, k: int, expr: str, calibrated: bool | None) -> list[list[Hit]]:
        result = self._call(self._db().search, self.collection, data=[row for row in data], limit=k,
                            filter=expr, output_fields=["payload"], anns_field="vector",
                            search_params=self._search_params(self.index_kind, k))
        return [[self._hit(str(h["id"]), h["distance"], dict(h["entity"].get("payload") or {}), calibrated)
                 for h in row] for row in result]

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

    def _present(self, ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(ids))
        found: set[str] = set()
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
            return self._count("")

    def count_payload(self, key: str, field: str, value: str) -> int:
        with self._lock:
            return self._count(f"payload[{json.dumps(key)}][{json.dumps(field)}] == {json.dumps(value)}")

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
            index_type, params = milvus_index(kind, self.index_config, n)
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
