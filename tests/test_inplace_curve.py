"""The in-place strategy's backfill curve and its benefit order (issue 26, part 3): at 0% backfilled a gallery
transformed by the transpose of an orthogonal query map recalls exactly as the query-side map, at 100% as
new->new; each backfilled row is scored by its native vector; the row calibration, the oracle and the benefit
scorer (chosen on training pairs, saved and loaded, and followed by `backfill_in_place --order benefit`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_gallery_inplace import _transformed

from xbt.compat.procrustes import orthogonal_procrustes
from xbt.errors import InputError, SpaceMismatchError
from xbt.eval.backfill_curve import backfill_hits
from xbt.ranking.inplace_benefit import CANDIDATES, InplaceBenefitScorer, fit_inplace_benefit, inplace_statistic
from xbt.ranking.inplace_curve import (
    RowCalibration,
    fit_row_calibration,
    inplace_hits,
    inplace_oracle_order,
    inplace_top1_curve,
)
from xbt.gallery.inplace import backfill_in_place
from xbt.gallery.inplace_benefit import benefit_plan, load_or_fit_benefit
from xbt.gallery.store import Gallery
from xbt.gallery.transform import transform_status

OLD, NEW = 16, 24


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _world(n: int = 80, seed: int = 0, noise: float = 0.6):
    """Items with a latent; the old and new models see it through different random maps (the old one noisier);
    queries are noisy new-model views of their item."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 12))
    old = _unit(latent @ rng.standard_normal((12, OLD)) + noise * rng.standard_normal((n, OLD)))
    new = _unit(latent @ rng.standard_normal((12, NEW)) + 0.2 * rng.standard_normal((n, NEW)))
    queries = _unit(new + 0.5 * rng.standard_normal((n, NEW)) / np.sqrt(NEW))
    return old, new, queries, [[i] for i in range(n)]


