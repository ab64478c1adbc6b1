"""Gallery extras (`xbt evaluate --gallery-extra`): items every system's galleries hold, never queries."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from xbt.data.distractors import GalleryExtra, load_gallery_extra, merge_extras, normalise_text, wordnet_glosses
from xbt.errors import SpaceMismatchError
from xbt.embed import ExtraEmbeddings, embed_extras
from xbt.eval.matrix import system_hits, system_hits_at_sizes
from xbt.metrics import (
    best_positive_rank,
    best_positive_rank_with_extras,
    hits_at_k,
    near_duplicates,
)
from xbt.eval.runner import run_evaluation
from tests.test_eval_runner import ToyModel, toy_items, toy_world


def test_ranks_with_extras_equal_ranks_in_the_concatenated_gallery_at_every_size():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(60, 8)).astype(np.float32)
    g = rng.normal(size=(25, 8)).astype(np.float32)
    e = rng.normal(size=(700, 8)).astype(np.float32)
    e[3] = g[5]  # an extra tied with a positive counts against the query (as a tied negative does)
    positives = [[i % 25, (i + 7) % 25] if i % 4 == 0 else [i % 25] for i in range(60)]
    got = best_positive_rank_with_extras(q, g, positives, e, [0, 10, 333, 700], block=7, max_score_elements=500)
    for n in (0, 10, 333, 700):
        want = best_positive_rank(q, np.concatenate([g, e[:n]]), positives)
        np.testing.assert_array_equal(got[n], want)
    with pytest.raises(ValueError):
        best_positive_rank_with_extras(q, g, positives, e, [701])
    with pytest.raises(ValueError):
        best_positive_rank_with_extras(q, g, positives, e[:, :4], [1])


def test_near_duplicates_flags_copies_of_references():
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(30, 16)).astype(np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    items = rng.normal(size=(200, 16)).astype(np.float32)
    items[[4, 90]] = refs[[2, 17]]
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    check = near_duplicates(items, refs, 0.999, max_score_elements=64)
    assert check["n_at_or_above"] == 2
    assert [(f["item"], f["reference"]) for f in check["flagged"]] == [(4, 2), (90, 17)]


@pytest.fixture()
def extras_world(tmp_path, monkeypatch):
    old, new, eval_pairs, train, support, latents = toy_world(tmp_path, monkeypatch)
    extra_folder = tmp_path / "extras"
    extra_folder.mkdir()
    more, extra_pairs = toy_items(extra_folder, 60, seed=5, two_captions=False)
    latents.update({"extra " + caption: z for caption, z in more.items()})  # the toy text tower looks captions up
    extra = GalleryExtra([p.image for p in extra_pairs[:50]], ["extra " + p.caption for p in extra_pairs[10:]], "toy extras")
    return old, new, eval_pairs, train, support, latents, extra


def test_extras_join_every_gallery_and_never_become_queries(extras_world):
    old, new, eval_pairs, train, support, latents, extra = extras_world
    corpus = [t for t in latents if t.startswith("item") and int(t.split()[1]) >= 40]  # no extra is fitted on
    kwargs = dict(fit_texts=corpus, fit_pairs=train, support_pairs=support, ks=(1, 5), n_resamples=50)
    methods = ["no-adaptation", "procrustes-both", "slerp", "affine"]
    plain = run_evaluation(old, new, eval_pairs, methods, **kwargs)
    run = run_evaluation(old, new, eval_pairs, methods, gallery_extra=extra, **kwargs)
    # No extra is a query: the query counts are the evaluation set's, with or without extras.
    assert run.matrix.n_queries == plain.matrix.n_queries == {"t2i": len(eval_pairs), "i2t": 40}
    for name in methods:
        assert run.queries[name].images.shape[0] == 40 and run.queries[name].texts.shape[0] == len(eval_pairs)
    # The same items, embedded by each model, sit in every gallery: the ceiling's and every method's.
    assert run.extras["old"].sizes == run.extras["new"].sizes == {"images": 50, "texts": 50}
    assert run.extras["old"].space == old.space and run.extras["new"].space == new.space
    results = run.to_results()
    assert results["protocol"]["gallery_images"] == 40 + 50 and results["protocol"]["gallery_texts"] == len(eval_pairs) + 50
    assert results["data"]["gallery_extra"]["n_images"] == 50
    json.dumps(results, allow_nan=False)
    old_e, new_e = run.embeddings["old"], run.embeddings["new"]
    index = old_e.caption_image_index

    def recalls(image_q, text_q, images, texts):
        """Plain exact search in the concatenated galleries (evaluation items first, then the extras)."""
        t2i = [[int(i)] for i in index]
        i2t = [[c for c, i in enumerate(index) if i == image] for image in range(len(image_q))]
        ranks = {"t2i": best_positive_rank(text_q, images, t2i), "i2t": best_positive_rank(image_q, texts, i2t)}
        return {d: hits_at_k(r, (1, 5)) for d, r in ranks.items()}

    def cat(a, b):
        return np.concatenate([a, b])

    hits = system_hits(old_e, new_e, run.queries, (1, 5), run.extras["old"], run.extras["new"])
    want_new = recalls(new_e.images, new_e.texts, cat(new_e.images, run.extras["new"].images), cat(new_e.texts, run.extras["new"].texts))
    want_old = recalls(old_e.images, old_e.texts, cat(old_e.images, run.extras["old"].images), cat(old_e.texts, run.extras["old"].texts))
    for d in ("t2i", "i2t"):
        np.testing.assert_array_equal(hits["new"][d][5], want_new[d][5])
        np.testing.assert_array_equal(hits["old"][d][5], want_old[d][5])
        for name in methods:
            q = run.queries[name]
            want = recalls(q.images, q.texts, cat(old_e.images, run.extras["old"].images), cat(old_e.texts, run.extras["old"].texts))
            np.testing.assert_array_equal(hits["method:" + name][d][5], want[d][5])
            # more items to lose a rank to: no query does better
            assert (hits["method:" + name][d][5] <= system_hits(old_e, new_e, run.queries, (1, 5))["method:" + name][d][5]).all()
    # The matrix of the run is the one on the galleries with extras.
    assert run.matrix.old_old["t2i"][5].value == pytest.approx(100 * want_old["t2i"][5].mean())


def test_sizes_are_nested_prefixes_and_the_calibrated_search_biases_the_extras(extras_world):
    old, new, eval_pairs, train, support, latents, extra = extras_world
    from xbt.eval.calibrated import add_calibrated

    run = run_evaluation(old, new, eval_pairs, ["procrustes-both"], fit_pairs=train, support_pairs=support, ks=(1, 5),
                         n_resamples=20, gallery_extra=extra)
    add_calibrated(run, old, new, bank_pairs=train, val_pairs=support)
    bias = run.queries["procrustes-both+nnn"].gallery_bias
    assert bias is not None and bias.extra_images is not None and len(bias.extra_images) == 50 and len(bias.extra_texts) == 50
    old_e, new_e = run.embeddings["old"], run.embeddings["new"]
    sizes = [(0, 0), (20, 7), (50, 50)]
    by_size = system_hits_at_sizes(old_e, new_e, run.queries, (1, 5), run.extras["old"], run.extras["new"], sizes)
    for (a, b), table in zip(sizes, by_size):
        cut_old = replace(run.extras["old"], images=run.extras["old"].images[:a], texts=run.extras["old"].texts[:b])
        cut_new = replace(run.extras["new"], images=run.extras["new"].images[:a], texts=run.extras["new"].texts[:b])
        queries = dict(run.queries)
        q = queries["procrustes-both+nnn"]
        queries["procrustes-both+nnn"] = replace(q, gallery_bias=replace(bias, extra_images=bias.extra_images[:a],
                                                                         extra_texts=bias.extra_texts[:b]))
        want = system_hits(old_e, new_e, queries, (1, 5), cut_old, cut_new)
        for s in want:
            for d in ("t2i", "i2t"):
                np.testing.assert_array_equal(table[s][d][1], want[s][d][1])
    # A calibrated method cannot search extras that carry no bias.
    queries = dict(run.queries)
    queries["procrustes-both+nnn"] = replace(queries["procrustes-both+nnn"], gallery_bias=replace(bias, extra_images=None))
    with pytest.raises(ValueError, match="without their bias"):
        system_hits(old_e, new_e, queries, (1,), run.extras["old"], run.extras["new"])


def test_extras_of_another_space_or_dimension_are_refused(extras_world):
    old, new, eval_pairs, train, support, latents, extra = extras_world
    from xbt.embed import embed_pairs

    old_e, new_e = embed_pairs(old, eval_pairs), embed_pairs(new, eval_pairs)
    old_x, new_x = embed_extras(old, extra), embed_extras(new, extra)
    impostor = ToyModel(latents, 8, seed=9, name="toy-impostor")  # the old model's dimension, other weights
    same_dim_other_space = embed_extras(impostor, extra)
    with pytest.raises(SpaceMismatchError, match="same dimension"):
        system_hits(old_e, new_e, {}, (1,), same_dim_other_space, new_x)
    with pytest.raises(SpaceMismatchError):  # the new model's extras given for the old gallery (12-d vs 8-d)
        system_hits(old_e, new_e, {}, (1,), new_x, new_x)
    with pytest.raises(SpaceMismatchError, match="dimension"):  # stamped with the old space, but the wrong shape
        system_hits(old_e, new_e, {}, (1,), ExtraEmbeddings(new_x.images, old_x.texts, old.space), new_x)
    with pytest.raises(ValueError, match="both"):  # extras for one side only: the systems would search different galleries
        system_hits(old_e, new_e, {}, (1,), old_x, None)
    with pytest.raises(ValueError, match="same gallery"):
        system_hits(old_e, new_e, {}, (1,), old_x, replace(new_x, images=new_x.images[:3]))


def test_gallery_extra_sources(tmp_path):
    texts = tmp_path / "captions.txt"
    texts.write_text("a red apple\n\na red apple\na blue car\n")
    got = load_gallery_extra(str(texts))
    assert got.texts == ["a red apple", "a blue car"] and got.images == []
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "notes.md"):
        (folder / name).write_bytes(b"x")
    got_images = load_gallery_extra(str(folder))
    assert [p.rsplit("/", 1)[-1] for p in got_images.images] == ["a.png", "b.jpg"] and got_images.texts == []
    merged = merge_extras([got, got_images, got])
    assert len(merged.texts) == 2 and len(merged.images) == 2
    assert normalise_text("A Red-Apple!") == normalise_text("a red apple")


def test_wordnet_glosses_are_caption_like(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        "00001740 03 n 01 entity 0 003 | that which is perceived or known or inferred to have its own distinct existence\n"
        "00002137 03 n 02 abstraction 0 | a general concept formed by extracting common features; \"a thing\"\n"
        "00002452 03 n 01 thing 0 | an entity (object)\n"
        "00002453 03 n 01 two 0 | a set of 2 things\n"
        "00002454 03 n 01 dup 0 | A general concept formed by extracting common features\n")
    assert wordnet_glosses(tmp_path) == ["That which is perceived or known or inferred to have its own distinct existence",
                                         "A general concept formed by extracting common features"]


@pytest.mark.slow
def test_the_testbed_distractor_set_is_large_and_disjoint_from_the_testbed():
    """The real set (Debian openclipart-svg, papirus-icon-theme, wordnet-base; installed by ./run.sh's set-up)."""
    from xbt.data.distractors import sha256_file, testbed_distractors
    from xbt.data.folds import testbed_folds
    from xbt.data.testbed import load_text_corpus, testbed_items

    extra = testbed_distractors()
    assert len(extra.images) >= 10_000 and len(extra.texts) >= 10_000
    assert len(set(extra.images)) == len(extra.images) and len(set(extra.texts)) == len(extra.texts)
    groups, clip = testbed_items(show_progress=False)
    items = [p for pairs in groups.values() for p in pairs] + clip
    used_files = {sha256_file(p.image) for p in items}
    assert not used_files & {sha256_file(p) for p in extra.images[:2000]}  # the build checked all; a sample here
    captions = {normalise_text(p.caption) for p in items} | {normalise_text(t) for t in load_text_corpus()}
    for fold in testbed_folds(5, 0):
        captions |= {normalise_text(t) for t in fold.text_corpus}
        assert not {p.image for p in fold.vlp_old} & set(extra.images)
    assert not captions & {normalise_text(t) for t in extra.texts}
    assert not any("emoji" in p or "tuxpaint" in p for p in extra.images)


def test_the_cross_validation_pools_every_gallery_size_and_reports_it(tmp_path, monkeypatch):
    """run_crossval over synthetic folds searched at three gallery sizes: a matrix, a seed spread and the
    paired differences per size, the headline at the largest, and the report's section and figure."""
    from types import SimpleNamespace

    from xbt.eval import crossval
    from xbt.eval.report import write_report

    ks, n = (1, 5), 30
    rng = np.random.default_rng(0)
    extra = GalleryExtra([f"x{i}.png" for i in range(40)], [f"t{i}" for i in range(40)], "toy extras")
    monkeypatch.setattr(crossval, "load_extras", lambda cfg: extra)
    monkeypatch.setattr(crossval, "testbed_folds", lambda k, seed: [SimpleNamespace(index=i) for i in range(k)])
    labels = ("fold", "size1", "full")

    def fake_fold(cfg, fold, out, show_progress=False):
        ids = [f"q{fold.index}-{i}" for i in range(n)]
        hits = {}
        for j, label in enumerate(labels):  # recall falls as the gallery grows
            for s, p in (("old", 0.4), ("new", 0.8), ("method:a", 0.7), ("method:b", 0.6)):
                for d in ("t2i", "i2t"):
                    for k in ks:
                        key = f"{s}|{d}|{k}" if label == "full" else f"{label}#{s}|{d}|{k}"
                        hits[key] = (rng.random(n) < p * (1 + k / 10) / (1 + j)).astype(float)
        flagged = {"threshold": 0.95, "n_items": 40, "n_references": n, "n_at_or_above": 0, "max": 0.5,
                   "quantiles": {"0.5": 0.2}, "flagged": []}
        flagged = flagged | {"indices": []}
        return {"query_ids": ids, "hits": hits, "seed": 0, "fold": f"f{fold.index}", "code": "c",
                "sizes": {"eval": n, "val": 5, "train": 50, "text_corpus": 60, "fit_images": 0},
                "methods": {m: {"query_cost_us": {"256": 1.0}, "fits_on": "x", "needs_old_model_at_query_time": False}
                            for m in ("a", "b")},
                "timings_s": {"evaluate": 1.0, "search_sizes": 0.5}, "warnings": [],
                "gallery_sizes": [{"label": lab, "extra_images": a, "extra_texts": a, "gallery_images": n + a, "gallery_texts": n + a}
                                  for lab, a in zip(labels, (0, 10, 40))],
                "near_duplicates": {"model": "m", "images": flagged, "texts": flagged, "dropped": {"images": 0, "texts": 0}}}

    monkeypatch.setattr(crossval, "run_fold", fake_fold)
    cfg = crossval.CrossValConfig(k=2, seeds=(0, 1), ks=ks, n_resamples=50, peers=("a", "b"), xbt={}, old_query=(),
                                  gallery_extra=["toy"])
    results = crossval.run_crossval(cfg, tmp_path / "work", compare=[("a", "b")])
    sizes = results["crossval"]["gallery_sizes"]
    assert [s["label"] for s in sizes] == list(labels)
    assert [s["gallery_images"]["min"] for s in sizes] == [30, 40, 70]
    assert results["protocol"]["gallery_images"] == 70 and results["protocol"]["gallery_texts"] == 70
    assert results["matrix"] == {**sizes[-1]["matrix"], "method_info": results["matrix"]["method_info"]}
    assert all(len(s["seed_spread"]["methods"]["a"]["mean_gain"]["values"]) == 2 for s in sizes)
    assert all(s["differences"][0]["a"] == "a" for s in sizes)
    assert results["data"]["gallery_extra"]["n_images"] == 40
    json.dumps(results, allow_nan=False)
    paths = write_report(results, tmp_path / "report")
    text = paths["markdown"].read_text()
    assert "## Gallery size" in text and "70 img / 70 txt" in text and "Near-duplicates of evaluation items" in text
    assert (tmp_path / "report" / "figures" / "gallery_size.png").stat().st_size > 1000


def test_extras_that_duplicate_an_evaluation_item_leave_the_folds_galleries(extras_world):
    """An extra that is (nearly) a query's own item would count as a wrong answer: the cross-validation drops
    the extras at or above the cosine threshold (the fold's new model) to any of the fold's evaluation items."""
    from xbt.eval.crossval import drop_near_duplicates

    old, new, eval_pairs, train, support, latents, extra = extras_world
    copied = GalleryExtra(extra.images + [eval_pairs[3].image], extra.texts + [eval_pairs[5].caption], "toy extras")
    kept, check = drop_near_duplicates(copied, new, eval_pairs, threshold=0.999)
    assert check["dropped"] == {"images": 1, "texts": 1}
    assert eval_pairs[3].image not in kept.images and eval_pairs[5].caption not in kept.texts
    assert len(kept.images) == len(extra.images) and len(kept.texts) == len(extra.texts)
    assert check["images"]["flagged"][0]["reference_name"] == eval_pairs[3].image


def test_the_committed_large_gallery_page_meets_the_protocol():
    """docs/results/testbed-cv-large: >= 10,000 gallery images and texts per fold, >= 700 queries per direction,
    every method with and without NNN at every size, paired intervals and a seed spread."""
    from pathlib import Path

    from xbt.eval.report import report_blocks, to_markdown

    page = Path(__file__).resolve().parents[1] / "docs/results/testbed-cv-large"
    results = json.loads((page / "results.json").read_text())
    assert results["schema"] == "xbt.results/1"
    assert results["protocol"]["gallery_images"] >= 10_000 and results["protocol"]["gallery_texts"] >= 10_000
    assert min(results["matrix"]["n_queries"].values()) >= 700
    cv = results["crossval"]
    assert cv["seeds"] == [0, 1, 2] and "--gallery-extra testbed:distractors" in results["command"]
    sizes = cv["gallery_sizes"]
    assert [s["gallery_images"]["min"] for s in sizes][:2] == [141, 1000] and sizes[-1]["gallery_images"]["min"] >= 10_000
    assert sizes[-1]["gallery_texts"]["min"] >= 10_000
    methods = set(results["matrix"]["methods"])
    plain = {m for m in methods if not m.endswith("+nnn")}
    assert plain and {m + "+nnn" for m in plain} == methods - plain
    for size in sizes:
        assert set(size["matrix"]["methods"]) == methods
        assert all(len(size["seed_spread"]["methods"][m]["mean_gain"]["values"]) == 3 for m in methods)
        assert size["differences"] and all("low" in d["mean_gain_difference"] for d in size["differences"])
    assert sum(cv["near_duplicates"]["images"]["dropped_per_fold"]) == sum(cv["near_duplicates"]["images"]["at_or_above_per_fold"])
    assert (page / "figures" / "gallery_size.png").stat().st_size > 10_000
    text = to_markdown(report_blocks(results, {"heatmap": "h.png", "recall": "r.png", "gallery_size": "g.png"}))
    assert "## Gallery size" in text and "Near-duplicates of evaluation items" in text
