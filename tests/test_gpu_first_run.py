"""bench/gpu_first_run.sh, the first GPU run prepared: its argument handling, and on a machine without a GPU
(this suite hides the GPUs: conftest.py) the step that detects it, says so and writes the not-measured figure."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_first_run.sh"


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--help"], [""]])
def test_it_takes_exactly_one_output_folder(args, tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage: bash bench/gpu_first_run.sh OUTDIR" in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing set up, nothing written


@pytest.mark.slow
def test_without_a_gpu_it_says_so_and_writes_the_not_measured_figure(tmp_path):
    out = tmp_path / "first-run"
    run = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no CUDA GPU on this machine" in run.stderr
    assert json.loads((out / "detect.json").read_text())["cuda_available"] is False
    figure = json.loads((out / "gpu.json").read_text())
    assert figure["measured"] is False and figure["reason"] == "not measured: no GPU was lent"
    steps = [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert steps == [["setup", "0"], ["gpu-check", "0"]]  # no GPU test was started
