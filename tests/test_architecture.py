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
