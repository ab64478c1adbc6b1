"""Every method also searched with NNN calibration (+nnn): the bank from training queries, alpha chosen on
val, paired in one matrix with the plain systems; the commands that calibrate a deployed gallery the same way."""

from __future__ import annotations

import numpy as np
import pytest
from test_eval_runner import toy_world

from xbt.errors import InputError
from xbt.eval.calibrated import add_calibrated, calibration_commands
from xbt.eval.runner import run_evaluation


@pytest.fixture()
def world(tmp_path, monkeypatch):
    return toy_world(tmp_path, monkeypatch)[:5]


def test_every_method_gets_a_calibrated_twin_chosen_on_val(world):
    old, new, eval_pairs, train, val = world
    run = run_evaluation(old, new, eval_pairs, ["procrustes-both", "procrustes-gallery"], fit_pairs=train,
                         n_resamples=30, cost_batch_sizes=(8,))
    plain = {n: q.texts.copy() for n, q in run.queries.items()}
    choices = add_calibrated(run, old, new, bank_pairs=train, val_pairs=val)
    assert set(choices) == {"procrustes-both+nnn", "procrustes-gallery+nnn"}
    assert set(run.matrix.methods) == {"procrustes-both", "procrustes-gallery", "procrustes-both+nnn", "procrustes-gallery+nnn"}
    for name, choice in choices.items():
        base = name.removesuffix("+nnn")
        assert run.queries[name].gallery_bias is not None and run.queries[base].gallery_bias is None
        np.testing.assert_array_equal(run.queries[base].texts, plain[base])  # the plain system is untouched
        assert set(choice.alpha) == {"t2i", "i2t"} and choice.n_val_queries["t2i"] == len(val)
        record = run.methods[name]
        assert record.details["derived_from"] == base and "NNN" in record.fits_on
        assert run.compatible[name] is run.compatible[base]
        assert run.matrix.method_info[name]["details"]["calibration"]["alpha"] == choice.alpha
        if choice.alpha == {"t2i": 0.0, "i2t": 0.0}:  # val said "leave it off": the same hits as the plain system
            assert run.matrix.mean_gain(name) == pytest.approx(run.matrix.mean_gain(base))
    with pytest.raises(InputError, match="val pairs"):
        add_calibrated(run, old, new, bank_pairs=train, val_pairs=val[:1], methods=["procrustes-both"])


def test_calibration_commands_name_the_bank_and_each_directions_alpha():
    lines = calibration_commands("compat:/m", "/g/images", "/g/captions", "testbed:xbt_train", {"t2i": 0.5, "i2t": 0.25})
    assert lines[0] == "xbt gallery calibrate --gallery /g/images --model compat:/m --queries testbed:xbt_train --alpha 0.5"
    assert "--gallery /g/captions" in lines[1] and lines[1].endswith("--alpha 0.25")
