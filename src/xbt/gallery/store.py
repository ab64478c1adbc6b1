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

Index choice (`IndexConfig`: exact, HNSW or IVF by size) and the faiss wrapper live in `xbt.gallery.index`.

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

import fcntl
import json
import os
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xbt.durable import atomic_write_bytes, fsync_path
from xbt.errors import InputError, XbtError
from xbt.ranking.nnn import top_k_mean
from xbt.gallery.index import IndexConfig, VectorIndex
from xbt.gallery.media import prune_media
from xbt.models.base import EmbeddingSpace

FORMAT = "xbt.gallery/1"
DB_NAME = "gallery.db"
SNAPSHOT_NAME = "index.snapshot"
STAGING_NAME = ".creating"  # where `create` makes the database before renaming it into place
MEDIA_DIR = "media"
MAX_ID_CHARS = 512
_SQL_CHUNK = 900  # bound on SQL parameters per statement

Modality = Literal["image", "text"]
OnConflict = Literal["error", "skip", "replace"]
# What to do about ids already stored, as every message that refuses them says it (the API's field and the CLI's flag).
CONFLICT_HINT = "on_conflict='skip' (keep the stored items) or 'replace' (CLI: --on-conflict skip, --on-conflict replace)"


class GallerySealedError(InputError):
    """A write to a gallery that a migration's cut-over sealed: the items live in the new gallery now."""


class GalleryCorruptError(XbtError):
    """The gallery's files are not a consistent xbt gallery (or not one at all)."""


