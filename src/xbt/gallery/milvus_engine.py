"""Talking to Milvus for `xbt.gallery.milvus.MilvusGallery`: the `milvus:URI#NAME` reference, the client
(a server, or Milvus Lite started in this process), and the layout of a gallery's collections (the row
schema, the bank's schema, the index type for an xbt index kind, the physical name per space).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xbt.errors import InputError, XbtError
from xbt.gallery.index import IndexConfig
from xbt.models.base import EmbeddingSpace

PREFIX = "milvus:"
DEFAULT_NAME = "gallery"
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,180}$")


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


def aliases(client: Any) -> set[str]:
    """Every alias the client's database holds (pymilvus answers a dict, despite its List hint)."""
    listed = client.list_aliases()
    return set(listed.get("aliases", []) if isinstance(listed, Mapping) else listed)


def collection_schema(client: Any, dim: int, description: str) -> Any:
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


def bank_schema(client: Any, dim: int) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description="xbt calibration bank")
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    return schema


def milvus_index(kind: str, config: IndexConfig, n: int) -> tuple[str, dict[str, Any]]:
    """Milvus index type and build parameters for an xbt index kind."""
    if kind == "hnsw":
        return "HNSW", {"M": config.hnsw_m, "efConstruction": config.hnsw_ef_construction}
    if kind == "ivf":
        return "IVF_FLAT", {"nlist": config.ivf_nlist or max(1, config.nlist(max(n, 1)))}
    return "FLAT", {}


def kind_at_creation(config: IndexConfig) -> str:
    """Milvus trains and builds indexes per segment itself, so an explicit kind is kept from the start;
    "auto" starts exact and is re-chosen by size at `compact()`."""
    return config.kind if config.kind in ("hnsw", "ivf", "flat") else config.choose(0)
