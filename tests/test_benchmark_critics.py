"""benchmarks/critics.py --smoke on the tiny model: the run, the metrics it collects, the search
speed ratio, and a rerun that resumes instead of redoing anything."""

import json

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("critics")


def test_smoke_writes_every_measure_and_resumes(bench, tiny_model_dir, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    args = ["--smoke", "--runs", str(runs), f"model={tiny_model_dir}",
            f"model.cache_dir={tmp_path / 'cache'}"]
    published = bench.RESULTS / "critics.json"
    before = published.stat().st_mtime_ns if published.is_file() else None
    result = bench.main(args)
    assert json.loads((runs / "critics.json").read_text()) == json.loads(json.dumps(result))
    assert (published.stat().st_mtime_ns if published.is_file() else None) == before  # untouched
    assert set(result["within_problem_auc_trees"]) == {"value", "prm", "orm", "implicit"}
    assert all(len(v) == 1 for v in result["within_problem_auc_trees"].values())
    # the smoke run trains nothing (no pairs): the refit fitted the heads on policy_0,
    # which has no DPO reference
    assert result["within_problem_auc_trees"]["implicit"] == [None]
    on_test = result["within_problem_auc"]
    assert set(on_test) == {"value", "prm", "orm", "implicit", "mean_logprob", "vote_share",
                            "step_check", "checked_vote"}
    assert on_test["implicit"] == [None] and all(len(v) == 1 for v in on_test.values())
    [row] = result["best_of_n_on_test"]
    assert row["policy"] == 1 and row["n"] == 2 and row["problems"] == 4 and row["split"] == "test"
    assert row["majority"] is not None and row["orm"] is not None and row["orm_vote"] is not None
    graded = json.loads((runs / "bench_test_evals" / "p1_best_of_2_test.json").read_text())
    assert graded["summary"]["accuracy_by_select"]["orm"] == row["orm"]
    # every other selection against majority, problem by problem, from the same rows
    versus = row["paired_with_majority"]
    assert set(versus) == set(graded["summary"]["accuracy_by_select"]) - {"majority"}
    for rule, comparison in versus.items():
        assert comparison["problems"] == 4
        assert comparison["difference"] == pytest.approx(row[rule] - row["majority"], abs=1e-4)
    assert on_test["vote_share"] == [vote_share_auc(graded["rows"], runs)]
    search = result["search"]
    with_, backbone, without = (search["with_critics"], search["with_critics_backbone"],
                                search["without_critics"])
    assert with_["tokens"] > 0 and without["tokens"] > 0 and backbone["tokens"] > 0
    assert result["search_tok_s_ratio_with_critics"] == pytest.approx(
        with_["tokens_per_s"] / without["tokens_per_s"], abs=1e-3)
    assert search["search_tok_s_ratio_with_critics_backbone"] == pytest.approx(
        backbone["tokens_per_s"] / without["tokens_per_s"], abs=1e-3)
    # which pass scored the leaves: none without critics, each mode its own with them
    assert without["leaves_scored"] == {"generation": 0, "backbone": 0}
    assert backbone["leaves_scored"]["generation"] == 0 < backbone["leaves_scored"]["backbone"]
    assert with_["leaves_scored"]["backbone"] == 0 < with_["leaves_scored"]["generation"]

    # a rerun resumes: the run is complete and both search halves are kept
    def no_search(*a, **k):
        raise AssertionError("a finished half was searched again")

    import pipeline.decoding.tree_search as ts

    monkeypatch.setattr(ts, "train_search", no_search)
    elsewhere = tmp_path / "elsewhere.json"  # --output: the path given, whatever the mode
    again = bench.main([*args, "--output", str(elsewhere)])
    assert again["search"] == search
    assert json.loads(elsewhere.read_text()) == json.loads(json.dumps(again))


def test_within_problem_auc_on_test_samples_with_right_and_wrong_answers(bench, tiny_model_dir,
                                                                           tmp_path):
    """The tiny policy answers no test problem, so the smoke run has nothing to rank: here its
    samples are replaced by known right and wrong answers (gold, gold, a wrong one; a lone wrong
    one), and every score's within-problem AUC must be computed, the vote share's as by hand."""
    from pipeline.compose import load_run_config
    from pipeline.run.store import RunStore
    from pipeline.tasks import make_task

    runs = tmp_path / "runs"
    bench.main(["--smoke", "--runs", str(runs), f"model={tiny_model_dir}",
                f"model.cache_dir={tmp_path / 'cache'}"])
    out = runs / "bench_test_evals"
    cfg = load_run_config(runs, [])
    task = make_task(cfg.task)
    rows = [{"id": p.id, "candidates": [f"Answer: {p.answer}", f"Answer: {p.answer}",
                                        f"1 + 1 = 3\nAnswer: {p.answer}1", f"Answer: {p.answer}2"]}
            for p in task.split("test")]
    assert all(task.is_correct(p, f"Answer: {p.answer}") for p in task.split("test"))
    (out / "p1_best_of_2_test.json").write_text(json.dumps({"rows": rows}))
    (out / "p1_within_problem_test.json").unlink()
    found = bench.on_test_samples(RunStore(runs), cfg, 1, 2, out)
    # right answers hold 2 of 4 votes, each wrong one 1: vote share ranks them perfectly
    assert found["vote_share"] == [1.0] == [vote_share_auc(rows, runs)]
    # the step check passes both right samples (1) and flags one wrong one (0; the other 1):
    # of the four right-wrong pairs two are ranked right and two tied, (2 + 2 * 0.5) / 4
    assert found["step_check"] == [0.75]
    # checked majority's score: the two passing answers' share among the three samples passed
    # (right 2/3, wrong 1/3) on top of the check, the flagged one 0: every pair ranked right
    assert found["checked_vote"] == [1.0]
    for kind in ("value", "prm", "orm", "mean_logprob"):
        assert 0.0 <= found[kind][0] <= 1.0
    assert found["implicit"] == [None]  # no implicit rewards recorded: the policy has no reference


def vote_share_auc(rows, runs):
    """By hand: per problem with right and wrong samples, P(a right sample's answer has more
    votes than a wrong one's), ties one half; the mean over those problems (None: none)."""
    from pipeline.compose import load_run_config
    from pipeline.tasks import make_task

    task = make_task(load_run_config(runs, []).task)
    problems = {p.id: p for p in task.split("test")}
    found = []
    for row in rows:
        answers = [task.extract_answer(c) for c in row["candidates"]]
        right = [task.is_correct(problems[row["id"]], c) for c in row["candidates"]]
        votes = [answers.count(a) if a is not None else 0 for a in answers]
        pos = [v for v, r in zip(votes, right) if r]
        neg = [v for v, r in zip(votes, right) if not r]
        if pos and neg:
            found.append(sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg)))
    return sum(found) / len(found) if found else None


@pytest.mark.parametrize("flag", ["--n", "--search-problems", "--iterations"])
def test_a_count_below_one_is_one_line_before_any_run(bench, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--runs", str(tmp_path / "runs"), flag, "0"])
    assert exit_.value.code == 2 and f"{flag} 0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
