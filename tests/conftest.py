"""Shared fixtures: tiny randomly initialised models built offline, and an isolated XBT_HOME."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# The suite runs on the CPU by design, also on a GPU host: its figures and tolerances are the CPU's. Tests
# marked `gpu` (the GPU path, compared by cosine) run only with XBT_TEST_GPU=1 (bench/gpu_first_run.sh).
GPU_TESTS = os.environ.get("XBT_TEST_GPU") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# XBT_REQUIRE_ALL=1 (set by .ci/run): a test that skips is a failure, so that a missing package, Debian
# package or built asset cannot let CI pass without testing. The one kind of skip allowed is a test marked
# `gpu` on a machine without one (and a test marked `cpu_only` on a machine with one).
REQUIRE_ALL = os.environ.get("XBT_REQUIRE_ALL", "") not in ("", "0")

TINY_OPENCLIP = {
    "xbt-tiny-a": {"embed_dim": 32, "width": 32},
    "xbt-tiny-b": {"embed_dim": 48, "width": 48},
}

CORPUS = [
    "a red apple on a table", "a dog sleeps under wooden tables", "a blue car", "the green tree",
    "a photograph of a cat", "two birds in the sky", "a yellow banana", "an old house with a door",
]


def tiny_openclip_config(embed_dim: int, width: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="session")
def tiny_openclip_names(tmp_path_factory) -> list[str]:
    """Register tiny open_clip configs (random weights) so `openclip:xbt-tiny-a` resolves offline."""
    import open_clip

    folder = tmp_path_factory.mktemp("openclip_configs")
    for name, dims in TINY_OPENCLIP.items():
        (folder / f"{name}.json").write_text(json.dumps(tiny_openclip_config(**dims)))
    open_clip.add_model_config(folder)
    return list(TINY_OPENCLIP)


def build_tiny_hf(folder: Path, model_type: str = "clip") -> Path:
    """A tiny CLIP/SigLIP with random weights and a real (trained) word-level tokenizer, saved offline."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast, SiglipConfig,
                              SiglipImageProcessor, SiglipModel)

    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS * 3, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    # CLIP pools the text at the end-of-text token: the tokenizer must add it.
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=16)
    vocab = tok.get_vocab_size()
    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}
    if model_type == "clip":
        text.update(pad_token_id=0, bos_token_id=2, eos_token_id=3)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("hf_clip"), "clip")


@pytest.fixture(scope="session")
def tiny_hf_siglip(tmp_path_factory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("hf_siglip"), "siglip")


@pytest.fixture()
def xbt_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "xbt_home"
    monkeypatch.setenv("XBT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list[Path]:
    """Small synthetic PNGs: coloured shapes, distinct content."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("images")
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
    paths = []
    for i, colour in enumerate(colours):
        img = Image.new("RGB", (40 + 4 * i, 40), "white")
        draw = ImageDraw.Draw(img)
        draw.ellipse((4 + i, 4, 30, 30 - i), fill=colour)
        path = folder / f"img{i}.png"
        img.save(path)
        paths.append(path)
    return paths


def tiny_xbt_config(names: list[str], images: list[Path], folder: Path, epochs: int):
    """An XBT config over the tiny open_clip models: pairs of the synthetic images and CORPUS, a small corpus."""
    from xbt.train.config import XBTConfig

    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(p), "caption": c}) + "\n" for p, c in zip(images, CORPUS)))
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS + ["a small bird", "a big red bus", "the sea at night", "a cup of tea"]))
    return XBTConfig.from_dict({
        "old": f"openclip:{names[0]}", "new": f"openclip:{names[1]}",
        "train_pairs": str(pairs), "text_corpus": str(corpus), "checkpoint_every": 2,
        "projection": {"kind": "mlp", "hidden": 16, "dropout": 0.1, "init": "lstsq"},
        "stage1": {"epochs": epochs, "batch_size": 4, "noise_std": 0.2},
        "stage2": {"epochs": epochs, "batch_size": 4, "lora": {"r": 2, "alpha": 4, "dropout": 0.1}},
    })


@pytest.fixture()
def tiny_setup(tiny_openclip_names, image_files, tmp_path, xbt_home):
    """A tiny XBT config (3 epochs) with its old and new open_clip models (random weights, seeded)."""
    import torch

    from xbt.specs import load_model

    cfg = tiny_xbt_config(tiny_openclip_names, image_files, tmp_path, epochs=3)
    torch.manual_seed(0)
    old = load_model(cfg.old)
    torch.manual_seed(1)
    new = load_model(cfg.new)
    return cfg, old, new


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_ALL and report.skipped) or item.get_closest_marker("gpu") or item.get_closest_marker("cpu_only"):
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped under XBT_REQUIRE_ALL=1 ({reason}): install what the test needs (./run.sh setup does)"
                       " or build it in a fixture; only tests marked gpu or cpu_only may skip")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need XBT_TEST_GPU=1 and a CUDA GPU; elsewhere they are reported as skipped, with the reason."""
    import torch

    if GPU_TESTS and torch.cuda.is_available():
        return
    reason = ("the GPU path: run with XBT_TEST_GPU=1 on a CUDA machine (bench/gpu_first_run.sh)" if not GPU_TESTS
              else "XBT_TEST_GPU=1, but torch sees no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
