"""Does the answer check (`search.check_answers`) make checked majority a better selection?

Re-scores graded `qstar eval decode=best_of_n` JSONs, the same samples, with no model: per set of
JSONs (one policy, disjoint held-out problems), checked majority with the step check alone against
checked majority with the step check and an answer check, each graded on the same problems
(paired, sign test), and the within-problem AUC of checked majority's score under each check:

- `answers`: pipeline.tasks.equations.unsupported_answer, the check `search.check_answers` turns
  on: the answer must be the last number of the last line above it with a word or number;
- `anywhere`: a looser variant, measured beside it (and on dev not chosen): the answer's number
  appears nowhere in the lines above it.

Majority and step-check-only checked majority are recomputed and compared with the grades each
JSON recorded (`correct_by_select`), so a re-scoring that drifted from `qstar eval` stops here.

    python benchmarks/answer_check.py --set p1 A.json [B.json ...] --set p2 ... --output OUT.json
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before benchmarks/, whose critics.py is not the critics package

from paired import paired  # noqa: E402
from sample_scores import graded_rows, within_problem_aucs  # noqa: E402

from pipeline.decoding.best_of_n import checked_majority  # noqa: E402
from pipeline.decoding.voting import majority_vote  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.tasks.answers import NUMBER_IN_TEXT  # noqa: E402
from pipeline.tasks.equations import ANSWER_LINE, false_equation, unsupported_answer  # noqa: E402


def anywhere_unsupported(text: str) -> bool:
    """The looser variant: the answer line's number appears nowhere in the lines above it (nor
    before it on its own line). A non-numeric answer is never judged."""
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):
        found = ANSWER_LINE.search(lines[k])
        if found is None:
            continue
        working = "\n".join(lines[:k]) + "\n" + lines[k][:found.start()]
        answer = Fraction(found.group(1).replace(",", ""))
        return all(Fraction(n.replace(",", "")) != answer for n in NUMBER_IN_TEXT.findall(working))
    return False


CHECKS = {
    "step": false_equation,
    "answers": lambda text: false_equation(text) or unsupported_answer(text),
    "anywhere": lambda text: false_equation(text) or anywhere_unsupported(text),
}


def _row(task, problem, candidates: list[str]) -> tuple[dict[str, bool], dict[str, int],
                                                         dict[str, int]]:
    """One problem's grade under majority and each check; samples each check flags; right
    samples it flags."""
    grades = {"majority": task.is_correct(problem, majority_vote(candidates, task.extract_answer))}
    flagged, right_flagged = {}, {}
    for name, check in CHECKS.items():
        grades[name] = task.is_correct(problem, checked_majority(candidates, task.extract_answer, check))
        flags = [check(c) for c in candidates]
        flagged[name] = sum(flags)
        right_flagged[name] = sum(f and task.is_correct(problem, c) for f, c in zip(flags, candidates))
    return grades, flagged, right_flagged


def score_set(paths: list[Path]) -> dict:
    """Checked majority under each of CHECKS on one policy's graded samples, paired."""
    grades: dict[str, dict[str, bool]] = {"majority": {}, **{name: {} for name in CHECKS}}
    counts = {f"{kind}_{name}": 0 for kind in ("flagged", "right_samples_flagged") for name in CHECKS}
    samples = 0
    for path in paths:
        task, problems, rows = graded_rows(path)
        for row in rows:
            found, flagged, right_flagged = _row(task, problems[row["id"]], row["candidates"])
            for name, right in found.items():
                grades[name][row["id"]] = right
            for name in CHECKS:
                counts[f"flagged_{name}"] += flagged[name]
                counts[f"right_samples_flagged_{name}"] += right_flagged[name]
            samples += len(row["candidates"])
            recorded = row.get("correct_by_select", {})
            for name, key in (("majority", "majority"), ("step", "checked_majority")):
                if key in recorded and recorded[key] != found[name]:
                    raise ValueError(f"{path}: row {row['id']}: {key} re-scored {found[name]}, "
                                     f"recorded {recorded[key]}")
    out = {"files": [str(p) for p in paths], "problems": len(grades["majority"]),
           "samples": samples, **counts}
    for name, by_problem in grades.items():
        out[f"correct_{name}"] = sum(by_problem.values())
    for name, check in CHECKS.items():
        out[f"within_problem_auc_checked_vote_{name}"] = within_problem_aucs(paths, check)["checked_vote"]
    for name in ("answers", "anywhere"):
        out[f"{name}_minus_step"] = paired(grades[name], grades["step"], (name, "step"))
    out["step_minus_majority"] = paired(grades["step"], grades["majority"], ("step", "majority"))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="+", action="append", required=True, metavar=("NAME", "JSON"),
                        help="a name, then one policy's graded best-of-N JSONs (disjoint problems)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {}
    for name, *files in args.set:
        paths = [Path(f) for f in files]
        missing = [p for p in paths if not p.is_file()]
        if not paths or missing:
            parser.exit(2, f"--set {name}: {'no JSON given' if not paths else f'{missing[0]}: no such file'}\n")
        try:
            result[name] = score_set(paths)
        except ValueError as e:
            parser.exit(2, f"--set {name}: {e}\n")
        s = result[name]
        print(f"{name}: {s['problems']} problems: majority {s['correct_majority']}, checked "
              f"{s['correct_step']}, + answers {s['correct_answers']}, + answers anywhere "
              f"{s['correct_anywhere']}; AUC {s['within_problem_auc_checked_vote_step']['auc']} / "
              f"{s['within_problem_auc_checked_vote_answers']['auc']} / "
              f"{s['within_problem_auc_checked_vote_anywhere']['auc']}")
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
