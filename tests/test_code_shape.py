"""The engine stays readable: the decode loop fits on a screen or two and no function in
``effdecode/generation`` grows past 80 lines (the one-loop issue's limits)."""

from __future__ import annotations

import ast
from pathlib import Path

GENERATION = Path(__file__).resolve().parent.parent / "effdecode" / "generation"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_in_generation_is_over_80_lines():
    too_long = {
        f"{path.name}:{name}": lines
        for path in sorted(GENERATION.glob("*.py"))
        for name, lines in _functions(path)
        if lines > 80
    }
    assert not too_long, too_long


def test_the_decode_loop_reads_on_one_or_two_screens():
    loop = dict(_functions(GENERATION / "loop.py"))
    assert "run_generation" in loop
    assert loop["run_generation"] <= 120
