"""Seeded arithmetic problems with a worked chain of thought a tiny model can learn.

Every problem reads ``Q: <expression>=?`` and is solved inside ``<think> ... </think>``, then
``Answer: N``. The chain of thought works one digit per step from the least significant digit, and each
step only needs the line right above it::

    Q: 37+485=?
    <think>
    37+485 c0 r
    7+5+0=12
    3+48 c1 r2
    3+8+1=12
    0+4 c1 r22
    0+4+1=05
    0+0 c0 r522
    So 37+485=522.
    </think>
    Answer: 522

A step line holds what is left of both operands, the carry ``c`` and the result digits found so far ``r``;
the line under it works on the last digits. Multiplication by one digit runs the same way (``7*6+0=42``).

Difficulty levels (operands drawn uniformly):

=====  ==========================================================  ==============
level  problem                                                      ranges
=====  ==========================================================  ==============
1      ``a+b``                                                      a, b in 0..99
2      ``a+b``                                                      a, b in 10..999
3      ``a*d``                                                      a in 10..999, d in 2..9
4      ``a*d+c`` or ``(a+b)*d`` (two steps, one after the other)    a, b, c in 10..99, d in 2..9
=====  ==========================================================  ==============

Like real reasoning models, some traces re-check a result already found: after the last ``So ... .`` line
they go on with ``Wait, let me check:`` and work the last step again (an addition with its operands
swapped). How often grows with the level (:data:`RECHECK_RATE`); above one half the greedy continuation
re-checks every time, which is the overthinking that early exit and KV compression are meant to cut.

Held-out problems are a fixed hash-defined share of the problem space (:func:`is_held_out`): the
training split never contains one, the test split only those, each drawn from its own seed stream.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

LEVELS = (1, 2, 3, 4)
THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_PREFIX = "Answer: "
RECHECK_PHRASE = "Wait, let me check:"
RECHECK_RATE = {1: 0.2, 2: 0.35, 3: 0.65, 4: 0.8}
SPLITS = ("train", "test")
HELD_OUT_SHARE = 16  # one problem in HELD_OUT_SHARE (by hash) is held out
_SPLIT_SALT = {"train": 0x5EED, "test": 0x7E57}


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem and its worked solution.

    Attributes
    ----------
    expression : str
        The problem, e.g. ``"37+485"``.
    answer : int
        Its value.
    level : int
        Difficulty level (see the module docstring).
    thinking : str
        The chain of thought between ``<think>`` and ``</think>`` (starts and ends with a newline).
    rechecks : bool
        Whether the chain of thought re-checks its result.
    """

    expression: str
    answer: int
    level: int
    thinking: str
    rechecks: bool

    @property
    def prompt(self) -> str:
        """The prompt text, ending with the open think tag: ``Q: 37+485=?\\n<think>``."""
        return format_prompt(self.expression)

    @property
    def completion(self) -> str:
        """What the model writes after the prompt (without the EOS token)."""
        return f"{self.thinking}{THINK_END}\n{ANSWER_PREFIX}{self.answer}"

    @property
    def text(self) -> str:
        """Prompt and completion together."""
        return self.prompt + self.completion


def format_prompt(expression: str) -> str:
    """The prompt for ``expression``: ``Q: <expression>=?`` then a newline and ``<think>``."""
    return f"Q: {expression}=?\n{THINK_START}"


def _digit_steps(a: int, b: int, op: str) -> tuple[list[str], int]:
    """Step lines of ``a+b`` or ``a*b`` (``b`` one digit for ``*``) and the result."""
    lines = []
    carry, result = 0, ""
    while True:
        lines.append(f"{a}{op}{b} c{carry} r{result}")
        if a == 0 and (op == "*" or b == 0) and carry == 0:
            break
        da = a % 10
        db = b % 10 if op == "+" else b
        value = da + db + carry if op == "+" else da * db + carry
        lines.append(f"{da}{op}{db}+{carry}={value:02d}")
        carry, result = value // 10, f"{value % 10}{result}"
        a //= 10
        if op == "+":
            b //= 10
    value = int(result) if result else 0
    return lines, value


def _solve(a: int, b: int, op: str) -> tuple[list[str], int]:
    """Worked lines of one operation, ending with ``So a<op>b=value.``."""
    lines, value = _digit_steps(a, b, op)
    expected = a + b if op == "+" else a * b
    if value != expected:  # pragma: no cover - the algorithm is exact; a guard against edits
        raise AssertionError(f"trace of {a}{op}{b} gives {value}, expected {expected}")
    return [*lines, f"So {a}{op}{b}={value}."], value


def _recheck(a: int, b: int, op: str) -> list[str]:
    """``Wait, let me check:`` and the operation again (an addition with its operands swapped)."""
    if op == "+":
        a, b = b, a
    lines, _ = _solve(a, b, op)
    return [RECHECK_PHRASE, *lines]


