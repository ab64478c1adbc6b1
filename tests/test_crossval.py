"""Cross-validation folds over the testbed's caption groups, and pooling per-query hits over folds and seeds."""

from __future__ import annotations

import numpy as np
import pytest

from xbt.data import folds as folds_module
from xbt.data.pairs import Pair
from xbt.errors import InputError


def _fake_items(n_groups: int = 300, n_clip: int = 50):
    groups = {}
    for g in range(n_groups):
        caption = f"A thing number {g}."
        groups[caption.lower()] = [Pair(f"/img/{g}-{j}.png", caption, image_id=f"tux:{g}-{j}", source="tuxpaint")
                                   for j in range(1 + g % 3)]
    groups["an empty group."] = []
    clip = [Pair(f"/clip/{i}.png", f"clip art {i}", image_id=f"clip:{i}", source="openclipart") for i in range(n_clip)]
    clip.append(Pair("/clip/leak.png", "A thing number 7.", image_id="clip:leak", source="openclipart"))
    return groups, clip


@pytest.fixture
def fake_testbed(monkeypatch, tmp_path):
    monkeypatch.setenv("XBT_HOME", str(tmp_path))
    monkeypatch.setattr(folds_module, "testbed_items", lambda show_progress=False: _fake_items())


def test_every_group_is_evaluated_once_and_never_trained_on_in_its_fold(fake_testbed):
    folds = folds_module.make_folds(k=5, seed=0)
    evaluated = [p.caption for f in folds for p in f.eval]
    assert len(evaluated) == len(set(evaluated)) == 300  # every non-empty group once, one image each
    for fold in folds:
        ev, val = {p.caption for p in fold.eval}, {p.caption for p in fold.val}
        train = {p.caption for p in fold.train}
        assert not (ev & val) and not (ev & train) and not (val & train)
        assert len(fold.val) == folds_module.VAL_GROUPS
        seen = {p.caption.lower() for p in fold.vlp_new} | {t.lower() for t in fold.text_corpus}
        assert not seen & {c.lower() for c in ev | val}  # the leaking openclipart caption is dropped where held out
        assert set(fold.vlp_new) == set(fold.vlp_old) | set(fold.train)
        groups_in_train = {p.caption for p in fold.train}
        assert sum(len(p) for c, p in _fake_items()[0].items() if p and p[0].caption in groups_in_train) == len(fold.train)


def test_folds_are_seeded_written_once_and_read_back(fake_testbed):
    a, b = folds_module.make_folds(5, 0), folds_module.make_folds(5, 0)
    assert [p.image_id for p in a[2].eval] == [p.image_id for p in b[2].eval]
    other = folds_module.make_folds(5, 1)
    assert [p.image_id for p in other[0].eval] != [p.image_id for p in a[0].eval]
    written = folds_module.testbed_folds(5, 0)
    read = folds_module.testbed_folds(5, 0)
    assert (folds_module.folds_dir(5, 0) / "manifest.json").exists()
    assert len(written) == len(read) == 5
    for x, y in zip(written, read, strict=True):
        assert x == y


def test_too_many_folds_for_the_data_is_refused(fake_testbed):
    with pytest.raises(InputError, match="fewer folds"):
        folds_module.make_folds(k=20, seed=0)
    with pytest.raises(InputError, match="at least 2"):
        folds_module.make_folds(k=1, seed=0)


def _fold(ids, hits_by_system, ks=(1, 5)):
    return {"query_ids": ids, "hits": {f"{s}|{d}|{k}": np.asarray(v[d], float) for s, v in hits_by_system.items()
                                       for d in ("t2i", "i2t") for k in ks}}


def test_pooling_orders_queries_by_id_and_checks_the_systems():
    from xbt.eval.crossval import pool_hits

    f0 = _fold(["c", "a"], {"old": {"t2i": [1, 0], "i2t": [0, 0]}, "method:m": {"t2i": [0, 1], "i2t": [1, 1]}})
    f1 = _fold(["b"], {"old": {"t2i": [1], "i2t": [1]}, "method:m": {"t2i": [0], "i2t": [0]}})
    ids, pooled = pool_hits([f0, f1], ks=(1, 5))
    assert ids == ["a", "b", "c"]
    assert pooled["old"]["t2i"][1].tolist() == [0, 1, 1] and pooled["method:m"]["i2t"][5].tolist() == [1, 0, 1]
    f2 = _fold(["d"], {"old": {"t2i": [1], "i2t": [1]}})
    with pytest.raises(InputError, match="different systems"):
        pool_hits([f0, f2], ks=(1, 5))


def test_seed_spread_and_the_paired_difference_of_mean_gain():
    from xbt.eval.crossval import differences_vs, seed_spread
    from xbt.eval.matrix import matrix_from_hits

    rng = np.random.default_rng(0)
    n, ks = 400, (1, 5)

    def system(p):
        return {d: {k: (rng.random(n) < min(1, p * (1 + k / 10))).astype(float) for k in ks} for d in ("t2i", "i2t")}

    seeds = [{"old": system(0.2), "new": system(0.6), "method:good": system(0.5), "method:bad": system(0.25)} for _ in range(3)]
    matrices = [matrix_from_hits(h, ks, 200, 0) for h in seeds]
    spread = seed_spread(matrices)
    assert len(spread["methods"]["good"]["mean_gain"]["values"]) == 3
    assert spread["methods"]["good"]["mean_gain"]["sd"] > 0
    diff = differences_vs(seeds[0], "good", "bad", ks, 300)
    assert diff["above_zero"] and diff["mean_gain_difference"]["low"] > 0
    same = differences_vs(seeds[0], "good", "good", ks, 300)
    assert same["mean_gain_difference"]["value"] == 0 and not same["above_zero"]


