"""The command line as a package over the library: every command goes through the one error path, a concept
has one flag spelling (older spellings still parse, hidden), `upgrade` picks its XBT config by the new
model's backend, and the workflows the commands call are library functions with their own checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from xbt.cli import app
from xbt.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _commands(command=None, path=()):
    command = command or typer.main.get_command(app)
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))
    if path:
        yield path, command


def _registered(typer_app, path=()):
    for info in typer_app.registered_commands:
        yield (*path, info.name), info.callback
    for group in typer_app.registered_groups:
        sub = group.typer_instance
        if sub.registered_callback is not None:
            yield (*path, group.name, "(group options)"), sub.registered_callback.callback
        yield from _registered(sub, (*path, group.name))


def test_every_command_goes_through_the_one_error_path():
    from xbt.cli.common import handle_errors

    wrapper = handle_errors(lambda: None).__code__
    registered = list(_registered(app))
    assert len(registered) >= 28 and {p for p, _ in registered} >= {("serve",), ("gallery", "backfill"), ("testbed", "build")}
    unwrapped = [" ".join(p) for p, callback in registered if getattr(callback, "__code__", None) is not wrapper]
    assert not unwrapped, f"commands that do not go through handle_errors: {unwrapped}"


def test_an_error_of_the_user_is_a_message_and_exit_1(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["gallery", "backfill", "--model", "testbed:new", "--order", "@" + str(tmp_path / "none")])
    assert result.exit_code == 1 and "give --state DIR" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["gallery", "--backend", "nowhere", "info", "--gallery", "g"])
    assert result.exit_code == 1 and "--backend must be embedded or milvus" in result.output


def test_fit_texts_has_one_spelling_and_the_older_one_still_parses():
    for path in [("fit",), ("evaluate",), ("upgrade",)]:
        command = dict(_commands())[path]
        by_name = {opt: param for param in command.params for opt in param.opts}
        assert "--fit-texts" in by_name and not by_name["--fit-texts"].hidden, path
        assert "--fit-text" in by_name and by_name["--fit-text"].hidden, path  # the older spelling, out of --help
    names = {opt for path, command in _commands() for param in command.params for opt in param.opts
             if not getattr(param, "hidden", False)}
    assert "--fit-text" not in names


def test_upgrade_takes_the_config_of_the_new_models_backend():
    from xbt.pipeline import xbt_config_for

    assert xbt_config_for("testbed:new") == "xbt-testbed"
    assert xbt_config_for("openclip:ViT-L-14@openai") == "xbt-clip"
    assert xbt_config_for("hf:openai/clip-vit-base-patch32") == "xbt-clip"
    with pytest.raises(InputError, match="give --config"):
        xbt_config_for("lit:/models/mine")


def test_upgrade_without_a_config_for_another_backend_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["upgrade", "--old", "lit:/a", "--new", "lit:/b", "--data", "x", "--fit-pairs", "x",
                                      "--fit-text", "x", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 1 and "give --config" in " ".join(result.output.split())
    assert not out.exists()
    missing = CliRunner().invoke(app, ["upgrade", "--old", "lit:/a", "--new", "lit:/b", "--data", "x", "--fit-pairs", "x"])
    assert missing.exit_code == 2 and "--fit-texts" in missing.output


def test_a_priority_file_is_read_into_ids(tmp_path):
    from xbt.gallery.migration import parse_order

    (tmp_path / "first.txt").write_text("b\n\n a \n")
    assert parse_order(f"@{tmp_path / 'first.txt'}") == ["b", "a"]
    assert parse_order("field:taken") == "field:taken"
    with pytest.raises(InputError, match="cannot read the priority ids"):
        parse_order(f"@{tmp_path / 'missing.txt'}")


def test_the_cross_validation_yaml_is_read_by_the_library(tmp_path):
    from xbt.eval.crossval import read_crossval_config

    cfg, compare = read_crossval_config("cv-testbed", k=3, seeds=(0,), n_resamples=10)
    assert cfg.k == 3 and tuple(cfg.seeds) == (0,) and cfg.n_resamples == 10
    assert all(len(pair) == 2 for pair in compare)
    (tmp_path / "typo.yaml").write_text("peerz: [affine]\n")
    with pytest.raises(InputError, match="unknown field.*peerz"):
        read_crossval_config(tmp_path / "typo.yaml")
    (tmp_path / "pairs.yaml").write_text("compare: [[a, b, c]]\n")
    with pytest.raises(InputError, match="two method names"):
        read_crossval_config(tmp_path / "pairs.yaml")


def test_the_token_comes_one_way(tmp_path):
    from xbt.serve.launch import serve_token, token_on_command_line

    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o600)
    assert serve_token(None, token_file) == "s3cret"
    assert serve_token("", None) is None  # an empty XBT_SERVE_TOKEN is no token
    with pytest.raises(InputError, match="one way"):
        serve_token("t", token_file)
    warnings: list[str] = []
    assert serve_token("t", None, on_command_line=True, warn=warnings.append) == "t" and "visible" in warnings[0]
    assert serve_token("t", None, on_command_line=False, warn=warnings.append) == "t" and len(warnings) == 1
    assert token_on_command_line(["xbt", "serve", "--token=x"]) and not token_on_command_line(["xbt", "serve"])


def test_the_train_config_takes_overrides(xbt_home):
    from xbt.train.config import load_xbt_config

    cfg = load_xbt_config("xbt-testbed", ["stage2.lora.enabled=false", "seed=4"], max_pairs=0)
    assert cfg.stage2.lora.enabled is False and cfg.seed == 4 and cfg.max_pairs == 0 and cfg.stage2.enabled is False
    with pytest.raises(InputError, match="KEY=VALUE"):
        load_xbt_config("xbt-testbed", ["seed"])


@pytest.mark.parametrize("module", ["xbt", "xbt.cli"])
def test_python_dash_m_runs_the_command_line(module):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    done = subprocess.run([sys.executable, "-m", module, "gallery", "--help"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "backfill-curve" in done.stdout, done.stderr


def test_evaluate_folds_reads_its_config_through_the_library(tmp_path):
    (tmp_path / "typo.yaml").write_text("peerz: [affine]\n")
    runner = CliRunner()
    alone = runner.invoke(app, ["evaluate", "--folds", "2", "--out", str(tmp_path / "o")])
    assert alone.exit_code == 1 and "add --testbed" in alone.output
    typo = runner.invoke(app, ["evaluate", "--testbed", "--folds", "2", "--cv-config", str(tmp_path / "typo.yaml"),
                               "--out", str(tmp_path / "o")])
    assert typo.exit_code == 1 and "unknown field(s) peerz" in " ".join(typo.output.split())
    assert not (tmp_path / "o").exists()


def test_a_benefit_scorer_without_in_place_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["gallery", "backfill", "--state", str(tmp_path / "m"), "--model", "testbed:new",
                                      "--benefit-scorer", str(tmp_path / "scorer")])
    assert result.exit_code == 1 and "add --in-place" in " ".join(result.output.split())
    assert not (tmp_path / "m").exists()
