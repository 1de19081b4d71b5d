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


@pytest.mark.parametrize("a, b", [
    ("Answer: 46", "Answer: 47"),  # difflib ratio 0.900
    ("12 + 34 = 46", "12 + 34 = 47"),  # 0.917
    ("So the total is 1,200 apples.\n", "So the total is 1,300 apples.\n"),
    ("Answer: apple", "Answer: apply"),  # answers differ without numbers
    ("The sum is \\boxed{12}", "The sum is \\boxed{13}"),
])
def test_different_numbers_or_answers_are_never_duplicates(a, b):
    assert text_similarity(a, b) >= 0.9  # the threshold alone would merge them
    assert split_duplicates([b], [a], text_similarity, 0.9) == ([0], [])
    assert split_duplicates([a, b], [], lambda x, y: 1.0, 0.9) == ([0, 1], [])  # any similarity_fn


def test_same_numbers_still_merge_by_similarity():
    keep, dups = split_duplicates(["12 + 34 = 46 \n", "1,200.50 left"], ["12 + 34 = 46", "1200.5 left"],
                                  text_similarity, 0.9)
    assert (keep, dups) == ([], [0, 1])
    keep, dups = split_duplicates(["Add 12 and 34 now."], ["We add 12 to 34."], text_similarity, 0.9)
    assert keep == [0]  # same numbers, text not alike enough


def test_content_key():
    from mcts.merge import answer, content_key, numbers

    assert numbers("-3 + 1,000 = 997.0") == ["-3", "1000", "997"]
    assert answer("**Answer:**  46 \n") == answer("Answer:  46 \n") == "46"
    assert answer("#### 12") == "12"
    assert answer("no answer here") is None
    assert content_key("Answer: 5") == ("5", ("5",))
