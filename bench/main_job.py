"""The main job as a new user meets it: `./run.sh demo` from a fresh clone and an empty XBT_HOME (cold),
then the same command again (warm), each timed as a whole process with `/usr/bin/time -v`.

    python bench/main_job.py                        # cold + warm, writes bench/results/main_job.json
    python bench/main_job.py --warm-only --home H   # a warm rerun against an XBT_HOME a cold run filled
    python bench/main_job.py --phases               # set-up and testbed phases alone (no full demo)

Cold means: a `git clone` of this repository (committed state only), XBT_HOME an empty folder (so no
Python environment, no uv or pip cache, no assets, no rendered SVGs, no features, no testbed, no runs).
Debian packages are system-wide and shared with everything else on the machine, so they are *not*
removed: when they are already installed the apt phase costs nothing here, and the figure says so.

Each run's phases come from the demo's own summary (outputs/demo/summary.json: `setup_timings_s` from
./run.sh, `timings_s` from the pipeline); wall time, peak RSS (the largest process of the tree, as
/usr/bin/time reports it) and the load average before and after come from here. A cold run takes the
whole machine for 10-30 minutes: run it under the machine's heavy-job lock where the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import _harness as h

OUT = h.BENCH_DIR / "results" / "main_job.json"
GOALS = {"cold_s": 15 * 60, "warm_s": 60, "peak_rss_mb": 4096}
SCHEMA = "xbt.bench.main_job/2"  # {"schema", "runs": [every run, oldest first]}; /1 was one run alone


def read_runs(path: Path) -> list[dict[str, Any]]:
    """Every run recorded in `path`, oldest first (a file of the first schema is its one run)."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    return [doc] if doc.get("schema") == "xbt.bench.main_job/1" else list(doc.get("runs", []))


def write_runs(path: Path, runs: list[dict[str, Any]]) -> None:
    h.write_json(path, {"schema": SCHEMA, "runs": runs})


