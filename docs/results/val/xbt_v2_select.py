"""XBT v2 model selection on the testbed's VAL split (80 items): which projection kind, init, penalty,
epochs and noise to ship in src/xbt/configs/xbt-testbed.yaml. Never run on the eval split.

    flock /tmp/xbt-heavy.lock env PYTHONPATH=src python docs/results/val/xbt_v2_select.py --out /tmp/xbt-v2/select \
        [--group projection] [--lora]

Each variant is the shipped config with an override (YAML dict paths), trained on the training pairs and
the text corpus only (the same seed), and scored on val: R@1/5/10 both directions against the old model's
val gallery, their mean ("mean recall", the score SLERP's weight is chosen by), and the mean update gain
over the six cells. With 80 queries a recall carries about +-10 points of bootstrap noise: the paired
interval of each variant's mean recall against the shipped default is printed beside it. Results go to
OUT/selection.json; each run lives in OUT/runs/<config hash> and a rerun resumes it (a finished one is
not retrained).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from xbt.compat.fit import fit_peer
from xbt.compat.old_query import choose_old_query_weight
from xbt.data.testbed import load_split, load_text_corpus
from xbt.embed import embed_pairs, embed_texts
from xbt.metrics import retrieval_ranks
from xbt.specs import load_model
from xbt.train.config import XBTConfig
from xbt.train.stages import train_xbt

KS = (1, 5, 10)
CONFIG = Path(__file__).resolve().parents[3] / "src" / "xbt" / "configs" / "xbt-testbed.yaml"
NO_LORA = {"stage2": {"lora": {"enabled": False}}}


def deep_update(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def lin(**p) -> dict:
    return {"projection": {"kind": "linear", **p}}


def groups() -> dict[str, dict[str, dict]]:
    """name -> override, by group. Projection-only groups train in seconds; `lora` takes minutes per run."""
    pro = lin(init="procrustes")
    return {
        "projection": {
            "mlp, lstsq": deep_update(NO_LORA, {"projection": {"kind": "mlp", "init": "lstsq"}}),
            "linear, lstsq": deep_update(NO_LORA, lin(init="lstsq")),
            "mlp, procrustes": deep_update(NO_LORA, {"projection": {"kind": "mlp", "init": "procrustes"}}),
            "linear, procrustes": deep_update(NO_LORA, pro),
            "linear, procrustes, stage 1 off": deep_update(NO_LORA, deep_update(pro, {"stage1": {"enabled": False}})),
            "linear, procrustes, stage 2 off": deep_update(pro, {"stage2": {"enabled": False}}),
            "linear, procrustes, no noise": deep_update(NO_LORA, deep_update(pro, {"stage1": {"noise_std": 0.0}})),
            "linear, procrustes, stages off": deep_update(pro, {"stage1": {"enabled": False}, "stage2": {"enabled": False}}),
        },
        "penalty": {
            f"linear, procrustes, ortho {o}, anchor {a}": deep_update(NO_LORA, lin(init="procrustes", orthogonality_weight=o, anchor_weight=a))
            for o, a in ((0.1, 0), (1, 0), (10, 0), (100, 0), (0, 1), (0, 10), (0, 100), (1, 10))
        },
        "schedule": {
            f"linear, procrustes, stage 1 {e1} ep, stage 2 {e2} ep": deep_update(NO_LORA, deep_update(pro, {"stage1": {"epochs": e1}, "stage2": {"epochs": e2}}))
            for e1, e2 in ((10, 10), (60, 10), (30, 5), (30, 20), (30, 40))
        } | {
            f"linear, procrustes, noise {n}": deep_update(NO_LORA, deep_update(pro, {"stage1": {"noise_std": n}}))
            for n in (0.4, 1.2)
        } | {
            f"linear, procrustes, stage 1 lr {lr}": deep_update(NO_LORA, deep_update(pro, {"stage1": {"lr": lr}}))
            for lr in (3e-4, 3e-3)
        },
        "lora": {  # the full method: LoRA on mpnet's last four blocks
            "shipped default (mlp, lstsq, LoRA)": {},
            "linear, procrustes, ortho 10, LoRA": lin(init="procrustes", orthogonality_weight=10.0),
        },
    }


def run_dir(root: Path, cfg: XBTConfig) -> Path:
    tag = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return root / "runs" / tag


def scores(image_queries, text_queries, old_emb) -> dict[str, np.ndarray]:
    """Per-query hits (0/1) for each direction and K against the old val gallery."""
    ranks = retrieval_ranks(image_queries, text_queries, old_emb.images, old_emb.texts, old_emb.caption_image_index)
    return {f"{d}@{k}": (ranks[d] < k).astype(np.float64) for d in ("t2i", "i2t") for k in KS}


def summary(hits: dict[str, np.ndarray], oo: dict[str, np.ndarray], nn: dict[str, np.ndarray]) -> dict:
    cells = {c: 100 * h.mean() for c, h in hits.items()}
    gains = {c: 100 * (hits[c].mean() - oo[c].mean()) / (nn[c].mean() - oo[c].mean()) for c in hits}
    return {"cells": cells, "mean_recall": float(np.mean(list(cells.values()))), "mean_gain": float(np.mean(list(gains.values())))}


def paired_interval(a: dict[str, np.ndarray], b: dict[str, np.ndarray], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean recall(a) - mean recall(b), resampling each direction's queries (paired)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    for d in ("t2i", "i2t"):
        m = len(a[f"{d}@1"])
        idx = rng.integers(0, m, size=(n, m))
        for k in KS:
            diff = a[f"{d}@{k}"] - b[f"{d}@{k}"]
            out += diff[idx].mean(1)
    out *= 100 / (2 * len(KS))
    return float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--group", action="append", help="projection, penalty, schedule, lora (default: all but lora)")
    parser.add_argument("--lora", action="store_true", help="also the LoRA group (minutes per run)")
    parser.add_argument("--extra", type=str, default=None, help="JSON {name: override} of further variants")
    args = parser.parse_args()
    wanted = args.group or ["projection", "penalty", "schedule"] + (["lora"] if args.lora else [])
    variants = {name: o for g in wanted for name, o in groups()[g].items()}
    if args.extra:
        variants |= json.loads(args.extra)
    args.out.mkdir(parents=True, exist_ok=True)
    result_file = args.out / "selection.json"
    results = json.loads(result_file.read_text()) if result_file.exists() else {"variants": {}}
    import yaml

    base = yaml.safe_load(CONFIG.read_text())
    val = load_split("val")
    old, new = load_model("testbed:old"), load_model("testbed:new")
    old_emb, new_emb = embed_pairs(old, val), embed_pairs(new, val)
    oo = scores(old_emb.images, old_emb.texts, old_emb)
    nn_ranks = retrieval_ranks(new_emb.images, new_emb.texts, new_emb.images, new_emb.texts, new_emb.caption_image_index)
    nn = {f"{d}@{k}": (nn_ranks[d] < k).astype(np.float64) for d in ("t2i", "i2t") for k in KS}
    hits_of: dict[str, dict[str, np.ndarray]] = {}
    results["n_queries"] = {"t2i": len(val), "i2t": len(old_emb.images)}
    results["old_old"], results["new_new"] = summary(oo, oo, nn), summary(nn, oo, nn)
    peer = fit_peer("procrustes-both", old, new, fit_texts=load_text_corpus(), fit_pairs=load_split("xbt_train"))
    hits_of["procrustes-both (peer)"] = scores(peer.map_features(new_emb.images), peer.map_features(new_emb.texts), old_emb)
    results["procrustes-both (peer)"] = summary(hits_of["procrustes-both (peer)"], oo, nn)
    print("load", os.getloadavg(), "procrustes-both", results["procrustes-both (peer)"], flush=True)
    for name, override in variants.items():
        cfg = XBTConfig.from_dict(deep_update(base, override))
        folder = run_dir(args.out, cfg)
        t = time.perf_counter()
        uses_lora = cfg.stage2.enabled and cfg.stage2.lora.enabled
        model = train_xbt(cfg, folder, old=old, new=load_model(cfg.new) if uses_lora else new, show_progress=False)
        train_s = time.perf_counter() - t
        texts = embed_texts(model, [p.caption for p in val]) if uses_lora else model.map_features(new_emb.texts)
        hits = scores(model.map_features(new_emb.images), texts, old_emb)
        hits_of[name] = hits
        entry = summary(hits, oo, nn) | {"override": override, "train_s": round(train_s, 1), "load": os.getloadavg()}
        report = json.loads((folder / "training_report.json").read_text())
        entry["timings"] = report.get("timings")
        if uses_lora:
            w, blend_scores = choose_old_query_weight(model, old, val)
            entry["old_query_weight_on_val"] = w
            entry["old_query_mean_recall_on_val"] = 100 * blend_scores[w]  # chosen on val and scored on val: optimistic
        results["variants"][name] = entry
        print(f"{name}: mean recall {entry['mean_recall']:.1f}, mean gain {entry['mean_gain']:.1f}%, {train_s:.0f} s,"
              f" load {os.getloadavg()[0]:.2f}", flush=True)
        result_file.write_text(json.dumps(results, indent=1))
    reference = "linear, procrustes" if "linear, procrustes" in hits_of else next(iter(hits_of))
    for name, hits in hits_of.items():
        if name in results["variants"]:
            results["variants"][name]["vs_" + reference] = paired_interval(hits, hits_of[reference])
    results["reference"] = reference
    result_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
