"""XBT v2: stage 2 with the frozen text blocks cached (the same model as the full forward, faster),
the Procrustes-initialised projection kept near-orthogonal, and the ensemble with the old model's query."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CORPUS

from xbt.errors import InputError

LAYERS = 4


def build_tiny_st(folder: Path, arch: str) -> Path:
    """A sentence-transformers folder over a tiny random BERT or MPNet (4 blocks, 32 wide) with a real word-level
    tokenizer: a BERT-style encoder like the testbed's mpnet, built offline in a second."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import AutoModel, BertConfig, MPNetConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    tok = Tokenizer(tok_models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS * 3, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=32)
    dims = {"vocab_size": tok.get_vocab_size(), "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 64, "pad_token_id": 0}
    config = BertConfig(**dims) if arch == "bert" else MPNetConfig(**dims)
    st = folder / "st"  # the layout of the shipped towers: the transformer at the top, then pooling, normalisation
    AutoModel.from_config(config).save_pretrained(st)
    fast.save_pretrained(st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (st / "2_Normalize").mkdir()
    return folder / "st"


def build_tiny_lit(folder: Path, arch: str, embed_dim: int = 16, seed: int = 0) -> str:
    """A lit model (EfficientNet-Lite0 + the tiny text tower, random heads) saved as lit:FOLDER."""
    from xbt.models.lit import LitModel

    st = build_tiny_st(folder / "text", arch)
    torch.manual_seed(seed)
    model = LitModel({"kind": "efficientnet-lite", "variant": "lite0"}, {"kind": "sentence-transformers", "source": str(st)},
                     embed_dim, name=f"tiny-{arch}-{seed}")
    model.save_pretrained(folder / "lit")
    return f"lit:{folder / 'lit'}"


@pytest.fixture(scope="module", params=["bert", "mpnet"])
def tiny_lit(request, tmp_path_factory) -> str:
    return build_tiny_lit(tmp_path_factory.mktemp(f"lit_{request.param}"), request.param)


CAPTIONS = CORPUS + ["a cup", "the sea at night and a very small boat far away on the water", "a dog"]


# ----- the split forward of the text tower -----------------------------------------------------------------
def test_split_text_forward_is_the_full_forward_at_every_layer(tiny_lit):
    from xbt.specs import load_model

    tower = load_model(tiny_lit).text_tower
    assert len(tower.encoder_layers()) == LAYERS
    tokens = tower.tokenize(CAPTIONS)
    full = tower(tokens)
    for n in range(LAYERS + 1):
        torch.testing.assert_close(tower.forward_from(tokens, tower.hidden_after(tokens, n), n), full, atol=1e-6, rtol=1e-5)
    # The blocks are back in place and the embedding layer unhooked afterwards.
    assert len(tower.encoder_layers()) == LAYERS and not tower.transformer.embeddings._forward_hooks
    torch.testing.assert_close(tower(tokens), full)
    # A caption's states do not depend on the batch it was padded in.
    alone = tower.tokenize(CAPTIONS[:1])
    width = int(alone["attention_mask"].sum())
    torch.testing.assert_close(tower.hidden_after(alone, 2)[0], tower.hidden_after(tokens, 2)[0, :width], atol=1e-6, rtol=1e-5)


def _adapted_model(spec: str, layers, r: int = 2):
    """A compatible model over `spec` with text LoRA on `layers`, its B matrices moved off zero (else the
    adapters would change nothing and the test could not fail)."""
    from xbt.compat.maps import Projection
    from xbt.compat.model import CompatibleModel
    from xbt.models.base import EmbeddingSpace
    from xbt.specs import load_model

    new = load_model(spec)
    model = CompatibleModel(new, Projection(new.embed_dim, 8, "linear"), EmbeddingSpace("old", 8, "0" * 64))
    params = model.enable_lora("text", {"r": r, "alpha": 2 * r, "dropout": 0.0, "layers": layers})
    torch.manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    return model


def _cached_vs_full(model, captions, n_layers, atol=1e-5):
    from xbt.train.stages import CaptionCache, _Stage2Forward

    cache = CaptionCache(model, captions, n_layers, torch.device("cpu"), chunk=3)  # chunks of other lengths than the batch
    idx = torch.tensor([4, 0, 9, 2, 10])
    tokens, hidden = cache.batch(idx)
    expected_tokens = model.tokenize([captions[i] for i in idx])
    for key, value in expected_tokens.items():  # padded to the batch's longest caption, as the tokenizer pads it
        if isinstance(value, torch.Tensor):
            assert torch.equal(tokens[key], value), key
    images = F.normalize(torch.randn(len(idx), model.new_model.embed_dim), dim=-1)
    outputs, grads = [], []
    for forward, text in ((_Stage2Forward(model, True, False, n_layers), (tokens, hidden)),
                          (_Stage2Forward(model, True, False, 0), expected_tokens)):
        model.zero_grad(set_to_none=True)
        new_text, proj_text, proj_image = forward(text, images)
        loss = (proj_text * proj_image).sum() + new_text.pow(3).sum()
        loss.backward()
        outputs.append((new_text.detach(), proj_text.detach(), loss.detach()))
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)
    torch.testing.assert_close(outputs[0][0], model.new_text(expected_tokens).detach(), atol=atol, rtol=1e-4)
    return cache


def test_cached_stage2_forward_gives_the_full_forward_and_its_gradients(tiny_lit):
    from xbt.compat.lora import frozen_text_prefix

    model = _adapted_model(tiny_lit, [2, 3])
    assert frozen_text_prefix(model.new_model) == 2
    cache = _cached_vs_full(model, CAPTIONS, 2)
    assert cache.states.shape[0] == int(cache.lengths.sum())  # held without padding
    assert frozen_text_prefix(_adapted_model(tiny_lit, None).new_model) is None  # adapters everywhere: nothing to cache
    assert frozen_text_prefix(_adapted_model(tiny_lit, [0, 3]).new_model) is None


def _config(tmp_path: Path, new: str, old: str, images, **stage2):
    from xbt.train.config import XBTConfig

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(p), "caption": c}) + "\n" for p, c in zip(images, CORPUS)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS + ["a small bird", "a big red bus", "the sea at night", "a cup of tea"]))
    s2 = {"epochs": 2, "batch_size": 3, "lora": {"r": 2, "alpha": 4, "dropout": 0.1, "layers": [2, 3]}} | stage2
    return XBTConfig.from_dict({
        "old": old, "new": new, "train_pairs": str(pairs), "text_corpus": str(corpus), "checkpoint_every": 2,
        "projection": {"kind": "linear", "init": "lstsq"},
        "stage1": {"epochs": 1, "batch_size": 4, "noise_std": 0.2}, "stage2": s2,
    })


