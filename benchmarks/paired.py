"""Two decodings graded on the same problems, compared problem by problem.

An accuracy difference of two methods on one split is a paired measurement: most problems are
solved by both or by neither, and only the discordant ones (one right, the other wrong) carry
the difference. `paired` reports those counts, the mean per-problem difference with its standard
error and a normal 95% interval, and the exact two-sided sign test on the discordant problems
(McNemar's exact test). Written here, in a few lines of the standard library, because neither
scipy nor scikit-learn is a dependency.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def correct_by_problem(eval_json: Path) -> dict[str, bool]:
    """Problem id -> graded right, from a `qstar eval` JSON's rows."""
    return {row["id"]: bool(row["correct"]) for row in json.loads(eval_json.read_text())["rows"]}


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided binomial p of `wins` against `losses` at even odds (1.0 when both are 0)."""
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: dict[str, bool], b: dict[str, bool], names: tuple[str, str]) -> dict:
    """a minus b over the same problems: `<a>_only` and `<b>_only` count the discordant problems;
    difference = (a_only - b_only) / problems, its standard error that of a mean of per-problem
    differences in {-1, 0, 1}, ci95 = difference +- Z95 * se, sign_test_p on the discordant ones."""
    if a.keys() != b.keys():
        raise ValueError(f"{names[0]} and {names[1]} were graded on different problems "
                         f"({len(a.keys() - b.keys())} and {len(b.keys() - a.keys())} not shared)")
    n = len(a)
    a_only = sum(a[k] and not b[k] for k in a)
    b_only = sum(b[k] and not a[k] for k in a)
    mean = (a_only - b_only) / max(n, 1)
    variance = ((a_only + b_only) / n - mean ** 2) * n / (n - 1) if n > 1 else 0.0
    se = math.sqrt(max(variance, 0.0) / n) if n > 1 else 0.0
    return {"problems": n, f"{names[0]}_only": a_only, f"{names[1]}_only": b_only,
            "difference": round(mean, 4), "standard_error": round(se, 4),
            "ci95": [round(mean - Z95 * se, 4), round(mean + Z95 * se, 4)],
            "sign_test_p": round(sign_test_p(a_only, b_only), 4)}


def rule_grades(rows: list[dict], key: str) -> dict[str, dict[str, bool]]:
    """Per rule read off the same samples or trees (a `qstar eval` JSON's rows, each with
    `correct_by_<key>`, e.g. key "select" or "best_path"): problem id -> graded right. Empty
    for rows graded before rows carried their rules."""
    if not rows or f"correct_by_{key}" not in rows[0]:
        return {}
    return {rule: {row["id"]: bool(row[f"correct_by_{key}"][rule]) for row in rows}
            for rule in rows[0][f"correct_by_{key}"]}


def against_rule(rows: list[dict], key: str, base: str) -> dict[str, dict]:
    """Every other rule of the rows (see rule_grades) compared with rule `base`, problem by
    problem; empty for rows graded before rows carried their rules."""
    grades = rule_grades(rows, key)
    return {rule: paired(grades[rule], grades[base], (rule, base))
            for rule in grades if rule != base}