def _rotation(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """An orthogonal query map new -> old (NEW x OLD, orthonormal columns), Procrustes on the items."""
    return orthogonal_procrustes(new, np.hstack([old, np.zeros((len(old), NEW - OLD), np.float32)]))[:, :OLD]


def test_at_zero_the_transposed_map_recalls_as_the_query_side_map_and_at_one_as_new_to_new():
    old, new, queries, positives = _world()
    r = _rotation(old, new)
    np.testing.assert_allclose(r.T @ r, np.eye(OLD), atol=1e-5)
    transformed = _unit(old @ r.T)  # old -> new by R^T: <q, R^T g> = <R q, g>
    fractions = [0.0, 0.5, 1.0]
    got = inplace_hits(transformed, new, queries, positives, fractions, np.arange(len(old)))
    query_side = backfill_hits(old, new, queries @ r, queries, positives, fractions, np.arange(len(old)))
    for k in (1, 5, 10):
        np.testing.assert_array_equal(got[0.0][k], query_side[0.0][k])  # per query, not only the recall
        np.testing.assert_array_equal(got[1.0][k], query_side[1.0][k])
    assert 0 < got[0.0][1].mean() < got[1.0][1].mean()  # a test with something to gain


def test_each_backfilled_row_is_scored_by_its_native_vector():
    old, new, queries, positives = _world(40, seed=1)
    transformed = _unit(np.random.default_rng(2).standard_normal(new.shape))  # a bad map: the gain is large
    order = np.random.default_rng(3).permutation(len(new))
    fractions = [i / 8 for i in range(9)]
    got = inplace_hits(transformed, new, queries, positives, fractions, order, ks=(1, 5))
    for f in fractions:  # the reference: the gallery with each backfilled row's vector replaced, searched plainly
        gallery = transformed.copy()
        done = order[: round(f * len(new))]
        gallery[done] = new[done]
        ranks = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")
        for k in (1, 5):
            expected = np.array([q in ranks[q, :k] for q in range(len(queries))], dtype=float)
            np.testing.assert_array_equal(got[f][k], expected)
    assert got[0.0][1].mean() < got[1.0][1].mean()


def test_the_row_calibration_and_the_oracle():
    old, new, queries, positives = _world(60, seed=4)
    same = fit_row_calibration(new, new, queries, positives)
    assert abs(same.a - 1) < 1e-3 and abs(same.b) < 1e-3
    cal = RowCalibration(0.9, 0.05)
    assert RowCalibration.from_dict(json.loads(json.dumps(cal.to_dict()))).b == 0.05
    with pytest.raises(InputError):
        RowCalibration(-1.0, 0.0)
    r = _rotation(old, new)
    transformed = _unit(old @ r.T)
    oracle = inplace_oracle_order(transformed, new, queries, positives, cal)
    assert sorted(oracle.tolist()) == list(range(len(new)))
    fr = [i / 10 for i in range(11)]
    best = inplace_top1_curve(transformed, new, queries, positives, oracle, fr, cal)
    rand = np.mean([inplace_top1_curve(transformed, new, queries, positives, np.random.default_rng(s).permutation(60), fr, cal)
                    for s in range(5)], axis=0)
    assert np.trapezoid(best, fr) >= np.trapezoid(rand, fr)


def test_the_benefit_scorer_is_chosen_on_training_pairs_saved_and_loaded(tmp_path):
    old, new, queries, positives = _world(200, seed=5)
    r = _rotation(old, new)
    transformed = _unit(old @ r.T)
    s_old, s_new, _, _ = _world(300, seed=6)
    scorer = fit_inplace_benefit(transformed, new, queries, positives, _unit(s_old @ r.T), s_new, seed=0)
    assert scorer.statistic in CANDIDATES and set(scorer.fit_report["mean_gain_area"]) == set(CANDIDATES)
    assert scorer.fit_report["training_items"] == 200 and scorer.fit_report["sample_items"] == 300
    gallery = _unit(_world(50, seed=7)[0] @ r.T)
    order = scorer.order(gallery)
    assert sorted(order.tolist()) == list(range(50))
    for name in CANDIDATES:  # every candidate scores every row
        assert np.isfinite(inplace_statistic(name, gallery, scorer.heads)).all()
    scorer.save(tmp_path / "scorer")
    loaded = InplaceBenefitScorer.load(tmp_path / "scorer")
    assert loaded.statistic == scorer.statistic
    np.testing.assert_allclose(loaded.score(gallery), scorer.score(gallery), atol=1e-6)
    with pytest.raises(SpaceMismatchError):
        loaded.score(gallery[:, :OLD])
    weights = tmp_path / "scorer" / "scorer.safetensors"
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(InputError, match="sha256"):
        InplaceBenefitScorer.load(tmp_path / "scorer")
    with pytest.raises(InputError, match="too few"):
        fit_inplace_benefit(transformed[:30], new[:30], queries[:30], positives[:30])


def test_the_in_place_backfill_follows_the_benefit_plan_and_keeps_its_scorer(tmp_path):
    new_model, path = _transformed(tmp_path)
    scorer = InplaceBenefitScorer("density@1", dim=new_model.embed_dim)
    with Gallery.open(path) as g:
        plan = benefit_plan(g, scorer)
        ids = sorted(plan)
        vectors = g.get(ids, with_vectors=True)
        expected = [ids[int(i)] for i in scorer.order(np.stack([vectors[i]["vector"] for i in ids]))]
        assert plan == expected
        report = backfill_in_place(g, new_model, "benefit", benefit=scorer, batch_size=4, max_items=6)
        assert report["replaced"] == 6 and transform_status(g)["native"] == 6
        native = {i for i, p, _ in g.iter_items(64) if "_xbt_provenance" not in (p or {})}
        assert native == set(plan[:6])
        assert set(benefit_plan(g, scorer)) == set(plan[6:])  # a rerun plans the rows still transformed
        saved = load_or_fit_benefit(tmp_path / "scorer", g, lambda: scorer)  # fitted once, saved
        assert saved.statistic == "density@1" and (tmp_path / "scorer" / "scorer.json").exists()
        again = load_or_fit_benefit(tmp_path / "scorer", g, lambda: pytest.fail("fitted again"))
        assert again.statistic == "density@1"
        with pytest.raises(InputError, match="benefit order"):
            backfill_in_place(g, new_model, "benefit")


def test_the_scorer_must_come_through_the_map_that_made_the_gallery(tmp_path):
    from test_gallery_transform import LinearModel

    from xbt.data.pairs import Pair
    from xbt.gallery.inplace_benefit import fit_gallery_benefit, inplace_benefit_from_specs
    from xbt.gallery.transform import fitted_map

    new_model, path = _transformed(tmp_path)
    old_model = LinearModel(16, 5, "old")
    other = fitted_map("procrustes-text", old_model, new_model, fit_texts=[f"another text {i}" for i in range(60)])
    pairs = [Pair(image="x.png", caption=f"c {i}", image_id=str(i)) for i in range(50)]
    with Gallery.open(path) as g:
        with pytest.raises(InputError, match="must be fitted through the map that made the gallery"):
            fit_gallery_benefit(g, other, old_model, new_model, pairs)
        with pytest.raises(InputError, match="--benefit-scorer"):
            inplace_benefit_from_specs(g, None, new_model, None, "compat:x", "old", "pairs")
        with pytest.raises(InputError, match="give --compat, --old-model, --fit-pairs"):
            inplace_benefit_from_specs(g, tmp_path / "scorer", new_model, None, None, None, None)
        bad = InplaceBenefitScorer("density@1", dim=24, fit_report={"map": "0" * 64})
        bad.save(tmp_path / "bad")
        with pytest.raises(InputError, match="fitted through map"):
            load_or_fit_benefit(tmp_path / "bad", g)


def test_the_command_backfills_in_place_by_benefit_and_keeps_its_scorer(tmp_path):
    from gallery_support import make_images, transposable_gallery
    from typer.testing import CliRunner

    from xbt.cli import app
    from xbt.specs import load_model

    old_spec, new_spec, _gallery, images = transposable_gallery(tmp_path)
    new = load_model(new_spec)
    train = make_images(tmp_path / "train", 48, seed=7)  # training pairs: never the gallery's items
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image": str(p), "caption": f"a drawing of thing {i}"}) + "\n"
                                                  for i, p in enumerate(train)))
    runner = CliRunner()

    def cli(*args: str, ok: bool = True) -> str:
        result = runner.invoke(app, list(args))
        assert (result.exit_code == 0) == ok, f"{args}: {result.output}"
        return result.stdout if ok else result.output

    cli("gallery", "transform", "--gallery", str(tmp_path / "g"), "--out", str(tmp_path / "t"), "--map",
        f"compat:{tmp_path / 'compat'}", "--device", "cpu")
    backfill = ["gallery", "backfill", "--in-place", "--gallery", str(tmp_path / "t"), "--model", new_spec, "--device", "cpu",
                "--order", "benefit", "--benefit-scorer", str(tmp_path / "scorer"), "--batch-size", "4", "--max-items", "5"]
    assert "give --compat, --old-model, --fit-pairs" in " ".join(cli(*backfill, ok=False).split())
    out = cli(*backfill, "--compat", f"compat:{tmp_path / 'compat'}", "--old-model", old_spec, "--fit-pairs",
              str(tmp_path / "pairs.jsonl"))
    report = json.loads(out[out.index("{"):])
    assert (report["replaced"], report["transformed"], report["native"]) == (5, 15, 5)
    scorer = InplaceBenefitScorer.load(tmp_path / "scorer")
    assert scorer.fit_report["training_items"] == 48 and scorer.space_id == new.space.id
    out = cli(*backfill)  # a rerun loads the saved scorer: no training pairs needed
    report = json.loads(out[out.index("{"):])
    assert (report["replaced"], report["transformed"], report["native"]) == (5, 10, 10)