def runs_table(runs: list[dict[str, Any]]) -> str:
    """One row per recorded run: when, commit, what changed before it, cold, warm, peak, load, goals."""
    def num(v: Any, unit: str) -> str:
        return "–" if v is None else f"{v:,.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}"

    lines = ["| run | commit | what changed before it | cold | warm | peak RSS | load (cold start / end) | goals met |",
             "|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(runs, 1):
        load = (run.get("load_average") or {}).get("cold") or [None, None]
        start, end = (x[0] if isinstance(x, list) else x for x in load)
        met = run.get("goals_met") or {}
        lines.append(f"| {i}, {str(run.get('created', '?'))[:16].replace('T', ' ')} | {str(run.get('commit', '?'))[:7]} |"
                     f" {run.get('note', '')}{' (transcribed)' if run.get('transcribed') else ''} | {num(run.get('cold_s'), 's')} | {num(run.get('warm_s'), 's')} |"
                     f" {num(run.get('peak_rss_mb'), 'MB')} | {'–' if start is None else f'{start:.2f}'} /"
                     f" {'–' if end is None else f'{end:.2f}'} | {'all' if met and all(met.values()) else ', '.join(k for k, v in met.items() if v) or '–'} |")
    return "\n".join(lines)


def time_v(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run `cmd` under /usr/bin/time -v; its output goes to log_path. Wall seconds, peak RSS, exit code."""
    load_before = h.load_average()
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout_s, check=False)
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": round(wall, 1), "exit_code": proc.returncode,
            "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "load_before": load_before, "load_after": h.load_average(), "log": str(log_path)}


def setup_lines(log_path: Path) -> dict[str, float]:
    """The set-up phases ./run.sh printed ('[xbt setup] NAME: S s'), for a run that did not reach the demo."""
    found = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.search(r"\[xbt setup\]\S* (.+?): ([0-9.]+) s$", re.sub(r"\x1b\[[0-9;]*m", "", line))
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def demo_run(clone: Path, home: Path, label: str, timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ, XBT_HOME=str(home))
    for name in ("VIRTUAL_ENV", "PYTHONPATH"):  # the clone's own environment and code, nothing of this process's
        env.pop(name, None)
    summary_path = clone / "outputs" / "demo" / "summary.json"
    summary_path.unlink(missing_ok=True)
    h.log(f"{label}: ./run.sh demo (XBT_HOME={home})")
    run = time_v(["./run.sh", "demo"], clone, env, home.parent / f"{label}.log", timeout_s)
    phases: dict[str, Any] = {"setup": setup_lines(Path(run["log"]))}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        phases = {"setup": summary.get("setup_timings_s") or phases["setup"], "demo": summary.get("timings_s", {})}
        run["figures"] = _figures(summary)
        run["demo_peak_rss_mb_after"] = summary.get("peak_rss_mb_after", {})  # the demo process, per phase
    run["phases_s"] = phases
    h.log(f"{label}: {run['wall_s']} s, peak RSS {run['peak_rss_mb']} MB, exit {run['exit_code']}")
    return run


def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The demo's headline recall cells (%), per direction and K: old->old, XBT new->old, ceiling new->new."""
    m = summary.get("matrix") or {}
    xbt = (m.get("methods") or {}).get("XBT", {})
    out: dict[str, Any] = {}
    for direction, by_k in (m.get("old_old") or {}).items():
        out[direction] = {k: {"old_old": cell["value"], "new_new": m["new_new"][direction][k]["value"],
                              "xbt": xbt.get(direction, {}).get(k, {}).get("recall", {}).get("value")}
                          for k, cell in by_k.items()}
    out["recommendation"] = (summary.get("recommendation") or {}).get("method")
    return out


#: The main job before this work (issue 15), on a fresh 2-core machine of this kind, from the job's own log.
BEFORE = {
    "cold_s": 1728, "warm_s": 45, "peak_rss_mb": 4915,
    "phases_s": {"set-up (Python environment, Debian packages)": 360, "testbed build": 662,
                 "  rendering 2,052 SVGs": 115, "  EfficientNet-Lite0 features, 1,788 images": 143,
                 "  EfficientNet-Lite2 features, 2,193 images": 320, "galleries": 124, "XBT training": 468,
                 "  stage 2 (LoRA)": 297, "evaluation and report": 182, "example pictures": 12},
}


def markdown(record: dict[str, Any]) -> str:
    """The main job's table for docs/benchmarks.md: each phase, cold and warm, before and after."""
    def phases(run: dict[str, Any] | None) -> dict[str, float]:
        if not run:
            return {}
        ph = run.get("phases_s", {})
        out = {f"set-up: {k}": v for k, v in (ph.get("setup") or {}).items()}
        return out | dict(ph.get("demo") or {})

    cold, warm = phases(record.get("cold")), phases(record.get("warm"))
    lines = ["| phase | before, cold | after, cold | after, warm |", "|---|---|---|---|"]
    for name, value in BEFORE["phases_s"].items():
        lines.append(f"| {name} (before) | {value} s | | |")
    for name in list(dict.fromkeys([*cold, *warm])):
        c, w = cold.get(name), warm.get(name)
        lines.append(f"| {name} | | {'' if c is None else f'{c:.1f} s'} | {'' if w is None else f'{w:.1f} s'} |")
    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.0f}"

    lines.append(f"| **whole process** (/usr/bin/time) | {BEFORE['cold_s']} s | {fmt(record.get('cold_s'))} s |"
                 f" {fmt(record.get('warm_s'))} s (before: {BEFORE['warm_s']} s) |")
    lines.append(f"| peak RSS | {BEFORE['peak_rss_mb']} MB | {fmt((record.get('cold') or {}).get('peak_rss_mb'))} MB |"
                 f" {fmt((record.get('warm') or {}).get('peak_rss_mb'))} MB |")
    return "\n".join(lines)


def phases_only(work: Path, timeout_s: float) -> dict[str, Any]:
    """Without a whole demo: the set-up (`./run.sh setup` into an empty XBT_HOME) and `xbt testbed build`
    into another empty XBT_HOME that shares that environment, each timed as a whole process."""
    clone = fresh_clone(work)
    home = work / "home-setup"
    env = dict(os.environ, XBT_HOME=str(home))
    setup = time_v(["./run.sh", "setup"], clone, env, work / "setup.log", timeout_s)
    setup["phases_s"] = setup_lines(work / "setup.log")
    home2 = work / "home-testbed"
    home2.mkdir()
    (home2 / "venvs").symlink_to(home / "venvs")  # the environment only: assets, data, features start empty
    env2 = dict(os.environ, XBT_HOME=str(home2))
    build = time_v(["bash", "-c", "./run.sh setup >/dev/null 2>&1 && ./run.sh xbt testbed build"], clone, env2,
                   work / "testbed.log", timeout_s)
    return {"setup": setup, "testbed_build": build}


def fresh_clone(work: Path) -> Path:
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(h.REPO), str(clone)], check=True)
    return clone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/xbt-main-job"), help="scratch folder (emptied first)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--phases", action="store_true", help="set-up and testbed build alone (no full demo)")
    parser.add_argument("--warm-only", action="store_true", help="only a warm run, against --home and --clone")
    parser.add_argument("--home", type=Path, help="with --warm-only: the XBT_HOME a cold run filled")
    parser.add_argument("--clone", type=Path, help="with --warm-only: the clone the cold run used")
    parser.add_argument("--markdown", action="store_true", help="print the tables of --out (no run)")
    parser.add_argument("--note", default="", help="what changed before this run (kept with it in the history)")
    args = parser.parse_args()
    runs = read_runs(args.out)
    if args.markdown:
        print(runs_table(runs) + "\n\n" + (markdown(runs[-1]) if runs else ""))
        return
    commit = subprocess.run(["git", "-C", str(h.REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    record: dict[str, Any] = {"created": h.now_iso(), "commit": commit, "machine": h.machine_info(), "goals": GOALS,
                              "note": args.note}
    if args.warm_only:
        if not (args.home and args.clone):
            parser.error("--warm-only needs --home and --clone (the cold run's XBT_HOME and clone)")
        warm = demo_run(args.clone, args.home, "warm", args.timeout)
        previous = runs.pop() if runs else {}  # the warm rerun completes the latest run
        record = previous | {"warm": warm, "warm_s": warm["wall_s"],
                             "peak_rss_mb": max(filter(None, [previous.get("peak_rss_mb"), warm["peak_rss_mb"]]), default=None)}
    else:
        if args.work.exists():
            shutil.rmtree(args.work)
        args.work.mkdir(parents=True)
        if args.phases:
            record |= {"kind": "phases", **phases_only(args.work, args.timeout)}
        else:
            clone = fresh_clone(args.work)
            home = args.work / "home"
            home.mkdir()
            cold = demo_run(clone, home, "cold", args.timeout)
            warm = demo_run(clone, home, "warm", args.timeout)
            record |= {"kind": "demo", "cold": cold, "warm": warm, "cold_s": cold["wall_s"], "warm_s": warm["wall_s"],
                       "peak_rss_mb": max(filter(None, [cold["peak_rss_mb"], warm["peak_rss_mb"]]), default=None),
                       "load_average": {"cold": [cold["load_before"], cold["load_after"]],
                                        "warm": [warm["load_before"], warm["load_after"]]}}
    if "cold_s" in record:
        record["goals_met"] = {k: (record.get(k) is not None and record[k] <= v) for k, v in GOALS.items()}
    write_runs(args.out, [*runs, record])  # every run is kept: the page renders the history from here
    h.log(f"wrote {args.out} (run {len(runs) + 1})")


if __name__ == "__main__":
    main()
