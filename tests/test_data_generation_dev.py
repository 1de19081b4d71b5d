"""benchmarks/data_generation_dev.py on the tiny model: every variant searched on dev problems
only, counted as the matched-budget proof counts, cached, and the sampling arm calibrated."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_benchmark

import pipeline.decoding.tree_search as ts
from pipeline.compose import compose_config
from pipeline.tasks import make_task


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("data_generation_dev")


def tiny_overrides(tiny_model_dir, tmp_path) -> list[str]:
    return [f"model={tiny_model_dir}", f"model.cache_dir={tmp_path / 'cache'}",
            "debug=default", "search.simulations=2"]


def spy_on_problems(bench, monkeypatch) -> list[list[str]]:
    """The problem ids of every search the benchmark runs, in order."""
    seen: list[list[str]] = []
    real = ts.train_search

    def spy(problems, *args, **kwargs):
        seen.append([p.id for p in problems])
        return real(problems, *args, **kwargs)

    monkeypatch.setattr(bench, "train_search", spy)
    return seen


def test_variants_search_dev_problems_and_resume(bench, tiny_model_dir, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_model_dir, tmp_path)
    seen = spy_on_problems(bench, monkeypatch)
    argv = ["--problems", "2", "--runs", str(tmp_path / "runs"),
            "--output", str(tmp_path / "out.json"),
            "--variant", "no_retries search.merge_retries=0", *overrides]
    result = bench.main(argv)
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(result))
    assert result["policy"] == str(tiny_model_dir)  # the overrides reach every search
    assert result["split"] == "dev" and set(result["variants"]) == {"default", "no_retries",
                                                                    "sampling"}
    dev = [p.id for p in make_task(compose_config(["experiment=demo_cpu", *overrides]).task)
           .split("dev")[:2]]
    # two variants, then sampling once per count on its curve; dev problems only, each time
    assert len(seen) == 2 + len(result["sampling_curve"]) and all(ids == dev for ids in seen)
    for v in result["variants"].values():
        assert v["problems"] == 2 and v["tokens"] > 0
        assert v["verified_per_1k_tokens"] == round(1000 * v["verified_solutions"] / v["tokens"], 3)
        assert v["verified_solutions"] >= v["verified_terminals"]
    assert result["variants"]["no_retries"]["overrides"] == ["search.merge_retries=0"]
    sampling = result["variants"]["sampling"]["overrides"]
    assert sampling == ["search.algorithm=sample", f"search.simulations={result['samples_per_problem']}"]
    # resumable: a second call searches nothing and reports the same numbers
    seen.clear()
    assert bench.main(argv) == result and seen == []
    # other problems (another task seed; more of them) are searched again, never read from the
    # cache of the first
    for again_argv in ([*argv, "task.seed=1"], ["--problems", "3", *argv[2:]]):
        seen.clear()
        again = bench.main(again_argv)
        assert seen and all(ids != dev for ids in seen)
        assert again["variants"]["default"]["config"]["problems"] != \
            result["variants"]["default"]["config"]["problems"]


def test_a_count_searched_with_another_config_is_searched_again(bench, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    overrides = tiny_overrides(tiny_model_dir, tmp_path)
    seen = []
    real = ts.train_search

    def spy(problems, task, prompts, cfg, *args, **kwargs):
        seen.append((cfg.search.algorithm.value, cfg.search.simulations))
        return real(problems, task, prompts, cfg, *args, **kwargs)

    monkeypatch.setattr(bench, "train_search", spy)
    argv = ["--problems", "2", "--runs", str(tmp_path / "runs"),
            "--output", str(tmp_path / "out.json"), *overrides]
    first = bench.main(argv)
    assert first["variants"]["default"]["config"]["search"]["rollout"]["temperature"] == 0.8
    assert "rollout" not in first["variants"]["sampling"]["config"]["search"]
    # a count made before a default changed (here: greedy rollouts) is stale, the sampler's is not
    cache = tmp_path / "runs" / "default.json"
    stale = json.loads(cache.read_text())
    stale["config"]["search"]["rollout"]["temperature"] = 0.0
    cache.write_text(json.dumps(stale))
    seen.clear()
    again = bench.main(argv)
    assert seen == [("mcts", 2)]  # the default alone, with today's config

    def counts(result):  # a search's seconds vary
        return {k: {f: x for f, x in v.items() if f != "seconds"} for k, v in result["variants"].items()}

    assert counts(again) == counts(first)
    # the sampler does not roll out: a rollout setting leaves its one-sample count cached
    seen.clear()
    shorter = bench.main([*argv, "search.rollout.max_new_tokens=5"])
    assert seen.count(("mcts", 2)) == len(bench.VARIANTS)  # every search variant, again
    samples = shorter["samples_per_problem"]  # follows the default's tokens, which changed
    resampled = {x[1] for x in seen if x[0] == "sample"}
    assert 1 not in resampled  # sampling_1 stays cached
    assert resampled == {int(k) for k in shorter["sampling_curve"]} - {
        int(k) for k in first["sampling_curve"]}  # each count searched once, where not cached
    assert samples in shorter["sampling_curve"]  # the rounded count is on the curve


def test_the_sampling_curve_brackets_the_search_and_is_read_between_points(bench, tiny_model_dir,
                                                                           tmp_path):
    """Sampling is searched at the whole counts on either side of the default's tokens, and the
    interpolated ratio is the search's solutions over the curve's, at the search's tokens."""
    overrides = tiny_overrides(tiny_model_dir, tmp_path)
    result = bench.main(["--problems", "2", "--runs", str(tmp_path / "runs"), "--output",
                         str(tmp_path / "out.json"), "--variant", "default", *overrides])
    curve = {int(k): v for k, v in result["sampling_curve"].items()}
    one = curve[1]["tokens"] / 2
    exact = result["variants"]["default"]["tokens"] / 2 / one
    assert set(curve) == {1, max(1, math.floor(exact)), max(1, math.ceil(exact)),
                          result["samples_per_problem"]}
    for k, point in curve.items():
        cached = json.loads((tmp_path / "runs" / f"sampling_{k}.json").read_text())
        assert point == {f: cached[f] for f in ("tokens", "verified_solutions", "solved")}
    for count in ("verified_solutions", "solved"):  # sampling is a point of its own curve
        ratio = result[f"{count}_over_sampling_interpolated"]["sampling"]
        assert ratio == (1.0 if result["variants"]["sampling"][count] else None)