def test_the_strategy_recommendation_weighs_quality_intervals_against_costs():
    from xbt.eval.migration_strategy import migration_costs, recommend_strategy

    costs = migration_costs(1_000_000, 10_000.0, 10.0)
    assert costs["in-place"].vectors_written_before_serving == 1_000_000 and costs["in-place"].seconds_before_serving == 100
    assert costs["query-side"].peak_vectors_stored == 2_000_000 and costs["query-side"].merge_rule
    assert costs["in-place"].seconds_to_encode_everything == costs["query-side"].seconds_to_encode_everything == 100_000
    r1 = {"in-place": {"t2i": 19.0, "i2t": 23.4}, "query-side": {"t2i": 19.0, "i2t": 23.4}}
    inside = {"t2i": {"value": -0.5, "low": -2.0, "high": 1.0}, "i2t": {"value": 0.2, "low": -1.0, "high": 1.5}}
    assert recommend_strategy(inside, r1, costs)["pick"] == "in-place"  # a tie goes to the simpler operation
    worse = {"t2i": {"value": -2.0, "low": -3.0, "high": -0.5}, "i2t": {"value": -1.0, "low": -2.0, "high": 0.5}}
    assert recommend_strategy(worse, r1, costs)["pick"] == "query-side"
    with pytest.raises(InputError):
        migration_costs(10, 0.0, 1.0)


