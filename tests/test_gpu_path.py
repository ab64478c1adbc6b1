"""The GPU path's fixes (issue 30), each shown on the CPU where a CPU can show it: the device moves (with
tests/test_meta_device.py), the refusals, the fp16 scaler's checkpoint, the cache keys of GPU vectors,
the out-of-memory back-off, the adapter's map and the suite's CPU pin."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xbt.errors import InputError


# ----- item 1: the query map's timer waits for the device --------------------------------------------------------
def test_map_query_cost_synchronises_the_maps_device(monkeypatch):
    import xbt.eval.runner as runner
    from xbt.compat.maps import LinearMap

    seen = []
    monkeypatch.setattr(runner, "synchronize", lambda device: seen.append(device))
    runner.map_query_cost(LinearMap(4, 3), batch_sizes=(1,))
    assert seen and set(seen) == {torch.device("cpu")}


# ----- item 6: one GPU per DDP process -------------------------------------------------------------------------
def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_more_training_processes_than_gpus_is_refused(monkeypatch):
    from xbt.train.distributed import resolve_device

    _gpus(monkeypatch, 1)
    for rank in (0, 1):  # every rank refuses, not only the one without a GPU of its own
        with pytest.raises(InputError, match="2 training processes on this machine but 1 GPU"):
            resolve_device("cuda", local_rank=rank, local_world_size=2)
    _gpus(monkeypatch, 2)
    assert [resolve_device("auto", r, 2) for r in (0, 1)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert resolve_device("cpu", 3, 4) == torch.device("cpu")


# ----- item 7: the other ranks wait outside the process group; xbt train --num-workers -----------------------------
WAITING_RANKS = """
import sys, time
from xbt.train.distributed import process_group
with process_group("cpu", timeout_s=2) as ctx:  # a 2 s process-group timeout stands for torch's 30 min
    if ctx.is_main:
        time.sleep(6)  # rank 0 embeds the training data
    (ctx.wait_for_main if sys.argv[1] == "wait_for_main" else ctx.barrier)()
    print(f"rank {ctx.rank} went on", flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path, how: str) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "ranks.py"
    script.write_text(WAITING_RANKS)
    src = str(Path(__file__).resolve().parents[1] / "src")
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), how], env=base | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs)]


@pytest.mark.slow
def test_the_other_ranks_outwait_the_process_groups_timeout(tmp_path):
    """While rank 0 embeds the training data longer than the process group's timeout, the other ranks wait on
    a barrier of their own (wait_for_main) and all go on; a plain barrier (the old wait) times out."""
    waited = _two_ranks(tmp_path, "wait_for_main")
    assert [r.returncode for r in waited] == [0, 0], [r.stdout[-1500:] for r in waited]
    assert "rank 1 went on" in waited[1].stdout
    plain = _two_ranks(tmp_path, "barrier")
    assert plain[1].returncode != 0 and "rank 1 went on" not in plain[1].stdout


def test_xbt_train_passes_num_workers_to_training_and_to_torchrun(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import xbt.train.distributed as distributed
    import xbt.train.stages as stages
    from xbt.cli import app

    seen = {}
    monkeypatch.setattr(stages, "train_xbt", lambda cfg, out, **kw: seen.update(kw) or types.SimpleNamespace(
        space=types.SimpleNamespace(id="s")))
    result = CliRunner().invoke(app, ["train", "--config", "xbt-testbed", "--out", str(tmp_path), "--device", "cpu",
                                      "--num-workers", "3"])
    assert result.exit_code == 0, result.output
    assert seen["num_workers"] == 3
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, args: launched.append(args) or 0)
    CliRunner().invoke(app, ["train", "--config", "xbt-testbed", "--out", str(tmp_path), "--nproc", "2",
                             "--num-workers", "3"])
    assert launched and launched[0][launched[0].index("--num-workers") + 1] == "3"