@dataclass(frozen=True)
class Hit:
    """One search result. `space` is the id of the space the score was computed in (scores of two
    spaces are not comparable)."""

    id: str
    score: float
    payload: dict[str, Any]
    space: str
    # None: no calibration applied to this search; True: the score is q . g minus the item's bias (the
    # gallery's calibration is for this query model); False: it is, but this item has no bias (plain q . g).
    calibrated: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GalleryInfo:
    path: str
    format: str
    space: dict[str, Any]
    space_id: str
    modality: str | None
    size: int
    index_kind: str
    index_config: dict[str, Any]
    recommended_kind: str
    tombstones: int
    created_at: float
    extra: dict[str, Any] = field(default_factory=dict)
    # The stamp of the gallery's calibration (query model, alpha, k, bank size, uncalibrated_items), or None.
    calibration: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _chunks(seq: Sequence[Any], size: int = _SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def as_vectors(vectors: Any, dim: int, what: str) -> np.ndarray:
    """(n, dim) float32 unit rows from a numpy array or torch tensor; refuses what cannot be searched."""
    if hasattr(vectors, "detach"):
        vectors = vectors.detach().cpu().numpy()
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise InputError(f"{what} must have shape (n, {dim}); got {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms < 1e-12).any():
        raise InputError(f"{what} contain a zero vector, which has no direction to search by")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _check_ids(ids: Sequence[str], what: str = "ids", unique: bool = True) -> list[str]:
    if isinstance(ids, str):
        raise InputError(f"{what} must be a list of strings, not one string")
    ids = list(ids)
    for i in ids:
        if not isinstance(i, str) or not i or len(i) > MAX_ID_CHARS:
            raise InputError(f"{what}: each id must be a non-empty string of at most {MAX_ID_CHARS} characters; got {i!r}")
    if not unique:
        return list(dict.fromkeys(ids))
    if len(set(ids)) != len(ids):
        raise InputError(f"{what} contain duplicates; give each item one id")
    return ids


def _payload_json(payload: Any, item_id: str) -> str:
    if payload is None:
        payload = {}
    if not isinstance(payload, Mapping):
        raise InputError(f"the payload of {item_id!r} must be a JSON object (a dict), not {type(payload).__name__}")
    try:
        return json.dumps(dict(payload), ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the payload of {item_id!r} is not JSON-serialisable: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# the gallery
# --------------------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE spaces(key INTEGER PRIMARY KEY, name TEXT NOT NULL, dim INTEGER NOT NULL, fingerprint TEXT NOT NULL,
                    UNIQUE(fingerprint, dim));
CREATE TABLE items(
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    space INTEGER NOT NULL REFERENCES spaces(key),
    vector BLOB NOT NULL,
    crc INTEGER NOT NULL,
    payload TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE TRIGGER items_one_space BEFORE INSERT ON items
WHEN NEW.space IS NOT (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'space_key')
BEGIN SELECT RAISE(ABORT, 'xbt: a vector stamped with another embedding space'); END;
CREATE TRIGGER items_vector_size BEFORE INSERT ON items
WHEN length(NEW.vector) IS NOT 4 * (SELECT dim FROM spaces WHERE key = NEW.space)
BEGIN SELECT RAISE(ABORT, 'xbt: a vector of the wrong dimension'); END;
CREATE TRIGGER items_immutable BEFORE UPDATE OF label, space, vector, crc ON items
BEGIN SELECT RAISE(ABORT, 'xbt: stored vectors are immutable; delete and add instead'); END;
"""

# Created by the first `calibrate` (a gallery that was never calibrated has neither table).
_CALIBRATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS calibration_bias(
    label INTEGER PRIMARY KEY REFERENCES items(label) ON DELETE CASCADE,
    bias REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS calibration_bank(row INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""
CALIBRATION_META = "calibration"
SEALED_META = "sealed"  # why the gallery refuses writes (a migration's cut-over), absent while it takes them


def calibration_applies(calibration: Mapping[str, Any] | None, query_model: str | None) -> bool:
    """Whether a gallery calibration is for the query model with this encoder id."""
    return bool(calibration) and query_model is not None and query_model == calibration["query_model"]["encoder_id"]


def calibration_stamp(*, alpha: float, k: int, bank_size: int, query_model: Mapping[str, Any],
                      source: str | None = None, bias: np.ndarray | None = None) -> dict[str, Any]:
    """What a gallery records about its calibration (one format for both backends)."""
    import uuid

    for key in ("encoder_id", "spec", "space_id"):
        if not isinstance(query_model.get(key), str) or not query_model.get(key):
            raise InputError(f"the query model of a calibration needs a non-empty {key!r}")
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"alpha must be a finite number >= 0; got {alpha!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}")
    stamp: dict[str, Any] = {
        "id": uuid.uuid4().hex, "method": "nnn", "alpha": alpha, "k": int(k), "bank_size": int(bank_size),
        "bank_source": source, "created_at": time.time(),
        "query_model": {key: str(query_model[key]) for key in ("encoder_id", "spec", "space_id")},
    }
    if bias is not None and len(bias):
        stamp["bias"] = {"min": float(np.min(bias)), "mean": float(np.mean(bias)), "max": float(np.max(bias)),
                         "items": len(bias)}
    return stamp


def item_biases(vectors: np.ndarray, bank: np.ndarray, alpha: float, k: int) -> np.ndarray:
    """NNN biases of items (unit rows) from a calibration's bank: alpha x mean of the top-k similarities."""
    if len(vectors) == 0:
        return np.zeros(0, dtype=np.float32)
    return (float(alpha) * top_k_mean(vectors, bank, int(k))).astype(np.float32)


def _statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""


def _creation_interrupted(db: Path) -> bool:
    """A database whose creating transaction never committed (no meta table): safe to start over."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
        try:
            return conn.execute("SELECT name FROM sqlite_master WHERE name = 'meta'").fetchone() is None
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False


@contextmanager
def _creation_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the gallery's folder (flock on the folder itself: no lock file to leave behind),
    held while a gallery is created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise InputError(f"{path} is not a folder; choose a new folder for the gallery") from exc
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_creation_leftovers(path: Path) -> None:
    """What an interrupted `create` alone writes: its staging folder, and (from an xbt that created the
    database in place) a database whose creating transaction never committed, with SQLite's side files."""
    shutil.rmtree(path / STAGING_NAME, ignore_errors=True)
    if not is_gallery(path) or _creation_interrupted(path / DB_NAME):
        for leftover in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal"):
            (path / leftover).unlink(missing_ok=True)


def is_gallery(path: str | Path) -> bool:
    return (Path(path) / DB_NAME).is_file()


def is_complete_gallery(path: str | Path) -> bool:
    """A gallery whose creation committed (an interrupted `create` leaves a database without its tables,
    which `Gallery.create` simply starts again)."""
    return is_gallery(path) and not _creation_interrupted(Path(path) / DB_NAME)


def count_items(path: str | Path) -> int:
    """How many items a gallery holds, without loading its index (for progress reports)."""
    conn = sqlite3.connect(f"file:{Path(path) / DB_NAME}?mode=ro", uri=True, timeout=30.0)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    finally:
        conn.close()


class Gallery:
    """A stamped, crash-safe vector store with faiss search. Use `Gallery.create` / `Gallery.open`.

    Every public method is safe to call from several threads (one lock); several processes may open
    the same gallery (SQLite serialises writers, and readers pick up other processes' commits)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, index_config: IndexConfig | None = None):
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise GalleryCorruptError(
                f"{path} has gallery format {meta.get('format')!r}; this xbt reads {FORMAT}. If creation was"
                " interrupted, delete the folder and build the gallery again."
            )
        self._meta = meta
        self._space_key = int(meta["space_key"])
        name, dim, fp = conn.execute("SELECT name, dim, fingerprint FROM spaces WHERE key = ?", (self._space_key,)).fetchone()
        self.space = EmbeddingSpace(name, int(dim), fp)
        self.modality: str | None = meta.get("modality") or None
        self.created_at = float(meta.get("created_at", 0))
        stored = IndexConfig.from_dict(json.loads(meta.get("index", "{}")))
        if index_config is not None and index_config != stored:
            self._set_meta("index", json.dumps(index_config.to_dict()))
            stored = index_config
        self.index_config = stored
        self._calibration: dict[str, Any] | None = json.loads(meta[CALIBRATION_META]) if meta.get(CALIBRATION_META) else None
        self._bank: np.ndarray | None = None  # the calibration's bank, read on first need
        self._unbiased: set[int] = set()  # labels in the index without a bias (calibrated galleries only)
        self._index: VectorIndex | None = None
        self._dirty = False
        self._data_version: int | None = None  # the snapshot the index reflects; None: unknown, sync
        self._load_index()

    # ---- construction ---------------------------------------------------------------------------
    @staticmethod
    def _connect(db: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # fsync the log on every commit: acknowledged = durable
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

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
        if modality not in (None, "image", "text"):
            raise InputError(f"modality must be 'image' or 'text', not {modality!r}")
        index = index or IndexConfig()
        with _creation_lock(path):  # two creators of one folder: the second waits, then finds the first's gallery
            if is_gallery(path) and not _creation_interrupted(path / DB_NAME):
                raise InputError(f"{path} already holds a gallery; open it, or choose another folder")
            _remove_creation_leftovers(path)
            if any(path.iterdir()):
                raise InputError(f"{path} exists and is not empty; choose a new folder for the gallery")
            # The database is made in a staging folder and renamed into place once committed and closed, so
            # every file SQLite writes before the first commit (journal, log, shared memory) lies in a folder
            # that only an interrupted creation leaves behind, and that the next create removes whole.
            staging = path / STAGING_NAME
            staging.mkdir()
            conn = cls._connect(staging / DB_NAME)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                conn.execute("INSERT INTO spaces(key, name, dim, fingerprint) VALUES (1, ?, ?, ?)",
                             (space.name, space.dim, space.fingerprint))
                meta = {
                    "format": FORMAT, "space_key": "1", "modality": modality or "", "created_at": repr(time.time()),
                    "index": json.dumps(index.to_dict()), "extra": json.dumps(dict(extra or {})),
                }
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(meta.items()))
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every committed page into the database file
            finally:
                conn.close()
            if (staging / (DB_NAME + "-wal")).is_file() and (staging / (DB_NAME + "-wal")).stat().st_size:
                raise XbtError(f"SQLite kept a log beside the new gallery in {staging}; delete the folder, build again")
            fsync_path(staging / DB_NAME)
            os.replace(staging / DB_NAME, path / DB_NAME)
            fsync_path(path)
            shutil.rmtree(staging)
        return cls.open(path, index)

    @classmethod
    def open(cls, path: str | Path, index: IndexConfig | None = None) -> Gallery:
        """Open an existing gallery; `index` replaces its stored index configuration (and rebuilds)."""
        path = Path(path).expanduser()
        if not is_gallery(path):
            raise InputError(f"no gallery at {path}; build one with `xbt gallery build` or Gallery.create")
        if _creation_interrupted(path / DB_NAME):
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

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
                self._conn = None  # type: ignore[assignment]

    # ---- meta ------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InputError(f"the gallery at {self.path} is closed; open it again")
        return self._conn

    # ---- sealing (a migration's cut-over) -----------------------------------------------------------
    def seal(self, reason: str) -> None:
        """Refuse every later add and delete, from any process, with `reason`. Checked inside each write's
        transaction, after SQLite's write lock: a write either committed before the seal (and whoever sealed
        sees it) or is refused; none is lost in between."""
        with self._lock, self._transaction(write=True):
            self._set_meta(SEALED_META, reason)

    def unseal(self) -> None:
        with self._lock, self._transaction(write=True) as db:
            db.execute("DELETE FROM meta WHERE key = ?", (SEALED_META,))

    @property
    def sealed(self) -> str | None:
        """Why the gallery refuses writes, or None while it takes them."""
        with self._lock:
            row = self._db().execute("SELECT value FROM meta WHERE key = ?", (SEALED_META,)).fetchone()
            return str(row[0]) if row else None

    def _refuse_if_sealed(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (SEALED_META,)).fetchone()
        if row:
            raise GallerySealedError(f"the gallery at {self.path} takes no more writes: {row[0]}")

    def _set_meta(self, key: str, value: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @property
    def extra(self) -> dict[str, Any]:
        return json.loads(self._meta.get("extra", "{}"))

    @property
    def media_dir(self) -> Path:
        """Where the gallery keeps files it was handed as bytes (uploads), named by content hash."""
        return self.path / MEDIA_DIR

    def _read_data_version(self) -> int:
        return int(self._db().execute("PRAGMA data_version").fetchone()[0])

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

    # ---- calibration -----------------------------------------------------------------------------
    @property
    def calibration(self) -> dict[str, Any] | None:
        """The stamp of this gallery's calibration (None: not calibrated), as of the last transaction."""
        with self._lock, self._transaction(write=False):
            return dict(self._calibration) if self._calibration else None

    def _index_dim(self) -> int:
        return self.space.dim + (1 if self._calibration else 0)

    def _bank_vectors(self) -> np.ndarray:
        """The calibration's bank of queries (inside a transaction)."""
        assert self._calibration is not None
        if self._bank is None:
            rows = self._db().execute("SELECT vector FROM calibration_bank ORDER BY row").fetchall()
            bank = np.stack([np.frombuffer(r[0], dtype="<f4") for r in rows]) if rows else np.empty((0, self.space.dim), np.float32)
            if len(bank) != int(self._calibration["bank_size"]):
                raise GalleryCorruptError(f"the calibration bank of {self.path} holds {len(bank)} queries, its stamp"
                                          f" says {self._calibration['bank_size']}; run `xbt gallery calibrate` again")
            self._bank = bank
        return self._bank

    def _biases_of_labels(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bias per label, 0 where none; mask of labels that have one), inside a transaction."""
        found: dict[int, float] = {}
        for chunk in _chunks([int(x) for x in labels]):
            q = f"SELECT label, bias FROM calibration_bias WHERE label IN ({','.join('?' * len(chunk))})"
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

    def calibrate(self, bank: Any, *, alpha: float, k: int, query_model: Mapping[str, Any], space: EmbeddingSpace,
                  source: str | None = None) -> dict[str, Any]:
        """Calibrate the gallery for one query model (NNN): every item's bias = alpha x mean of its top-k
        similarities to `bank` (that model's queries of training data, in this gallery's `space`), stored
        with the bank and the stamp in one transaction (a crash leaves the previous calibration or this one,
        whole). Replaces any earlier calibration. `query_model`: {"encoder_id", "spec", "space_id"} of the
        model whose searches it is for (`describe_query_model`). Returns the stamp."""
        self.space.check(space, "the bank of queries")
        bank = as_vectors(bank, self.space.dim, "the bank of queries")
        if len(bank) == 0:
            raise InputError("the bank of queries is empty: give training pairs (--queries) to calibrate with")
        with self._lock:
            with self._transaction(write=True) as db:
                for statement in _statements(_CALIBRATION_SCHEMA):
                    db.execute(statement)
                labels = self._table_labels()
                calibration_stamp(alpha=alpha, k=k, bank_size=len(bank), query_model=query_model)  # checks first
                biases = np.empty(len(labels), dtype=np.float32)
                step = 65536  # items read and scored per step: memory bounded for any gallery
                for start in range(0, len(labels), step):
                    part = labels[start : start + step]
                    biases[start : start + step] = item_biases(self._vectors_of_labels(part), bank, alpha, k)
                stamp = calibration_stamp(alpha=alpha, k=k, bank_size=len(bank), query_model=query_model,
                                          source=source, bias=biases)
                db.execute("DELETE FROM calibration_bias")
                db.execute("DELETE FROM calibration_bank")
                db.executemany("INSERT INTO calibration_bias(label, bias) VALUES (?, ?)",
                               zip((int(x) for x in labels), (float(b) for b in biases)))
                db.executemany("INSERT INTO calibration_bank(row, vector) VALUES (?, ?)",
                               ((i, row.astype("<f4").tobytes()) for i, row in enumerate(bank)))
                self._set_meta(CALIBRATION_META, json.dumps(stamp))
            self._calibration, self._bank = stamp, bank
            self.rebuild_index()
            return dict(stamp)

    def calibration_bank(self) -> np.ndarray | None:
        """The calibration's bank of queries (None: not calibrated): what `copy_gallery` carries over."""
        with self._lock, self._transaction(write=False):
            return self._bank_vectors().copy() if self._calibration else None

    def clear_calibration(self) -> bool:
        """Remove the calibration (biases, bank, stamp) in one transaction; False if there was none."""
        with self._lock:
            with self._transaction(write=True) as db:
                if not self._calibration:
                    return False
                db.execute("DELETE FROM calibration_bias")
                db.execute("DELETE FROM calibration_bank")
                db.execute("DELETE FROM meta WHERE key = ?", (CALIBRATION_META,))
            self._calibration, self._bank = None, None
            self.rebuild_index()
            return True

    # ---- the index -------------------------------------------------------------------------------
    def _table_labels(self) -> np.ndarray:
        rows = self._db().execute("SELECT label FROM items ORDER BY label").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _vectors_of_labels(self, labels: np.ndarray) -> np.ndarray:
        out = np.empty((len(labels), self.space.dim), dtype=np.float32)
        pos = {int(label): i for i, label in enumerate(labels)}
        seen = 0
        for chunk in _chunks([int(x) for x in labels]):
            q = f"SELECT label, vector FROM items WHERE label IN ({','.join('?' * len(chunk))})"
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

    def refresh(self) -> None:
        """Pick up commits made by other processes (cheap when there are none)."""
        with self._lock, self._transaction(write=False):
            pass  # catching up is what a transaction does first

    # ---- writes ----------------------------------------------------------------------------------
    def add(
        self,
        vectors: Any,
        ids: Sequence[str],
        payloads: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        space: EmbeddingSpace,
        on_conflict: OnConflict = "error",
    ) -> list[str]:
        """Store vectors (made in `space`) under ids, with JSON payloads. Returns the ids written.

        Durable on return. `on_conflict`: an id already stored is an error, skipped, or replaced
        (delete + add, in one transaction). Refuses vectors of any other space (SpaceMismatchError),
        even of the same dimension."""
        self.space.check(space, "the vectors to add")
        ids = _check_ids(ids)
        x = as_vectors(vectors, self.space.dim, "the vectors to add")
        if len(x) != len(ids):
            raise InputError(f"{len(x)} vectors for {len(ids)} ids")
        if payloads is None:
            payloads = [None] * len(ids)
        payloads = list(payloads)
        if len(payloads) != len(ids):
            raise InputError(f"{len(payloads)} payloads for {len(ids)} ids")
        if on_conflict not in ("error", "skip", "replace"):
            raise InputError(f"on_conflict must be error, skip or replace, not {on_conflict!r}")
        rows_json = [_payload_json(p, i) for p, i in zip(payloads, ids)]
        with self._lock:
            with self._transaction(write=True) as db:  # the write lock first, then catch up, then write
                self._refuse_if_sealed(db)
                now = time.time()
                existing = self._existing(ids)
                if existing and on_conflict == "error":
                    shown = ", ".join(sorted(existing)[:5])
                    raise InputError(
                        f"{len(existing)} id(s) already in the gallery ({shown}); delete them first or use {CONFLICT_HINT}"
                    )
                removed: list[int] = []
                if existing and on_conflict == "replace":
                    removed = self._delete_rows(list(existing))
                keep = [j for j, i in enumerate(ids) if not (on_conflict == "skip" and i in existing)]
                rows = []
                for j in keep:
                    blob = x[j].astype("<f4").tobytes()
                    rows.append((ids[j], self._space_key, blob, zlib.crc32(blob), rows_json[j], now))
                labels: list[int] = []
                for row in rows:
                    cur = db.execute(
                        "INSERT INTO items(id, space, vector, crc, payload, added_at) VALUES (?, ?, ?, ?, ?, ?)", row
                    )
                    labels.append(int(cur.lastrowid))
                added = x[keep]
                if self._calibration and labels:  # new items get their bias from the stored bank, in this commit
                    biases = item_biases(added, self._bank_vectors(), self._calibration["alpha"], self._calibration["k"])
                    db.executemany("INSERT INTO calibration_bias(label, bias) VALUES (?, ?)",
                                   zip(labels, (float(b) for b in biases)))
                    added = np.concatenate([added, biases[:, None]], axis=1)
            self._apply_own_write(removed, labels, added)
            return [ids[j] for j in keep]

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

    def _existing(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(list(ids)):
            q = f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self._db().execute(q, list(chunk)))
        return found

    def _delete_rows(self, ids: Sequence[str]) -> list[int]:
        labels: list[int] = []
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            labels += [r[0] for r in self._db().execute(f"SELECT label FROM items WHERE id IN ({marks})", list(chunk))]
            self._db().execute(f"DELETE FROM items WHERE id IN ({marks})", list(chunk))
        return labels

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items by id (unknown ids are ignored). Durable on return; returns how many went."""
        ids = _check_ids(ids, unique=False)
        with self._lock:
            with self._transaction(write=True) as db:
                self._refuse_if_sealed(db)
                labels = self._delete_rows(ids)
            self._apply_own_write(labels, [], None)
            idx = self._index
            assert idx is not None
            limit = self.index_config.tombstone_rebuild_fraction * max(len(idx.labels), 1)
            if idx.kind == "hnsw" and len(idx.tombstones) > limit:
                self.rebuild_index()
            return len(labels)

    # ---- reads -----------------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, space: EmbeddingSpace, query_model: str | None = None) -> list[list[Hit]]:
        """Top-k items by inner product (cosine) for each query row. Queries must come from this
        gallery's space: SpaceMismatchError otherwise, whatever their dimension.

        `query_model`: the encoder id of the model that made the queries (`VLPModel.encoder_id`). When the
        gallery is calibrated for that model, scores are q . g - bias[g] (hits say calibrated=True);
        for any other model (or none) the calibration is ignored and scores are plain q . g."""
        self.space.check(space, "the query vectors")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InputError(f"k must be a positive integer; got {k!r}")
        q = as_vectors(queries, self.space.dim, "the query vectors")
        with self._lock, self._transaction(write=False):  # the index and the rows of one snapshot
            assert self._index is not None
            applies = calibration_applies(self._calibration, query_model)
            if self._calibration:  # the index has the bias dimension: -1 applies it, 0 ignores it
                q = np.concatenate([q, np.full((len(q), 1), -1.0 if applies else 0.0, np.float32)], axis=1)
            scores, labels = self._index.search(q, int(k), self.index_config)
            wanted = sorted({int(x) for x in labels.ravel() if x >= 0})
            rows = self._rows_by_label(wanted)
            unbiased = set(self._unbiased) if applies else set()
        out: list[list[Hit]] = []
        for srow, lrow in zip(scores, labels):
            hits = []
            for s, label in zip(srow, lrow):
                row = rows.get(int(label))
                if label >= 0 and row is not None:
                    mark = (int(label) not in unbiased) if applies else None
                    hits.append(Hit(row[0], float(s), row[1], self.space.id, mark))
            out.append(hits)
        return out

    def _rows_by_label(self, labels: Sequence[int]) -> dict[int, tuple[str, dict[str, Any]]]:
        rows: dict[int, tuple[str, dict[str, Any]]] = {}
        for chunk in _chunks(list(labels)):
            q = f"SELECT label, id, payload FROM items WHERE label IN ({','.join('?' * len(chunk))})"
            for label, item_id, payload in self._db().execute(q, list(chunk)):
                rows[label] = (item_id, json.loads(payload))
        return rows

    def get(self, ids: Sequence[str], with_vectors: bool = False) -> dict[str, dict[str, Any]]:
        """{id: {"payload": ..., "added_at": ..., ["vector": ...]}} for the ids that are stored."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for chunk in _chunks(list(ids)):
                q = f"SELECT id, payload, added_at, vector FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                for item_id, payload, added_at, blob in self._db().execute(q, list(chunk)):
                    entry: dict[str, Any] = {"payload": json.loads(payload), "added_at": added_at}
                    if with_vectors:
                        entry["vector"] = np.frombuffer(blob, dtype="<f4").copy()
                    out[item_id] = entry
        return out

    def present(self, ids: Sequence[str]) -> set[str]:
        """The subset of ids that are stored."""
        with self._lock:
            return self._existing(ids)

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

    def info(self) -> GalleryInfo:
        with self._lock, self._transaction(write=False):
            n = len(self)
            assert self._index is not None
            return GalleryInfo(
                path=str(self.path), format=FORMAT, space=self.space.to_dict(), space_id=self.space.id,
                modality=self.modality, size=n, index_kind=self._index.kind, index_config=self.index_config.to_dict(),
                recommended_kind=self.index_config.choose(n), tombstones=len(self._index.tombstones),
                created_at=self.created_at, extra=self.extra,
                calibration={**self._calibration, "uncalibrated_items": len(self._unbiased)} if self._calibration else None,
            )

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

    def store_media(self, data: bytes, suffix: str) -> Path:
        """Keep bytes handed to the gallery (an uploaded image) under media/, named by content; durable
        before the item that points at it is added, so backfill can re-embed it later."""
        import hashlib

        if not suffix.isalnum() or len(suffix) > 8:
            raise InputError(f"bad media suffix {suffix!r}")
        self.media_dir.mkdir(exist_ok=True)
        target = self.media_dir / f"{hashlib.sha256(data).hexdigest()}.{suffix.lower()}"
        if not target.exists():
            atomic_write_bytes(target, data)
        return target
