"""The matched-budget proof: does search beat sampling at the same generated tokens?

    python benchmarks/matched_budget.py [--iterations 4] [--n 8] [--runs runs/matched_budget]
    python benchmarks/matched_budget.py --smoke model=<tiny checkpoint>   # minutes, plumbing only
    python benchmarks/matched_budget.py --eval-run RUN --eval-policies 0 1 [--split dev]
                                        # the evaluation arm alone, no loop (dev: to tune on)
    python benchmarks/matched_budget.py --eval-run RUN --eval-policies 1 2 3 --output B.json \
        -- task.seed=1 task.num_test=200   # another held-out set, cached apart (evals_dir)
    python benchmarks/matched_budget.py --pool A.json B.json --output POOLED.json \
        [--note-file RULE.md]           # arms graded on disjoint held-out sets, or several
                                        # runs' arms (two loops' policy k: two pairs per
                                        # problem), pooled; the samples' within-problem AUC
                                        # per selection score

Three loops on the default task (same training problems, same base policy, same test split):
the MCTS loop (`experiment=demo_cpu`: MCTS + critics + DPO/SFT), the STaR loop
(`experiment=star_cpu`: samples + verifier + SFT), whose samples per problem are set so its
iteration-0 search spends the MCTS loop's iteration-0 search tokens, and the GRPO loop
(`experiment=grpo_cpu`: TRL's GRPOTrainer rewarded by the grader), whose group is STaR's samples
per problem and which trains each iteration until it has sampled the MCTS loop's iteration-0
search tokens (`train.grpo.token_budget`; at most GRPO_EPOCHS epochs). The loops' own eval
stages read dev; every number here is graded on the test split, once, by this script.

- data_generation: verified solutions found per 1,000 generated tokens on the training
  problems, MCTS against sampling, both with the base policy (iteration 0 of each loop).
- evaluation: for policies 0..N of the MCTS loop, greedy, best-of-N majority (n=--n) and MCTS
  with the policy's critics (no verifier) given best-of-N's tokens per problem as its
  `search.token_budget` (spent as nearly as whole rounds allow, not capped); `matched` says
  whether MCTS's tokens are within 10% of best-of-N's.
- loop: test greedy after every iteration of each loop, their search tokens (GRPO: the
  tokens it sampled while training), and options_per_solution (mean lines of the verified
  solutions each search found).
- wall: per MCTS-loop iteration, the chosen log-prob change during DPO, the DPO margin and pair
  accuracy (means over every pair with the trained policy, against its reference; the last
  logged step, one batch, beside them), the training solve rate, and the first iteration whose
  test greedy is not above the one before.

`--no-grpo` neither runs nor extends the GRPO loop (a GRPO run on disk is reported as far as it
got). `--eval-policies 1 3` limits the evaluation arm to those policies (the JSON lists which;
put `--` after the list when overrides follow).
Resumable: the loops resume (`qstar resume` semantics), and each test evaluation is skipped
when its JSON exists. Writes matched_budget.json (`"split": "test"`) and three PNGs beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paired import correct_by_problem, paired, rule_grades  # noqa: E402
from sample_scores import within_problem_aucs  # noqa: E402

from pipeline.compose import compose_config, recorded_config, to_config  # noqa: E402
from pipeline.config import Selection, to_dict  # noqa: E402
from pipeline.decoding.tree_search import SearchModels, train_search  # noqa: E402
from pipeline.lm.models import load_model, resolve_model_path  # noqa: E402
from pipeline.loop import resume_run, run_loop  # noqa: E402
from pipeline.run.atomic import atomic_path, write_json  # noqa: E402
from pipeline.run.store import RunStore, load_shards  # noqa: E402
from pipeline.stages.data import verified_completions  # noqa: E402
from pipeline.stages.eval import run_eval  # noqa: E402
from pipeline.stages.search import search_spread, shard_rows, summarize_search  # noqa: E402
from pipeline.stages.train import pair_metrics_of  # noqa: E402
from pipeline.tasks import make_task  # noqa: E402
from pipeline.tasks.prompt import task_prompts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MAX_STAR_SAMPLES = 256  # STaR's calibration probes no count above this (a search that never grows)
GRPO_EPOCHS = 4  # the GRPO arm's cap on epochs per iteration; the token budget stops it first
GRADED_BY = ("model", "task", "decode", "critics", "eval", "seed")  # what run_eval reads
SMOKE = ["debug=default", "task.num_train=2", "task.num_dev=2", "task.num_test=2",
         "decode.n=2", "search.simulations=2", "train.grpo.prompts_per_step=2",
         "train.grpo.max_completion_length=16"]


def run_or_resume(run_dir: Path, overrides: list[str], iterations: int) -> RunStore:
    if (run_dir / "manifest.json").is_file():
        return resume_run(str(run_dir), [f"iterations={iterations}"])
    return run_loop(compose_config([*overrides, f"iterations={iterations}", "progress=false"]),
                    run_dir)


def graded_with(config: dict) -> dict:
    """What decides a grade, from a config as an eval JSON records it: the sections `qstar eval`
    reads (GRADED_BY; the search config only for MCTS), less where the JSON goes. A key added to
    a section it never reads (train, cluster, ...) does not send a cached grade back to grading."""
    wanted = GRADED_BY + (("search",) if config["decode"]["strategy"] == "mcts" else ())
    key = {k: v for k, v in config.items() if k in wanted}
    key["eval"] = {k: v for k, v in config["eval"].items() if k != "output"}
    return json.loads(json.dumps(key, default=str))


def graded(base: list[str], extra: list[str], output: Path, split: str = "test") -> dict:
    """`qstar eval eval.split=SPLIT ...` once (test: reported numbers; dev: tuning); the JSON on
    disk is the cache, graded again when it was graded with another config (a default changed
    since)."""
    cfg = compose_config([*base, *extra, f"eval.split={split}", f"eval.output={output}",
                          "progress=false"])
    if output.is_file():
        saved = json.loads(output.read_text())
        if saved.get("config") and graded_with(saved["config"]) == graded_with(to_dict(cfg)):
            return saved["summary"]  # (a grade that records no config is graded again)
    print(f"eval -> {output}", flush=True)
    run_eval(cfg)
    return json.loads(output.read_text())["summary"]


def per_problem(summary: dict) -> float:
    return round(summary["tokens"] / max(summary["total"], 1), 1)


def verified_solutions(store: RunStore, i: int) -> dict:
    """count_verified over iteration i's search shards."""
    rows = [row for shard in sorted(store.stage_dir(i, "search").glob("shard_*.jsonl"))
            for row in map(json.loads, shard.read_text().splitlines())]
    return count_verified(rows, store.metrics(i, "search")["tokens"])


