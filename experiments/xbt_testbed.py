"""XBT on the offline testbed: the main result, ablations and data efficiency (issue 3).

    ./run.sh xbt experiment ...   (or: python experiments/xbt_testbed.py --out docs/results)

Every variant is trained with the same seed on training data only; hyperparameters were chosen on
the val split (`--split val`), and the figures reported are on the eval split. Writes
<out>/xbt-testbed.json and <out>/xbt-testbed.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from xbt.data.testbed import load_split
from xbt.eval.embed import PairEmbeddings, embed_pairs, embed_texts
from xbt.eval.matrix import DIRECTIONS, QueryVectors, evaluate_upgrade, format_matrix
from xbt.eval.retrieval import bootstrap_indices, hits_at_k, recall_estimate, retrieval_ranks
from xbt.specs import load_model
from xbt.paths import cache_dir
from xbt.train.stages import XBTConfig, train_xbt


def deep_update(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


NO_LORA = {"stage2": {"lora": {"enabled": False}}}
ABLATIONS = {
    "XBT (stage 1 + stage 2, noise, LoRA)": {},
    "projection only (stage 1 + stage 2, noise, no LoRA)": NO_LORA,
    "stage 1 only (text only, noise)": {"stage2": {"enabled": False}},
    "stage 2 only (no LoRA)": deep_update(NO_LORA, {"stage1": {"enabled": False}}),
    "no noise in stage 1 (no LoRA)": deep_update(NO_LORA, {"stage1": {"noise_std": 0.0}}),
    # the projection that fits the 10 µs query budget (bench/query_cost.py), against "projection only"
    "linear projection (stage 1 + stage 2, noise, no LoRA)": deep_update(NO_LORA, {"projection": {"kind": "linear"}}),
}
# Stage 2 with LoRA runs the 110M-parameter text tower at every step (minutes per run on 2 cores);
# the other ablations train the projection only in stage 2 and compare with "projection only".
DATA_SIZES = [0, 50, 100, 200, None]
# The data-efficiency curve trains the projection only in stage 2 (no LoRA): nine runs of the full
# method do not fit this 2-core machine's time budget; the LoRA ablation above measures what LoRA adds.
CURVE_OVERRIDE = NO_LORA


def run_dir(cfg: XBTConfig) -> Path:
    """Where the experiments keep the run of one config (keyed by its content, so a rerun reuses it)."""
    tag = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir("experiments", "xbt") / tag


def compat_queries(compat, pairs, new_emb: PairEmbeddings) -> QueryVectors:
    """Text queries through the adapted text tower; image queries by projecting the cached new-model
    image vectors (the image tower has no adapters by default)."""
    if "image" in compat.lora_configs:
        emb = embed_pairs(compat, pairs)
        return QueryVectors(emb.images, emb.texts, emb.space)
    texts = embed_texts(compat, [p.caption for p in pairs])
    return QueryVectors(compat.map_features(new_emb.images), texts, compat.space)


def adapted_new_new(compat, pairs, new_emb: PairEmbeddings, resamples) -> dict:
    """new->new after LoRA: the adapted text tower against the new model's own image gallery."""
    with torch.inference_mode():
        compat.eval()
        texts = torch.cat([compat.new_text(compat.tokenize([p.caption for p in pairs[i : i + 64]])) for i in range(0, len(pairs), 64)])
    ranks = retrieval_ranks(new_emb.images, texts.numpy(), new_emb.images, new_emb.texts, new_emb.caption_image_index)
    return {k: recall_estimate(h, resamples).to_dict() for k, h in hits_at_k(ranks["t2i"]).items()}


def run(split: str, out: Path, base_config: Path, quick: bool, only: list[str] | None = None, curve: bool = True) -> dict:
    base = XBTConfig.from_file(base_config).to_dict()
    pairs = load_split(split)
    old, new = load_model("testbed:old"), load_model("testbed:new")
    old_emb, new_emb = embed_pairs(old, pairs, True), embed_pairs(new, pairs, True)
    results: dict = {"split": split, "n_queries": {"t2i": len(pairs), "i2t": len(old_emb.images)}, "variants": {}, "data_efficiency": []}
    previous = out / "xbt-testbed.json"
    if previous.exists():  # a later invocation adds variants to the earlier ones (same split)
        earlier = json.loads(previous.read_text())
        if earlier.get("split") == split:
            results["variants"] = {k: v for k, v in earlier.get("variants", {}).items() if k in ABLATIONS}
    resamples_t2i = bootstrap_indices(len(pairs), 1000, 0)

    def train_and_eval(name: str, override: dict) -> dict:
        cfg = XBTConfig.from_dict(deep_update(base, override))
        t0 = time.perf_counter()
        compat = train_xbt(cfg, run_dir(cfg), new=load_model(cfg.new), show_progress=True)
        train_s = time.perf_counter() - t0
        queries = compat_queries(compat, pairs, new_emb)
        matrix = evaluate_upgrade(old_emb, new_emb, {name: queries})
        print(format_matrix(matrix), flush=True)
        report = json.loads((run_dir(cfg) / "training_report.json").read_text())
        entry = {
            "name": name, "config": cfg.to_dict(), "matrix": matrix.to_dict(), "train_s": train_s, "timings": report.get("timings"),
            "peak_rss_mb": report.get("peak_rss_mb"), "noise_std": report.get("noise_std"), "n_pairs": report.get("n_pairs"),
        }
        if compat.lora_configs:
            entry["new_new_t2i_after_lora"] = adapted_new_new(compat, pairs, new_emb, resamples_t2i)
        return entry

    variants = {"XBT (stage 1 + stage 2, noise, LoRA)": {}} if quick else ABLATIONS
    if only:
        variants = {k: v for k, v in ABLATIONS.items() if any(o in k for o in only)}
    for name, override in variants.items():
        if name in results["variants"]:
            continue
        results["variants"][name] = train_and_eval(name, override)
        _write(results, out)
    if curve:
        for with_stage1 in (True, False):
            for n in DATA_SIZES:
                if n == 0 and not with_stage1:
                    continue  # nothing to train
                override = deep_update(CURVE_OVERRIDE, {"max_pairs": n, "stage1": {"enabled": with_stage1}})
                if n == 0:
                    override["stage2"]["enabled"] = False
                entry = train_and_eval(f"n={n}", override)
                method = "XBT" if with_stage1 else "XBT without stage 1"
                n_pairs = entry["n_pairs"]
                for d in DIRECTIONS:
                    for k in (1, 5, 10):
                        cell = entry["matrix"]["methods"][f"n={n}"][d][str(k)]["recall"]
                        results["data_efficiency"].append({"method": method, "n_pairs": n_pairs, "direction": d, "k": k,
                                                           "recall": cell["value"], "low": cell["low"], "high": cell["high"]})
                _write(results, out)
    results["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _write(results, out)
    return results


def _write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "xbt-testbed.json").write_text(json.dumps(results, indent=1))
    (out / "xbt-testbed.md").write_text(markdown(results))


