"""benchmarks/paired.py: the problem-by-problem comparison of two decodings, by hand."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def paired():
    return load_benchmark("paired")


def test_paired_counts_discordant_problems_and_their_standard_error(paired):
    a = {"p1": True, "p2": True, "p3": False, "p4": False, "p5": True}
    b = {"p1": True, "p2": False, "p3": True, "p4": False, "p5": False}
    got = paired.paired(a, b, ("mcts", "best_of_n"))
    # per-problem differences 0, 1, -1, 0, 1: mean 0.2, sample variance 2.8 / 4
    se = math.sqrt(2.8 / 4 / 5)
    assert got["problems"] == 5 and got["mcts_only"] == 2 and got["best_of_n_only"] == 1
    assert got["difference"] == 0.2 and got["standard_error"] == round(se, 4)
    assert got["ci95"] == [round(0.2 - 1.959964 * se, 4), round(0.2 + 1.959964 * se, 4)]
    assert got["sign_test_p"] == 1.0  # 2 against 1: P(X <= 1) = 4/8, doubled
    assert paired.paired(b, a, ("star", "mcts"))["difference"] == -0.2  # antisymmetric
    same = paired.paired(a, a, ("x", "y"))
    assert same["difference"] == same["standard_error"] == 0 and same["sign_test_p"] == 1.0


def test_sign_test_equals_the_binomial_by_enumeration(paired):
    for wins, losses in [(0, 10), (3, 9), (5, 9), (4, 11), (7, 7), (0, 0)]:
        n = wins + losses
        # every outcome of n fair coins as extreme as the observed split, either way
        extreme = sum(1 for flips in itertools.product((0, 1), repeat=n)
                      if min(sum(flips), n - sum(flips)) <= min(wins, losses))
        assert paired.sign_test_p(wins, losses) == pytest.approx(min(1.0, extreme / 2 ** n))
    assert paired.sign_test_p(0, 10) == pytest.approx(2 / 1024)


def test_paired_refuses_different_problems_and_reads_eval_rows(paired, tmp_path):
    with pytest.raises(ValueError, match="different problems"):
        paired.paired({"a": True}, {"b": True}, ("x", "y"))
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"summary": {}, "rows": [{"id": "a", "correct": True},
                                                        {"id": "b", "correct": False}]}))
    assert paired.correct_by_problem(path) == {"a": True, "b": False}


def test_against_rule_compares_each_rule_of_the_rows_with_one(paired):
    rows = [{"id": "a", "correct_by_select": {"majority": True, "orm": False, "implicit": True}},
            {"id": "b", "correct_by_select": {"majority": False, "orm": True, "implicit": False}},
            {"id": "c", "correct_by_select": {"majority": False, "orm": True, "implicit": False}}]
    out = paired.against_rule(rows, "select", "majority")
    assert set(out) == {"orm", "implicit"}
    assert (out["orm"]["orm_only"], out["orm"]["majority_only"]) == (2, 1)
    assert out["orm"]["difference"] == round(1 / 3, 4)
    assert (out["implicit"]["implicit_only"], out["implicit"]["difference"]) == (0, 0.0)
    # rows graded before they carried their rules: nothing to compare
    assert paired.against_rule([{"id": "a", "correct": True}], "select", "majority") == {}
    assert paired.against_rule([], "select", "majority") == {}
