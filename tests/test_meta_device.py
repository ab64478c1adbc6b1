"""The device guard that a CPU-only machine can run: every function where device bugs live, with its
modules (and its device-side inputs) on PyTorch's `meta` device.

A meta tensor has a shape and no data, and any operation that mixes it with a CPU tensor raises ("Tensor on
device cpu is not on the expected device meta!"), exactly where a CUDA run would raise "Expected all tensors
to be on the same device". So a function that makes a tensor on the CPU (a factory without `device=`, a
NumPy array turned into a tensor, a generator's draw left on the CPU) and feeds it to a module on another
device fails here, on any machine, in milliseconds. A function whose contract ends on the host (NumPy out,
a Python float out) may stop at that last copy ("Cannot copy out of meta tensor", ".item() on meta"):
`ends_on_host` marks them, and every device mix before that point still fails the test.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from xbt.compat.maps import LinearMap, OldQueryBlend, Projection, ResidualMap, SlerpMap
from xbt.eval.runner import map_query_cost

META = torch.device("meta")


def run_on_meta(fn, ends_on_host: bool = False):
    """fn(); a device mix raises (the test fails); the host copy that ends a host-returning function does not."""
    try:
        return fn()
    except NotImplementedError as exc:
        if ends_on_host and "copy out of meta" in str(exc):
            return None
        raise
    except RuntimeError as exc:
        if ends_on_host and "cannot be called on meta" in str(exc):
            return None
        raise


def query_maps() -> dict[str, nn.Module]:
    return {
        "linear": LinearMap(6, 4, bias=True),
        "residual": ResidualMap(6, 4, hidden=8),
        "slerp": SlerpMap(6, 4, weight=0.3),
        "projection-mlp": Projection(6, 4, "mlp", hidden=8),
        "projection-linear": Projection(6, 4, "linear"),
        "old-query-blend": OldQueryBlend(6, 4, weight=0.2, projection=Projection(6, 4, "linear")),
    }


# ----- query maps and their timing ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(query_maps()))
def test_map_query_cost_times_the_map_where_it_is(kind):
    """The evaluation's per-query cost: its random queries must be made on the map's device (item 1)."""
    query_map = query_maps()[kind].to(META)
    costs = run_on_meta(lambda: map_query_cost(query_map, batch_sizes=(1, 3)))
    assert set(costs) == {1, 3} and all(c >= 0 for c in costs.values())


@pytest.mark.parametrize("kind", list(query_maps()))
def test_query_map_apply_feeds_numpy_to_the_maps_device(kind):
    """QueryMap.apply (the evaluation's path on cached NumPy features) moves its inputs to the map."""
    query_map = query_maps()[kind].to(META)
    new = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    old = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    run_on_meta(lambda: query_map.apply(new, old), ends_on_host=True)


# ----- initialisations --------------------------------------------------------------------------------------
def test_init_least_squares_on_the_datas_device():
    """Training's `lstsq` start: the data is on the training device (item 2)."""
    projection = Projection(6, 4, "mlp", hidden=8).to(META)
    new, old = torch.randn(10, 6, device=META), torch.randn(10, 4, device=META)
    run_on_meta(lambda: projection.init_least_squares(new, old))
    assert projection.linear.weight.device == META


def test_init_linear_on_the_projections_device():
    projection = Projection(6, 4, "linear").to(META)
    weight = np.eye(6, 4, dtype=np.float32)
    run_on_meta(lambda: projection.init_linear(weight))  # no bias: a zero bias made where the projection is
    run_on_meta(lambda: projection.init_linear(weight, np.ones(4, dtype=np.float32)))


def test_orthogonality_gap_on_the_projections_device():
    projection = Projection(6, 4, "linear").to(META)
    assert run_on_meta(projection.orthogonality_gap).device == META


# ----- heads and towers ---------------------------------------------------------------------------------------
class _TextTower(nn.Module):
    """A stand-in text tower: token ids (a tokenizer's dict) -> features, with the interface testbed uses."""

    out_dim = 5

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, self.out_dim)

    def forward(self, tokens):
        return self.embed(tokens["input_ids"]).mean(1)


def test_lit_head_vectors_move_tower_features_to_the_head():
    """prime_lit_cache's heads over CPU tower features (item 3)."""
    from xbt.embed import head_vectors
    from xbt.models.lit import Head

    head = Head(7, 3).to(META)
    assert run_on_meta(lambda: head_vectors(head, torch.randn(4, 7))).device == META


def test_tower_outputs_move_pixels_and_tokens_to_the_tower():
    """The testbed's tower features: CPU pixels and CPU token ids into a tower on another device (item 3)."""
    from xbt.data.testbed import tower_outputs

    image_tower = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).to(META)
    assert run_on_meta(lambda: tower_outputs(image_tower, torch.randn(2, 3, 2, 2))).device == META
    text_tower = _TextTower().to(META)
    tokens = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    assert run_on_meta(lambda: tower_outputs(text_tower, tokens)).device == META


