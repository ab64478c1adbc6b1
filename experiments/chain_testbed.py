"""Chained upgrades on the offline testbed (issue 6): a v1 gallery served by a v3 model through v2.

    python experiments/chain_testbed.py                 # writes docs/results/chain-testbed.{json,md}
    python experiments/chain_testbed.py --no-direct     # without the direct v3 -> v1 baseline

Generations: v1 = testbed:old (Lite0 + MiniLM, 256-d), v2 = testbed:new (Lite2 + mpnet, 512-d),
v3 = testbed:third (Lite1 + mpnet, 384-d; `xbt testbed build --models third`). Every compatible model is
trained with the one recipe in configs/xbt-testbed.yaml (chosen on val, never on eval), only its old/new
models swapped, on the same training data:

    hop 1    XBT v2 -> v1        (the main XBT result; the same run as experiments/xbt_testbed.py), and its
                                 projection on the unadapted v2 text tower, as the chain runs it
    hop 2    XBT v3 -> v2        (v2 plays the old model; v1 is never seen)
    chain    v3 -> v2 -> v1      hop 2, then hop 1's projection (`xbt chain`), saved and reloaded by its
                                 compat: spec, as production would; no training of its own
    direct   XBT v3 -> v1        trained straight into v1: what chaining costs against a fresh upgrade

The chain is judged against the first model, as the issue asks: criterion M(chain -> v1 gallery) >
M(v1 -> v1), update gain (M(chain) - M(v1 -> v1)) / (M(v3 -> v3) - M(v1 -> v1)). It is also served for
real: a v1 image gallery in xbt's store, searched with the chained model; that search's R@1 must equal
the evaluation's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from xbt_testbed import _e, compat_queries, deep_update, run_dir

from xbt.compat.model import CompatibleModel, chain
from xbt.data.testbed import load_split
from xbt.eval.embed import embed_pairs
from xbt.eval.matrix import QueryVectors, UpgradeMatrix, evaluate_upgrade, format_matrix
from xbt.gallery.ingest import GalleryRetriever, ingest, items_from_pairs
from xbt.gallery.store import Gallery
from xbt.specs import load_compatible, load_model
from xbt.paths import cache_dir
from xbt.train.stages import XBTConfig, train_xbt

GENERATIONS = {"v1": "testbed:old", "v2": "testbed:new", "v3": "testbed:third"}


def trained(base: dict, old: str, new: str) -> tuple[CompatibleModel, dict]:
    """XBT from `new` into `old` with the base recipe; reused when already trained (keyed by the config).
    Returns the model loaded from disk (so it can be chained) and its training report."""
    cfg = XBTConfig.from_dict(deep_update(base, {"old": GENERATIONS[old], "new": GENERATIONS[new]}))
    out = run_dir(cfg)  # hop 1 is the very run of experiments/xbt_testbed.py's main variant
    if not (out / "training_report.json").exists():
        print(f"training XBT {new} -> {old} into {out}", flush=True)
        train_xbt(cfg, out, show_progress=True)
    return load_compatible(out), json.loads((out / "training_report.json").read_text())


def served_t2i_r1(v1, chained, pairs) -> float:
    """R@1 of text queries through the chained model against a v1 image gallery in xbt's store."""
    with tempfile.TemporaryDirectory() as tmp, Gallery.create(Path(tmp) / "v1", v1.space, modality="image") as g:
        ingest(g, v1, items_from_pairs(pairs, "image"))
        hits = GalleryRetriever(g, chained).search_texts([p.caption for p in pairs], 1)
    return 100 * float(np.mean([h[0].id == p.image_id for h, p in zip(hits, pairs)]))


def run(split: str, out: Path, base_config: Path, direct: bool) -> dict:
    base = XBTConfig.from_file(base_config).to_dict()
    pairs = load_split(split)
    models = {g: load_model(spec) for g, spec in GENERATIONS.items()}
    emb = {g: embed_pairs(m, pairs, True) for g, m in models.items()}
    results: dict = {"split": split, "config": str(base_config), "generations": GENERATIONS,
                     "spaces": {g: m.space.to_dict() for g, m in models.items()},
                     "n_queries": {"t2i": len(pairs), "i2t": len(emb["v1"].images)}, "matrices": {}, "training": {}}

    def record(key: str, older: str, newer: str, matrix: UpgradeMatrix) -> None:
        print(format_matrix(matrix), flush=True)
        results["matrices"][key] = {"older": older, "newer": newer, **matrix.to_dict()}
        _write(results, out)

    t0 = time.perf_counter()
    c21, results["training"]["v2->v1"] = trained(base, "v1", "v2")
    # the chain runs hop 1's projection without hop 1's text adapters: what that alone costs
    unadapted = QueryVectors(c21.map_features(emb["v2"].images), c21.map_features(emb["v2"].texts), c21.space)
    record("hop 1: XBT v2->v1", "v1", "v2", evaluate_upgrade(emb["v1"], emb["v2"], {
        "XBT v2->v1": compat_queries(c21, pairs, emb["v2"]), "its projection alone (no text adapters)": unadapted}))
    c32, results["training"]["v3->v2"] = trained(base, "v2", "v3")
    record("hop 2: XBT v3->v2", "v2", "v3", evaluate_upgrade(emb["v2"], emb["v3"], {"XBT v3->v2": compat_queries(c32, pairs, emb["v3"])}))

    chain_dir = cache_dir("experiments", "chain") / f"{Path(c32.spec).name}-{Path(c21.spec).name}"
    chain(c32, c21).save_pretrained(chain_dir)
    chained = load_model(f"compat:{chain_dir}")  # what `xbt chain` writes and a service loads
    assert chained.space == models["v1"].space
    chain_emb = embed_pairs(chained, pairs, True)
    methods = {"chain v3->v2->v1": QueryVectors(chain_emb.images, chain_emb.texts, chain_emb.space)}
    if direct:
        c31, results["training"]["v3->v1"] = trained(base, "v1", "v3")
        methods["direct XBT v3->v1"] = compat_queries(c31, pairs, emb["v3"])
    matrix = evaluate_upgrade(emb["v1"], emb["v3"], methods)
    results["served_t2i_r1"] = served_t2i_r1(models["v1"], chained, pairs)
    results["chain_folder"] = str(chain_dir)
    results["wall_s"] = time.perf_counter() - t0
    record("chain v3->v2->v1 against v1", "v1", "v3", matrix)
    evaluated = matrix.methods["chain v3->v2->v1"]["t2i"][1].recall.value
    if abs(results["served_t2i_r1"] - evaluated) > 1e-6:
        raise AssertionError(f"the served chain's R@1 {results['served_t2i_r1']:.2f} differs from the evaluation's {evaluated:.2f}")
    return results


