"""benchmarks/sample_scores.py: each selection's score per sample, and its within-problem AUC
read off a graded best-of-N JSON, against values worked out by hand."""

import json

import pytest
from conftest import load_benchmark

from pipeline.compose import compose_config
from pipeline.config import to_dict
from pipeline.tasks import make_task


@pytest.fixture(scope="module")
def scores():
    return load_benchmark("sample_scores")


def extract(text):
    return text.rsplit("Answer: ", 1)[-1] if "Answer: " in text else None


def test_checked_vote_counts_only_the_samples_the_check_passes(scores):
    candidates = ["2 + 2 = 5\nAnswer: 5"] * 3 + ["2 + 2 = 4\nAnswer: 4"] * 2 + ["Answer: 7", "no answer"]
    found = scores.candidate_scores(candidates, extract, [0.1] * 7)
    assert found["vote_share"] == pytest.approx([3 / 7] * 3 + [2 / 7] * 2 + [1 / 7, 0.0])
    assert found["step_check"] == [0.0] * 3 + [1.0] * 4
    # 3 samples pass (the "no answer" one too, which answers nothing): "4" holds 2 of them
    assert found["checked_vote"] == pytest.approx([0.0] * 3 + [1 + 2 / 3] * 2 + [1 + 1 / 3, 1.0])
    assert found["implicit"] == [0.1] * 7
    assert scores.candidate_scores(candidates, extract)["implicit"] is None


def test_every_sample_flagged_falls_back_to_the_plain_vote(scores):
    candidates = ["1 + 1 = 3\nAnswer: 2"] * 2 + ["1 + 1 = 3\nAnswer: 9"]
    found = scores.candidate_scores(candidates, extract)
    assert found["step_check"] == [0.0] * 3
    assert found["checked_vote"] == found["vote_share"] == pytest.approx([2 / 3, 2 / 3, 1 / 3])


def test_within_problem_aucs_of_a_graded_json(scores, tmp_path):
    """Two test problems. A: three wrong samples that state a false equality, two right ones and
    one wrong one that pass the check. B: every sample flagged, two right and one wrong."""
    cfg = compose_config([])
    task = make_task(cfg.task)
    a, b = task.split("test")[:2]
    wrong = lambda p, k: str(int(p.answer) + k)  # noqa: E731
    rows = [{"id": a.id, "candidates": [f"2 + 2 = 5\nAnswer: {wrong(a, 1)}"] * 3
             + [f"Answer: {a.answer}"] * 2 + [f"Answer: {wrong(a, 2)}"],
             "implicit_rewards": [0.3, 0.3, 0.3, 0.1, 0.1, 0.2]},
            {"id": b.id, "candidates": [f"1 + 1 = 3\nAnswer: {b.answer}"] * 2
             + [f"1 + 1 = 3\nAnswer: {wrong(b, 1)}"],
             "implicit_rewards": [0.5, 0.5, 0.1]}]
    for p, row in zip((a, b), rows):
        assert [task.is_correct(p, c) for c in row["candidates"]].count(True) == 2
    graded = tmp_path / "p1_best_of_6.json"
    graded.write_text(json.dumps({"config": to_dict(cfg) | {"eval": {"split": "test"}},
                                  "rows": rows}))
    found = scores.within_problem_aucs([graded])
    # per problem, P(a right sample outscores a wrong one), ties one half; then the mean
    # vote share: A's right answer (2 votes) beats 1 of its 4 wrong samples (3 votes, 3, 3, 1)
    assert found["vote_share"] == {"auc": pytest.approx((1 / 4 + 1) / 2), "problems_with_both": 2}
    # step check: A's right samples beat the 3 flagged and tie the 4th; B all tie
    assert found["step_check"]["auc"] == pytest.approx((3.5 / 4 + 0.5) / 2)
    assert found["checked_vote"]["auc"] == pytest.approx(1.0)  # checked majority ranks both right
    assert found["implicit"]["auc"] == pytest.approx((0.0 + 1.0) / 2)
    assert found["problems"] == 2
    without = tmp_path / "p1_no_implicit.json"  # a set graded without a DPO reference
    without.write_text(json.dumps({"config": to_dict(cfg) | {"eval": {"split": "test"}},
                                   "rows": [{k: v for k, v in r.items() if k != "implicit_rewards"}
                                            for r in rows]}))
    assert scores.within_problem_aucs([without])["implicit"] is None


def test_a_grade_without_its_task_config_is_one_clear_error(scores, tmp_path):
    """A grade from before eval JSONs recorded their config: a ValueError naming the file, which
    `matched_budget.py --pool` prints as one line (exit 2), not a KeyError traceback."""
    old = tmp_path / "p1_best_of_8.json"
    old.write_text(json.dumps({"rows": [{"id": "x", "candidates": ["Answer: 1"]}]}))
    with pytest.raises(ValueError, match=f"{old} records no readable task config"):
        scores.within_problem_aucs([old])
