"""Tasks and verifiers: splits, answer extraction, grading, and bad input."""

import itertools
import json
import re
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import TaskConfig, TaskKind
from pipeline.errors import QstarError
from pipeline.tasks import make_task
from pipeline.tasks.answers import extract_answer, math_equal
from pipeline.tasks.arithmetic import ArithmeticTask
from pipeline.tasks.hf import HFTask
from pipeline.tasks.jsonl import JsonlTask
from pipeline.tasks.prompt import SYSTEM_PROMPT, to_messages
from pipeline.tasks.reasoning_gym import ReasoningGymTask

GSM8K = Path(__file__).parents[2] / "shared/data/gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason="no GSM8K copy")

ROW = {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
       "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"}


def write_jsonl(path: Path, rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def gsm_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"What is {i} plus one?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
            for i in range(start, start + n)]


def jsonl_cfg(path, **kw) -> TaskConfig:
    return TaskConfig(kind=TaskKind.jsonl, path=str(path), **kw)


def ids(problems):
    return [p.id for p in problems]


def three(task):
    return tuple(task.split(name) for name in ("train", "dev", "test"))


def assert_disjoint(*splits):
    """No question in two splits, none twice within one."""
    questions = [p.question for split in splits for p in split]
    assert len(set(questions)) == len(questions)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("kind", [TaskKind.arithmetic, TaskKind.chain_steps])
def test_arithmetic_splits_deterministic_and_disjoint(kind):
    cfg = TaskConfig(kind=kind, num_train=64, num_dev=50, num_test=100, seed=3)
    task = make_task(cfg)
    assert isinstance(task, ArithmeticTask)
    train, dev, test = three(task)
    assert (len(train), len(dev), len(test)) == (64, 50, 100)
    assert_disjoint(train, dev, test)
    assert tuple(map(ids, three(make_task(cfg)))) == (ids(train), ids(dev), ids(test))
    other = make_task(TaskConfig(kind=kind, num_train=64, num_dev=50, num_test=100, seed=4))
    assert [p.question for p in other.split("test")] != [p.question for p in test]


def test_task_seeds_draw_independent_problem_pools():
    """reasoning-gym seeds item idx with seed + idx: were task.seed passed through, seeds 3 and 4
    would share 263 of 264 questions. A space of 90^5 * 16 questions makes any shared one a
    defect, and seed 0 keeps the problems every result so far was measured on."""
    wide = dict(kind=TaskKind.chain_steps, min_terms=5, max_terms=5, min_digits=2, max_digits=2,
                num_train=64, num_dev=100, num_test=100)
    pools = [{p.question for split in three(make_task(TaskConfig(**wide, seed=seed)))
              for p in split} for seed in (0, 1, 3, 4)]
    assert all(len(pool) == 264 for pool in pools)
    assert all(not (a & b) for a, b in itertools.combinations(pools, 2))
    # the default task at seed 0, pinned: the problems the README's results were measured on
    (first, *_) = make_task(TaskConfig(num_train=64, num_dev=100, num_test=100)).split("test")
    assert (first.id, first.question) == ("chain_sum/seed0/0",
                                          "Compute 0 - 4 - 8 - 7 one step at a time.")
    default_seed_1 = three(make_task(TaskConfig(num_train=64, num_dev=100, num_test=100, seed=1)))
    shared = {p.question for split in default_seed_1 for p in split} & {
        p.question for split in three(make_task(TaskConfig(num_train=64, num_dev=100,
                                                           num_test=100))) for p in split}
    assert len(shared) < 10  # chance coincidences of 3-term sums (none today), not 263


def test_test_split_stable_when_num_train_or_num_dev_changes():
    small = make_task(TaskConfig(num_train=8, num_dev=5, num_test=20))
    large = make_task(TaskConfig(num_train=80, num_dev=30, num_test=20))
    assert small.split("test") == large.split("test")
    assert small.split("dev") == large.split("dev")[:5]  # dev grows at its end


