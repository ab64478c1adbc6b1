"""Cross-validation folds over the testbed's Tux Paint items, so that every item is an evaluation query once.

The Tux Paint caption groups (xbt.data.testbed: no caption on both sides of a split) are shuffled with
the fold seed and dealt into k folds. For fold i:
    eval        the groups of fold i, one image each: never trained or tuned on in this fold.
    val         VAL_GROUPS groups of the other folds, one image each: every choice of the fold is made here.
    train       every image of the remaining groups (the compatibility-training pairs, xbt_train).
    vlp_old     openclipart pairs (minus eval/val captions)  -> the fold's old model
    vlp_new     vlp_old + train                              -> the fold's new model
    text_corpus unique captions of vlp_new                   -> the text-only stage
With k = 5 the pooled evaluation has one query per caption group (705 per direction here) instead of
the fixed split's 299. Folds are written once under XBT_HOME/testbed/cv/k{k}-s{seed}/fold{i}/.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from xbt.data.pairs import Pair, read_pairs, write_pairs
from xbt.data.testbed import VAL_GROUPS, derived_splits, one_per_group, testbed_dir, testbed_items
from xbt.durable import atomic_write_text
from xbt.errors import InputError

FOLD_SPLITS = ("eval", "val", "train", "vlp_old", "vlp_new")
FOLDS_VERSION = "1"


@dataclass(frozen=True)
class Fold:
    k: int
    seed: int
    index: int
    eval: list[Pair]
    val: list[Pair]
    train: list[Pair]
    vlp_old: list[Pair]
    vlp_new: list[Pair]
    text_corpus: list[str]

    @property
    def name(self) -> str:
        return f"k{self.k}-s{self.seed}/fold{self.index}"

    @property
    def root(self) -> Path:
        return folds_dir(self.k, self.seed) / f"fold{self.index}"


def folds_dir(k: int, seed: int) -> Path:
    return testbed_dir() / "cv" / f"k{k}-s{seed}"


def make_folds(k: int = 5, seed: int = 0, show_progress: bool = False) -> list[Fold]:
    """Deal the caption groups into k folds (seeded) and derive each fold's splits; nothing is written."""
    if k < 2:
        raise InputError(f"cross-validation needs at least 2 folds, not {k}")
    groups, clip_pairs = testbed_items(show_progress)
    keys = sorted(key for key, pairs in groups.items() if pairs)
    random.Random(seed).shuffle(keys)
    if len(keys) // k < 20 or len(keys) - len(keys) // k < VAL_GROUPS + 50:
        raise InputError(f"{len(keys)} caption groups are too few for {k} folds; use fewer folds")
    folds = []
    for i in range(k):
        eval_keys = keys[i::k]
        held = set(eval_keys)
        rest = [key for key in keys if key not in held]  # the shuffled order: val is a seeded draw too
        val_keys, train_keys = rest[:VAL_GROUPS], rest[VAL_GROUPS:]
        eval_pairs, val_pairs = one_per_group(groups, eval_keys), one_per_group(groups, val_keys)
        train = [p for key in train_keys for p in groups[key]]
        derived = derived_splits(eval_pairs + val_pairs, train, clip_pairs)
        corpus = sorted({p.caption for p in derived["vlp_new"]})
        folds.append(Fold(k, seed, i, eval_pairs, val_pairs, train, derived["vlp_old"], derived["vlp_new"], corpus))
    return folds


def testbed_folds(k: int = 5, seed: int = 0, show_progress: bool = False) -> list[Fold]:
    """The k folds of `seed`, read from disk when written before (written on first use)."""
    root = folds_dir(k, seed)
    manifest = root / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("version") == FOLDS_VERSION:
        return [_read_fold(k, seed, i) for i in range(k)]
    folds = make_folds(k, seed, show_progress)
    for fold in folds:
        fold.root.mkdir(parents=True, exist_ok=True)
        for name in FOLD_SPLITS:
            write_pairs(fold.root / f"{name}.jsonl", getattr(fold, name))
        atomic_write_text(fold.root / "text_corpus.txt", "\n".join(fold.text_corpus) + "\n")
    sizes = [{name: len(getattr(f, name)) for name in FOLD_SPLITS} | {"text_corpus": len(f.text_corpus)} for f in folds]
    atomic_write_text(manifest, json.dumps({"version": FOLDS_VERSION, "k": k, "seed": seed, "sizes": sizes}, indent=1))
    return folds


def _read_fold(k: int, seed: int, index: int) -> Fold:
    root = folds_dir(k, seed) / f"fold{index}"
    splits = {name: read_pairs(root / f"{name}.jsonl") for name in FOLD_SPLITS}
    corpus = [line for line in (root / "text_corpus.txt").read_text().splitlines() if line.strip()]
    return Fold(k, seed, index, text_corpus=corpus, **splits)
