"""The benefit order: its statistics, its choice on training pairs (never the evaluated gallery), that it
buys the upgrade's gain early where the old space crowds items together, the gain-fraction and area
measures of the backfill curve, pooling over folds, and `--order benefit` on the embedded store, on Milvus
Lite and through `xbt gallery backfill`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gallery_support import make_images, tiny_upgrade, unit_rows

from xbt.errors import InputError, SpaceMismatchError
from xbt.eval.backfill_curve import backfill_curve, backfill_hits, curve_from_hits, fraction_for_gain, order_curves, orders_to_dict, pool_order_hits
from xbt.ranking.benefit import (
    CANDIDATES,
    BenefitScorer,
    benefit_order,
    benefit_statistic,
    closure_order,
    confusion,
    fit_benefit,
    fit_benefit_pairs,
    merged_top1_curve,
)
from xbt.gallery.migration import Migration, order_ids
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

FRACTIONS = [i / 20 for i in range(21)]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def crowded_world(seed: int, n_clusters: int = 30, size: int = 6, crowded: float = 0.25):
    """Clusters of items. In a quarter of them the old space crowds the items together (tiny spread), so the
    compatible model's noisy queries land on a neighbour; elsewhere, and everywhere in the new space, items
    stand apart. Returns (old gallery, new gallery, compatible queries, new queries, positives)."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(n_clusters), size)
    n = len(cluster)
    spread = np.where((rng.random(n_clusters) < crowded)[cluster], 0.03, 0.5)[:, None]
    centre_old = _unit(rng.standard_normal((n_clusters, 16)))
    offset = rng.standard_normal((n, 16)) / 4
    old = _unit(centre_old[cluster] + spread * offset)
    compat = _unit(centre_old[cluster] + spread * offset + 0.08 * rng.standard_normal((n, 16)) / 4)
    new = _unit(_unit(rng.standard_normal((n_clusters, 24)))[cluster] + 0.5 * rng.standard_normal((n, 24)) / 5)
    new_queries = _unit(new + 0.08 * rng.standard_normal((n, 24)) / 5)
    return old, new, compat, new_queries, [[i] for i in range(n)]


