"""Loop variants on dev: each run's curve, paired problem by problem against the default loop.

    python benchmarks/loop_variants.py --default RUN [--variant NAME=RUN ...] \
        [--output benchmarks/results/loop_variants_dev.json]

Each RUN is a `qstar run experiment=demo_cpu ...` directory (the variants with their overrides)
whose eval stage graded greedy decoding after every iteration. Per policy it reports dev greedy
accuracy, its tokens, how many answers reached an `Answer:` line (the demo task's answer
format), what the search that trained it found (nodes, merges, tokens, problems solved,
distinct verified solutions as `matched_budget.count_verified` counts them, the DPO pairs and
SFT rows made of it), what training saw (the rows of `data_iterations` iterations: more than the
iteration's own with train.history; the chosen log-prob change over DPO; seconds) and the dev
problems greedy got right. Each variant's policies are paired against the default's
(benchmarks/paired.py). The output keeps what it held; the default is written under
`default_rerun`, each variant under `variants[NAME]` (keys this script does not write, such as
a commit or a note, stay). A run whose eval stage did not read dev is refused: variants are
tuned on dev, never on test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from matched_budget import verified_solutions  # noqa: E402
from paired import correct_by_problem, paired  # noqa: E402

from pipeline.run.atomic import write_json  # noqa: E402
from pipeline.run.store import BASELINE, RunStore  # noqa: E402

OUTPUT = ROOT / "benchmarks" / "results" / "loop_variants_dev.json"
ANSWER_LINE = "Answer:"


def greedy_of(store: RunStore, stage_dir: Path) -> dict:
    """Dev greedy of one eval stage: accuracy, tokens, answers with an answer line."""
    path = stage_dir / "greedy.json"
    if not path.is_file():
        raise ValueError(f"{path}: no greedy grade (the loop's eval.decodes must hold greedy)")
    graded = json.loads(path.read_text())
    return {"dev_greedy": graded["summary"]["accuracy"],
            "dev_greedy_tokens": graded["summary"]["tokens"],
            "dev_greedy_with_answer_line": sum(ANSWER_LINE in r["completion"]
                                               for r in graded["rows"])}


def iteration_point(store: RunStore, i: int) -> dict:
    """Policy i+1 and what made it: iteration i's search, data and train stages."""
    search, data, train = (store.metrics(i, s) for s in ("search", "data", "train"))
    found = verified_solutions(store, i)
    return {"policy": i + 1, "iteration": i, **greedy_of(store, store.stage_dir(i, "eval")),
            "nodes": search["nodes"], "merges": search["merges"],
            "search_tokens": search["tokens"], "solved": search["solved"],
            "problems": search["problems"], "sft_loss_last": train.get("sft/loss_last"),
            "distinct_verified_solutions": found["verified_solutions"],
            "dpo_pairs": data["dpo"], "sft_rows": data["sft"],  # the iteration's own rows
            "data_iterations": train.get("data_iterations", 1),  # whose rows trained (history)
            "trained_pairs": train.get("pairs"), "trained_sft_rows": train.get("sft_rows"),
            "dpo_chosen_logprob_change": train.get("dpo/logps/chosen_change"),
            "train_seconds": store.manifest["stages"][store.key(i, "train")]["seconds"]}


def finished_iterations(store: RunStore) -> list[int]:
    return [i for i in range(store.manifest["iterations"]) if store.done(i, "eval")]


def curve(run: Path) -> dict:
    """A run's dev curve (policy 0 from its baseline) and the dev problems each policy got
    right; refuses a run whose eval split is not dev."""
    store = RunStore(run)
    split = store.manifest["config"]["eval"]["split"]
    if split != "dev":
        raise ValueError(f"{run} graded eval.split={split}; loop variants are read on dev")
    points = [{"policy": 0, **greedy_of(store, store.stage_dir(0, BASELINE))}]
    right = {}
    for i in finished_iterations(store):
        points.append(iteration_point(store, i))
        graded = correct_by_problem(store.stage_dir(i, "eval") / "greedy.json")
        right[f"policy_{i + 1}"] = sorted(k for k, ok in graded.items() if ok)
    return {"curve": points, "dev_greedy_right_ids": right}


def against(variant: Path, default: Path) -> dict:
    """The variant's policies paired with the default's, for the policies both have."""
    a, b = RunStore(variant), RunStore(default)
    shared = sorted(set(finished_iterations(a)) & set(finished_iterations(b)))
    return {f"policy_{i + 1}": paired(
        correct_by_problem(a.stage_dir(i, "eval") / "greedy.json"),
        correct_by_problem(b.stage_dir(i, "eval") / "greedy.json"), ("variant", "default"))
        for i in shared}


def named_run(text: str) -> tuple[str, Path]:
    name, sep, run = text.rpartition("=")  # NAME holds overrides, so it has "=" too
    if not sep or not name or not (Path(run) / "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=RUN, RUN a qstar run directory")
    return name, Path(run)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--default", type=Path, required=True, help="the default loop's run")
    parser.add_argument("--variant", type=named_run, action="append", default=[],
                        help="NAME=RUN, repeatable: NAME is the variant's overrides")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if not (args.default / "manifest.json").is_file():
        parser.error(f"--default {args.default}: not a qstar run directory (no manifest.json)")
    result = json.loads(args.output.read_text()) if args.output.is_file() else {}
    result.update(benchmark="loop_variants_dev", split="dev")
    try:
        result["default_rerun"] = {**result.get("default_rerun", {}), **curve(args.default)}
        for name, run in args.variant:
            result.setdefault("variants", {})[name] = {
                **result.get("variants", {}).get(name, {}), **curve(run),
                "paired_dev_greedy_against_default_rerun": against(run, args.default)}
    except ValueError as e:  # one line, exit 2; the output is left as it was
        parser.error(str(e))
    for name, _ in args.variant:
        for policy, p in result["variants"][name]["paired_dev_greedy_against_default_rerun"].items():
            print(f"{name} {policy}: variant only {p['variant_only']}, default only "
                  f"{p['default_only']}, difference {p['difference']:+.2f} (p {p['sign_test_p']})")
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
