"""The evaluation runner end to end on toy models: embeddings, fitting, matrix, costs, report files."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xbt.compat.maps import Projection
from xbt.compat.model import CompatibleModel
from xbt.compat.registry import build_method
from xbt.data.pairs import Pair
from xbt.errors import InputError, SpaceMismatchError
from xbt.embed import QueryVectors
from xbt.eval.report import write_report
from xbt.compat.queries import compatible_queries
from xbt.eval.runner import run_evaluation
from xbt.models.base import VLPModel

LATENT = 6


class ToyModel(VLPModel):
    """A two-tower model over a hidden latent per item: images store it in their pixels, captions look it
    up. Both towers share one random linear map, so each model has its own space of the same world."""

    def __init__(self, latents: dict[str, np.ndarray], dim: int, seed: int, name: str):
        super().__init__()
        self.latents, self.dim, self.spec = latents, dim, name
        self.proj = nn.Linear(LATENT, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(np.random.default_rng(seed).standard_normal((dim, LATENT))))

    @property
    def embed_dim(self) -> int:
        return self.dim

    @property
    def image_transform(self):
        return lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32)[0, :LATENT, 0] / 255.0)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.latents[t] for t in texts]).astype(np.float32))

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels - 0.5)

    def forward_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens - 0.5)


def toy_compat(old: ToyModel, new: ToyModel) -> CompatibleModel:
    """Stands in for a trained XBT model: the new model + a (random) linear projection into the old space."""
    torch.manual_seed(0)
    return CompatibleModel(new, Projection(new.dim, old.dim, "linear"), old.space)


def toy_items(folder, n: int, seed: int, two_captions: bool = True) -> tuple[dict, list[Pair]]:
    """n toy images (their latent written into the pixels) with captions near the same latent; with
    `two_captions`, every third image has two. Returns ({caption: latent}, pairs)."""
    rng = np.random.default_rng(seed)
    latents, pairs = {}, []
    for i in range(n):
        z = rng.integers(0, 256, LATENT)
        pixels = np.zeros((1, 8, 3), dtype=np.uint8)
        pixels[0, :LATENT, 0] = z
        path = folder / f"item{i}.png"
        Image.fromarray(pixels).save(path)
        for c in range(2 if two_captions and i % 3 == 0 else 1):
            caption = f"item {i} caption {c}"
            latents[caption] = z / 255.0 + rng.normal(0, 0.08, LATENT)
            pairs.append(Pair(str(path), caption, f"item{i}"))
    return latents, pairs


def toy_world(tmp_path, monkeypatch) -> tuple:
    """(old, new, eval pairs, training pairs, support pairs, latents): 90 toy items, XBT_HOME in tmp_path."""
    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    latents, pairs = toy_items(tmp_path, 90, seed=0)
    old = ToyModel(latents, 8, seed=1, name="toy-old")
    new = ToyModel(latents, 12, seed=2, name="toy-new")
    by_item = lambda lo, hi: [p for p in pairs if lo <= int(p.image_id[4:]) < hi]  # noqa: E731
    return old, new, by_item(0, 40), by_item(40, 70), by_item(70, 90), latents


@pytest.fixture()
def world(tmp_path, monkeypatch):
    return toy_world(tmp_path, monkeypatch)


def test_runner_fits_on_training_data_and_builds_the_matrix(world, tmp_path):
    old, new, eval_pairs, train, support, latents = world
    corpus = [t for t in latents if int(t.split()[1]) >= 40]
    run = run_evaluation(
        old, new, eval_pairs,
        {**{n: n for n in ["no-adaptation", "procrustes-text", "procrustes-image", "affine", "slerp"]},
         "compat:toy": toy_compat(old, new)},
        fit_texts=corpus, fit_pairs=train, support_pairs=support, ks=(1, 5), n_resamples=100,
        data_efficiency=[5, 10, 30],
    )
    m = run.matrix
    assert m.n_queries == {"t2i": len(eval_pairs), "i2t": 40}
    assert set(m.methods) == {"no-adaptation", "procrustes-text", "procrustes-image", "affine", "slerp", "compat:toy"}
    # The toy world is linear: an affine map restores retrieval in the old space; no adaptation cannot.
    assert m.methods["affine"]["t2i"][5].recall.value > m.methods["no-adaptation"]["t2i"][5].recall.value + 20
    assert run.methods["slerp"].needs_old_model_at_query_time and not run.methods["affine"].needs_old_model_at_query_time
    assert 0.0 <= run.methods["slerp"].details["weight"] <= 1.0
    for name in ("affine", "slerp", "no-adaptation"):
        assert all(c is not None and c > 0 for c in run.methods[name].query_cost_us.values())
    # A model method (trained elsewhere): its cost on top of the encoder is its projection's.
    assert run.methods["compat:toy"].kind == "model" and run.methods["affine"].kind == "peer"
    assert all(c > 0 for c in run.methods["compat:toy"].query_cost_us.values())
    # Every method became a deployable compatible model declaring the old space.
    assert set(run.compatible) == set(m.methods)
    assert all(model.space == old.space for model in run.compatible.values())
    assert run.compatible["slerp"].needs_old_model_at_query_time and run.compatible["slerp"].old_model is old
    assert run.warnings == []
    assert {r["n_pairs"] for r in run.data_efficiency} == {5, 10, 30}
    assert {r["method"] for r in run.data_efficiency} >= {"procrustes-image", "affine", "slerp"}

    results = run.to_results()
    json.dumps(results, allow_nan=False)  # strict JSON
    assert results["methods"]["slerp"]["needs_old_model_at_query_time"] is True
    assert results["recommendation"]["reason"]
    paths = write_report(results, tmp_path / "report")
    assert "data:image/png;base64," in paths["html"].read_text()
    assert (tmp_path / "report" / "figures" / "data_efficiency.png").stat().st_size > 1000
    assert "| slerp | yes |" in paths["markdown"].read_text()


def test_map_only_models_are_evaluated_from_cached_features_exactly_as_encoded(world):
    old, new, eval_pairs, train, support, latents = world
    from xbt.embed import embed_pairs

    old_e, new_e = embed_pairs(old, eval_pairs), embed_pairs(new, eval_pairs)
    compat = toy_compat(old, new)
    fast = compatible_queries(compat, eval_pairs, new_e, old_e)  # maps the cached new-model features
    assert not np.allclose(fast.texts, old_e.texts)
    np.testing.assert_allclose(fast.texts, compat.encode_text([p.caption for p in eval_pairs]).numpy(), atol=1e-6)
    # A model whose new tower is not the evaluated new model is encoded through, never mapped.
    other = CompatibleModel(ToyModel(latents, 12, seed=7, name="toy-other"), Projection(12, 8, "linear"), old.space)
    slow = compatible_queries(other, eval_pairs, new_e, old_e)
    np.testing.assert_allclose(slow.texts, other.encode_text([p.caption for p in eval_pairs]).numpy(), atol=1e-6)


def test_runner_refuses_what_is_not_a_compatible_model_of_the_old_space(world):
    old, new, eval_pairs, train, support, latents = world
    from xbt.embed import embed_pairs

    old_e = embed_pairs(old, eval_pairs)
    with pytest.raises(InputError, match="a method is"):
        run_evaluation(old, new, eval_pairs, {"vectors": QueryVectors(old_e.images, old_e.texts, old_e.space)}, n_resamples=10)
    with pytest.raises(InputError, match="unknown method"):
        run_evaluation(old, new, eval_pairs, ["nope"], n_resamples=10)
    imposter = ToyModel(latents, 8, seed=5, name="imposter")  # same dimension as the old model, other weights
    with pytest.raises(SpaceMismatchError):
        run_evaluation(old, new, eval_pairs, {"x": CompatibleModel(new, Projection(12, 8), imposter.space)},
                       n_resamples=10)
    with pytest.raises(InputError, match="fits on text"):
        run_evaluation(old, new, eval_pairs, ["procrustes-text"], n_resamples=10)


def test_leakage_is_reported(world):
    old, new, eval_pairs, train, support, latents = world
    run = run_evaluation(old, new, eval_pairs, [build_method("procrustes-text", new.space, old.space)],
                         fit_texts=[eval_pairs[0].caption, train[0].caption], n_resamples=10, ks=(1,))
    assert len(run.warnings) == 1 and "1 evaluation captions" in run.warnings[0]


def test_peers_without_their_training_data_are_skipped_only_when_asked(world):
    old, new, eval_pairs, train, support, latents = world
    corpus = [p.caption for p in train]
    with pytest.raises(InputError, match="image pairs"):
        run_evaluation(old, new, eval_pairs, ["procrustes-text", "procrustes-image"], fit_texts=corpus, n_resamples=10)
    run = run_evaluation(old, new, eval_pairs, ["procrustes-text", "procrustes-image", "slerp"], fit_texts=corpus,
                         n_resamples=10, ks=(1,), skip_unfittable=True)
    assert list(run.matrix.methods) == ["procrustes-text"]
    assert [w.split(" was left out")[0] for w in run.warnings] == ["procrustes-image", "slerp"]
