"""pipeline.decoding and pipeline.stages.eval: voting, grading, and the rule that decoding never sees the gold answer."""

import math

import pytest

import pipeline.decoding.beam
import pipeline.decoding.best_of_n
import pipeline.decoding.sampling
import pipeline.decoding.tree_search
import pipeline.decoding.voting
import pipeline.lm.generation
import pipeline.stages.eval
from pipeline.compose import compose_config
from pipeline.config import BestPath, DecodeConfig, DecodeStrategy, Selection
from pipeline.decoding.base import Decoded
from pipeline.decoding.best_of_n import decode_best_of_n
from pipeline.decoding.voting import majority_vote
from pipeline.errors import QstarError
from pipeline.lm.generation import Generation
from pipeline.stages.eval import evaluate, grade
from pipeline.tasks.base import Problem, Task


def before_bar(text):
    """A test extractor: the answer is what precedes '|'; '-' means no answer."""
    head = text.split("|")[0]
    return None if head == "-" else head


# ---------------------------------------------------------------- majority vote


@pytest.mark.parametrize("candidates,expected", [
    (["1|a", "2|b", "2|c"], "2|b"),  # most common; its first candidate
    (["7|a", "8|b", "8|c", "7|d", "9|e"], "7|a"),  # tie 7/8: the earliest answer wins
    (["8|a", "7|b", "7|c", "8|d"], "8|a"),
    (["-|a", "5|b", "-|c", "-|d"], "5|b"),  # no answer never wins, however common
    (["-|a", "-|b"], "-|a"),  # nothing extracted: the first candidate
    (["3|x"], "3|x"),
])
def test_majority_vote(candidates, expected):
    assert majority_vote(candidates, before_bar) == expected


def test_majority_vote_uses_the_passed_extractor():
    # the default extractor would read 1, 2, 2 from the Answer: lines; ours reads x, x, y
    candidates = ["x|Answer: 1", "x|Answer: 2", "y|Answer: 2"]
    assert majority_vote(candidates, before_bar) == "x|Answer: 1"
    seen = []
    majority_vote(candidates, lambda c: seen.append(c) or before_bar(c))
    assert seen == candidates


def test_best_of_n_selects_by_vote_or_orm(monkeypatch):
    groups = [["1|a", "2|b", "2|c"], ["5|a", "6|b", "7|c"]]
    gens = [[Generation(c, [0] * 7, [-1.0] * 7, True, False) for c in g] for g in groups]
    monkeypatch.setattr(pipeline.decoding.best_of_n, "sample_generations", lambda *a, **k: gens)
    d = DecodeConfig(strategy=DecodeStrategy.best_of_n, n=3)
    out = decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, before_bar)
    assert out.completions == ["2|b", "5|a"] and out.tokens == 42

    d.select = Selection.orm
    scores = {"1|a": 0.9, "2|b": 0.1, "2|c": 0.2, "5|a": 0.0, "6|b": 0.3, "7|c": 0.8}
    calls = []

    def orm(prompts, completions):
        calls.append((prompts, completions))
        return [scores[c] for c in completions]

    out = decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, before_bar, orm)
    assert out.completions == ["1|a", "7|c"]
    assert calls == [(["p1"] * 3 + ["p2"] * 3, groups[0] + groups[1])]
    assert out.alternatives["majority"] == ["2|b", "5|a"]
    assert out.row_extra == [{"candidates": groups[0], "orm_scores": [0.9, 0.1, 0.2]},
                             {"candidates": groups[1], "orm_scores": [0.0, 0.3, 0.8]}]
    # weighted vote: answer 2 sums 0.3 < answer 1's 0.9; answer 7 (0.8) beats 6 (0.3) and 5 (0)
    assert out.alternatives["orm_vote"] == ["1|a", "7|c"]
    with pytest.raises(QstarError, match="ORM"):
        decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, before_bar, None)


