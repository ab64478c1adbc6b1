"""An installed xbt works outside the checkout: the wheel carries the shipped configs and the service's
page, and the installed package finds them from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_wheel_ships_configs_and_static_files_and_works_from_elsewhere(tmp_path):
    import shutil

    source = tmp_path / "source"  # built from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=600, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("xbt-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "xbt/configs/xbt-testbed.yaml" in names
    assert any(n.startswith("xbt/serve/static/") and n.endswith(".html") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=600)
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tmp_path / "site")}
    script = ("import xbt, xbt.paths\n"
              f"assert xbt.__file__.startswith({str(tmp_path / 'site')!r}), xbt.__file__\n"
              "print(xbt.paths.resolve_config('xbt-testbed'))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_file() and str(tmp_path / "site") in out.stdout
    cli = subprocess.run([sys.executable, "-m", "xbt.cli", "demo", "--help"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "xbt-testbed" in cli.stdout, cli.stderr
