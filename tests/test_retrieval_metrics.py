"""Retrieval metrics against hand-computed cases, and the paired bootstrap behind every interval."""

from __future__ import annotations

import numpy as np
import pytest

from xbt.embed import PairEmbeddings
from xbt.embed import GalleryBias, QueryVectors
from xbt.eval.matrix import UpgradeMatrix, evaluate_upgrade, matrix_from_hits, system_hits
from xbt.metrics import (
    best_positive_rank,
    bootstrap_indices,
    difference_estimate,
    hits_at_k,
    recall_estimate,
    resampled_means,
    retrieval_ranks,
)
from xbt.models.base import EmbeddingSpace

E = np.eye(4, dtype=np.float32)


def test_rank_counts_items_above_the_best_positive():
    gallery = np.array([[1, 0], [0.8, 0.6], [0, 1]], dtype=np.float32)
    queries = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    # scores q0: [1, .8, 0] -> item 2 is third; q1 positive item 1 is second; q2 positive item 2 is first.
    ranks = best_positive_rank(queries, gallery, [[2], [1], [2]])
    assert ranks.tolist() == [2, 1, 0]


def test_ties_count_against_the_query():
    gallery = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    queries = np.array([[1, 0], [1, 0]], dtype=np.float32)
    # q0's positive (item 1) ties with two negatives (items 0, 2): rank 2, not 0.
    # q1 has two tied positives (0 and 1) and one tied negative (2): rank 1.
    ranks = best_positive_rank(queries, gallery, [[1], [0, 1]])
    assert ranks.tolist() == [2, 1]
    # A constant embedding is never rewarded: every query ranks behind all tied negatives.
    constant = np.ones((3, 2), dtype=np.float32)
    assert best_positive_rank(constant, constant, [[0], [1], [2]]).tolist() == [2, 2, 2]


def test_several_captions_per_image_karpathy_protocol():
    # Two images; image 0 has captions 0 and 1, image 1 has caption 2.
    images = np.array([[1, 0], [0, 1]], dtype=np.float32)
    texts = np.array([[0, 1], [1, 0], [0, 1]], dtype=np.float32)  # caption 0 is closer to image 1
    ranks = retrieval_ranks(images, texts, images, texts, [0, 0, 1])
    # T2I: caption 0 ranks its image second; captions 1 and 2 first.
    assert ranks["t2i"].tolist() == [1, 0, 0]
    # I2T: image 0 scores [0, 1, 0]: its caption 1 is first -> correct at K=1 (any caption counts).
    # image 1 scores [1, 0, 1]: captions 0 (negative) and 2 (positive) tie -> rank 1.
    assert ranks["i2t"].tolist() == [0, 1]
    hits = hits_at_k(ranks["i2t"], (1, 5))
    assert hits[1].tolist() == [1.0, 0.0] and hits[5].tolist() == [1.0, 1.0]


def test_k_larger_than_the_gallery_counts_every_query():
    ranks = best_positive_rank(E[:3], E[[2, 1, 0]], [[2], [1], [0]])
    assert ranks.tolist() == [0, 0, 0]
    ranks = best_positive_rank(-E[:3], E[:3], [[0], [1], [2]])
    assert hits_at_k(ranks, (1, 10))[10].tolist() == [1.0, 1.0, 1.0]
    assert hits_at_k(ranks, (1, 10))[1].tolist() == [0.0, 0.0, 0.0]


def test_blocks_do_not_change_ranks_and_memory_bound_shrinks_them():
    rng = np.random.default_rng(1)
    q, g = rng.standard_normal((300, 8)).astype(np.float32), rng.standard_normal((500, 8)).astype(np.float32)
    positives = [list(rng.choice(500, size=rng.integers(1, 4), replace=False)) for _ in range(300)]
    full = best_positive_rank(q, g, positives, block=4096, max_score_elements=1 << 30)
    tiny = best_positive_rank(q, g, positives, block=4096, max_score_elements=500 * 7)  # blocks of 7 queries
    scores = q @ g.T
    slow = []
    for i, pos in enumerate(positives):
        best = scores[i, pos].max()
        negatives = np.delete(scores[i], pos)
        slow.append(int((scores[i] > best).sum() + (negatives == best).sum()))
    assert full.tolist() == slow and tiny.tolist() == slow


