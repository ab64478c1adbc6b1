"""The GPU path on a real CUDA GPU (marked `gpu`: they run with XBT_TEST_GPU=1 on a CUDA machine, as
bench/gpu_first_run.sh runs them; elsewhere they are reported as skipped with that reason).

GPU vectors are compared with the CPU's by cosine, with the tolerances of tests/device_support.py (fp32:
0.9999, TF32 allowed) and bench/gpu_check.py (bf16: 0.99). With XBT_GPU_OUT set, the `xbt upgrade` run
writes under that folder (the first-run script collects it); otherwise under the test's tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CORPUS, build_tiny_hf
from device_support import MIN_COSINE_FP32, assert_same_directions
from gallery_support import make_images, save_tiny_openclip
from test_real_checkpoint_path import _pairs_file, _xbt

pytestmark = pytest.mark.gpu

MIN_COSINE_BF16 = 0.99
CUDA = torch.device("cuda")


@pytest.mark.parametrize("precision, min_cosine", [("fp32", MIN_COSINE_FP32), ("bf16", MIN_COSINE_BF16)])
def test_encoders_on_the_gpu_point_where_the_cpus_do(precision, min_cosine, tiny_openclip_names, tiny_hf_clip, image_files):
    from xbt.specs import load_model

    for spec in (f"openclip:{tiny_openclip_names[0]}", f"hf:{tiny_hf_clip}"):
        model = load_model(spec)
        space = model.space
        want_images, want_texts = model.encode_image(image_files[:4]), model.encode_text(CORPUS)
        model.configure("cuda", precision)
        assert model.device.type == "cuda"
        assert_same_directions(model.encode_image(image_files[:4]).numpy(), want_images.numpy(), min_cosine)
        assert_same_directions(model.encode_text(CORPUS).numpy(), want_texts.numpy(), min_cosine)
        model.invalidate_space()
        assert model.space == space  # the weights, and so the space, do not depend on the device


def test_a_compatible_models_map_and_its_timing_run_on_the_gpu(tiny_openclip_names):
    from xbt.compat.maps import Projection
    from xbt.compat.model import CompatibleModel
    from xbt.eval.runner import map_query_cost
    from xbt.specs import load_model

    new = load_model(f"openclip:{tiny_openclip_names[1]}")
    torch.manual_seed(0)
    projection = Projection(new.embed_dim, 32, "mlp", hidden=16)
    features = np.random.default_rng(0).normal(size=(8, new.embed_dim)).astype(np.float32)
    want = projection.apply(features)
    model = CompatibleModel(new.configure("cuda"), projection, load_model(f"openclip:{tiny_openclip_names[0]}").space)
    assert next(model.query_map.parameters()).device.type == "cuda"
    assert_same_directions(model.map_features(features), want)
    costs = map_query_cost(model.query_map, batch_sizes=(1, 16))
    assert set(costs) == {1, 16} and all(c > 0 for c in costs.values())


def test_least_squares_start_on_gpu_data_equals_the_cpus():
    from xbt.compat.maps import Projection

    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(64, 12, generator=g), torch.randn(64, 8, generator=g)
    on_cpu, on_gpu = Projection(12, 8, "linear"), Projection(12, 8, "linear")
    on_cpu.init_least_squares(new, old)
    on_gpu.init_least_squares(new.to(CUDA), old.to(CUDA))  # the projection on the CPU, the data on the GPU
    assert_same_directions(on_gpu.linear.weight.detach().numpy(), on_cpu.linear.weight.detach().numpy())


def test_xbt_trains_on_the_gpu_from_the_least_squares_start(tiny_setup, tmp_path):
    from xbt.train.distributed import DistContext
    from xbt.train.stages import train_xbt

    cfg, old, new = tiny_setup
    model = train_xbt(cfg, tmp_path / "run", old=old, new=new, show_progress=False, distributed=DistContext.local("cuda"))
    report = json.loads((tmp_path / "run" / "training_report.json").read_text())
    assert report["runtime"]["device"].startswith("cuda") and len(report["stage2"]) == 3 * 2
    assert all(np.isfinite(h["loss"]) for stage in ("stage1", "stage2") for h in report[stage])
    assert model.encode_text(["a red apple"]).shape == (1, old.embed_dim)


def test_two_training_processes_on_one_gpu_are_refused(tmp_path, xbt_home):
    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs or more: tests/test_train_distributed.py trains on two processes")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "XBT_HOME": str(xbt_home), "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "xbt.cli", "train", "--config", "xbt-testbed", "--out", str(tmp_path / "ddp"),
                          "--nproc", "2", "--device", "cuda"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "2 training processes on this machine but 1 GPU" in run.stdout + run.stderr
    assert "Duplicate GPU" not in run.stdout + run.stderr


def test_xbt_upgrade_on_local_checkpoints_on_the_gpu(tmp_path, xbt_home):
    """The README's path for a team's own checkpoints (an open_clip folder, a Hugging Face CLIP folder) with
    --device cuda: training, evaluation (the per-query cost included), galleries, the saved models."""
    out_root = Path(os.environ.get("XBT_GPU_OUT") or tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XBT_HOME": str(xbt_home), "COLUMNS": "250"}
    work = tmp_path / "inputs"
    old_spec = save_tiny_openclip(work / "old-openclip", seed=0)
    new_spec = f"hf:{build_tiny_hf(work / 'new-hf', 'clip')}"
    fit_pairs = _pairs_file(work / "train.jsonl", make_images(work / "train", 24, seed=1), seed=1)
    eval_pairs = _pairs_file(work / "eval.jsonl", make_images(work / "eval", 12, seed=2), seed=2)
    support = _pairs_file(work / "val.jsonl", make_images(work / "val", 8, seed=3), seed=3)
    (work / "captions.txt").write_text("\n".join(CORPUS * 2) + "\n")
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "src/xbt/configs/xbt-clip.yaml").read_text())
    config["stage1"] |= {"epochs": 2, "batch_size": 16}
    config["stage2"] |= {"epochs": 1, "batch_size": 8}
    config["projection"] |= {"hidden": 32}
    (work / "tiny-clip.yaml").write_text(yaml.safe_dump(config))
    out = out_root / "upgrade-local-checkpoints"
    run = _xbt("upgrade", "--old", old_spec, "--new", new_spec, "--fit-pairs", fit_pairs, "--fit-texts", work / "captions.txt",
               "--support", support, "--data", eval_pairs, "--config", work / "tiny-clip.yaml", "--device", "cuda",
               "--out", out, "--examples", 1, env=env)
    (out / "upgrade.log").write_text(run.stdout + run.stderr)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"]["device"].startswith("cuda")
    results = json.loads(Path(summary["results"]).read_text())
    assert results["protocol"]["device"].startswith("cuda")
    assert {"XBT", "procrustes-both", "slerp"} <= set(results["matrix"]["methods"])
