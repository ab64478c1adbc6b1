"""Stamped galleries: the crash-safe vector store, ingestion with a model, and progressive backfill
(the migration state machine in `migration`, serving during it in `migrating`)."""

from xbt.eval.backfill_curve import backfill_curve, backfill_curves, slot_merge
from xbt.gallery.index import IndexConfig
from xbt.gallery.ingest import GalleryItem, GalleryRetriever, ingest, load_items
from xbt.gallery.migrating import MigratingRetriever
from xbt.gallery.migration import Migration
from xbt.gallery.store import Gallery, Hit

__all__ = [
    "Gallery", "GalleryItem", "GalleryRetriever", "Hit", "IndexConfig", "MigratingRetriever", "Migration",
    "backfill_curve", "backfill_curves", "ingest", "load_items", "slot_merge",
]
