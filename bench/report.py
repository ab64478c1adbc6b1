"""Render docs/benchmarks.md from bench/results.json, bench/results/gpu.json and bench/results/main_job.json,
and from nothing else.

    python bench/report.py                                  # bench/results.json -> docs/benchmarks.md
    python bench/report.py RESULTS.json OUT.md

Every number in the page comes from those files, so the page can be regenerated at any time and always
matches the data committed beside it (the main job's history is every run bench/main_job.py recorded).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import _harness as h
import main_job

ORDER = ("encode", "query_cost", "gallery", "training", "evaluation")
_NAMED_FIELD = re.compile(r"\{[A-Za-z_]")


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """One table cell: `fmt` either formats the row's `key` ("{:.1f}") or names fields of the row
    ("{us_1t:.1f} (min {min_us_1t:.1f})"). Missing values show as a dash."""
    try:
        if _NAMED_FIELD.search(fmt):
            text = fmt.format(**row)
        else:
            value = row.get(key)
            if value is None:
                return "–"
            text = fmt.format(value)
    except (KeyError, ValueError, TypeError):
        return "–"
    return text.replace("|", "\\|")


def table(columns: list[list[str]], rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r, key, fmt) for key, _, fmt in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def verdict(goal: dict[str, Any] | None) -> str:
    if not goal:
        return ""
    met = goal.get("met")
    return "met" if met is True else "**not met**" if met is False else "not measured"


def load_text(stamp: dict[str, Any]) -> str:
    load = stamp.get("load_average") or {}
    start, end = load.get("start") or [], load.get("end") or []
    fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs) if xs else "?"  # noqa: E731
    return f"load average (1/5/15 min) {fmt(start)} at the start, {fmt(end)} at the end"


def figure_section(number: int, fig: dict[str, Any]) -> list[str]:
    lines = [f"## {number}. {fig.get('title', fig.get('figure', '?'))}", ""]
    if fig.get("error"):
        return lines + [f"**This figure failed to run:** {fig['error']}", ""]
    if fig.get("description"):
        lines += [fig["description"], ""]
    stamp = [f"n = {fig.get('repeats', '?')} timed runs per measurement unless a column says otherwise",
             f"{fig.get('threads', '?')} thread(s)", f"{fig.get('wall_s', 0):.0f} s in all",
             load_text(fig)]
    lines += ["*" + "; ".join(stamp) + ".*", ""]
    if fig.get("rows"):
        lines += [table(fig["columns"], fig["rows"]), ""]
    else:
        lines += ["No rows: nothing was measured (see the notes).", ""]
    goal = fig.get("goal")
    if goal:
        lines += [f"**Goal:** {goal['statement']}. Verdict: {verdict(goal)}. {goal['detail']}", ""]
    for note in fig.get("notes") or []:
        lines.append(f"- {note}")
    if fig.get("notes"):
        lines.append("")
    return lines


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def gpu_section(number: int, gpu: dict[str, Any] | None) -> list[str]:
    """The GPU check (bench/gpu_check.py -> bench/results/gpu.json): its figures, or why there are none."""
    lines = [f"## {number}. GPU check (bench/gpu_check.py)", ""]
    if not gpu:
        return lines + ["No bench/results/gpu.json: the check has not been run.", ""]
    if not gpu.get("measured"):
        return lines + [f"**Not measured: {gpu.get('reason', 'no reason recorded').removeprefix('not measured: ')}**"
                        f" (bench/results/gpu.json, {gpu.get('created', '?')}). The first GPU run is prepared:"
                        " `bash bench/gpu_first_run.sh OUTDIR` runs this check and the GPU-marked tests (README, \"On a GPU\").", ""]
    lines += [f"Measured on {(gpu.get('machine') or {}).get('gpu', '?')}, {gpu.get('created', '?')}. Each step's figures"
              " (or its error) as bench/gpu_check.py recorded them:", ""]
    for name, step in (gpu.get("steps") or {}).items():
        lines.append(f"- **{name}**: " + json.dumps(step, sort_keys=True)[:600])
    return lines + [""]


def main_job_section(number: int, runs: list[dict[str, Any]]) -> list[str]:
    """The main job (bench/main_job.py -> bench/results/main_job.json): every recorded run, then the latest run's
    phases. The story of what changed between runs is docs/main-job.md (written by hand)."""
    lines = [f"## {number}. The main job: `./run.sh demo` cold and warm (bench/main_job.py)", ""]
    if not runs:
        return lines + ["No bench/results/main_job.json: run `python bench/main_job.py`.", ""]
    goals = runs[-1].get("goals") or main_job.GOALS
    lines += ["Each run: a fresh clone of the commit named and an empty XBT_HOME (cold), then the same command again"
              f" (warm), each timed as a whole process. Goals: cold at most {goals['cold_s']} s, warm at most"
              f" {goals['warm_s']} s, peak RSS at most {goals['peak_rss_mb']:,} MB. Runs marked transcribed were recorded"
              " before the file kept every run (their source is in the JSON). What changed between runs, and why:"
              " docs/main-job.md.", "", main_job.runs_table(runs), ""]
    latest = next((r for r in reversed(runs) if r.get("cold") or r.get("warm")), None)
    if latest:
        lines += [f"Phases of run {runs.index(latest) + 1} ({str(latest.get('commit', '?'))[:7]}) against the code before"
                  " the main-job work (\"before\"):", "", main_job.markdown(latest), ""]
    return lines


def render(results: dict[str, Any], gpu: dict[str, Any] | None = None, runs: list[dict[str, Any]] | None = None) -> str:
    machine = results.get("machine", {})
    figures = results.get("figures", {})
    keys = [k for k in ORDER if k in figures] + [k for k in figures if k not in ORDER]
    loads = [x for f in figures.values() for part in ("start", "end")
             for x in ((f.get("load_average") or {}).get(part) or [])[:1]]
    cores = machine.get("cores")
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{results.get('command', 'make bench')}` (bench/run_all.py) on {results.get('created', '?')}"
        + (" — **quick smoke run: sizes and repeats are tiny, do not quote these figures**" if results.get("quick") else "")
        + ". Do not edit by hand: change the scripts under bench/ and run the command again. The raw figures are in "
        "bench/results.json.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {machine.get('cpu', '?')} ({', '.join(machine.get('cpu_flags', [])) or 'no AVX'}) |",
        f"| cores | {cores} |",
        f"| memory | {machine.get('memory_gib', '?')} GiB |",
        f"| GPU | {machine.get('gpu') or 'none (CPU only)'} |",
        f"| OS | {machine.get('os', '?')} |",
        "| software | " + ", ".join(f"{k} {v}" for k, v in (machine.get("versions") or {}).items()) + " |",
        f"| threads used | {results.get('threads', '?')} per process (torch, BLAS and faiss) unless a figure says otherwise |",
        f"| total time | {results.get('wall_s', 0) / 60:.0f} min |",
        "",
    ]
    if loads and cores:
        lines += [
            f"**The machine was shared.** The 1-minute load average ranged from {min(loads):.1f} to {max(loads):.1f} "
            f"during these runs, on {cores} cores: other jobs held the cores for much of the time, so every "
            "throughput here is lower, and every latency higher, than on an idle machine of the same kind. "
            "Each figure states its own load at its start and end. Ratios measured within one figure "
            "(overheads, recall, growth with size) are far less affected than absolute rates, because the "
            "variants were timed side by side.",
            "",
        ]
    goals = [(k, figures[k]["goal"]) for k in keys if isinstance(figures[k].get("goal"), dict)]
    if goals:
        lines += ["## Goals", "", "| figure | goal | verdict |", "|---|---|---|"]
        lines += [f"| {figures[k].get('title', k)} | {g['statement']} | {verdict(g)} |" for k, g in goals]
        lines += ["", "The details, and the cause of every gap, are under each figure.", ""]
    for i, key in enumerate(keys, 1):
        lines += figure_section(i, figures[key])
    gpu = gpu if gpu is not None else _read(h.BENCH_DIR / "results" / "gpu.json")
    runs = runs if runs is not None else main_job.read_runs(main_job.OUT)
    lines += gpu_section(len(keys) + 1, gpu) + main_job_section(len(keys) + 2, runs)
    lines += [
        "## Reproducing",
        "",
        "```",
        "make bench          # every figure (about an hour on two busy cores); writes bench/results.json and this page",
        "make bench-quick    # a smoke run in a temporary folder (a few minutes)",
        "python bench/run_all.py --only gallery    # re-run one figure, keep the others, re-render",
        "python bench/report.py                    # re-render this page from bench/results.json",
        "```",
        "",
        "Each script under bench/ also runs on its own (`--help`, `--quick`). Not part of this page: "
        "bench/ray_embed.py (the Ray embedding engine against the local one) and bench/eval_scaling.py (one "
        "large evaluation run) write their own files under bench/results/.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=h.BENCH_DIR / "results.json")
    parser.add_argument("out", nargs="?", type=Path, default=h.REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(json.loads(args.results.read_text())))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
