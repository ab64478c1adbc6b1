"""XBT: projection, compatible model artifact, both stages, no old model in the loop, resume after interruption."""

from __future__ import annotations

import json

import pytest
import torch

from xbt.compat.maps import Projection
from xbt.data.pairs import Pair
from xbt.compat.model import CompatibleModel
from xbt.errors import InputError, SpaceMismatchError
from xbt.specs import load_model
from xbt.train.stages import StopTraining, train_xbt
from xbt.train.config import XBTConfig


def test_least_squares_init_recovers_a_linear_map():
    torch.manual_seed(0)
    x = torch.randn(200, 12)
    w = torch.randn(6, 12)
    proj = Projection(12, 6, kind="linear")
    proj.init_least_squares(x, x @ w.T + 0.5, ridge=1e-6)
    torch.testing.assert_close(proj(x), x @ w.T + 0.5, atol=1e-3, rtol=1e-3)


def test_mlp_projection_starts_as_its_linear_part():
    proj = Projection(8, 4, kind="mlp", hidden=16)
    x = torch.randn(5, 8)
    torch.testing.assert_close(proj(x), proj.linear(x))


def _fresh_new(cfg, new):
    """A copy of the new model with the same weights (LoRA is injected in place)."""
    torch.manual_seed(1)
    copy = load_model(cfg.new)
    copy.load_state_dict(new.state_dict())
    copy.invalidate_space()
    return copy


def test_train_save_load_roundtrip(tiny_setup, tmp_path, image_files):
    cfg, old, new = tiny_setup
    model = train_xbt(cfg, tmp_path / "run", old=old, new=_fresh_new(cfg, new), show_progress=False)
    assert model.space == old.space  # declares the OLD space
    texts = ["a red apple", "a blue car"]
    out = model.encode_text(texts)
    assert out.shape == (2, old.embed_dim)
    report = json.loads((tmp_path / "run" / "training_report.json").read_text())
    assert report["n_pairs"] == 8 and len(report["stage2"]) == 3 * 2
    # Loading needs the new model and the folder only.
    loaded = CompatibleModel.from_pretrained(tmp_path / "run", new_model=_fresh_new(cfg, new))
    torch.testing.assert_close(loaded.encode_text(texts), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loaded.encode_image(image_files[:2]), model.encode_image(image_files[:2]), atol=1e-5, rtol=1e-4)
    assert (tmp_path / "run" / "lora_text" / "adapter_config.json").exists()
    # The wrong new model is refused.
    torch.manual_seed(5)
    other = load_model(cfg.new)
    with pytest.raises(SpaceMismatchError):
        CompatibleModel.from_pretrained(tmp_path / "run", new_model=other)


def test_training_loop_never_calls_the_old_model(tiny_setup, tmp_path, monkeypatch):
    import xbt.train.stages as trainer

    cfg, old, new = tiny_setup
    real_prepare = trainer.prepare_data

    def prepare_then_forbid(old_model, *args, **kwargs):
        data = real_prepare(old_model, *args, **kwargs)

        def forbidden(*a, **k):
            raise AssertionError("the old model was called during training")

        for name in ("forward_text", "forward_image", "encode_text", "encode_image"):
            monkeypatch.setattr(old_model, name, forbidden)
        return data

    monkeypatch.setattr(trainer, "prepare_data", prepare_then_forbid)
    train_xbt(cfg, tmp_path / "run", old=old, new=_fresh_new(cfg, new), show_progress=False)
    # And a second run reads the old embeddings from the cache only.
    monkeypatch.setattr(trainer, "prepare_data", real_prepare)
    for name in ("forward_text", "forward_image"):
        monkeypatch.setattr(old, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("old model called")))
    train_xbt(cfg, tmp_path / "run2", old=old, new=_fresh_new(cfg, new), show_progress=False)


