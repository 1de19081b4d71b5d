import pytest

from critics.metrics import (
    accuracy,
    auc,
    average_ranks,
    expected_calibration_error,
    mse,
    precision_recall,
    within_problem_auc,
)


def test_average_ranks_share_ties():
    assert average_ranks([0.4, 0.1, 0.4, 0.8]).tolist() == [2.5, 1.0, 2.5, 4.0]


def test_auc_counts_ties_as_one_half():
    # positives 0.4 and 0.8 against negatives 0.1 and 0.4: wins 1 + 0.5 + 1 + 1 of 4 pairs
    assert auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auc([0.9, 0.1], [0, 1]) == 0.0
    assert auc([0.3, 0.3, 0.3], [0, 1, 1]) == 0.5


def test_auc_reads_soft_targets_at_one_half_and_needs_both_classes():
    assert auc([0.2, 0.7], [0.25, 0.5]) == 1.0
    assert auc([0.2, 0.7], [1, 1]) is None
    assert auc([], []) is None


def test_expected_calibration_error_by_hand():
    # bins: [0.05] vs 0 -> 0.05; [0.15, 0.12] mean 0.135 vs 0.5 -> 0.365 (x2); [0.95] vs 1 -> 0.05
    ece = expected_calibration_error([0.05, 0.15, 0.12, 0.95], [0, 1, 0, 1])
    assert ece == pytest.approx((0.05 + 2 * 0.365 + 0.05) / 4)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # 1.0 falls in the last bin
    assert expected_calibration_error([], []) is None


def test_accuracy_mse_precision_recall_by_hand():
    scores, targets = [0.2, 0.6, 0.5, 0.9], [0, 0, 1, 1]
    assert accuracy(scores, targets) == 0.75
    assert mse(scores, targets) == pytest.approx((0.04 + 0.36 + 0.25 + 0.01) / 4)
    assert precision_recall(scores, targets) == (pytest.approx(2 / 3), 1.0)
    assert precision_recall([0.1, 0.2], [0, 0]) == (None, None)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        auc([0.1, 0.2], [1])


def test_within_problem_auc_by_hand():
    # a: the right answer scores highest -> 1.0
    # b: right {0.3, 0.6} vs wrong {0.6, 0.1}: 0.3>0.6 no, 0.3>0.1 yes, 0.6=0.6 half, 0.6>0.1 yes
    #    -> 2.5 / 4 = 0.625;  c: only right answers -> no AUC, not counted
    scores = [0.9, 0.2, 0.5, 0.3, 0.6, 0.6, 0.1, 0.7, 0.4]
    targets = [1, 0, 0, 1, 1, 0, 0, 1, 1]
    problems = ["a", "a", "a", "b", "b", "b", "b", "c", "c"]
    assert within_problem_auc(scores, targets, problems) == (pytest.approx(0.8125), 2)


def test_within_problem_auc_ignores_telling_problems_apart():
    # the easy problem's answers all score high, the hard one's low: across problems that looks
    # like skill (6 of 9 pairs ordered), within each problem it ranks 0 and 1 -> 0.5
    scores = [0.8, 0.9, 0.85, 0.1, 0.2, 0.15]
    targets = [1, 0, 1, 0, 1, 0]
    problems = ["easy"] * 3 + ["hard"] * 3
    assert auc(scores, targets) == pytest.approx(6 / 9)
    assert within_problem_auc(scores, targets, problems) == (pytest.approx(0.5), 2)


def test_within_problem_auc_without_a_mixed_problem_is_none():
    assert within_problem_auc([0.1, 0.9], [1, 1], ["a", "b"]) == (None, 0)
    assert within_problem_auc([], [], []) == (None, 0)
    with pytest.raises(ValueError, match="problems"):
        within_problem_auc([0.1, 0.9], [1, 0], ["a"])
