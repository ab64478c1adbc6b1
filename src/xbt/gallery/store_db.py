"""The embedded store's files (`xbt.gallery.store.Gallery`): the SQLite schema, creating a database staged
beside its folder under an exclusive lock, and probes that read a folder without opening the gallery.

Creation: the database is made in a staging folder (`.creating`) and renamed into place once committed and
closed, so every file SQLite writes before the first commit (journal, log, shared memory) lies in a folder
that only an interrupted creation leaves behind, and that the next create removes whole. Two creators of
one folder serialise on flock of the folder itself (no lock file to leave behind).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xbt.durable import fsync_path
from xbt.errors import InputError, XbtError
from xbt.gallery.index import IndexConfig
from xbt.models.base import EmbeddingSpace

FORMAT = "xbt.gallery/1"
DB_NAME = "gallery.db"
SNAPSHOT_NAME = "index.snapshot"
STAGING_NAME = ".creating"  # where `create` makes the database before renaming it into place
MEDIA_DIR = "media"
SQL_CHUNK = 900  # bound on SQL parameters per statement
CALIBRATION_META = "calibration"
SEALED_META = "sealed"  # why the gallery refuses writes (a migration's cut-over), absent while it takes them


def chunks(seq: Sequence[Any], size: int = SQL_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def marks(n: int) -> str:
    """The placeholders of an SQL `IN (...)` list of n values."""
    return ",".join("?" * n)


SCHEMA = """
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
CALIBRATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS calibration_bias(
    label INTEGER PRIMARY KEY REFERENCES items(label) ON DELETE CASCADE,
    bias REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS calibration_bank(row INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""


def statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""


def creation_interrupted(db: Path) -> bool:
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
def creation_lock(path: Path) -> Iterator[None]:
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


def remove_creation_leftovers(path: Path) -> None:
    """What an interrupted `create` alone writes: its staging folder, and (from an xbt that created the
    database in place) a database whose creating transaction never committed, with SQLite's side files."""
    shutil.rmtree(path / STAGING_NAME, ignore_errors=True)
    if not is_gallery(path) or creation_interrupted(path / DB_NAME):
        for leftover in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal"):
            (path / leftover).unlink(missing_ok=True)


def is_gallery(path: str | Path) -> bool:
    return (Path(path) / DB_NAME).is_file()


def is_complete_gallery(path: str | Path) -> bool:
    """A gallery whose creation committed (an interrupted `create` leaves a database without its tables,
    which `Gallery.create` simply starts again)."""
    return is_gallery(path) and not creation_interrupted(Path(path) / DB_NAME)


def count_items(path: str | Path) -> int:
    """How many items a gallery holds, without loading its index (for progress reports)."""
    conn = sqlite3.connect(f"file:{Path(path) / DB_NAME}?mode=ro", uri=True, timeout=30.0)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def connect(db: Path) -> sqlite3.Connection:
    """A connection in WAL mode that fsyncs the log on every commit (acknowledged = durable)."""
    conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # fsync the log on every commit: acknowledged = durable
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def create_database(path: Path, space: EmbeddingSpace, index: IndexConfig, modality: str | None,
                    extra: Mapping[str, Any] | None, open_db: Callable[[Path], sqlite3.Connection] = connect) -> None:
    """Make a new, empty gallery database in the folder `path` (refused where one is; see the module's doc)."""
    with creation_lock(path):  # two creators of one folder: the second waits, then finds the first's gallery
        if is_gallery(path) and not creation_interrupted(path / DB_NAME):
            raise InputError(f"{path} already holds a gallery; open it, or choose another folder")
        remove_creation_leftovers(path)
        if any(path.iterdir()):
            raise InputError(f"{path} exists and is not empty; choose a new folder for the gallery")
        staging = path / STAGING_NAME
        staging.mkdir()
        conn = open_db(staging / DB_NAME)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in statements(SCHEMA):
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