def _states(model):
    return {**{f"map.{k}": v for k, v in model.projection.state_dict().items()},
            **{f"lora.{k}": v for k, v in model.lora_state("text").items()}}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


@pytest.fixture()
def lit_pair(tmp_path_factory, tiny_openclip_names):
    return build_tiny_lit(tmp_path_factory.mktemp("lit_mpnet_train"), "mpnet"), f"openclip:{tiny_openclip_names[0]}"


def test_training_with_the_cache_is_training_without_it_and_resumes_exactly(lit_pair, image_files, tmp_path, xbt_home):
    from xbt.specs import load_model
    from xbt.train.stages import StopTraining, train_xbt

    new, old_spec = lit_pair
    torch.manual_seed(0)
    old = load_model(old_spec)
    cfg = _config(tmp_path, new, old_spec, image_files)
    cached = train_xbt(cfg, tmp_path / "cached", old=old, new=load_model(new), show_progress=False)
    report = json.loads((tmp_path / "cached" / "training_report.json").read_text())
    assert report["stage2_text_cache"]["frozen_layers"] == 2 and report["stage2_text_cache"]["captions"] == 8
    full_cfg = _config(tmp_path, new, old_spec, image_files, cache_frozen_text=False)
    full = train_xbt(full_cfg, tmp_path / "full", old=old, new=load_model(new), show_progress=False)
    assert json.loads((tmp_path / "full" / "training_report.json").read_text())["stage2_text_cache"].startswith("off")
    _assert_same(_states(cached), _states(full))
    assert max(v.abs().max().item() for k, v in cached.lora_state("text").items() if "lora_B" in k) > 1e-3  # it trained
    # Gradient checkpointing (the adapted blocks recomputed in backward, LoRA dropout replayed): the same model,
    # on the cached path and on the whole tower; the blocks really ran checkpointed, and it is off afterwards.
    from xbt.models import towers

    calls = []
    plain_forward = towers._Checkpointed.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return plain_forward(self, *args, **kwargs)

    towers._Checkpointed.forward = counted
    try:
        for name, extra in (("ckpt", {}), ("ckpt-full", {"cache_frozen_text": False})):
            ckpt_cfg = _config(tmp_path, new, old_spec, image_files, gradient_checkpointing=True, **extra)
            ckpt = train_xbt(ckpt_cfg, tmp_path / name, old=old, new=load_model(new), show_progress=False)
            note = json.loads((tmp_path / name / "training_report.json").read_text())["stage2_gradient_checkpointing"]
            assert note.startswith("on") and calls and not ckpt.new_model.text_tower.checkpoint_blocks
            _assert_same(_states(ckpt), _states(cached))
            calls.clear()
    finally:
        towers._Checkpointed.forward = plain_forward
    with pytest.raises(StopTraining):
        train_xbt(cfg, tmp_path / "cut", old=old, new=load_model(new), stop_after=(None, 3), show_progress=False)
    resumed = train_xbt(cfg, tmp_path / "cut", old=old, new=load_model(new), show_progress=False)
    _assert_same(_states(resumed), _states(cached))


