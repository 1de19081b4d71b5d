"""The self-improvement curve, decoding at a matched budget, and MCTS + DPO against STaR.

    python benchmarks/loop.py [--iterations 3] [--parallel] [--runs runs/bench]

Two real `qstar` runs on SmolLM2 arithmetic (same training problems, same held-out set):
1. MCTS + DPO: `qstar run experiment=demo_cpu iterations=3
   eval.decodes=[greedy,best_of_n,beam,mcts]` -> every policy's held-out accuracy under each
   decoding, with the tokens it generated (best-of-N is also selected by the ORM and by an
   ORM-weighted vote on the same samples once critics exist).
2. STaR: `qstar run experiment=star_cpu iterations=3` (best-of-N samples, verifier filter, SFT)
   with --star-samples samples per problem (8: about the MCTS loop's tokens in iteration 0);
   both loops' generated tokens per iteration are reported beside their accuracy.
A killed benchmark resumes its runs (`qstar resume`). --parallel runs both loops at once with
one torch thread each (two cores). Writes benchmarks/results/loop.json, curve.png and
decoding.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.run.atomic import atomic_path, write_json  # noqa: E402
from pipeline.run.store import BASELINE, RunStore  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QSTAR = str(Path(sys.executable).parent / "qstar")
DECODES = ["greedy", "best_of_n", "beam", "mcts"]


def qstar_command(run_dir: Path, iterations: int, overrides: list[str]) -> list[str]:
    """Resume the run if it exists, else start it in run_dir."""
    if (run_dir / "manifest.json").is_file():
        return [QSTAR, "resume", str(run_dir), f"iterations={iterations}"]
    return [QSTAR, "run", *overrides, f"iterations={iterations}", f"hydra.run.dir={run_dir}"]


def run_loops(commands: dict[str, list[str]], parallel: bool) -> None:
    env = dict(os.environ, WANDB_MODE="disabled")
    if parallel:
        env["OMP_NUM_THREADS"] = "1"  # two processes, two cores
    procs = {}
    for name, command in commands.items():
        print("$", " ".join(command), flush=True)
        procs[name] = subprocess.Popen(command, env=env, cwd=ROOT)
        if not parallel:
            procs[name].wait()
    failed = [name for name, proc in procs.items() if proc.wait() != 0]
    if failed:
        sys.exit(f"benchmark runs failed: {', '.join(failed)} (rerun to resume them)")


def completed_iterations(store: RunStore, iterations: int) -> int:
    return sum(store.done(i, "eval") for i in range(iterations))


def policy_decodes(store: RunStore, iterations: int) -> list[dict]:
    """Per policy (0 = base): accuracy and tokens per problem for each decoding run on it."""
    stages = [(0, BASELINE)] + [(i, "eval") for i in range(iterations)]
    rows = []
    for policy, (i, stage) in enumerate(stages):
        if not store.done(i, stage):
            break
        decodes = {}
        for name, s in store.metrics(i, stage)["decodes"].items():
            per_problem = s["tokens"] / max(s["total"], 1)
            decodes[name] = {"accuracy": s["accuracy"], "tokens_per_problem": round(per_problem, 1)}
            for select, accuracy in s.get("accuracy_by_select", {}).items():
                decodes[f"{name}:{select}"] = {"accuracy": accuracy,
                                               "tokens_per_problem": round(per_problem, 1)}
        rows.append({"policy": policy, "decodes": decodes})
    return rows


def loop_summary(store: RunStore, iterations: int) -> dict:
    done = completed_iterations(store, iterations)
    return {"policies": policy_decodes(store, iterations),
            "search_tokens": [store.metrics(i, "search")["tokens"] for i in range(done)],
            "search_seconds": [store.metrics(i, "search")["seconds"] for i in range(done)],
            "dpo_pairs": [store.metrics(i, "train").get("pairs") for i in range(done)],
            "sft_rows": [store.metrics(i, "train").get("sft_rows") for i in range(done)]}


def summarize(mcts_dir: Path, star_dir: Path, iterations: int) -> dict:
    """Everything the two runs have finished (a cut-short benchmark still reports)."""
    mcts = loop_summary(RunStore(mcts_dir), iterations)
    star = loop_summary(RunStore(star_dir), iterations)
    mcts_rows, star_rows = mcts["policies"], star["policies"]
    greedy = [r["decodes"]["greedy"]["accuracy"] for r in mcts_rows]
    star_greedy = [r["decodes"]["greedy"]["accuracy"] for r in star_rows]
    both = min(len(greedy), len(star_greedy)) - 1
    return {
        "benchmark": "loop", "iterations": iterations,
        "runs": {"mcts_dpo": str(mcts_dir), "star": str(star_dir)},
        "mcts_dpo": mcts, "star": star,
        "targets": {
            "greedy_gain_iter2_vs_iter0": (round(greedy[2] - greedy[0], 3)
                                           if len(greedy) > 2 else None),
            "mcts_minus_best_of_n_majority": [
                round(r["decodes"]["mcts"]["accuracy"]
                      - r["decodes"]["best_of_n:majority"]["accuracy"], 3)
                if "best_of_n:majority" in r["decodes"] else None for r in mcts_rows],
            "mcts_dpo_minus_star_greedy_by_policy": [
                round(greedy[k] - star_greedy[k], 3) for k in range(1, both + 1)],
        },
    }


def plot(result: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mcts, star = result["mcts_dpo"]["policies"], result["star"]["policies"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for rows, decode, label in ((mcts, "greedy", "MCTS+DPO loop, greedy"),
                                (mcts, "mcts", "MCTS+DPO loop, MCTS decoding"),
                                (star, "greedy", "STaR loop, greedy")):
        points = [(r["policy"], r["decodes"][decode]["accuracy"]) for r in rows
                  if decode in r["decodes"]]
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xlabel="iteration (0 = base model)", ylabel="held-out accuracy",
           title="Self-improvement on SmolLM2-135M arithmetic")
    ax.set_xticks([r["policy"] for r in mcts])
    ax.legend()
    paths = [_save(fig, RESULTS / "curve.png")]

    names = sorted({d for r in mcts for d in r["decodes"]} - {"best_of_n"}, key=_decode_order)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [r["policy"] + k * width for r in mcts if name in r["decodes"]]
        ys = [r["decodes"][name]["accuracy"] for r in mcts if name in r["decodes"]]
        tokens = [r["decodes"][name]["tokens_per_problem"] for r in mcts if name in r["decodes"]]
        ax.bar(xs, ys, width, label=f"{name} (~{round(sum(tokens) / len(tokens))} tok/problem)")
    ax.set(xlabel="policy (0 = base model)", ylabel="held-out accuracy",
           title="Decoding on the held-out set, per policy")
    ax.set_xticks([r["policy"] + 0.4 - width / 2 for r in mcts], [str(r["policy"]) for r in mcts])
    ax.legend(fontsize=7)
    paths.append(_save(fig, RESULTS / "decoding.png"))
    plt.close("all")
    return paths


def _decode_order(name: str) -> int:
    order = ["greedy", "best_of_n:majority", "best_of_n:orm", "best_of_n:orm_vote", "beam", "mcts"]
    return order.index(name) if name in order else len(order)


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--star-samples", type=int, default=8,
                        help="STaR samples per problem (8: about MCTS's tokens in iteration 0)")
    parser.add_argument("--parallel", action="store_true", help="run both loops at once")
    parser.add_argument("--summarize-only", action="store_true",
                        help="report what the runs have finished; run nothing")
    parser.add_argument("overrides", nargs="*", help="extra qstar overrides for both runs")
    args = parser.parse_args()
    mcts_dir, star_dir = args.runs.resolve() / "mcts_dpo", args.runs.resolve() / "star"
    if not args.summarize_only:
        run_loops({
            "mcts_dpo": qstar_command(mcts_dir, args.iterations, [
                "experiment=demo_cpu", f"eval.decodes=[{','.join(DECODES)}]", *args.overrides]),
            "star": qstar_command(star_dir, args.iterations, [
                "experiment=star_cpu", f"search.simulations={args.star_samples}",
                "eval.decodes=[greedy]", *args.overrides]),
        }, args.parallel)
    result = summarize(mcts_dir, star_dir, args.iterations)
    write_json(RESULTS / "loop.json", result)
    for path in plot(result):
        print(f"wrote {path}")
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
