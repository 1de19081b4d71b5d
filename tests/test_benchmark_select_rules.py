"""benchmarks/select_rules.py: each selection against majority per set and pooled, counted by hand."""

import json

import pytest
from conftest import load_benchmark

from pipeline.compose import compose_config
from pipeline.config import to_dict
from pipeline.tasks import make_task


@pytest.fixture(scope="module")
def rules():
    return load_benchmark("select_rules")


def _graded(path, problems, grades):
    """A best-of-N grade of `problems`: per problem the rules' grades, and two samples (one
    right, one wrong) for the AUCs."""
    cfg = compose_config([])
    rows = [{"id": p.id, "candidates": [f"Answer: {p.answer}", f"Answer: {int(p.answer) + 1}"],
             "correct_by_select": g} for p, g in zip(problems, grades, strict=True)]
    path.write_text(json.dumps({"config": to_dict(cfg) | {"eval": {"split": "test"}}, "rows": rows}))
    return path


def test_per_set_and_pooled(rules, tmp_path, capsys):
    """Two policies on the same two problems. Set a: implicit_vote wins one problem majority
    loses; set b: it loses one majority wins and wins another. Pooled: 4 pairs, 2 against 1."""
    problems = make_task(compose_config([]).task).split("test")[:2]
    g = lambda m, v: {"majority": m, "implicit_vote": v}  # noqa: E731
    a = _graded(tmp_path / "a.json", problems, [g(False, True), g(True, True)])
    b = _graded(tmp_path / "b.json", problems, [g(True, False), g(False, True)])
    out = tmp_path / "out.json"
    assert rules.main(["--set", "a", str(a), "--set", "b", str(b), "--output", str(out)]) == 0
    found = json.loads(out.read_text())
    assert found["sets"]["a"]["accuracy"] == {"majority": 0.5, "implicit_vote": 1.0}
    vs = found["sets"]["a"]["against_majority"]["implicit_vote"]
    assert (vs["implicit_vote_only"], vs["majority_only"], vs["difference"]) == (1, 0, 0.5)
    pooled = found["pooled"]
    assert pooled["problems"] == 4  # the same problem under two policies is two pairs
    vs = pooled["against_majority"]["implicit_vote"]
    assert (vs["implicit_vote_only"], vs["majority_only"]) == (2, 1)
    assert vs["difference"] == pytest.approx(0.25)
    assert vs["sign_test_p"] == pytest.approx(1.0)  # 2 against 1: exact two-sided p = 1
    # every problem: one right sample and one wrong, each half the votes: a tie, AUC 1/2
    auc = found["sets"]["a"]["within_problem_auc"]
    assert auc["problems"] == 2 and auc["vote_share"] == {"auc": 0.5, "problems_with_both": 2}


def test_bad_input_is_one_line(rules, tmp_path, capsys):
    greedy = tmp_path / "greedy.json"
    greedy.write_text(json.dumps({"rows": [{"id": "x", "correct": True}]}))
    out = tmp_path / "out.json"
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    for args, says in (([str(greedy)], "records no per-rule grades"),
                       ([str(listed)], "is not a graded `qstar eval` JSON"),
                       ([], "expected a new name, then graded JSON files"),
                       ([str(tmp_path / "missing.json")], "expected a new name")):
        assert rules.main(["--set", "a", *args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and not out.exists()