def _e(e: dict, signed: bool = False) -> str:
    """An estimate as 'value [low, high]' (an undefined one, JSON null, as n/a)."""
    if e["value"] is None:
        return "n/a"
    sign = "+" if signed and e["value"] > 0 else ""
    return f"{sign}{e['value']:.1f} [{e['low']:.1f}, {e['high']:.1f}]"


def markdown(results: dict) -> str:
    """The figures as tables (generated by experiments/xbt_testbed.py; do not edit by hand)."""
    n = results["n_queries"]
    lines = [
        "# XBT on the offline testbed", "",
        f"Generated by `experiments/xbt_testbed.py` on the `{results['split']}` split: {n['t2i']} text queries and "
        f"{n['i2t']} image queries; 95% percentile-bootstrap intervals over queries (1000 resamples, paired across "
        "methods). Gallery = old model's embeddings. Gain = (new->old - old->old) / (new->new - old->old).", "",
    ]
    for name, v in results["variants"].items():
        m = v["matrix"]
        lines += [f"## {name}", "", "| dir | K | old->old | new->new | XBT new->old | vs old->old | criterion | update gain % |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in ("t2i", "i2t"):
            for k in ("1", "5", "10"):
                c = m["methods"][name][d][k]
                verdict = "pass (CI > 0)" if c["passes_confidently"] else ("pass" if c["passes"] else "FAIL")
                lines.append(f"| {d} | R@{k} | {_e(m['old_old'][d][k])} | {_e(m['new_new'][d][k])} | {_e(c['recall'])} | "
                             f"{_e(c['vs_old'], True)} | {verdict} | {_e(c['gain'])} |")
        t = v.get("timings") or {}
        lines += ["", f"Training: stage 1 {t.get('stage1_s', 0):.0f} s, stage 2 {t.get('stage2_s', 0):.0f} s, "
                  f"data preparation {t.get('prepare_s', 0):.0f} s; peak RSS {v.get('peak_rss_mb') or 0:.0f} MB (the process, "
                  f"cumulative); {v.get('n_pairs')} image-text pairs; noise norm {v.get('noise_std')}."]
        if "new_new_t2i_after_lora" in v:
            after = v["new_new_t2i_after_lora"]
            lines.append(f"New model's own text-to-image R@1 after LoRA (the adapted text tower, no projection): "
                         f"{_e(after['1'])} vs {_e(m['new_new']['t2i']['1'])} before.")
        lines.append("")
    if results.get("data_efficiency"):
        lines += ["## Data efficiency (R@1; stage 2 trains the projection only)", "",
                  "| method | pairs | t2i R@1 | i2t R@1 |", "|---|---|---|---|"]
        rows: dict = {}
        for r in results["data_efficiency"]:
            if r["k"] == 1:
                rows.setdefault((r["method"], r["n_pairs"]), {})[r["direction"]] = r
        for (method, n_pairs), cells in sorted(rows.items()):
            t2i, i2t = ({"value": c["recall"], "low": c["low"], "high": c["high"]} for c in (cells["t2i"], cells["i2t"]))
            lines.append(f"| {method} | {n_pairs} | {_e(t2i)} | {_e(i2t)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default="eval", choices=["eval", "val"])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--config", type=Path, default=Path("src/xbt/configs/xbt-testbed.yaml"))
    parser.add_argument("--quick", action="store_true", help="main variant only")
    parser.add_argument("--variants", default="", help="comma-separated ablation names to run (default: all)")
    parser.add_argument("--no-curve", action="store_true", help="skip the data-efficiency curve")
    args = parser.parse_args()
    torch.set_num_threads(int(__import__('os').environ.get('XBT_THREADS', '2')))
    np.set_printoptions(precision=3)
    run(args.split, args.out, args.config, args.quick, [v for v in args.variants.split(",") if v], not args.no_curve)