def test_unknown_split_is_refused():
    task = make_task(TaskConfig(num_train=2, num_dev=2, num_test=2))
    with pytest.raises(QstarError, match=r"split 'heldout' is invalid: allowed: train, dev, test"):
        task.split("heldout")


def test_arithmetic_respects_difficulty():
    task = make_task(TaskConfig(kind=TaskKind.arithmetic, min_terms=3, max_terms=3, min_digits=1,
                                max_digits=1, num_train=5, num_dev=5, num_test=5))
    for p in task.split("train"):
        assert len(p.entry["metadata"]["expression"].split()) == 5  # a op b op c


@needs_gsm8k
def test_gsm8k_directory_splits():
    cfg = jsonl_cfg(GSM8K, num_train=200, num_dev=50, num_test=100, seed=1)
    train, dev, test = three(make_task(cfg))
    assert (len(train), len(dev), len(test)) == (200, 50, 100)
    assert_disjoint(train, dev, test)
    assert all(p.id.startswith("train.jsonl:") for p in train + dev)
    assert all(p.id.startswith("test.jsonl:") for p in test)
    assert tuple(map(ids, three(make_task(cfg)))) == (ids(train), ids(dev), ids(test))


@needs_gsm8k
def test_gsm8k_single_file_splits():
    cfg = jsonl_cfg(GSM8K / "test.jsonl", num_train=300, num_dev=100, num_test=200, seed=0)
    train, dev, test = three(make_task(cfg))
    assert (len(train), len(dev), len(test)) == (300, 100, 200)
    assert_disjoint(train, dev, test)
    assert tuple(map(ids, three(make_task(cfg)))) == (ids(train), ids(dev), ids(test))
    assert ids(make_task(jsonl_cfg(GSM8K / "test.jsonl", num_train=300, num_dev=100,
                                   num_test=200, seed=1)).split("test")) != ids(test)
    for p in train + dev + test:
        assert p.answer == p.entry["solution"].rsplit("####", 1)[1].strip().replace(",", "")


def test_single_file_split_ignores_row_order(tmp_path):
    rows = gsm_rows(30)
    a = make_task(jsonl_cfg(write_jsonl(tmp_path / "a.jsonl", rows), num_train=10, num_dev=5,
                            num_test=5))
    b = make_task(jsonl_cfg(write_jsonl(tmp_path / "b.jsonl", rows[::-1]), num_train=10,
                            num_dev=5, num_test=5))
    for name in ("train", "dev", "test"):
        assert [p.question for p in a.split(name)] == [p.question for p in b.split(name)]
    assert_disjoint(*three(a))


