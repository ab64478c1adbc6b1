"""Mixed precision in XBT training (issue 16): autocast in both stages' steps, bf16 on the CPU, fp16 (with a
gradient scaler) on CUDA only; fp32 training is exactly what it was. The GradScaler path needs a GPU: it
runs in bench/gpu_check.py, not here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_xbt import _fresh_new

from xbt.errors import InputError
from xbt.train.stages import train_xbt


def _map(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "map.safetensors"))


def test_fp32_is_unchanged_and_bf16_trains_on_the_cpu(tiny_setup, tmp_path):  # noqa: F811
    cfg, old, new = tiny_setup
    train_xbt(cfg, tmp_path / "default", old=old, new=_fresh_new(cfg, new), show_progress=False)
    train_xbt(cfg, tmp_path / "fp32", old=old, new=_fresh_new(cfg, new), show_progress=False, precision="fp32")
    default, fp32 = _map(tmp_path / "default"), _map(tmp_path / "fp32")
    assert all(torch.equal(default[k], fp32[k]) for k in default)  # bitwise: fp32 runs the code it always ran

    model = train_xbt(cfg, tmp_path / "bf16", old=old, new=_fresh_new(cfg, new), show_progress=False, precision="bf16")
    report = json.loads((tmp_path / "bf16" / "training_report.json").read_text())
    assert report["runtime"] == {"device": "cpu", "precision": "bf16"}
    assert json.loads((tmp_path / "fp32" / "training_report.json").read_text())["runtime"]["precision"] == "fp32"
    losses = [row["loss"] for stage in ("stage1", "stage2") for row in report[stage]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    bf16 = _map(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the weights stay float32
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16)  # autocast really changed the arithmetic
    assert model.space == old.space


@pytest.mark.cpu_only
def test_fp16_training_is_refused_on_the_cpu(tiny_setup, tmp_path):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    cfg, old, new = tiny_setup
    with pytest.raises(InputError, match="fp16"):
        train_xbt(cfg, tmp_path / "fp16", old=old, new=_fresh_new(cfg, new), show_progress=False, precision="fp16")
