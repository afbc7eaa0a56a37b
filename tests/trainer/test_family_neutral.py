"""The local-model workload names no model family: what differs between Chameleon, Emu3 and Janus
is behind ``mode.families.ModelFamily`` (a fourth family is a new module there), so no module of
``mode/workloads/hf_model`` compares anything with a family's name (read with ``ast``)."""
import ast
from pathlib import Path

from mode.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def family_comparisons(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for operand in operands:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                names = [e.value for e in elements if isinstance(e, ast.Constant) and e.value in FAMILIES]
                found += [f"{path.name}:{node.lineno}: compares with {name!r}" for name in names]
    return found


def test_workload_modules_compare_with_no_family_name():
    modules = sorted((ROOT / "mode" / "workloads" / "hf_model").glob("*.py"))
    assert modules
    assert [hit for path in modules for hit in family_comparisons(path)] == []


def test_the_check_sees_a_comparison(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('if family == "emu3" or kind in ("x", "janus"):\n    pass\n')
    assert len(family_comparisons(path)) == 2