def count_verified(rows: list[dict], tokens: int) -> dict:
    """Distinct verified solutions in one search's shard rows and their length in lines, which
    is their number of options (search.termination=newline). A solution is a correct terminal
    node's path (a distinct text among samples), or a node's steps plus a fast rollout the
    verifier accepted and that ended with EOS: the rollout's tokens are in the search's budget
    and the data stage trains on it (pairs.sft_from_rollouts). `verified_terminals` and
    `solved_by_terminal` count terminal nodes only."""
    terminal_count, solutions, solved, by_terminal = 0, set(), 0, 0
    for row in rows:
        terminals, from_rollouts = verified_completions(row["tree"], row.get("rollouts", {}))
        terminal_count += len(terminals)
        solved += bool(terminals or from_rollouts)
        by_terminal += bool(terminals)
        solutions |= {(row["problem_id"], text) for text in terminals | from_rollouts}
    lines = [len([x for x in text.splitlines() if x.strip()]) for _, text in solutions]
    return {"problems": len(rows), "solved": solved, "solved_by_terminal": by_terminal,
            "verified_solutions": len(solutions), "verified_terminals": terminal_count,
            "tokens": tokens,
            "verified_per_1k_tokens": round(1000 * len(solutions) / max(tokens, 1), 3),
            "verified_terminals_per_1k_tokens": round(1000 * terminal_count / max(tokens, 1), 3),
            "solved_per_1k_tokens": round(1000 * solved / max(tokens, 1), 3),
            "options_per_solution": round(sum(lines) / len(lines), 2) if lines else None}


