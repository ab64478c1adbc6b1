"""Run every benchmark, merge the figures into bench/results.json and render docs/benchmarks.md.

    python bench/run_all.py                    # what `make bench` runs
    python bench/run_all.py --quick            # a smoke run, written to a temporary folder
    python bench/run_all.py --only gallery     # re-run one figure; the others are kept from the last run

Each figure runs in its own process (bench/<script>.py --out bench/results/figures/<figure>.json), so one
figure's memory and threads never leak into another's. A figure that fails is recorded as failed and the
others still run; the command then exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as h
import report

#: figure key -> script, in the order of the report
FIGURES = {
    "encode": "encode_throughput.py",
    "query_cost": "query_cost.py",
    "gallery": "gallery_search.py",
    "training": "training.py",
    "evaluation": "evaluation.py",
}


def run_figures(keys: list[str], figures_dir: Path, quick: bool, threads: int, repeats: int | None) -> dict[str, str]:
    """Run the chosen figures; returns the error of each that failed."""
    errors = {}
    for key in keys:
        out = figures_dir / f"{key}.json"
        args = ["--out", out, "--threads", threads] + (["--quick"] if quick else []) + (["--repeats", repeats] if repeats else [])
        h.log(f"figure {key}: {FIGURES[key]} {' '.join(map(str, args))}")
        t0 = time.perf_counter()
        try:
            out.unlink(missing_ok=True)
            h.run_script(h.BENCH_DIR / FIGURES[key], args)
        except subprocess.CalledProcessError as exc:
            errors[key] = f"{FIGURES[key]} exited with status {exc.returncode} (see its output)"
            h.log(f"figure {key} FAILED: {errors[key]}")
        else:
            h.log(f"figure {key} done in {time.perf_counter() - t0:.0f} s")
    return errors


def merge(figures_dir: Path, errors: dict[str, str], quick: bool, threads: int, command: str, wall_s: float) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for key in FIGURES:
        path = figures_dir / f"{key}.json"
        if key in errors:
            figures[key] = {"figure": key, "title": key, "error": errors[key]}
        elif path.exists():
            figures[key] = json.loads(path.read_text())
    return {"schema": h.SCHEMA, "created": h.now_iso(), "command": command, "quick": quick, "threads": threads,
            "wall_s": wall_s, "machine": h.machine_info(), "figures": figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats; output to a temporary folder")
    parser.add_argument("--only", default=None, help=f"comma-separated figures to run ({', '.join(FIGURES)})")
    parser.add_argument("--threads", type=int, default=1, help="threads per benchmark process (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default: each script's)")
    parser.add_argument("--results", type=Path, default=None, help="merged results (default bench/results.json)")
    parser.add_argument("--docs", type=Path, default=None, help="rendered page (default docs/benchmarks.md)")
    parser.add_argument("--command", default="make bench", help="the command named in the page")
    args = parser.parse_args(argv)

    keys = list(FIGURES) if not args.only else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    if args.quick:
        root = Path(tempfile.mkdtemp(prefix="xbt-bench-quick-"))
        results = args.results or root / "results.json"
        docs = args.docs or root / "benchmarks.md"
        figures_dir = root / "figures"
    else:
        results = args.results or h.BENCH_DIR / "results.json"
        docs = args.docs or h.REPO / "docs" / "benchmarks.md"
        figures_dir = h.BENCH_DIR / "results" / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    errors = run_figures(keys, figures_dir, args.quick, args.threads, args.repeats)
    wall_s = time.perf_counter() - t0
    if args.only and results.exists():  # the untouched figures' time counts too
        wall_s += sum(f.get("wall_s", 0) for k, f in json.loads(results.read_text()).get("figures", {}).items()
                      if k not in keys)
    merged = merge(figures_dir, errors, args.quick, args.threads, args.command + (" (--quick)" if args.quick else ""), wall_s)
    h.write_json(results, merged)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(report.render(merged))
    h.log(f"wrote {results} and {docs}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
