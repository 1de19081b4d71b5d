"""The matched-budget proof's loop arm (c) over several seeds: the MCTS loop against the STaR loop.

    python benchmarks/loop_seeds.py --seed 1=benchmarks/results/matched_budget_seed1.json \
        --seed 2=benchmarks/results/matched_budget_seed2.json \
        [--seed 0=benchmarks/results/matched_budget.json] \
        [--output benchmarks/results/matched_budget_loop_seeds.json] \
        [--held-out task.seed=1 task.num_test=200]

Each JSON is a `benchmarks/matched_budget.py` output (the same task and split, the loops run at
`search.seed=S critics.seed=S train.seed=S`). One seed moves a policy of the demo loop by 3-7
points (benchmarks/RESULTS.md, "The default loop at four seeds"), which is the size of every gap arm (c) has
measured, so one seed cannot say which loop is ahead. Per seed this reports both loops' test
greedy curves, MCTS minus STaR per policy and where each MCTS curve stops rising; over the seeds,
the mean curves and, per policy, the two loops compared problem by problem over every (seed,
problem) pair whose grades are still on disk beside the runs (`<runs>/test_evals`, as
matched_budget.py caches them; benchmarks/paired.py). A seed whose grades are gone (its runs were
on another machine) counts in the means but not in the paired comparison, and says so. The same
test problems recur at every seed, so the pooled standard error treats pairs that share a problem
as independent and is somewhat optimistic.

`--held-out OVERRIDE...` (repeatable) adds another held-out set, named by its task overrides (say
the test split of `task.seed=1`, none of whose problems is in seed 0's splits): every policy of
both loops of every seed is graded on it with test greedy (matched_budget.loop_arm, cached beside
the runs as `--eval-run` caches such a set: `<runs>/test_evals_task.num_test-200_task.seed-1`),
and every curve, mean and paired comparison is then over the union of the seeds' own test
problems and those sets, read from the grades on disk (a seed whose own grades are gone is
refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import fmean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from matched_budget import evals_dir, loop_arm, stops_rising  # noqa: E402
from paired import correct_by_problem, paired  # noqa: E402

from pipeline.compose import compose_config  # noqa: E402
from pipeline.errors import QstarError  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore  # noqa: E402

OUTPUT = ROOT / "benchmarks" / "results" / "matched_budget_loop_seeds.json"
LOOPS = ("mcts", "star")


def grades_of(result: dict, folders: list[Path] | None = None,
              first: int = 1) -> dict[int, tuple[dict, dict]] | None:
    """Policy k >= first -> (MCTS loop's, STaR loop's) test greedy grades by problem, from the
    grades matched_budget.py cached beside the runs (`<runs>/test_evals`, or these folders merged:
    one set's problems after another's, ValueError when two share one); policy 0, the base, is
    both loops' p0. None when any is not on disk."""
    runs = Path(result["runs"]["mcts"]).parent
    found = {}
    for k in range(first, min(len(result["loop"][name]["test_greedy"]) for name in LOOPS)):
        merged = ({}, {})
        for evals in folders or [runs / "test_evals"]:
            files = [evals / f"p{k}_greedy.json"] * 2 if k == 0 else [
                evals / f"p{k}_greedy.json", evals / f"star_p{k}_greedy.json"]
            if not all(f.is_file() for f in files):
                return None
            for grades, f in zip(merged, files):
                new = correct_by_problem(f)
                if shared := grades.keys() & new.keys():
                    raise ValueError(f"{f} shares {len(shared)} problems with the sets before it "
                                     f"(e.g. {min(shared)}): a held-out set must be disjoint")
                grades.update(new)
        found[k] = merged
    return found


def grade_held_out(result: dict, overrides: list[str]) -> Path:
    """Every policy of both loops of this seed graded with test greedy on the held-out set these
    task overrides name (cached: only what is not on disk runs a model); the grades' folder."""
    runs = Path(result["runs"]["mcts"]).parent
    out = evals_dir(runs, "test", overrides)
    out.mkdir(parents=True, exist_ok=True)
    stores = {name: RunStore(runs / name) for name in LOOPS}
    loop_arm(overrides, stores, len(result["loop"]["mcts"]["test_greedy"]) - 1, out)
    return out


def on_union(result: dict, grades: dict[int, tuple[dict, dict]]) -> dict:
    """The result with both loops' test greedy curves computed over every graded problem."""
    curves = {name: [round(sum(grades[k][j].values()) / len(grades[k][j]), 4) for k in sorted(grades)]
              for j, name in enumerate(LOOPS)}
    return {**result, "loop": {name: {**result["loop"][name], "test_greedy": curves[name]}
                               for name in LOOPS}}


def seed_row(result: dict) -> dict:
    curves = {name: result["loop"][name]["test_greedy"] for name in LOOPS}
    both = min(len(c) for c in curves.values())
    diff = [round(curves["mcts"][k] - curves["star"][k], 4) for k in range(1, both)]
    return {**{f"{name}_test_greedy": curves[name] for name in LOOPS},
            "mcts_minus_star": diff, "iterations_mcts_at_least_star": sum(d >= 0 for d in diff),
            "mcts_stops_rising_at_policy": stops_rising(curves["mcts"]),
            "star_samples_per_problem": result.get("star_calibration", {}).get("samples_used"),
            "runs": result["runs"]}


