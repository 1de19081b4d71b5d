"""What a best-of-N selection ranks by, per sample, and how well it ranks one problem's samples.

Every score here is read off a graded `qstar eval decode=best_of_n` JSON (its rows' candidates
and implicit rewards, its recorded task config); nothing runs a model:

- `implicit`: the candidate's summed DPO implicit reward (`decode.select=implicit` takes the
  argmax); absent when the policy has no DPO reference.
- `vote_share`: the share of the N samples giving the candidate's answer (majority's score).
- `step_check`: 1 when the step check (`search.check_equations`) flags no line, else 0 (or
  when the `check` passed in, say both checks of `search.check_answers`, flags nothing).
- `checked_vote`: checked majority's score: the step check, plus the answer's share of the
  samples it passes (every sample's share when it flags them all), so its argmax is the answer
  `decode.select=checked_majority` picks.

`within_problem_aucs` averages, per score, the AUC of right against wrong samples of one problem
over the problems with both (critics.metrics.within_problem_auc): what a selection needs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from critics.metrics import within_problem_auc
from pipeline.config import TaskConfig
from pipeline.tasks import make_task
from pipeline.tasks.base import Problem, Task
from pipeline.tasks.equations import false_equation

SCORES = ("implicit", "vote_share", "step_check", "checked_vote")


def candidate_scores(candidates: list[str], extract: Callable[[str], str | None],
                     implicit: list[float] | None = None,
                     check: Callable[[str], bool] = false_equation) -> dict[str, list[float] | None]:
    """Each of SCORES for every candidate of one problem (None: a score the row lacks). `check`
    flags a whole sample: the step check, or decoding.best_of_n.sample_check's both checks."""
    answers = [extract(c) for c in candidates]
    passed = [not check(c) for c in candidates]
    votes = Counter(a for a in answers if a is not None)
    checked = Counter(a for a, ok in zip(answers, passed) if ok and a is not None)
    pool = checked if any(passed) else votes  # checked_majority: all of them when all flagged

    def share(counts: Counter, answer: str | None) -> float:
        return counts[answer] / max(sum(counts.values()), 1) if answer is not None else 0.0

    return {"implicit": [float(x) for x in implicit] if implicit else None,
            "vote_share": [votes[a] / len(candidates) if a is not None else 0.0 for a in answers],
            "step_check": [float(ok) for ok in passed],
            "checked_vote": [float(ok) + share(pool, a) for a, ok in zip(answers, passed)]}


def graded_rows(path: Path) -> tuple[Task, dict[str, Problem], list[dict]]:
    """A graded JSON's task (as its config recorded it), its split's problems by id, its rows;
    ValueError naming the file when it records no readable task config."""
    try:
        saved = json.loads(path.read_text())
        task = make_task(OmegaConf.to_object(OmegaConf.merge(
            OmegaConf.structured(TaskConfig), saved["config"]["task"])))
        problems = {p.id: p for p in task.split(saved["config"]["eval"]["split"])}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a JSON file ({e}); grade it again") from None
    except (KeyError, TypeError, OmegaConfBaseException) as e:
        raise ValueError(f"{path} records no readable task config "
                         f"({e.__class__.__name__}: {e}); grade it again") from None
    return task, problems, saved["rows"]


def within_problem_aucs(bon_jsons: list[Path], check: Callable[[str], bool] = false_equation) -> dict:
    """Per score, the within-problem AUC over every problem of these graded best-of-N JSONs
    (disjoint held-out sets of one policy, or several policies on the same problems: a problem's
    samples are grouped within their own JSON), each graded with the task its JSON records."""
    found: dict[str, list] = {k: [] for k in (*SCORES, "right", "problem")}
    for k, path in enumerate(bon_jsons):
        task, problems, rows = graded_rows(path)
        for row in rows:
            scores = candidate_scores(row["candidates"], task.extract_answer,
                                      row.get("implicit_rewards"), check)
            for name in SCORES:
                found[name].extend(scores[name] or [None] * len(row["candidates"]))
            found["right"].extend(float(task.is_correct(problems[row["id"]], c))
                                  for c in row["candidates"])
            found["problem"].extend([f"{k}\t{row['id']}"] * len(row["candidates"]))
    out = {"problems": len(set(found["problem"]))}
    for name in SCORES:
        if any(s is None for s in found[name]):
            out[name] = None  # some set was graded without it (no DPO reference)
            continue
        auc, both = within_problem_auc(found[name], found["right"], found["problem"])
        out[name] = {"auc": None if auc is None else round(auc, 4), "problems_with_both": both}
    return out
