"""The peer methods on synthetic data where the right answer is known."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from xbt.compat.base import FitData
from xbt.compat.support import l2_normalise
from xbt.compat.procrustes import Procrustes, orthogonal_procrustes
from xbt.compat.registry import PEER_METHODS, build_method
from xbt.compat.slerp import Slerp
from xbt.compat.slerp import slerp_arrays as slerp
from xbt.errors import InputError, SpaceMismatchError
from xbt.embed import PairEmbeddings
from xbt.models.base import EmbeddingSpace

OLD = EmbeddingSpace("old", 16, "o" * 64)
NEW = EmbeddingSpace("new", 24, "n" * 64)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return l2_normalise(rng.standard_normal((n, d))).astype(np.float32)


def rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def rotated_world(seed: int = 0):
    """new = pad(old) rotated by a random Q: the new space is an exact rotation of the (padded) old one."""
    rng = np.random.default_rng(seed)
    q = rotation(rng, NEW.dim)

    def pair(n: int) -> tuple[np.ndarray, np.ndarray]:
        old = unit(rng, n, OLD.dim)
        return (np.pad(old, ((0, 0), (0, NEW.dim - OLD.dim))) @ q.T).astype(np.float32), old

    return rng, q, pair


def test_procrustes_recovers_a_random_rotation_exactly():
    rng = np.random.default_rng(0)
    q = rotation(rng, 12)
    x = rng.standard_normal((200, 12))
    np.testing.assert_allclose(orthogonal_procrustes(x, x @ q), q, atol=1e-8)


@pytest.mark.parametrize("fit_on", ["text", "image", "both"])
def test_procrustes_maps_into_the_smaller_old_space(fit_on):
    _, _, pair = rotated_world()
    (xt, yt), (xi, yi), (xe, ye) = pair(300), pair(100), pair(50)
    if fit_on == "image":  # text pairs are garbage: an image-fitted map must not use them
        xt = np.random.default_rng(5).permutation(xt)
    method = Procrustes(NEW, OLD, fit_on).fit(FitData(xt, yt, xi, yi))
    assert method.name == f"procrustes-{fit_on}"
    np.testing.assert_allclose(method.transform(xe), ye, atol=1e-4)


def test_procrustes_needs_the_data_it_fits_on():
    _, _, pair = rotated_world()
    xt, yt = pair(10)
    with pytest.raises(InputError, match="image pairs"):
        Procrustes(NEW, OLD, "image").fit(FitData(xt, yt))
    with pytest.raises(InputError, match="not fitted"):
        Procrustes(NEW, OLD).transform(xt)
    with pytest.raises(InputError, match="fit_on"):
        Procrustes(NEW, OLD, "audio")


def test_affine_recovers_an_affine_map_that_procrustes_cannot():
    rng = np.random.default_rng(1)
    x = unit(rng, 400, NEW.dim)
    w, b = rng.standard_normal((NEW.dim, OLD.dim)), rng.standard_normal(OLD.dim)
    y = x @ w + b
    data = FitData(x[:300], y[:300], x[:300], y[:300])
    affine = build_method("affine", NEW, OLD, ridge=1e-6).fit(data)
    target = l2_normalise(y[300:])
    assert np.abs(affine.transform(x[300:]) - target).max() < 1e-3
    procrustes = build_method("procrustes-text", NEW, OLD).fit(data)
    assert (procrustes.transform(x[300:]) * target).sum(1).mean() < 0.99


def test_adapter_starts_at_procrustes_learns_a_nonlinear_residual_and_is_seeded():
    rng, _, pair = rotated_world(2)
    x, y0 = pair(600)
    y = l2_normalise(y0 + 0.3 * np.tanh(3 * y0[:, ::-1])).astype(np.float32)  # a non-rotational distortion
    data = FitData(x[:500], y[:500], x[:500], y[:500])
    untrained = build_method("adapter", NEW, OLD, epochs=0).fit(data)
    procrustes = build_method("procrustes-both", NEW, OLD).fit(data)
    np.testing.assert_allclose(untrained.transform(x[500:]), procrustes.transform(x[500:]), atol=1e-5)
    trained = build_method("adapter", NEW, OLD, epochs=40, seed=3).fit(data)
    cos = lambda m: float((m.transform(x[500:]) * y[500:]).sum(1).mean())  # noqa: E731
    assert cos(trained) > cos(procrustes) + 0.01
    again = build_method("adapter", NEW, OLD, epochs=40, seed=3).fit(data)
    np.testing.assert_array_equal(trained.transform(x[500:]), again.transform(x[500:]))
    # Wrapping the fit as a deployable map draws no random numbers: the adapter's training scores its
    # epochs through that map, and a moved RNG would change the dropout masks that follow.
    state = torch.random.get_rng_state()
    trained.to_map()
    assert torch.equal(state, torch.random.get_rng_state())
    assert trained.history[-1] < trained.history[0]


def test_slerp_interpolates_on_the_sphere():
    rng = np.random.default_rng(0)
    a, b = unit(rng, 5, 8), unit(rng, 5, 8)
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-7)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-7)
    mid = slerp(a, b, 0.5)
    np.testing.assert_allclose(np.linalg.norm(mid, axis=1), 1.0, atol=1e-7)
    np.testing.assert_allclose((mid * a).sum(1), (mid * b).sum(1), atol=1e-7)  # equidistant
    np.testing.assert_allclose(slerp(a, a, 0.3), a, atol=1e-7)  # parallel: no division by zero


def _support(new_q: np.ndarray, old_q: np.ndarray, old_gallery: np.ndarray) -> tuple[PairEmbeddings, PairEmbeddings]:
    n = len(new_q)
    return PairEmbeddings(new_q, new_q, list(range(n)), NEW), PairEmbeddings(old_gallery, old_q, list(range(n)), OLD)


def test_slerp_chooses_its_weight_on_the_support_split():
    rng, _, pair = rotated_world(3)
    xt, yt = pair(300)
    xs, ys = pair(60)
    noise = unit(rng, 60, OLD.dim)
    # The aligned new queries are exact; the old model's own queries are noise: the weight must be 1.
    method = Slerp(NEW, OLD).fit(FitData(xt, yt, xt, yt, _support(xs, noise, ys)))
    assert method.weight == 1.0
    # Now the new queries are noise and the old model is exact: the weight must be 0.
    # (Exact old queries stay perfect under a little noise, so ties may lift the weight a little above 0.)
    method = Slerp(NEW, OLD).fit(FitData(xt, yt, xt, yt, _support(unit(rng, 60, NEW.dim), ys, ys)))
    assert method.support_scores[0.0] == 1.0 and method.support_scores[1.0] < 0.5
    assert method.weight < 0.5 and method.support_scores[method.weight] == 1.0
    assert set(method.support_scores) == set(method.weights)
    # The support may be given in either order; spaces tell which is which.
    new_s, old_s = _support(xs, noise, ys)
    assert Slerp(NEW, OLD).fit(FitData(xt, yt, xt, yt, support=(old_s, new_s))).weight == 1.0


def test_slerp_needs_the_old_query_and_a_support_split():
    _, _, pair = rotated_world()
    x, y = pair(20)
    with pytest.raises(InputError, match="support"):
        Slerp(NEW, OLD).fit(FitData(x, y))
    fixed = Slerp(NEW, OLD, weight=0.5).fit(FitData(x, y, x, y))
    assert fixed.needs_old_model_at_query_time
    with pytest.raises(InputError, match="old model"):
        fixed.transform(x)
    assert fixed.transform(x, y).shape == (20, OLD.dim)
    wrong = PairEmbeddings(x, x, list(range(20)), EmbeddingSpace("other", 24, "x" * 64))
    with pytest.raises(SpaceMismatchError):
        Slerp(NEW, OLD).fit(FitData(x, y, x, y, support=(wrong, PairEmbeddings(y, y, list(range(20)), OLD))))


def test_registry_builds_every_peer_and_refuses_unknown_names():
    for name in PEER_METHODS:
        method = build_method(name, NEW, OLD)
        assert method.name == name
        assert isinstance(method.fits_on, str) and method.fits_on
    assert build_method("slerp", NEW, OLD).needs_old_model_at_query_time
    assert not build_method("adapter", NEW, OLD).needs_old_model_at_query_time
    with pytest.raises(InputError, match="known peers"):
        build_method("svd", NEW, OLD)
    with pytest.raises(InputError, match="options"):
        build_method("affine", NEW, OLD, depth=3)


def test_affine_and_adapter_choose_their_setting_on_the_support_split():
    rng, _, pair = rotated_world(4)
    x, y = pair(300)
    xs, ys = pair(60)
    support = _support(xs, ys, ys)
    # Training targets: the true map plus heavy noise on a third of the rows. Support: clean.
    y_noisy = y.copy()
    y_noisy[:100] = unit(rng, 100, OLD.dim)
    data = FitData(x, y_noisy, x, y_noisy, support)
    affine = build_method("affine", NEW, OLD).fit(data)
    assert affine.ridge in affine.ridge_grid and set(affine.support_scores) == set(affine.ridge_grid)
    assert affine.support_scores[affine.ridge] == max(affine.support_scores.values())
    assert "support" in affine.fits_on
    assert build_method("affine", NEW, OLD).fit(FitData(x, y, x, y)).ridge == 1.0  # no support: the default
    # The adapter keeps its best epoch on the support split; when the rotation is already exact there,
    # extra epochs on noisy targets cannot beat it, so the adapter stays at (or ties with) epoch 0.
    adapter = build_method("adapter", NEW, OLD, epochs=8).fit(data)
    assert set(adapter.support_scores) == set(range(9))
    assert adapter.support_scores[adapter.best_epoch] == max(adapter.support_scores.values())
    assert adapter.best_epoch == min(e for e, s in adapter.support_scores.items() if s == max(adapter.support_scores.values()))