class _StandInTower(nn.Module):
    """A locked tower with the interface the testbed's feature functions use (cache_id, out_dim, transform,
    tokenize), tiny and without weights files."""

    cache_id, out_dim = "stand-in-tower", 5

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, self.out_dim))
        self.text = _TextTower()

    def transform(self, image):
        return torch.from_numpy(np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)

    def tokenize(self, texts):
        ids = torch.tensor([[1 + len(t) % 9, 2, 3] for t in texts])  # cpu-only: a tokenizer's output is on the host
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forward(self, inputs):
        return self.text(inputs) if isinstance(inputs, dict) else self.image(inputs)


def test_testbed_tower_features_feed_the_towers_device(xbt_home, image_files):
    """tower_text_features / tower_image_features (the testbed's and prime_lit_cache's tower pass) with the
    tower on the device: CPU token ids and pixels go there; the cache takes host vectors (item 3)."""
    from xbt.data.testbed import tower_image_features, tower_text_features

    tower = _StandInTower().to(META)
    run_on_meta(lambda: tower_text_features(tower, ["a red apple", "two dogs"], show_progress=False), ends_on_host=True)
    run_on_meta(lambda: tower_image_features(tower, [str(p) for p in image_files[:2]], show_progress=False),
                ends_on_host=True)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_a_vlp_models_encoders_feed_its_device(modality, tiny_openclip_names):
    """encode_image / encode_text: the pixels and token ids go to the model's device; the CPU output buffer
    is the contract (so the copy into it is where a meta run stops)."""
    from xbt.specs import load_model

    model = load_model(f"openclip:{tiny_openclip_names[0]}").to(META)
    if modality == "image":
        run_on_meta(lambda: model.encode_image(torch.randn(2, 3, 32, 32)), ends_on_host=True)
    else:
        run_on_meta(lambda: model.encode_text(["a red apple", "two dogs"]), ends_on_host=True)


# ----- the training step ----------------------------------------------------------------------------------------
def test_stage1_step_runs_on_the_training_device(tmp_path, monkeypatch):
    """One real stage-1 step (noise from the CPU step generator, in-batch targets, InfoNCE, cosine, the
    projection's penalties) with the projection and the training data on the device."""
    import xbt.train.stages as stages

    cfg = stages.XBTConfig.from_dict({"old": "x", "new": "y", "projection": {"kind": "mlp", "hidden": 8, "dropout": 0.0,
                                      "orthogonality_weight": 0.1, "anchor_weight": 0.1},
                                      "stage1": {"batch_size": 4, "noise_std": 0.2}})
    projection = Projection(6, 4, "mlp", hidden=8).to(META)
    empty = torch.zeros(0, 1, device=META)
    data = stages.TrainingData(corpus=["t"] * 8, corpus_new=torch.randn(8, 6, device=META),
                               corpus_old=torch.randn(8, 4, device=META), pairs=[], pair_image_index=[],
                               new_images=empty, old_images=empty, old_texts=empty, new_texts=empty)
    losses = []

    def one_step(model, groups, weight_decay, schedule, make_step, **kwargs):
        loss, parts = make_step()(0, torch.arange(4), torch.Generator().manual_seed(0))
        losses.append((loss, parts))
        return []

    monkeypatch.setattr(stages, "train_loop", one_step)
    run_on_meta(lambda: stages.run_stage1(types.SimpleNamespace(projection=projection), data, cfg, tmp_path,
                                          show_progress=False))
    loss, parts = losses[0]
    assert loss.device == META and {"infonce", "cosine", "orthogonality", "anchor"} <= set(parts)


def test_training_loss_terms_on_the_device():
    from xbt.train.stages import add_noise, multi_positive_infonce

    x, keys = torch.randn(4, 6, device=META), torch.randn(4, 6, device=META)
    positives = torch.eye(4, dtype=torch.bool, device=META)
    assert run_on_meta(lambda: add_noise(x, 0.3, torch.Generator().manual_seed(0))).device == META
    assert run_on_meta(lambda: multi_positive_infonce(x, keys, positives, 0.05)).device == META


# ----- calibration and batching helpers -------------------------------------------------------------------------
def test_calibration_takes_vectors_from_any_device():
    """Score calibration works on the host by design (NumPy, float64 means): device vectors are copied there
    first, never mixed with host ones."""
    from xbt.ranking.nnn import top_k_mean

    bank = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    run_on_meta(lambda: top_k_mean(torch.randn(3, 4, device=META), bank, k=2), ends_on_host=True)


def test_out_of_memory_halving_keeps_rows_on_the_device():
    from xbt.models.device import split_on_oom

    x = torch.randn(6, 4, device=META)
    assert run_on_meta(lambda: split_on_oom(lambda a, b: x[a:b] * 2, 6, META)).shape == (6, 4)
