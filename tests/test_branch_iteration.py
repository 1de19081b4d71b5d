"""benchmarks/branch_iteration.py on a tiny 2-iteration loop: the branch shares the source's
first iteration without writing it, reruns the second with its overrides, and grades both
policies on the source's own dev split and a held-out one; bad input is one line, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.compose import compose_config
from pipeline.loop import run_loop
from pipeline.run.store import load_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import branch_iteration as bench  # noqa: E402
from paired import correct_by_problem  # noqa: E402


def stamps(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("branch")
    base = ["debug=default", f"model={tiny_model_dir}", f"model.cache_dir={root / 'cache'}"]
    run_loop(compose_config([*base, "iterations=2"]), root / "run")
    return root, base


def test_a_branch_reruns_one_iteration_and_grades_both_policies(source):
    root, base = source
    run, branches = root / "run", root / "branches"
    before = stamps(run)
    argv = ["--run", str(run), "--iteration", "1", "--branches", str(branches),
            "--variant", "hot search.temperature=2.0", "--held-out", "task.seed=3",
            "--base", *base, "--output", str(root / "out.json")]
    result = bench.main(argv)
    assert json.loads((root / "out.json").read_text()) == result
    assert stamps(run) == before  # the source is read, never written

    hot = branches / "run" / "hot"
    assert (hot / "iter_000").is_symlink() and (hot / "iter_000").resolve() == (run / "iter_000").resolve()
    manifest, original = (json.loads((d / "manifest.json").read_text()) for d in (hot, run))
    assert manifest["branch"] == {"source": str(run.resolve()), "iteration": 1,
                                  "overrides": ["search.temperature=2.0"]}
    assert {k: v for k, v in manifest["stages"].items() if k.startswith("iter_000/")} == {
        k: v for k, v in original["stages"].items() if k.startswith("iter_000/")}
    assert {k for k in manifest["stages"] if k.startswith("iter_001/")} == {
        k for k in original["stages"] if k.startswith("iter_001/")}
    # the rerun searched at its own temperature: other options than the source's
    texts = [[n["text"] for row in load_shards(d / "iter_001/search") for n in row["tree"]["nodes"]]
             for d in (hot, run)]
    assert texts[0] != texts[1]

    # the source's own dev grade is its eval stage's, problem by problem (greedy, same policy)
    own = correct_by_problem(branches / "run" / "grades" / "source" / "own.json")
    assert own == correct_by_problem(run / "iter_001/eval/greedy.json")
    held = correct_by_problem(branches / "run" / "grades" / "source" / "task.seed-3.json")
    assert len(held) == 4 and not set(held) & set(own)  # another task seed's problems
    variant = result["variants"]["hot"]
    assert variant["paired"]["problems"] == len(own) + len(held) == 8
    assert result["accuracy"] == round((sum(own.values()) + sum(held.values())) / 8, 4)
    assert variant["runs"]["run"]["merges"] == manifest["stages"]["iter_001/search"]["metrics"]["merges"]

    # resumable: nothing runs again, the same numbers come back
    again = stamps(branches)
    assert bench.main(argv) == result and stamps(branches) == again


@pytest.mark.parametrize("change, message", [
    (["--variant", "hot search.temperature=1.5"], "is another branch"),
    (["--variant", "nothing"], "at least one override"),
    (["--variant", "grades search.temperature=1.5"], "not 'grades'"),
    (["--iteration", "2"], "has not trained iteration 2"),
    (["--variant", "typo search.temprature=1.5"], "--variant 'typo'"),  # no such key
    (["--variant", "cold search.temperature=-1"], "search.temperature"),  # out of range
    (["--held-out", "task.sed=3"], "--base / --held-out task.sed=3"),
])
def test_bad_input_is_one_line(source, change, message, capsys):
    root, base = source
    argv = ["--run", str(root / "run"), "--iteration", "1", "--branches", str(root / "branches"),
            "--variant", "hot search.temperature=2.0", "--base", *base]
    if change[0] == "--iteration":
        argv[3] = change[1]
    else:
        argv += change
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_base_with_other_dev_problems_is_refused(source, capsys):
    root, base = source
    with pytest.raises(SystemExit):
        bench.main(["--run", str(root / "run"), "--iteration", "1", "--branches",
                    str(root / "other"), "--base", *base, "task.seed=7"])
    assert "not the ones" in capsys.readouterr().err
