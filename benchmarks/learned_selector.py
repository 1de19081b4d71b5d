"""A best-of-N selector fitted on labelled samples of training problems, read on held-out ones.

Issue 15 asks the critic that selects to rank one problem's samples right above wrong at a
within-problem AUC of 0.8. The hand-set checked majority score (the step check plus the answer's
share of the samples it passes) ranks at 0.72-0.77; each signal alone is lower. This asks
whether weights *fitted* to those signals do better: per sample, from a graded
`qstar eval decode=best_of_n` JSON, nothing that reads gold (FEATURES):

- vote_share: the share of the N samples giving its answer (majority's score);
- step_check / answer_check: 1 when `false_equation` / `unsupported_answer` flags nothing;
- checked_share: its answer's share of the samples both checks pass (of all, when none passes);
- lines: how many non-blank lines it writes;
- orm: the trained ORM's score, when the JSON was graded with `eval.critics` (else dropped);
- implicit: the summed DPO implicit reward, standardised within its problem (else dropped).

An L2-penalised logistic regression (torch, LBFGS, standardised features) is fitted on one
JSON's samples, labelled by the task's grader: graded on training problems, a split the
selector may learn from (`--exclude-train N` drops the first N training problems, those the
policy was trained on). It scores the held-out JSON's samples two ways (READINGS): `sample`,
the fitted probability; `vote`, the sum of the fitted probabilities over the samples that share
its answer (what `decode.select=orm_vote` does with an ORM). Each is read by within-problem AUC
(critics.metrics.within_problem_auc) and by the accuracy of its argmax, beside majority's and
checked majority's on the same samples. Which reading to trust is chosen on the fit samples
alone (`cross_validated`: 5 folds over problems), never on the held-out ones.

    python benchmarks/learned_selector.py --fit 1=FIT.json --held-out 1=DEV.json \\
        [--exclude-train 64] --output benchmarks/results/learned_selector_dev.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before benchmarks/, whose critics.py is not the critics package

from sample_scores import graded_rows  # noqa: E402

from critics.metrics import within_problem_auc  # noqa: E402
from pipeline.config import SearchConfig  # noqa: E402
from pipeline.decoding.best_of_n import checked_majority, sample_check  # noqa: E402
from pipeline.decoding.voting import majority_vote  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.tasks.equations import false_equation, unsupported_answer  # noqa: E402

FEATURES = ("vote_share", "step_check", "answer_check", "checked_share", "lines", "orm", "implicit")
# What one text shows alone, as an ORM would read it (an ORM's vote, decode.select=orm_vote,
# adds the agreement back): the fit on these is the `per_text` variant.
PER_TEXT = ("step_check", "answer_check", "lines", "orm", "implicit")
READINGS = ("sample", "vote")
FOLDS = 5
L2 = 1e-2  # the penalty on the standardised weights (a mild one: 7 weights, ~1,000 samples)


# What checked majority skips with both checks on: a false equality or an unsupported answer.
both_checks = sample_check(SearchConfig(check_equations=True, check_answers=True))


def _standardised(values: list[float]) -> list[float]:
    mean = statistics.fmean(values)
    spread = statistics.pstdev(values) or 1.0
    return [(v - mean) / spread for v in values]


def sample_features(candidates: list[str], extract, orm: list[float] | None,
                    implicit: list[float] | None) -> list[dict[str, float]]:
    """FEATURES for every candidate of one problem (orm / implicit absent when the row lacks
    them). The checked share is counted here, not taken as sample_scores' checked score less its
    check: that difference is off by a rounding error, which splits ties an AUC must keep."""
    answers = [extract(c) for c in candidates]
    passed = [not both_checks(c) for c in candidates]
    votes = Counter(a for a in answers if a is not None)
    checked = Counter(a for a, ok in zip(answers, passed) if ok and a is not None)
    pool = checked if any(passed) else votes  # as checked majority: all of them when all flagged
    implicit_z = _standardised(implicit) if implicit else None
    rows = []
    for j, (text, answer) in enumerate(zip(candidates, answers)):
        row = {"vote_share": votes[answer] / len(candidates) if answer is not None else 0.0,
               "step_check": float(not false_equation(text)),
               "answer_check": float(not unsupported_answer(text)),
               "checked_share": (pool[answer] / max(sum(pool.values()), 1)
                                 if answer is not None else 0.0),
               "lines": float(sum(1 for line in text.splitlines() if line.strip()))}
        if orm is not None:
            row["orm"] = float(orm[j])
        if implicit_z is not None:
            row["implicit"] = implicit_z[j]
        rows.append(row)
    return rows


@dataclass
class Samples:
    """One graded JSON's samples, flattened: features, labels, problem ids, and per problem the
    candidates, their answers and whether each is right."""

    features: list[dict[str, float]]
    right: list[float]
    problem: list[str]
    rows: list[dict]  # per problem: {"id", "candidates", "answers", "right"}


def load_samples(path: Path, exclude_train: int = 0, fit: bool = False) -> Samples:
    """Every candidate of a graded best-of-N JSON with its features and its grade; `exclude_train`
    drops the first N problems of the task's training split (those a loop trained on). A `fit`
    set must be graded on training problems, a held-out one on others (ValueError naming it)."""
    task, problems, rows = graded_rows(path)
    split = json.loads(path.read_text())["config"]["eval"]["split"]
    if fit != (split == "train"):
        raise ValueError(f"{path} is graded on {split} problems: the fit reads training problems "
                         "(eval.split=train), the held-out set dev or test")
    if any("candidates" not in row for row in rows):
        raise ValueError(f"{path} records no candidates: grade it with decode=best_of_n")
    skip = {p.id for p in task.split("train")[:exclude_train]}
    out = Samples([], [], [], [])
    for row in rows:
        if row["id"] in skip:
            continue
        problem, candidates = problems[row["id"]], row["candidates"]
        right = [float(task.is_correct(problem, c)) for c in candidates]
        out.features.extend(sample_features(candidates, task.extract_answer, row.get("orm_scores"),
                                            row.get("implicit_rewards")))
        out.right.extend(right)
        out.problem.extend([row["id"]] * len(candidates))
        out.rows.append({"id": row["id"], "candidates": candidates, "right": right,
                         "answers": [task.extract_answer(c) for c in candidates]})
    return out


def shared_features(*sets: Samples) -> list[str]:
    """The FEATURES every sample of every set has (orm and implicit only where all were graded with them)."""
    return [f for f in FEATURES if all(f in row for s in sets for row in s.features)]


@dataclass
class Fitted:
    names: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def probability(self, features: list[dict[str, float]]) -> list[float]:
        x = (_matrix(features, self.names) - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias).tolist()

    def summary(self) -> dict:
        """Weights per standardised feature (log-odds per standard deviation)."""
        return {"weights": {n: round(float(w), 4) for n, w in zip(self.names, self.weight)},
                "bias": round(float(self.bias), 4)}


def _matrix(features: list[dict[str, float]], names: list[str]) -> torch.Tensor:
    return torch.tensor([[row[n] for n in names] for row in features], dtype=torch.float64)


def fit(features: list[dict[str, float]], right: list[float], names: list[str]) -> Fitted:
    """L2-penalised logistic regression on standardised features (torch LBFGS: the loss is
    convex, so it converges to the one optimum)."""
    x = _matrix(features, names)
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    y = torch.tensor(right, dtype=torch.float64)
    weight = torch.zeros(len(names), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = (torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
                 + L2 * (weight ** 2).sum())
        value.backward()
        return value

    optimizer.step(loss)
    return Fitted(names, mean, std, weight.detach(), bias.detach())


def reading_scores(samples: Samples, probability: list[float]) -> dict[str, list[float]]:
    """Per sample, each of READINGS: its probability, and the sum over its answer's samples."""
    votes, k = [], 0
    for row in samples.rows:
        mine = probability[k:k + len(row["candidates"])]
        totals = Counter()
        for answer, p in zip(row["answers"], mine):
            if answer is not None:
                totals[answer] += p
        votes.extend(totals[a] if a is not None else 0.0 for a in row["answers"])
        k += len(mine)
    return {"sample": list(probability), "vote": votes}


