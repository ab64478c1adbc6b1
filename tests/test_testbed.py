"""The offline testbed on real data and real towers (slow: builds or reuses the cached testbed)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def testbed():
    from xbt.train.testbed import build_testbed

    return build_testbed(("old", "new"), show_progress=False)


def test_splits_never_leak_evaluation_captions(testbed):
    from xbt.data.testbed import load_split, load_text_corpus

    eval_pairs, val_pairs = load_split("eval"), load_split("val")
    assert len(eval_pairs) >= 280
    eval_captions = {p.caption.lower() for p in eval_pairs}
    assert len(eval_captions) == len(eval_pairs), "eval must hold one image per unique caption"
    held_out = eval_captions | {p.caption.lower() for p in val_pairs}
    for split in ("vlp_old", "vlp_new", "xbt_train"):
        assert not held_out & {p.caption.lower() for p in load_split(split)}, split
    assert not held_out & {c.lower() for c in load_text_corpus()}
    eval_images = {p.image for p in eval_pairs}
    assert not eval_images & {p.image for p in load_split("vlp_new")}


def test_new_model_beats_old_and_naive_cross_space_fails(testbed):
    from xbt.compat.baselines import NoAdaptation
    from xbt.data.testbed import load_split
    from xbt.embed import embed_pairs
    from xbt.eval.matrix import evaluate_upgrade
    from xbt.eval.runner import map_queries
    from xbt.specs import load_model

    pairs = load_split("eval")
    old, new = load_model("testbed:old"), load_model("testbed:new")
    old_emb, new_emb = embed_pairs(old, pairs), embed_pairs(new, pairs)
    naive = map_queries(NoAdaptation(new.space, old.space).to_model(new), new_emb, old_emb)
    m = evaluate_upgrade(old_emb, new_emb, {"none": naive}, n_resamples=200)
    for d in ("t2i", "i2t"):
        assert m.new_new[d][1].value > m.old_old[d][1].value
        chance = 100 * 10 / len(pairs)  # R@10 of random ranking
        assert m.methods["none"][d][10].recall.value < 3 * chance
        assert not m.methods["none"][d][1].passes_confidently


def test_lit_model_roundtrip_and_batch_invariance(testbed, tmp_path):
    import torch

    from xbt.data.testbed import load_split
    from xbt.specs import load_model
    from xbt.models.lit import LitModel

    old = load_model("testbed:old")
    old.save_pretrained(tmp_path / "copy")
    again = LitModel.from_pretrained(tmp_path / "copy")
    assert again.space.fingerprint == old.space.fingerprint
    pairs = load_split("eval")[:6]
    images = [p.image for p in pairs]
    torch.testing.assert_close(again.encode_image(images, batch_size=4), old.encode_image(images, batch_size=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again.encode_text([p.caption for p in pairs], batch_size=5),
                               old.encode_text([p.caption for p in pairs], batch_size=2), atol=1e-5, rtol=1e-4)
    assert not any(f.suffix in (".pt", ".pth", ".pkl", ".bin") for f in (tmp_path / "copy").iterdir())


def test_cached_tower_features_equal_the_encoding_pipeline(testbed):
    """Locked towers stay in inference mode: cached features (used to train heads) are what encode_* computes."""
    import torch

    from xbt.data.testbed import load_split, tower_image_features
    from xbt.specs import load_model

    model = load_model("testbed:old")
    pairs = load_split("val")[:5]
    model.train()  # a training loop switching modes must not change a locked tower
    assert not model.image_tower.training and not model.text_tower.training
    cached = torch.from_numpy(tower_image_features(model.image_tower, [p.image for p in pairs], False))
    expected = model.encode_image([p.image for p in pairs])
    torch.testing.assert_close(torch.nn.functional.normalize(model.image_head(cached), dim=-1), expected, atol=1e-4, rtol=1e-3)