def test_interpolation_reads_the_curve_between_its_nearest_points(bench):
    curve = [{"tokens": t, "verified_solutions": v, "solved": v} for t, v in
             [(300, 4), (100, 2), (500, 5)]]  # in any order

    def over(tokens, found, points=curve):
        return bench.over_interpolated({"tokens": tokens, "verified_solutions": found}, points,
                                       "verified_solutions")

    # at 200 tokens sampling would find 3: a search with 6 finds twice as many
    assert over(200, 6) == 2.0 and over(400, 9) == 2.0 and over(300, 4) == 1.0
    assert over(600, 9) is None and over(50, 1) is None  # outside the curve
    assert over(200, 1, [{"tokens": 100, "verified_solutions": 0},
                         {"tokens": 300, "verified_solutions": 0}]) is None  # sampling found none
    solved = bench.over_interpolated({"tokens": 200, "solved": 3}, curve, "solved")
    assert solved == 1.0


def test_split_train_searches_the_training_problems(bench, tiny_model_dir, tmp_path, monkeypatch):
    """--split train: the proof's arm (a) alone, on the training problems the loops search."""
    overrides = tiny_overrides(tiny_model_dir, tmp_path)
    seen = spy_on_problems(bench, monkeypatch)
    result = bench.main(["--problems", "2", "--split", "train", "--variant", "default",
                         "--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out.json"),
                         *overrides])
    task = make_task(compose_config(["experiment=demo_cpu", *overrides]).task)
    train = [p.id for p in task.split("train")[:2]]
    assert result["split"] == "train" and set(result["variants"]) == {"default", "sampling"}
    assert seen and all(ids == train for ids in seen)
    assert not set(train) & {p.id for p in task.split("dev")}


def test_a_tree_search_key_leaves_the_samplers_cached_count_valid(bench):
    sampler = ["search.algorithm=sample", "search.simulations=8"]
    key = bench.search_key(compose_config(["experiment=demo_cpu", *sampler]), "abc")
    for change in ("search.evaluate_root=false", "search.rollout.max_new_tokens=8",
                   "search.leaves_per_tree=4", "search.c_max=5"):
        assert bench.search_key(compose_config(["experiment=demo_cpu", *sampler, change]), "abc") == key
    for change in ("search.temperature=0.5", "search.check_equations=false", "search.seed=3",
                   "search.check_answers=true",
                   "decode.max_new_tokens=40", "search.simulations=9"):
        assert bench.search_key(compose_config(["experiment=demo_cpu", *sampler, change]), "abc") != key
    assert bench.search_key(compose_config(["experiment=demo_cpu", *sampler]), "abd") != key
    # the verifier is the task's: the same problems checked another way are another count
    assert bench.search_key(compose_config(["experiment=demo_cpu", *sampler,
                                            "task.verify_steps=false"]), "abc") != key
    mcts = bench.search_key(compose_config(["experiment=demo_cpu"]), "abc")
    assert mcts != bench.search_key(compose_config(["experiment=demo_cpu", "search.c_max=5"]), "abc")


def test_more_problems_asked_than_the_split_holds_calibrates_on_those_searched(bench, tiny_model_dir,
                                                                             tmp_path):
    """--problems larger than the split: every count, and the sampling arm's samples per
    problem, are over the problems actually searched (the split's), not the number asked."""
    overrides = tiny_overrides(tiny_model_dir, tmp_path)
    held = len(make_task(compose_config(["experiment=demo_cpu", *overrides, "task.num_dev=3"])
                         .task).split("dev"))
    result = bench.main(["--problems", "1000", "--runs", str(tmp_path / "runs"), "--output",
                         str(tmp_path / "out.json"), "--variant", "default", *overrides,
                         "task.num_dev=3"])
    assert held == 3 and result["problems"] == 3
    default = result["variants"]["default"]
    one = json.loads((tmp_path / "runs" / "sampling_1.json").read_text())
    per_sample = max(one["tokens"] / one["problems"], 1.0)
    assert one["problems"] == 3
    assert result["samples_per_problem"] == max(1, round(default["tokens"] / 3 / per_sample))