def star_samples(base: list[str], mcts: RunStore, out: Path) -> dict:
    """Samples per problem whose STaR iteration-0 search comes nearest the MCTS loop's
    iteration-0 search tokens. The STaR loop's own sampler (`experiment=star_cpu`, base policy,
    training problems; with the step check a sample stops at its first flagged line, and a
    repeat of a sibling sample is cut, so a sample's length depends on the count) searches at
    the count one sample's mean length suggests, then one more or one fewer until the tokens
    cross the target; the nearer count wins. Every count's tokens are cached; no accuracy is
    read. (Until 2026-12-06 a plain `decode=sample` eval set the count: with the check on, its
    unstopped samples ran 1.6x longer, and STaR spent 0.66x the MCTS tokens.)"""
    target = mcts.metrics(0, "search")
    search = StarSampler(base, out)
    start = min(MAX_STAR_SAMPLES, max(1, round(target["tokens"] / max(search.tokens(1), 1))))
    count, step = start, (1 if search.tokens(start) < target["tokens"] else -1)
    while (1 <= count + step <= MAX_STAR_SAMPLES
           and (search.tokens(count + step) < target["tokens"]) == (step == 1)):
        count += step  # not crossed yet
    probed = {k: search.tokens(k) for k in sorted(search.found)}
    best = min(probed, key=lambda k: (abs(probed[k] - target["tokens"]), k))
    return {"mcts_search_tokens": target["tokens"],
            "mcts_search_tokens_per_problem": round(target["tokens"] / max(target["problems"], 1), 1),
            "sample_tokens": round(probed[1] / max(target["problems"], 1), 1),
            "samples": best, "star_tokens_by_samples": {str(k): v for k, v in probed.items()}}


class StarSampler:
    """The STaR loop's iteration-0 search at a given number of samples per training problem:
    its decoded tokens, cached in OUT/calibration_star_train_<count>.json."""

    def __init__(self, base: list[str], out: Path):
        self.base, self.out, self.found, self.models = base, out, {}, None

    def tokens(self, count: int) -> int:
        if count not in self.found:
            self.found[count] = self._searched(count)
        return self.found[count]

    def _searched(self, count: int) -> int:
        cache = self.out / f"calibration_star_train_{count}.json"
        if cache.is_file():
            return json.loads(cache.read_text())["tokens"]
        cfg = compose_config(["experiment=star_cpu", *self.base, f"search.simulations={count}",
                              "progress=false"])
        if self.models is None:
            model, tokenizer = load_model(cfg.model)
            self.models = SearchModels(policy=model, tokenizer=tokenizer)
        task = make_task(cfg.task)
        problems = task.split("train")
        trees, scorer = train_search(problems, task, task_prompts(self.models.tokenizer, task,
                                                                  problems), cfg, self.models)
        tokens = summarize_search(shard_rows(trees, scorer, problems, 0), 0.0)["tokens"]
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"samples": count, "problems": len(problems), "tokens": tokens})
        return tokens


def star_used(calibration: dict, star: RunStore) -> dict:
    """What the STaR run on disk actually did: a run started before (resumed, not restarted)
    keeps the samples per problem it was started with, so the JSON says which, and how close
    its iteration-0 search tokens came to the MCTS loop's."""
    tokens = star.metrics(0, "search")["tokens"]
    return {**calibration, "samples_used": star.manifest["config"]["search"]["simulations"],
            "star_search_tokens": tokens,
            "star_over_mcts_tokens": round(tokens / max(calibration["mcts_search_tokens"], 1), 3)}


def grpo_budget(calibration: dict) -> list[str]:
    """GRPO's group is STaR's samples per problem; it trains until it has sampled the MCTS loop's
    iteration-0 search tokens (train.grpo.token_budget), for GRPO_EPOCHS epochs at most."""
    return [f"train.grpo.num_generations={max(2, calibration['samples'])}",
            f"train.grpo.token_budget={calibration['mcts_search_tokens']}",
            f"train.epochs={GRPO_EPOCHS}"]


