"""Peer fits reused by content (run_evaluation(fit_cache=...)): a second run fits nothing and reports the
same matrix; other data or options refit; a torn or edited entry is refitted, never read as a hit."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from test_eval_runner import ToyModel, toy_items
from xbt.compat import fit_cache
from xbt.compat.adapter import ResidualAdapter
from xbt.compat.affine import AffineMap
from xbt.compat.base import CompatMethod
from xbt.compat.maps import LinearMap
from xbt.compat.model import CONFIG_NAME, MAP_NAME
from xbt.compat.gallery_modality import GalleryModality
from xbt.compat.procrustes import Procrustes
from xbt.compat.registry import PEER_METHODS
from xbt.compat.slerp import Slerp
from xbt.eval import runner
from xbt.eval.runner import json_safe, run_evaluation

OPTIONS = {"adapter": {"epochs": 3, "hidden": 16}, "adapter-gallery": {"epochs": 3, "hidden": 16}}  # tiny adapters
# every peer's fit() lives here
FIT_CLASSES = (CompatMethod, Procrustes, AffineMap, ResidualAdapter, Slerp, GalleryModality)


@pytest.fixture(autouse=True)
def quick_costs(monkeypatch):
    """Query costs are measured on every run, reused or not, and are not what these tests check: the
    fewest timed calls, not a time budget."""
    timed = runner.time_per_query_us
    monkeypatch.setattr(runner, "time_per_query_us", lambda fn, batch_size: timed(fn, batch_size, budget_s=0.0))


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    latents, pairs = toy_items(tmp_path, 60, seed=3, two_captions=False)
    old, new = ToyModel(latents, 8, seed=1, name="toy-old"), ToyModel(latents, 12, seed=2, name="toy-new")
    return old, new, pairs[:25], pairs[25:45], pairs[45:]


def evaluate(world, cache, fit_pairs=None, options=OPTIONS):
    old, new, eval_pairs, train, support = world
    return run_evaluation(old, new, eval_pairs, list(PEER_METHODS), fit_texts=[p.caption for p in train],
                          fit_pairs=train if fit_pairs is None else fit_pairs, support_pairs=support, ks=(1, 5),
                          n_resamples=50, method_options=options, fit_cache=cache)


def matrix_of(run) -> str:
    """The matrix's estimates, exactly (the method records, with their measured costs, aside)."""
    matrix = run.matrix.to_dict()
    matrix.pop("method_info", None)
    return json.dumps(json_safe(matrix), sort_keys=True)


def forbid_fitting(monkeypatch) -> None:
    def fit(self, data):
        raise AssertionError(f"{self.name} was fitted although its fit is in the cache")

    for cls in FIT_CLASSES:
        monkeypatch.setattr(cls, "fit", fit)


def count_adapter_fits(monkeypatch) -> list[int]:
    calls, real = [], ResidualAdapter.fit

    def fit(self, data):
        calls.append(1)
        return real(self, data)

    monkeypatch.setattr(ResidualAdapter, "fit", fit)
    return calls


def test_a_second_run_reuses_every_peer_and_reports_the_same_matrix(world, tmp_path, monkeypatch):
    cache = tmp_path / "peers"
    fresh = evaluate(world, None)
    first = evaluate(world, cache)
    assert not any(r.fit_reused for r in first.methods.values())
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == len(PEER_METHODS)
    assert matrix_of(first) == matrix_of(fresh)  # storing changes nothing

    forbid_fitting(monkeypatch)
    second = evaluate(world, cache)
    assert set(second.methods) == set(PEER_METHODS)
    for name, record in second.methods.items():
        assert record.fit_reused and record.kind == "peer"
        assert record.fit_seconds == first.methods[name].fit_seconds  # the original fit's time, not the load's
        assert record.fits_on == first.methods[name].fits_on and record.details == first.methods[name].details
        np.testing.assert_array_equal(second.queries[name].texts, first.queries[name].texts)
        np.testing.assert_array_equal(second.queries[name].images, first.queries[name].images)
    assert first.methods["adapter"].fit_seconds > 0
    assert matrix_of(second) == matrix_of(first)
    assert second.warnings == []
    # The reused models are the deployable models a fresh fit gives: no name pointing into the cache.
    assert all(m.spec == "" for m in second.compatible.values())
    assert second.compatible["slerp"].old_model is world[0]
    results = second.to_results()
    assert results["methods"]["adapter"]["fit_reused"] is True
    assert results["methods"]["adapter"]["fit_seconds"] == first.methods["adapter"].fit_seconds
    assert not any(r.fit_reused for r in fresh.methods.values())  # without a cache every peer is fitted


