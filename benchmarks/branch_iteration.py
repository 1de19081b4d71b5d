"""One iteration of a finished loop run again with other settings; the policy it trains graded on
dev beside the original's.

    python benchmarks/branch_iteration.py --run RUN [--run RUN2 ...] --iteration I \
        --branches DIR [--variant "NAME OVERRIDE..."]... [--held-out OVERRIDE...]... \
        [--output X.json]

Each variant of each source run (say, two seeds' loops) is a branch: a run directory
`DIR/<run name>/NAME` whose iterations before I are the source run's (symbolic links, never
written), whose manifest is the source's without iteration I's stages or any after it, and
whose config is the source's plus the variant's overrides (dotted KEY=VALUE keys) for
iteration I alone (recorded under `branch` in its manifest). Iteration I's stages then run
there as `qstar run` runs them, and policy I+1 of every branch and of the source is graded with
greedy decoding on the source's dev split and on each `--held-out` dev set (task overrides such
as `task.seed=5 task.num_dev=200`). Dev only: this is for asking what a late iteration needs
(say, why a curve flattens) without running the whole loop again, and test is never read.

Each variant is paired problem by problem against its sources (benchmarks/paired.py) over
every run and dev set, and reported per run with what its search had to pair beside it
(pipeline.stages.search's spread, the pairs and the SFT rows). Everything is cached: a killed call resumes, a branch whose
stages are done is not run again, and a grade on disk is read back (matched_budget.graded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from matched_budget import graded  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from paired import correct_by_problem, paired  # noqa: E402

from pipeline.compose import compose_config, one_line, recorded_config, to_config  # noqa: E402
from pipeline.config import QstarConfig  # noqa: E402
from pipeline.errors import ConfigError, QstarError  # noqa: E402
from pipeline.lm.models import resolve_model_path  # noqa: E402
from pipeline.loop import open_loop, run_stage, stage_runners  # noqa: E402
from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import RunStore, load_shards  # noqa: E402
from pipeline.stages.search import search_spread  # noqa: E402

SOURCE = "source"  # the name the source run's grades go under


def branch(source: Path, dest: Path, iteration: int, overrides: list[str]) -> RunStore:
    """DEST as a run that shares SOURCE's iterations before `iteration` and records the variant;
    an existing branch of the same source, iteration and overrides is reopened as it is."""
    mark = {"source": str(source.resolve()), "iteration": iteration, "overrides": overrides}
    if (dest / "manifest.json").is_file():
        store = RunStore(dest)
        if store.manifest.get("branch") != mark:
            raise ValueError(f"{dest} is another branch ({store.manifest.get('branch')}), "
                             f"not {mark}: name the variant differently")
        return store
    dest.mkdir(parents=True, exist_ok=True)
    for k in range(iteration):
        link = dest / f"iter_{k:03d}"
        if not link.is_symlink():
            link.symlink_to((source / f"iter_{k:03d}").resolve(), target_is_directory=True)
    manifest = RunStore(source).manifest
    kept = {key: entry for key, entry in manifest["stages"].items() if entry["iteration"] < iteration}
    write_json(dest / "manifest.json", manifest | {"stages": kept, "branch": mark})
    return RunStore(dest)


def variant_config(source: Path, iteration: int, overrides: list[str]) -> QstarConfig:
    """The source's recorded config plus a variant's dotted overrides (KEY=VALUE; a group preset
    such as search=pruned is not a dotted key), run to iteration `iteration`, no wandb."""
    try:
        merged = OmegaConf.merge(recorded_config(source), OmegaConf.from_dotlist(overrides),
                                 OmegaConf.create({"iterations": iteration + 1,
                                                   "tracking": {"wandb_mode": "disabled"}}))
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None
    return to_config(merged)


def run_branch(store: RunStore, iteration: int, overrides: list[str]) -> None:
    """Iteration `iteration`'s stages in the branch, with the source's config plus overrides."""
    cfg = variant_config(Path(store.manifest["branch"]["source"]), iteration, overrides)
    loop = open_loop(cfg, store)
    for stage, fn in stage_runners(cfg).items():
        run_stage(loop, iteration, stage, fn)


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every variant's config and every dev set's, composed before anything runs: a misspelt key
    is one line now, not a traceback after the first branch has trained."""
    for spec in args.variant:
        name, *overrides = spec.split()
        for run in args.run:
            try:
                variant_config(run, args.iteration, overrides)
            except QstarError as exc:
                parser.error(f"--variant {name!r} on {run}: {exc}")
    for task in [[], *args.held_out]:
        try:
            compose_config([*args.base, *task])
        except QstarError as exc:
            parser.error(f"--base / --held-out {' '.join(task) or '(none)'}: {exc}")