def evaluation_arm(base: list[str], store: RunStore, policies: list[int], n: int,
                   out: Path, split: str = "test") -> list:
    rows = []
    base_policy = resolve_model_path(compose_config(base).model)
    for i in policies:
        policy = store.policy_dir(i, base_policy)
        critics = store.critics_dir(i)
        model = [f"model={policy}"]
        greedy = graded(base, [*model, "decode=greedy"], out / f"p{i}_greedy.json", split)
        bon = graded(base, [*model, "decode=best_of_n", f"decode.n={n}",
                            "decode.select=majority"], out / f"p{i}_best_of_{n}.json", split)
        budget = max(1, round(per_problem(bon)))
        mcts_json, bon_json = arm_grades(out, i, n, budget)
        mcts = graded(base, [*model, "decode=mcts", f"search.token_budget={budget}",
                             "search.simulations=64",
                             *([f"eval.critics={critics}"] if critics else [])], mcts_json, split)
        ratio = per_problem(mcts) / max(per_problem(bon), 1e-9)
        rows.append({"policy": i, "critics": str(critics) if critics else None,
                     "greedy": {"accuracy": greedy["accuracy"],
                                "tokens_per_problem": per_problem(greedy)},
                     "best_of_n_majority": {"n": n, "accuracy": bon["accuracy"],
                                            "tokens_per_problem": per_problem(bon),
                                            # the same samples under every select rule
                                            "accuracy_by_select": bon.get("accuracy_by_select"),
                                            "pass_at_n": bon.get("pass_at_n")},
                     "mcts": {"accuracy": mcts["accuracy"], "token_budget": budget,
                              "tokens_per_problem": per_problem(mcts),
                              # the same trees under every best_path rule (None: graded before)
                              "accuracy_by_best_path": mcts.get("accuracy_by_best_path")},
                     "mcts_over_best_of_n_tokens": round(ratio, 3),
                     "matched": abs(ratio - 1) <= 0.1,
                     "mcts_minus_best_of_n": round(mcts["accuracy"] - bon["accuracy"], 3),
                     # problem by problem: the discordant counts, standard error, sign test
                     "paired": paired(correct_by_problem(mcts_json), correct_by_problem(bon_json),
                                      ("mcts", "best_of_n")),
                     "paired_by_best_path": rules_against(mcts_json, bon_json),
                     "paired_with_checked_majority": against_checked(mcts_json, bon_json)})
    return rows


def against_checked(mcts_json: Path, bon_json: Path) -> dict | None:
    """MCTS against best-of-N's checked_majority (majority over the samples in which the step
    check flags no line, as the search drops its dead ends), problem by problem; None when the
    samples were graded without the check."""
    rules = rule_grades(json.loads(bon_json.read_text())["rows"], "select")
    checked = rules.get(Selection.checked_majority.value)
    return None if checked is None else paired(correct_by_problem(mcts_json), checked,
                                               ("mcts", "checked_majority"))


def rules_against(mcts_json: Path, bon_json: Path) -> dict[str, dict]:
    """Each best_path rule read off the same trees against best-of-N, problem by problem
    ({}: the trees were graded before rows recorded their rules)."""
    rows, bon = json.loads(mcts_json.read_text())["rows"], correct_by_problem(bon_json)
    return {rule: paired(grades, bon, (rule, "best_of_n"))
            for rule, grades in rule_grades(rows, "best_path").items()}


def arm_grades(out: Path, i: int, n: int, budget: int) -> tuple[Path, Path]:
    """Where the evaluation arm keeps policy i's MCTS and best-of-n grades."""
    return out / f"p{i}_mcts_budget{budget}.json", out / f"p{i}_best_of_{n}.json"


def evals_dir(run: Path, split: str, overrides: list[str]) -> Path:
    """Where --eval-run caches RUN's grades on SPLIT: RUN/SPLIT_evals, or, when the overrides
    change the task (another held-out set, say `task.seed=1 task.num_test=200`), a folder named
    by those overrides (RUN/test_evals_task.num_test-200_task.seed-1), so that grading one run
    on two sets never overwrites the first's."""
    task = sorted(o for o in overrides if o.split("=")[0].split(".")[0].lstrip("+~") == "task")
    suffix = "".join(f"_{o}" for o in task)  # '=' in a path would break Hydra's override parser
    suffix = suffix.replace("=", "-").replace("/", "-").replace(" ", "")
    return run / f"{split}_evals{suffix}"


