"""Training cost: time and peak memory of each XBT stage on the testbed (configs/xbt-testbed.yaml).

    python bench/training.py                 # the full testbed run (minutes; one run: n=1)
    python bench/training.py --quick         # 32 pairs, one epoch per stage

`train_xbt` runs in a fresh process with a fresh output folder. Its own clock gives the stage times
(training_report.json: prepare_s, stage1_s, stage2_s); the peak memory of each phase is measured around
the library's stage functions by resetting the kernel's peak-RSS mark when a phase starts and reading it
when it ends (Linux /proc/self/clear_refs), so each peak is that phase's own. (The same reset moves the
process-wide peak the training report records, so the overall peak is taken as the largest phase peak.)
The feature cache under XBT_HOME is used as it is: on a machine that has embedded the testbed before,
`prepare` loads cached features instead of encoding the corpus and the images again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h

CONFIG = h.REPO / "configs" / "xbt-testbed.yaml"


def instrumented_training(config: Path, out: Path, quick: bool) -> dict[str, Any]:
    """Run train_xbt in this process with a peak-memory bracket around each phase."""
    import xbt.train.stages as train
    from xbt.train.config import XBTConfig
    from xbt.train.stages import train_xbt

    cfg = XBTConfig.from_file(config)
    if quick:
        cfg.max_pairs, cfg.stage1.epochs, cfg.stage2.epochs = 32, 1, 1
    peaks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    marks: dict[str, Any] = {"reset": h.reset_peak_rss(), "phase": "prepare", "cpu0": time.process_time()}

    def end_phase() -> None:
        peaks[marks["phase"]] = h.peak_rss_mib()
        cpu[marks["phase"]] = time.process_time() - marks["cpu0"]

    def bracketed(name: str, stage_fn):
        def run_stage(*args: Any, **kwargs: Any) -> Any:
            end_phase()  # the phase before this one ends here
            h.reset_peak_rss()
            marks["phase"], marks["cpu0"] = name, time.process_time()
            return stage_fn(*args, **kwargs)
        return run_stage

    cache_before = features_bytes()
    original = train.run_stage1, train.run_stage2
    train.run_stage1, train.run_stage2 = bracketed("stage1", original[0]), bracketed("stage2", original[1])
    try:
        with h.PeakMemory() as whole:
            train_xbt(cfg, out, show_progress=False)
    finally:
        train.run_stage1, train.run_stage2 = original
    end_phase()  # the last stage, with saving the artifact
    report = json.loads((out / "training_report.json").read_text())
    return {"config": cfg.to_dict(), "report_timings_s": report.get("timings", {}), "phase_peak_rss_mib": peaks,
            "phase_cpu_s": cpu, "last_phase_includes_save": marks["phase"], "cpu_s": whole.cpu_s,
            "peak_reset_supported": marks["reset"], "wall_s": whole.elapsed_s,
            "n_pairs": report.get("n_pairs"), "n_corpus": report.get("n_corpus"),
            "feature_cache_growth_mib": (features_bytes() - cache_before) / 2**20}


def features_bytes() -> int:
    """Size of the feature cache under XBT_HOME: growth during training means `prepare` embedded data anew."""
    from xbt.paths import xbt_home

    root = xbt_home() / "features"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from xbt.errors import AssetMissingError

    base = {"figure": "training", "title": "Training: time and peak memory of each XBT stage",
            "columns": [h.column("phase", "phase"), h.column("seconds", "seconds (n=1)", "{:.1f}"),
                        h.column("cpu_s", "CPU seconds", "{:.1f}"),
                        h.column("peak_rss_mib", "peak RSS MiB", "{:,.0f}"), h.column("what", "what it does")],
            "goal": None}
    if args.worker:
        return instrumented_training(args.config, args.worker, args.quick)
    with tempfile.TemporaryDirectory(prefix="xbt-bench-train-") as tmp:
        result_path, out = Path(tmp) / "result.json", Path(tmp) / "run"
        try:
            from xbt.data.testbed import testbed_model_dir

            testbed_model_dir("old"), testbed_model_dir("new")
        except AssetMissingError as exc:
            return {**base, "description": "not run", "params": {}, "rows": [], "notes": [f"skipped: {exc}"]}
        h.run_script(__file__, ["--worker", out, "--config", args.config, "--threads", args.threads,
                                "--out", result_path] + (["--quick"] if args.quick else []))
        result = json.loads(result_path.read_text())
    cfg, timings, peaks, cpu = result["config"], result["report_timings_s"], result["phase_peak_rss_mib"], result["phase_cpu_s"]
    lora = cfg["stage2"]["lora"]
    what = {
        "prepare": "load both models, embed (or read cached) corpus and pair features",
        "stage1": f"text-only projection training: {result['n_corpus']} captions, {plural(cfg['stage1']['epochs'], 'epoch')}, "
                  f"batch {cfg['stage1']['batch_size']}",
        "stage2": f"LoRA (r={lora['r']}, text tower) + projection on {result['n_pairs']} image-text pairs, "
                  f"{plural(cfg['stage2']['epochs'], 'epoch')}, batch {cfg['stage2']['batch_size']}",
    }
    rows = []
    for phase in ("prepare", "stage1", "stage2"):
        seconds = timings.get(f"{phase}_s")
        if seconds is not None:
            saved = " (peak and CPU include saving the artifact)" if phase == result["last_phase_includes_save"] else ""
            rows.append({"phase": phase, "seconds": seconds, "cpu_s": cpu.get(phase), "peak_rss_mib": peaks.get(phase),
                         "what": what[phase] + saved})
    rows.append({"phase": "total", "seconds": result["wall_s"], "cpu_s": result["cpu_s"], "peak_rss_mib": max(peaks.values()),
                 "what": "train_xbt end to end, saving included"})
    notes = [f"One run (n=1): a full training run takes minutes; stage times come from the library's "
             f"training_report.json, on {args.threads} thread(s).",
             "The feature cache under XBT_HOME was used as found: "
             + (f"it lacked some features, and `prepare` embedded them ({result['feature_cache_growth_mib']:.1f} MiB "
                "written), so its time includes encoding with both models."
                if result["feature_cache_growth_mib"] > 0.01 else
                "it held every feature, so `prepare` is loading the two models and reading cached features; on a "
                "fresh machine it also encodes the corpus and the pair images with both models (see the encoding "
                "figure for those rates).")]
    if not result["peak_reset_supported"]:
        notes.append("This kernel cannot reset the peak-RSS mark: every phase's peak counts from process start.")
    config = Path(args.config).resolve()
    shown = str(config.relative_to(h.REPO)) if config.is_relative_to(h.REPO) else str(config)
    return {**base,
            "description": f"`train_xbt` with {shown}" + (" (quick: 32 pairs, 1 epoch per stage)" if args.quick else ""),
            "params": {"config": shown, "overrides": {"max_pairs": 32, "epochs": 1} if args.quick else {}},
            "rows": rows, "raw": result, "notes": notes}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)


if __name__ == "__main__":
    h.cli(run, __doc__, add_arguments)
