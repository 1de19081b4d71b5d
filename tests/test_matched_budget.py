"""benchmarks/matched_budget.py --smoke end to end on the tiny model: every arm is written,
graded on the test split, and a second call reuses what is on disk."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from conftest import load_benchmark

from pipeline.compose import compose_config
from pipeline.config import BestPath, TrainMode
from pipeline.lm.models import load_model
from pipeline.lm.teacher_forced import completion_logprobs
from pipeline.loop import run_loop
from pipeline.run.atomic import write_jsonl
from pipeline.run.store import RunStore, load_shards
from pipeline.stages.train import train_policy
from pipeline.tasks import make_task


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("matched_budget")


def test_eval_run_grades_the_evaluation_arm_alone_and_reuses_it(bench, tiny_model_dir, tmp_path,
                                                               capsys):
    """--eval-run: no loop runs; a run not on disk has the base policy only, graded on test."""
    overrides = [f"model={tiny_model_dir}", f"model.cache_dir={tmp_path / 'cache'}"]
    run, output = tmp_path / "run", tmp_path / "out" / "evaluation.json"
    argv = ["--smoke", "--eval-run", str(run), "--output", str(output), *overrides]
    result = bench.main(argv)
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert result["split"] == "test" and set(result) >= {"evaluation", "runs"}
    assert "loop" not in result and not (run / "manifest.json").exists()
    (row,) = result["evaluation"]
    assert row["policy"] == 0 and row["critics"] is None
    assert row["mcts"]["token_budget"] == max(1, round(row["best_of_n_majority"]["tokens_per_problem"]))
    # MCTS against the same samples' majority over those the step check passes (the default)
    checked = row["paired_with_checked_majority"]
    assert checked["problems"] == row["paired"]["problems"] == 2
    by_select = row["best_of_n_majority"]["accuracy_by_select"]
    assert checked["difference"] == pytest.approx(
        row["mcts"]["accuracy"] - by_select["checked_majority"])
    cached = sorted((run / "test_evals").glob("p0_*.json"))
    assert len(cached) == 3
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert bench.main(argv) == result
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # graded once
    # graded with another search config: MCTS is graded again, greedy and best-of-N are not
    bench.main([*argv, "search.best_path=visits"])
    again = {p.name: p.stat().st_mtime_ns != t for p, t in zip(cached, stamps)}
    assert again == {p.name: "mcts" in p.name for p in cached}
    # a key the eval never reads (train.*, as a key added since) does not send it back to grading
    greedy = run / "test_evals" / "p0_greedy.json"
    saved = json.loads(greedy.read_text())
    saved["config"]["train"]["a_key_added_later"] = 1
    greedy.write_text(json.dumps(saved))
    stamp = greedy.stat().st_mtime_ns
    bench.main(argv)
    assert greedy.stat().st_mtime_ns == stamp
    # a grade that records no config (written by hand, or by an older qstar) is graded again
    stripped = {k: v for k, v in json.loads(greedy.read_text()).items() if k != "config"}
    greedy.write_text(json.dumps(stripped))
    bench.main(argv)
    assert "config" in json.loads(greedy.read_text())
    with pytest.raises(SystemExit) as exit_info:  # no policy 1 without a trained iteration
        bench.main([*argv, "--eval-policies", "0", "1", "--"])
    assert exit_info.value.code == 2

    # --split dev: the same arm on dev problems, cached apart from the test grades
    dev = bench.main([*argv[:-len(overrides)], "--split", "dev", *overrides])
    assert dev["split"] == "dev" and len(sorted((run / "dev_evals").glob("p0_*.json"))) == 3
    dev_ids = {p.id for p in make_task(compose_config([*bench.SMOKE, *overrides]).task).split("dev")}
    for path in (run / "dev_evals").glob("p0_*.json"):
        assert {r["id"] for r in json.loads(path.read_text())["rows"]} == dev_ids
    with pytest.raises(SystemExit) as exit_info:  # the proof itself is graded on test only
        bench.main(["--smoke", "--split", "dev", *overrides])
    assert exit_info.value.code == 2

    # --pool: the test and dev arms are disjoint problem sets, pooled problem by problem
    arms = []
    for name, arm in (("test", result), ("dev", dev)):
        arms.append(tmp_path / f"{name}.json")
        arms[-1].write_text(json.dumps(arm))
    pooled = bench.main(["--pool", *map(str, arms), "--output", str(tmp_path / "pooled.json")])
    (row,) = pooled["evaluation"]
    assert row["policy"] == 0 and row["sets"] == 2 and row["paired"]["problems"] == 4
    for key in ("mcts_only", "best_of_n_only"):
        assert row["paired"][key] == result["evaluation"][0]["paired"][key] + dev["evaluation"][0]["paired"][key]
    assert row["mcts_accuracy"] == (result["evaluation"][0]["mcts"]["accuracy"]
                                    + dev["evaluation"][0]["mcts"]["accuracy"]) / 2
    # beside it, the checked majority and every select rule of the samples, pooled the same way
    both = [arm["evaluation"][0] for arm in (result, dev)]
    assert row["paired_with_checked_majority"]["mcts_only"] == sum(
        r["paired_with_checked_majority"]["mcts_only"] for r in both)
    by_select = row["best_of_n_by_select"]
    assert "majority" not in by_select and "checked_majority" in by_select
    assert by_select["checked_majority"]["accuracy"] == sum(
        r["best_of_n_majority"]["accuracy_by_select"]["checked_majority"] for r in both) / 2
    assert by_select["checked_majority"]["paired_with_majority"]["problems"] == 4
    # and how well each selection's score ranks one problem's samples, over both sets (the
    # values by hand: tests/test_sample_scores.py); policy 0 has no DPO reference, so no implicit
    aucs = row["within_problem_auc_best_of_n"]
    assert set(aucs) == {"problems", "implicit", "vote_share", "step_check", "checked_vote"}
    assert aucs["problems"] == 4 and aucs["implicit"] is None
    assert 0 <= aucs["vote_share"]["problems_with_both"] <= 4

    # another task's held-out set (task.seed=1) is cached apart: seed 0's grades stay as they were
    stamps = {p: p.stat().st_mtime_ns for p in (run / "test_evals").glob("p0_*.json")}
    seeded = bench.main([*argv, "task.seed=1"])
    assert seeded["evals"] == str(run / "test_evals_task.seed-1") != result["evals"]
    assert {p: p.stat().st_mtime_ns for p in (run / "test_evals").glob("p0_*.json")} == stamps
    (seeded_bon,) = (run / "test_evals_task.seed-1").glob("p0_best_of_*.json")
    assert all("/seed1/" in r["id"] for r in json.loads(seeded_bon.read_text())["rows"])
    (arms[1]).write_text(json.dumps(seeded))  # two test sets, read from their own folders
    rule = tmp_path / "rule.md"
    rule.write_text("Written before the grades: the pooled figure decides.\n")
    pooled = bench.main(["--pool", *map(str, arms), "--output", str(tmp_path / "pooled.json"),
                         "--note-file", str(rule)])
    assert pooled["evaluation"][0]["paired"]["problems"] == 4
    assert pooled["note"] == rule.read_text() and pooled["arms"] == [str(a) for a in arms]
    assert json.loads((tmp_path / "pooled.json").read_text())["note"] == rule.read_text()
    # two runs' policy 0 on the same problems (two loops, say two seeds) are two pairs each, and
    # each problem's samples are ranked within their own run
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    (tmp_path / "twin.json").write_text(json.dumps(
        {**result, "runs": {"mcts": str(twin)}, "evals": str(twin / "test_evals")}))
    both = bench.main(["--pool", str(arms[0]), str(tmp_path / "twin.json"),
                       "--output", str(tmp_path / "twins.json")])
    (row,) = both["evaluation"]
    one = result["evaluation"][0]
    assert row["runs"] == 2 and row["sets"] == 2 and row["paired"]["problems"] == 4
    assert [row["paired"][k] for k in ("mcts_only", "best_of_n_only")] == [
        2 * one["paired"][k] for k in ("mcts_only", "best_of_n_only")]
    assert row["within_problem_auc_best_of_n"]["problems"] == 4

    def refused(argv: list[str]) -> str:  # one line from argparse, exit code 2
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        return line

    out = ["--output", str(tmp_path / "x.json")]
    # one set twice is not two sets
    assert "policy 0's held-out sets share problems" in refused(["--pool", *map(str, [arms[0]] * 2), *out])
    assert "--pool needs --output" in refused(["--pool", str(arms[0])])  # never the proof's JSON
    assert f"--note-file {tmp_path / 'no.md'}: FileNotFoundError" in refused(
        ["--pool", str(arms[0]), *out, "--note-file", str(tmp_path / "no.md")])
    assert "--note-file goes with --pool or --eval-run" in refused(["--note-file", str(rule), *out])
    for bad in (tmp_path / "missing.json", tmp_path / "pooled.json"):  # no file; not an arm
        assert f"--pool {bad}: not an --eval-run output" in refused(["--pool", str(bad), *out])
    (graded,) = (run / "test_evals").glob("p0_best_of_*.json")
    graded.rename(graded.with_name("moved.json"))  # the run lost a grade the arm names
    assert "no longer holds its grades" in refused(["--pool", str(arms[0]), *out])
    assert not (tmp_path / "x.json").exists()


def test_smoke_writes_every_arm_on_test_and_resumes(bench, tiny_model_dir, tmp_path):
    overrides = [f"model={tiny_model_dir}", f"model.cache_dir={tmp_path / 'cache'}"]
    output = tmp_path / "out" / "matched_budget.json"
    argv = ["--smoke", "--runs", str(tmp_path / "runs"), "--output", str(output), *overrides]
    result = bench.main(argv)
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert result["split"] == "test" and result["smoke"] is True
    assert {"data_generation", "evaluation", "loop", "wall"} <= set(result)
    for png in ("data", "eval", "loop"):
        assert (output.parent / f"matched_budget_{png}.png").stat().st_size > 0

    # graded on the test split only: every evaluated row is a test problem
    task = make_task(compose_config([*bench.SMOKE, *overrides]).task)
    test_ids = {p.id for p in task.split("test")}
    evals = sorted((tmp_path / "runs" / "test_evals").glob("p*.json"))
    assert evals
    for path in evals:
        rows = json.loads(path.read_text())["rows"]
        assert {r["id"] for r in rows} == test_ids

    data = result["data_generation"]
    for arm in ("mcts", "sampling"):
        d = data[arm]
        assert d["problems"] == 2 and 0 <= d["solved"] <= 2 and d["tokens"] > 0
        assert d["verified_per_1k_tokens"] == round(1000 * d["verified_solutions"] / d["tokens"], 3)
        # verified rollouts add solutions; terminal nodes alone are a lower bound
        assert d["verified_solutions"] >= d["verified_terminals"]
        assert d["solved"] >= d["solved_by_terminal"]
    assert [r["policy"] for r in result["evaluation"]] == [0, 1]
    for row in result["evaluation"]:
        assert row["best_of_n_majority"]["n"] == 2
        assert row["mcts"]["token_budget"] == max(1, round(row["best_of_n_majority"]
                                                           ["tokens_per_problem"]))
        assert row["matched"] == (abs(row["mcts_over_best_of_n_tokens"] - 1) <= 0.1)
        by_path, by_select = row["mcts"]["accuracy_by_best_path"], row["best_of_n_majority"]["accuracy_by_select"]
        assert set(by_path) == {rule.value for rule in BestPath} and by_select["majority"] == row["best_of_n_majority"]["accuracy"]
        assert by_path[bench.compose_config(bench.SMOKE).search.best_path.value] == row["mcts"]["accuracy"]
        pair, rows = row["paired"], {}
        for name, path in (("mcts", f"p{row['policy']}_mcts_budget{row['mcts']['token_budget']}"),
                           ("bon", f"p{row['policy']}_best_of_2")):
            graded = json.loads((tmp_path / "runs" / "test_evals" / f"{path}.json").read_text())
            rows[name] = {r["id"]: r["correct"] for r in graded["rows"]}
        assert pair["problems"] == 2 and pair["mcts_only"] == sum(
            rows["mcts"][k] and not rows["bon"][k] for k in test_ids)
        assert pair["best_of_n_only"] == sum(rows["bon"][k] and not rows["mcts"][k] for k in test_ids)
        assert pair["difference"] == pytest.approx(row["mcts_minus_best_of_n"], abs=1e-3)
        # every best_path rule of the same trees against majority: the chosen rule's comparison
        # is `paired`, and each difference is that rule's accuracy minus majority's
        by_rule = row["paired_by_best_path"]
        assert set(by_rule) == set(by_path)
        assert by_rule[bench.compose_config(bench.SMOKE).search.best_path.value] == {
            **{k: v for k, v in pair.items() if k != "mcts_only"},
            f"{bench.compose_config(bench.SMOKE).search.best_path.value}_only": pair["mcts_only"]}
        for rule, comparison in by_rule.items():
            assert comparison["difference"] == pytest.approx(
                by_path[rule] - row["best_of_n_majority"]["accuracy"], abs=1e-3)
    loop = result["loop"]
    assert len(loop["mcts"]["test_greedy"]) == len(loop["star"]["test_greedy"]) == 2
    assert len(loop["grpo"]["test_greedy"]) == 2
    assert loop["mcts"]["test_greedy"][0] == loop["star"]["test_greedy"][0]  # the same base
    (star_pair,) = loop["mcts_vs_star_paired"]  # policy 1 of each loop, problem by problem
    assert star_pair["problems"] == 2
    assert star_pair["difference"] == pytest.approx(loop["mcts_minus_star"][0], abs=1e-3)
    assert loop["grpo"]["test_greedy"][0] == loop["mcts"]["test_greedy"][0]
    grpo = loop["grpo"]["search"][0]  # GRPO samples the MCTS loop's iteration-0 search tokens
    assert grpo["token_budget"] == result["star_calibration"]["mcts_search_tokens"] > 0
    assert grpo["tokens"] >= grpo["token_budget"] or grpo["steps"] == bench.GRPO_EPOCHS  # 1 step/epoch
    calibration = result["star_calibration"]
    assert calibration["samples"] >= 1 and calibration["samples_used"] == calibration["samples"]
    star_tokens = RunStore(result["runs"]["star"]).metrics(0, "search")["tokens"]
    # the count comes from the STaR loop's own sampler, probed until its tokens cross the MCTS
    # loop's (the step check stops a sample at a flagged line there; a decode=sample eval does not)
    probed = {int(k): v for k, v in calibration["star_tokens_by_samples"].items()}
    target = calibration["mcts_search_tokens"]
    assert calibration["samples"] == min(probed, key=lambda k: (abs(probed[k] - target), k))
    assert (min(probed.values()) < target <= max(probed.values())) or probed.get(1, 0) >= target
    assert star_tokens == probed[calibration["samples"]]  # the loop's iteration 0 is that probe
    assert calibration["sample_tokens"] == round(probed[1] / len(task.split("train")), 1)
    assert calibration["star_search_tokens"] == star_tokens
    assert calibration["star_over_mcts_tokens"] == round(
        star_tokens / calibration["mcts_search_tokens"], 3)
    assert [r["iteration"] for r in result["wall"]["per_iteration"]] == [0]

    # resumable: a second call recomputes nothing and reports the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in evals}
    assert bench.main(argv) == result
    assert {p: p.stat().st_mtime_ns for p in evals} == stamps

    # --eval-policies: the evaluation arm grades only the policies named, from what is on disk
    only = bench.main([*argv, "--eval-policies", "1"])
    assert [r["policy"] for r in only["evaluation"]] == [1]
    assert only["evaluation"][0] == result["evaluation"][1] and only["loop"] == result["loop"]
    assert {p: p.stat().st_mtime_ns for p in evals} == stamps
    # --no-grpo: the GRPO run on disk is reported as far as it got, and not extended
    assert bench.main([*argv, "--no-grpo"]) == result
    assert {p: p.stat().st_mtime_ns for p in evals} == stamps
    with pytest.raises(SystemExit):  # one line from argparse, exit code 2
        bench.main([*argv, "--eval-policies", "5"])
    # --no-eval: the loops alone (a seed replicate), its figures named after its own JSON
    figures = {p: p.stat().st_mtime_ns for p in output.parent.glob("matched_budget_*.png")}
    replicate = output.with_name("replicate.json")
    loops = bench.main([*argv, "--no-eval", "--output", str(replicate)])
    assert loops["evaluation"] == [] and loops["loop"] == result["loop"]
    assert loops["wall"] == result["wall"] and json.loads(replicate.read_text())["evaluation"] == []
    assert sorted(p.name for p in output.parent.glob("replicate_*.png")) == [
        "replicate_data.png", "replicate_loop.png"]
    assert {p: p.stat().st_mtime_ns for p in output.parent.glob("matched_budget_*.png")} == figures
    with pytest.raises(SystemExit):
        bench.main([*argv, "--no-eval", "--eval-policies", "1"])


def test_wall_computes_dpo_metrics_over_all_pairs_for_runs_trained_before(bench, tiny_model_dir,
                                                                          tmp_path):
    """A run whose train stage predates dpo/after/*: the wall computes them from the policy, its
    recorded reference and its pairs, equal to what the train stage records now, and keeps them."""
    overrides = ["debug=default", f"model={tiny_model_dir}", f"model.cache_dir={tmp_path / 'c'}"]
    cfg = compose_config(overrides)
    store = run_loop(cfg, tmp_path / "run")
    data = store.stage_dir(0, "data")  # the tiny model solves nothing: pairs by hand
    prompts = [json.loads(line)["prompt"] for line in
               sorted(store.stage_dir(0, "search").glob("shard_*.jsonl"))[0].read_text().splitlines()]
    write_jsonl(data / "dpo.jsonl", [{"prompt": p, "chosen": f"1 + {k} = {1 + k}\nAnswer: {1 + k}",
                                      "rejected": "Answer: 0", "lineage": {"terminal": [True, True]}}
                                     for k, p in enumerate(prompts)])
    train_cfg = replace(cfg.train, mode=TrainMode.dpo, learning_rate=1e-3)
    recorded = train_policy(str(tiny_model_dir), data, train_cfg, store.stage_dir(0, "train"),
                            model_cfg=cfg.model)
    after = {k: v for k, v in recorded.items() if k.startswith("dpo/after/")}
    assert len(after) == 6 and recorded["dpo/after/rewards/margins"] != 0
    older = {k: v for k, v in recorded.items() if k not in after}
    again = bench.dpo_after(store, 0, older)
    assert {k: again[k] for k in after} == pytest.approx(after, abs=1e-4)
    assert again["dpo/logps/chosen_change"] == pytest.approx(recorded["dpo/logps/chosen_change"],
                                                             abs=1e-3)
    kept = store.root / "bench_dpo_after" / "iter_000.json"
    assert json.loads(kept.read_text()) == again
    assert bench.dpo_after(store, 0, recorded) is recorded  # recorded: nothing computed
    # the wall of such a run: the reference's mean chosen log-prob is the base model's, by hand
    store.complete(0, "train", older, 1.0)
    wall = bench.wall_arm(store, [0.0, 0.0], 1)["per_iteration"][0]
    assert wall["dpo_margin"] == again["dpo/after/rewards/margins"]
    model, tokenizer = load_model(cfg.model)
    chosen = [json.loads(line) for line in (data / "dpo.jsonl").read_text().splitlines()]
    logps = completion_logprobs(model, tokenizer, [r["prompt"] for r in chosen],
                                [r["chosen"] + tokenizer.eos_token for r in chosen])
    by_hand = sum(map(sum, logps)) / len(logps)
    assert wall["dpo_chosen_logp_reference"] == pytest.approx(by_hand, abs=1e-2)
    # what the search had to pair, from its shards: merges as recorded, log-prob per token by hand
    assert wall["search_merges"] == store.metrics(0, "search")["merges"]
    options = [n for row in load_shards(store.stage_dir(0, "search"))
               for n in row["tree"]["nodes"] if n["num_tokens"]]
    assert wall["option_logp_per_token"] == pytest.approx(
        sum(n["logprob"] for n in options) / sum(n["num_tokens"] for n in options), abs=1e-4)
    assert wall["contrast_problems"] == 0  # the tiny model solves nothing
