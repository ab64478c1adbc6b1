"""`xbt evaluate --testbed` end to end on the real offline testbed (slow: needs `xbt testbed build`)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from xbt.compat.registry import PEER_METHODS


@pytest.mark.slow
def test_evaluate_testbed_writes_the_full_report(tmp_path):
    from xbt.cli import app

    # On the CPU by design, also on a GPU host: the figures below are the CPU's.
    result = CliRunner().invoke(app, ["evaluate", "--testbed", "--out", str(tmp_path), "--resamples", "300",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["matrix"]["methods"]) == list(PEER_METHODS)
    assert results["models"]["old"]["space"]["dim"] == 256 and results["models"]["new"]["space"]["dim"] == 512
    assert results["data"]["eval"]["source"] == "testbed:eval" and results["warnings"] == []
    matrix = results["matrix"]
    # The upgrade is real on the testbed, and unadapted new queries are near chance against the old gallery.
    assert matrix["new_new"]["t2i"]["10"]["value"] > matrix["old_old"]["t2i"]["10"]["value"]
    assert matrix["methods"]["no-adaptation"]["t2i"]["10"]["recall"]["value"] < 10
    assert not matrix["methods"]["no-adaptation"]["t2i"]["1"]["passes"]
    assert 0 <= results["methods"]["slerp"]["details"]["weight"] <= 1
    assert {r["n_pairs"] for r in results["data_efficiency"]} >= {25, 50, 100, 200}
    for name in ("report.md", "report.html", "figures/compatibility.png", "figures/recall.png", "figures/data_efficiency.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "procrustes-text" in result.output and "old->old" in result.output
