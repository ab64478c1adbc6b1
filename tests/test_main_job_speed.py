"""What makes the main job fast from nothing: the image towers' inference form (equal to the published
network within 1e-4, cached apart), the set-up handing uv pip's own package sources, phase times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["lite0", "lite2"])
def tower(request):
    from xbt.models.towers import EfficientNetLiteTower

    return EfficientNetLiteTower(request.param)


def _pixels(tower, n: int = 2) -> torch.Tensor:
    """Real preprocessing of varied pictures (flat, striped, noisy, not square) at the tower's input size."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pictures = [Image.new("RGB", (300, 200), (250, 120, 30)),
                Image.fromarray((torch.rand(180, 240, 3, generator=g) * 255).to(torch.uint8).numpy()),
                Image.fromarray(((torch.arange(256 * 256).reshape(256, 256, 1) % 37 > 18) * 255).repeat(1, 1, 3)
                                .to(torch.uint8).numpy())]
    return torch.stack([tower.transform(p) for p in pictures[:n]])


def test_inference_form_equals_the_published_network(tower):
    from xbt.models.base import weights_fingerprint

    x = _pixels(tower)
    fingerprint, keys = weights_fingerprint(tower), sorted(tower.state_dict())
    with torch.enable_grad():
        published = tower(x)  # autograd on: the network as published
    assert published.requires_grad
    with torch.inference_mode():
        fast = tower(x)
    with torch.no_grad():
        fast_no_grad = tower(x)
    assert tower._inference is not None and tower._inference[1] is not tower.net, "the folded form did not run"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tower._inference[1].modules())
    torch.testing.assert_close(fast, published.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(fast_no_grad, fast, atol=0, rtol=0)
    # the features of one item do not depend on the batch it is in
    with torch.inference_mode():
        torch.testing.assert_close(tower(x[1:2]), fast[1:2], atol=1e-5, rtol=0)
    # the tower's identity is the published network's: same weights, same state_dict, same fingerprint
    assert sorted(tower.state_dict()) == keys and weights_fingerprint(tower) == fingerprint
    assert tower.cache_id.endswith(f"-{tower.INFERENCE_FORM}")


def test_inference_form_follows_weight_changes():
    import copy

    from xbt.models.towers import EfficientNetLiteTower

    tower = copy.deepcopy(EfficientNetLiteTower("lite0"))
    x = _pixels(tower, 2)
    with torch.no_grad():
        before = tower(x)
        tower.net._conv_stem.weight.mul_(1.5)  # an in-place change (training, load_state_dict)
        after = tower(x)
        published = tower.net.extract_features(x).mean(dim=(2, 3))
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, published, atol=1e-4, rtol=0)


def test_an_unfoldable_network_runs_as_published():
    from xbt.models.towers import EfficientNetLiteTower

    tower = EfficientNetLiteTower("lite0")
    tower.net._blocks[0]._bn1 = torch.nn.Identity()  # a layout fold_batchnorm does not know: no BatchNorm there
    x = _pixels(tower, 1)
    with torch.no_grad():
        out = tower(x)
        published = tower.net.extract_features(x).mean(dim=(2, 3))
    assert tower._inference is not None and tower._inference[1] is None
    torch.testing.assert_close(out, published, atol=0, rtol=0)


# ----- ./run.sh: uv gets pip's sources ------------------------------------------------------------------
def _pip_sources(tmp_path: Path, config: str, env: dict[str, str]) -> list[str]:
    """Run run.sh's pip_sources function alone, with this interpreter standing in for the venv's python."""
    import shlex
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))
    conf = tmp_path / "pip.conf"
    conf.write_text(config)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    script = f'set -euo pipefail; eval "$(sed -n "/^pip_sources() {{/,/^}}/p" {REPO / "run.sh"})"; venv={venv}; pip_sources'
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # only this file: no user config (HOME) and no machine-wide one (XDG_CONFIG_DIRS; /etc/pip.conf here holds
    # a certificate path only, which is no source)
    isolated = {"PIP_CONFIG_FILE": str(conf), "HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "xdg"),
                "XDG_CONFIG_HOME": str(tmp_path / "config")}
    out = subprocess.run(["bash", "-c", script], env=clean | isolated | env,
                         capture_output=True, text=True, check=True, timeout=60)
    return shlex.split(out.stdout)


