"""Answer extraction from a completion, and math equivalence (math-verify, numeric fallback)."""

from __future__ import annotations

import re
import threading

from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

_ANSWER_LINE = re.compile(r"(?i)\banswer\s*\**\s*:\s*\**(.*)")


_HASHES = re.compile(r"####\s*(.*)")


NUMBER_IN_TEXT = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")  # also the answer check's


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None  # unbalanced: no answer rather than half of one


def _clean(value: str) -> str:
    value = value.strip().strip("*").strip()
    if value.startswith("$") and value.endswith("$") and len(value) > 1:
        value = value.strip("$").strip()  # $...$ LaTeX maths
    value = value.lstrip("$").rstrip(". $").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", value)  # 1,000 -> 1000


def _after_answer(text: str) -> str | None:
    """Value of the last `Answer:` line; an empty one takes the lines below it (grids, lists)."""
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):
        matches = list(_ANSWER_LINE.finditer(lines[k]))
        if not matches:
            continue
        value = matches[-1].group(1).strip() or "\n".join(lines[k + 1 :]).strip()
        return (_last_boxed(value) or value) if value else None
    return None


def extract_answer(text: str) -> str | None:
    """Last `Answer: X` line, else `#### X`, else the last \\boxed{X}, else the last number."""
    value = _after_answer(text)
    if value is None:
        hashes = _HASHES.findall(text)
        value = hashes[-1] if hashes and hashes[-1].strip() else None
    if value is None:
        value = _last_boxed(text)
    if value is None:
        numbers = NUMBER_IN_TEXT.findall(text)
        value = numbers[-1] if numbers else None
    if value is None:
        return None
    return _clean(value) or None


_TOWER = re.compile(r"(\^|\*\*)[\s{(]*\w+[\s})]*(\^|\*\*)")


_POWER = re.compile(r"\^|\*\*|!|\\binom|\\choose")


_BIG_INT = re.compile(r"\d{5,}")


def _safe_for_sympy(answer: str) -> bool:
    if len(answer) > 200 or _TOWER.search(answer):
        return False
    return not (_POWER.search(answer) and _BIG_INT.search(answer))


def _as_number(text: str) -> float | None:
    """The text as a plain number, or None (`3/4` is not the number 4)."""
    text = text.strip()
    return float(text.replace(",", "")) if NUMBER_IN_TEXT.fullmatch(text) else None


def math_parses(gold: str) -> bool:
    """Whether math-verify reads a value from a gold answer (`twelve` and `abc` give nothing)."""
    if not _safe_for_sympy(gold):
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(mv_parse(gold, parsing_timeout=timeout))
    except Exception:  # math-verify failing on a gold answer means it cannot be graded
        return False


def math_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence, with a plain numeric comparison as fallback."""
    if _safe_for_sympy(answer):
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        try:
            parsed_gold = mv_parse(gold, parsing_timeout=timeout)
            parsed = mv_parse(answer, parsing_timeout=timeout)
            if parsed_gold and parsed and mv_verify(parsed_gold, parsed, timeout_seconds=timeout):
                return True
        except Exception:  # a model's malformed answer must grade as wrong, not crash search
            pass
    g, a = _as_number(gold), _as_number(answer)
    return g is not None and a is not None and abs(g - a) <= 1e-6 * max(1.0, abs(g))