# ----- item 8: the fp16 GradScaler is checkpointed --------------------------------------------------------------
class _Tiny(nn.Module):
    """A stand-in compatible model for the loop: a projection, no LoRA, a precision."""

    def __init__(self, precision: str):
        super().__init__()
        from xbt.compat.maps import Projection
        from xbt.models.device import Placement

        torch.manual_seed(0)
        self.projection = Projection(6, 4, "linear")
        self.lora_configs: dict = {}
        self.placement = Placement(precision)


def _fp16_run(out, stop_after_step=None):
    from xbt.train.loop import Schedule, train_loop

    model = _Tiny("fp16")
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))

    def make_step():
        def step(_, idx, gen):
            # A finite loss whose scaled gradients overflow fp16 at first: the scaler skips steps and backs off,
            # so its scale after step 4 is not the initial one.
            return (model.projection(x[idx]).float() * 30).pow(2).mean(), {}
        return step

    schedule = Schedule(stage=1, n=16, batch_size=4, epochs=3, seed=0)
    return train_loop(model, [{"params": list(model.projection.parameters()), "lr": 1e-2}], 0.0, schedule, make_step,
                      out=out, checkpoint_every=2, label="t", stop_after_step=stop_after_step, show_progress=False), model


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # a skipped (overflowed) fp16 step
def test_a_resumed_fp16_run_follows_the_uninterrupted_one(tmp_path):
    from xbt.train.loop import StopTraining

    whole, model = _fp16_run(tmp_path / "whole")
    with pytest.raises(StopTraining):
        _fp16_run(tmp_path / "cut", stop_after_step=4)
    resumed, again = _fp16_run(tmp_path / "cut")
    assert np.isfinite([h["loss"] for h in whole]).all()
    assert [h["loss"] for h in resumed] == [h["loss"] for h in whole]
    torch.testing.assert_close(again.projection.linear.weight, model.projection.linear.weight, rtol=0, atol=0)


def test_the_scalers_state_round_trips_through_a_checkpoint(tmp_path):
    from xbt.train.checkpoint import Checkpoint, resume, save_checkpoint

    model = _Tiny("fp16")
    opt = torch.optim.AdamW(model.projection.parameters())
    scaler = torch.amp.GradScaler("cpu")
    state = scaler.state_dict() | {"scale": 256.0, "_growth_tracker": 7}
    scaler.load_state_dict(state)
    save_checkpoint(tmp_path, model, opt, None, Checkpoint(1, 3, []), scaler)
    fresh = torch.amp.GradScaler("cpu")
    assert resume(tmp_path, 1, _Tiny("fp16"), torch.optim.AdamW(model.projection.parameters()), None, fresh).step == 3
    assert fresh.state_dict() == state


# ----- item 9: GPU vectors are cached apart from the CPU's ------------------------------------------------------
def _encoder(device: str, precision: str = "fp32"):
    from xbt.models.device import Placement

    return types.SimpleNamespace(encoder_id="openclip-ViT-B-32-abc", placement=Placement(precision), device=torch.device(device))