# ----- slow: the real tower, and two processes ---------------------------------------------------------------
def _testbed_new() -> str:
    """The testbed's new model, built here where no earlier test built it (cached: free when it was)."""
    from xbt.train.testbed import build_testbed

    info = build_testbed(("old", "new"), show_progress=False)
    folder = Path(info["root"]) / "models" / "new"
    assert (folder / "config.json").exists(), f"the testbed build left no model in {folder}"
    return f"lit:{folder}"


@pytest.mark.slow
def test_cached_path_on_the_real_mpnet_tower():
    model = _adapted_model(_testbed_new(), [8, 9, 10, 11], r=8)
    captions = ["a red apple", "a penguin on the ice holding a small fish", "a yellow school bus", "stars",
                "an old wooden house with a red door and two windows", "a cat", "a blue car", "the sun",
                "two birds in the sky", "a violin", "a birthday cake with candles"]
    _cached_vs_full(model, captions, 8, atol=2e-5)


@pytest.mark.slow
def test_two_processes_train_the_cached_single_process_model(lit_pair, image_files, tmp_path, xbt_home):
    import yaml
    from safetensors.torch import load_file

    import xbt
    from xbt.train.stages import train_xbt

    new = lit_pair[0]
    old = build_tiny_lit(tmp_path / "old", "bert", embed_dim=12, seed=1)  # on disk: the torchrun ranks load it too
    cfg = _config(tmp_path, new, old, image_files, lora={"r": 2, "alpha": 4, "dropout": 0.0, "layers": [2, 3]})
    path = tmp_path / "xbt.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    train_xbt(cfg, tmp_path / "single", show_progress=False)
    src = str(Path(xbt.__file__).parents[1])
    env = {**os.environ, "XBT_HOME": str(xbt_home), "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "xbt.cli", "train", "--config", str(path), "--out", str(tmp_path / "ddp"),
                          "--nproc", "2"], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "training_report.json").read_text())
    single = json.loads((tmp_path / "single" / "training_report.json").read_text())
    assert report["processes"] == 2 and report["stage2_text_cache"]["frozen_layers"] == 2
    for a, b in zip(report["stage2"], single["stage2"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    for name in ("map.safetensors", "lora_text/adapter_model.safetensors"):
        got, want = load_file(str(tmp_path / "ddp" / name)), load_file(str(tmp_path / "single" / name))
        _assert_same(got, want)
    assert np.isfinite([s["loss"] for s in report["stage2"]]).all()


# ----- projection v2: the procrustes-both start, kept near-orthogonal ----------------------------------------
def test_init_linear_and_the_orthogonality_gap():
    from xbt.compat.maps import Projection

    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12))
    proj = Projection(12, 6, "linear")
    proj.init_linear(q[:, :6].numpy())
    x = torch.randn(5, 12)
    torch.testing.assert_close(proj(x), x @ q[:, :6])
    assert proj.orthogonality_gap().item() < 1e-10  # orthonormal columns: an isometry of the smaller space
    with torch.no_grad():
        proj.linear.weight.mul_(1.5)
    assert proj.orthogonality_gap().item() == pytest.approx((1.5**2 - 1) ** 2, rel=1e-4)  # (k (s^2-1)^2) / k
    wide = Projection(6, 12, "linear")  # into a larger space: the Gram over the input side
    wide.init_linear(q[:6, :].numpy())
    assert wide.orthogonality_gap().item() < 1e-10
    with pytest.raises(InputError, match=r"\(6, 12\) matrix"):
        wide.init_linear(q[:, :6].numpy())