# ----- the statistics -------------------------------------------------------------------------------------
def test_statistics_on_a_small_gallery():
    g = _unit(np.array([[1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32))
    dens = benefit_statistic("density@1", g)
    assert dens[0] == pytest.approx(dens[1]) and dens[0] > 0.99 and dens[2] < 0.1  # the near-twins are crowded
    bank = _unit(np.array([[0, 0.9, 0.1], [0, 1, 0.05], [0.1, 0, 1]], dtype=np.float32))
    assert benefit_statistic("hubness@1", g, bank).tolist() == [0, 0, 2, 1]
    both = benefit_statistic("density@1+hubness@1", g, bank)
    assert both.tolist() == pytest.approx([0.5, 1.0, 1.0, 0.5])  # density ranks (2, 3, 1, 0) / 4 + hubness ranks (0, 1, 3, 2) / 4
    with pytest.raises(InputError, match="bank of compatible queries"):
        benefit_statistic("hubness@5", g)
    with pytest.raises(InputError, match="unknown benefit statistic"):
        benefit_statistic("popularity@3", g)
    with pytest.raises(SpaceMismatchError):
        benefit_statistic("hubness@1", g, np.ones((2, 5), np.float32))
    with pytest.raises(InputError, match="query regressor"):
        benefit_statistic("confusion", g)
    assert closure_order(np.array([0.1, 0.9, 0.5, 0.0]), np.array([2, 3, 0, 1])).tolist() == [1, 3, 2, 0]


def test_merged_top1_curve_matches_the_full_slot_merge_curve():
    old, new, compat, new_q, pos = crowded_world(3, n_clusters=10)
    order = np.random.default_rng(0).permutation(len(old))
    fast = merged_top1_curve(old, new, compat, new_q, pos, order, FRACTIONS)
    full = backfill_curve(old, new, compat, new_q, pos, FRACTIONS, order=order, n_resamples=10)
    np.testing.assert_allclose(100 * fast, [e.value for e in full.recall[1]])


# ----- choosing and using the order --------------------------------------------------------------------------
def test_benefit_order_buys_the_gain_early_where_the_old_space_crowds_items():
    scorer = fit_benefit(*crowded_world(0))  # chosen on training data; measured on a fresh draw below
    report = scorer.fit_report
    assert set(report["mean_gain_area"]) == set(CANDIDATES) and report["chosen"] == scorer.statistic
    assert report["mean_gain_area"][scorer.statistic] == max(report["mean_gain_area"].values())
    assert report["mean_gain_area"][scorer.statistic] > report["random_gain_area"] + 0.3
    world = crowded_world(1)
    randoms = [np.random.default_rng(s).permutation(len(world[0])) for s in range(5)]
    benefit = backfill_curve(*world, FRACTIONS, order=scorer.order(world[0]), n_resamples=200, order_name="benefit")
    random = backfill_curve(*world, FRACTIONS, order=randoms, n_resamples=200, order_name="random")
    assert benefit.recall[1][-1].value > benefit.recall[1][0].value + 4  # there is a gain to order
    assert benefit.gain_fraction.value <= 0.3 and random.gain_fraction.value >= 0.7
    assert benefit.gain_area[1].value > random.gain_area[1].value + 0.3
    assert benefit.area[1].value > random.area[1].value
    assert benefit.to_dict()["fraction_for_80pct_gain"]["value"] == benefit.gain_fraction.value
    assert benefit.gain_fraction.low <= benefit.gain_fraction.value <= benefit.gain_fraction.high


def test_fit_refuses_what_it_cannot_learn_from():
    old, new, compat, new_q, pos = crowded_world(0)
    with pytest.raises(InputError, match="too few"):
        fit_benefit(old[:30], new[:30], compat[:30], new_q[:30], pos[:30])
    with pytest.raises(InputError, match="same count"):
        fit_benefit(old, new, compat[:-1], new_q, pos)
    with pytest.raises(InputError, match="no R@1 gain"):  # the new model no better than the compatible one
        fit_benefit(old, old, compat, compat, pos)


def test_confusion_regressor_is_fitted_and_applied():
    world = crowded_world(0)
    scorer = fit_benefit(*world, candidates=("confusion",))
    assert scorer.statistic == "confusion" and scorer.regressor.shape == (17, 16)
    order = scorer.order(crowded_world(1)[0])
    assert sorted(order.tolist()) == list(range(180))
    with pytest.raises(SpaceMismatchError):
        scorer.order(np.ones((5, 8), np.float32))


def test_confusion_own_and_the_choice_under_the_score_merge():
    """`confusion-own` ranks by the same margin as confusion without placing the predicted distractor next;
    `fit_benefit(..., calibration=...)` measures every candidate under the score merge."""
    from xbt.ranking.merge import fit_score_calibration

    world = crowded_world(0)
    regressor = fit_benefit(*world, candidates=("confusion",)).regressor
    gallery = crowded_world(1)[0]
    own = benefit_order("confusion-own", gallery, regressor=regressor)
    np.testing.assert_array_equal(own, np.argsort(-confusion(gallery, regressor)[0], kind="stable"))
    assert own.tolist() != benefit_order("confusion", gallery, regressor=regressor).tolist()
    with pytest.raises(InputError, match="query regressor"):
        benefit_order("confusion-own", gallery)
    calibration = fit_score_calibration(*crowded_world(2), "old", "new")
    slot = fit_benefit(*world, candidates=("density@3", "confusion-own"))
    score = fit_benefit(*world, candidates=("density@3", "confusion-own"), calibration=calibration)
    assert slot.fit_report["merge"] == "slot" and score.fit_report["merge"] == "score"
    assert score.fit_report["mean_gain_area"] != slot.fit_report["mean_gain_area"]  # measured under another rule
    assert score.regressor is not None or score.statistic == "density@3"


# ----- the curve's measures and pooling -------------------------------------------------------------------
def test_fraction_for_gain_interpolates_between_measured_fractions():
    f = [0, 1 / 3, 2 / 3, 1]
    assert fraction_for_gain(f, [10, 12, 20, 30]) == pytest.approx(2 / 3 + (1 / 3) * 6 / 10)  # target 26
    assert fraction_for_gain(f, [10, 30, 30, 30]) == pytest.approx((1 / 3) * 16 / 20)
    assert fraction_for_gain(f, [10, 30, 5, 30], share=0.5) == pytest.approx((1 / 3) * 10 / 20)  # the first crossing
    assert np.isnan(fraction_for_gain(f, [10, 12, 9, 10]))  # no gain: undefined
    with pytest.raises(InputError):
        fraction_for_gain(f, [1, 2])


def test_hits_pool_over_folds_into_one_curve():
    parts = []
    for seed in (0, 1):
        world = crowded_world(seed, n_clusters=8)
        n = len(world[0])
        hits = {"random": {"t2i": backfill_hits(*world, [0, 0.5, 1], np.random.default_rng(seed).permutation(n))},
                "oldest": {"t2i": backfill_hits(*world, [0, 0.5, 1], np.arange(n))}}
        parts.append(hits)
    pooled = pool_order_hits(parts)
    assert len(pooled["random"]["t2i"][0.5][1]) == 2 * 48
    curves = order_curves(pooled, n_resamples=50)
    alone = [curve_from_hits(p["oldest"]["t2i"], n_resamples=0).recall[1][1].value for p in parts]
    assert curves["oldest"]["t2i"].recall[1][1].value == pytest.approx(np.mean(alone))  # equal-sized folds
    summary = orders_to_dict(curves)["summary"]
    assert set(summary) == {"random", "oldest"} and summary["oldest"]["t2i"]["n_queries"] == 96
    with pytest.raises(InputError, match="cannot be pooled"):
        pool_order_hits([parts[0], {"random": parts[1]["random"]}])


# ----- order_ids and the migration, on both backends ------------------------------------------------------
SPACE = EmbeddingSpace("old", 16, "a" * 64)
NEW = EmbeddingSpace("new", 24, "b" * 64)


def _check_benefit_order(gallery, vectors: np.ndarray, ids: list[str], tmp_path) -> None:
    scorer = BenefitScorer("density@2", space_id=SPACE.id)
    expected = [ids[i] for i in scorer.order(vectors)]
    assert order_ids(gallery, "benefit", scorer, batch=7) == expected != ids
    with pytest.raises(InputError, match="--fit-pairs"):
        order_ids(gallery, "benefit")
    with pytest.raises(SpaceMismatchError, match="fitted in space"):
        order_ids(gallery, "benefit", BenefitScorer("density@2", space_id="elsewhere"))
    migration = Migration.start(tmp_path / "mig", gallery, NEW, "benefit", benefit=scorer)
    assert migration.plan() == expected
    assert migration.state["order"] == "benefit" and migration.state["benefit"]["statistic"] == "density@2"


def test_benefit_order_on_the_embedded_store(tmp_path):
    x, ids = _unit(np.repeat(unit_rows(10, 16, 0), 3, axis=0) + 0.05 * unit_rows(30, 16, 1)), [f"i{j:02d}" for j in range(30)]
    x[::3] = unit_rows(10, 16, 2)  # every third item stands alone
    gallery = Gallery.create(tmp_path / "g", SPACE, modality="image")
    gallery.add(x, ids, [{"image": f"/p/{i}.png"} for i in ids], space=SPACE)
    _check_benefit_order(gallery, x, ids, tmp_path)
    gallery.close()


def test_benefit_order_on_milvus_lite(tmp_path):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    from xbt.gallery.milvus import MilvusGallery

    x, ids = _unit(np.repeat(unit_rows(10, 16, 0), 3, axis=0) + 0.05 * unit_rows(30, 16, 1)), [f"i{j:02d}" for j in range(30)]
    with MilvusGallery.create(f"milvus:{tmp_path / 'g.db'}#photos", SPACE, modality="image") as gallery:
        gallery.add(x, ids, [{"image": f"/p/{i}.png"} for i in ids], space=SPACE)
        _check_benefit_order(gallery, x, ids, tmp_path)


# ----- the command line -----------------------------------------------------------------------------------
def test_cli_backfill_with_the_benefit_order(tmp_path, xbt_home):
    from typer.testing import CliRunner

    from xbt.cli import app
    from xbt.data.datasets import open_dataset
    from xbt.embed import embed_pairs
    from xbt.compat.queries import compatible_queries
    from xbt.gallery.ingest import ingest, items_from_folder

    old_spec, new_spec, old, new, compat = tiny_upgrade(tmp_path)
    # Training pairs (their own images) and a gallery of other images.
    train_images = make_images(tmp_path / "train", 48, seed=3)
    words = ["red", "blue", "green", "dark", "light", "grey", "warm", "cold"]
    rows = [{"image": str(p), "caption": f"a {words[i % 8]} picture number {i}", "image_id": p.stem}
            for i, p in enumerate(train_images)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_images(tmp_path / "photos", 12, seed=5)
    gallery = Gallery.create(tmp_path / "old", old.space, modality="image")
    ingest(gallery, old, items_from_folder(tmp_path / "photos"))
    vectors = gallery.get(gallery.ids(), with_vectors=True)
    ids = gallery.ids()
    gallery.close()

    args = ["gallery", "backfill", "--state", str(tmp_path / "mig"), "--model", new_spec, "--gallery", str(tmp_path / "old"),
            "--order", "benefit", "--max-items", "4"]
    missing = CliRunner().invoke(app, args + ["--compat", f"compat:{tmp_path / 'compat'}"])
    assert missing.exit_code == 1 and "--old-model" in missing.output and "--fit-pairs" in missing.output
    assert not (tmp_path / "mig" / "migration.json").exists()
    ok = CliRunner().invoke(app, args + ["--compat", f"compat:{tmp_path / 'compat'}", "--old-model", old_spec,
                                         "--fit-pairs", str(tmp_path / "train.jsonl")])
    assert ok.exit_code == 0, ok.output
    assert "benefit statistic chosen" in ok.output and json.loads(ok.stdout)["new_size"] == 4
    # The plan is the order of the scorer fitted on the training pairs, applied to the old vectors.
    pairs = open_dataset(str(tmp_path / "train.jsonl"))
    o, n = embed_pairs(old, pairs), embed_pairs(new, pairs)
    scorer = fit_benefit_pairs(o, n, compatible_queries(compat, pairs, n, o), "image")
    expected = [ids[i] for i in scorer.order(np.stack([vectors[i]["vector"] for i in ids]))]
    migration = Migration(tmp_path / "mig")
    assert migration.plan() == expected and migration.state["benefit"]["statistic"] == scorer.statistic
