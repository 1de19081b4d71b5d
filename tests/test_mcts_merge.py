import pytest

from mcts import SearchParams, search
from mcts.merge import split_duplicates, text_similarity
from mcts.types import LeafEval, Option


def test_similarity_is_difflib_ratio_on_normalised_whitespace():
    assert text_similarity("abcd", "abce") == pytest.approx(0.75)  # 2*3/8
    assert text_similarity("a  b\n", " a b") == 1.0
    assert text_similarity("abc", "xyz") == 0.0


def test_split_duplicates_checks_siblings_and_earlier_candidates():
    keep, dups = split_duplicates(["abcd", "wxyz", "abcd ", "qrst"], ["qrst"], text_similarity, 0.9)
    assert keep == [0, 1]
    assert dups == [2, 3]


def test_threshold_is_inclusive():
    keep, dups = split_duplicates(["abce"], ["abcd"], text_similarity, 0.75)
    assert (keep, dups) == ([], [0])
    keep, dups = split_duplicates(["abce"], ["abcd"], text_similarity, 0.76)
    assert (keep, dups) == ([0], [])


class DuplicatingPolicy:
    """The root's first sampling repeats one text; the resample adds one new text and a repeat."""

    def __init__(self):
        self.calls = []

    def __call__(self, requests):
        self.calls.append(requests)
        out = []
        for r in requests:
            if r.attempt == 0:
                out.append([Option("Step same\n", -1.0, 2, False)] * r.num_options)
            else:
                out.append([Option("Step same\n", -1.0, 2, False),
                            Option("Completely different words here\n", -2.0, 4, False)][: r.num_options])
        return out


def _critic(requests):
    return [LeafEval(total=0.5) for _ in requests]


def test_duplicates_are_resampled_then_dropped_and_counted():
    policy = DuplicatingPolicy()
    params = SearchParams(simulations=1, root_c_min=3, merge_retries=1)
    tree = search(["p"], policy, _critic, params)[0]
    assert [tree.text[c] for c in tree.children[0]] == ["Step same\n", "Completely different words here\n"]
    assert tree.merges[0] == 3  # two in the first sampling, one in the resample
    assert tree.stats.merges == 3
    assert [[(r.attempt, r.num_options) for r in call] for call in policy.calls] == [[(0, 3)], [(1, 2)]]
    assert tree.stats.tokens_generated == 3 * 2 + 2 + 4  # duplicates cost tokens too


def test_no_retries_drops_duplicates_at_once():
    policy = DuplicatingPolicy()
    tree = search(["p"], policy, _critic, SearchParams(simulations=1, root_c_min=3, merge_retries=0))[0]
    assert len(tree.children[0]) == 1
    assert tree.merges[0] == 2
    assert len(policy.calls) == 1


def test_custom_similarity_fn_is_used():
    policy = DuplicatingPolicy()
    tree = search(["p"], policy, _critic, SearchParams(simulations=1, root_c_min=3),
                  similarity_fn=lambda a, b: 0.0)[0]
    assert len(tree.children[0]) == 3
    assert tree.stats.merges == 0
