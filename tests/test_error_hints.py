"""Error messages that tell the user what to type name flags that exist: an id already stored is refused
with a hint (`--on-conflict skip` / `replace`), and following the hint works."""

from __future__ import annotations

import re

import numpy as np
import pytest
import typer
from gallery_support import make_images, save_tiny_openclip
from typer.testing import CliRunner

from xbt.cli import app
from xbt.errors import InputError
from xbt.gallery.store import Gallery
from xbt.models.base import EmbeddingSpace

SPACE = EmbeddingSpace("hints", 4, "e" * 64)


def _options(*path: str) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return {opt for param in command.params for opt in param.opts}


def _flags(message: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z-]*", message))


def test_the_store_names_the_flag_that_exists(tmp_path):
    with Gallery.create(tmp_path / "g", SPACE) as g:
        g.add(np.eye(4, dtype=np.float32)[:1], ["a"], space=SPACE)
        with pytest.raises(InputError) as refused:
            g.add(np.eye(4, dtype=np.float32)[:1], ["a"], space=SPACE)
    flags = _flags(str(refused.value))
    assert "--on-conflict" in flags and flags <= _options("gallery", "add"), str(refused.value)


def test_gallery_add_refuses_with_a_hint_that_works(tmp_path, monkeypatch):
    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    spec = save_tiny_openclip(tmp_path / "model", seed=0)
    make_images(tmp_path / "photos", 3)
    runner = CliRunner()
    built = runner.invoke(app, ["gallery", "build", "--model", spec, "--data", str(tmp_path / "photos"), "--out",
                                str(tmp_path / "g")])
    assert built.exit_code == 0, built.output
    again = ["gallery", "add", "--gallery", str(tmp_path / "g"), "--model", spec, "--data", str(tmp_path / "photos")]
    refused = runner.invoke(app, again)
    message = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "already in the gallery" in message
    flags = _flags(message)
    assert "--on-conflict" in flags and flags <= _options("gallery", "add"), message
    for choice in ("skip", "replace"):  # what the hint says to type
        assert f"--on-conflict {choice}" in message
        followed = runner.invoke(app, again + ["--on-conflict", choice])
        assert followed.exit_code == 0, followed.output
    with Gallery.open(tmp_path / "g") as g:
        assert len(g) == 3 and g.verify() == []
