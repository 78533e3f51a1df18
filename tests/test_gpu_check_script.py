"""scripts/gpu_check.py's plan: the time boxes fit the budget (GPU and dry run), a smaller budget
leaves steps out in the declared order and says why, and the scripts import one another in one
direction only (no import circle)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _runner():
    spec = importlib.util.spec_from_file_location("gpu_check_runner", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_boxes_fit_the_budgets_and_every_step_has_a_place_in_the_leave_out_order():
    runner = _runner()
    gpu = [(n, g) for n, g, _ in runner.STEPS]
    dry = [(n, d) for n, _, d in runner.STEPS]
    assert sum(b for _, b in gpu) <= 530 - runner.RESERVE_S
    assert sum(b for _, b in dry) <= 290 - runner.RESERVE_S
    assert sorted(runner.LEAVE_OUT) == sorted(n for n, _ in gpu)
    assert runner.plan(gpu, 530) == (gpu, {}) and runner.plan(dry, 290) == (dry, {})
    assert "ragged" in dict(gpu)


def test_a_smaller_budget_leaves_the_least_needed_steps_out_and_says_why():
    runner = _runner()
    gpu = [(n, g) for n, g, _ in runner.STEPS]
    kept, left_out = runner.plan(gpu, 400)
    assert sum(b for _, b in kept) <= 400 - runner.RESERVE_S
    assert list(left_out) == list(runner.LEAVE_OUT[:len(left_out)]) and "tune_table" in left_out
    assert all(why.startswith("left out: the time boxes add up to") for why in left_out.values())
    assert "gpu_tests" in dict(kept) and "ragged" in dict(kept)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {name for name in found if (SCRIPTS / f"{name}.py").exists()}


def test_the_gpu_check_scripts_have_no_import_circle():
    graph = {p.stem: _imports(p) for p in SCRIPTS.glob("gpu_check*.py")}
    assert graph["gpu_check_common"] == set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        for other in graph.get(name, ()):
            visit(other, (*path, name))

    for name in graph:
        visit(name, ())
