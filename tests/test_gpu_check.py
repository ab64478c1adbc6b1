"""bench/gpu_check.py, the first GPU run's figures: on a machine without a GPU it says so and makes up
nothing; on one, every step is written as it finishes and a failing step does not lose the others."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check_under_test", None)


def test_without_a_gpu_it_says_so_and_measures_nothing(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    figure = json.loads(out.read_text())
    assert figure["measured"] is False and figure["reason"] == "not measured: no GPU was lent"
    assert "encoding" not in figure and "training" not in figure
    assert "not measured: no GPU was lent" in capsys.readouterr().out


def test_each_step_is_written_and_a_failing_step_does_not_stop_the_others(gpu_check, tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    written = []
    write = gpu_check._write
    monkeypatch.setattr(gpu_check, "_write", lambda path, figure: (written.append(json.loads(json.dumps(figure))),
                                                                     write(path, figure)))

    def encode_figures(name, *args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_check, "encode_figures", encode_figures)
    monkeypatch.setattr(gpu_check, "training_figures", lambda device, old, new, p, *a: {"precision": p, "stage2_steps_per_s": 1.5})
    assert gpu_check.main(["--out", str(out), "--smoke-on-cpu"]) == 0
    figure = json.loads(out.read_text())
    assert figure["smoke"] is True and figure["measured"] is False and figure["complete"] is True
    assert figure["encoding"][0]["model"] == "openclip:ViT-B-32"
    assert figure["encoding"][0]["error"].startswith("RuntimeError: CUDA out of memory")
    assert figure["training"][0]["stage2_steps_per_s"] == 1.5  # the step after the failure ran
    assert figure["errors"] == 1 and figure["all_within_tolerance"] is None
    # written at the start, after each step, and at the end: a run killed mid-way keeps its finished steps
    assert [len(w.get("encoding", [])) + len(w.get("training", [])) for w in written] == [0, 1, 2, 2]
    assert written[1]["complete"] is False