def test_best_of_n_selects_by_the_summed_implicit_reward(monkeypatch):
    groups = [["1|a", "2|b", "2|c"], ["5|a", "6|b", "7|c"]]
    gens = [[Generation(c, [k, k + 1], [-0.5, -0.25 * k], True, False) for k, c in enumerate(g)]
            for g in groups]
    monkeypatch.setattr(pipeline.decoding.best_of_n, "sample_generations", lambda *a, **k: gens)
    rewards = {"1|a": -0.2, "2|b": 0.4, "2|c": 0.1, "5|a": 0.3, "6|b": 0.3, "7|c": -1.0}
    calls = []

    class FakeImplicit:
        def of_tokens(self, prompts, token_ids, logprobs):
            calls.append((prompts, token_ids, logprobs))
            return [rewards[c] for g in groups for c in g]

    d = DecodeConfig(strategy=DecodeStrategy.best_of_n, n=3, select=Selection.implicit)
    out = decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, before_bar, None, FakeImplicit())
    assert out.completions == ["2|b", "5|a"]  # highest reward; the 0.3 tie goes to the earliest
    assert out.extra == {"select": "implicit"}
    assert out.alternatives == {"majority": ["2|b", "5|a"], "implicit_vote": ["2|b", "5|a"]}
    # pi's log-probs and the exact token ids come from the sampling pass, not a re-tokenization
    assert calls == [(["p1"] * 3 + ["p2"] * 3, [[0, 1], [1, 2], [2, 3]] * 2,
                      [[-0.5, 0.0], [-0.5, -0.25], [-0.5, -0.5]] * 2)]
    assert out.row_extra[1]["implicit_rewards"] == [0.3, 0.3, -1.0]
    assert out.tokens == 12
    with pytest.raises(QstarError, match="decode.select=implicit needs a policy trained by DPO"):
        decode_best_of_n(None, None, ["p1"], d, 0, None, before_bar, None, None)


def test_implicit_vote_weighs_each_answer_by_sigmoid_of_its_rewards(monkeypatch):
    groups = [["4|a", "5|b", "5|c"], ["4|d", "5|e", "5|f"]]
    gens = [[Generation(c, [k], [-0.5], True, False) for k, c in enumerate(g)] for g in groups]
    monkeypatch.setattr(pipeline.decoding.best_of_n, "sample_generations", lambda *a, **k: gens)
    rewards = {"4|a": 0.5, "5|b": 0.4, "5|c": 0.45, "4|d": 3.0, "5|e": -2.0, "5|f": -2.0}

    class FakeImplicit:
        def of_tokens(self, prompts, token_ids, logprobs):
            return [rewards[c] for g in groups for c in g]

    d = DecodeConfig(strategy=DecodeStrategy.best_of_n, n=3, select=Selection.implicit_vote)
    out = decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, before_bar, None, FakeImplicit())
    sig = [1 / (1 + math.exp(-r)) for r in (0.5, 0.4, 0.45, 3.0, -2.0)]
    assert sig[1] + sig[2] > sig[0] and sig[3] > 2 * sig[4]  # the sums the picks below follow
    # group 1: two votes for 5 outweigh 4's higher reward, and 5's best-rewarded candidate wins;
    # group 2: one confident vote for 4 outweighs two low-reward votes for 5
    assert out.completions == ["5|c", "4|d"]
    assert out.alternatives == {"majority": ["5|b", "5|e"], "implicit": ["4|a", "4|d"]}
    with pytest.raises(QstarError, match="decode.select=implicit_vote needs a policy trained by DPO"):
        decode_best_of_n(None, None, ["p1"], d, 0, None, before_bar, None, None)


