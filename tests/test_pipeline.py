"""The main job end to end on the testbed, on a reduced XBT setting (slow)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_upgrade_demo_end_to_end_and_cached_rerun(tmp_path):
    from PIL import Image

    from xbt.pipeline import UpgradeJob, run_upgrade

    config = yaml.safe_load(open("src/xbt/configs/xbt-testbed.yaml"))
    config["stage1"]["epochs"] = 2
    config["stage2"]["epochs"] = 1
    config["max_pairs"] = 64
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(config))
    job = UpgradeJob.testbed(xbt_config=str(tmp_path / "quick.yaml"), peers=["procrustes-text", "slerp"], n_example_queries=2,
                              device="cpu")  # the CPU by design: a GPU host runs the GPU path in tests/test_gpu_path.py
    logs: list[str] = []
    summary = run_upgrade(job, tmp_path / "out", show_progress=False, log=logs.append)
    results = json.loads(open(summary["results"]).read())
    plain = {"procrustes-text", "slerp", "XBT"}
    assert set(results["matrix"]["methods"]) == plain | {f"{m}+nnn" for m in plain}  # each also with NNN calibration
    assert results["data"]["fit_images"]["n_images"] > 1000  # the openclipart renders, unlabeled
    for m in plain:
        alpha = results["methods"][f"{m}+nnn"]["details"]["calibration"]["alpha"]
        assert set(alpha) == {"t2i", "i2t"} and results["methods"][f"{m}+nnn"]["details"]["derived_from"] == m
    assert results["methods"]["slerp"]["needs_old_model_at_query_time"] is True
    for d in ("t2i", "i2t"):
        assert set(results["matrix"]["methods"]["XBT"][d]) == {"1", "5", "10"}
    assert len(summary["examples"]) == 4
    for png in summary["examples"]:
        assert Image.open(png).size[0] > 300
    assert (tmp_path / "out" / "report" / "report.html").exists()
    # Second run: everything cached (galleries, XBT model, embeddings) — only evaluation and pictures rerun.
    # (Judged on what was reused, not on wall time: with a warm XBT_HOME the first run is cached as well.)
    artifact = Path(summary["xbt_model"]) / "map.safetensors"
    written = artifact.stat().st_mtime_ns
    logs.clear()
    again = run_upgrade(job, tmp_path / "out", show_progress=False, log=logs.append)
    assert any(line.startswith("[3 XBT training (reused)]") for line in logs)
    assert artifact.stat().st_mtime_ns == written  # not trained again
    assert again["matrix"]["methods"]["XBT"] == summary["matrix"]["methods"]["XBT"]
    # Every method was saved as a deployable compatible model; the recommended one is linked.
    models = summary["models"]
    assert set(models["models"]) == plain | {f"{m}+nnn" for m in plain}
    assert all(models["models"][f"{m}+nnn"] == models["models"][m] for m in plain)  # one model, a calibrated gallery
    for folder in models["models"].values():
        assert (Path(folder) / "compat_config.json").exists() and (Path(folder) / "map.safetensors").exists()
    assert json.loads((tmp_path / "out" / "models" / "slerp" / "compat_config.json").read_text())["old_model"] == "testbed:old"
    recommended = tmp_path / "out" / "models" / "recommended"
    if models["method"] is not None:  # this quick job's own figures decide; each outcome has its own checks
        assert recommended.resolve() == Path(models["models"][models["method"]])
        commands = [line for line in summary["deploy_commands"] if not line.startswith("#")]
        calibrated = models["method"].endswith("+nnn")
        assert commands[0].startswith("xbt gallery calibrate" if calibrated else "xbt gallery search")
        assert sum(line.startswith("xbt gallery calibrate") for line in commands) == (2 if calibrated else 0)
    else:
        assert not recommended.exists() and not summary["deploy_commands"]
        assert results["recommendation"]["method"] is None and "No method passes" in results["recommendation"]["reason"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_printed_serve_command_serves_the_recommended_model(tmp_path):
    """Run the demo's printed `xbt serve` command, as a user would, and search over HTTP."""
    import httpx

    from xbt.pipeline import UpgradeJob, run_upgrade

    config = yaml.safe_load(open("src/xbt/configs/xbt-testbed.yaml"))
    config["stage1"]["epochs"] = 2
    config["stage2"]["enabled"] = False
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(config))
    job = UpgradeJob.testbed(xbt_config=str(tmp_path / "quick.yaml"), peers=["procrustes-both", "slerp"], n_example_queries=1,
                              device="cpu")
    summary = run_upgrade(job, tmp_path / "out", show_progress=False, log=lambda line: None)
    assert summary["models"]["method"] is not None, summary["recommendation"]
    env = os.environ | {"PYTHONPATH": str(Path("src").resolve())}
    for line in summary["deploy_commands"]:  # a calibrated recommendation: calibrate the galleries first, as printed
        if line.startswith("xbt gallery calibrate"):
            done = subprocess.run([sys.executable, "-m", "xbt.cli", *shlex.split(line)[1:]], env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, done.stdout + done.stderr
    serve_line = next(line for line in summary["deploy_commands"] if line.startswith("xbt serve"))
    argv = shlex.split(serve_line.split("#")[0])
    port = _free_port()
    argv[argv.index("--port") + 1] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "xbt.cli", *argv[1:]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
            assert proc.poll() is None, proc.stdout.read()
        r = httpx.post(f"{url}/search/text", json={"text": "a red apple", "k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        hits = r.json()["results"]
        assert len(hits) == 5
        # The page shows pictures: the testbed's images lie outside the gallery's media/, and the printed
        # command names their folders (--media-root), so every hit has a thumbnail the page can fetch.
        assert all(h["thumbnail"] for h in hits), serve_line
        thumb = httpx.get(url + hits[0]["thumbnail"], timeout=60)
        assert thumb.status_code == 200 and thumb.headers["content-type"] in ("image/png", "image/jpeg")
    finally:
        proc.terminate()
        proc.wait(30)
