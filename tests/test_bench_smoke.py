"""The benchmark code under bench/ runs: its harness, one real figure on a tiny case, and the report.

Benchmarks are not tests; this only keeps them from rotting between `make bench` runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _harness

    return _harness


def test_timing_and_memory_readings(bench):
    t = bench.repeat(lambda: time.sleep(0.002), 3, warmup=0)
    assert t.n == 3 and len(t.runs) == 3
    assert 0.002 <= t.min <= t.median <= t.max
    per_call = bench.repeat_fast(lambda: sum(range(100)), 2, target_s=0.01)
    assert 0 < per_call.median < 0.01

    with bench.PeakMemory() as mem:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, touched
        del block
    assert mem.elapsed_s > 0
    if mem.reset:  # Linux: the peak is this block's own
        assert mem.peak_over_before_mib > 30


def test_query_cost_figure_and_report(bench, tmp_path):
    import torch

    import query_cost
    import report

    out = tmp_path / "query_cost.json"
    with torch.random.fork_rng():
        bench.cli(query_cost.run, "smoke", query_cost.add_arguments,
                  argv=["--quick", "--repeats", "1", "--new-dim", "16", "--old-dim", "8", "--hidden", "16", "--out", str(out),
                        # the adapter is left out: its fit imports torch's optimisers (seconds), nothing of bench's
                        "--methods", "xbt-mlp,xbt-linear,procrustes-text,affine,slerp"])
    figure = json.loads(out.read_text())
    methods = {r["method"] for r in figure["rows"]}
    assert {"procrustes-text", "affine", "slerp"} <= methods
    assert any(m.startswith("xbt projection (mlp") for m in methods)
    assert {r["batch"] for r in figure["rows"]} == {1, 256}
    assert all(r["us_1t"] > 0 and r["mflop_per_query"] > 0 for r in figure["rows"])
    # the verdict is the mlp projection's CPU time at batch 256 against the goal, as the figure's rows say
    mlp = next(r for r in figure["rows"] if r["kind"] == "xbt" and "mlp" in r["method"] and r["batch"] == 256)
    assert figure["goal"]["met"] is (mlp["cpu_us_1t"] <= query_cost.GOAL_US)
    assert len(figure["load_average"]["start"]) == 3

    page = report.render({"created": "now", "machine": bench.machine_info(), "threads": 1, "wall_s": 1.0,
                          "figures": {"query_cost": figure}})
    assert "## 1. Query-time cost" in page and "| method | batch |" in page
    assert "Verdict:" in page and "procrustes-text" in page


def test_gallery_helpers(bench):
    import faiss

    import gallery_search as g
    from xbt.gallery.index import IndexConfig

    vectors = g.synthetic_vectors(300, seed=0, dim=32, latent=8)
    assert vectors.shape == (300, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(32))
    flat.add_with_ids(vectors, np.arange(300))
    assert g.index_bytes(flat) == 300 * 32 * 4 + 300 * 8
    assert g.recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]])) == pytest.approx(2 / 3)

    # a default HNSW build projected past the budget at the next size (100 s x 12 = 1200 s) is replaced by the
    # first calibrated setting projected to fit, and the page says so
    calibration = [{"m": m, "ef_construction": efc, "build_cpu_s": t}
                   for (m, efc), t in zip(g.HNSW_LADDER, [10.0, 4.0, 2.0, 1.0, 0.5])]
    previous = {"n": 100_000, "hnsw_calibration": calibration,
                "rows": [{"kind": "hnsw", "build_idle_s": 100.0, "default_params": True},
                         {"kind": "ivf", "build_idle_s": 1.0, "default_params": True}]}
    config, notes = g.budgeted_config(1_000_000, previous, budget_s=600)
    assert (config.hnsw_m, config.hnsw_ef_construction) == g.HNSW_LADDER[1] and config.ivf_nlist is None
    assert len(notes) == 1 and "HNSW" in notes[0] and "M=16" in notes[0]
    config, _ = g.budgeted_config(1_000_000, previous, budget_s=300)
    assert (config.hnsw_m, config.hnsw_ef_construction) == g.HNSW_LADDER[2]
    config, notes = g.budgeted_config(1_000_000, previous, budget_s=10_000)
    assert config == IndexConfig() and notes == []


def test_export_figure_times_torch_and_onnxruntime(bench, tmp_path):
    """bench/export.py on a tiny map: both runtimes timed at batch 1 and 256, the outputs agree, load recorded."""
    import export

    out = tmp_path / "export.json"
    figure = bench.cli(export.run, "smoke", export.add_arguments,
                       ["--quick", "--repeats", "1", "--new-dim", "16", "--old-dim", "8", "--hidden", "8",
                        "--kinds", "adapter,slerp", "--out", str(out)])
    assert json.loads(out.read_text()) == figure
    assert [(r["map"], r["batch"]) for r in figure["rows"]] == [("adapter", 1), ("adapter", 256), ("slerp", 1), ("slerp", 256)]
    for row in figure["rows"]:
        assert row["torch_us"] > 0 and row["onnxruntime_us"] > 0 and row["max_abs_diff"] <= 1e-5
        assert len(row["load_average"]) == 3
    assert figure["goal"]["met"] and figure["load_average"]["start"]


def test_the_benchmarks_page_is_rendered_from_its_json_files(bench):
    """docs/benchmarks.md is exactly what bench/report.py makes of the committed JSON files: no hand-written section
    that `make bench` would erase, no figure the files do not hold."""
    import report

    repo = Path(__file__).resolve().parents[1]
    page = report.render(json.loads((repo / "bench" / "results.json").read_text()))
    assert page == (repo / "docs" / "benchmarks.md").read_text()


def test_the_main_job_keeps_every_run_and_the_page_shows_them(bench, tmp_path):
    import main_job
    import report

    out = tmp_path / "main_job.json"
    out.write_text(json.dumps({"schema": "xbt.bench.main_job/1", "commit": "a" * 40, "cold_s": 700.0, "warm_s": 8.0,
                               "peak_rss_mb": 3900.0, "created": "2026-12-01T00:00"}))
    runs = main_job.read_runs(out)  # a file of the first schema is its one run
    main_job.write_runs(out, [*runs, {"commit": "b" * 40, "cold_s": 950.0, "warm_s": 7.0, "peak_rss_mb": 3000.0,
                                      "note": "second", "goals_met": {"cold_s": False, "warm_s": True, "peak_rss_mb": True}}])
    runs = main_job.read_runs(out)
    assert [r["commit"][0] for r in runs] == ["a", "b"]
    section = "\n".join(report.main_job_section(7, runs))
    assert "| 1, 2026-12-01 00:00 | aaaaaaa |" in section and "| second | 950 s | 7.0 s | 3,000 MB |" in section
    assert "warm_s, peak_rss_mb |" in section  # the goals the second run met
    gpu = "\n".join(report.gpu_section(6, {"measured": False, "reason": "not measured: no GPU was lent"}))
    assert "Not measured: no GPU was lent" in gpu