@contextlib.contextmanager
def _tf32(matmul: bool, convolutions: bool):
    """torch's TF32 switches set for the block (they are properties of torch.backends: set, then restored)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, convolutions
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_feature_cache_keys_tell_gpu_vectors_apart():
    from xbt.embed import encoder_cache_id

    assert encoder_cache_id(_encoder("cpu"), "image") == "openclip-ViT-B-32-abc-image"  # the CPU keys of earlier runs
    assert encoder_cache_id(_encoder("cpu", "bf16"), "text") == "openclip-ViT-B-32-abc-text-bf16"
    with _tf32(matmul=False, convolutions=True):  # torch's defaults: TF32 convolutions
        assert encoder_cache_id(_encoder("cuda:0"), "image") == "openclip-ViT-B-32-abc-image-cuda-tf32"
    with _tf32(matmul=False, convolutions=False):
        assert encoder_cache_id(_encoder("cuda"), "image") == "openclip-ViT-B-32-abc-image-cuda"
        assert encoder_cache_id(_encoder("cuda", "bf16"), "text") == "openclip-ViT-B-32-abc-text-bf16-cuda"


def test_testbed_tower_features_are_keyed_by_device():
    from xbt.data.testbed import tower_device_tag

    assert tower_device_tag(nn.Linear(2, 2)) == ""
    assert tower_device_tag(nn.Linear(2, 2).to("meta")) == "-meta"


# ----- item 10: out of memory halves the batch --------------------------------------------------------------------
def _oom_above(limit: int):
    def forward(rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows.shape[0]} rows")
        return rows * 2
    return forward


def test_split_on_oom_returns_the_same_rows():
    from xbt.models.device import split_on_oom

    x = torch.arange(11, dtype=torch.float32)[:, None]
    forward = _oom_above(3)
    got = split_on_oom(lambda a, b: forward(x[a:b]), 11, torch.device("cpu"))
    torch.testing.assert_close(got, x * 2)
    with pytest.raises(InputError, match="does not fit in the memory"):
        split_on_oom(lambda a, b: _oom_above(0)(x[a:b]), 11, torch.device("cpu"))
    with pytest.raises(ValueError):  # other errors are not swallowed
        split_on_oom(lambda a, b: (_ for _ in ()).throw(ValueError("bad input")), 4, torch.device("cpu"))


def test_encode_text_backs_off_when_the_device_runs_out_of_memory(tiny_openclip_names, monkeypatch):
    from xbt.specs import load_model

    model = load_model(f"openclip:{tiny_openclip_names[0]}")
    texts = [f"caption number {i}" for i in range(10)]
    want = model.encode_text(texts, batch_size=16)
    forward = model.forward_text

    def short_of_memory(tokens):
        if tokens.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return forward(tokens)

    monkeypatch.setattr(model, "forward_text", short_of_memory)
    got = model.encode_text(texts, batch_size=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_training_out_of_memory_says_what_to_do(tmp_path):
    from xbt.train.loop import Schedule, train_loop

    model = _Tiny("fp32")

    def make_step():
        def step(_, idx, gen):
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return step

    with pytest.raises(InputError, match=r"stage1.batch_size.*bf16.*gradient_checkpointing"):
        train_loop(model, [{"params": list(model.projection.parameters()), "lr": 1e-3}], 0.0, Schedule(1, 8, 4, 1, 0),
                   make_step, out=tmp_path, checkpoint_every=1, label="stage 1", show_progress=False)


# ----- item 11: the suite runs on the CPU -----------------------------------------------------------------------
def test_the_suite_hides_the_gpus_unless_asked():
    if os.environ.get("XBT_TEST_GPU") == "1":
        pytest.skip("XBT_TEST_GPU=1: the GPU tests run (bench/gpu_first_run.sh)")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


# ----- item 12: the adapter's map owns its MLP ----------------------------------------------------------------------
def test_moving_an_adapters_map_leaves_the_fitted_adapter_in_place():
    from xbt.compat.adapter import ResidualAdapter
    from xbt.compat.base import FitData
    from xbt.models.base import EmbeddingSpace

    rng = np.random.default_rng(0)
    new, old = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    new_space, old_space = EmbeddingSpace("new", 6, "n" * 16), EmbeddingSpace("old", 4, "o" * 16)
    adapter = ResidualAdapter(new_space, old_space, fit_on="text", hidden=8, epochs=2).fit(
        FitData(new_text=new, old_text=old))
    before = adapter.transform(new[:5])
    query_map = adapter.to_map().to("meta")  # as CompatibleModel / configure move it to the new model's device
    assert query_map.mlp is not adapter.mlp
    assert all(p.device.type == "cpu" for p in adapter.mlp.parameters())
    np.testing.assert_array_equal(adapter.transform(new[:5]), before)
