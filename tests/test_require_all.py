"""XBT_REQUIRE_ALL=1 (set by .ci/run) turns every skip into a failure, except for tests marked gpu or cpu_only:
CI cannot pass without running a test because a package, a Debian package or a built asset was missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = '''
import pytest

def test_skips():
    pytest.skip("needs something missing")

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no GPU here")

def test_runs():
    assert True
'''


def _pytest(tmp_path: Path, require_all: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n  gpu: x\n  cpu_only: x\n")
    env = {**os.environ, "XBT_REQUIRE_ALL": require_all,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-rA", "-p", "no:cacheprovider",
                           str(tmp_path / "test_cases.py")], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_skip_fails_under_the_switch_and_a_gpu_test_may_skip(tmp_path):
    done = _pytest(tmp_path, "1")
    assert done.returncode == 1, done.stdout
    assert "FAILED test_cases.py::test_skips" in done.stdout and "XBT_REQUIRE_ALL" in done.stdout
    assert "1 failed, 1 passed, 1 skipped" in done.stdout  # the gpu test skipped, the plain one failed


def test_without_the_switch_a_skip_is_a_skip(tmp_path):
    done = _pytest(tmp_path, "0")
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped" in done.stdout


def test_ci_sets_the_switch():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "XBT_REQUIRE_ALL=1" in ci and "./run.sh test" in ci
