"""XBT's quality on the real offline testbed (slow: trains XBT on the testbed's training pairs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "testbed-cv" / "results.json"


@pytest.mark.slow
def test_xbt_beats_the_old_model_where_the_cross_validated_run_is_confident(tmp_path):
    """Train XBT with the shipped testbed config, reduced to its projection-only form (stage 2 without
    LoRA: a minute here; the form the committed three-seed run measures as `xbt-nolora`), on the fixed
    split's training pairs; evaluate on its 299 held-out queries per direction: new->old must beat
    old->old in every cell where the committed cross-validated run (docs/results/testbed-cv) passes with
    confidence."""
    from xbt.data.testbed import load_split
    from xbt.eval.runner import run_evaluation
    from xbt.paths import resolve_config
    from xbt.specs import load_model
    from xbt.train.config import XBTConfig
    from xbt.train.stages import train_xbt

    committed = json.loads(RESULTS.read_text())
    cells = [(d, int(k)) for d, row in committed["matrix"]["methods"]["xbt-nolora"].items()
             for k, cell in row.items() if cell["passes_confidently"]]
    assert cells, "the committed cross-validated run is confident in no cell: nothing to hold XBT to"
    old, new = load_model("testbed:old"), load_model("testbed:new")
    cfg = XBTConfig.from_file(resolve_config("xbt-testbed"))
    cfg.stage2.lora.enabled = False
    model = train_xbt(cfg, tmp_path / "xbt", old=old, new=copy.deepcopy(new), show_progress=False)
    run = run_evaluation(old, new, load_split("eval"), {"xbt": model}, n_resamples=200)
    xbt = run.matrix.methods["xbt"]
    failing = [(d, k, xbt[d][k].recall.value, run.matrix.old_old[d][k].value) for d, k in cells
               if not xbt[d][k].recall.value > run.matrix.old_old[d][k].value]
    assert not failing, f"XBT does not beat the old model in {failing} (direction, K, XBT, old->old)"
