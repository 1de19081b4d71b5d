"""The house rules, checked on the source: imports run one way with no cycle (function-local
imports count), every module says what it is for, and size limits hold."""

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("pipeline", "mcts", "critics")
# A function-local import of a project module is allowed only here, each for a heavy library
# behind it: the CLI imports each command's modules (torch, transformers, Hydra) when that
# command runs; `qstar inspect` and `qstar report` load torch and the policies only for --credit.
LAZY_PROJECT_IMPORTS = {"pipeline.cli", "pipeline.report.inspect", "pipeline.report.page"}


def modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def resolve(name: str, known: dict) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path, known: dict) -> list[tuple[str, bool]]:
    """(imported project module, whether the import sits inside a function) for every import."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            target = resolve(name, known)
            if target:
                found.append((target, id(node) in local))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        deps = {target for target, _ in imports(path, known) if target != name}
        if path.name == "__init__.py":  # a package re-exporting its own modules is no cycle
            deps = {d for d in deps if not d.startswith(name + ".")}
        edges[name] = deps
    return edges


def test_no_import_cycle_counting_function_local_imports():
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert len(order) == len(modules())


def test_the_scanner_sees_function_local_imports_and_cycles(tmp_path):
    """The checks above can fail: a function-local import is found and marked local, and the
    edge it adds closes a cycle that the sorter refuses."""
    path = tmp_path / "a.py"
    path.write_text("import mcts.tree\n\ndef f():\n    from pipeline.loop import run_loop\n")
    known = {"mcts.tree": None, "pipeline.loop": None, "a": path}
    assert sorted(imports(path, known)) == [("mcts.tree", False), ("pipeline.loop", True)]
    edges = {"a": {"pipeline.loop"}, "pipeline.loop": {"a"}}
    with pytest.raises(CycleError):
        list(TopologicalSorter(edges).static_order())


def test_imports_run_one_way():
    for name, deps in graph().items():
        if name.startswith("mcts"):
            assert all(d.startswith("mcts") for d in deps), (name, deps)
        if name.startswith("critics"):
            assert not any(d.startswith("pipeline") for d in deps), (name, deps)


def test_function_local_imports_of_project_modules_only_where_documented():
    known = modules()
    for name, path in known.items():
        local = [t for t, inside in imports(path, known) if inside]
        if name not in LAZY_PROJECT_IMPORTS:
            assert not local, f"{path}: function-local import of {local}"


def test_mcts_imports_no_torch():
    for path in (REPO / "mcts").rglob("*.py"):
        assert not re.search(r"^\s*(import|from) (torch|transformers|pipeline|critics)\b",
                             path.read_text(), re.M), path


def test_every_module_says_what_it_is_for_and_sizes_hold():
    for path in modules().values():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path}: no module docstring"
        assert path.read_text().count("\n") <= 400, f"{path}: over 400 lines"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path}:{node.lineno} {node.name} is {length} lines"


def test_readme_layout_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## How it fits together", 1)[1].split("```")[1]
    listed, top = set(), None
    for line in block.splitlines():
        entry = re.match(r"^(\s*)(\w+)/\s", line + " ")
        if entry and not entry.group(1):
            top = entry.group(2)
            listed.add(top)
        elif entry and top:
            listed.add(f"{top}/{entry.group(2)}")
    packages = {str(p.parent.relative_to(REPO)) for root in ROOTS
                for p in (REPO / root).rglob("__init__.py")}
    assert {x for x in listed if x.split("/")[0] in ROOTS} == packages


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lowercase, punctuation but - and _ dropped,
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_github_anchor_rule():
    assert github_anchor("Arm (b) with the demo's LoRA training") == "arm-b-with-the-demos-lora-training"
    assert github_anchor("Spare KV columns: tried, not adopted") == "spare-kv-columns-tried-not-adopted"


def test_links_to_the_measurement_record_resolve():
    """Every link from the README (and from the record to itself) into benchmarks/RESULTS.md
    names a heading there, and every benchmarks/results file the two name exists."""
    record = (REPO / "benchmarks" / "RESULTS.md").read_text()
    anchors = {github_anchor(h.replace("`", "")) for h in re.findall(r"^#+ (.+)$", record, re.M)}
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(benchmarks/RESULTS\.md#([^)]+)\)", readme)
    links += re.findall(r"\]\(#([^)]+)\)", record)
    assert len(links) >= 10
    assert [a for a in links if a not in anchors] == []
    named = set(re.findall(r"benchmarks/results/([\w.\-]+\.(?:json|png))", readme + record))
    assert named and [f for f in named if not (REPO / "benchmarks" / "results" / f).exists()] == []
