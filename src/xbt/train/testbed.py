"""Building the offline testbed's models: the splits (xbt.data.testbed), then a lit model per generation,
its heads trained on cached tower features. Data definitions stay in data/; training them lives here."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xbt.data.pairs import Pair
from xbt.data.testbed import (
    TESTBED_MODELS,
    TESTBED_VERSION,
    TestbedModel,
    build_splits,
    load_split,
    testbed_dir,
    tower_image_features,
    tower_text_features,
)
from xbt.durable import atomic_write_text, code_digest
from xbt.models.lit import LitModel, record_space
from xbt.progress import progress_bar
from xbt.train.lit import LitTrainConfig, train_lit_heads


def train_lit_model(
    spec: TestbedModel, pairs: Sequence[Pair], out_dir: Path, config=None, show_progress: bool = True
):
    """Build a lit model from its towers, train its heads on `pairs`, save it. Returns (model, history)."""
    config = config or LitTrainConfig(embed_dim=spec.embed_dim)
    model = LitModel(spec.image_tower, spec.text_tower, spec.embed_dim, name=f"testbed-{spec.name}")
    image_feats = torch.from_numpy(tower_image_features(model.image_tower, [p.image for p in pairs], show_progress))
    text_feats = torch.from_numpy(tower_text_features(model.text_tower, [p.caption for p in pairs], show_progress))
    with progress_bar(config.epochs, f"training {spec.name} heads", show_progress) as advance:
        history = train_lit_heads(model, image_feats, text_feats, config, progress=lambda loss: advance(loss=loss))
    model.save_pretrained(out_dir)
    (out_dir / "train_config.json").write_text(json.dumps(config.to_dict() | {"pairs": spec.split, "n_pairs": len(pairs)}, indent=2))
    return model, history


def build_testbed(models: Sequence[str] = ("old", "new"), force: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Everything the experiments need, cached: splits, tower features, trained old/new models."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    manifest = testbed_dir() / "splits" / "manifest.json"
    if force or not manifest.exists() or json.loads(manifest.read_text()).get("version") != TESTBED_VERSION:
        build_splits(show_progress=show_progress)
    timings["splits_s"] = time.perf_counter() - t0
    for name in models:
        out = testbed_dir() / "models" / name
        if not force and (out / "config.json").exists():
            record_space(out)  # a model built by an older xbt: its space recorded once, so loads build no tower
            continue
        t = time.perf_counter()
        train_lit_model(TESTBED_MODELS[name], load_split(TESTBED_MODELS[name].split), out, show_progress=show_progress)
        timings[f"model_{name}_s"] = time.perf_counter() - t
    recorded = json.loads(manifest.read_text())
    return {"sizes": recorded["sizes"], "left_out": recorded.get("left_out", {}), "timings": timings,
            "root": str(testbed_dir())}


def lit_code_digest() -> str:
    """The code that trains a testbed lit model and computes its tower features."""
    return code_digest("xbt.data", "xbt.models", "xbt.train.lit", "xbt.train.testbed")


def fold_models(fold, show_progress: bool = False) -> dict[str, LitModel]:
    """A cross-validation fold's old and new testbed models (xbt.data.folds): the same recipe as the
    testbed's, trained without the fold's evaluation (and val) items, seeded by the fold seed; built once
    under the fold's folder and loaded afterwards (spec lit:PATH)."""
    from xbt.embed import prime_lit_cache
    from xbt.specs import load_model

    models = {}
    code = lit_code_digest()
    for name in ("old", "new"):
        spec = TESTBED_MODELS[name]
        out = fold.root / "models" / name
        made_by = out / "code.txt"  # the code that trained it; another code's model is trained again
        if (out / "config.json").exists() and made_by.exists() and made_by.read_text().strip() != code:
            shutil.rmtree(out)
        if not (out / "config.json").exists():
            pairs = fold.vlp_old if spec.split == "vlp_old" else fold.vlp_new
            config = LitTrainConfig(embed_dim=spec.embed_dim, seed=fold.seed)
            train_lit_model(spec, pairs, out, config=config, show_progress=show_progress)
            atomic_write_text(made_by, code + "\n")
        else:  # a model without code.txt predates the record: kept (its fold hits' key names the code anyway)
            record_space(out)
        models[name] = load_model(f"lit:{out}")
        # The fold's items through the new heads from the towers' cached features: nothing is re-encoded.
        prime_lit_cache(models[name], fold.eval + fold.val + fold.train, fold.text_corpus)
    return models
