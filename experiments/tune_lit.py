"""Choosing the lit recipe of the testbed models on the VAL split (never on eval).

Trains the old and new heads on cached tower features under a few recipes and prints val R@1/R@10
in both directions for each. Whatever it prints, the testbed's defaults are set by hand from it.
"""

from __future__ import annotations

import itertools
import sys

import torch

from xbt.data.testbed import TESTBED_MODELS, load_split, tower_image_features, tower_text_features
from xbt.eval.embed import caption_image_index
from xbt.data.pairs import unique_images
from xbt.eval.retrieval import hits_at_k, retrieval_ranks
from xbt.models.lit import LitModel
from xbt.train.lit import LitTrainConfig, train_lit_heads


def features(model, pairs):
    img = torch.from_numpy(tower_image_features(model.image_tower, [p.image for p in pairs], False))
    txt = torch.from_numpy(tower_text_features(model.text_tower, [p.caption for p in pairs], False))
    return img, txt


def main(grid: dict, names: tuple[str, ...] = ("old", "new")) -> None:
    val = load_split("val")
    index = caption_image_index(val)
    for name in names:
        spec = TESTBED_MODELS[name]
        model = LitModel(spec.image_tower, spec.text_tower, spec.embed_dim, name=name)
        train_img, train_txt = features(model, load_split(spec.split))
        val_img = torch.from_numpy(tower_image_features(model.image_tower, [p.image for p in unique_images(val)], False))
        val_txt = torch.from_numpy(tower_text_features(model.text_tower, [p.caption for p in val], False))
        for values in itertools.product(*grid.values()):
            overrides = dict(zip(grid, values))
            cfg = LitTrainConfig(embed_dim=spec.embed_dim, **overrides)
            train_lit_heads(model, train_img, train_txt, cfg)
            with torch.no_grad():
                vi = torch.nn.functional.normalize(model.image_head(val_img), dim=-1).numpy()
                vt = torch.nn.functional.normalize(model.text_head(val_txt), dim=-1).numpy()
            ranks = retrieval_ranks(vi, vt, vi, vt, index)
            row = {d: {k: 100 * h.mean() for k, h in hits_at_k(ranks[d], (1, 10)).items()} for d in ranks}
            print(f"{name} {overrides}: t2i R@1 {row['t2i'][1]:.1f} R@10 {row['t2i'][10]:.1f} | "
                  f"i2t R@1 {row['i2t'][1]:.1f} R@10 {row['i2t'][10]:.1f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    # First pass (both models): lr in {1e-3, 3e-3, 1e-2} x weight decay {0.5, 0.05} x input dropout {0.3, 0}.
    # Second pass (new model): dropout and epochs around the first pass's best.
    names = tuple(sys.argv[1:]) or ("old", "new")
    main({"lr": [2e-3], "weight_decay": [0.5], "input_dropout": [0.3, 0.5], "epochs": [60, 150]}, names)
