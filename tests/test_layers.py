"""The packages import downward only: core < data, model < trainer, evals < attacks < the entry scripts."""

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
#: package -> the project's top-level packages and modules it may import
ALLOWED = {
    "core": set(),
    "evals": {"evals", "core", "data", "model", "checks", "progress", "run_folder"},
    "model": {"model", "core", "data", "checks", "progress", "run_folder"},
}
PROJECT = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} | \
    {p.stem for p in SRC.glob("*.py")}


def _imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_lower_layers_import_nothing_above_them():
    for package, allowed in ALLOWED.items():
        for path in sorted((SRC / package).rglob("*.py")):
            above = _imported(path) - allowed - {package}
            assert not above, f"{path.relative_to(REPO)} imports {sorted(above)} (a layer above {package})"


def test_evaluation_uses_the_shared_helpers_not_the_trainer():
    assert "trainer" not in set().union(*(_imported(p) for p in (SRC / "evals").rglob("*.py")))
