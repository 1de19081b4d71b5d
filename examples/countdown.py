"""A complete custom task: the countdown numbers puzzle, with an exact checker.

    qstar run task=custom task.target=examples.countdown:Countdown
    qstar run task=custom task.target=examples.countdown:Countdown +task.params.numbers=4

Each problem gives a few numbers and a target; a correct answer is an arithmetic expression
that uses every given number exactly once (with + - * / and parentheses) and equals the target.
Many expressions can be right: the checker evaluates the answer, it does not compare it with
the gold expression. This file needs nothing from qstar: it implements the protocol that
pipeline/tasks/custom.py documents (problems, prompt, extract_answer, grade).
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction

SYSTEM = ("Solve the countdown puzzle. Use every given number exactly once, with + - * / and "
          "parentheses. Write short steps, one per line. End with a final line of the form:\n"
          "Answer: <expression>")
_ANSWER = re.compile(r"(?i)^\s*\**answer\s*\**\s*:\s*(.*)$")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _expression(rng: random.Random, numbers: list[int]) -> str:
    """A random expression over `numbers` (in the given order), combined left to right."""
    text = str(numbers[0])
    for n in numbers[1:]:
        op = rng.choice("+-*")
        text = f"({text}) {op} {n}" if op == "*" and ("+" in text or "-" in text) else \
            f"{text} {op} {n}"
    return text


def evaluate(answer: str) -> tuple[Fraction, list[int]] | None:
    """The exact value of an expression and the numbers it uses, or None if it is not a plain
    arithmetic expression (names, calls, powers, floats and division by zero are refused)."""
    try:
        tree = ast.parse(answer.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    used: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError("not allowed")

    try:
        return value(tree.body), used
    except (ValueError, ZeroDivisionError):
        return None


class Countdown:
    """`count` puzzles of `numbers` numbers from 1 to `max_number`, generated from `seed`."""

    name = "countdown"

    def __init__(self, count: int = 400, numbers: int = 3, max_number: int = 10, seed: int = 0):
        rng = random.Random(seed)
        self._problems = []
        while len(self._problems) < count:
            given = [rng.randint(1, max_number) for _ in range(numbers)]
            gold = _expression(rng, rng.sample(given, len(given)))
            target = evaluate(gold)[0]
            if target <= 0 or target.denominator != 1:
                continue  # positive whole targets only
            k = len(self._problems)
            shown = ", ".join(map(str, sorted(given)))
            self._problems.append({
                "id": f"countdown-{seed}-{k}", "numbers": sorted(given), "target": int(target),
                "question": f"Numbers: {shown}. Target: {int(target)}.", "answer": gold})

    def problems(self) -> list[dict]:
        return self._problems

    def prompt(self, problem: dict) -> list[dict]:
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": problem["question"]}]

    def extract_answer(self, completion: str) -> str | None:
        """The expression on the last `Answer:` line (`= target` after it is dropped)."""
        for line in reversed(completion.splitlines()):
            match = _ANSWER.match(line)
            if match:
                value = match.group(1).strip().strip("*$` .").split("=")[0].strip()
                return value or None
        return None

    def grade(self, problem: dict, answer: str) -> float:
        """1.0 when the expression uses exactly the given numbers and equals the target."""
        result = evaluate(answer)
        if result is None:
            return 0.0
        value, used = result
        return 1.0 if sorted(used) == problem["numbers"] and value == problem["target"] else 0.0