def test_checked_majority_votes_over_the_samples_the_step_check_passes(monkeypatch):
    from pipeline.tasks.answers import extract_answer
    from pipeline.tasks.equations import false_equation

    groups = [["2 + 3 = 6\n6 + 1 = 7\nAnswer: 7", "2 + 3 = 6\n6 + 1 = 7\nAnswer: 7",
               "2 + 3 = 5\n5 + 1 = 6\nAnswer: 6"],
              ["1 + 1 = 3\nAnswer: 3", "1 + 1 = 3\nAnswer: 3"]]  # every sample flagged
    gens = [[Generation(c, [0] * 4, [-1.0] * 4, True, False) for c in g] for g in groups]
    monkeypatch.setattr(pipeline.decoding.best_of_n, "sample_generations", lambda *a, **k: gens)
    d = DecodeConfig(strategy=DecodeStrategy.best_of_n, n=3)
    out = decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, extract_answer, None, None,
                           false_equation)
    assert [extract_answer(c) for c in out.completions] == ["7", "3"]  # plain majority
    # the two samples answering 7 state 2 + 3 = 6: only the 6 passes; all flagged: all vote
    assert out.alternatives == {"checked_majority": [groups[0][2], groups[1][0]]}
    assert out.tokens == 20  # the samples decode as without the check
    without = decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, extract_answer)
    assert without.alternatives == {}
    d.select = Selection.checked_majority
    assert decode_best_of_n(None, None, ["p1", "p2"], d, 0, None, extract_answer, None, None,
                            false_equation).completions == [groups[0][2], groups[1][0]]
    with pytest.raises(QstarError, match="decode.select=checked_majority needs a check"):
        decode_best_of_n(None, None, ["p1"], d, 0, None, extract_answer)


def test_orm_weighted_vote_lets_agreement_outweigh_one_high_score():
    candidates = ["4|a", "5|b", "5|c", "5|d", "-|e"]
    scores = [0.9, 0.4, 0.35, 0.5, 1.0]
    assert pipeline.decoding.voting.orm_weighted_vote(candidates, scores, before_bar) == "5|d"
    assert pipeline.decoding.voting.orm_select(candidates, scores) == "-|e"
    # nothing extracted anywhere: plain ORM selection
    assert pipeline.decoding.voting.orm_weighted_vote(["-|a", "-|b"], [0.1, 0.7], before_bar) == "-|b"


def test_grade_scores_every_selection_of_the_same_samples():
    problems = [Problem("a", "q", "1", {}), Problem("b", "q", "2", {})]
    decoded = Decoded(["Answer: 1", "Answer: 3"], 10, extra={"select": "orm_vote"},
                      alternatives={"majority": ["Answer: 1", "Answer: 2"],
                                    "orm": ["Answer: 0", "Answer: 3"]},
                      row_extra=[{"candidates": ["Answer: 0", "Answer: 1"]},
                                 {"candidates": ["Answer: 3", "Answer: 4"]}],
                      alternatives_of="select")
    result = grade(SpyTask(problems, []), problems, decoded, "best_of_n", 1.0)
    assert [r["candidates"] for r in result.rows] == [["Answer: 0", "Answer: 1"],
                                                      ["Answer: 3", "Answer: 4"]]
    assert result.extra["pass_at_n"] == 0.5  # a has a correct candidate, b has none
    assert result.accuracy == 0.5
    assert result.extra["accuracy_by_select"] == {"orm_vote": 0.5, "majority": 1.0, "orm": 0.0}
    # each row says which rules got it right, so two rules compare problem by problem
    assert [r["correct_by_select"] for r in result.rows] == [
        {"orm_vote": True, "majority": True, "orm": False},
        {"orm_vote": False, "majority": True, "orm": False}]
    for rule, accuracy in result.extra["accuracy_by_select"].items():
        assert sum(r["correct_by_select"][rule] for r in result.rows) / 2 == accuracy
    assert [r["correct"] for r in result.rows] == [r["correct_by_select"]["orm_vote"]
                                                   for r in result.rows]
    assert "majority" in pipeline.stages.eval.format_table([result])
    assert "pass@n" in pipeline.stages.eval.format_table([result])


# ---------------------------------------------------------------- grade


class SpyTask(Task):
    """Held-out problems only; every grading call is logged."""

    def __init__(self, problems, log, correct=None):
        self.name = "spy"
        self._set_splits([], [], list(problems))
        self.log = log
        self.correct = correct

    def is_correct(self, problem, completion):
        self.log.append(("is_correct", problem.id, completion))
        if self.correct is not None:
            return self.correct(problem, completion)
        return super().is_correct(problem, completion)

    def grade(self, problem, answer):
        self.log.append(("grade", problem.id, answer))
        return answer == problem.answer


