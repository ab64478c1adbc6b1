"""Progressive backfill: re-embed an old-space gallery with the new model, in priority order, resumably,
while search keeps answering; then an atomic cut-over to the new space.

A migration lives in one folder::

    migration.json   the state (old gallery, spaces, position in the plan, status), replaced atomically
    plan.jsonl       the ids in backfill order, fixed when the migration starts
    gallery/         the new-space gallery being filled

Resuming after a kill: the new gallery itself is the ground truth of what is done (each batch is
durable when added); `position` is written after each batch and only lets a restart skip ahead. A batch
re-done after a kill is detected (its ids are present) and skipped, so nothing is embedded twice into
the gallery. Items added to (or deleted from) the old gallery during the backfill are caught by a final
sweep; `MigratingRetriever.add` writes to both galleries so the sweep has little left to do.

Search during the migration -- the slot-preserving merge (`slot_merge`). Scores of two spaces are not
comparable, so they are never compared. The old gallery is complete, so the compatible model's ranking
over it decides, depth by depth, whether a slot goes to a not-yet-backfilled item (kept as ranked, with
its old-space score) or to a backfilled one; the backfilled slots are then filled, in order, with the new
model's ranking over the new gallery. With nothing backfilled the result is the compatible model's;
with everything backfilled it is exactly the new model's; in between, the new model re-orders the
backfilled share of each result list. Each hit carries the id of the space its score came from.

Cut-over: once every old item is in the new gallery (plan done, sweep clean), `cut_over` flips the state
file's status in one atomic rename; retrievers watching the migration switch to the new gallery alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Container, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from xbt.data.images import ImageInput
from xbt.errors import InputError, SpaceMismatchError
from xbt.eval.retrieval import (
    DEFAULT_KS,
    Estimate,
    bootstrap_indices,
    image_to_text_positives,
    recall_estimate,
    text_to_image_positives,
)
from xbt.gallery.ingest import GalleryItem, check_model, embed_inputs, item_source, model_name
from xbt.gallery.store import Gallery, Hit, IndexConfig, OnConflict, atomic_write_bytes, count_items, is_gallery
from xbt.models.base import EmbeddingSpace, VLPModel
from xbt.progress import progress_bar

MIGRATION_FORMAT = "xbt.migration/1"
STATE_NAME = "migration.json"
PLAN_NAME = "plan.jsonl"
NEW_GALLERY = "gallery"
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))

T = TypeVar("T", bound=Hashable)


# --------------------------------------------------------------------------------------------------
# the merge rule
# --------------------------------------------------------------------------------------------------
def slot_merge(old_ranking: Sequence[T], backfilled: Container[T], new_ranking: Sequence[T]) -> list[tuple[T, str]]:
    """Merge an old-space ranking over the complete old gallery with a new-space ranking over the
    backfilled items: slots the old ranking gives to backfilled items are refilled, in order, by the new
    ranking. Returns (item, "old" | "new") pairs, best first. No score of one space meets the other's."""
    fill = iter(new_ranking)
    merged: list[tuple[T, str]] = []
    seen: set[T] = set()  # an item backfilled between the two searches must not appear twice
    for item in old_ranking:
        if item in backfilled:
            nxt = next(fill, None)
            while nxt is not None and nxt in seen:
                nxt = next(fill, None)
            if nxt is not None:
                merged.append((nxt, "new"))
                seen.add(nxt)
        elif item not in seen:
            merged.append((item, "old"))
            seen.add(item)
    return merged


