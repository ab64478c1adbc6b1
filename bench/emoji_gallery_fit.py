"""Issue 24's domain check: on domain:emoji, does fitting the image side on emoji images (unlabeled, disjoint from
the evaluated ones: what a team holding an emoji gallery has) help, and is the recommended method then not below
the best closed-form map? Beside it, the testbed-only fit (the openclipart renders as unlabeled images: another
domain's images, which may not transfer).

    python bench/emoji_gallery_fit.py --out docs/results/domain-emoji-gallery-fit

domain:emoji's pairs are split once by image (seeded): half are the evaluation pairs, the other half's images
are the unlabeled fit images (their captions are never read). Both runs fit every peer on the same training
pairs, text corpus and support split; they differ only in the unlabeled images. Per method: mean update gain
over the six cells (T2I/I2T x R@1/5/10) of each run, and the paired difference between the runs (same
queries) with a 95% bootstrap interval over the pooled queries of both directions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import _harness as h

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from xbt.data.domains import load_domain  # noqa: E402
from xbt.data.pairs import write_pairs  # noqa: E402
from xbt.eval.matrix import system_hits  # noqa: E402
from xbt.eval.recommend import recommend  # noqa: E402
from xbt.eval.report import write_report  # noqa: E402
from xbt.compat.registry import PEER_METHODS  # noqa: E402
from xbt.eval.runner import evaluate_from_specs  # noqa: E402
from xbt.metrics import bootstrap_indices, difference_estimate  # noqa: E402

COMMON = {"old": "testbed:old", "new": "testbed:new", "fit_text": ["testbed:text_corpus"], "fit_pairs": ["testbed:xbt_train"],
          "support": "testbed:val"}
CLOSED_FORM = ("procrustes-text", "procrustes-image", "procrustes-both", "procrustes-gallery", "affine", "affine-gallery")


def split_domain(work: Path, seed: int) -> tuple[Path, Path, int, int]:
    pairs = load_domain("emoji")
    images = sorted({p.image for p in pairs})
    rng = np.random.default_rng(seed)
    fit = set(rng.choice(images, size=len(images) // 2, replace=False).tolist())
    work.mkdir(parents=True, exist_ok=True)
    eval_file, fit_file = work / "emoji-eval.jsonl", work / "emoji-fit-images.txt"
    evaluated = [p for p in pairs if p.image not in fit]
    write_pairs(eval_file, evaluated)
    fit_file.write_text("\n".join(sorted(fit)) + "\n")
    assert not fit & {p.image for p in evaluated}
    return eval_file, fit_file, len(evaluated), len(fit)


def mean_recall_hits(systems: dict, name: str) -> np.ndarray:
    """Per query, its hits at K = 1, 5, 10 averaged (in %), both directions stacked: the paired per-query
    quantity of the mean recall over the six cells. (The update gain divides by new->new minus old->old, which
    on emoji is a few points: per-query differences of gain would be ill-conditioned.)"""
    rows = [100 * np.mean([systems[name][d][k].astype(np.float64) for k in (1, 5, 10)], axis=0) for d in ("t2i", "i2t")]
    return np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "domain-emoji-gallery-fit")
    parser.add_argument("--work", type=Path, default=Path("/tmp/xbt-emoji-fit"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    eval_file, fit_file, n_eval, n_fit = split_domain(args.work, args.seed)
    runs, systems = {}, {}
    for label, fit_images in (("emoji-fit", [str(fit_file), "testbed:vlp_old"]), ("testbed-fit", ["testbed:vlp_old"])):
        run = evaluate_from_specs(data=str(eval_file), methods=list(PEER_METHODS), n_resamples=args.resamples,
                                  skip_unfittable=True, fit_images=fit_images, **COMMON)
        results = run.to_results()
        results["command"] = f"python bench/emoji_gallery_fit.py (run {label}: --fit-images {' '.join(fit_images)})"
        write_report(results, args.out / label)
        runs[label] = results
        systems[label] = system_hits(run.embeddings["old"], run.embeddings["new"], run.queries)
    rows = []
    for name in runs["emoji-fit"]["matrix"]["methods"]:
        a, b = (mean_recall_hits(systems[label], "method:" + name) for label in ("emoji-fit", "testbed-fit"))
        old = mean_recall_hits(systems["emoji-fit"], "old")
        resamples = bootstrap_indices(len(a), args.resamples, args.seed)
        diff, vs_old = difference_estimate(a / 100, b / 100, resamples), difference_estimate(a / 100, old / 100, resamples)
        rows.append({"method": name, "emoji_fit_recall": round(float(a.mean()), 1), "testbed_fit_recall": round(float(b.mean()), 1),
                     "emoji_fit_vs_old": vs_old.to_dict(), "difference": diff.to_dict(),
                     "mean_gain": {label: _mean_gain(runs[label], name) for label in runs}})
    old_r, new_r = (float(mean_recall_hits(systems["emoji-fit"], s).mean()) for s in ("old", "new"))
    picks = {label: recommend(_matrix(r))[0] for label, r in runs.items()}
    best_closed = {label: max((r for r in rows if r["method"] in CLOSED_FORM), key=lambda r: r[key])
                   for label, key in (("emoji-fit", "emoji_fit_recall"), ("testbed-fit", "testbed_fit_recall"))}
    doc = {"schema": "xbt.bench.emoji-gallery-fit/1", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "seed": args.seed, "eval_pairs": n_eval, "fit_images": n_fit, "queries_per_direction": n_eval,
           "old_old_recall": round(old_r, 1), "new_new_recall": round(new_r, 1), "recommended": picks, "best_closed_form": {k: v["method"] for k, v in best_closed.items()}, "methods": rows,
           "seconds": round(time.time() - t0, 1), "load_average": {"start": load0, "end": os.getloadavg()}}
    h.write_json(args.out / "summary.json", doc)
    lines = [f"# domain:emoji with the image side fitted on emoji images ({n_fit} unlabeled, disjoint from the {n_eval}"
             " evaluated pairs)", "", f"Written by `python bench/emoji_gallery_fit.py` ({doc['created']}, {doc['seconds']} s,"
             f" load average {load0[0]:.1f} at the start). Mean recall over the six cells (T2I/I2T x R@1/5/10), %, {n_eval}"
             f" queries per direction: old->old {old_r:.1f}, new->new {new_r:.1f} (the upgrade's headroom is"
             f" {new_r - old_r:.1f} points, so update gains, which divide by it, swing widely). Paired 95% bootstrap"
             " intervals over the pooled queries.", "",
             "| method | emoji images in the fit | testbed renders only | emoji fit minus testbed fit | emoji fit minus old->old |"
             " mean update gain (emoji / testbed fit) |", "|---|---|---|---|---|---|"]
    for r in rows:
        d, v, g = r["difference"], r["emoji_fit_vs_old"], r["mean_gain"]
        lines.append(f"| {r['method']} | {r['emoji_fit_recall']:.1f} | {r['testbed_fit_recall']:.1f} | {d['value']:+.1f} [{d['low']:+.1f},"
                     f" {d['high']:+.1f}] | {v['value']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}] | {g['emoji-fit']:.0f}% / {g['testbed-fit']:.0f}% |")
    lines += ["", f"Recommended (passes new->old above old->old in every cell, then the highest gain): {picks['emoji-fit']}"
              f" (emoji fit), {picks['testbed-fit']} (testbed fit). Best closed-form map by mean recall:"
              f" {best_closed['emoji-fit']['method']} ({best_closed['emoji-fit']['emoji_fit_recall']:.1f}, emoji fit) and"
              f" {best_closed['testbed-fit']['method']} ({best_closed['testbed-fit']['testbed_fit_recall']:.1f}, testbed fit).", ""]
    (args.out / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _mean_gain(results: dict, name: str) -> float:
    cells = [c["gain"]["value"] for d in results["matrix"]["methods"][name].values() for c in d.values() if c["gain"]["value"] is not None]
    return float(np.mean(cells)) if cells else float("nan")


def _matrix(results: dict):
    from xbt.eval.matrix import UpgradeMatrix

    return UpgradeMatrix.from_dict(results["matrix"])


if __name__ == "__main__":
    main()
