"""Progressive backfill, the state machine: re-embed an old-space gallery with the new model, in priority
order, resumably, then an atomic cut-over to the new space. Serving while it runs is
`xbt.gallery.migrating.MigratingRetriever`; the offline quality curve is `xbt.eval.backfill_curve`.

A migration lives in one folder::

    migration.json   the state (old gallery, spaces, position in the plan, status), replaced atomically
    plan.jsonl       the ids in backfill order, fixed when the migration starts (by time, id, a payload
                     field, a list, or "benefit": the estimated benefit of re-embedding each item,
                     `xbt.ranking.benefit`, computed once from the old vectors; the state records its choice)
    gallery/         the new-space gallery being filled
    merge_calibration.json   optional: the score calibration the served search merges by
                     (`xbt.ranking.merge.ScoreCalibration`, fitted when the migration starts on
                     pairs the new model was not trained on, for its two spaces); without it the
                     rank-slot rule

Resuming after a kill: the new gallery itself is the ground truth of what is done (each batch is
durable when added); `position` is written after each batch and only lets a restart skip ahead. A batch
re-done after a kill is detected (its ids are present) and skipped, so nothing is embedded twice into
the gallery. Items added to (or deleted from) the old gallery during the backfill are caught by a final
sweep; `MigratingRetriever.add` writes to both galleries so the sweep has little left to do.

Cut-over: once every old item is in the new gallery (plan done, sweep clean), `cut_over` seals the old
gallery (every later add or delete to it is refused, from any process), then compares the two galleries'
ids: an item added to or deleted from the old gallery after the last run (`xbt gallery add --gallery OLD`,
`xbt gallery delete`, an add whose second write was killed) makes it unseal and refuse, until a run sweeps
it. Only when the two agree does it flip the state file's status in one atomic rename; retrievers watching
the migration switch to the new gallery alone.

One process at a time runs a migration (`run`, `cut_over`): each holds an exclusive lock on
`runner.lock` in the migration folder, and a second one is refused with a message that says so.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from xbt.durable import atomic_write_bytes
from xbt.errors import InputError, SpaceMismatchError
from xbt.ranking.merge import ScoreCalibration, slot_merge
from xbt.ranking.benefit import BenefitScorer
from xbt.gallery.base import (
    GalleryBackend,
    gallery_ref,
    gallery_size,
    is_milvus,
    open_gallery,
)
from xbt.gallery.index import IndexConfig
from xbt.gallery.ingest import GalleryItem, embed_items, model_name
from xbt.gallery.media import adopt_media
from xbt.gallery.store import Gallery, is_gallery
from xbt.models.base import EmbeddingSpace, VLPModel
from xbt.progress import progress_bar

__all__ = ["CALIBRATION_NAME", "MIGRATION_FORMAT", "NEW_GALLERY", "ORDERS", "PLAN_NAME", "STATE_NAME", "Migration",
           "order_ids", "parse_order", "slot_merge", "start_migration"]

MIGRATION_FORMAT = "xbt.migration/1"
STATE_NAME = "migration.json"
PLAN_NAME = "plan.jsonl"
NEW_GALLERY = "gallery"
CALIBRATION_NAME = "merge_calibration.json"
LOCK_NAME = "runner.lock"


# --------------------------------------------------------------------------------------------------
# priority order
# --------------------------------------------------------------------------------------------------
ORDERS = ("oldest", "newest", "id", "field:NAME", "-field:NAME", "benefit")


def order_ids(gallery: GalleryBackend, order: str | Sequence[str] = "oldest",
              benefit: BenefitScorer | None = None, batch: int = 4096) -> list[str]:
    """Every id of the gallery in a backfill priority order:

    "oldest" / "newest" (time added), "id" (sorted), "field:NAME" / "-field:NAME" (a payload field,
    ascending / descending; items without it come last), "benefit" (the largest estimated benefit of
    re-embedding first, `xbt.ranking.benefit`: needs `benefit`, a scorer fitted on training pairs for the
    gallery's space; it reads the gallery's old vectors, never the new model's), or a list of ids that go
    first (then the rest, oldest first)."""
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
    if order == "benefit":
        return _benefit_order(gallery, [i for i, _, _ in items], benefit, batch)
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
    raise InputError(f"unknown order {order!r}: use oldest, newest, id, field:NAME, -field:NAME, benefit or a list of ids")


def parse_order(order: str) -> str | list[str]:
    """A priority order as typed: a name (`order_ids`), or @FILE of ids (one a line) that go first."""
    if order.startswith("@"):
        path = Path(order[1:]).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise InputError(f"cannot read the priority ids {order}: {exc.strerror or exc}") from exc
        return [line.strip() for line in text.splitlines() if line.strip()]
    return order


def _benefit_order(gallery: GalleryBackend, ids: list[str], scorer: BenefitScorer | None, batch: int) -> list[str]:
    if scorer is None:
        raise InputError("the benefit order needs a benefit scorer fitted on training pairs: on the command line give"
                         " --compat (the compatible model), --old-model and --fit-pairs; in Python pass"
                         " benefit=xbt.ranking.benefit.fit_benefit_pairs(...)")
    if scorer.space_id is not None and scorer.space_id != gallery.space.id:
        raise SpaceMismatchError(f"the benefit scorer was fitted in space {scorer.space_id}, the gallery at"
                                 f" {gallery.path} holds space {gallery.space.id}: fit it with the gallery's own model")
    if not ids:
        return []
    vectors = np.empty((len(ids), gallery.space.dim), dtype=np.float32)
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        stored = gallery.get(chunk, with_vectors=True)
        lost = [i for i in chunk if i not in stored]
        if lost:
            raise InputError(f"{len(lost)} item(s) vanished from the gallery while its order was computed (e.g."
                             f" {lost[0]!r}); start the backfill again")
        vectors[start : start + len(chunk)] = np.stack([stored[i]["vector"] for i in chunk])
    return [ids[int(r)] for r in scorer.order(vectors)]


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
        self._calibration: tuple[ScoreCalibration | None] | None = None
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
    def old_gallery_ref(self) -> str:
        """The old gallery (a folder, or the physical Milvus collection: `xbt.gallery.base.open_gallery`)."""
        return str(self.state["old_gallery"])

    @property
    def new_gallery_ref(self) -> str:
        """The new gallery: `gallery/` in the migration folder, or a second Milvus collection."""
        return str(self.state.get("new_gallery") or self.path / NEW_GALLERY)

    def _folder(self, ref: str) -> Path:
        if is_milvus(ref):
            raise InputError(f"the migration at {self.path} runs on Milvus ({ref}); this tool (e.g. the Ray engine)"
                             " works on embedded galleries only: run the backfill with the local engine")
        return Path(ref)

    @property
    def old_gallery_path(self) -> Path:
        """The old gallery's folder (embedded galleries only; see `old_gallery_ref`)."""
        return self._folder(self.old_gallery_ref)

    @property
    def new_gallery_path(self) -> Path:
        """The new gallery's folder (embedded galleries only; see `new_gallery_ref`)."""
        return self._folder(self.new_gallery_ref)

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

    @property
    def merge(self) -> str:
        """The rule the served search merges by: "score" (the migration holds a calibration) or "slot"."""
        return str(self.state.get("merge", "slot"))

    @property
    def merge_calibration(self) -> ScoreCalibration | None:
        """The score calibration of a "score" migration (checked against its two spaces), else None."""
        if self._calibration is None:
            calibration = None
            if self.merge == "score":
                path = self.path / CALIBRATION_NAME
                if not path.is_file():
                    raise InputError(f"the migration at {self.path} merges by calibrated score but its {CALIBRATION_NAME}"
                                     " is missing")
                calibration = ScoreCalibration.from_dict(json.loads(path.read_text()))
                calibration.check(self.old_space.id, self.new_space.id, f"the migration at {self.path}")
            self._calibration = (calibration,)
        return self._calibration[0]

    def plan(self) -> list[str]:
        if self._plan is None:
            with (self.path / PLAN_NAME).open() as f:
                self._plan = [json.loads(line) for line in f if line.strip()]
        return self._plan

    @classmethod
    def start(
        cls,
        path: str | Path,
        old_gallery: GalleryBackend,
        new_space: EmbeddingSpace,
        order: str | Sequence[str] = "oldest",
        index: IndexConfig | None = None,
        benefit: BenefitScorer | None = None,
        calibration: ScoreCalibration | None = None,
    ) -> Migration:
        """Fix the plan (priority order over the old gallery's ids) and create the empty new gallery: in the
        migration folder, or for a Milvus gallery a second collection (the cut-over then moves its alias).
        `benefit`: the scorer of order "benefit" (`order_ids`); what it chose is recorded in the state.
        `calibration`: the served search merges by calibrated score with it (fitted for the gallery's space
        and `new_space` on pairs the new model was not trained on:
        `xbt.ranking.merge.fit_score_calibration_pairs`; refused for other spaces or another query
        modality); without it, by the rank-slot rule (docs/results/backfill-order-testbed.md measures both)."""
        path = Path(path).expanduser()
        if (path / STATE_NAME).exists():
            raise InputError(f"{path} already holds a migration; resume it (Migration(path).run) or choose another folder")
        if new_space.fingerprint == old_gallery.space.fingerprint and new_space.dim == old_gallery.space.dim:
            raise InputError("the new model emits the gallery's own space: there is nothing to backfill")
        if old_gallery.modality not in ("image", "text"):
            raise InputError(f"the gallery at {old_gallery.path} has no modality, so its items cannot be re-embedded")
        if calibration is not None:
            calibration.check(old_gallery.space.id, new_space.id, f"a migration of {old_gallery.path}")
            wanted = "text" if old_gallery.modality == "image" else "image"
            if calibration.query_modality and calibration.query_modality != wanted:
                raise InputError(f"the merge calibration was fitted for {calibration.query_modality} queries; a"
                                 f" {old_gallery.modality} gallery is searched by {wanted}s: fit it on its own modality")
        path.mkdir(parents=True, exist_ok=True)
        if calibration is not None:  # before the state: a migration whose state names it always has it
            _write_json_atomic(path / CALIBRATION_NAME, calibration.to_dict())
        plan = order_ids(old_gallery, order, benefit)
        atomic_write_bytes(path / PLAN_NAME, "".join(json.dumps(i) + "\n" for i in plan).encode())
        extra = {"backfill_of": str(old_gallery.path), "old_space": old_gallery.space.id}
        placed: dict[str, str] = {}
        successor = getattr(old_gallery, "create_successor", None)
        if successor is not None:  # Milvus: a second collection (one left by a killed start is emptied)
            placed = {"new_gallery": successor(new_space, index, extra), "serve_as": str(old_gallery.path)}
        else:
            if is_gallery(path / NEW_GALLERY):  # a start killed after creating it: begin it again, empty
                import shutil

                shutil.rmtree(path / NEW_GALLERY)
            Gallery.create(path / NEW_GALLERY, new_space, index or old_gallery.index_config, old_gallery.modality,
                           extra=extra).close()
        _write_json_atomic(path / STATE_NAME, {
            **placed, "format": MIGRATION_FORMAT, "old_gallery": gallery_ref(old_gallery),
            "old_space": old_gallery.space.to_dict(), "new_space": new_space.to_dict(),
            "order": order if isinstance(order, str) else "ids", "plan_size": len(plan), "position": 0,
            **({"benefit": benefit.describe()} if order == "benefit" and benefit is not None else {}),
            "merge": "slot" if calibration is None else "score",
            "status": "backfilling", "failed": {}, "started_at": time.time(), "updated_at": time.time(),
        })
        return cls(path)

    # ---- the work --------------------------------------------------------------------------------
    @contextmanager
    def _runner(self) -> Iterator[None]:
        """The one runner of this migration: an exclusive, non-blocking lock on runner.lock (released by the
        kernel when the process dies, so a killed runner never blocks the next)."""
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"another process is running the migration at {self.path} (a backfill or a cut-over);"
                                 " wait for it to finish, or stop it, then run this again") from None
            yield
        finally:
            os.close(fd)

    def _seal_reason(self) -> str:
        return (f"cut over to the new space ({self.new_space.id}) by the migration at {self.path}; add to and delete"
                f" from {self.new_gallery_ref} instead")

    def _galleries(self, old: GalleryBackend | None,
                   new: GalleryBackend | None) -> tuple[GalleryBackend, GalleryBackend, list[GalleryBackend]]:
        """The two galleries (those not given are opened) and the ones opened here, for the caller to close."""
        owned = []
        if old is None:
            old = open_gallery(self.old_gallery_ref)
            owned.append(old)
        if new is None:
            new = open_gallery(self.new_gallery_ref)
            owned.append(new)
        try:
            self.old_space.check(old.space, f"the gallery at {old.path}")
            self.new_space.check(new.space, f"the gallery at {new.path}")
        except BaseException:
            for gallery in owned:
                gallery.close()
            raise
        return old, new, owned

    def run(
        self,
        new_model: VLPModel,
        *,
        batch_size: int = 64,
        max_items: int | None = None,
        old: GalleryBackend | None = None,
        new: GalleryBackend | None = None,
        show_progress: bool = False,
    ) -> dict[str, Any]:
        """Backfill from the saved position (at most `max_items` more items, e.g. to spread the work), then
        sweep up what changed in the old gallery meanwhile. Returns `progress()`."""
        if self.cut_over_done:
            return self.progress()
        self.new_space.check(new_model.space, f"the vectors of the new model {model_name(new_model)!r}")
        with self._runner():
            return self._run(new_model, batch_size, max_items, old, new, show_progress)

    def _run(self, new_model: VLPModel, batch_size: int, max_items: int | None, old: GalleryBackend | None,
             new: GalleryBackend | None, show_progress: bool) -> dict[str, Any]:
        if self.cut_over_done:  # another runner cut over while this one waited
            return self.progress()
        old, new, owned = self._galleries(old, new)
        try:
            if old.sealed == self._seal_reason():  # a cut-over killed between its seal and its verdict
                old.unseal()
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
            for gallery in owned:
                gallery.close()
        return self.progress()

    def _backfill_batch(self, ids: Sequence[str], old: GalleryBackend, new: GalleryBackend, model: VLPModel,
                        batch_size: int, failed: dict[str, str]) -> int:
        present = new.present(ids)
        todo = [i for i in ids if i not in present and i not in failed]
        stored = old.get(todo)  # ids deleted from the old gallery meanwhile are simply gone
        items = [GalleryItem(i, stored[i]["payload"]) for i in todo if i in stored]
        good, vectors, bad = embed_items(model, items, new.modality or "image", batch_size)
        failed.update(bad)
        if good:  # the images an item names under the old gallery's media/ follow it into the new gallery's
            new.add(vectors, [it.id for it in good], adopt_media([it.payload for it in good], old, new), space=model.space,
                    on_conflict="skip")
        return len(items)

    def _sweep(self, old: GalleryBackend, new: GalleryBackend, model: VLPModel, batch_size: int, failed: dict[str, str]) -> None:
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
        old_n = gallery_size(self.old_gallery_ref)
        new_n = gallery_size(self.new_gallery_ref) or 0
        return {
            "status": state["status"], "position": state["position"], "plan_size": state["plan_size"],
            "old_size": old_n, "new_size": new_n, "failed": len(state.get("failed", {})),
            "fraction": (new_n / old_n) if old_n else 1.0, "old_space": self.old_space.id, "new_space": self.new_space.id,
        }

    def cut_over(self, force: bool = False, old: GalleryBackend | None = None,
                 new: GalleryBackend | None = None) -> dict[str, Any]:
        """Switch serving to the new space, atomically. Refused until the backfill is complete, unless
        `force` (items that could not be re-embedded then leave the served gallery); refused, too, while
        the old gallery holds items the new one lacks or the other way round (changed since the last run)."""
        if self.cut_over_done:
            return self.progress()
        with self._runner():
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
            old, new, owned = self._galleries(old, new)
            try:
                self._verdict(old, new, force)
            finally:
                for gallery in owned:
                    gallery.close()
            self._save(status="cut-over", cut_over_at=time.time())
        return self.progress()

    def _verdict(self, old: GalleryBackend, new: GalleryBackend, force: bool) -> None:
        """Seal the old gallery, then check that the new one holds exactly its items (less those that could
        not be re-embedded, when forced); unseal and refuse otherwise. Then move a Milvus alias."""
        old.seal(self._seal_reason())
        old_ids, new_ids = set(old.ids()), set(new.ids())
        failed = {i for i in self.state.get("failed", {}) if i in old_ids} if force else set()
        missing, extra = old_ids - new_ids - failed, new_ids - old_ids
        if missing or extra:
            old.unseal()
            self._save(status="backfilling")
            changed = []
            if missing:
                changed.append(f"{len(missing)} item(s) of the old gallery are not in the new one (e.g. {min(missing)!r})")
            if extra:
                changed.append(f"{len(extra)} item(s) of the new gallery are no longer in the old one (e.g. {min(extra)!r})")
            raise InputError(f"the old gallery changed after the last backfill run: {'; '.join(changed)}. Run the"
                             f" backfill again (`xbt gallery backfill --state {self.path}`: it sweeps them), then cut over")
        if self.state.get("serve_as"):  # Milvus: move the served name to the new collection first (idempotent),
            new.serve_as(self.state["serve_as"])  # type: ignore[attr-defined]  # so a kill before the save only repeats it