# --------------------------------------------------------------------------------------------------
# priority order
# --------------------------------------------------------------------------------------------------
def order_ids(gallery: Gallery, order: str | Sequence[str] = "oldest") -> list[str]:
    """Every id of the gallery in a backfill priority order:

    "oldest" / "newest" (time added), "id" (sorted), "field:NAME" / "-field:NAME" (a payload field,
    ascending / descending; items without it come last), or a list of ids that go first (then the rest,
    oldest first)."""
    items = list(gallery.iter_items())
    if not isinstance(order, str):
        first = list(dict.fromkeys(order))
        stored = {i for i, _, _ in items}
        unknown = [i for i in first if i not in stored]
        if unknown:
            raise InputError(f"{len(unknown)} priority id(s) are not in the gallery (e.g. {unknown[0]!r})")
        chosen = set(first)
        return first + [i for i, _, _ in items if i not in chosen]
    if order == "oldest":
        return [i for i, _, _ in items]
    if order == "newest":
        return [i for i, _, _ in reversed(items)]
    if order == "id":
        return sorted(i for i, _, _ in items)
    if order.lstrip("-").startswith("field:"):
        descending = order.startswith("-")
        name = order.lstrip("-")[len("field:"):]
        have = [(p[name], i) for i, p, _ in items if name in p]
        missing = [i for i, p, _ in items if name not in p]
        try:
            have.sort(key=lambda t: t[0], reverse=descending)
        except TypeError as exc:
            raise InputError(f"payload field {name!r} mixes types that cannot be ordered: {exc}") from exc
        return [i for _, i in have] + missing
    raise InputError(f"unknown order {order!r}: use oldest, newest, id, field:NAME, -field:NAME or a list of ids")


# --------------------------------------------------------------------------------------------------
# the migration
# --------------------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


