"""The gallery store: vectors, ids and payloads on disk, every vector stamped with its embedding space.

Design (why SQLite): the durable record is one SQLite database in WAL mode with `synchronous=FULL`,
so `add` and `delete` return only after their transaction's log frames are fsynced. SQLite's atomic
commit is what a hand-written write-ahead log would re-implement (length/checksum framing, torn-tail
recovery, compaction), and it is in the standard library. A process killed at any instant (SIGKILL)
leaves the last committed state: every acknowledged write is there, no half-written one is.

The faiss index is derived state. It is rebuilt from the database, or loaded from a snapshot
(`index.snapshot`, written to a temporary file, fsynced, then renamed) and brought up to date: faiss
labels are SQLite's AUTOINCREMENT row ids, never reused and bound to immutable rows, so the set
difference between the snapshot's labels and the table's labels is exactly what happened since.
A stale or unreadable snapshot costs time, never correctness.

Several processes: each keeps its own faiss index and brings it up to date with the others' commits
(`PRAGMA data_version` tells that another connection committed; the label sets tell what). Every write
takes SQLite's write lock first (BEGIN IMMEDIATE), catches up inside it (no other process can commit
then), writes, commits, and applies its own change; every read (search, info, verify) catches up and
answers inside one read transaction, so the index, the rows it names and the recorded data_version are
all of one snapshot. A commit by another process is therefore never skipped, and a search never names a
row that its own snapshot does not hold.

Space stamping: the gallery has one EmbeddingSpace; every row carries its space key, and a trigger
refuses any row stamped otherwise, so no code path (not even raw SQL) can mix two spaces.

Index choice (`IndexConfig`: exact, HNSW or IVF by size) and the faiss wrapper live in `xbt.gallery.index`;
the schema, the staged creation and the probes of a folder in `xbt.gallery.store_db`; what both backends
share (validation, search, calibration, seals, info) in `xbt.gallery.backend.GalleryBase`.

Calibration (hubness reduction, `calibrate`; NNN, `xbt.ranking.nnn`): one per gallery, for one query
model. Each item's bias (alpha x mean of its top-k similarities to a bank of that model's training
queries) is stored in `calibration_bias` (one row per item label, deleted with its item by a cascading
foreign key), the bank itself in `calibration_bank`, and the stamp (query model, alpha, k, bank size) in
meta, all in one transaction. Items added later get their bias from the stored bank inside their own
insert transaction: the bias needs the item's top-k similarities to the bank, so the bank itself is the
statistic to keep (m x d floats; nothing smaller gives the same top-k). A calibrated gallery's index holds
[g, bias] (one extra dimension); a query of the calibrated model searches as [q, -1] (score q . g - bias),
any other query as [q, 0] (plain q . g), so one index serves both, exactly.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from xbt.durable import atomic_write_bytes
from xbt.errors import InputError, XbtError
from xbt.gallery.backend import (
    CONFLICT_HINT,
    MAX_ID_CHARS,
    GalleryBase,
    GalleryInfo,
    GallerySealedError,
    Hit,
    Modality,
    OnConflict,
    bias_column,
    check_modality,
)
from xbt.gallery.index import IndexConfig, VectorIndex
from xbt.gallery.media import prune_media
from xbt.gallery.store_db import (
    CALIBRATION_META,
    CALIBRATION_SCHEMA,
    DB_NAME,
    FORMAT,
    MEDIA_DIR,
    SEALED_META,
    SNAPSHOT_NAME,
    chunks,
    count_items,
    create_database,
    creation_interrupted,
    is_complete_gallery,
    is_gallery,
    marks,
    statements,
)
from xbt.gallery.store_db import connect as _connect_db
from xbt.models.base import EmbeddingSpace

# What callers import from here (the types are the base's, the probes the database module's).
__all__ = ["CONFLICT_HINT", "DB_NAME", "FORMAT", "MAX_ID_CHARS", "SNAPSHOT_NAME", "Gallery", "GalleryCorruptError",
           "GalleryInfo", "GallerySealedError", "Hit", "Modality", "OnConflict", "count_items", "is_complete_gallery",
           "is_gallery"]


class GalleryCorruptError(XbtError):
    """The gallery's files are not a consistent xbt gallery (or not one at all)."""


