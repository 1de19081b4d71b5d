"""The critic studies on a 1-iteration tiny run: benchmarks/state_features.py (K folds over the
training problems, each held out once, per feature set) and
benchmarks/critic_features.py (the shared-prompt features against one pass per text)."""

import json

import pytest
from conftest import load_benchmark

from critics.critic_set import FeatureSet
from pipeline.compose import compose_config
from pipeline.loop import run_loop


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("studies")
    run_loop(compose_config(["debug=default", f"model={tiny_model_dir}",
                             f"model.cache_dir={root / 'cache'}", "search.trees_per_batch=2"]),
             root / "run")
    return root / "run"


def test_folds_are_disjoint_and_cover_every_problem():
    bench = load_benchmark("state_features")
    ids = [f"p{i}" for i in range(11)] + ["p3"]  # a repeated id is one problem
    folds = bench.folds_of(ids, 4, seed=0)
    assert len(folds) == 4 and set().union(*folds) == set(ids)
    assert sum(len(f) for f in folds) == 11 and all(len(f) in (2, 3) for f in folds)
    assert folds == bench.folds_of(list(reversed(ids)), 4, seed=0)  # seeded, not order-bound
    assert folds != bench.folds_of(ids, 4, seed=1)


def test_every_feature_set_is_judged_on_states_and_completions(tiny_run, tmp_path):
    bench = load_benchmark("state_features")
    out = tmp_path / "state_features.json"
    result = bench.main(["--run", str(tiny_run), "--iterations", "0", "--folds", "2",
                         "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    found = result["iterations"]["0"]
    trained = tiny_run / "iter_000" / "train" / "policy"
    assert (trained / "meta.json").is_file() and found["backbone"] == str(trained)  # as refit reads
    assert found["states"] > 0 and found["completions"] > 0
    for features in FeatureSet:
        for kind in ("value", "prm"):
            for judged in ("state", "completion"):
                r = found[features.value][kind][judged]
                assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
                assert set(r) == {"auc", "within_auc", "within_problems"}


def test_shared_prompt_and_tree_features_equal_one_pass_each_on_a_run(tiny_run, tmp_path):
    from critics import shared_prompt

    bench = load_benchmark("critic_features")
    out = tmp_path / "critic_features.json"
    result = bench.main(["--run", str(tiny_run), "--problems", "2", "--output", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["prompts"] == 2 and result["texts"] > result["prompts"]
    tokens = result["tokens"]
    assert tokens["shared_prefix"] < tokens["shared_tree"] < tokens["shared_prompt"] < tokens["one_pass_each"]
    for side in ("shared_prompt", "shared_tree", "shared_prefix"):
        assert max(result["max_abs_diff"][side].values()) < 1e-3
    forced = result["teacher_forced"]
    sides = {"one_pass_each", "shared_prompt", "shared_tree", "shared_prefix"}
    assert forced["max_abs_diff"] < 1e-3 and set(forced["seconds"]) == sides
    assert shared_prompt.TREE_TOKENS == result["tree_tokens"] > 0  # the other sides restored it
    assert shared_prompt.MIN_SHARED < 10**9