def pooled(arms: list[dict]) -> dict:
    """Several evaluation arms as one: one run's policies on disjoint held-out sets (e.g. the
    test split of two task seeds), or several runs' policies (two loops' policy k on the same
    problems are two pairs each): per policy, MCTS against best-of-N problem by problem over
    every set's problems, read from the grades each arm cached beside its run; beside it, MCTS
    against the samples' checked majority and every select rule against majority, and the
    within-problem AUC of each selection's score on the samples (benchmarks/sample_scores.py)."""
    by_policy: dict[int, list] = {}
    for arm in arms:
        run = arm["runs"]["mcts"]
        out = Path(arm.get("evals") or Path(run) / f"{arm['split']}_evals")
        for row in arm["evaluation"]:
            by_policy.setdefault(row["policy"], []).append((run, *arm_grades(
                out, row["policy"], row["best_of_n_majority"]["n"], row["mcts"]["token_budget"])))
    rows = []
    for i, sets in sorted(by_policy.items()):
        mcts = merged([by_run(run, correct_by_problem(m)) for run, m, _ in sets], i)
        bon = merged([by_run(run, correct_by_problem(b)) for run, _, b in sets], i)
        rules = [{rule: by_run(run, grades) for rule, grades in
                  rule_grades(json.loads(b.read_text())["rows"], "select").items()}
                 for run, _, b in sets]
        common = set.intersection(*(set(r) for r in rules))  # rules every set recorded
        select = {rule: merged([r[rule] for r in rules], i) for rule in sorted(common)}
        checked = select.get(Selection.checked_majority.value)
        rows.append({"policy": i, "sets": len(sets), "runs": len({run for run, _, _ in sets}),
                     "mcts_accuracy": round(sum(mcts.values()) / len(mcts), 4),
                     "best_of_n_accuracy": round(sum(bon.values()) / len(bon), 4),
                     "paired": paired(mcts, bon, ("mcts", "best_of_n")),
                     "paired_with_checked_majority": None if checked is None else paired(
                         mcts, checked, ("mcts", "checked_majority")),
                     # the same samples under each select rule, against their majority
                     "best_of_n_by_select": {rule: {
                         "accuracy": round(sum(g.values()) / len(g), 4),
                         "paired_with_majority": paired(g, bon, (rule, "majority"))}
                         for rule, g in select.items() if rule != Selection.majority.value},
                     # how well each selection's score ranks one problem's samples (issue 15)
                     "within_problem_auc_best_of_n": within_problem_aucs([b for _, _, b in sets])})
    return {"benchmark": "matched_budget", "pooled": [str(a["runs"]["mcts"]) for a in arms],
            "splits": sorted({a["split"] for a in arms}), "evaluation": rows}


def by_run(run: str, grades: dict[str, bool]) -> dict[str, bool]:
    """Grades keyed by run and problem: one run's policy k on two held-out sets must not share a
    problem, while two runs' policy k (two loops, say two seeds) on the same problems are two
    pairs each."""
    return {f"{run}\t{problem}": right for problem, right in grades.items()}


def merged(sets: list[dict[str, bool]], policy: int) -> dict[str, bool]:
    """(Run, problem) -> right over the sets; refused when two sets of one run share a problem."""
    out = {k: v for found in sets for k, v in found.items()}
    if len(out) != sum(len(found) for found in sets):
        raise ValueError(f"policy {policy}'s held-out sets share problems")
    return out


def loop_arm(base: list[str], stores: dict[str, RunStore], iterations: int, out: Path) -> dict:
    """Test greedy of policy 0..iterations for each loop, with each iteration's search."""
    base_policy = resolve_model_path(compose_config(base).model)
    result = {}
    for name, store in stores.items():
        done = sum(store.done(i, "train") for i in range(iterations))
        greedy = []
        for i in range(done + 1):
            policy = store.policy_dir(i, base_policy)
            # the MCTS loop's policies share their greedy JSON with the evaluation arm
            output = out / (f"p{i}_greedy.json" if i == 0 or name == "mcts"
                            else f"{name}_p{i}_greedy.json")
            greedy.append(graded(base, [f"model={policy}", "decode=greedy"], output)["accuracy"])
        result[name] = {"test_greedy": greedy, "search": [
            sampled_tokens(store, i) if name == "grpo" else verified_solutions(store, i)
            for i in range(done)]}
    both = min(len(result[name]["test_greedy"]) for name in ("mcts", "star"))
    result["mcts_minus_star"] = [round(result["mcts"]["test_greedy"][k]
                                       - result["star"]["test_greedy"][k], 3)
                                 for k in range(1, both)]
    result["mcts_vs_star_paired"] = [paired(correct_by_problem(out / f"p{k}_greedy.json"),
                                            correct_by_problem(out / f"star_p{k}_greedy.json"),
                                            ("mcts", "star")) for k in range(1, both)]
    return result


