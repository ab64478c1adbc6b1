"""Gallery-modality maps on the testbed's fixed split (issue 24): every closed-form peer and its -gallery
variant, plain and with NNN, with and without the unlabeled openclipart renders for the image-side fits,
paired differences of mean update gain, and a curve of the gain against the number of unlabeled images.

    PYTHONPATH=src python experiments/gallery_modality_fixed_split.py --out docs/results/gallery-modality-fixed-split.json

Fits on testbed:xbt_train (+ the text corpus, + testbed:vlp_old's images when "unlabeled" is on); every
choice (the ridge, the adapter's epochs, SLERP's weight, NNN's alpha) on testbed:val; figures on the 299
eval queries per direction. XBT is not here: it is measured by the main job (`./run.sh demo`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from xbt.data.testbed import load_split, load_text_corpus
from xbt.eval.calibrated import add_calibrated
from xbt.eval.crossval import differences_vs
from xbt.eval.embed import prime_lit_cache
from xbt.eval.matrix import system_hits
from xbt.eval.runner import json_safe, run_evaluation
from xbt.specs import load_model

PEERS = ["procrustes-text", "procrustes-image", "procrustes-both", "procrustes-gallery", "affine", "affine-gallery",
         "adapter", "adapter-gallery", "slerp", "slerp-gallery"]
PAIRS = [("procrustes-gallery", "procrustes-both"), ("procrustes-gallery+nnn", "procrustes-both+nnn"),
         ("affine-gallery+nnn", "affine+nnn"), ("adapter-gallery+nnn", "adapter+nnn"), ("slerp-gallery+nnn", "slerp+nnn")]
CURVE = [0, 100, 300, 1000, 3000]  # unlabeled images added to the 405 training images; capped by what exists


def summary(run, name: str) -> dict:
    m = run.matrix
    gains = {d: float(np.mean([m.methods[name][d][k].gain.value for k in m.ks])) for d in ("t2i", "i2t")}
    return {"mean_gain": m.mean_gain(name), "t2i_gain": gains["t2i"], "i2t_gain": gains["i2t"],
            "passes_all": m.all_pass(name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    old, new = load_model("testbed:old"), load_model("testbed:new")
    eval_pairs, train, val = load_split("eval"), load_split("xbt_train"), load_split("val")
    corpus, unlabeled = load_text_corpus(), load_split("vlp_old")
    for model in (old, new):  # every vector from the towers' cached features (the testbed's build computed them)
        prime_lit_cache(model, [*eval_pairs, *train, *val, *unlabeled], corpus)
    doc: dict = {"n_queries": {"t2i": len(eval_pairs), "i2t": len({p.image_id for p in eval_pairs})}, "settings": {}}
    for setting, images in (("training images only", []), ("+ openclipart renders (unlabeled)", unlabeled)):
        t = time.perf_counter()
        run = run_evaluation(old, new, eval_pairs, PEERS, fit_texts=corpus, fit_pairs=train, support_pairs=val,
                             n_resamples=args.resamples, cost_batch_sizes=(256,), fit_images=images)
        add_calibrated(run, old, new, bank_pairs=train, val_pairs=val)
        hits = system_hits(run.embeddings["old"], run.embeddings["new"], run.queries, run.matrix.ks)
        doc["settings"][setting] = {
            "n_unlabeled_images": run.data["fit_images"]["n_images"], "warnings": run.warnings,
            "methods": {name: summary(run, name) for name in run.matrix.methods},
            "differences": [differences_vs(hits, a, b, run.matrix.ks, args.resamples) for a, b in PAIRS],
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(setting, json.dumps({n: round(v["mean_gain"], 1) for n, v in doc["settings"][setting]["methods"].items()}),
              flush=True)
    curve = []
    order = np.random.default_rng(0).permutation(len(unlabeled))
    for n in [n for n in CURVE if n <= len(unlabeled)] + [len(unlabeled)]:
        subset = [unlabeled[i] for i in sorted(order[:n])]
        run = run_evaluation(old, new, eval_pairs, ["procrustes-gallery"], fit_texts=corpus, fit_pairs=train,
                             support_pairs=val, n_resamples=args.resamples, cost_batch_sizes=(256,), fit_images=subset)
        add_calibrated(run, old, new, bank_pairs=train, val_pairs=val)
        row = {"n_unlabeled_rows": n, "n_unlabeled_images": run.data["fit_images"]["n_images"],
               **{name: summary(run, name) for name in run.matrix.methods}}
        curve.append(row)
        print("curve", n, round(row["procrustes-gallery"]["t2i_gain"], 1), round(row["procrustes-gallery+nnn"]["t2i_gain"], 1),
              flush=True)
    doc["curve_procrustes_gallery"] = curve
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(doc), indent=1))


if __name__ == "__main__":
    main()
