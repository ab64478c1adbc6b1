"""Every command that runs a model takes --device and --precision (one shared definition in cli/common.py),
checks them before doing any work, and a gallery built at bf16 on the CPU keeps the model's space."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from gallery_support import make_images, save_tiny_openclip
from typer.testing import CliRunner

from xbt.cli import app

MODEL_COMMANDS = [
    ("embed",), ("evaluate",), ("fit",), ("upgrade",), ("demo",), ("chain",), ("serve",), ("train",),
    ("testbed", "evaluate"), ("gallery", "build"), ("gallery", "add"), ("gallery", "search"), ("gallery", "info"),
    ("gallery", "backfill"), ("gallery", "backfill-curve"),
]


def _command(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=[" ".join(p) for p in MODEL_COMMANDS])
def test_every_model_command_takes_device_and_precision(path):
    options = {opt for param in _command(path).params for opt in param.opts}
    assert {"--device", "--precision"} <= options, f"xbt {' '.join(path)} lacks --device/--precision"


@pytest.mark.cpu_only
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
def test_bad_device_or_precision_is_refused_before_any_work(tmp_path):
    runner = CliRunner()
    fit = ["fit", "procrustes-text", "--old", "openclip:none", "--new", "openclip:none", "--out", str(tmp_path / "o")]
    result = runner.invoke(app, [*fit, "--device", "cpu", "--precision", "fp16"])
    assert result.exit_code == 1 and "fp16 needs a CUDA GPU" in result.output
    result = runner.invoke(app, [*fit, "--device", "cuda"])
    assert result.exit_code == 1 and "no CUDA GPU" in result.output
    result = runner.invoke(app, ["upgrade", "--old", "a:b", "--new", "a:b", "--data", "x", "--fit-pairs", "x",
                                 "--fit-texts", "x", "--precision", "half"])
    assert result.exit_code == 1 and "--precision must be one of" in result.output
    assert not (tmp_path / "o").exists()


def test_a_gallery_built_and_searched_at_bf16_on_the_cpu(tmp_path, xbt_home):
    spec = save_tiny_openclip(tmp_path / "model", seed=0)
    images = make_images(tmp_path / "images", 6)
    runner = CliRunner()
    out = tmp_path / "gallery"
    built = runner.invoke(app, ["gallery", "build", "--model", spec, "--data", str(tmp_path / "images"), "--out", str(out),
                                "--device", "cpu", "--precision", "bf16", "--num-workers", "2"])
    assert built.exit_code == 0, built.output
    info = runner.invoke(app, ["gallery", "info", "--gallery", str(out), "--model", spec, "--precision", "bf16"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["size"] == len(images)
    assert described["model"]["runtime"] == {"device": "cpu", "precision": "bf16", "num_workers": 0}
    # fp32 queries search the bf16-built gallery: same space (the weights did not change)
    found = runner.invoke(app, ["gallery", "search", "--gallery", str(out), "--model", spec, "--image", str(images[3]),
                                "-k", "1", "--device", "auto", "--precision", "fp32"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)[0]["id"] == images[3].name


def test_evaluate_records_device_and_precision_in_results_and_report(tmp_path, xbt_home):
    old = save_tiny_openclip(tmp_path / "old", seed=0)
    new = save_tiny_openclip(tmp_path / "new", seed=1, embed_dim=48, width=48)
    images = make_images(tmp_path / "images", 6)
    words = ["red", "green", "blue", "small", "big", "round"]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "caption": f"a {w} thing"}) + "\n" for p, w in zip(images, words)))
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--old", old, "--new", new, "--data", str(data), "--methods",
                                      "no-adaptation", "--resamples", "20", "--out", str(out), "--device", "cpu",
                                      "--precision", "bf16", "--no-recommend"])
    assert result.exit_code == 0, result.output
    protocol = json.loads((out / "results.json").read_text())["protocol"]
    assert protocol["device"] == "cpu" and protocol["precision"] == "bf16" and "old_precision" not in protocol
    assert "encoders: bf16 on cpu; mixed precision (autocast)" in (out / "report.md").read_text()
