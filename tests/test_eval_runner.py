"""The evaluation runner end to end on toy models: embeddings, fitting, matrix, costs, report files."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xbt.compat.registry import build_method
from xbt.data.pairs import Pair
from xbt.errors import InputError, SpaceMismatchError
from xbt.eval.matrix import QueryVectors
from xbt.eval.report import write_report
from xbt.eval.runner import PrecomputedMethod, run_evaluation
from xbt.models.base import EmbeddingSpace, VLPModel

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


class ToyCompat(ToyModel):
    """Stands in for an XBT model: declares the OLD space as its own (as CompatibleModel does)."""

    needs_old_model_at_query_time = False
    fits_on = "toy"

    def __init__(self, old: ToyModel, latents):
        super().__init__(latents, old.dim, seed=99, name="compat:toy")
        with torch.no_grad():
            self.proj.weight.copy_(old.proj.weight + 0.01)
        self._old_space = old.space

    @property
    def space(self) -> EmbeddingSpace:
        return self._old_space

    @property
    def encoder_id(self) -> str:  # as CompatibleModel: cached under its own weights, not the declared space
        from xbt.models.base import weights_fingerprint

        return f"toy-compat-{weights_fingerprint(self)[:16]}"


@pytest.fixture()
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    latents, pairs = {}, []
    for i in range(90):
        z = rng.integers(0, 256, LATENT)
        pixels = np.zeros((1, 8, 3), dtype=np.uint8)
        pixels[0, :LATENT, 0] = z
        path = tmp_path / f"item{i}.png"
        Image.fromarray(pixels).save(path)
        for c in range(2 if i % 3 == 0 else 1):  # some images have two captions
            caption = f"item {i} caption {c}"
            latents[caption] = z / 255.0 + rng.normal(0, 0.08, LATENT)
            pairs.append(Pair(str(path), caption, f"item{i}"))
    old = ToyModel(latents, 8, seed=1, name="toy-old")
    new = ToyModel(latents, 12, seed=2, name="toy-new")
    by_item = lambda lo, hi: [p for p in pairs if lo <= int(p.image_id[4:]) < hi]  # noqa: E731
    return old, new, by_item(0, 40), by_item(40, 70), by_item(70, 90), latents


def test_runner_fits_on_training_data_and_builds_the_matrix(world, tmp_path):
    old, new, eval_pairs, train, support, latents = world
    corpus = [t for t in latents if int(t.split()[1]) >= 40]
    compat = ToyCompat(old, latents)
    run = run_evaluation(
        old, new, eval_pairs, ["no-adaptation", "procrustes-text", "procrustes-image", "affine", "slerp", compat],
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
    # A model method: its cost on top of the encoder is unknown here (no separable projection).
    assert run.methods["compat:toy"].kind == "model"
    assert run.methods["compat:toy"].query_cost_us == {1: None, 256: None}
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


def test_compat_model_queries_are_not_the_old_models_cached_vectors(world):
    old, new, eval_pairs, train, support, latents = world
    from xbt.eval.embed import embed_pairs
    from xbt.eval.runner import model_queries

    old_vectors = embed_pairs(old, eval_pairs)  # fills the cache under the old space
    compat = ToyCompat(old, latents)
    queries = model_queries(compat, eval_pairs)
    assert not np.allclose(queries.texts, old_vectors.texts)
    expected = compat.encode_text([p.caption for p in eval_pairs]).numpy()
    np.testing.assert_allclose(queries.texts, expected, atol=1e-6)


def test_runner_accepts_precomputed_vectors_and_refuses_mismatches(world):
    old, new, eval_pairs, train, support, latents = world
    from xbt.eval.embed import embed_pairs

    old_e = embed_pairs(old, eval_pairs)
    run = run_evaluation(
        old, new, eval_pairs,
        {"old-again": PrecomputedMethod(QueryVectors(old_e.images, old_e.texts), fits_on="nothing")},
        n_resamples=50, ks=(1,),
    )
    cell = run.matrix.methods["old-again"]["i2t"][1]
    assert cell.vs_old.value == 0 and not cell.passes
    with pytest.raises(InputError, match="need a name"):
        run_evaluation(old, new, eval_pairs, [QueryVectors(old_e.images, old_e.texts)], n_resamples=10)
    with pytest.raises(InputError, match="unknown method"):
        run_evaluation(old, new, eval_pairs, ["nope"], n_resamples=10)
    with pytest.raises(SpaceMismatchError):
        run_evaluation(old, new, eval_pairs, [ToyModel(latents, 8, seed=5, name="imposter")], n_resamples=10)
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