def test_bad_positive_lists_are_refused():
    with pytest.raises(ValueError, match="no positive"):
        best_positive_rank(E[:2], E, [[0], []])
    with pytest.raises(ValueError, match="outside the gallery"):
        best_positive_rank(E[:1], E, [[4]])
    with pytest.raises(ValueError, match="2 positive lists for 1"):
        best_positive_rank(E[:1], E, [[0], [1]])


def test_resampled_means_match_the_materialised_bootstrap():
    rng = np.random.default_rng(0)
    hits = (rng.random((57, 3)) < 0.4).astype(float)
    idx = bootstrap_indices(57, 200, seed=3)
    expected = hits[idx].mean(axis=1)
    chunked = resampled_means(hits, 200, seed=3, max_elements=57 * 7)  # 7 resamples per chunk
    np.testing.assert_allclose(chunked, expected)


def test_paired_difference_is_tighter_than_unpaired_and_zero_for_identical():
    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.5).astype(float)
    b = a.copy()
    b[:20] = 1 - b[:20]  # differs on 5% of the queries
    idx = bootstrap_indices(400, 500, seed=0)
    same = difference_estimate(a, a, idx)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    paired = difference_estimate(a, b, idx)
    ra, rb = recall_estimate(a, idx), recall_estimate(b, idx)
    assert paired.value == pytest.approx(ra.value - rb.value)
    assert paired.high - paired.low < (ra.high - ra.low)  # pairing removes the shared query difficulty


def _space(name: str, dim: int) -> EmbeddingSpace:
    return EmbeddingSpace(name, dim, name * 8)


def test_matrix_gain_criterion_and_roundtrip():
    rng = np.random.default_rng(0)
    n = 120
    truth = rng.standard_normal((n, 6)).astype(np.float32)
    noisy = lambda scale: truth + scale * rng.standard_normal(truth.shape).astype(np.float32)  # noqa: E731
    old = PairEmbeddings(noisy(1.5), noisy(1.5), list(range(n)), _space("old", 6))
    new = PairEmbeddings(noisy(0.2), noisy(0.2), list(range(n)), _space("new", 6))
    methods = {
        "ceiling": QueryVectors(new.images, new.texts, old.space),  # as good as the new model, in the old gallery's dims
        "same-as-old": QueryVectors(old.images, old.texts, old.space),
    }
    m = evaluate_upgrade(old, new, methods, ks=(1, 5), n_resamples=200)
    same = m.methods["same-as-old"]["t2i"][1]
    assert same.vs_old.value == 0 and not same.passes and not same.passes_confidently
    assert same.gain.value == 0
    for d, row in m.methods["ceiling"].items():
        for k, cell in row.items():
            o, c, nn = m.old_old[d][k].value, cell.recall.value, m.new_new[d][k].value
            assert cell.vs_old.value == pytest.approx(c - o)
            assert cell.gain.value == pytest.approx(100 * (c - o) / (nn - o))
            assert cell.vs_old.low <= cell.vs_old.value <= cell.vs_old.high
    assert m.all_pass("ceiling")  # much less noisy queries retrieve the noisy old gallery better
    back = UpgradeMatrix.from_dict(m.to_dict())
    assert back.to_dict() == m.to_dict()
    assert back.all_pass("same-as-old") is False


def test_matrix_refuses_queries_of_the_wrong_shape():
    old = PairEmbeddings(E[:2], E[:2], [0, 1], _space("old", 4))
    with pytest.raises(ValueError, match="old gallery"):
        evaluate_upgrade(old, old, {"bad": QueryVectors(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), old.space)})