def test_projection_config_refuses_unknown_inits_and_negative_weights():
    from xbt.train.config import XBTConfig

    with pytest.raises(InputError, match="projection.init"):
        XBTConfig.from_dict({"projection": {"init": "procrustez"}})
    with pytest.raises(InputError, match="projection.kind"):
        XBTConfig.from_dict({"projection": {"kind": "mlpp"}})
    with pytest.raises(InputError, match=">= 0"):
        XBTConfig.from_dict({"projection": {"orthogonality_weight": -1}})


def _copy(spec, model):
    from xbt.specs import load_model

    copy = load_model(spec)
    copy.load_state_dict(model.state_dict())
    copy.invalidate_space()
    return copy


def test_procrustes_init_is_the_procrustes_both_peer(tiny_setup, tmp_path):
    from xbt.compat.fit import fit_peer
    from xbt.data.datasets import open_dataset
    from xbt.data.texts import load_texts
    from xbt.train.config import XBTConfig
    from xbt.train.stages import train_xbt

    cfg, old, new = tiny_setup
    cfg = XBTConfig.from_dict(cfg.to_dict() | {"projection": {"kind": "linear", "init": "procrustes"},
                                               "stage1": {"enabled": False}, "stage2": {"enabled": False}})
    xbt = train_xbt(cfg, tmp_path / "run", old=old, new=_copy(cfg.new, new), show_progress=False)
    peer = fit_peer("procrustes-both", old, new, fit_texts=load_texts(cfg.text_corpus), fit_pairs=open_dataset(cfg.train_pairs))
    texts = ["a red apple", "the sea at night", "a blue car on a road"]
    torch.testing.assert_close(xbt.encode_text(texts), peer.encode_text(texts), atol=1e-5, rtol=1e-4)
    assert torch.linalg.matrix_rank(xbt.projection.linear.weight).item() == old.embed_dim


def test_orthogonality_penalty_and_the_pull_keep_the_map_near_its_start_and_resume_exactly(tiny_setup, tmp_path):
    from xbt.train.stages import StopTraining, train_xbt
    from xbt.train.config import XBTConfig

    cfg, old, new = tiny_setup
    base = cfg.to_dict() | {"stage1": cfg.to_dict()["stage1"] | {"lr": 0.05, "epochs": 4}, "stage2": {"enabled": False}}

    def run(name, stage1=True, **projection):
        c = XBTConfig.from_dict(base | {"projection": {"kind": "linear", "init": "procrustes", **projection}})
        c.stage1.enabled = stage1
        return c, train_xbt(c, tmp_path / name, old=old, new=_copy(cfg.new, new), show_progress=False)

    def moved(model):
        return (model.projection.linear.weight - start.projection.linear.weight).norm().item()

    start = run("start", stage1=False)[1]
    free = run("free")[1]
    orthogonal = run("orthogonal", orthogonality_weight=10.0)[1]
    anchored_cfg, anchored = run("anchored", anchor_weight=100.0)
    assert free.projection.orthogonality_gap().item() > 1e-3 and moved(free) > 1e-2  # training moved the free map
    assert orthogonal.projection.orthogonality_gap().item() < 0.5 * free.projection.orthogonality_gap().item()
    assert moved(anchored) < 0.5 * moved(free)
    history = json.loads((tmp_path / "anchored" / "training_report.json").read_text())["stage1"]
    assert "anchor" in history[0] and "orthogonality" not in history[0]
    assert "anchor" not in json.loads((tmp_path / "free" / "training_report.json").read_text())["stage1"][0]
    # The pull's target survives a kill: a resumed run pulls toward the same start.
    with pytest.raises(StopTraining):
        train_xbt(anchored_cfg, tmp_path / "cut", old=old, new=_copy(cfg.new, new), stop_after=(3, None), show_progress=False)
    resumed = train_xbt(anchored_cfg, tmp_path / "cut", old=old, new=_copy(cfg.new, new), show_progress=False)
    _assert_same(resumed.projection.state_dict(), anchored.projection.state_dict())