def test_directory_train_drops_questions_also_in_test(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", gsm_rows(10))
    write_jsonl(tmp_path / "test.jsonl", gsm_rows(5, start=8))  # 8 and 9 in both
    splits = three(make_task(jsonl_cfg(tmp_path, num_train=6, num_dev=2, num_test=5)))
    assert_disjoint(*splits)
    assert [len(s) for s in splits] == [6, 2, 5]
    with pytest.raises(QstarError, match=r"task.num_train=7 \+ task.num_dev=2 = 9 problems "
                                         r"requested but .*train.jsonl has only 8 distinct "
                                         r"questions not in the test pool \(task.num_test=5"):
        make_task(jsonl_cfg(tmp_path, num_train=7, num_dev=2, num_test=5))


def test_hf_task_on_a_local_dataset_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", gsm_rows(12))
    write_jsonl(tmp_path / "test.jsonl", gsm_rows(6, start=100))
    cfg = TaskConfig(kind=TaskKind.hf, name=str(tmp_path), num_train=10, num_dev=2, num_test=4)
    task = make_task(cfg)
    assert isinstance(task, HFTask)
    train, dev, test = three(task)
    assert (len(train), len(dev), len(test)) == (10, 2, 4)
    assert_disjoint(train, dev, test)
    assert task.is_correct(test[0], f"Answer: {test[0].answer}")


# ---------------------------------------------------------------- prompts and extraction


def test_messages_ask_for_answer_line():
    messages = to_messages("What is 2 + 2?")
    assert messages == [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": "What is 2 + 2?"}]
    assert "Answer: <value>" in SYSTEM_PROMPT and "one step per line" in SYSTEM_PROMPT


@pytest.mark.parametrize("text, expected", [
    (ROW["answer"], "72"),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned $10.\n#### 10", "10"),
    ("Step 1: 5 + 7 = 12\nAnswer: 12", "12"),
    ("Answer: 3\nI was wrong.\nAnswer: 12.", "12"),
    ("**Answer:** $1,234", "1234"),
    ("Final answer: $18.", "18"),
    (r"so the result is \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\sqrt{\frac{a}{b}}} done", r"\sqrt{\frac{a}{b}}"),
    ("Answer: \\boxed{7}", "7"),
    ("She pays $1,000,000 in total.", "1000000"),
    ("He had 3 apples, then 4.5 more", "4.5"),
    ("The change is -28 dollars", "-28"),
    ("Answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("Answer:\n1 2\n3 4", "1 2\n3 4"),
    ("no numbers here", None),
    ("", None),
    ("Answer:", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@needs_gsm8k
def test_extract_answer_on_real_gsm8k_solutions():
    lines = (GSM8K / "test.jsonl").read_text().splitlines()[:50]
    for line in lines:
        row = json.loads(line)
        assert extract_answer(row["answer"]) == row["answer"].rsplit("####", 1)[1].strip().replace(
            ",", "")


# ---------------------------------------------------------------- verification


def test_arithmetic_verification_uses_generator_answer():
    task = make_task(TaskConfig(kind=TaskKind.arithmetic, num_train=10, num_dev=5, num_test=10))
    problem = task.split("train")[0]
    gold = problem.entry["answer"]
    assert task.is_correct(problem, f"Step 1: compute.\nAnswer: {gold}")
    assert task.is_correct(problem, f"{problem.entry['metadata']['expression']} = {gold}\n"
                                    f"Answer: {problem.entry['metadata']['expression']} = {gold}")
    assert not task.is_correct(problem, f"Answer: {int(gold) + 1}")
    assert not task.is_correct(problem, "I do not know.")
    assert not task.is_correct(problem, f"Answer: {gold}0 apples")  # partial credit is not 1.0


def gsm_problem(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [ROW] + gsm_rows(3))
    task = make_task(jsonl_cfg(path, num_train=2, num_dev=1, num_test=1))  # every row is in a split
    return task, next(p for p in sum(three(task), []) if p.id == "one.jsonl:1")


@pytest.mark.parametrize("completion", [
    "Answer: 72", "24 + 48 = 72\nAnswer: 72.0", "Answer: $72", "#### 72", r"\boxed{72}",
    "Answer: 72 clips", "Answer: 72.00",
])
def test_gsm8k_correct(tmp_path, completion):
    task, problem = gsm_problem(tmp_path)
    assert problem.answer == "72"
    assert task.is_correct(problem, completion)


@pytest.mark.parametrize("completion", ["Answer: 73", "Answer: 7.2", "nothing", "Answer: 9^9^9",
                                        "Answer: 1/72", "Answer: 2**10**10",
                                        "Answer: 10^{100000000}", "Answer: 100000000!"])
def test_gsm8k_incorrect(tmp_path, completion):
    task, problem = gsm_problem(tmp_path)
    start = time.monotonic()
    assert not task.is_correct(problem, completion)
    assert time.monotonic() - start < 5  # answers that make sympy run for ever are refused


def test_math_equal_works_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.extend(
        [math_equal("72", "72.0"), math_equal("0.5", r"\frac{1}{2}"), math_equal("72", "73")]))
    thread.start()
    thread.join()
    assert results == [True, True, False]


def test_other_reasoning_gym_generator_end_to_end():
    cfg = TaskConfig(kind=TaskKind.reasoning_gym, name="basic_arithmetic", num_train=6,
                     num_dev=3, num_test=4, seed=2)
    task = make_task(cfg)
    assert isinstance(task, ReasoningGymTask) and task.name == "basic_arithmetic"
    train, dev, test = three(task)
    assert (len(train), len(dev), len(test)) == (6, 3, 4)
    assert_disjoint(train, dev, test)
    assert ids(train) == ids(make_task(cfg).split("train"))
    problem = test[0]
    assert task.is_correct(problem, f"Compute it.\nAnswer: {problem.answer}")
    assert not task.is_correct(problem, "Answer: banana")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"bad JSON"),
    (json.dumps({"answer": "#### 3"}), r"missing text field 'question' \(task.question_field\)"),
    (json.dumps({"question": "q?"}), r"missing text field 'answer' \(task.answer_field\)"),
    (json.dumps({"question": "q?", "answer": "it is 3"}), r"no final '#### <answer>'"),
    (json.dumps([1, 2]), r"not a JSON object"),
    (json.dumps({"question": "q?", "answer": "Twelve apples.\n#### twelve"}),
     r"gold answer 'twelve' in field 'answer' cannot be parsed by math-verify"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", gsm_rows(2) + [bad] + gsm_rows(3, start=2))
    with pytest.raises(QstarError, match=rf"{re.escape(str(path))}:3: .*{message}") as err:
        make_task(jsonl_cfg(path, num_train=2, num_dev=1, num_test=2))
    assert "\n" not in str(err.value)


def test_skip_bad_rows_counts_and_warns_once(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl",
                       gsm_rows(5) + ["{oops", json.dumps({"question": "q"})] + gsm_rows(5, 5))
    task = make_task(jsonl_cfg(path, num_train=4, num_dev=2, num_test=4, skip_bad_rows=True))
    assert task.skipped_rows == 2
    assert sum(len(s) for s in three(task)) == 10
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 2 bad rows" in err and str(path) in err


def test_skip_bad_rows_skips_and_counts_unparseable_gold_answers(tmp_path, capsys):
    unparseable = [{"question": f"How many {w}?", "answer": f"Some.\n#### {w}"}
                   for w in ("twelve", "abc")]
    path = write_jsonl(tmp_path / "data.jsonl", gsm_rows(4) + unparseable + gsm_rows(4, 4))
    task = make_task(jsonl_cfg(path, num_train=5, num_dev=2, num_test=1, skip_bad_rows=True))
    assert task.skipped_rows == 2
    kept = [p for s in ("train", "dev", "test") for p in task.split(s)]
    assert len(kept) == 8 and not any(p.answer in ("twelve", "abc") for p in kept)
    assert "skipped 2 bad rows" in capsys.readouterr().err


@pytest.mark.parametrize("gold", ["72", "1,000", "-3.5", "3/4", r"\frac{1}{2}", "$12"])
def test_gold_answers_math_verify_reads_are_accepted(tmp_path, gold):
    rows = gsm_rows(3) + [{"question": "Odd one?", "answer": f"so\n#### {gold}"}]
    task = make_task(jsonl_cfg(write_jsonl(tmp_path / "d.jsonl", rows), num_train=2, num_dev=1, num_test=1))
    odd = [p for s in ("train", "dev", "test") for p in task.split(s) if p.question == "Odd one?"]
    assert len(odd) == 1 and task.is_correct(odd[0], f"Answer: {odd[0].answer}")


def test_skip_bad_rows_in_directory_form(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", gsm_rows(4) + ["{oops"])
    write_jsonl(tmp_path / "test.jsonl", ["[]"] + gsm_rows(3, start=10))
    task = make_task(jsonl_cfg(tmp_path, num_train=3, num_dev=1, num_test=3, skip_bad_rows=True))
    assert task.skipped_rows == 2
    assert capsys.readouterr().err.count("warning") == 1


def test_path_not_set():
    with pytest.raises(QstarError, match=r"task.path is not set"):
        make_task(TaskConfig(kind=TaskKind.jsonl, path=None))


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(QstarError, match=rf"task.path={missing}: no such file or directory"):
        make_task(jsonl_cfg(missing))


def test_directory_without_test_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", gsm_rows(3))
    with pytest.raises(QstarError, match=rf"task.path={tmp_path}: directory has no test.jsonl"):
        make_task(jsonl_cfg(tmp_path))


def test_unknown_reasoning_gym_name_lists_valid_ones():
    with pytest.raises(QstarError, match=r"task.name='no_such_task'.*valid names:.*chain_sum"):
        make_task(TaskConfig(kind=TaskKind.reasoning_gym, name="no_such_task"))


def test_three_splits_larger_than_data_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", gsm_rows(10))
    with pytest.raises(QstarError, match=r"^task.num_train=5 \+ task.num_dev=2 \+ "
                                         r"task.num_test=4 = 11 problems "
                                         rf"requested but {path} has only 10 distinct") as err:
        make_task(jsonl_cfg(path, num_train=5, num_dev=2, num_test=4))
    assert "\n" not in str(err.value)
    assert len(three(make_task(jsonl_cfg(path, num_train=4, num_dev=2, num_test=4)))[0]) == 4
    write_jsonl(tmp_path / "train.jsonl", gsm_rows(10))
    write_jsonl(tmp_path / "test.jsonl", gsm_rows(3, start=50))
    with pytest.raises(QstarError, match=r"task.num_test=4 is larger than the 3 distinct "
                                         r"problems in .*test.jsonl"):
        make_task(jsonl_cfg(tmp_path, num_train=5, num_dev=1, num_test=4))


def test_arithmetic_space_too_small():
    # one-digit, two-term sums: far fewer than 500 distinct questions
    cfg = TaskConfig(kind=TaskKind.arithmetic, min_terms=2, max_terms=2, min_digits=1,
                     max_digits=1, num_train=300, num_dev=100, num_test=100)
    with pytest.raises(QstarError, match=r"task.num_train=300 \+ task.num_dev=100 \+ "
                                         r"task.num_test=100 = 500 problems requested but "
                                         r"reasoning-gym chain_sum"):
        make_task(cfg)


def test_invalid_generator_config_is_one_line():
    with pytest.raises(QstarError, match=r"reasoning-gym chain_sum:") as err:
        ArithmeticTask(TaskConfig(min_terms=0, max_terms=0, num_train=2, num_dev=2, num_test=2))
    assert "\n" not in str(err.value)


def test_empty_data_set(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(QstarError, match=rf"{path} has no usable rows"):
        make_task(jsonl_cfg(path, num_train=1, num_dev=1, num_test=1))
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["{x"])
    with pytest.raises(QstarError, match=rf"{only_bad} has no usable rows"):
        JsonlTask(jsonl_cfg(only_bad, num_train=1, num_dev=1, num_test=1, skip_bad_rows=True))


def test_hf_dataset_that_cannot_be_loaded(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(QstarError, match=rf"task.name='{missing}'.*cannot load Hugging Face "
                                         r"dataset") as err:
        make_task(TaskConfig(kind=TaskKind.hf, name=str(missing)))
    assert "\n" not in str(err.value)


def test_hf_missing_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", gsm_rows(3))
    write_jsonl(tmp_path / "test.jsonl", gsm_rows(3, start=10))
    with pytest.raises(QstarError, match=r"task.hf_test_split='validation'.*has no such split"):
        make_task(TaskConfig(kind=TaskKind.hf, name=str(tmp_path), hf_test_split="validation",
                             num_train=1, num_dev=1, num_test=1))