def test_other_fit_data_or_other_options_refit(world, tmp_path, monkeypatch):
    cache = tmp_path / "peers"
    evaluate(world, cache)
    calls = count_adapter_fits(monkeypatch)
    train = world[3]
    fewer = evaluate(world, cache, fit_pairs=train[:-1])  # one training pair less
    # adapter once, adapter-gallery twice (a residual adapter per query tower)
    assert not any(r.fit_reused for r in fewer.methods.values()) and len(calls) == 3

    calls.clear()
    longer = evaluate(world, cache, options=OPTIONS | {"adapter": {"epochs": 4, "hidden": 16}})
    assert len(calls) == 1 and not longer.methods["adapter"].fit_reused
    assert all(r.fit_reused for n, r in longer.methods.items() if n != "adapter")
    assert longer.methods["adapter"].details["epochs"] == 4

    calls.clear()
    again = evaluate(world, cache)  # the first data and options: still cached beside the others
    assert calls == [] and all(r.fit_reused for r in again.methods.values())


def test_a_torn_or_edited_entry_is_refitted_and_replaced(world, tmp_path, monkeypatch):
    cache = tmp_path / "peers"
    first = evaluate(world, cache)
    entries = {p.name.rsplit("-", 1)[0]: p for p in cache.iterdir()}
    (entries["adapter"] / MAP_NAME).write_bytes(b"not safetensors")  # weights no longer match the config
    (entries["affine"] / CONFIG_NAME).write_text("{ torn")  # a config cut short
    (entries["slerp"] / CONFIG_NAME).unlink()  # weights without a config: what an interrupted write looks like
    # A killed run's temporary folder, complete but never renamed into place, is not an entry.
    (cache / f".tmp-{entries['procrustes-text'].name}-1-x").mkdir()

    second = evaluate(world, cache)
    damaged = {"adapter", "affine", "slerp"}
    assert {n for n, r in second.methods.items() if not r.fit_reused} == damaged
    assert sorted(w.split("cached fit of ")[1].split(" ")[0] for w in second.warnings) == sorted(damaged)
    assert matrix_of(second) == matrix_of(first)

    forbid_fitting(monkeypatch)
    third = evaluate(world, cache)  # the refits were stored in place of the damaged entries
    assert all(r.fit_reused for r in third.methods.values()) and third.warnings == []


def test_a_peer_whose_settings_have_no_digest_is_fitted_every_time(world, tmp_path):
    old, new, eval_pairs, train, support = world

    class Scaled(CompatMethod):
        name = "scaled"

        def __init__(self, new_space, old_space):
            super().__init__(new_space, old_space)
            self.scale = lambda x: 2 * x  # a function: no stable digest

        def to_map(self):
            return LinearMap.from_arrays(self.scale(np.eye(new.dim, old.dim, dtype=np.float32)))

    cache = tmp_path / "peers"
    for _ in range(2):
        run = run_evaluation(old, new, eval_pairs, [Scaled(new.space, old.space)], fit_texts=[p.caption for p in train],
                             ks=(1,), n_resamples=10, fit_cache=cache)
        assert not run.methods["scaled"].fit_reused
    assert list(cache.iterdir()) == []


def test_a_run_killed_while_storing_leaves_no_entry_that_reads_as_a_hit(world, tmp_path, monkeypatch):
    cache = tmp_path / "peers"
    real_fsync = fit_cache.fsync_path

    def killed(path):
        if path.name.startswith(".tmp-adapter-"):  # every file written, not yet renamed into place
            raise KeyboardInterrupt
        real_fsync(path)

    with pytest.MonkeyPatch.context() as kill:  # as SIGKILL would: no clean-up runs either
        kill.setattr(fit_cache, "fsync_path", killed)
        kill.setattr(fit_cache.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt):
            evaluate(world, cache)
    leftover = [p for p in cache.iterdir() if p.name.startswith(".tmp-adapter-")]
    assert len(leftover) == 1 and (leftover[0] / CONFIG_NAME).exists()  # complete, but under no key

    calls = count_adapter_fits(monkeypatch)
    run = evaluate(world, cache)
    # the adapter again, and adapter-gallery's two halves (the killed run stopped before fitting it)
    assert len(calls) == 3 and not run.methods["adapter"].fit_reused
    assert all(r.fit_reused for n, r in run.methods.items() if n in ("no-adaptation", "procrustes-text"))
    assert leftover[0].exists()  # recent: it may be another run's write in progress
    stale = time.time() - 2 * 3600
    os.utime(leftover[0], (stale, stale))
    evaluate(world, cache, options=OPTIONS | {"adapter": {"epochs": 2, "hidden": 16}})  # the next store clears it
    assert not leftover[0].exists()
