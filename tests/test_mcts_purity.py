"""mcts/ stays pure: stdlib (+ numpy) only, so the search runs and tests without any model."""

import ast
import sys
from pathlib import Path

MCTS = Path(__file__).resolve().parent.parent / "mcts"
ALLOWED_THIRD_PARTY = {"numpy"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_mcts_imports_only_stdlib_numpy_and_itself():
    for path in sorted(MCTS.glob("*.py")):
        foreign = _imported_roots(path) - set(sys.stdlib_module_names) - ALLOWED_THIRD_PARTY - {"mcts"}
        assert not foreign, f"{path.name} imports {sorted(foreign)}"