def pooled_paired(graded: dict[str, dict[int, tuple[dict, dict]]]) -> list[dict]:
    """Per policy, MCTS against STaR over every (seed, problem) of the seeds with grades."""
    policies = sorted(set.intersection(*(set(g) for g in graded.values()))) if graded else []
    rows = []
    for k in policies:
        mcts = {f"{seed}/{pid}": v for seed, g in graded.items() for pid, v in g[k][0].items()}
        star = {f"{seed}/{pid}": v for seed, g in graded.items() for pid, v in g[k][1].items()}
        rows.append({"policy": k, "seeds": sorted(graded),
                     "paired": paired(mcts, star, ("mcts", "star"))})
    return rows


def summarize(results: dict[str, dict], held_out: list[list[str]] | None = None) -> dict:
    """The per-seed rows, the mean curves over the seeds and the pooled paired comparison; with
    held-out sets, each over the union of the seed's own test problems and those sets (graded
    here when not on disk)."""
    if len({r["split"] for r in results.values()}) != 1:
        raise ValueError("the results were graded on different splits")
    if held_out:
        results = with_held_out(results, held_out)
    per_seed = {seed: seed_row(r) for seed, r in results.items()}
    length = min(len(row[f"{name}_test_greedy"]) for row in per_seed.values() for name in LOOPS)
    mean = {name: [round(fmean(row[f"{name}_test_greedy"][k] for row in per_seed.values()), 4)
                   for k in range(length)] for name in LOOPS}
    diff = [round(mean["mcts"][k] - mean["star"][k], 4) for k in range(1, length)]
    graded = {seed: g for seed, r in results.items()
              if (g := grades_of(r, [Path(f) for f in r.get("grade_folders", [])])) is not None}
    return {"benchmark": "matched_budget_loop_seeds", "split": next(iter(results.values()))["split"],
            "seeds": sorted(results), "held_out": held_out or [],
            "problems_per_seed": {seed: len(g[min(g)][0]) for seed, g in graded.items() if g},
            "per_seed": per_seed,
            "mean": {**{f"{name}_test_greedy": mean[name] for name in LOOPS},
                     "mcts_minus_star": diff,
                     "iterations_mcts_at_least_star": sum(d >= 0 for d in diff),
                     "mcts_stops_rising_at_policy": stops_rising(mean["mcts"])},
            "paired_seeds": sorted(graded),
            "seeds_without_grades": sorted(set(results) - set(graded)),
            "pooled_paired": pooled_paired(graded)}


def with_held_out(results: dict[str, dict], held_out: list[list[str]]) -> dict[str, dict]:
    """Each seed's result with its curves over its own test problems and the held-out sets, and
    `grade_folders` naming where those grades are; ValueError naming a seed without its own."""
    out = {}
    for seed, result in results.items():
        own = Path(result["runs"]["mcts"]).parent / "test_evals"
        if grades_of(result, [own], first=0) is None:
            raise ValueError(f"--seed {seed}: its own test grades (every policy's, the base's "
                             f"too) are not beside its runs ({own}); --held-out pools them with "
                             "the new sets")
        folders = [own, *(grade_held_out(result, overrides) for overrides in held_out)]
        out[seed] = {**on_union(result, grades_of(result, folders, first=0)),
                     "grade_folders": [str(f) for f in folders]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", action="append", required=True, metavar="SEED=JSON",
                        help="a matched_budget.py output and the seed its loops ran at")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--held-out", action="append", nargs="+", metavar="OVERRIDE",
                        help="task overrides naming another held-out set to grade every policy on "
                             "and pool (repeatable), e.g. task.seed=1 task.num_test=200")
    args = parser.parse_args(argv)
    for overrides in args.held_out or []:
        if any(o.split("=")[0].split(".")[0].lstrip("+~") != "task" or "=" not in o
               for o in overrides):
            parser.error(f"--held-out {' '.join(overrides)}: expected task overrides only "
                         "(task.KEY=VALUE), which name a held-out set")
        try:  # a key or value the task config refuses, before any grading
            compose_config(overrides).task.num_test  # noqa: B018
        except QstarError as e:
            parser.error(f"--held-out {' '.join(overrides)}: {e}")
    results = {}
    for item in args.seed:
        seed, sep, path = item.partition("=")
        if not sep or not seed:
            parser.error(f"--seed {item!r}: expected SEED=JSON")
        try:
            result = json.loads(Path(path).read_text())
            for name in LOOPS:
                result["loop"][name]["test_greedy"]  # noqa: B018 (what summarize reads)
            result["runs"]["mcts"], result["split"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--seed {item}: not a matched_budget.py output with both loops "
                         f"({e.__class__.__name__}: {e})")
        results[seed] = result
    try:
        summary = summarize(results, args.held_out)
    except (ValueError, QstarError) as e:
        parser.error(str(e))
    write_json(args.output, summary)
    print(json.dumps(summary["mean"]))
    print(f"wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
