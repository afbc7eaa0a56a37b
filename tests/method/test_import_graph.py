"""The layers of ``mode/`` import one way: the trainer (``mode.train``) above the workloads
(``mode.workloads``) above the method (``mode``'s top-level modules and ``mode.hf``) above the
kernels (``mode_kernels``), and no module imports itself back through others.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING`` (read with ``ast``,
nothing is imported).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOORS = {"mode_kernels": 0, "mode": 1, "mode.workloads": 2, "mode.train": 3}  # the longest prefix names a floor


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in (ROOT / "mode").rglob("*.py")}


def floor(module: str) -> int:
    prefix = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[prefix]


def imports(module: str) -> set[str]:
    """The modules of mode/ and mode_kernels/ that ``module`` imports (a name imported from a package is
    the submodule of that name when there is one)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {name for name in found if name.split(".")[0] in FLOORS}


GRAPH = {module: imports(module) for module in MODULES}


def test_no_floor_imports_a_higher_one():
    upward = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
                    if floor(target) > floor(module))
    assert upward == []


def test_the_workloads_import_nothing_of_the_trainer():
    assert sorted(f"{module} -> {target}" for module, targets in GRAPH.items() if module.startswith("mode.workloads")
                  for target in targets if target.startswith("mode.train")) == []


def test_no_import_circles():
    """Depth-first search for a back edge: a module reached again while its own imports are being walked."""
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_the_graph_sees_imports_inside_functions():
    """The walk reads nested imports: the trainer's CLI imports its loop inside ``main``."""
    assert "mode.train.loop" in GRAPH["mode.train.cli"]
