"""The one gallery base both backends extend: the embedded store (`xbt.gallery.store.Gallery`: SQLite +
faiss) and Milvus (`xbt.gallery.milvus.MilvusGallery`).

What a gallery promises does not depend on where its rows live, so it is written once, here: what `add`,
`delete`, `search` and `calibrate` accept (the space stamp, the dimension, ids, JSON payloads, finite
non-zero vectors, k, on_conflict), what a sealed gallery refuses, how a calibration is made (the NNN bias of
each item, `xbt.ranking.nnn.nnn_bias`, from a bank of the query model's queries; one stamp format),
how new items get their bias from the stored bank, what `info()` reports, and where uploads are kept.

A backend supplies the storage (the template methods below, marked abstract): one session of reads or
writes (`_session`: the store's SQLite transaction with its faiss index caught up; Milvus' lock), how rows
are inserted, deleted, found and searched, and how a calibration's bank and biases are written and
committed. Both keep the bias as one extra dimension of the vector they search, [g, bias]: a query of the
calibrated model searches as [q, -1] (score q . g - bias), any other query as [q, 0] (`bias_column`).

`xbt.gallery.base.GalleryBackend` stays the typing interface (a Protocol, which `QueryModelView` also
satisfies); this class implements it.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np

from xbt.durable import atomic_write_bytes
from xbt.errors import InputError
from xbt.ranking.nnn import nnn_bias
from xbt.gallery.index import IndexConfig
from xbt.models.base import EmbeddingSpace

MAX_ID_CHARS = 512

Modality = Literal["image", "text"]
OnConflict = Literal["error", "skip", "replace", "update"]
# What to do about ids already stored, as every message that refuses them says it (the API's field and the CLI's flag).
CONFLICT_HINT = "on_conflict='skip' (keep the stored items) or 'replace' (CLI: --on-conflict skip, --on-conflict replace)"


class GallerySealedError(InputError):
    """A write to a gallery that a migration's cut-over sealed: the items live in the new gallery now."""


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
# what a gallery accepts
# --------------------------------------------------------------------------------------------------
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


def check_ids(ids: Sequence[str], what: str = "ids", unique: bool = True) -> list[str]:
    """The ids as a list (deduplicated, in order, where `unique` is False); refuses a duplicate (where it
    is True), a single string, and anything that is not a non-empty string of at most MAX_ID_CHARS."""
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


def payload_json(payload: Any, item_id: str) -> str:
    """An item's payload as canonical JSON text (None: an empty object); refuses what is not a JSON object."""
    if payload is None:
        payload = {}
    if not isinstance(payload, Mapping):
        raise InputError(f"the payload of {item_id!r} must be a JSON object (a dict), not {type(payload).__name__}")
    try:
        return json.dumps(dict(payload), ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the payload of {item_id!r} is not JSON-serialisable: {exc}") from exc


def check_modality(modality: str | None) -> None:
    if modality not in (None, "image", "text"):
        raise InputError(f"modality must be 'image' or 'text', not {modality!r}")


def check_k(k: Any) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}")
    return int(k)


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------
def calibration_applies(calibration: Mapping[str, Any] | None, query_model: str | None) -> bool:
    """Whether a gallery calibration is for the query model with this encoder id."""
    if not calibration or query_model is None:
        return False
    return bool(query_model == calibration["query_model"]["encoder_id"])


def calibration_stamp(*, alpha: float, k: int, bank_size: int, query_model: Mapping[str, Any],
                      source: str | None = None, bias: np.ndarray | None = None,
                      calibration_id: str | None = None) -> dict[str, Any]:
    """What a gallery records about its calibration (one format for both backends); checks the arguments."""
    for key in ("encoder_id", "spec", "space_id"):
        if not isinstance(query_model.get(key), str) or not query_model.get(key):
            raise InputError(f"the query model of a calibration needs a non-empty {key!r}")
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"alpha must be a finite number >= 0; got {alpha!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer; got {k!r}")
    stamp: dict[str, Any] = {
        "id": calibration_id or uuid.uuid4().hex, "method": "nnn", "alpha": alpha, "k": int(k),
        "bank_size": int(bank_size), "bank_source": source, "created_at": time.time(),
        "query_model": {key: str(query_model[key]) for key in ("encoder_id", "spec", "space_id")},
    }
    if bias is not None and len(bias):
        stamp["bias"] = {"min": float(np.min(bias)), "mean": float(np.mean(bias)), "max": float(np.max(bias)),
                         "items": len(bias)}
    return stamp


