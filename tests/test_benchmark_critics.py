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
    assert set(result["within_problem_auc"]) == {"value", "prm", "orm", "implicit"}
    assert all(len(v) == 1 for v in result["within_problem_auc"].values())
    # the smoke run trains nothing (no pairs): the refit fitted the heads on policy_0,
    # which has no DPO reference
    assert result["within_problem_auc"]["implicit"] == [None]
    [row] = result["best_of_n_on_test"]
    assert row["policy"] == 1 and row["n"] == 2 and row["problems"] == 4 and row["split"] == "test"
    assert row["majority"] is not None and row["orm"] is not None and row["orm_vote"] is not None
    graded = json.loads((runs / "bench_test_evals" / "p1_best_of_2_test.json").read_text())
    assert graded["summary"]["accuracy_by_select"]["orm"] == row["orm"]
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
    again = bench.main(args)
    assert again["search"] == search


@pytest.mark.parametrize("flag", ["--n", "--search-problems", "--iterations"])
def test_a_count_below_one_is_one_line_before_any_run(bench, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--runs", str(tmp_path / "runs"), flag, "0"])
    assert exit_.value.code == 2 and f"{flag} 0: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
