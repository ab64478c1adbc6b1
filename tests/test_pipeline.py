"""The main job end to end on the testbed, on a reduced XBT setting (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_upgrade_demo_end_to_end_and_cached_rerun(tmp_path):
    from PIL import Image

    from xbt.pipeline import UpgradeJob, run_upgrade

    config = yaml.safe_load(open("configs/xbt-testbed.yaml"))
    config["stage1"]["epochs"] = 2
    config["stage2"]["epochs"] = 1
    config["max_pairs"] = 64
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(config))
    job = UpgradeJob.testbed(xbt_config=str(tmp_path / "quick.yaml"), peers=["procrustes-text", "slerp"], n_example_queries=2)
    logs: list[str] = []
    summary = run_upgrade(job, tmp_path / "out", show_progress=False, log=logs.append)
    results = json.loads(open(summary["results"]).read())
    assert set(results["matrix"]["methods"]) == {"procrustes-text", "slerp", "XBT"}
    assert results["methods"]["slerp"]["needs_old_model_at_query_time"] is True
    for d in ("t2i", "i2t"):
        assert set(results["matrix"]["methods"]["XBT"][d]) == {"1", "5", "10"}
    assert len(summary["examples"]) == 4
    for png in summary["examples"]:
        assert Image.open(png).size[0] > 300
    assert (tmp_path / "out" / "report" / "report.html").exists()
    # Second run: everything cached (galleries, XBT model, embeddings) — only evaluation and pictures rerun.
    # (Judged on what was reused, not on wall time: with a warm XBT_HOME the first run is cached as well.)
    artifact = Path(summary["xbt_model"]) / "projection.safetensors"
    written = artifact.stat().st_mtime_ns
    logs.clear()
    again = run_upgrade(job, tmp_path / "out", show_progress=False, log=logs.append)
    assert any(line.startswith("[3 XBT training (reused)]") for line in logs)
    assert artifact.stat().st_mtime_ns == written  # not trained again
    assert again["matrix"]["methods"]["XBT"] == summary["matrix"]["methods"]["XBT"]