def sampled_tokens(store: RunStore, i: int) -> dict:
    """GRPO has no search: the completions and tokens its train stage sampled."""
    train = store.metrics(i, "train")
    return {"tokens": train["tokens"], "token_budget": train.get("token_budget"),
            "steps": train["steps"], "completions": train["completions"],
            "train_solve_rate": train.get("solve_rate_mean")}


def wall_arm(store: RunStore, greedy: list[float], iterations: int) -> dict:
    """Per iteration: the DPO metrics over all pairs after training (pair_metrics_of computes them,
    once, for iterations trained before the train stage recorded them), the last logged step's
    batch beside them, and the training solve rate."""
    rows = []
    for i in range(iterations):
        if not store.done(i, "train"):
            break
        train, search = store.metrics(i, "train"), store.metrics(i, "search")
        after = dpo_after(store, i, train)
        change = after.get("dpo/logps/chosen_change")
        logp = after.get("dpo/after/logps/chosen")
        spread = search_spread(load_shards(store.stage_dir(i, "search")))
        rows.append({"iteration": i, "training_solve_rate": search.get("solve_rate"),
                     "dpo_pairs": train.get("pairs"), "skipped": train.get("skipped"),
                     # what the search had to pair: a sharper policy's resampled options merge
                     "search_merges": search.get("merges"), **spread,
                     # means over every pair: the trained policy against its reference
                     "dpo_chosen_logp_change": change,
                     # the reference's (with train.reference=previous: the starting policy's)
                     "dpo_chosen_logp_reference": None if logp is None else logp - change,
                     "dpo_chosen_logp_after": logp,
                     "dpo_margin": after.get("dpo/after/rewards/margins"),
                     "dpo_pair_accuracy": after.get("dpo/after/rewards/accuracies"),
                     "last_step": {"pairs_in_batch_differ_each_step": True,
                                   "margin": train.get("dpo/rewards/margins"),
                                   "pair_accuracy": train.get("dpo/rewards/accuracies"),
                                   "chosen_logp_first": train.get("dpo/logps/chosen_first"),
                                   "chosen_logp_last": train.get("dpo/logps/chosen_last")}})
    return {"per_iteration": rows, "test_greedy": greedy,
            "test_curve_stops_rising_at_policy": stops_rising(greedy)}


def stops_rising(curve: list[float]) -> int | None:
    """The first policy k >= 1 whose accuracy is not above policy k-1's (None: still rising)."""
    return next((k for k in range(1, len(curve)) if curve[k] <= curve[k - 1]), None)


def dpo_after(store: RunStore, i: int, train: dict) -> dict:
    """Iteration i's dpo/after/* metrics: recorded by its train stage, or computed now from its
    policy, reference and pairs and kept in bench_dpo_after/ (one no-grad pass)."""
    if "dpo/after/rewards/chosen" in train or "dpo" not in train.get("phases", []):
        return train
    path = store.root / "bench_dpo_after" / f"iter_{i:03d}.json"
    if not path.is_file():
        cfg = to_config(recorded_config(store.root))
        with tempfile.TemporaryDirectory() as work:
            found = pair_metrics_of(str(store.stage_dir(i, "train") / "policy"),
                                    store.stage_dir(i, "data"), cfg.train, cfg.model, Path(work))
        write_json(path, found)
    return json.loads(path.read_text())


