"""A rule-based step check: does a line claim a false arithmetic equality ("8 - 8 = 8")?

It reads the text alone, never a gold answer, so it may judge any partial solution, at training
and at evaluation alike (`search.check_equations`). Only equalities between plain numbers
written with + - * / (x, ×, ÷ and the Unicode minus too) and parentheses are judged; a line
with a variable, a unit or anything else it cannot read is never called false. Written here
because math-verify compares an answer with a gold one, not the equalities inside a line.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
# The longest run of numbers, operators and parentheses before "=", then one number after it.
EQUALITY = re.compile(rf"((?:[(\s]*-?\s*{NUMBER}[)\s]*[-+*/][\s(]*)+-?\s*{NUMBER}[)\s]*)=\s*(-?\s*{NUMBER})")
SPELLING = str.maketrans({"−": "-", "×": "*", "÷": "/"})
TIMES = re.compile(r"(?<=\d)\s*x\s*(?=\d)")  # "3 x 4", not the variable in "6x - 2"
OPERATORS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
             ast.Div: Fraction.__truediv__}


def false_equation(text: str) -> bool:
    """True when some line of `text` states an arithmetic equality that does not hold. The
    right side may be rounded: it is compared to its own number of decimals."""
    for line in TIMES.sub(" * ", text.translate(SPELLING)).splitlines():
        for match in EQUALITY.finditer(line):
            if _part_of_more(line, match):
                continue
            left, right = match.groups()
            value, claimed = _value(left), _value(right)
            if value is None or claimed is None:
                continue
            decimals = len(right.split(".")[1]) if "." in right else 0
            tolerance = Fraction(1, 2 * 10 ** decimals) if decimals else 0
            if abs(value - claimed) > tolerance:
                return True
    return False


def _part_of_more(line: str, match: re.Match) -> bool:
    """The equality is a piece of an expression the pattern cannot read ("x^2 + 3 = 12",
    "1/2 + 1/4 = 3/4", "= 15%"): a word or number is glued to either end, or an operator or
    "=" comes before it or an operator after it."""
    start = match.start() + len(match.group(0)) - len(match.group(0).lstrip())
    before, after = line[:start], line[match.end():]
    glued = (before[-1:].isalnum() or before[-1:] in {".", "_"}
             or after[:1].isalnum() or after[:1] in {"%", "_"})
    return glued or before.rstrip()[-1:] in set("^*/+-=%$") or after.lstrip()[:1] in set("^*/+-(")


def _value(expression: str) -> Fraction | None:
    """The exact value of a numeric expression, or None where it is not one (or divides by 0)."""
    try:
        tree = ast.parse(expression.replace(",", "").strip(), mode="eval").body
        return _evaluate(tree)
    except (SyntaxError, ValueError, ZeroDivisionError, KeyError, TypeError):
        return None


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp):
        return OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("not a numeric expression")