def _draw(rng: random.Random, level: int) -> tuple[str, list[tuple[int, int, str]]]:
    """An expression of ``level`` and its operations in order (an operand -1 stands for the last value)."""
    if level == 1:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}", [(a, b, "+")]
    if level == 2:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return f"{a}+{b}", [(a, b, "+")]
    if level == 3:
        a, d = rng.randint(10, 999), rng.randint(2, 9)
        return f"{a}*{d}", [(a, d, "*")]
    if level == 4:
        a, d, c = rng.randint(10, 99), rng.randint(2, 9), rng.randint(10, 99)
        if rng.random() < 0.5:
            return f"{a}*{d}+{c}", [(a, d, "*"), (-1, c, "+")]
        return f"({a}+{c})*{d}", [(a, c, "+"), (-1, d, "*")]
    raise ValueError(f"difficulty level {level!r} is out of range; expected one of {LEVELS}")


def make_problem(
    expression: str, operations: Sequence[tuple[int, int, str]], level: int, rechecks: bool
) -> Problem:
    """Work out ``operations`` (an operand ``-1`` stands for the previous result) into a :class:`Problem`."""
    lines: list[str] = []
    value = 0
    last = (0, 0, "+")
    for a, b, op in operations:
        a = value if a == -1 else a
        step_lines, value = _solve(a, b, op)
        lines += step_lines
        last = (a, b, op)
    if rechecks:
        lines += _recheck(*last)
    thinking = "\n" + "\n".join(lines) + "\n"
    return Problem(expression=expression, answer=value, level=level, thinking=thinking, rechecks=rechecks)


def is_held_out(expression: str) -> bool:
    """Whether ``expression`` belongs to the held-out share of the problem space (a stable hash)."""
    digest = hashlib.sha256(expression.encode()).digest()
    return digest[0] % HELD_OUT_SHARE == 0


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(levels)
    if not levels:
        raise ValueError("levels is empty; expected some of (1, 2, 3, 4)")
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"difficulty level {level!r} is out of range; expected one of {LEVELS}")
    return levels


def generate_problems(
    n: int,
    levels: Sequence[int] = LEVELS,
    seed: int = 0,
    split: str = "test",
    recheck_rate: dict[int, float] | float | None = None,
) -> list[Problem]:
    """``n`` seeded problems, levels taken in turn (``levels[i % len(levels)]`` for the i-th).

    Parameters
    ----------
    n : int
        Number of problems (>= 0).
    levels : sequence of int
        Difficulty levels to draw from, each in 1..4.
    seed : int
        Seed of the draw; the same arguments always give the same problems.
    split : str
        ``"train"`` never yields a held-out problem, ``"test"`` yields only held-out problems; each split
        has its own seed stream, so the test problems are not the first training ones either.
    recheck_rate : dict or float, optional
        Probability that a trace re-checks its result, per level or for all; default :data:`RECHECK_RATE`.

    Returns
    -------
    list of Problem
        Distinct within the call as long as the level's problem space allows.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}; expected an int >= 0")
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    levels = _check_levels(levels)
    if recheck_rate is None:
        rates = dict(RECHECK_RATE)
    elif isinstance(recheck_rate, dict):
        rates = {level: recheck_rate.get(level, RECHECK_RATE[level]) for level in LEVELS}
    else:
        rates = dict.fromkeys(LEVELS, float(recheck_rate))
    rng = random.Random(f"{_SPLIT_SALT[split]}:{seed}")
    want_held_out = split == "test"
    problems: list[Problem] = []
    seen: set[str] = set()
    for i in range(n):
        level = levels[i % len(levels)]
        for attempt in range(10_000):
            expression, operations = _draw(rng, level)
            if is_held_out(expression) == want_held_out and (expression not in seen or attempt > 200):
                break
        seen.add(expression)
        rechecks = rng.random() < rates[level]
        problems.append(make_problem(expression, operations, level, rechecks))
    return problems


_ANSWER_RE = re.compile(re.escape(THINK_END) + r"\s*" + re.escape(ANSWER_PREFIX.strip()) + r"\s*(-?\d+)")


def extract_answer(text: str) -> int | None:
    """The integer after ``</think>`` and ``Answer:`` in a model's output; None when there is none.

    Only an answer written after the thinking span counts: a number inside ``<think>`` does not.
    """
    match = _ANSWER_RE.search(text)
    return int(match.group(1)) if match else None


def is_correct(problem: Problem, text: str) -> bool:
    """Whether ``text`` (a model's completion, or prompt + completion) answers ``problem`` correctly."""
    return extract_answer(text) == problem.answer


def thinking_text(text: str) -> str:
    """The part of a completion before its ``</think>`` (all of it when thinking never closes)."""
    end = text.find(THINK_END)
    return text if end < 0 else text[:end]