def bias_column(queries: np.ndarray, weight: float) -> np.ndarray:
    """Queries [q, weight] for an index of [g, bias]: -1 applies each item's bias, 0 ignores it."""
    return np.concatenate([queries, np.full((len(queries), 1), weight, np.float32)], axis=1)


# --------------------------------------------------------------------------------------------------
# the base class
# --------------------------------------------------------------------------------------------------
class GalleryBase(ABC):
    """A stamped gallery: one embedding space, items of id, unit vector and JSON payload, at most one
    calibration. Every public method is safe to call from several threads (one lock)."""

    format_name: ClassVar[str]  # what `info()` reports as the gallery's format
    max_k: ClassVar[int | None] = None  # the engine's largest top-k (searches ask for at most this many)
    calibration_batch: ClassVar[int] = 65536  # items read and scored per step of `calibrate`
    info_type: ClassVar[type[GalleryInfo]] = GalleryInfo

    path: Any  # a folder (the store) or a reference string (Milvus)
    space: EmbeddingSpace
    modality: str | None
    index_config: IndexConfig
    created_at: float

    def __init__(self, *, space: EmbeddingSpace, modality: str | None, created_at: float, index_config: IndexConfig,
                 extra_json: str, calibration_json: str | None) -> None:
        self._lock = threading.RLock()
        self.space = space
        self.modality = modality or None
        self.created_at = float(created_at)
        self.index_config = index_config
        self._extra_json = extra_json
        self._calibration: dict[str, Any] | None = json.loads(calibration_json) if calibration_json else None
        self._bank: np.ndarray | None = None  # the calibration's bank, read on first need

    # ---- the storage: template methods ------------------------------------------------------------
    @abstractmethod
    def _session(self, write: bool) -> AbstractContextManager[Any]:
        """The lock, and whatever makes everything read or written inside one consistent (the store: one
        SQLite transaction, the index caught up inside it, its own writes applied to the index after the
        commit)."""

    @abstractmethod
    def _where(self) -> str:
        """The gallery as messages name it."""

    @abstractmethod
    def _read_seal(self) -> str | None: ...

    @abstractmethod
    def _write_seal(self, reason: str | None) -> None:
        """Record (or, with None, remove) why the gallery refuses writes, inside a write session."""

    @abstractmethod
    def _present(self, ids: Sequence[str]) -> set[str]: ...

    @abstractmethod
    def _insert(self, ids: Sequence[str], vectors: np.ndarray, payloads: Sequence[str], replace: set[str]) -> None:
        """Write new items (checked; payloads as JSON text) inside a write session, with their bias where the
        gallery is calibrated (`_new_item_biases`); `replace`: stored ids among them, whose items they replace."""

    @abstractmethod
    def _delete(self, ids: Sequence[str]) -> int:
        """Delete the items of these ids that are stored, inside a write session; how many went."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, applies: bool) -> list[list[Hit]]:
        """Top-k per (checked) query row, inside a read session; `applies`: the calibration is for the
        query model (each hit says whether its score holds the item's bias)."""

    @abstractmethod
    def _read_bank(self) -> np.ndarray | None:
        """The committed calibration's bank of queries (None where it cannot be read)."""

    @abstractmethod
    def _begin_calibration(self, calibration_id: str, bank: np.ndarray) -> None:
        """Store a new calibration's bank (inside the write session that `calibrate` holds)."""

    @abstractmethod
    def _calibration_pages(self, batch: int) -> Generator[tuple[Any, np.ndarray], None, None]:
        """Every item, a page at a time: (the page's keys for `_write_biases`, its (n, dim) vectors)."""

    @abstractmethod
    def _write_biases(self, keys: Any, vectors: np.ndarray, biases: np.ndarray, calibration_id: str) -> None: ...

    @abstractmethod
    def _commit_calibration(self, stamp: dict[str, Any]) -> None:
        """Record the stamp: the calibration's commit point."""

    @abstractmethod
    def _erase_calibration(self) -> None: ...

    @abstractmethod
    def _calibration_changed(self) -> None:
        """After a calibration committed or was cleared (the store rebuilds its index; Milvus drops old banks)."""

    @abstractmethod
    def _uncalibrated_items(self) -> int: ...

    @property
    @abstractmethod
    def index_kind(self) -> str: ...

    @property
    @abstractmethod
    def media_dir(self) -> Path: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def count_payload(self, key: str, field: str, value: str) -> int:
        """How many items have payload[key][field] == value (a string), counted by the backend's own query
        without reading the payloads into Python (e.g. the rows a transform marked, `xbt.gallery.transform`)."""

    @abstractmethod
    def get(self, ids: Sequence[str], with_vectors: bool = False) -> dict[str, dict[str, Any]]:
        """{id: {"payload": ..., "added_at": ..., ["vector": ...]}} for the ids that are stored."""

    @abstractmethod
    def iter_items(self, batch: int = 1024) -> Iterator[tuple[str, dict[str, Any], float]]:
        """(id, payload, added_at) of every item, oldest first."""

    @abstractmethod
    def ids(self) -> list[str]:
        """Every id, oldest first."""

    @abstractmethod
    def verify(self) -> list[str]:
        """Problems found by a full check (empty when consistent)."""

    @abstractmethod
    def compact(self) -> None:
        """Bring the index and the files to their best state for the current size; remove unused media."""

    @abstractmethod
    def close(self) -> None: ...

    # hooks with a default
    def _sync_calibration(self) -> None:
        """Inside a session: pick up a calibration committed by another client (the store's sessions do)."""
        return None

    def _check_calibratable(self) -> None:
        """Refuse to calibrate a gallery that has no room for the bias (none of the store's)."""
        return None

    @property
    def _calibratable(self) -> bool:
        return True

    def _after_delete(self) -> None:
        """After a delete committed (the store re-builds an HNSW index that holds too many tombstones)."""
        return None

    def _tombstones(self) -> int:
        return 0

    def _info_fields(self) -> dict[str, Any]:
        """What a backend adds to `info()` (fields of its `info_type`)."""
        return {}

    # ---- writes ----------------------------------------------------------------------------------
    def add(self, vectors: Any, ids: Sequence[str], payloads: Sequence[Mapping[str, Any] | None] | None = None, *,
            space: EmbeddingSpace, on_conflict: OnConflict = "error") -> list[str]:
        """Store vectors (made in `space`) under ids, with JSON payloads. Returns the ids written.

        Durable on return (as the backend says). `on_conflict`: an id already stored is an error, skipped,
        or replaced; "update" replaces the ids stored and writes nothing for the others (decided inside the
        write, so a row another writer deleted meanwhile is not brought back). Refuses vectors of any other
        space (SpaceMismatchError), even of the same dimension."""
        self.space.check(space, "the vectors to add")
        ids = check_ids(ids)
        x = as_vectors(vectors, self.space.dim, "the vectors to add")
        if len(x) != len(ids):
            raise InputError(f"{len(x)} vectors for {len(ids)} ids")
        payloads = list(payloads) if payloads is not None else [None] * len(ids)
        if len(payloads) != len(ids):
            raise InputError(f"{len(payloads)} payloads for {len(ids)} ids")
        if on_conflict not in ("error", "skip", "replace", "update"):
            raise InputError(f"on_conflict must be error, skip, replace or update, not {on_conflict!r}")
        docs = [payload_json(p, i) for p, i in zip(payloads, ids)]
        with self._session(write=True):  # the store: the write lock first, then catch up, then write
            self._refuse_if_sealed()
            existing = self._present(ids)
            if existing and on_conflict == "error":
                shown = ", ".join(sorted(existing)[:5])
                raise InputError(
                    f"{len(existing)} id(s) already in the gallery ({shown}); delete them first or use {CONFLICT_HINT}"
                )
            if on_conflict == "update":
                keep = [j for j, i in enumerate(ids) if i in existing]
            else:
                keep = [j for j, i in enumerate(ids) if not (on_conflict == "skip" and i in existing)]
            self._insert([ids[j] for j in keep], x[keep], [docs[j] for j in keep],
                         existing if on_conflict in ("replace", "update") else set())
        return [ids[j] for j in keep]

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items by id (unknown ids are ignored). Durable on return; returns how many went."""
        ids = check_ids(ids, unique=False)
        with self._lock:
            with self._session(write=True):
                self._refuse_if_sealed()
                removed = self._delete(ids)
            self._after_delete()
            return removed

    def _new_item_biases(self, vectors: np.ndarray) -> np.ndarray | None:
        """The biases of items added to a calibrated gallery, from its stored bank (None: not calibrated, or
        its bank cannot be read: the items are then searched uncalibrated)."""
        if not self._calibration or len(vectors) == 0:
            return None
        bank = self._bank_vectors()
        if bank is None:
            return None
        return nnn_bias(vectors, bank, float(self._calibration["alpha"]), int(self._calibration["k"]))

    # ---- sealing (a migration's cut-over) -----------------------------------------------------------
    def seal(self, reason: str) -> None:
        """Refuse every later add and delete with `reason` (checked inside each write's session: see the
        backend for what that guarantees across processes)."""
        with self._session(write=True):
            self._write_seal(reason)

    def unseal(self) -> None:
        with self._session(write=True):
            self._write_seal(None)

    @property
    def sealed(self) -> str | None:
        """Why the gallery refuses writes, or None while it takes them."""
        with self._lock:
            return self._read_seal()

    def _refuse_if_sealed(self) -> None:
        reason = self._read_seal()
        if reason:
            raise GallerySealedError(f"the gallery at {self._where()} takes no more writes: {reason}")

    # ---- reads -----------------------------------------------------------------------------------
    def search(self, queries: Any, k: int, *, space: EmbeddingSpace, query_model: str | None = None) -> list[list[Hit]]:
        """Top-k items by inner product (cosine) for each query row. Queries must come from this
        gallery's space: SpaceMismatchError otherwise, whatever their dimension.

        `query_model`: the encoder id of the model that made the queries (`VLPModel.encoder_id`). When the
        gallery is calibrated for that model, scores are q . g - bias[g] (hits say calibrated=True; an
        item without a bias: plain q . g, calibrated=False); for any other model (or none) the calibration
        is ignored and scores are plain q . g."""
        self.space.check(space, "the query vectors")
        k = check_k(k)
        q = as_vectors(queries, self.space.dim, "the query vectors")
        if self.max_k is not None:
            k = min(k, self.max_k)
        with self._session(write=False):  # the store: the index and the rows of one snapshot
            applies = self._calibratable and calibration_applies(self._calibration, query_model)
            return self._search(q, k, applies)

    def _hit(self, item_id: str, score: float, payload: dict[str, Any], calibrated: bool | None) -> Hit:
        return Hit(item_id, float(score), payload, self.space.id, calibrated)

    def present(self, ids: Sequence[str]) -> set[str]:
        """The subset of ids that are stored."""
        with self._lock:
            return self._present(ids)

    @property
    def extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = json.loads(self._extra_json)
        return extra

    def info(self) -> GalleryInfo:
        with self._session(write=False):
            self._sync_calibration()
            n = len(self)
            calibration = ({**self._calibration, "uncalibrated_items": self._uncalibrated_items()}
                           if self._calibration else None)
            return self.info_type(
                path=str(self.path), format=self.format_name, space=self.space.to_dict(),
                space_id=self.space.id, modality=self.modality, size=n, index_kind=self.index_kind,
                index_config=self.index_config.to_dict(), recommended_kind=self.index_config.choose(n),
                tombstones=self._tombstones(), created_at=self.created_at, extra=self.extra, calibration=calibration,
                **self._info_fields(),
            )

    # ---- calibration -----------------------------------------------------------------------------
    @property
    def calibration(self) -> dict[str, Any] | None:
        """The stamp of this gallery's calibration (None: not calibrated), as of the last session (the
        store) or the last `refresh` (Milvus)."""
        with self._session(write=False):
            return dict(self._calibration) if self._calibration else None

    def _bank_vectors(self) -> np.ndarray | None:
        """The committed calibration's bank (read once; inside a session)."""
        if self._bank is None:
            self._bank = self._read_bank()
        return self._bank

    def calibration_bank(self) -> np.ndarray | None:
        """The calibration's bank of queries (None: not calibrated): what `copy_gallery` carries over."""
        with self._session(write=False):
            self._sync_calibration()
            bank = self._bank_vectors() if self._calibration else None
            return None if bank is None else bank.copy()

    def calibrate(self, bank: Any, *, alpha: float, k: int, query_model: Mapping[str, Any], space: EmbeddingSpace,
                  source: str | None = None, batch: int | None = None) -> dict[str, Any]:
        """Calibrate the gallery for one query model (NNN): every item's bias = alpha x mean of its top-k
        similarities to `bank` (that model's queries of training data, in this gallery's `space`), stored
        with the bank and a stamp whose writing commits it (the backend says how a crash leaves it).
        Replaces any earlier calibration. `query_model`: {"encoder_id", "spec", "space_id"} of the model
        whose searches it is for (`describe_query_model`). `batch`: items scored per step. Returns the stamp."""
        self.space.check(space, "the bank of queries")
        self._check_calibratable()
        bank = as_vectors(bank, self.space.dim, "the bank of queries")
        if len(bank) == 0:
            raise InputError("the bank of queries is empty: give training pairs (--queries) to calibrate with")
        calibration_id = calibration_stamp(alpha=alpha, k=k, bank_size=len(bank), query_model=query_model)["id"]
        with self._lock:
            with self._session(write=True):
                self._begin_calibration(calibration_id, bank)
                written: list[np.ndarray] = []
                pages = self._calibration_pages(self.calibration_batch if batch is None else batch)
                try:
                    for keys, vectors in pages:
                        biases = nnn_bias(vectors, bank, float(alpha), int(k))
                        self._write_biases(keys, vectors, biases, calibration_id)
                        written.append(biases)
                finally:
                    pages.close()  # the backend's scan ends (Milvus closes its iterator) even after an error
                stamp = calibration_stamp(alpha=alpha, k=k, bank_size=len(bank), query_model=query_model, source=source,
                                          bias=np.concatenate(written) if written else None, calibration_id=calibration_id)
                self._commit_calibration(stamp)
            self._calibration, self._bank = stamp, bank
            self._calibration_changed()
            return dict(stamp)

    def clear_calibration(self) -> bool:
        """Remove the calibration; False if there was none."""
        with self._lock:
            with self._session(write=True):
                self._sync_calibration()
                if not self._calibration:
                    return False
                self._erase_calibration()
            self._calibration, self._bank = None, None
            self._calibration_changed()
            return True

    def refresh(self) -> None:
        """Pick up what other clients committed (cheap when there is nothing)."""
        with self._session(write=False):
            self._sync_calibration()

    # ---- media -----------------------------------------------------------------------------------
    def store_media(self, data: bytes, suffix: str) -> Path:
        """Keep bytes handed to the gallery (an uploaded image) under `media_dir`, named by content; durable
        before the item that points at it is added, so backfill can re-embed it later."""
        if not suffix.isalnum() or len(suffix) > 8:
            raise InputError(f"bad media suffix {suffix!r}")
        self.media_dir.mkdir(exist_ok=True)
        target = self.media_dir / f"{hashlib.sha256(data).hexdigest()}.{suffix.lower()}"
        if not target.exists():
            atomic_write_bytes(target, data)
        return target

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
