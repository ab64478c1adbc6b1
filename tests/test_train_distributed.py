"""Data-parallel XBT training: how a global batch is split, the differentiable gather, and (slow) a
two-process torchrun run of both stages that ends with the weights of a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gallery_support import make_images, save_tiny_openclip

from conftest import CORPUS
from xbt.train.distributed import DistContext, shard_sizes, torchrun_command


def test_shard_sizes_split_a_batch_contiguously_and_evenly():
    assert shard_sizes(5, 2) == [3, 2] and shard_sizes(4, 2) == [2, 2] and shard_sizes(2, 3) == [1, 1, 0]
    for n in range(0, 12):
        for world in range(1, 5):
            sizes = shard_sizes(n, world)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            slices = [DistContext(r, world, torch.device("cpu"), True).local_slice(n) for r in range(world)]
            assert [i for s in slices for i in range(n)[s]] == list(range(n))  # rank order restores the batch


def test_single_process_context_changes_nothing():
    ctx = DistContext.local()
    module = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert ctx.is_main and ctx.wrap(module) is module and ctx.local_slice(4) == slice(0, 4)
    assert ctx.gather(x, 4) is x
    ctx.barrier()
    ctx.check_same({"a": 1}, "anything")


def test_torchrun_command_runs_the_module_on_n_local_processes():
    cmd = torchrun_command(2, ["xbt.cli", "train", "--config", "c.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--standalone" in cmd
    assert cmd[cmd.index("-m", 3):] == ["-m", "xbt.cli", "train", "--config", "c.yaml"]


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank holds its rows of x; loss = InfoNCE on the gathered batch. Saves this rank's gradient."""
    import torch.distributed as dist

    from xbt.train.stages import multi_positive_infonce

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctx = DistContext(rank, world, torch.device("cpu"), True)
    torch.manual_seed(0)
    x, keys, w = torch.randn(5, 4), torch.randn(5, 4), torch.randn(4, 4)
    weight = w.clone().requires_grad_(True)
    pred = ctx.gather(x[ctx.local_slice(5)] @ weight, 5)
    multi_positive_infonce(pred, keys, torch.eye(5, dtype=torch.bool), 0.1).backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # what DistributedDataParallel does (then divides by world)
    torch.save({"pred": pred.detach(), "grad": grad / world}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gathered_loss_gives_the_single_process_gradient_on_uneven_slices(tmp_path):
    """5 rows on 2 processes (3 + 2): the averaged gradient equals the one-process gradient."""
    import torch.multiprocessing as mp

    from xbt.train.stages import multi_positive_infonce

    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    x, keys, w = torch.randn(5, 4), torch.randn(5, 4), torch.randn(4, 4)
    weight = w.clone().requires_grad_(True)
    pred = x @ weight
    multi_positive_infonce(pred, keys, torch.eye(5, dtype=torch.bool), 0.1).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["pred"], pred.detach())
        torch.testing.assert_close(got["grad"], weight.grad, atol=1e-6, rtol=1e-5)


# ----- slow: the whole program on two processes ---------------------------------------------------------------
@pytest.fixture()
def ddp_setup(tmp_path):
    """Tiny old/new open_clip models on disk (every process loads the same weights), 8 pairs, 12 texts;
    batch sizes that do not divide evenly over two processes; dropout 0 (masks are drawn per process)."""
    import yaml

    old = save_tiny_openclip(tmp_path / "old", seed=0)
    new = save_tiny_openclip(tmp_path / "new", seed=1, embed_dim=48, width=48)
    images = make_images(tmp_path / "images", 8)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(p), "caption": c}) + "\n" for p, c in zip(images, CORPUS)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS + ["a small bird", "a big red bus", "the sea at night", "a cup of tea"]))
    cfg = {
        "old": old, "new": new, "train_pairs": str(pairs), "text_corpus": str(corpus), "checkpoint_every": 2,
        "projection": {"kind": "mlp", "hidden": 16, "dropout": 0.0, "init": "lstsq"},
        "stage1": {"epochs": 3, "batch_size": 5, "noise_std": 0.2},
        "stage2": {"epochs": 3, "batch_size": 3, "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "image": True}},
    }
    path = tmp_path / "xbt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_processes_train_the_single_process_model(ddp_setup, tmp_path, xbt_home):
    from safetensors.torch import load_file

    import xbt
    from xbt.train.config import XBTConfig
    from xbt.train.stages import train_xbt

    train_xbt(XBTConfig.from_file(ddp_setup), tmp_path / "single", show_progress=False)
    src = str(Path(xbt.__file__).parents[1])
    env = {**os.environ, "XBT_HOME": str(xbt_home), "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "xbt.cli", "train", "--config", str(ddp_setup), "--out", str(tmp_path / "ddp"),
                          "--nproc", "2", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "training_report.json").read_text())
    single = json.loads((tmp_path / "single" / "training_report.json").read_text())
    assert report["processes"] == 2
    for stage in ("stage1", "stage2"):  # the same loss at every step: the same global batches, the same negatives
        assert len(report[stage]) == len(single[stage]) == 9
        for a, b in zip(report[stage], single[stage]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    for name in ("map.safetensors", "lora_text/adapter_model.safetensors", "lora_image/adapter_model.safetensors"):
        got, want = load_file(str(tmp_path / "ddp" / name)), load_file(str(tmp_path / "single" / name))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)
    # Training moved the weights far beyond that tolerance (LoRA's B matrices start at zero).
    lora = load_file(str(tmp_path / "single" / "lora_text" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 1e-3
    # Only rank 0 wrote: one artifact, checkpoints of the last step.
    from xbt.train.checkpoint import find_checkpoint

    newest = find_checkpoint(tmp_path / "ddp", 2)
    assert newest is not None and json.loads((newest / "state.json").read_text())["step"] == 9