def test_uv_is_given_the_index_mirrors_find_links_and_constraints_pip_uses(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=99\n")
    args = _pip_sources(tmp_path, f"[global]\nextra-index-url = file:///mirror/a/simple file:///mirror/b/simple\n"
                                  f"find-links = /wheels/global\nconstraint = {constraints}\n"
                                  "[install]\nindex-url = https://index.example/simple\n",
                        {"PIP_FIND_LINKS": "/wheels/env"})
    assert args == ["--index-url", "https://index.example/simple",
                    "--extra-index-url", "file:///mirror/a/simple", "--extra-index-url", "file:///mirror/b/simple",
                    "--find-links", "/wheels/env",  # a PIP_ variable beats the file, as for pip
                    "--constraint", str(constraints)]


def test_no_pip_configuration_gives_uv_its_defaults(tmp_path):
    assert _pip_sources(tmp_path, "", {}) == []
    assert _pip_sources(tmp_path, "[global]\nno-index = true\nfind-links = /w\n", {}) == ["--find-links", "/w", "--no-index"]


_FAKE_PYTHON = r"""#!/bin/bash
# Stands in for python3 while run.sh's setup_venv runs: `-m venv DIR` makes a venv of stubs that log their calls.
echo "python3 $*" >> "$CALLS"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/bash\necho "python $*" >> "$CALLS"\n' > "$3/bin/python"
  printf '#!/bin/bash\necho "pip $*" >> "$CALLS"\ncase "$*" in *uv==*) exit 1;; esac\n' > "$3/bin/pip"
  chmod +x "$3/bin/python" "$3/bin/pip"
fi
"""


def _setup_venv(tmp_path: Path, repo: Path, home: Path) -> list[str]:
    """Run run.sh's own setup_venv (its functions, as written) with stub interpreters; the calls it made."""
    fake = tmp_path / "python3"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.write_text("")
    functions = " ".join(['"/^log() /p"'] + [f'"/^{name}() {{/,/^}}/p"' for name in
                                             ("phase_done", "pip_sources", "install_with_uv", "install_with_pip", "setup_venv")])
    script = (f'set -euo pipefail; for f in {functions}; do eval "$(sed -n "$f" {REPO / "run.sh"})"; done; '
              f'UV_VERSION=0; repo={repo}; XBT_HOME={home}; python_bin={fake}; setup_venv; echo "VENV=$venv"')
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "CALLS": str(calls), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    venv = next(line[5:] for line in done.stdout.splitlines() if line.startswith("VENV="))
    return [f"VENV {venv}", *calls.read_text().splitlines()]


def test_run_sh_keys_the_environment_on_the_lock_builds_it_once_and_falls_back_to_pip(tmp_path):
    """run.sh's set-up, run: the environment's folder is keyed on the two pinned files only (not pyproject),
    built once (a second run installs and compiles nothing), installed with pip when uv cannot be had, and
    its modules compiled once."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "requirements.lock").write_text("numpy==2.0.0\n")
    (repo / "requirements-nodeps.txt").write_text("open-clip-torch==3.0\n")
    (repo / "pyproject.toml").write_text("[project]\nname='x'\n")
    home = tmp_path / "home"
    first = _setup_venv(tmp_path, repo, home)
    venv = first[0].split()[1]
    assert any(c.startswith("pip install") and "uv==" in c for c in first)  # uv tried first, unavailable
    assert any(c == f"pip install -q -r {repo}/requirements.lock" for c in first)  # then pip, from the lock
    assert any(c == f"pip install -q --no-deps -r {repo}/requirements-nodeps.txt" for c in first)
    assert sum("-m compileall" in c for c in first) == 1
    (repo / "pyproject.toml").write_text("[project]\nname='y'\n")  # not part of the key
    again = _setup_venv(tmp_path, repo, home)
    assert again[0].split()[1] == venv and not any("install" in c or "compileall" in c for c in again[1:])
    (repo / "requirements.lock").write_text("numpy==2.1.0\n")  # a new lock: a new environment
    other = _setup_venv(tmp_path, repo, home)
    assert other[0].split()[1] != venv and any("requirements.lock" in c for c in other)
    subprocess.run(["bash", "-n", str(REPO / "run.sh")], check=True)


# ----- phase times ---------------------------------------------------------------------------------------
def test_setup_times_from_run_sh_reach_the_summary(monkeypatch):
    from xbt.pipeline import _setup_timings

    monkeypatch.setenv("XBT_SETUP_TIMINGS", '{"Debian packages": 41.5, "Python environment": 98.0, "assets": 2}')
    assert _setup_timings() == {"Debian packages": 41.5, "Python environment": 98.0, "assets": 2.0}
    for bad in ("not json", "[1, 2]", ""):
        monkeypatch.setenv("XBT_SETUP_TIMINGS", bad)
        assert _setup_timings() == {}
    monkeypatch.delenv("XBT_SETUP_TIMINGS")
    assert _setup_timings() == {}


def test_training_stage_times_are_read_from_the_report(tmp_path):
    from xbt.pipeline import _training_timings

    assert _training_timings(tmp_path) == {}
    (tmp_path / "training_report.json").write_text(json.dumps({"timings": {"prepare_s": 1.5, "stage2_s": 30, "x": "y"}}))
    assert _training_timings(tmp_path) == {"prepare_s": 1.5, "stage2_s": 30}


def test_tower_features_with_decoding_ahead_equal_the_plain_loop(tmp_path, monkeypatch):
    """Three batches (4 + 4 + 2): the decoder thread's pixels are those of the plain loop, in order, and cached."""
    from PIL import Image

    from xbt.data import testbed
    from xbt.data.images import load_image
    from xbt.data.testbed import STEP_TIMINGS, tower_image_features
    from xbt.models.towers import EfficientNetLiteTower

    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(testbed, "IMAGE_BATCH", 4)
    paths = []
    for i in range(10):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (40 + i, 60), ((i * 7) % 256, (i * 31) % 256, 200)).save(path)
        paths.append(str(path))
    tower = EfficientNetLiteTower("lite0")
    got = tower_image_features(tower, paths, show_progress=False)
    with torch.inference_mode():
        plain = torch.cat([tower(torch.stack([tower.transform(load_image(p)) for p in paths[s : s + 4]]))
                           for s in (0, 4, 8)]).numpy()
    assert got.shape == (10, tower.out_dim)
    assert (got == plain).all()
    assert f"{tower.cache_id} images (10)" in STEP_TIMINGS
    assert list(Path(tmp_path / "home" / "features" / tower.cache_id).glob("shard-*.npz"))  # cached under the new id


def test_text_features_in_length_sorted_batches_equal_corpus_order(tmp_path, monkeypatch):
    from xbt.data import testbed
    from xbt.data.testbed import TEXT_BATCHING, tower_text_features
    from xbt.models.towers import SentenceTransformerTower

    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(testbed, "TEXT_BATCH", 8)
    tower = SentenceTransformerTower("asset:all-MiniLM-L6-v2")
    texts = [("a very long caption about a red bicycle leaning on a wall " * (i % 4)) + f"item {i}" for i in range(20)]
    got = tower_text_features(tower, texts, show_progress=False)
    with torch.inference_mode():
        plain = torch.cat([tower(tower.tokenize(texts[s : s + 8])) for s in (0, 8, 16)]).numpy()
    assert got.shape == plain.shape
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(plain), atol=1e-5, rtol=0)
    assert (tmp_path / "home" / "features" / f"{tower.cache_id}-{TEXT_BATCHING}").is_dir()
