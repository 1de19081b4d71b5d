"""A rule-based step check: does a line claim a false arithmetic equality ("8 - 8 = 8")?

It reads the text alone, never a gold answer, so it may judge any partial solution, at training
and at evaluation alike (`search.check_equations`). Each "=" compares the runs of numbers,
operators (+ - * /, and x, ×, ÷, the Unicode minus) and parentheses on either side of it; a
side with a variable, a unit, a percent, a power or anything else it cannot read is never
judged, so such a line is never called false. Written here because math-verify compares an
answer with a gold one, not the equalities inside a line.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

from pipeline.tasks.answers import NUMBER_IN_TEXT

# A side of an equality: a maximal run of numbers, operators, parentheses and spaces next to "=".
LEFT = re.compile(r"[-+*/().,\d\s]+$")
RIGHT = re.compile(r"^[-+*/().,\d\s]+")
NUMBER = re.compile(r"\s*-?\s*\d+(?:,\d{3})*(\.\d+)?[\s.,]*$")  # a right side that is one number
SPELLING = str.maketrans({"−": "-", "×": "*", "÷": "/"})
TIMES = re.compile(r"(?<=\d)\s*x\s*(?=\d)")  # "3 x 4", not the variable in "6x - 2"
LIST_COMMA = re.compile(r",(?!\d{3}(?!\d))")  # a comma that is no thousands separator
UNREAD = set("^$%")  # a side next to these is part of something the check does not read
# a side after one of these words is an operand of it ("50% of 10 = 5")
OPERAND_OF = {"of", "by", "times", "per", "over", "plus", "minus", "divided", "multiplied"}
OPERATORS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
             ast.Div: Fraction.__truediv__}


def false_equation(text: str) -> bool:
    """True when some line of `text` states an arithmetic equality that does not hold: each
    "=" compares the numeric expressions around it (chains "a = b = c" pair by pair). A right
    side that is one number may be rounded: it is compared at its own number of decimals."""
    for line in TIMES.sub(" * ", text.translate(SPELLING)).splitlines():
        sides = LIST_COMMA.sub(";", line).split("=")  # "= 4, 4 - 8 = 0": a comma ends a side
        for before, after in zip(sides, sides[1:]):
            left, right = _side(before, LEFT, at_end=True), _side(after, RIGHT, at_end=False)
            if left is None or right is None or not (_operated(left) or _operated(right)):
                continue  # "10 = 5" alone states no arithmetic
            value, claimed = _value(left), _value(right)
            if value is None or claimed is None:
                continue
            rounded = NUMBER.match(right)
            decimals = len(rounded.group(1)) - 1 if rounded and rounded.group(1) else 0
            tolerance = Fraction(1, 2 * 10 ** decimals) if decimals else 0
            if abs(value - claimed) > tolerance:
                return True
    return False


def _side(text: str, run: re.Pattern, at_end: bool) -> str | None:
    """The numeric run of `text` next to "=", or None where there is none or it is part of more
    than the check reads: glued to a word or sign ("x^2 + 3", "6(1 + 1)", "= 15%"), or beside
    ^ $ % across a space."""
    found = run.search(text)
    if found is None or not any(c.isdigit() for c in found.group(0)):
        return None
    side = found.group(0)
    outside = text[:found.start()] if at_end else text[found.end():]
    inner = side.lstrip() if at_end else side.rstrip()
    glued = outside[-1:] if at_end else outside[:1]  # the character touching the run
    if inner == side and (glued.isalnum() or glued in UNREAD or glued == "_"):
        return None
    neighbour = outside.rstrip()[-1:] if at_end else outside.lstrip()[:1]
    words = outside.split() if at_end else []
    if neighbour in UNREAD or words and words[-1].lower() in OPERAND_OF:
        return None
    if at_end and inner[:1] in set("+-*/") and words and len(words[-1]) == 1:
        return None  # "x + 2 = 5": the operator's left operand is a variable
    return side


def _operated(side: str) -> bool:
    """The side holds an operation, not only a (signed) number."""
    return any(c in "+-*/" for c in side.strip().lstrip("+-").strip())


def _value(expression: str) -> Fraction | None:
    """The exact value of a numeric expression, or None where it is not one (or divides by 0)."""
    try:
        tree = ast.parse(expression.replace(",", "").strip(), mode="eval").body
        return _evaluate(tree)
    except (SyntaxError, ValueError, ZeroDivisionError, KeyError, TypeError, RecursionError,
            MemoryError):  # whatever a model writes, the decoding loop must not stop here
        return None


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("not a numeric expression")


# An answer line ("Answer: 41", "#### 41") whose value is one plain number.
ANSWER_LINE = re.compile(r"(?i)(?:\banswer\s*\**\s*:|####)\s*\**\s*\$?\s*(-?\d+(?:,\d{3})*(?:\.\d+)?)"
                         r"[\s.*$]*$")


def unsupported_answer(text: str) -> bool:
    """True when a whole solution's last answer line states a number that is not the last
    number of the last line above it with a word or number in it (the text before the answer on
    its own line counts): an answer with no working ("Answer: 23" alone) or one its working did
    not end on. An answer that is not one plain number is never judged. Like `false_equation`
    it reads the text alone, never a gold answer; unlike it, it judges a whole solution."""
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):
        found = ANSWER_LINE.search(lines[k])
        if found is None:
            continue
        above = [line for line in [*lines[:k], lines[k][:found.start()]]
                 if any(c.isalnum() for c in line)]  # not blank, not only "**" markup
        numbers = NUMBER_IN_TEXT.findall(above[-1]) if above else []
        return not numbers or _number(numbers[-1]) != _number(found.group(1))
    return False


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))
