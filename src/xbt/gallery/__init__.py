"""Stamped galleries: the crash-safe vector store, ingestion with a model, and progressive backfill."""

from xbt.gallery.backfill import MigratingRetriever, Migration, backfill_curve, backfill_curves, slot_merge
from xbt.gallery.ingest import GalleryItem, GalleryRetriever, ingest, load_items
from xbt.gallery.store import Gallery, Hit, IndexConfig

__all__ = [
    "Gallery", "GalleryItem", "GalleryRetriever", "Hit", "IndexConfig", "MigratingRetriever", "Migration",
    "backfill_curve", "backfill_curves", "ingest", "load_items", "slot_merge",
]