def plot(result: dict, output: Path) -> list[Path]:
    """PNGs beside the JSON, named after it (matched_budget.json: matched_budget_data.png, ...),
    so a replicate's --output does not overwrite the proof's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    data = result["data_generation"]
    ax.bar(["MCTS", "sampling"], [data["mcts"]["verified_per_1k_tokens"],
                                  data["sampling"]["verified_per_1k_tokens"]])
    ax.set(ylabel="verified solutions / 1k tokens", title="Data generation (base policy)")
    paths.append(_save(fig, output.with_name(f"{output.stem}_data.png")))

    rows = result["evaluation"]
    if rows:  # --no-eval: none
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("greedy", "greedy"), ("best_of_n_majority", "best-of-N majority"),
                           ("mcts", "MCTS (critics, matched tokens)")):
            ax.plot([r["policy"] for r in rows], [r[key]["accuracy"] for r in rows], marker="o",
                    label=label)
        checked = [(r["policy"], (r["best_of_n_majority"]["accuracy_by_select"] or {})
                    .get(Selection.checked_majority.value)) for r in rows]
        if all(acc is not None for _, acc in checked):
            ax.plot(*zip(*checked), marker="o", linestyle="--", label="best-of-N, checked majority")
        ax.set(xlabel="policy", ylabel="test accuracy", title="Evaluation at matched tokens")
        ax.legend(fontsize=8)
        paths.append(_save(fig, output.with_name(f"{output.stem}_eval.png")))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("mcts", "MCTS + critics + DPO/SFT"), ("star", "STaR"), ("grpo", "GRPO")):
        if name not in result["loop"]:
            continue
        curve = result["loop"][name]["test_greedy"]
        ax.plot(range(len(curve)), curve, marker="o", label=label)
    ax.set(xlabel="policy (0 = base)", ylabel="test greedy accuracy",
           title="Loops (search tokens matched in iteration 0)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, output.with_name(f"{output.stem}_loop.png")))
    plt.close("all")
    return paths


def _save(fig, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # policies
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="best-of-N samples per problem")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "matched_budget")
    parser.add_argument("--output", type=Path, default=RESULTS / "matched_budget.json")
    parser.add_argument("--smoke", action="store_true",
                        help="2 problems per split, 1 iteration: checks the plumbing only")
    parser.add_argument("--eval-policies", type=int, nargs="+", default=None, metavar="K",
                        help="the evaluation arm grades only these policies (default: every "
                             "policy of the MCTS loop); the JSON says which")
    parser.add_argument("--no-eval", action="store_true",
                        help="no evaluation arm (a seed replicate of the loops: "
                             "benchmarks/loop_seeds.py); the JSON's evaluation is empty")
    parser.add_argument("--no-grpo", action="store_true",
                        help="do not run or extend the GRPO loop (hours on a CPU); a GRPO run "
                             "already on disk is reported as far as it got")
    parser.add_argument("--eval-run", type=Path, default=None, metavar="RUN",
                        help="run no loop: grade the evaluation arm alone for RUN's policies "
                             "(--eval-policies, default 0; a RUN not on disk has the base policy "
                             "only) into --output (default matched_budget_evaluation_SPLIT.json)")
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="with --eval-run: dev grades the arm on dev, for choosing defaults")
    parser.add_argument("--pool", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: pool --eval-run outputs graded on disjoint held-out "
                             "sets (say the test split of task.seed 0 and 1), or several runs' "
                             "(a pair per run and problem), into --output, MCTS against "
                             "best-of-N per policy over all their problems")
    parser.add_argument("--note-file", type=Path, default=None, metavar="FILE",
                        help="with --pool or --eval-run: FILE's text goes into the JSON as `note` "
                             "(say, the rule written down before the grades)")
    parser.add_argument("overrides", nargs="*", help="extra qstar overrides for every run")
    args = parser.parse_args(argv)
    note = {}
    if args.note_file is not None:
        try:
            note = {"note": args.note_file.read_text()}
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--note-file {args.note_file}: {e.__class__.__name__}: {e}")
    if args.pool:
        if args.output == RESULTS / "matched_budget.json":
            parser.error("--pool needs --output: the proof's own JSON is not the pooled arm's")
        arms = []
        for path in args.pool:
            try:
                arm = json.loads(path.read_text())
                arm["runs"]["mcts"], arm["split"], arm["evaluation"]  # noqa: B018 (what pooled reads)
            except (OSError, ValueError, KeyError, TypeError) as e:
                parser.error(f"--pool {path}: not an --eval-run output ({e.__class__.__name__}: {e})")
            arms.append(arm)
        try:
            result = pooled(arms)
        except OSError as e:  # FileNotFoundError names the grade
            parser.error(f"--pool: {e} (the arm's run no longer holds its grades)")
        except ValueError as e:
            parser.error(f"--pool: {e}")
        result = {**result, "arms": [str(p) for p in args.pool], **note}
        write_json(args.output, result)
        print(f"wrote {args.output}")
        return result
    if args.note_file is not None and args.eval_run is None:
        parser.error("--note-file goes with --pool or --eval-run")
    if args.split != "test" and args.eval_run is None:
        parser.error("--split dev needs --eval-run: the proof's numbers are on test")
    if args.no_eval and (args.eval_run is not None or args.eval_policies):
        parser.error("--no-eval runs the loops alone: not with --eval-run or --eval-policies")
    if args.eval_run is not None:
        return evaluation_only(args, parser, note)
    if args.smoke:
        args.iterations, args.n = 1, 2
    if args.eval_policies and max(args.eval_policies) > args.iterations:  # before hours of loops
        parser.error(f"--eval-policies {args.eval_policies}: {args.iterations} iteration(s) make "
                     f"policies 0..{args.iterations}")
    base = [*(SMOKE if args.smoke else []), *args.overrides]
    runs, evals = args.runs.resolve(), args.runs.resolve() / "test_evals"
    mcts = run_or_resume(runs / "mcts", ["experiment=demo_cpu", *base], args.iterations)
    calibration = star_samples(base, mcts, evals)
    star = run_or_resume(runs / "star", ["experiment=star_cpu", *base,
                                         f"search.simulations={calibration['samples']}"],
                         args.iterations)
    stores = {"mcts": mcts, "star": star}
    if not args.no_grpo:
        stores["grpo"] = run_or_resume(runs / "grpo", ["experiment=grpo_cpu", *base,
                                                       *grpo_budget(calibration)], args.iterations)
    elif (runs / "grpo" / "manifest.json").is_file():  # reported as far as it got, not extended
        stores["grpo"] = RunStore(runs / "grpo")
    loop = loop_arm(base, stores, args.iterations, evals)
    trained = range(len(loop["mcts"]["test_greedy"]))
    eval_policies = args.eval_policies or ([] if args.no_eval else list(trained))
    if any(k not in trained for k in eval_policies):
        parser.error(f"--eval-policies {eval_policies}: the MCTS loop has policies 0..{len(trained) - 1}")
    result = {
        "benchmark": "matched_budget", "split": "test", "smoke": args.smoke,
        "iterations": args.iterations, "runs": {k: str(v.root) for k, v in stores.items()},
        "star_calibration": star_used(calibration, star),
        "data_generation": _data_generation(loop),
        "evaluation": evaluation_arm(base, mcts, eval_policies, args.n, evals),
        "loop": loop,
        "wall": wall_arm(mcts, loop["mcts"]["test_greedy"], args.iterations),
    }
    write_json(args.output, result)
    for path in plot(result, args.output):
        print(f"wrote {path}")
    print(f"wrote {args.output}")
    return result


def evaluation_only(args, parser, note: dict) -> dict:
    """The evaluation arm for one run's policies, no loop run or extended: policies trained by
    any run (`qstar run experiment=demo_cpu ...`), graded on test as the full proof grades
    them (on dev with --split dev); its evaluations are cached under evals_dir (RUN/SPLIT_evals
    for the run's own task)."""
    run = args.eval_run.resolve()
    store, policies = RunStore(run), args.eval_policies or [0]
    trained = 1 + sum(store.done(i, "train") for i in range(max(policies)))
    if max(policies) >= trained:
        parser.error(f"--eval-policies {policies}: {run} has policies 0..{trained - 1}")
    base = [*(SMOKE if args.smoke else []), *args.overrides]
    out = evals_dir(run, args.split, args.overrides)
    rows = evaluation_arm(base, store, policies, args.n, out, args.split)
    result = {"benchmark": "matched_budget", "split": args.split, "smoke": args.smoke,
              "runs": {"mcts": str(run)}, "evals": str(out), "evaluation": rows, **note}
    output = (args.output if args.output != RESULTS / "matched_budget.json"
              else RESULTS / f"matched_budget_evaluation_{args.split}.json")
    write_json(output, result)
    print(f"wrote {output}")
    return result


def _data_generation(loop: dict) -> dict:
    """Iteration 0 of both loops: the same base policy on the same training problems."""
    mcts, sampling = loop["mcts"]["search"][0], loop["star"]["search"][0]
    ratio = mcts["verified_per_1k_tokens"] / max(sampling["verified_per_1k_tokens"], 1e-9)
    return {"policy": 0, "mcts": mcts, "sampling": sampling,
            "mcts_over_sampling": round(ratio, 3) if sampling["verified_per_1k_tokens"] else None}


if __name__ == "__main__":
    main()