def test_matrix_refuses_queries_of_another_space_of_the_same_dimension():
    from xbt.errors import SpaceMismatchError

    old = PairEmbeddings(E[:2], E[:2], [0, 1], _space("old", 4))
    with pytest.raises(SpaceMismatchError, match="same dimension"):
        evaluate_upgrade(old, old, {"other": QueryVectors(E[:2], E[:2], _space("other", 4))})


def test_a_gallery_bias_ranks_as_the_calibrated_scores_do():
    rng = np.random.default_rng(3)
    n = 40
    images, texts = (rng.standard_normal((n, 5)).astype(np.float32) for _ in range(2))
    old = PairEmbeddings(images, texts, list(range(n)), _space("old", 5))
    q = QueryVectors(rng.standard_normal((n, 5)).astype(np.float32), rng.standard_normal((n, 5)).astype(np.float32), old.space)
    bias = GalleryBias(*(3 * rng.standard_normal(n).astype(np.float32) for _ in range(2)))
    hits = system_hits(old, old, {"plain": q, "calibrated": QueryVectors(q.images, q.texts, q.space, bias)}, ks=(1, 5))
    # The same ranks as searching the calibrated scores q . g - b directly.
    t2i = best_positive_rank(q.texts @ images.T - bias.images[None, :], np.eye(n, dtype=np.float32), [[i] for i in range(n)])
    i2t = best_positive_rank(q.images @ texts.T - bias.texts[None, :], np.eye(n, dtype=np.float32), [[i] for i in range(n)])
    assert hits["method:calibrated"]["t2i"][1].tolist() == (t2i < 1).astype(float).tolist()
    assert hits["method:calibrated"]["i2t"][5].tolist() == (i2t < 5).astype(float).tolist()
    assert hits["method:calibrated"]["i2t"][5].tolist() != hits["method:plain"]["i2t"][5].tolist()


def test_a_hub_pulled_down_by_its_bias_stops_taking_every_query():
    # Item 0 sits near every query (a hub): without calibration it is everyone's top-1.
    n = 6
    gallery = np.eye(n, dtype=np.float32)
    gallery[0] = 1.0 / np.sqrt(n)
    queries = np.eye(n, dtype=np.float32) * 0.3 + gallery[0] * 1.0
    old = PairEmbeddings(gallery, gallery, list(range(n)), _space("old", n))
    plain = QueryVectors(queries, queries, old.space)
    bias = GalleryBias(np.array([1.0] + [0.0] * (n - 1), np.float32), np.array([1.0] + [0.0] * (n - 1), np.float32))
    hits = system_hits(old, old, {"plain": plain, "nnn": QueryVectors(queries, queries, old.space, bias)}, ks=(1,))
    assert hits["method:plain"]["t2i"][1].sum() == 1  # only the hub's own query
    assert hits["method:nnn"]["t2i"][1].sum() == n - 1  # every other query finds its item; the hub's own loses it


def test_pooled_hits_give_the_same_matrix_as_one_evaluation():
    rng = np.random.default_rng(1)
    n = 30
    old = PairEmbeddings(*(rng.standard_normal((n, 4)).astype(np.float32) for _ in range(2)), list(range(n)), _space("old", 4))
    q = {"m": QueryVectors(*(rng.standard_normal((n, 4)).astype(np.float32) for _ in range(2)), old.space)}
    direct = evaluate_upgrade(old, old, q, ks=(1, 5), n_resamples=100, seed=2)
    pooled = matrix_from_hits(system_hits(old, old, q, ks=(1, 5)), ks=(1, 5), n_resamples=100, seed=2)
    assert repr(pooled.to_dict()) == repr(direct.to_dict())  # repr: an undefined gain (NaN) equals itself
    with pytest.raises(ValueError, match="another number"):
        bad = system_hits(old, old, q, ks=(1, 5))
        bad["method:m"]["t2i"][1] = bad["method:m"]["t2i"][1][:-1]
        matrix_from_hits(bad, ks=(1, 5))
