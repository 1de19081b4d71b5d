"""Every best-of-N selection against majority, per set of samples and pooled over the sets.

Reads graded `qstar eval decode=best_of_n` JSONs, no model: each row records, per
`decode.select` rule it could make (`correct_by_select`: majority, checked majority, ORM, ORM
vote, implicit, implicit vote), whether that rule's pick was right on the same samples. Per set
(one policy's JSONs, disjoint problems), each rule's accuracy and its paired difference from
majority (benchmarks/paired.py: discordant counts, standard error, sign test); then the same
over every set's problems together (a problem of one set is a pair of its own), and each set's
within-problem AUCs (benchmarks/sample_scores.py).

    python benchmarks/select_rules.py --set s0p1 A.json [B.json ...] --set s0p2 ... \\
        --output benchmarks/results/OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before benchmarks/, whose critics.py is not the critics package

from paired import against_rule, rule_grades  # noqa: E402
from sample_scores import within_problem_aucs  # noqa: E402

from pipeline.run.atomic import write_json  # noqa: E402

BASE = "majority"


def set_rows(name: str, paths: list[Path]) -> list[dict]:
    """The rows of one set's JSONs, each problem id prefixed with the set's name (so that sets
    that share problems, two policies on one split, stay apart when pooled)."""
    rows = []
    for path in paths:
        try:
            found = json.loads(path.read_text())["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a graded `qstar eval` JSON ({e})") from None
        if found and "correct_by_select" not in found[0]:
            raise ValueError(f"{path} records no per-rule grades: it is not a best-of-N grade, "
                             "or was graded before rows carried them")
        rows.extend({**row, "id": f"{name}/{row['id']}"} for row in found)
    return rows


def accuracies(rows: list[dict]) -> dict[str, float]:
    return {rule: round(sum(g.values()) / len(g), 4) for rule, g in rule_grades(rows, "select").items()}


def compare(sets: dict[str, list[Path]]) -> dict:
    """Per set and pooled: each rule's accuracy and its paired difference from majority."""
    out, pooled = {"sets": {}}, []
    for name, paths in sets.items():
        rows = set_rows(name, paths)
        pooled.extend(rows)
        out["sets"][name] = {"json": [str(p) for p in paths], "problems": len(rows),
                             "accuracy": accuracies(rows),
                             "against_majority": against_rule(rows, "select", BASE),
                             "within_problem_auc": within_problem_aucs(paths)}
    out["pooled"] = {"problems": len(pooled), "accuracy": accuracies(pooled),
                     "against_majority": against_rule(pooled, "select", BASE)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", nargs="+", action="append", required=True, metavar=("NAME", "JSON"),
                        help="a name, then that set's graded best-of-N JSONs")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        sets = {}
        for name, *paths in args.set:
            if not paths or name in sets or any(not Path(p).is_file() for p in paths):
                raise ValueError(f"--set {name} {' '.join(paths)}: expected a new name, then "
                                 "graded JSON files")
            sets[name] = [Path(p) for p in paths]
        result = compare(sets)
    except ValueError as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.output, result)
    print(json.dumps(result["pooled"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