def _auc(samples: Samples, scores: list[float]) -> float | None:
    auc, _ = within_problem_auc(scores, samples.right, samples.problem)
    return auc


def cross_validated(samples: Samples, names: list[str], folds: int = FOLDS) -> dict[str, float | None]:
    """Each reading's within-problem AUC on the fit samples, every problem scored by a fit
    without it (folds over problems, in their order)."""
    ids = [row["id"] for row in samples.rows]
    fold_of = {pid: i % folds for i, pid in enumerate(ids)}
    probability = [0.0] * len(samples.right)
    for f in range(folds):
        train = [i for i, pid in enumerate(samples.problem) if fold_of[pid] != f]
        model = fit([samples.features[i] for i in train], [samples.right[i] for i in train], names)
        held = [i for i, pid in enumerate(samples.problem) if fold_of[pid] == f]
        for i, p in zip(held, model.probability([samples.features[i] for i in held])):
            probability[i] = p
    return {r: _auc(samples, s) for r, s in reading_scores(samples, probability).items()}


def pick_accuracy(samples: Samples, scores: dict[str, list[float]]) -> dict[str, float]:
    """The share of problems whose pick is right: majority, checked majority (both checks), and
    each reading's argmax (ties: the earliest sample, as decode.select's rules break them)."""
    got: dict[str, list[float]] = {"majority": [], "checked_majority": [], **{r: [] for r in READINGS}}
    k = 0
    for row in samples.rows:
        c, right, n = row["candidates"], row["right"], len(row["candidates"])
        by_text, extract = dict(zip(c, right)), dict(zip(c, row["answers"])).get
        got["majority"].append(by_text[majority_vote(c, extract)])
        got["checked_majority"].append(by_text[checked_majority(c, extract, both_checks)])
        for r in READINGS:
            mine = scores[r][k:k + n]
            got[r].append(right[max(range(n), key=lambda j: (mine[j], -j))])
        k += n
    return {name: statistics.fmean(v) for name, v in got.items()}