def test_an_xbt_variant_override_must_name_a_config_key():
    from xbt.eval.crossval import CrossValConfig, xbt_config_for

    cfg = CrossValConfig(xbt={"no-lora": {"stage2.lora.enabled": False}, "typo": {"stage2.lora.enabeld": False}})
    assert xbt_config_for(cfg, "no-lora", 3)["stage2"]["lora"]["enabled"] is False
    assert xbt_config_for(cfg, "no-lora", 3)["seed"] == 3
    with pytest.raises(InputError, match="no key"):
        xbt_config_for(cfg, "typo", 0)


def test_xbt_train_takes_dotted_overrides(tmp_path):
    from typer.testing import CliRunner

    from xbt.cli import app
    from xbt.train.config import apply_overrides

    doc = {"stage2": {"lora": {"enabled": True}}, "seed": 0}
    assert apply_overrides(doc, {"stage2.lora.enabled": False})["stage2"]["lora"]["enabled"] is False
    assert doc["stage2"]["lora"]["enabled"] is True  # the input is not changed
    result = CliRunner().invoke(app, ["train", "--config", "xbt-testbed", "--out", str(tmp_path / "x"),
                                      "--set", "stage2.lora.enabeld=false"])
    assert result.exit_code != 0 and "no key 'stage2.lora.enabeld'" in result.output
    result = CliRunner().invoke(app, ["train", "--config", "xbt-testbed", "--out", str(tmp_path / "x"), "--set", "seed"])
    assert result.exit_code != 0 and "KEY=VALUE" in result.output


def test_the_committed_cross_validated_page_renders_its_protocol_spread_and_differences():
    import json
    from pathlib import Path

    from xbt.eval.report import report_blocks, to_markdown

    results = json.loads((Path(__file__).resolve().parents[1] / "docs/results/testbed-cv/results.json").read_text())
    text = to_markdown(report_blocks(results, {"heatmap": "h.png", "recall": "r.png"}))
    assert "## Cross-validation" in text and "Pooled: 705 text and 705 image queries" in text
    seeds = results["crossval"]["seeds"]  # the protocol's 3 seeds
    assert seeds == [0, 1, 2]
    assert seeds == list(range(len(seeds))) and results["command"].endswith(
        f"--folds 5 --seeds {len(seeds)} --cv-config cv-testbed --out docs/results/testbed-cv --resamples 1000")
    assert "| xbt-nolora+nnn - procrustes-both+nnn |" in text
    assert "| procrustes-gallery+nnn - procrustes-both+nnn |" in text
    spread = results["crossval"]["seed_spread"]["methods"]["xbt-nolora"]["mean_gain"]
    assert len(spread["values"]) == len(seeds) and spread["sd"] > 0


def test_a_single_seed_page_says_its_seed_spread_is_not_available():
    """Before the fix, a one-seed page printed a spread of 0.0, as if three seeds had agreed exactly."""
    import copy
    import json
    from pathlib import Path

    from xbt.eval.report import report_blocks, to_markdown

    results = json.loads((Path(__file__).resolve().parents[1] / "docs/results/testbed-cv/results.json").read_text())
    one = copy.deepcopy(results)
    one["crossval"]["seeds"] = [0]
    for entry in one["crossval"]["seed_spread"]["methods"].values():
        entry["mean_gain"] = {"mean": entry["mean_gain"]["values"][0], "sd": 0.0, "values": entry["mean_gain"]["values"][:1]}
    row = next(line for line in to_markdown(report_blocks(one, {"heatmap": "h", "recall": "r"})).splitlines()
               if line.startswith("| xbt-nolora+nnn |"))
    assert "| n/a |" in row and "| 0.0 |" not in row


def test_code_digest_follows_the_source(tmp_path, monkeypatch):
    """Caches keyed on code (issue 27, item 6): editing a module changes the digest of every package that holds it."""
    import sys

    from xbt.durable import code_digest

    pkg = tmp_path / "digestpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "fit.py").write_text("ALPHA = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before, module_before = code_digest("digestpkg"), code_digest("digestpkg.sub.fit")
    (pkg / "sub" / "fit.py").write_text("ALPHA = 2\n")
    code_digest.cache_clear()
    assert code_digest("digestpkg") != before and code_digest("digestpkg.sub.fit") != module_before
    sys.modules.pop("digestpkg", None)
    sys.modules.pop("digestpkg.sub", None)


def test_a_folds_saved_hits_are_keyed_on_the_code_that_made_them(monkeypatch):
    """Before the fix the key held the config only: hits saved by older code were reused after a code fix."""
    from xbt.eval import crossval

    cfg = crossval.CrossValConfig(xbt_config="xbt-testbed")
    monkeypatch.setattr(crossval, "fold_code_digest", lambda: "code-a")
    key_a = cfg.fold_key()
    monkeypatch.setattr(crossval, "fold_code_digest", lambda: "code-b")
    assert cfg.fold_key() != key_a


def test_the_cv_config_fits_unlabeled_images_from_training_splits_only():
    import yaml

    from xbt.eval.crossval import CrossValConfig
    from xbt.paths import resolve_config

    doc = yaml.safe_load(resolve_config("cv-testbed").read_text())
    doc.pop("compare")
    cfg = CrossValConfig(**doc)
    assert list(cfg.fit_images) == ["vlp_old"] and "procrustes-gallery" in cfg.peers
    assert cfg.fold_key() != CrossValConfig(**(doc | {"fit_images": []})).fold_key()
    for leaky in ("eval", "val", "nope"):
        with pytest.raises(InputError, match="fit_images"):
            CrossValConfig(fit_images=[leaky])
