"""Report files from a synthetic matrix, the recommendation logic, and `xbt recommend`."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from xbt.eval.matrix import Cell, UpgradeMatrix
from xbt.eval.recommend import recommend
from xbt.eval.report import format_summary, write_report
from xbt.metrics import Estimate
from xbt.eval.runner import json_safe

KS = (1, 5)


def cell(diff: float, low: float, high: float, gain: float) -> Cell:
    return Cell(Estimate(30 + diff, 25 + diff, 35 + diff), Estimate(diff, low, high), Estimate(gain, gain - 20, gain + 20))


def matrix(methods: dict[str, list[tuple[float, float, float, float]]], info: dict | None = None) -> UpgradeMatrix:
    """methods: name -> four (diff, low, high, gain) tuples, for t2i R@1, t2i R@5, i2t R@1, i2t R@5."""
    base = {d: {k: Estimate(30.0, 25.0, 35.0) for k in KS} for d in ("t2i", "i2t")}
    m = UpgradeMatrix(
        n_queries={"t2i": 300, "i2t": 100}, ks=KS, old_old=base,
        new_new={d: {k: Estimate(40.0, 35.0, 45.0) for k in KS} for d in ("t2i", "i2t")},
        new_vs_old={d: {k: Estimate(10.0, 5.0, 15.0) for k in KS} for d in ("t2i", "i2t")},
        n_resamples=100, method_info=info or {},
    )
    for name, cells in methods.items():
        it = iter(cells)
        m.methods[name] = {d: {k: cell(*next(it)) for k in KS} for d in ("t2i", "i2t")}
    return m


CONFIDENT = (3.0, 1.0, 5.0, 30.0)
POINT = (1.0, -1.0, 3.0, 10.0)
FAIL = (-2.0, -4.0, 0.5, -20.0)


def test_recommend_prefers_passing_everywhere_over_a_higher_mean():
    m = matrix({
        "strong-but-fails-one": [(9, 8, 10, 90)] * 3 + [FAIL],
        "steady": [CONFIDENT] * 4,
        "weaker": [POINT] * 4,
    })
    method, reason = recommend(m)
    assert method == "steady"
    assert "all 4 cells" in reason and "30%" in reason and "Next: weaker" in reason
    assert "confidently" in reason


def test_recommend_flags_point_estimate_passes_and_ensembles():
    m = matrix({"ens": [CONFIDENT, CONFIDENT, POINT, CONFIDENT], "solo": [POINT] * 4},
               info={"ens": {"needs_old_model_at_query_time": True}})
    method, reason = recommend(m)
    assert method == "ens"
    assert "Only 3 of 4 cells pass confidently" in reason and "old model at query time" in reason
    assert recommend(m, allow_old_model_at_query_time=False)[0] == "solo"


def test_recommend_when_nothing_passes_says_what_to_do():
    m = matrix({"a": [CONFIDENT, FAIL, FAIL, FAIL], "b": [CONFIDENT, CONFIDENT, FAIL, (-5, -8, -2, -50)]})
    method, reason = recommend(m)
    assert method is None
    assert "Closest: b" in reason and "passes 2 of 4" in reason and "backfill" in reason
    assert "within the noise" not in reason  # b has a failure whose interval lies below zero
    m2 = matrix({"a": [CONFIDENT, CONFIDENT, CONFIDENT, FAIL]})
    assert "within the noise" in recommend(m2)[1]


def test_undefined_gains_survive_json_and_do_not_break_the_choice():
    nan = float("nan")
    m = matrix({"x": [(3.0, 1.0, 5.0, nan)] * 4, "y": [CONFIDENT] * 4})
    back = UpgradeMatrix.from_dict(json.loads(json.dumps(json_safe(m.to_dict()), allow_nan=False)))
    assert math.isnan(back.methods["x"]["t2i"][1].gain.value)
    assert recommend(back)[0] == "y"


def results_of(m: UpgradeMatrix, curve: list | None = None) -> dict:
    methods = {
        name: {"kind": "peer", "needs_old_model_at_query_time": name == "slerp", "fits_on": "text pairs",
               "query_cost_us": {"1": 12.5, "256": 0.4}}
        for name in m.methods
    }
    method, reason = recommend(m)
    return json_safe({
        "schema": "xbt.results/1", "created": "2026-01-01T00:00:00+00:00",
        "models": {"old": {"spec": "testbed:old", "space_id": "old@1/256d"}, "new": {"spec": "testbed:new", "space_id": "new@2/512d"}},
        "data": {"eval": {"source": "testbed:eval", "n_pairs": 300, "n_images": 100}},
        "protocol": {"ks": list(KS), "n_resamples": 100, "cost_batch_sizes": [1, 256]},
        "methods": methods, "matrix": m.to_dict(), "recommendation": {"method": method, "reason": reason},
        "data_efficiency": curve or [], "warnings": ["2 evaluation captions also appear in the training texts"],
    })


def test_report_files_from_a_synthetic_matrix(tmp_path):
    m = matrix({"slerp": [CONFIDENT] * 4, "procrustes-text": [POINT, FAIL, POINT, POINT]})
    curve = [
        {"method": "slerp", "n_pairs": n, "direction": d, "k": 1, "recall": 20 + n / 10, "low": 15 + n / 10, "high": 25 + n / 10}
        for n in (10, 100, 400) for d in ("t2i", "i2t")
    ]
    paths = write_report(results_of(m, curve), tmp_path)
    results = json.loads(paths["results"].read_text())
    assert results["recommendation"]["method"] == "slerp"
    md = paths["markdown"].read_text()
    assert "| slerp | yes | text pairs | one map, both towers | 4 / 4 of 4 | 30% | 12.5 | 0.4 |" in md
    assert "| procrustes-text | no | text pairs | one map, both towers | 0 / 3 of 4 |" in md
    assert "Gallery-modality methods" not in md
    assert "+3.0 [+1.0, +5.0] PASS" in md and "+1.0 [-1.0, +3.0] pass" in md and "-2.0 [-4.0, +0.5] fail" in md
    assert "figures/data_efficiency.png" in md and "Warnings" in md
    for figure in ("compatibility", "recall", "data_efficiency"):
        assert (tmp_path / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3
    assert 'class="pass-confident"' in page and 'class="pass-point"' in page and 'class="fail"' in page
    assert "<img" in page and 'src="figures' not in page  # self-contained


def test_report_without_a_curve_has_no_curve(tmp_path):
    paths = write_report(results_of(matrix({"affine": [POINT] * 4})), tmp_path / "run", tmp_path / "docs" / "run.md")
    copy = paths["markdown_copy"].read_text()
    assert "](../run/figures/compatibility.png)" in copy  # links work from the copy's folder
    assert not (tmp_path / "figures" / "data_efficiency.png").exists()
    assert "Data efficiency" not in paths["markdown"].read_text()
    text = format_summary(json.loads(paths["results"].read_text()))
    assert "affine" in text and "31.0 (+1.0) pass" in text and "PASS = compatible with confidence" in text


def test_cli_recommend(tmp_path):
    from xbt.cli import app

    good = tmp_path / "good.json"
    good.write_text(json.dumps(results_of(matrix({"slerp": [CONFIDENT] * 4, "affine": [POINT] * 4}))))
    result = CliRunner().invoke(app, ["recommend", str(good)])
    assert result.exit_code == 0 and result.stdout.splitlines()[0] == "slerp"
    result = CliRunner().invoke(app, ["recommend", str(good), "--no-old-model"])
    assert result.stdout.splitlines()[0] == "affine"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(results_of(matrix({"x": [FAIL] * 4}))))
    assert CliRunner().invoke(app, ["recommend", str(bad)]).exit_code == 2
    (tmp_path / "junk.json").write_text("{}")
    result = CliRunner().invoke(app, ["recommend", str(tmp_path / "junk.json")])
    assert result.exit_code == 1


def test_the_emoji_pages_query_cost_sentence_is_xbts_own_figure():
    """The page quoted another method's cost (no-adaptation's 4.7 us) as XBT's; the sentence must match the JSON."""
    import json
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "docs/results/domain-emoji"
    results = json.loads((folder / "results.json").read_text())
    xbt = next(m for name, m in results["methods"].items() if name.startswith("xbt"))
    quoted = re.search(r"XBT's query map costs ([0-9.]+) us per query at batch 256", (folder / "README.md").read_text())
    assert quoted and float(quoted.group(1)) == round(xbt["query_cost_us"]["256"], 1)


def test_the_report_says_which_map_each_query_tower_uses(tmp_path):
    results = results_of(matrix({"procrustes-gallery": [CONFIDENT] * 4, "procrustes-both": [POINT] * 4}))
    results["methods"]["procrustes-gallery"]["details"] = {"query_maps": {
        "shared": False, "text": {"kind": "linear", "fitted_on": "image pairs (the image gallery's modality)"},
        "image": {"kind": "linear", "fitted_on": "text pairs (the text gallery's modality)"}}}
    results["data"]["fit_images"] = {"source": "testbed:vlp_old", "n_images": 1788}
    md = write_report(results, tmp_path)["markdown"].read_text()
    assert ("| procrustes-gallery | no | text pairs | text queries: linear, image pairs (the image gallery's modality);"
            " image queries: linear, text pairs (the text gallery's modality) |") in md
    assert "| procrustes-both | no | text pairs | one map, both towers |" in md
    assert "Gallery-modality methods (suffix -gallery)" in md
    assert "unlabeled images (image-side fits, captions not used): 1788 from `testbed:vlp_old`" in md