class Migration:
    """A resumable backfill of an old-space gallery into a new-space gallery. `start` once, then `run`
    (again after any interruption), then `cut_over`."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not (self.path / STATE_NAME).is_file():
            raise InputError(f"no migration at {self.path}; start one with `xbt gallery backfill` or Migration.start")
        self._stat: tuple[int, int] | None = None
        self._state: dict[str, Any] = {}
        self._plan: list[str] | None = None
        self.state  # noqa: B018 - validate now

    # ---- state -------------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        """The state on disk (re-read when the file changed: another process may be running the backfill)."""
        st = (self.path / STATE_NAME).stat()
        key = (st.st_mtime_ns, st.st_size)
        if key != self._stat:
            state = json.loads((self.path / STATE_NAME).read_text())
            if state.get("format") != MIGRATION_FORMAT:
                raise InputError(f"{self.path} holds migration format {state.get('format')!r}; this xbt reads {MIGRATION_FORMAT}")
            self._state, self._stat = state, key
        return self._state

    def _save(self, **changes: Any) -> None:
        state = {**self.state, **changes, "updated_at": time.time()}
        _write_json_atomic(self.path / STATE_NAME, state)
        self._state, self._stat = state, None

    @property
    def old_gallery_path(self) -> Path:
        return Path(self.state["old_gallery"])

    @property
    def new_gallery_path(self) -> Path:
        return self.path / NEW_GALLERY

    @property
    def old_space(self) -> EmbeddingSpace:
        return EmbeddingSpace.from_dict(self.state["old_space"])

    @property
    def new_space(self) -> EmbeddingSpace:
        return EmbeddingSpace.from_dict(self.state["new_space"])

    @property
    def status(self) -> str:
        return str(self.state["status"])

    @property
    def cut_over_done(self) -> bool:
        return self.status == "cut-over"

    def plan(self) -> list[str]:
        if self._plan is None:
            with (self.path / PLAN_NAME).open() as f:
                self._plan = [json.loads(line) for line in f if line.strip()]
        return self._plan

    @classmethod
    def start(
        cls,
        path: str | Path,
        old_gallery: Gallery,
        new_space: EmbeddingSpace,
        order: str | Sequence[str] = "oldest",
        index: IndexConfig | None = None,
    ) -> Migration:
        """Fix the plan (priority order over the old gallery's ids) and create the empty new gallery."""
        path = Path(path).expanduser()
        if (path / STATE_NAME).exists():
            raise InputError(f"{path} already holds a migration; resume it (Migration(path).run) or choose another folder")
        if new_space.fingerprint == old_gallery.space.fingerprint and new_space.dim == old_gallery.space.dim:
            raise InputError("the new model emits the gallery's own space: there is nothing to backfill")
        if old_gallery.modality not in ("image", "text"):
            raise InputError(f"the gallery at {old_gallery.path} has no modality, so its items cannot be re-embedded")
        path.mkdir(parents=True, exist_ok=True)
        plan = order_ids(old_gallery, order)
        atomic_write_bytes(path / PLAN_NAME, "".join(json.dumps(i) + "\n" for i in plan).encode())
        if is_gallery(path / NEW_GALLERY):  # a start killed after creating it: begin it again, empty
            import shutil

            shutil.rmtree(path / NEW_GALLERY)
        Gallery.create(path / NEW_GALLERY, new_space, index or old_gallery.index_config, old_gallery.modality,
                       extra={"backfill_of": str(old_gallery.path), "old_space": old_gallery.space.id}).close()
        _write_json_atomic(path / STATE_NAME, {
            "format": MIGRATION_FORMAT, "old_gallery": str(Path(old_gallery.path).resolve()),
            "old_space": old_gallery.space.to_dict(), "new_space": new_space.to_dict(),
            "order": order if isinstance(order, str) else "ids", "plan_size": len(plan), "position": 0,
            "status": "backfilling", "failed": {}, "started_at": time.time(), "updated_at": time.time(),
        })
        return cls(path)

    # ---- the work --------------------------------------------------------------------------------
    def _galleries(self, old: Gallery | None, new: Gallery | None) -> tuple[Gallery, Gallery, bool]:
        owned = old is None or new is None
        old = old or Gallery.open(self.old_gallery_path)
        new = new or Gallery.open(self.new_gallery_path)
        self.old_space.check(old.space, f"the gallery at {old.path}")
        self.new_space.check(new.space, f"the gallery at {new.path}")
        return old, new, owned

    def run(
        self,
        new_model: VLPModel,
        *,
        batch_size: int = 64,
        max_items: int | None = None,
        old: Gallery | None = None,
        new: Gallery | None = None,
        show_progress: bool = False,
    ) -> dict[str, Any]:
        """Backfill from the saved position (at most `max_items` more items, e.g. to spread the work), then
        sweep up what changed in the old gallery meanwhile. Returns `progress()`."""
        if self.cut_over_done:
            return self.progress()
        self.new_space.check(new_model.space, f"the vectors of the new model {model_name(new_model)!r}")
        old, new, owned = self._galleries(old, new)
        try:
            plan = self.plan()
            position = int(self.state["position"])
            budget = max_items if max_items is not None else len(plan) + len(old)
            failed: dict[str, str] = dict(self.state.get("failed", {}))
            with progress_bar(len(plan) - position, f"backfilling into {new.space.id}", show_progress) as advance:
                while position < len(plan) and budget > 0:
                    batch = plan[position : position + min(batch_size, budget)]
                    budget -= self._backfill_batch(batch, old, new, new_model, batch_size, failed)
                    position += len(batch)
                    self._save(position=position, failed=failed)
                    advance(len(batch))
            if position >= len(plan) and budget > 0:
                self._sweep(old, new, new_model, batch_size, failed)
        finally:
            if owned:
                old.close()
                new.close()
        return self.progress()

    def _backfill_batch(self, ids: Sequence[str], old: Gallery, new: Gallery, model: VLPModel,
                        batch_size: int, failed: dict[str, str]) -> int:
        present = new.present(ids)
        todo = [i for i in ids if i not in present and i not in failed]
        stored = old.get(todo)  # ids deleted from the old gallery meanwhile are simply gone
        items = [GalleryItem(i, stored[i]["payload"]) for i in todo if i in stored]
        sources, ok = [], []
        for it in items:
            try:
                sources.append(item_source(it, new.modality or "image"))
                ok.append(it)
            except InputError as exc:
                failed[it.id] = str(exc)
        vectors, bad = embed_inputs(model, sources, new.modality or "image", batch_size)
        for i, why in bad.items():
            failed[ok[i].id] = why
        good = [it for i, it in enumerate(ok) if i not in bad]
        if good:
            new.add(vectors, [it.id for it in good], [it.payload for it in good], space=model.space, on_conflict="skip")
        return len(items)

    def _sweep(self, old: Gallery, new: Gallery, model: VLPModel, batch_size: int, failed: dict[str, str]) -> None:
        """Bring the new gallery to the old gallery's current contents; mark the migration complete."""
        old_ids, new_ids = old.ids(), set(new.ids())
        missing = [i for i in old_ids if i not in new_ids and i not in failed]
        for start in range(0, len(missing), batch_size):
            self._backfill_batch(missing[start : start + batch_size], old, new, model, batch_size, failed)
        old_set = set(old_ids)
        extra = [i for i in new.ids() if i not in old_set]
        if extra:
            new.delete(extra)
        failed = {i: why for i, why in failed.items() if i in old_set}
        now_old = old.ids()
        now_new = new.present(now_old)
        complete = not [i for i in now_old if i not in now_new and i not in failed]
        self._save(failed=failed, status="complete" if complete else "backfilling")

    def progress(self) -> dict[str, Any]:
        """How far along: items in the new gallery against the old gallery's size."""
        state = self.state
        old_n = count_items(self.old_gallery_path) if is_gallery(self.old_gallery_path) else None
        new_n = count_items(self.new_gallery_path)
        return {
            "status": state["status"], "position": state["position"], "plan_size": state["plan_size"],
            "old_size": old_n, "new_size": new_n, "failed": len(state.get("failed", {})),
            "fraction": (new_n / old_n) if old_n else 1.0, "old_space": self.old_space.id, "new_space": self.new_space.id,
        }

    def cut_over(self, force: bool = False) -> dict[str, Any]:
        """Switch serving to the new space, atomically. Refused until the backfill is complete, unless
        `force` (items that could not be re-embedded then leave the served gallery)."""
        if self.cut_over_done:
            return self.progress()
        state = self.state
        if state["status"] != "complete" and not force:
            raise InputError(
                f"the backfill is not complete ({state['position']}/{state['plan_size']} planned items done);"
                " run it to the end (`xbt gallery backfill`), or force the cut-over"
            )
        if state.get("failed") and not force:
            raise InputError(
                f"{len(state['failed'])} item(s) could not be re-embedded (e.g. {next(iter(state['failed']))!r});"
                " fix their sources and run the backfill again, or force the cut-over without them"
            )
        self._save(status="cut-over", cut_over_at=time.time())
        return self.progress()


# --------------------------------------------------------------------------------------------------
# serving during the migration
# --------------------------------------------------------------------------------------------------
class MigratingRetriever:
    """Answers queries during a backfill: the compatible model against the old gallery, merged with the
    new model against the growing new gallery (`slot_merge`); after the cut-over, the new model alone.
    Writes go to both galleries until the cut-over, so new items need no backfill."""

    def __init__(self, migration: Migration, compat_model: VLPModel, new_model: VLPModel,
                 old: Gallery | None = None, new: Gallery | None = None):
        self.migration = migration
        self.old = old or Gallery.open(migration.old_gallery_path)
        self.new = new or Gallery.open(migration.new_gallery_path)
        check_model(self.old, compat_model)
        check_model(self.new, new_model)
        self.compat_model, self.new_model = compat_model, new_model
        self.gallery = self.new  # what a service reports as "the" gallery after the cut-over
        self._model_lock = threading.Lock()

    def _encode(self, model: VLPModel, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        with self._model_lock:
            if modality == "image":
                return model.encode_image(list(inputs)).numpy()
            return model.encode_text(list(inputs)).numpy()

    def _search(self, modality: str, inputs: Sequence[Any], k: int) -> list[list[Hit]]:
        new_q = self._encode(self.new_model, modality, inputs)
        if self.migration.cut_over_done:
            return self.new.search(new_q, k, space=self.new_model.space)
        old_q = self._encode(self.compat_model, modality, inputs)
        old_hits = self.old.search(old_q, k, space=self.compat_model.space)
        out = []
        for q, hits in enumerate(old_hits):
            ids = [h.id for h in hits]
            done = self.new.present(ids)
            n_slots = sum(i in done for i in ids)
            new_hits = self.new.search(new_q[q : q + 1], n_slots, space=self.new_model.space)[0] if n_slots else []
            by_id = {h.id: h for h in hits} | {h.id: h for h in new_hits}
            merged = slot_merge(ids, done, [h.id for h in new_hits])
            out.append([by_id[i] for i, _ in merged])
        return out

    def search_texts(self, texts: Sequence[str], k: int) -> list[list[Hit]]:
        return self._search("text", texts, k)

    def search_images(self, images: Sequence[ImageInput], k: int) -> list[list[Hit]]:
        return self._search("image", images, k)

    def add(self, modality: str, ids: Sequence[str], inputs: Sequence[Any], payloads: Sequence[dict[str, Any]],
            on_conflict: OnConflict = "error") -> list[str]:
        if self.new.modality and self.new.modality != modality:
            raise InputError(f"this gallery holds {self.new.modality}s; it cannot store a {modality}")
        new_vecs = self._encode(self.new_model, modality, inputs)
        if self.migration.cut_over_done:
            return self.new.add(new_vecs, ids, payloads, space=self.new_model.space, on_conflict=on_conflict)
        added = self.old.add(self._encode(self.compat_model, modality, inputs), ids, payloads,
                             space=self.compat_model.space, on_conflict=on_conflict)
        added_set = set(added)
        keep = [j for j, i in enumerate(ids) if i in added_set]
        if keep:
            self.new.add(new_vecs[keep], [ids[j] for j in keep], [payloads[j] for j in keep],
                         space=self.new_model.space, on_conflict="replace")
        return added

    def store_media(self, data: bytes, suffix: str) -> Path:
        # before the cut-over, under the old gallery: both galleries' payloads then name one file
        return (self.new if self.migration.cut_over_done else self.old).store_media(data, suffix)

    def delete(self, ids: Sequence[str]) -> int:
        if self.migration.cut_over_done:
            return self.new.delete(ids)
        n = self.old.delete(ids)
        self.new.delete(ids)
        return n

    def info(self) -> dict[str, Any]:
        state = self.migration.state
        return {
            "mode": "cut-over" if self.migration.cut_over_done else "migrating",
            "gallery": self.new.info().to_dict() if self.migration.cut_over_done else self.old.info().to_dict(),
            "new_gallery": self.new.info().to_dict(),
            "model": model_name(self.new_model if self.migration.cut_over_done else self.compat_model),
            "new_model": model_name(self.new_model),
            "migration": {"status": state["status"], "position": state["position"], "plan_size": state["plan_size"]},
        }

    def close(self) -> None:
        self.old.close()
        self.new.close()


# --------------------------------------------------------------------------------------------------
# measuring retrieval quality during a migration
# --------------------------------------------------------------------------------------------------
@dataclass
class BackfillCurve:
    """R@K of the merged search against the fraction of the gallery backfilled."""

    direction: str
    fractions: list[float]
    recall: dict[int, list[Estimate]]
    n_queries: int

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "fractions": self.fractions, "n_queries": self.n_queries,
                "recall": {str(k): [e.to_dict() for e in row] for k, row in self.recall.items()}}


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row, best first (stable among equal scores)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def backfill_curve(
    old_gallery: np.ndarray,
    new_gallery: np.ndarray,
    compat_queries: np.ndarray,
    new_queries: np.ndarray,
    positives: Sequence[Sequence[int]],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    order: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    direction: str = "",
    seed: int = 0,
    n_resamples: int = 1000,
    block: int = 512,
) -> BackfillCurve:
    """R@K of `slot_merge` search when a fraction of the gallery has been backfilled.

    Row i of old_gallery (old model) and new_gallery (new model) is the same item; compat_queries are the
    compatible model's queries (old space), new_queries the new model's; `positives[q]` lists the gallery
    rows that answer query q. `order` is the backfill order (a permutation of the rows; random with
    `seed` by default). Fraction 0 reproduces compat->old retrieval, fraction 1 new->new."""
    old_gallery, new_gallery = np.asarray(old_gallery, np.float32), np.asarray(new_gallery, np.float32)
    compat_queries, new_queries = np.asarray(compat_queries, np.float32), np.asarray(new_queries, np.float32)
    n, n_q = len(old_gallery), len(compat_queries)
    if len(new_gallery) != n or len(new_queries) != n_q or len(positives) != n_q:
        raise InputError("old/new galleries must have the same rows, and compat/new queries and positives the same count")
    if compat_queries.shape[1] != old_gallery.shape[1] or new_queries.shape[1] != new_gallery.shape[1]:
        raise SpaceMismatchError("compat queries must match the old gallery's dimension, new queries the new gallery's")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise InputError("fractions must lie in [0, 1]")
    order = np.random.default_rng(seed).permutation(n) if order is None else np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise InputError("order must be a permutation of the gallery rows")
    rank_in_order = np.empty(n, dtype=np.int64)
    rank_in_order[order] = np.arange(n)
    k_max = max(ks)
    pos_sets = [set(int(i) for i in p) for p in positives]
    hits = {f: {k: np.zeros(n_q) for k in ks} for f in fractions}
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        old_top = _top_k(compat_queries[start:stop] @ old_gallery.T, k_max)
        new_scores = new_queries[start:stop] @ new_gallery.T
        for f in fractions:
            done = rank_in_order < int(round(f * n))
            masked = np.where(done[None, :], new_scores, -np.inf)
            new_top = _top_k(masked, k_max) if done.any() else np.empty((stop - start, 0), np.int64)
            for row in range(stop - start):
                fill = [int(i) for i in new_top[row] if done[i]]
                merged = [i for i, _ in slot_merge([int(i) for i in old_top[row]], _Mask(done), fill)]
                q = start + row
                for k in ks:
                    hits[f][k][q] = float(any(i in pos_sets[q] for i in merged[:k]))
    resamples = bootstrap_indices(n_q, n_resamples, seed)
    recall = {k: [recall_estimate(hits[f][k], resamples) for f in fractions] for k in ks}
    return BackfillCurve(direction, [float(f) for f in fractions], recall, n_q)


class _Mask:
    """`in` over a boolean row mask (for slot_merge on integer rows)."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def __contains__(self, i: object) -> bool:
        return bool(self.mask[int(i)])  # type: ignore[arg-type]


def backfill_curves(old: Any, compat: Any, new: Any, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    seed: int = 0, n_resamples: int = 1000) -> dict[str, BackfillCurve]:
    """Both directions from pair embeddings: `old` and `new` are PairEmbeddings of the old and new models on
    the same pairs, `compat` the compatible model's QueryVectors (old space; e.g. a CompatMethod's
    `transform_embeddings(new)`, or `xbt.eval.runner.model_queries(compatible_model, pairs)`).
    T2I backfills the image gallery, I2T the caption gallery."""
    if list(old.caption_image_index) != list(new.caption_image_index):
        raise InputError("old and new embeddings must come from the same pairs in the same order")
    index = list(old.caption_image_index)
    return {
        "t2i": backfill_curve(old.images, new.images, compat.texts, new.texts, text_to_image_positives(index),
                              fractions, direction="t2i", seed=seed, n_resamples=n_resamples),
        "i2t": backfill_curve(old.texts, new.texts, compat.images, new.images,
                              image_to_text_positives(index, len(old.images)), fractions, direction="i2t", seed=seed,
                              n_resamples=n_resamples),
    }


def format_curves(curves: dict[str, BackfillCurve], k: int = 1) -> str:
    """A plain-text table: fraction backfilled -> R@k per direction."""
    dirs = list(curves)
    lines = ["backfilled  " + "  ".join(f"{d} R@{k:<16}" for d in dirs)]
    for j, f in enumerate(next(iter(curves.values())).fractions):
        lines.append(f"{100 * f:9.0f}%  " + "  ".join(f"{str(curves[d].recall[k][j]):<22}" for d in dirs))
    return "\n".join(lines)