def test_grade_counts_with_task_is_correct():
    problems = [Problem(f"p{i}", f"q{i}", str(i), {}) for i in range(5)]
    completions = ["Answer: 0", "Answer: 7", "Answer: 2", "nothing", "Answer: 4"]
    log = []
    task = SpyTask(problems, log, correct=lambda p, c: c.endswith(p.answer))
    result = grade(task, problems, Decoded(completions, tokens=123, extra={"k": 1}), "greedy", 2.0)
    assert [entry[1:] for entry in log] == [(p.id, c) for p, c in zip(problems, completions)]
    assert result.correct == 3 and result.total == 5
    assert result.accuracy == pytest.approx(0.6)
    assert [r["correct"] for r in result.rows] == [True, False, True, False, True]
    assert [r["predicted"] for r in result.rows] == ["0", "7", "2", None, "4"]
    assert [r["id"] for r in result.rows] == [p.id for p in problems]
    assert result.tokens == 123 and result.tokens_per_s == pytest.approx(61.5)
    summary = result.summary()
    assert summary["k"] == 1 and summary["strategy"] == "greedy"
    assert summary["accuracy"] == pytest.approx(0.6)


def test_grade_with_default_is_correct_uses_grade():
    problems = [Problem("a", "q", "5", {}), Problem("b", "q2", "6", {})]
    log = []
    result = grade(SpyTask(problems, log), problems, Decoded(["Answer: 5", "Answer: 7"], 0),
                   "greedy", 0.0)
    assert result.correct == 1 and result.tokens_per_s == 0.0
    assert ("grade", "a", "5") in log and ("grade", "b", "7") in log


# ---------------------------------------------------------------- gold never reaches decoding


SENTINEL = "GOLD-SENTINEL-9f27c1"


@pytest.mark.parametrize("strategy", [DecodeStrategy.greedy, DecodeStrategy.sample,
                                      DecodeStrategy.best_of_n, DecodeStrategy.beam,
                                      DecodeStrategy.mcts])
def test_decoding_never_sees_gold(tiny_model, debug_overrides, monkeypatch, strategy):
    model, tokenizer = tiny_model
    cfg = compose_config(debug_overrides + ["search.simulations=3"])
    problems = [Problem(f"s{i}", f"What is {i} + {i + 2}?", f"{SENTINEL}-{i}",
                        {"answer": f"{SENTINEL}-{i}", "solution": f"#### {SENTINEL}"})
                for i in range(3)]
    log, prompts_seen = [], []
    task = SpyTask(problems, log)
    real_generate = pipeline.lm.generation.generate

    def spy_generate(model, tokenizer, prompts, **kwargs):
        log.append(("generate",))
        prompts_seen.extend(prompts)
        return real_generate(model, tokenizer, prompts, **kwargs)

    for module in (pipeline.lm.generation, pipeline.decoding.sampling,
                   pipeline.decoding.tree_search, pipeline.decoding.beam):
        monkeypatch.setattr(module, "generate", spy_generate)
    real_decode = pipeline.stages.eval.decode

    def spy_decode(*args, **kwargs):
        out = real_decode(*args, **kwargs)
        log.append(("decoded",))
        return out

    monkeypatch.setattr(pipeline.stages.eval, "decode", spy_decode)

    result = evaluate(cfg, strategy, model, tokenizer, task, problems)

    kinds = [entry[0] for entry in log]
    assert "generate" in kinds and kinds.count("decoded") == 1
    first_grading = min(i for i, k in enumerate(kinds) if k in ("is_correct", "grade"))
    assert kinds.index("decoded") < first_grading
    assert all(k in ("is_correct", "grade") for k in kinds[kinds.index("decoded") + 1:])
    # graded once per problem, after decoding; best-of-N also grades its n candidates for
    # pass@n and checked_majority's pick, MCTS the answer of each best_path rule (same trees)
    assert cfg.search.check_equations
    per_problem = {DecodeStrategy.best_of_n: 2 + cfg.decode.n,
                   DecodeStrategy.mcts: len(BestPath)}.get(strategy, 1)
    assert kinds.count("is_correct") == len(problems) * per_problem
    assert prompts_seen and not any(SENTINEL in p for p in prompts_seen)
    assert result.total == len(problems) and result.correct == 0
    assert not any(SENTINEL in r["completion"] for r in result.rows)
