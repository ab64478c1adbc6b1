"""No tensor made on the CPU by accident: in every module of src/ that works with torch tensors, a tensor
factory (torch.zeros / ones / eye / randn / arange / full / empty / tensor) names its `device=`, or says
why the CPU is meant with a `# cpu-only: reason` comment on the call or the line above it.

A factory without `device=` makes a CPU tensor; fed to a module on a GPU it is the "Expected all tensors to
be on the same device" crash of a GPU run (issue 30). This test reads the source (ast), so it runs on any
machine; tests/test_meta_device.py exercises the same functions with their modules on `meta`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "xbt"
FACTORIES = frozenset({"zeros", "ones", "eye", "randn", "arange", "full", "empty", "tensor"})
MARK = "# cpu-only:"


def torch_modules() -> list[Path]:
    """The modules that work with torch tensors: those that import torch (at the top or inside a function)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch" or n.startswith("torch.") for n in names):
                found.append(path)
                break
    return found


def unplaced_factories(source: str) -> list[tuple[int, str]]:
    """(line, call) of each torch.<factory>(...) call without device= and without a cpu-only mark on its lines
    or on the line above."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        around = lines[max(0, node.lineno - 2) : node.end_lineno]
        if not any(MARK in line and line.split(MARK, 1)[1].strip() for line in around):
            found.append((node.lineno, ast.get_source_segment(source, node) or node.func.attr))
    return found


def test_the_scan_sees_torch_modules():
    names = {p.relative_to(SRC).as_posix() for p in torch_modules()}
    assert {"compat/maps.py", "eval/runner.py", "models/base.py", "train/stages.py", "data/testbed.py"} <= names


@pytest.mark.parametrize("path", torch_modules(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_tensor_factories_name_their_device(path):
    found = unplaced_factories(path.read_text())
    assert not found, (f"{path.relative_to(SRC)}: tensor factories without device= (pass the device of the tensors they"
                       f" meet, or mark a deliberate CPU tensor with '{MARK} why'): "
                       + "; ".join(f"line {line}: {call}" for line, call in found))


def test_the_rule_catches_a_cpu_tensor_and_accepts_the_two_ways_out():
    assert [line for line, _ in unplaced_factories("import torch\nx = torch.ones(3, 1)\n")] == [2]
    assert unplaced_factories("import torch\nx = torch.ones(3, 1, device=y.device)\n") == []
    assert unplaced_factories("import torch\nx = torch.ones(3)  # cpu-only: a host buffer\n") == []
    assert unplaced_factories("import torch\n# cpu-only: built here, moved with the module\nx = torch.eye(\n    3)\n") == []
    assert [line for line, _ in unplaced_factories("import torch\nx = torch.eye(3)  # cpu-only:\n")] == [2]  # a reason is due