# ----- the ensemble with the old model's query ---------------------------------------------------------------
def test_xbt_with_the_old_query_is_a_deployable_ensemble(tiny_setup, tmp_path, image_files):
    from xbt.compat.model import CompatibleModel, read_config
    from xbt.compat.old_query import (
        blend_arrays,
        choose_old_query_weight,
        fit_old_query,
        with_old_query,
    )
    from xbt.data.datasets import open_dataset
    from xbt.train.stages import train_xbt

    cfg, old, new = tiny_setup
    cfg.stage1.epochs = cfg.stage2.epochs = 1
    xbt = train_xbt(cfg, tmp_path / "xbt", old=old, new=_copy(cfg.new, new), show_progress=False)
    texts, images = ["a red apple", "the sea at night", "a cup of tea"], image_files[:3]
    alone_t, alone_i = xbt.encode_text(texts).numpy(), xbt.encode_image(images).numpy()
    old_t, old_i = old.encode_text(texts).numpy(), old.encode_image(images).numpy()
    ensemble = with_old_query(xbt, old, 0.3)
    assert ensemble.needs_old_model_at_query_time and ensemble.space == old.space
    np.testing.assert_allclose(ensemble.encode_text(texts).numpy(), blend_arrays(alone_t, old_t, 0.3), atol=1e-5)
    np.testing.assert_allclose(ensemble.encode_image(images).numpy(), blend_arrays(alone_i, old_i, 0.3), atol=1e-5)
    np.testing.assert_allclose(with_old_query(xbt, old, 0.0).encode_text(texts).numpy(), alone_t, atol=1e-5)
    np.testing.assert_allclose(with_old_query(xbt, old, 1.0).encode_text(texts).numpy(), old_t, atol=1e-5)
    # One artifact format: xbt.compat/3 with the digests of the map and the adapters, the old model by its spec;
    # XBT's one projection gives one blend, shared by both towers.
    ensemble.save_pretrained(tmp_path / "ensemble")
    config = read_config(tmp_path / "ensemble")
    assert config["format"] == "xbt.compat/3" and config["needs_old_model_at_query_time"] is True
    assert config["old_model"] == old.spec and ensemble.shares_query_map
    assert {t: m["config"]["kind"] for t, m in config["maps"].items()} == {"text": "old-query-blend", "image": "old-query-blend"}
    assert {"map.safetensors", "lora_text/adapter_model.safetensors"} <= set(config["weights_sha256"])
    loaded = CompatibleModel.from_pretrained(tmp_path / "ensemble", new_model=_copy(cfg.new, new), old_model=old)
    np.testing.assert_allclose(loaded.encode_text(texts).numpy(), blend_arrays(alone_t, old_t, 0.3), atol=1e-5)
    with pytest.raises(InputError, match="already needs the old model"):
        with_old_query(ensemble, old, 0.5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        with_old_query(xbt, old, 1.5)
    # The weight is chosen on val pairs: the best of the grid, ties to the smaller weight.
    val = open_dataset(cfg.train_pairs)[:6]
    weight, scores = choose_old_query_weight(xbt, old, val, weights=(0.0, 0.5, 1.0))
    assert set(scores) == {0.0, 0.5, 1.0} and scores[weight] == max(scores.values())
    assert weight == min(w for w, s in scores.items() if s == max(scores.values()))
    chosen = fit_old_query(xbt, old, val, weights=(0.0, 0.5, 1.0))
    assert chosen.query_map.weight == weight and chosen.provenance["details"]["old_query_weight"] == weight