def test_compare_on_run_measures_both_strategies_on_the_run_and_picks(tmp_path):
    """The main job's strategy comparison: in place with an orthogonal map's transpose starts exactly where the
    query-side map does (R@1 at 0%), both end at new->new (R@1 at 100%), and the pick comes with its reasons;
    a run without the transposable model gives None."""
    from types import SimpleNamespace

    from gallery_support import unit_rows
    from test_gallery_transform import OLD_SPACE, LinearModel, _procrustes_model

    from xbt.embed import PairEmbeddings, QueryVectors
    from xbt.eval.migration_strategy import compare_on_run

    new_model = LinearModel(24, 0, "new")
    compat = _procrustes_model(new_model)
    n = 40
    index = [i // 2 for i in range(2 * n)]  # two captions per image
    new = PairEmbeddings(unit_rows(n, 24, 1), unit_rows(2 * n, 24, 2), index, new_model.space)
    noise = lambda x, s: x + 0.3 * unit_rows(len(x), x.shape[1], s)  # noqa: E731 - the old model sees the same items, noisily
    old = PairEmbeddings(compat.query_map.apply(noise(new.images, 3)), compat.query_map.apply(noise(new.texts, 4)), index, OLD_SPACE)
    mapped = QueryVectors(compat.query_map.apply(new.images), compat.query_map.apply(new.texts), OLD_SPACE)
    run = SimpleNamespace(compatible={"procrustes-gallery": compat}, queries={"procrustes-gallery": mapped},
                          embeddings={"old": old, "new": new})
    out = compare_on_run(run, "procrustes-gallery", n_resamples=200, transform_per_s=1000.0, encode_per_s=10.0)
    assert out is not None and out["pick"] in ("in-place", "query-side") and out["reasons"]
    for d, row in out["directions"].items():
        assert row["in-place"]["r1_at_0"] == row["query-side"]["r1_at_0"], d  # <q, R^T g> ranks as <q R, g>
        assert row["in-place"]["r1_at_100"] == row["query-side"]["r1_at_100"], d  # both: new->new
        assert row["r1_at_0_in_place_minus_query_side"]["value"] == 0.0
    assert out["costs"]["in-place"]["seconds_before_serving"] == n / 1000.0
    assert all(0 <= row[s]["r1_at_0"] <= 100 for row in out["directions"].values() for s in ("in-place", "query-side"))
    assert compare_on_run(run, "procrustes-gallery", "adapter-gallery") is None


def test_the_strategy_pick_weighs_area_then_the_start_then_simplicity():
    from xbt.eval.migration_strategy import migration_costs, recommend_strategy

    costs, r1 = migration_costs(100, None, None), {"in-place": {"t2i": 10.0}, "query-side": {"t2i": 15.0}}
    tie, lower, higher = ({"t2i": {"value": v, "low": lo, "high": hi}} for v, lo, hi in
                          ((0.1, -1.0, 1.2), (-4.0, -6.0, -2.0), (3.0, 1.0, 5.0)))
    assert recommend_strategy(tie, r1, costs)["pick"] == "in-place"  # alike: the simpler operation
    assert recommend_strategy(tie, r1, costs, lower)["pick"] == "query-side"  # in place starts lower
    assert recommend_strategy(lower, r1, costs, higher)["pick"] == "query-side"  # the area decides first
    assert recommend_strategy(higher, r1, costs, lower)["pick"] == "in-place"
    assert "h here" not in " ".join(recommend_strategy(tie, r1, costs)["reasons"])  # no rate: no seconds