def start_migration(path: str | Path, old_gallery: GalleryBackend, new_model: VLPModel, order: str | Sequence[str] = "oldest",
                    *, load: Callable[[str], VLPModel], compat: str | None = None, old_model: str | None = None,
                    fit_pairs: str | None = None, calibrate_pairs: str | None = None,
                    log: Callable[[str], None] | None = None) -> Migration:
    """`Migration.start` with what `xbt gallery backfill` fits first from the models (specs, which `load` turns
    into models): the score merge's calibration on the pair source `calibrate_pairs` (needs `compat`, the
    compatible model, and `old_model`, the gallery's own), and for `order="benefit"` the benefit scorer on the
    training pair source `fit_pairs` (under that calibration when there is one). Fit reports go to `log`."""
    from xbt.data.datasets import open_dataset
    from xbt.gallery.fits import fit_benefit, fit_merge_calibration

    modality = old_gallery.modality or "image"
    scorer = calibration = None
    if calibrate_pairs:
        missing = [f for f, v in (("--compat", compat), ("--old-model", old_model)) if not v]
        if missing:
            raise InputError(f"the score merge is calibrated with the models the migration serves by: give"
                             f" {' and '.join(missing)}")
        calibration = fit_merge_calibration(load(str(old_model)), new_model, load(str(compat)), open_dataset(calibrate_pairs),
                                            modality, calibrate_pairs, compat or "", log)
    if order == "benefit":
        missing = [flag for flag, value in (("--compat", compat), ("--old-model", old_model), ("--fit-pairs", fit_pairs))
                   if not value]
        if missing:
            raise InputError(f"the benefit order is estimated from training pairs: give {', '.join(missing)}"
                             " (the compatible model, the gallery's own model and the training pairs)")
        old, compatible = load(str(old_model)), load(str(compat))
        scorer = fit_benefit(old, new_model, compatible, open_dataset(str(fit_pairs)), modality, calibration=calibration,
                             compat_name=compat or "", log=log)
    return Migration.start(path, old_gallery, new_model.space, order, benefit=scorer, calibration=calibration)