def _write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chain-testbed.json").write_text(json.dumps(results, indent=1))
    (out / "chain-testbed.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    """The figures as tables (generated by experiments/chain_testbed.py; do not edit by hand)."""
    n = results["n_queries"]
    g = results["generations"]
    lines = [
        "# Chained upgrades on the offline testbed", "",
        f"Generated by `experiments/chain_testbed.py` on the `{results['split']}` split: {n['t2i']} text queries and "
        f"{n['i2t']} image queries; 95% percentile-bootstrap intervals over queries (1000 resamples, paired across "
        f"methods). v1 = `{g['v1']}`, v2 = `{g['v2']}`, v3 = `{g['v3']}`. Every compatible model is trained with "
        f"`{results['config']}` (its old/new models swapped). In each table the gallery is the older generation's "
        "embeddings; gain = (M(method) - M(older->older)) / (M(newer->newer) - M(older->older)).", "",
    ]
    for key, m in results["matrices"].items():
        old, new = m["older"], m["newer"]
        names = list(m["methods"])
        lines += [f"## {key}", "", f"| dir | K | {old}->{old} | {new}->{new} | "
                  + " | ".join(f"{name} | vs {old}->{old} | criterion | gain %" for name in names) + " |",
                  "|---|---|---|---|" + "---|---|---|---|" * len(names)]
        for d in ("t2i", "i2t"):
            for k in ("1", "5", "10"):
                row = [d, f"R@{k}", _e(m["old_old"][d][k]), _e(m["new_new"][d][k])]
                for name in names:
                    c = m["methods"][name][d][k]
                    verdict = "pass (CI > 0)" if c["passes_confidently"] else ("pass" if c["passes"] else "FAIL")
                    row += [_e(c["recall"]), _e(c["vs_old"], True), verdict, _e(c["gain"])]
                lines.append("| " + " | ".join(row) + " |")
        up = m["new_new_vs_old_old"]
        lines += ["", f"The upgrade itself, {new}->{new} minus {old}->{old}: "
                  + ", ".join(f"{d} R@{k} {_e(up[d][k], True)}" for d in ("t2i", "i2t") for k in ("1", "10")) + "."]
        if any(up[d][k]["low"] <= 0 for d in ("t2i", "i2t") for k in ("1", "5", "10")):
            lines.append(f"Where that interval reaches zero, {new} is not measurably better than {old}: the update gain "
                         f"divides by about zero there and means nothing, and beating {old}->{old} is beating a model "
                         f"as good as {new}.")
        lines.append("")
    if "served_t2i_r1" in results:
        lines += [f"Served for real: a v1 image gallery in xbt's store, searched with the chained model loaded as "
                  f"`compat:` from disk, gives text-to-image R@1 {results['served_t2i_r1']:.1f}, the same as the table.", ""]
    for hop, report in results.get("training", {}).items():
        t = report.get("timings") or {}
        lines.append(f"- Training {hop}: data preparation {t.get('prepare_s', 0):.0f} s, stage 1 {t.get('stage1_s', 0):.0f} s, "
                     f"stage 2 {t.get('stage2_s', 0):.0f} s; {report.get('n_pairs')} pairs; noise norm {report.get('noise_std')}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="eval", choices=["eval", "val"])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--config", type=Path, default=Path("src/xbt/configs/xbt-testbed.yaml"))
    parser.add_argument("--no-direct", action="store_true", help="skip training the direct v3 -> v1 baseline")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json already in --out")
    args = parser.parse_args()
    if args.render:
        _write(json.loads((args.out / "chain-testbed.json").read_text()), args.out)
        raise SystemExit(0)
    torch.set_num_threads(int(__import__("os").environ.get("XBT_THREADS", "2")))
    run(args.split, args.out, args.config, not args.no_direct)
