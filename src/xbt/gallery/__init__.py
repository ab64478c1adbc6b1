"""Stamped galleries: the crash-safe embedded store, a Milvus backend behind the same interface (`base`,
`milvus`; pymilvus is imported only when a milvus: gallery is opened), ingestion with a model, and
progressive backfill (the migration state machine in `migration`, serving during it in `migrating`)."""

from xbt.gallery.base import GalleryBackend, copy_gallery, create_gallery, open_gallery
from xbt.gallery.index import IndexConfig
from xbt.gallery.ingest import GalleryItem, GalleryRetriever, ingest, load_items
from xbt.gallery.migrating import MigratingRetriever
from xbt.gallery.migration import Migration
from xbt.gallery.store import Gallery, Hit

__all__ = [
    "Gallery", "GalleryBackend", "GalleryItem", "GalleryRetriever", "Hit", "IndexConfig", "MigratingRetriever",
    "Migration", "copy_gallery", "create_gallery", "ingest", "load_items", "open_gallery",
]