class Gallery(GalleryBase):
    """A stamped, crash-safe vector store with faiss search. Use `Gallery.create` / `Gallery.open`.

    Every public method is safe to call from several threads (one lock); several processes may open
    the same gallery (SQLite serialises writers, and readers pick up other processes' commits)."""

    format_name = FORMAT

    def __init__(self, path: Path, conn: sqlite3.Connection, index_config: IndexConfig | None = None):
        self.path = path
        self._conn = conn
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise GalleryCorruptError(
                f"{path} has gallery format {meta.get('format')!r}; this xbt reads {FORMAT}. If creation was"
                " interrupted, delete the folder and build the gallery again."
            )
        self._space_key = int(meta["space_key"])
        name, dim, fp = conn.execute("SELECT name, dim, fingerprint FROM spaces WHERE key = ?", (self._space_key,)).fetchone()
        stored = IndexConfig.from_dict(json.loads(meta.get("index", "{}")))
        if index_config is not None and index_config != stored:
            self._set_meta("index", json.dumps(index_config.to_dict()))
            stored = index_config
        super().__init__(space=EmbeddingSpace(name, int(dim), fp), modality=meta.get("modality"),
                         created_at=float(meta.get("created_at", 0)), index_config=stored,
                         extra_json=meta.get("extra", "{}"), calibration_json=meta.get(CALIBRATION_META))
        self._unbiased: set[int] = set()  # labels in the index without a bias (calibrated galleries only)
        self._index: VectorIndex | None = None
        self._dirty = False
        self._data_version: int | None = None  # the snapshot the index reflects; None: unknown, sync
        self._own_writes: list[tuple[list[int], list[int], np.ndarray | None]] = []  # applied after the commit
        self._load_index()

    # ---- construction ---------------------------------------------------------------------------
    _connect = staticmethod(_connect_db)

    @classmethod
    def create(
        cls,
        path: str | Path,
        space: EmbeddingSpace,
        index: IndexConfig | None = None,
        modality: Modality | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Gallery:
        """A new, empty gallery in `path` (created; must not hold a gallery already)."""
        path = Path(path).expanduser()
        check_modality(modality)
        index = index or IndexConfig()
        create_database(path, space, index, modality, extra, cls._connect)
        return cls.open(path, index)

    @classmethod
    def open(cls, path: str | Path, index: IndexConfig | None = None) -> Gallery:
        """Open an existing gallery; `index` replaces its stored index configuration (and rebuilds)."""
        path = Path(path).expanduser()
        if not is_gallery(path):
            raise InputError(f"no gallery at {path}; build one with `xbt gallery build` or Gallery.create")
        if creation_interrupted(path / DB_NAME):
            raise GalleryCorruptError(f"the creation of the gallery at {path} was interrupted; build it again")
        try:
            conn = cls._connect(path / DB_NAME)
        except sqlite3.DatabaseError as exc:
            raise GalleryCorruptError(f"{path / DB_NAME} is not a readable gallery database: {exc}") from exc
        try:
            return cls(path, conn, index)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise GalleryCorruptError(f"{path / DB_NAME} is not a readable gallery database: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Save an up-to-date index snapshot (so the next open is fast) and close the database."""
        with self._lock:
            if self._conn is None:
                return
            try:
                if self._dirty:
                    self.save_index()
            finally:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]  # closed: every later use raises on None

    # ---- meta ------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InputError(f"the gallery at {self.path} is closed; open it again")
        return self._conn

    def _where(self) -> str:
        return str(self.path)

    # ---- sealing (a migration's cut-over): checked inside each write's transaction, after SQLite's write
    # lock, so a write either committed before the seal (and whoever sealed sees it) or is refused.
    def _read_seal(self) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (SEALED_META,)).fetchone()
        return str(row[0]) if row else None

    def _write_seal(self, reason: str | None) -> None:
        if reason is None:
            self._db().execute("DELETE FROM meta WHERE key = ?", (SEALED_META,))
        else:
            self._set_meta(SEALED_META, reason)

    def _set_meta(self, key: str, value: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @property
    def media_dir(self) -> Path:
        """Where the gallery keeps files it was handed as bytes (uploads), named by content hash."""
        return Path(self.path) / MEDIA_DIR

    @property
    def index_kind(self) -> str:
        assert self._index is not None
        return self._index.kind

    def _tombstones(self) -> int:
        assert self._index is not None
        return len(self._index.tombstones)

    def _read_data_version(self) -> int:
        return int(self._db().execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def _session(self, write: bool) -> Iterator[sqlite3.Connection]:
        """The lock and one transaction (`_transaction`); after a write commits, its own changes are
        applied to the index (our commits do not change data_version)."""
        with self._lock:
            outer = not self._db().in_transaction
            try:
                with self._transaction(write) as db:
                    yield db
                if outer:
                    for removed, added, vectors in self._own_writes:
                        self._apply_own_write(removed, added, vectors)
            finally:
                if outer:
                    self._own_writes = []

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction, with the index caught up with the database inside it: a write one
        (BEGIN IMMEDIATE: the write lock first, so no other process commits until ours is done) or a
        read one (one snapshot for everything read in it). Nested in an open transaction, it joins it."""
        db = self._db()
        if db.in_transaction:
            self._catch_up()
            yield db
            return
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            self._catch_up()
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if db.in_transaction:
            db.execute("COMMIT")

    def _catch_up(self) -> None:
        """Inside a transaction: apply to the index the commits of other connections up to this
        transaction's snapshot, and record that snapshot's data_version. (Our own commits do not change
        data_version; they are applied to the index by the write that made them.) Another connection's
        (re)calibration rebuilds the index, whose extra dimension holds the biases."""
        version = self._read_data_version()  # the first read of the transaction fixes its snapshot
        if self._index is None or version != self._data_version:
            row = self._db().execute("SELECT value FROM meta WHERE key = ?", (CALIBRATION_META,)).fetchone()
            calibration = json.loads(row[0]) if row else None
            if (calibration or {}).get("id") != (self._calibration or {}).get("id"):
                self._calibration, self._bank, self._index = calibration, None, None
        if self._index is None:
            self._build_from_table()
        elif version != self._data_version:
            self._sync_index()
        self._data_version = version

    # ---- calibration: biases, bank and stamp in one transaction (a crash leaves the previous calibration
    # or this one, whole) --------------------------------------------------------------------------
    def _index_dim(self) -> int:
        return self.space.dim + (1 if self._calibration else 0)

    def _read_bank(self) -> np.ndarray:
        assert self._calibration is not None
        rows = self._db().execute("SELECT vector FROM calibration_bank ORDER BY row").fetchall()
        bank = np.stack([np.frombuffer(r[0], dtype="<f4") for r in rows]) if rows else np.empty((0, self.space.dim), np.float32)
        if len(bank) != int(self._calibration["bank_size"]):
            raise GalleryCorruptError(f"the calibration bank of {self.path} holds {len(bank)} queries, its stamp"
                                      f" says {self._calibration['bank_size']}; run `xbt gallery calibrate` again")
        return bank

    def _biases_of_labels(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bias per label, 0 where none; mask of labels that have one), inside a transaction."""
        found: dict[int, float] = {}
        for chunk in chunks([int(x) for x in labels]):
            q = f"SELECT label, bias FROM calibration_bias WHERE label IN ({marks(len(chunk))})"
            found.update((int(a), float(b)) for a, b in self._db().execute(q, chunk))
        has = np.fromiter((int(x) in found for x in labels), dtype=bool, count=len(labels))
        bias = np.fromiter((found.get(int(x), 0.0) for x in labels), dtype=np.float32, count=len(labels))
        return bias, has

    def _index_rows(self, labels: np.ndarray) -> np.ndarray:
        """What the index holds for these labels: the vectors, plus each one's bias when calibrated."""
        vectors = self._vectors_of_labels(labels)
        if not self._calibration:
            return vectors
        bias, has = self._biases_of_labels(labels)
        self._unbiased.update(int(x) for x in np.asarray(labels)[~has])
        return np.concatenate([vectors, bias[:, None]], axis=1)

    def _begin_calibration(self, calibration_id: str, bank: np.ndarray) -> None:
        db = self._db()
        for statement in statements(CALIBRATION_SCHEMA):
            db.execute(statement)
        db.execute("DELETE FROM calibration_bias")
        db.execute("DELETE FROM calibration_bank")
        db.executemany("INSERT INTO calibration_bank(row, vector) VALUES (?, ?)",
                       ((i, row.astype("<f4").tobytes()) for i, row in enumerate(bank)))

    def _calibration_pages(self, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        labels = self._table_labels()
        for start in range(0, len(labels), batch):  # memory bounded by the page for any gallery
            part = labels[start : start + batch]
            yield part, self._vectors_of_labels(part)

    def _write_biases(self, keys: np.ndarray, vectors: np.ndarray, biases: np.ndarray, calibration_id: str) -> None:
        self._db().executemany("INSERT INTO calibration_bias(label, bias) VALUES (?, ?)",
                               zip((int(x) for x in keys), (float(b) for b in biases)))

    def _commit_calibration(self, stamp: dict[str, Any]) -> None:
        self._set_meta(CALIBRATION_META, json.dumps(stamp))

    def _erase_calibration(self) -> None:
        db = self._db()
        db.execute("DELETE FROM calibration_bias")
        db.execute("DELETE FROM calibration_bank")
        db.execute("DELETE FROM meta WHERE key = ?", (CALIBRATION_META,))

    def _calibration_changed(self) -> None:
        self.rebuild_index()  # the index's extra dimension holds the biases

    def _uncalibrated_items(self) -> int:
        return len(self._unbiased)

    # ---- the index -------------------------------------------------------------------------------
    def _table_labels(self) -> np.ndarray:
        rows = self._db().execute("SELECT label FROM items ORDER BY label").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _vectors_of_labels(self, labels: np.ndarray) -> np.ndarray:
        out = np.empty((len(labels), self.space.dim), dtype=np.float32)
        pos = {int(label): i for i, label in enumerate(labels)}
        seen = 0
        for chunk in chunks([int(x) for x in labels]):
            q = f"SELECT label, vector FROM items WHERE label IN ({marks(len(chunk))})"
            for label, blob in self._db().execute(q, chunk):
                out[pos[label]] = np.frombuffer(blob, dtype="<f4")
                seen += 1
        if seen != len(labels):  # read outside one snapshot: never index a vector that was not read
            raise GalleryCorruptError(f"{len(labels) - seen} rows of {self.path} vanished while being read")
        return out

    def _snapshot_meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "space": self.space.to_dict(), "index_config": self.index_config.to_dict(),
                "calibration": (self._calibration or {}).get("id")}

    def _load_index(self) -> None:
        """Snapshot if usable, else a rebuild; then catch up with the table."""
        snapshot = self.path / SNAPSHOT_NAME
        self._index = None
        if snapshot.is_file():
            try:
                index, meta = VectorIndex.from_bytes(snapshot.read_bytes())
                expected = self._snapshot_meta()
                if (all(meta.get(k) == v for k, v in expected.items()) and index.index.d == self._index_dim()
                        and ("unbiased" in meta or not self._calibration)):
                    self._index = index
                    self._unbiased = {int(x) for x in meta.get("unbiased", [])}
            except Exception:  # noqa: BLE001 - a damaged snapshot is only a cache: rebuild it
                self._index = None
        self._data_version = None
        with self._transaction(write=False):
            pass  # builds the index (no usable snapshot) or brings the snapshot up to date

    def _sync_index(self) -> None:
        """Apply to the index whatever the table gained or lost since the index was made (call it
        inside a transaction: the table is read at one snapshot)."""
        assert self._index is not None
        table = self._table_labels()
        gone = np.setdiff1d(self._index.labels, table)
        new = np.setdiff1d(table, self._index.labels)
        if len(gone):
            self._index.remove(gone)
            self._unbiased.difference_update(int(x) for x in gone)
            self._dirty = True
        if len(new):
            self._index.add(new, self._index_rows(new))
            self._dirty = True

    def _build_from_table(self) -> None:
        labels = self._table_labels()
        self._unbiased = set()
        vectors = self._index_rows(labels)
        self._index = VectorIndex.build(self._index_dim(), self.index_config, labels, vectors)
        self._dirty = True

    def rebuild_index(self) -> None:
        """Build the index afresh from the table, choosing its kind by the current size."""
        with self._lock:
            self._index = None
            with self._transaction(write=False):
                pass  # _catch_up builds it from this transaction's snapshot

    def save_index(self) -> None:
        """Write the index snapshot atomically (a crash leaves the previous snapshot, or none)."""
        with self._lock:
            assert self._index is not None
            meta = {**self._snapshot_meta(), "unbiased": sorted(self._unbiased)}
            atomic_write_bytes(self.path / SNAPSHOT_NAME, self._index.to_bytes(meta))
            self._dirty = False

    def compact(self) -> None:
        """Rebuild the index (drops tombstones, re-picks the kind by size, retrains IVF), snapshot it,
        fold SQLite's log into the database file, and remove media no item names (`prune_media`)."""
        with self._lock:
            self.rebuild_index()
            self.save_index()
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            prune_media(self)

    # ---- writes ----------------------------------------------------------------------------------
    def _insert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[str], replace: set[str]) -> None:
        """Inside the write transaction; new items get their bias from the stored bank, in this commit.
        A replaced item is deleted and added again (a new label)."""
        db = self._db()
        if replace:
            self._delete_rows(list(replace))
        now = time.time()
        labels: list[int] = []
        for item_id, vector, payload in zip(ids, vectors, payloads):
            blob = vector.astype("<f4").tobytes()
            cur = db.execute("INSERT INTO items(id, space, vector, crc, payload, added_at) VALUES (?, ?, ?, ?, ?, ?)",
                             (item_id, self._space_key, blob, zlib.crc32(blob), payload, now))
            labels.append(int(cur.lastrowid))
        added = vectors
        biases = self._new_item_biases(vectors) if labels else None
        if biases is not None:
            db.executemany("INSERT INTO calibration_bias(label, bias) VALUES (?, ?)",
                           zip(labels, (float(b) for b in biases)))
            added = np.concatenate([vectors, biases[:, None]], axis=1)
        self._own_writes.append(([], labels, added))

    def _apply_own_write(self, removed: Sequence[int], added: Sequence[int], vectors: np.ndarray | None) -> None:
        """After our own commit (which does not change data_version): apply it to the index. Should that
        fail, the next transaction resyncs the index from the table."""
        assert self._index is not None
        self._dirty = True
        try:
            if len(removed):
                self._index.remove(np.asarray(removed, dtype=np.int64))
                self._unbiased.difference_update(int(x) for x in removed)
            if len(added):
                self._index.add(np.asarray(added, dtype=np.int64), vectors)
        except BaseException:
            self._data_version = None
            raise

    def _present(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in chunks(list(ids)):
            found.update(r[0] for r in self._db().execute(f"SELECT id FROM items WHERE id IN ({marks(len(chunk))})",
                                                          list(chunk)))
        return found

    def _delete_rows(self, ids: Sequence[str]) -> list[int]:
        labels: list[int] = []
        for chunk in chunks(list(ids)):
            where = f"WHERE id IN ({marks(len(chunk))})"
            labels += [r[0] for r in self._db().execute(f"SELECT label FROM items {where}", list(chunk))]
            self._db().execute(f"DELETE FROM items {where}", list(chunk))
        self._own_writes.append((labels, [], None))
        return labels

    def _delete(self, ids: Sequence[str]) -> int:
        return len(self._delete_rows(ids))

    def _after_delete(self) -> None:
        idx = self._index
        assert idx is not None
        limit = self.index_config.tombstone_rebuild_fraction * max(len(idx.labels), 1)
        if idx.kind == "hnsw" and len(idx.tombstones) > limit:
            self.rebuild_index()

    # ---- reads -----------------------------------------------------------------------------------
    def _search(self, queries: np.ndarray, k: int, applies: bool) -> list[list[Hit]]:
        """One index for both: a calibrated gallery's has the bias dimension, which [q, -1] applies and
        [q, 0] ignores; an item without a bias holds 0 there (and is marked calibrated=False)."""
        assert self._index is not None
        q = bias_column(queries, -1.0 if applies else 0.0) if self._calibration else queries
        scores, labels = self._index.search(q, k, self.index_config)
        rows = self._rows_by_label(sorted({int(x) for x in labels.ravel() if x >= 0}))
        unbiased = set(self._unbiased) if applies else set()
        out: list[list[Hit]] = []
        for srow, lrow in zip(scores, labels):
            hits = []
            for s, label in zip(srow, lrow):
                row = rows.get(int(label))
                if label >= 0 and row is not None:
                    hits.append(self._hit(row[0], s, row[1], (int(label) not in unbiased) if applies else None))
            out.append(hits)
        return out

    def _rows_by_label(self, labels: Sequence[int]) -> dict[int, tuple[str, dict[str, Any]]]:
        rows: dict[int, tuple[str, dict[str, Any]]] = {}
        for chunk in chunks(list(labels)):
            q = f"SELECT label, id, payload FROM items WHERE label IN ({marks(len(chunk))})"
            for label, item_id, payload in self._db().execute(q, list(chunk)):
                rows[label] = (item_id, json.loads(payload))
        return rows

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> dict[str, dict[str, Any]]:
        """{id: {"payload": ..., "added_at": ..., ["vector": ...]}} for the ids that are stored."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for chunk in chunks(list(ids)):
                q = f"SELECT id, payload, added_at, vector FROM items WHERE id IN ({marks(len(chunk))})"
                for item_id, payload, added_at, blob in self._db().execute(q, list(chunk)):
                    entry: dict[str, Any] = {"payload": json.loads(payload), "added_at": added_at}
                    if with_vectors:
                        entry["vector"] = np.frombuffer(blob, dtype="<f4").copy()
                    out[item_id] = entry
        return out

    def iter_items(self, batch: int = 1024) -> Iterator[tuple[str, dict[str, Any], float]]:
        """(id, payload, added_at) of every item, oldest first, read in batches."""
        last = 0
        while True:
            with self._lock:
                rows = self._db().execute(
                    "SELECT label, id, payload, added_at FROM items WHERE label > ? ORDER BY label LIMIT ?", (last, batch)
                ).fetchall()
            if not rows:
                return
            for _label, item_id, payload, added_at in rows:
                yield item_id, json.loads(payload), added_at
            last = rows[-1][0]

    def ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db().execute("SELECT id FROM items ORDER BY label")]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def count_payload(self, key: str, field: str, value: str) -> int:
        path = "$." + ".".join(json.dumps(part) for part in (key, field))  # quoted: any key is a path step
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM items WHERE json_extract(payload, ?) = ?",
                                          (path, value)).fetchone()[0])

    def verify(self) -> list[str]:
        """Problems found by a full check (empty when consistent): stamps, checksums, index coverage."""
        problems: list[str] = []
        with self._lock, self._transaction(write=False) as db:
            (quick,) = db.execute("PRAGMA quick_check").fetchone()
            if quick != "ok":
                problems.append(f"sqlite quick_check: {quick}")
            bad_space = db.execute("SELECT COUNT(*) FROM items WHERE space != ?", (self._space_key,)).fetchone()[0]
            if bad_space:
                problems.append(f"{bad_space} rows stamped with another space")
            for item_id, blob, crc, payload in db.execute("SELECT id, vector, crc, payload FROM items"):
                if zlib.crc32(blob) != crc:
                    problems.append(f"checksum mismatch for {item_id!r}")
                elif len(blob) != 4 * self.space.dim:
                    problems.append(f"vector of {item_id!r} has {len(blob)} bytes")
                try:
                    json.loads(payload)
                except ValueError:
                    problems.append(f"payload of {item_id!r} is not JSON")
            assert self._index is not None
            table = self._table_labels()
            live = np.setdiff1d(self._index.labels, self._index.tombstones)
            if not np.array_equal(np.sort(live), table):
                problems.append(f"index holds {len(live)} live vectors, table {len(table)}")
            if self._index.index.ntotal != len(self._index.labels):
                problems.append("faiss size and label list disagree")
            if self._calibration:
                (n_bank,) = db.execute("SELECT COUNT(*) FROM calibration_bank").fetchone()
                if n_bank != int(self._calibration["bank_size"]):
                    problems.append(f"the calibration bank holds {n_bank} queries, its stamp {self._calibration['bank_size']}")
                (bad_bias,) = db.execute("SELECT COUNT(*) FROM calibration_bias WHERE NOT (bias BETWEEN -1e30 AND 1e30)"
                                         ).fetchone()
                if bad_bias:
                    problems.append(f"{bad_bias} calibration biases are not finite numbers")
        return problems