def grade(run: Path, iteration: int, base: list[str], dev_sets: list[list[str]],
          out: Path) -> dict[str, bool]:
    """Policy iteration+1 of `run` with greedy on every dev set (`qstar eval` composed from base,
    the set's task overrides, the policy): "set<TAB>problem id" -> right."""
    policy = RunStore(run).policy_dir(iteration + 1, resolve_model_path(compose_config(base).model))
    right = {}
    for k, task in enumerate(dev_sets):
        name = "_".join(task).replace("=", "-") or "own"
        output = out / f"{name}.json"
        graded([*base, *task], [f"model={policy}", "decode=greedy"], output, split="dev")
        right |= {f"{k}\t{pid}": ok for pid, ok in correct_by_problem(output).items()}
    return right


def searched(store: RunStore, iteration: int) -> dict:
    """What the run's search found (its spread read off the shards, as runs searched before the
    metrics held it need) and the data stage made of it."""
    search, data = store.metrics(iteration, "search"), store.metrics(iteration, "data")
    return {**{k: search[k] for k in ("solved", "tokens", "merges")},
            **search_spread(load_shards(store.stage_dir(iteration, "search"))),
            "dpo_pairs": data["dpo"], "sft_rows": data["sft"]}


def eval_ids(store: RunStore, iteration: int, fallback: set[str]) -> set[str]:
    """The dev problems the run's eval stage graded with greedy at `iteration` (fallback when it
    graded none there, or graded another split)."""
    path = store.stage_dir(iteration, "eval") / "greedy.json"
    if not path.is_file() or store.manifest["config"]["eval"]["split"] != "dev":
        return fallback
    return set(correct_by_problem(path))


def accuracy(right: dict[str, bool]) -> float:
    return round(sum(right.values()) / max(len(right), 1), 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True,
                        help="a finished source run (repeatable: the variants branch from each)")
    parser.add_argument("--iteration", type=int, required=True, help="the iteration run again")
    parser.add_argument("--branches", type=Path, required=True, help="where the branches go")
    parser.add_argument("--variant", action="append", default=[], metavar='"NAME OVERRIDE..."',
                        help="a branch: its name, then the overrides of its iteration")
    parser.add_argument("--held-out", action="append", nargs="+", default=[], metavar="OVERRIDE",
                        help="another dev set by its task overrides (repeatable)")
    parser.add_argument("--base", nargs="+", default=["experiment=demo_cpu"], metavar="OVERRIDE",
                        help="what the grades compose from: the source runs' own (their dev "
                             "split must be the one their eval stage graded)")
    parser.add_argument("--output", type=Path, default=None, help="the JSON (default: none)")
    args = parser.parse_args(argv)
    bad = [v for v in args.variant if len(v.split()) < 2 or "/" in v.split()[0]
           or v.split()[0] in ("grades", SOURCE)]
    if bad:
        parser.error(f"--variant {bad[0]!r}: expected a name (no '/', not 'grades' or "
                     f"'{SOURCE}') and at least one override")
    names = [run.resolve().name for run in args.run]
    if len(set(names)) < len(names):
        parser.error(f"--run: two source runs share a directory name ({names})")
    for run in args.run:
        if not RunStore(run).done(args.iteration, "train"):
            parser.error(f"--run {run} has not trained iteration {args.iteration}")
    check_inputs(parser, args)
    dev_sets = [[], *args.held_out]
    result = {"benchmark": "branch_iteration", "split": "dev", "iteration": args.iteration,
              "policy": args.iteration + 1, "dev_sets": [" ".join(t) or "own" for t in dev_sets],
              "sources": {}, "variants": {}}
    base = {}
    for run, name in zip(args.run, names):
        right = grade(run, args.iteration, args.base, dev_sets,
                      args.branches / name / "grades" / SOURCE)
        own = {k.split("\t", 1)[1] for k in right if k.startswith("0\t")}
        if own != eval_ids(RunStore(run), args.iteration, own):
            parser.error(f"--base {' '.join(args.base)}: its dev problems are not the ones {run} "
                         "graded in its eval stage; give the run's own overrides")
        base |= {f"{name}\t{k}": ok for k, ok in right.items()}
        result["sources"][name] = {"run": str(run), "accuracy": accuracy(right),
                                   **searched(RunStore(run), args.iteration)}
    result["accuracy"] = accuracy(base)
    for spec in args.variant:
        variant, *overrides = spec.split()
        mine, per_run = {}, {}
        for run, name in zip(args.run, names):
            try:
                store = branch(run, args.branches / name / variant, args.iteration, overrides)
            except ValueError as exc:
                parser.error(str(exc))
            run_branch(store, args.iteration, overrides)
            right = grade(store.root, args.iteration, args.base, dev_sets,
                          args.branches / name / "grades" / variant)
            mine |= {f"{name}\t{k}": ok for k, ok in right.items()}
            per_run[name] = {"accuracy": accuracy(right), **searched(store, args.iteration)}
        result["variants"][variant] = {"overrides": overrides, "accuracy": accuracy(mine),
                                       "runs": per_run, "paired": paired(mine, base, (variant, SOURCE))}
        print(f"{variant}: {accuracy(mine):.3f} against {result['accuracy']:.3f} "
              f"(sources) on {len(mine)} dev problems", flush=True)
    if args.output:
        write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