@pytest.mark.parametrize("stop", [(3, None), (None, 3)])
def test_resume_after_interruption_matches_uninterrupted(tiny_setup, tmp_path, stop):
    cfg, old, new = tiny_setup
    full = train_xbt(cfg, tmp_path / "full", old=old, new=_fresh_new(cfg, new), show_progress=False)
    with pytest.raises(StopTraining):
        train_xbt(cfg, tmp_path / "cut", old=old, new=_fresh_new(cfg, new), stop_after=stop, show_progress=False)
    resumed = train_xbt(cfg, tmp_path / "cut", old=old, new=_fresh_new(cfg, new), show_progress=False)
    want, got = full.projection.state_dict(), resumed.projection.state_dict()
    assert want.keys() == got.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    want, got = full.lora_state("text"), resumed.lora_state("text")
    assert want.keys() == got.keys() and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)


def test_resume_refuses_another_config(tiny_setup, tmp_path):
    cfg, old, new = tiny_setup
    with pytest.raises(StopTraining):
        train_xbt(cfg, tmp_path / "run", old=old, new=_fresh_new(cfg, new), stop_after=(2, None), show_progress=False)
    cfg.stage1.lr = 0.5
    with pytest.raises(InputError, match="another config"):
        train_xbt(cfg, tmp_path / "run", old=old, new=_fresh_new(cfg, new), show_progress=False)


def test_config_rejects_unknown_keys():
    with pytest.raises(InputError, match="unknown"):
        XBTConfig.from_dict({"stage3": {}})


def test_chained_upgrade_serves_the_first_space(tiny_setup, tmp_path):
    from xbt.compat.model import chain

    cfg, v1, v2 = tiny_setup
    torch.manual_seed(7)
    v3 = load_model(cfg.old)  # same architecture and dimension as v1, other weights: a different space
    assert v3.space != v1.space

    def fresh_v3():  # adapters are injected in place: every compatible model gets its own copy
        copy = load_model(cfg.old)
        copy.load_state_dict(v3.state_dict())
        copy.invalidate_space()
        return copy

    c21 = train_xbt(cfg, tmp_path / "c21", old=v1, new=_fresh_new(cfg, v2), show_progress=False)
    cfg32 = XBTConfig.from_dict(cfg.to_dict() | {"old": cfg.new, "new": cfg.old})
    c32 = train_xbt(cfg32, tmp_path / "c32", old=v2, new=fresh_v3(), show_progress=False)
    with pytest.raises(InputError, match="already carries LoRA adapters"):
        CompatibleModel.from_pretrained(tmp_path / "c32", new_model=c32.new_model)  # would stack a second set
    chained = chain(CompatibleModel.from_pretrained(tmp_path / "c32", new_model=fresh_v3()), c21)
    assert chained.space == v1.space
    texts = ["a red apple", "two birds in the sky"]
    expected = torch.nn.functional.normalize(
        c21.projection(torch.nn.functional.normalize(c32.encode_text(texts), dim=-1)), dim=-1)
    torch.testing.assert_close(chained.encode_text(texts), expected, atol=1e-5, rtol=1e-4)
    chained.save_pretrained(tmp_path / "c31")
    reloaded = CompatibleModel.from_pretrained(tmp_path / "c31", new_model=CompatibleModel.from_pretrained(tmp_path / "c32", new_model=fresh_v3()))
    torch.testing.assert_close(reloaded.encode_text(texts), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(SpaceMismatchError):
        chain(c21, c21)  # c21 emits v1 vectors, but c21 expects v2 input


def test_an_enabled_stage_without_its_data_is_refused_not_skipped(tiny_setup, tmp_path):
    """Before the fix, stage 1 with an empty corpus (or stage 2 with fewer than 2 pairs) was skipped in silence
    and the run saved a model that had never trained; max_pairs 0 (a data-efficiency point) is on purpose."""
    cfg, old, new = tiny_setup
    with pytest.raises(InputError, match="stage 1 .* text corpus is empty"):
        train_xbt(cfg, tmp_path / "a", old=old, new=_fresh_new(cfg, new), show_progress=False, text_corpus=[])
    with pytest.raises(InputError, match="stage 2 .* 1 image-text pairs"):
        train_xbt(cfg, tmp_path / "b", old=old, new=_fresh_new(cfg, new), show_progress=False, train_pairs=[Pair("x.png", "one", "x")])
    assert not (tmp_path / "a" / "compat_config.json").exists() and not (tmp_path / "b" / "compat_config.json").exists()
