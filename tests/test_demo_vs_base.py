"""benchmarks/demo_vs_base.py's parts: the old tree, the accuracies it reads, resuming a side."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import load_benchmark

from pipeline.run.store import RunStore

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("demo_vs_base")


def _has_history() -> bool:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _has_history(), reason="not a git checkout")
def test_extract_gives_the_commits_tree_and_refuses_an_unknown_one(bench, tmp_path):
    tree = bench.extract("HEAD", tmp_path)
    committed = subprocess.run(["git", "show", "HEAD:pipeline/cli.py"], cwd=ROOT, text=True,
                               capture_output=True, check=True).stdout
    assert (tree / "pipeline" / "cli.py").read_text() == committed
    with pytest.raises(SystemExit, match="error: --base no-such-commit"):
        bench.extract("no-such-commit", tmp_path / "other")


def test_accuracies_are_greedy_per_policy_from_baseline_and_eval(bench, tmp_path):
    store = RunStore(tmp_path / "run")
    store.complete(0, "baseline", {"decodes": {"greedy": {"accuracy": 0.25}}}, 1.0)
    store.complete(0, "search", {"tokens": 10}, 1.0)
    store.complete(0, "eval", {"decodes": {"greedy": {"accuracy": 0.3}}}, 1.0)
    store.complete(1, "eval", {"decodes": {"greedy": {"accuracy": 0.35},
                                           "best_of_n": {"accuracy": 0.5}}}, 1.0)
    assert bench.accuracies(store.root) == {"policy_0": 0.25, "policy_1": 0.3, "policy_2": 0.35}


def test_a_finished_side_is_read_and_an_unfinished_one_refused(bench, tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"seconds": 12.0, "peak_rss_mb": 900}))
    assert bench.run_side("demo", ROOT, tmp_path / "demo", []) == {"seconds": 12.0,
                                                                   "peak_rss_mb": 900}
    store = RunStore(tmp_path / "demo")  # its run: per-stage peaks above the process's last one
    store.complete(0, "baseline", {}, 3.0, peak_rss_mb=1200.4)
    store.complete(0, "train", {}, 9.0, peak_rss_mb=3251.1)
    store.complete(0, "eval", {}, 2.0, peak_rss_mb=None)  # a stage without a reading
    found = bench.run_side("demo", ROOT, tmp_path / "demo", [])
    assert found["peak_rss_mb"] == 3251 and found["seconds"] == 12.0
    assert found["stages"]["iter_000/train"] == {"seconds": 9.0, "peak_rss_mb": 3251.1}
    assert list(found["stages"]) == ["iter_000/baseline", "iter_000/eval", "iter_000/train"]
    (tmp_path / "base").mkdir()
    with pytest.raises(SystemExit, match="holds an unfinished side"):
        bench.run_side("base", ROOT, tmp_path / "base", [])
