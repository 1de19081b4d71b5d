import pytest

from mcts.options import OptionEnd, is_answer_line, newline, sentence_end, step_marker, token_cap


def test_newline():
    end = newline()
    assert not end.ends("First we add")
    assert end.ends("First we add 2.\nThen")
    assert end.cut("First we add 2.\nThen") == "First we add 2.\n"


def test_sentence_end():
    end = sentence_end()
    assert not end.ends("Pi is 3.14 roughly")  # a decimal point is not a sentence end
    assert not end.ends("So x = 4.")  # not yet: the next character decides
    assert end.ends("So x = 4. Then")
    assert end.cut("So x = 4. Then y") == "So x = 4. "
    assert end.cut("Is it 4? Yes") == "Is it 4? "
    assert end.cut("no stop here\nnext") == "no stop here\n"


def test_step_marker_ends_just_before_the_next_marker():
    end = step_marker(r"Step \d+:")
    assert not end.ends("Step 1: add 2 and 3\n")  # its own marker is not an end
    assert not end.ends("\nStep 1: add")
    text = "Step 1: add 2 and 3\nStep 2: get"
    assert end.ends(text)
    assert end.cut(text) == "Step 1: add 2 and 3\n"
    assert end.cut("5 is it.\nStep 3: x") == "5 is it.\n"


def test_token_cap_never_ends_by_text():
    end = token_cap(16)
    assert end.max_tokens == 16
    assert not end.ends("a.\nb. Step 1: c")
    assert end.cut("a.\nb") == "a.\nb"


def test_unknown_kind_names_allowed_ones():
    with pytest.raises(ValueError, match="newline, sentence, step_marker, token_cap"):
        OptionEnd("paragraph")


def test_step_marker_needs_a_valid_regex():
    with pytest.raises(ValueError, match="regex"):
        OptionEnd("step_marker")
    with pytest.raises(Exception):  # noqa: B017 - re.error
        OptionEnd("step_marker", "(")


def test_dataclass_from_config_values():
    assert OptionEnd(kind="sentence", regex=None, max_tokens=40) == sentence_end(40)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 42\n", True),
        ("answer: 42", True),
        ("  ANSWER: x", True),
        ("**Answer:** 7", True),
        ("So the total is 5.\nAnswer: 5", True),
        ("#### 12", True),
        ("so it is \\boxed{3}", True),
        ("The answer is 5", False),
        ("Step 2: no answer yet\n", False),
        ("", False),
    ],
)
def test_is_answer_line(text, expected):
    assert is_answer_line(text) is expected


def test_a_boundary_newline_takes_the_whole_run_and_leading_whitespace_is_no_end():
    for end in (newline(), sentence_end()):
        assert end.cut("= 46\n\nNext") == "= 46\n\n"  # "\n\n" is one BPE token: keep both
        assert not end.ends("\n\n")  # nothing written yet: not an option
        assert not end.ends("\n\nAnswer: 4")
        assert end.cut("\n\nAnswer: 4\nmore") == "\n\nAnswer: 4\n"
    assert sentence_end().cut("So x = 4.\n\nThen") == "So x = 4.\n\n"
    assert sentence_end().cut("So x = 4. Then") == "So x = 4. "


def test_word_starts():
    from mcts.options import word_starts

    assert word_starts(" from", "7") and word_starts("1", " ") and word_starts("\n", "x")
    assert not word_starts("impl", " uns") and not word_starts("2", "1")
    assert not word_starts(",", " sides")