def checked_score(samples: Samples) -> list[float]:
    """Checked majority's score with both checks (passes both, plus its checked share)."""
    return [row["step_check"] * row["answer_check"] + row["checked_share"] for row in samples.features]


def measure(fit_set: Samples, held_out: Samples, only: tuple[str, ...] = FEATURES) -> dict:
    """Fit on `fit_set` with the shared FEATURES among `only`, read on `held_out`."""
    names = [f for f in shared_features(fit_set, held_out) if f in only]
    model = fit(fit_set.features, fit_set.right, names)
    scores = reading_scores(held_out, model.probability(held_out.features))
    cv = cross_validated(fit_set, names)
    chosen = max(READINGS, key=lambda r: (cv[r] or 0.0, r == "vote"))
    return {"features": names, **model.summary(),
            "fit_samples": len(fit_set.right), "fit_problems": len(fit_set.rows),
            "fit_right_share": round(statistics.fmean(fit_set.right), 4),
            "cross_validated_auc": {r: None if v is None else round(v, 4) for r, v in cv.items()},
            "chosen_reading": chosen,
            "held_out_problems": len(held_out.rows),
            "held_out_problems_with_both": sum(0 < sum(r["right"]) < len(r["right"])
                                               for r in held_out.rows),
            "within_problem_auc": {**{r: _round(_auc(held_out, scores[r])) for r in READINGS},
                                   "checked_majority_score": _round(_auc(held_out, checked_score(held_out))),
                                   **{f: _round(_auc(held_out, [row[f] for row in held_out.features]))
                                      for f in names}},
            "accuracy": {k: round(v, 4) for k, v in pick_accuracy(held_out, scores).items()}}


def _policy(fit_set: Samples, held_out: Samples) -> dict:
    """Every feature, and beside it the `per_text` variant (PER_TEXT only)."""
    return {**measure(fit_set, held_out), "per_text": measure(fit_set, held_out, PER_TEXT)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _pairs(items: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise ValueError(f"{flag} {item!r}: expected POLICY=GRADED_JSON naming a file")
        out[key] = Path(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", nargs="+", required=True, metavar="P=JSON",
                        help="per policy, a best-of-N JSON graded on training problems")
    parser.add_argument("--held-out", nargs="+", required=True, metavar="P=JSON",
                        help="per policy, a best-of-N JSON graded on dev (or test) problems")
    parser.add_argument("--exclude-train", type=int, default=0, metavar="N",
                        help="drop the fit JSONs' first N training problems (the loop's own)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        fits, held = _pairs(args.fit, "--fit"), _pairs(args.held_out, "--held-out")
        if set(fits) != set(held):
            raise ValueError(f"--fit names policies {sorted(fits)}, --held-out {sorted(held)}: "
                             "give both for the same policies")
        result = {"exclude_train": args.exclude_train, "policies": {
            p: _policy(load_samples(fits[p], args.exclude_train, fit=True), load_samples(held[p]))
            | {"fit": str(fits[p]), "held_out": str(held[p])}
            for p in sorted(fits)}}
    except ValueError as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(args.output, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
