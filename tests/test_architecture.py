"""The layering of docs/architecture.md holds: import-linter's contracts (pyproject.toml) are kept, and no
module imports, directly or through others, a module that imports it back (lazy imports included)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_import_cycles():
    import grimp

    sys.path.insert(0, str(ROOT / "src"))
    graph = grimp.build_graph("xbt")
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported.startswith(f"{importer}.") or importer == "xbt":
                continue  # a package's __init__ re-exporting its own modules is not a cycle
            if graph.chain_exists(importer=imported, imported=importer, as_packages=False):
                chain = graph.find_shortest_chain(importer=imported, imported=importer)
                cycles.append(f"{importer} -> {imported} -> ... -> {importer}: {' -> '.join(chain or [])}")
    assert not cycles, "\n".join(cycles)


def _contract_layers() -> list[list[str]]:
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in doc["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return [[name.strip() for name in layer.split("|")] for layer in contract["layers"]]


def test_each_layer_is_a_whole_package_and_every_package_has_one():
    layers = _contract_layers()
    named = [name for layer in layers for name in layer]
    assert all(":" not in name for name in named), "no ':' siblings: a layer is a package"
    assert all(name.count(".") == 1 for name in named), f"layers name top-level packages or modules only: {named}"
    top = {p.stem if p.is_file() else p.name for p in (ROOT / "src" / "xbt").iterdir()
           if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").exists()}
    assert {n.split(".")[1] for n in named} == top, "every package of xbt is one layer of the contract"


def test_architecture_page_lists_the_contract_layers():
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    table = page[page.index("| layer (top to bottom)"):].split("\n\n", 1)[0]
    rows = [re.findall(r"`(xbt[\w.]*)`", line.split(" | ")[0]) for line in table.splitlines()[2:]]
    assert rows == _contract_layers()


def test_the_service_does_not_depend_on_evaluation():
    import grimp

    sys.path.insert(0, str(ROOT / "src"))
    graph = grimp.build_graph("xbt")
    upstream = graph.find_upstream_modules("xbt.serve", as_package=True)
    assert not {m for m in upstream if m == "xbt.eval" or m.startswith("xbt.eval.")}, "xbt.serve reaches xbt.eval"
