"""pipeline.stages.search and pipeline.decoding.tree_search: the MCTS callbacks on the tiny model, the train/eval split of who may
score with the verifier, shards, leaf weights and fused rollouts."""

import inspect
import json
import time
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from test_prefix_cache import smol_tiny, smol_tokenizer, varied  # noqa: F401 fixtures

import pipeline.decoding.mcts as dm
import pipeline.decoding.tree_search as ts
import pipeline.stages.search as ss
from mcts import SearchParams
from mcts.search import Widening
from pipeline.compose import compose_config
from pipeline.config import CriticWeights, MergeMethod, SearchConfig, Termination
from pipeline.decoding.search_keys import option_end, search_params
from pipeline.decoding.tree_search import (
    LeafScorer,
    SearchModels,
    eval_search,
    train_search,
    weighted,
)
from pipeline.loop import open_loop
from pipeline.run.atomic import write_jsonl
from pipeline.run.store import RunStore, load_shards
from pipeline.run.transfer import RunFiles
from pipeline.stages.base import Loop
from pipeline.stages.search import (
    SearchJob,
    SearchWorker,
    expected_shards,
    missing_shards,
    search_spread,
    shard_path,
    summarize_search,
)
from pipeline.tasks.base import Problem, Task
from pipeline.tasks.prompt import render_prompts


class SpyTask(Task):
    """A verifier that logs its calls; "correct" = an even number of characters."""

    def __init__(self, problems):
        self.name = "spy"
        self._set_splits(list(problems), [], [])
        self.calls = []

    def is_correct(self, problem, completion):
        self.calls.append((problem.id, completion))
        return rule(completion)


def rule(text: str) -> bool:
    return len(text) % 2 == 0


def problems_(n: int) -> list[Problem]:
    return [Problem(f"p{i}", f"What is {i} + 1?", str(i + 1), {}) for i in range(n)]


def run_search_stage(cfg, iteration, problems, task, models, out):
    """The search stage's shard loop in-process, with models already loaded."""
    out.mkdir(parents=True, exist_ok=True)
    worker = SearchWorker(cfg)
    files = RunFiles(root=str(out))
    worker.models, worker.loaded = models, (files, "tiny", None)
    start = time.perf_counter()
    shards = expected_shards(problems, cfg.search.trees_per_batch)
    for k in missing_shards(shards, out):
        job = SearchJob(iteration, k, shards[k], task, files, "tiny", None)
        write_jsonl(shard_path(out, k), worker.run(job)["rows"])
    return summarize_search(load_shards(out), time.perf_counter() - start)


@pytest.fixture
def cfg(debug_overrides):
    return compose_config(debug_overrides)


@pytest.fixture
def models(tiny_model):
    model, tokenizer = tiny_model
    return SearchModels(policy=model, tokenizer=tokenizer)


def spy_search(monkeypatch):
    """Wrap pipeline.decoding.tree_search.search: record its kwargs and, per round, generate calls."""
    record = {"kwargs": [], "rounds": [], "generate": []}
    real_search, real_generate = ts.search, ts.generate

    def search(*args, **kwargs):
        record["kwargs"].append(kwargs)
        on_round = kwargs["on_round"]

        def counted(n):
            record["rounds"].append(len(record["generate"]))
            on_round(n)

        return real_search(*args, **dict(kwargs, on_round=counted))

    def generate(model, tokenizer, prompts, **kwargs):
        record["generate"].append((list(prompts), kwargs))
        return real_generate(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(ts, "search", search)
    monkeypatch.setattr(ts, "generate", generate)
    return record


# ---------------------------------------------------------------- who may use the verifier


def test_eval_search_never_calls_a_reward_function(cfg, models, monkeypatch):
    assert not {"task", "problems", "reward_fn"} & set(inspect.signature(eval_search).parameters)
    cfg.search.max_depth = 1  # every child is terminal: exactly where a verifier could sneak in
    cfg.search.simulations = 3
    record = spy_search(monkeypatch)

    def forbidden(self, requests):
        raise AssertionError("terminal_reward called at evaluation time")

    monkeypatch.setattr(LeafScorer, "terminal_reward", forbidden)
    prompts = render_prompts(models.tokenizer, ["What is 1 + 1?", "What is 2 + 5?"])
    trees, scorer = eval_search(prompts, cfg, models)
    assert record["kwargs"] and all(k["terminal_reward_fn"] is None for k in record["kwargs"])
    assert scorer.reward_fn is None
    terminals = [(t, n) for t in trees for n in range(1, t.num_nodes) if t.terminal[n]]
    assert terminals
    for tree, node in terminals:
        assert tree.terminal_reward[node] is None
        assert tree.total[node] is not None  # scored by evaluate (critics / confidence)


def test_train_search_calls_the_verifier_on_terminals_and_rollouts(cfg, models):
    cfg.search.max_depth = 2
    cfg.search.simulations = 4
    problems = problems_(2)
    task = SpyTask(problems)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, scorer = train_search(problems, task, prompts, cfg, models)
    assert scorer.reward_fn is not None
    calls = set(task.calls)
    by_terminal = by_rollout = 0
    for tree in trees:
        pid = problems[tree.tree_index].id
        for node in range(tree.num_nodes):
            if tree.total[node] is None:
                continue
            steps = "".join(tree.steps(node))
            if tree.terminal[node]:
                expected = 1.0 if rule(steps) else 0.0
                assert tree.terminal_reward[node] == expected == tree.total[node]
                assert (pid, steps) in calls
                by_terminal += 1
            else:
                assert tree.terminal_reward[node] is None
                solution = steps + scorer.rollouts[(tree.tree_index, node)].text
                assert (pid, solution) in calls
                assert tree.rollout[node] == (1.0 if rule(solution) else 0.0)
                by_rollout += 1
    assert by_terminal >= 1 and by_rollout >= 1
    assert {pid for pid, _ in task.calls} == {p.id for p in problems}


# ---------------------------------------------------------------- shards


def test_run_search_stage_writes_shards_and_resumes(cfg, models, tmp_path, monkeypatch):
    cfg.search.trees_per_batch = 2
    problems = problems_(4)
    task = SpyTask(problems)
    out = tmp_path / "iter_000" / "search"
    summary = run_search_stage(cfg, 0, problems, task, models, out)
    shards = sorted(p.name for p in out.iterdir())
    assert shards == ["shard_0000.jsonl", "shard_0001.jsonl"]
    rows = load_shards(out)
    assert [r["problem_id"] for r in rows] == ["p0", "p1", "p2", "p3"]
    for row, problem in zip(rows, problems):
        assert {"problem_id", "prompt", "tree", "rollouts", "iteration", "solved"} <= set(row)
        assert problem.question in row["prompt"] and row["iteration"] == 0
        assert row["tree"]["prompt"] == row["prompt"] and row["tree"]["nodes"][0]["id"] == 0
        assert all(k.isdigit() and int(k) < len(row["tree"]["nodes"]) for k in row["rollouts"])
    assert summary["problems"] == 4 and summary["nodes"] == sum(len(r["tree"]["nodes"])
                                                                 for r in rows)
    first = (out / "shard_0000.jsonl").read_bytes()

    searched = []
    real_train_search = ss.train_search

    def spy_train_search(shard, *args, **kwargs):
        searched.append([p.id for p in shard])
        return real_train_search(shard, *args, **kwargs)

    monkeypatch.setattr(ss, "train_search", spy_train_search)
    again = run_search_stage(cfg, 0, problems, task, models, out)
    assert searched == []  # both shards exist: nothing is searched again
    assert again["problems"] == 4 and (out / "shard_0000.jsonl").read_bytes() == first

    # a killed writer leaves a temporary file: it is not a shard, and the shard is redone
    (out / "shard_0001.jsonl").unlink()
    (out / ".tmp-shard_0001.jsonl-k1ll3d").write_text('{"problem_id": "p2", "tree": {')
    third = run_search_stage(cfg, 0, problems, task, models, out)
    assert searched == [["p2", "p3"]]
    assert third["problems"] == 4
    assert [r["problem_id"] for r in load_shards(out)] == ["p0", "p1", "p2", "p3"]


def test_search_problems_move_a_window_through_the_training_problems(cfg):
    pool = problems_(10)
    loop = Loop(cfg=cfg, store=None, cluster=None, task=None, train_problems=pool,
                eval_problems=[], base_policy="", tracker=None)

    def ids(i):
        return [p.id for p in loop.search_problems(i)]

    assert ids(0) == ids(7) == [p.id for p in pool]  # 0 (the default): all, every iteration
    cfg.search.problems_per_iteration = 4
    assert [ids(i) for i in range(3)] == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"],
                                          ["p8", "p9", "p0", "p1"]]  # wraps around the pool
    cfg.search.problems_per_iteration = 5
    assert sorted(ids(0) + ids(1)) == sorted(p.id for p in pool)  # k | n: each once per n/k
    assert ids(2) == ids(0)


def test_search_stage_searches_each_iterations_window(debug_overrides, tmp_path, monkeypatch):
    """The stage itself (not a copy of its loop) searches iteration i's window, under the
    iteration's own directory; a later iteration searches other problems."""
    cfg = compose_config(debug_overrides + ["search.problems_per_iteration=2",
                                            "search.trees_per_batch=1"])
    loop = open_loop(cfg, RunStore(tmp_path / "run"))
    base = loop.policy_ref(0)
    monkeypatch.setattr(Loop, "policy_ref", lambda self, i: base)  # no train stage in between
    monkeypatch.setattr(Loop, "critics_refs", lambda self, i: (None, []))
    train = [p.id for p in loop.train_problems]
    assert len(train) == 4
    searched = []
    for i in range(3):
        summary = ss.run(loop, i)
        searched.append([r["problem_id"] for r in load_shards(loop.store.stage_dir(i, "search"))])
        assert summary["problems"] == 2 and summary["shards"] == 2
    assert searched == [train[:2], train[2:], train[:2]]


def test_shard_killed_mid_write_is_not_taken_as_complete(cfg, models, tmp_path, monkeypatch):
    cfg.search.trees_per_batch = 2
    problems = problems_(2)
    task = SpyTask(problems)
    out = tmp_path / "search"
    real_rows = ss.shard_rows

    def dying_rows(*args, **kwargs):
        rows = real_rows(*args, **kwargs)
        yield rows[0]
        raise KeyboardInterrupt  # killed after the first row went to disk

    monkeypatch.setattr(ss, "shard_rows", dying_rows)
    with pytest.raises(KeyboardInterrupt):
        run_search_stage(cfg, 0, problems, task, models, out)
    assert not (out / "shard_0000.jsonl").exists()
    assert load_shards(out) == []
    monkeypatch.setattr(ss, "shard_rows", real_rows)
    summary = run_search_stage(cfg, 0, problems, task, models, out)
    assert summary["problems"] == 2 and [p.name for p in out.iterdir()] == ["shard_0000.jsonl"]


# ---------------------------------------------------------------- weights and mappings


@pytest.mark.parametrize("parts,weights,expected", [
    # all four parts: (0.3*0.5 + 0.2*0.2 + 0.2*0.9 + 0.3*1.0) / 1.0
    ({"value": 0.5, "prm": 0.2, "orm": 0.9, "rollout": 1.0}, (0.3, 0.2, 0.2, 0.3), 0.67),
    # no PRM yet: its weight leaves the denominator: (0.3*0.5 + 0.2*0.9 + 0.3*1.0) / 0.8
    ({"value": 0.5, "orm": 0.9, "rollout": 1.0}, (0.3, 0.2, 0.2, 0.3), 0.7875),
    # rollout alone (iteration 0): its own value, whatever its weight
    ({"rollout": 0.4}, (0.3, 0.2, 0.2, 0.3), 0.4),
    ({"rollout": 0.25}, (0.0, 0.0, 0.0, 1.0), 0.25),
    # a zero-weight part does not count while another part has weight
    ({"value": 0.9, "rollout": 0.6}, (1.0, 0.0, 0.0, 0.0), 0.9),
    # only zero-weight parts exist (weights {rollout: 1} at evaluation): their plain mean
    ({"value": 0.9, "rollout": 0.6}, (0.0, 1.0, 1.0, 0.0), 0.75),
    ({"value": 0.9}, (0.0, 1.0, 1.0, 1.0), 0.9),
    ({}, (0.3, 0.2, 0.2, 0.3), 0.0),
    # clamped to [0, 1]
    ({"value": 3.0, "rollout": 1.0}, (0.5, 0.0, 0.0, 0.5), 1.0),
    ({"value": -2.0, "rollout": 0.0}, (0.5, 0.0, 0.0, 0.5), 0.0),
])
def test_weighted(parts, weights, expected):
    w = CriticWeights(*weights)
    assert weighted(parts, w) == pytest.approx(expected)


def test_option_end_from_search_config():
    s = SearchConfig(termination=Termination.step_marker, step_regex=r"Step \d+:",
                     max_option_tokens=17)
    end = option_end(s)
    assert (end.kind, end.regex, end.max_tokens) == ("step_marker", r"Step \d+:", 17)
    assert end.cut("Step 1: a\nStep 2: b") == "Step 1: a\n"
    for kind in (Termination.newline, Termination.sentence, Termination.token_cap):
        end = option_end(SearchConfig(termination=kind, max_option_tokens=5))
        assert (end.kind, end.regex, end.max_tokens) == (kind.value, None, 5)


def test_search_params_from_search_config():
    s = SearchConfig(simulations=7, token_budget=300, c_puct=1.7, max_depth=5, c_min=1, c_max=4,
                     root_c_min=2, root_c_max=6, alpha=2.5, merge=MergeMethod.edit,
                     merge_threshold=0.8, merge_retries=3, virtual_loss=0.5, leaves_per_tree=3,
                     widening=Widening.first, evaluate_root=False, seed=11)
    p = search_params(s)
    assert isinstance(p, SearchParams)
    for f in fields(SearchParams):
        assert getattr(p, f.name) == getattr(s, f.name), f.name
    s.merge = MergeMethod.none
    assert search_params(s).merge_threshold > 1  # nothing is ever similar enough: merging off
    s.merge = MergeMethod.embedding
    assert search_params(s).merge_threshold == 0.8


# ---------------------------------------------------------------- seeds


def test_expand_honours_each_requests_seed(cfg, models):
    """The same request alone or batched with others (first or not) gives the same options."""
    from mcts.types import ExpandRequest

    cfg.search.temperature = 1.0
    prompts = render_prompts(models.tokenizer, ["What is 1 + 1?", "What is 7 * 3?", "Hi"])
    mine = ExpandRequest(0, 0, prompts[0], [], num_options=3, seed=1234)
    others = [ExpandRequest(1, 0, prompts[1], [], 2, seed=99),
              ExpandRequest(2, 4, prompts[2], [], 4, seed=5)]
    scorer = LeafScorer(cfg, models, reward_fn=None)

    def same(a, b):  # log-probs differ by float noise from the padding, nothing else
        assert [(o.text, o.num_tokens, o.terminal) for o in a] == \
            [(o.text, o.num_tokens, o.terminal) for o in b]
        assert [o.logprob for o in a] == pytest.approx([o.logprob for o in b], abs=1e-4)

    alone = scorer.expand([mine])[0]
    same(alone, scorer.expand(others + [mine])[-1])
    same(alone, scorer.expand([mine] + others[::-1])[0])
    reseeded = ExpandRequest(0, 0, prompts[0], [], num_options=3, seed=4321)
    assert [o.text for o in scorer.expand([reseeded])[0]] != [o.text for o in alone]


# ---------------------------------------------------------------- fused rollouts


def test_fused_rollouts_one_generate_call_per_round(cfg, models, monkeypatch):
    cfg.search.simulations = 6
    cfg.search.merge = MergeMethod.none  # no resampling rounds: one expansion call per round
    cfg.search.stream = False  # lock-step rounds: one `generate` call per round, countable
    assert cfg.search.rollout.enabled and cfg.search.rollout.model is None
    record = spy_search(monkeypatch)
    prompts = render_prompts(models.tokenizer, ["What is 1 + 1?", "What is 2 + 2?"])
    trees, scorer = eval_search(prompts, cfg, models)
    assert scorer.fused
    calls, rounds = record["generate"], record["rounds"]
    expansions = [c for c in calls if c[1].get("rollout_tokens", 0) > 0]
    separate = [c for c in calls if not c[1].get("rollout_tokens", 0)]
    # every expansion generates the option and its rollout together ...
    assert expansions and all(c[1]["rollout_tokens"] == cfg.search.rollout.max_new_tokens
                              for c in expansions)
    # ... so the only separate rollout call is the roots' own evaluation, in the first round
    assert len(separate) == 1 and sorted(separate[0][0]) == sorted(prompts)
    # on_round runs once per tree per round; both trees' rounds share each call
    per_round = [b - a for a, b in zip([0] + rounds, rounds)]
    assert per_round[0] == 2 and all(n <= 1 for n in per_round[1:])
    assert len(expansions) <= len(rounds) // len(prompts) + 1
    # every evaluated non-root, non-terminal node got its rollout from its expansion
    for tree in trees:
        for node in range(1, tree.num_nodes):
            if tree.total[node] is not None and not tree.terminal[node]:
                assert scorer.rollouts[(tree.tree_index, node)].tokens > 0


def test_separate_rollout_model_needs_more_calls(cfg, models, monkeypatch):
    cfg.search.simulations = 6
    cfg.search.merge = MergeMethod.none
    cfg.search.stream = False  # lock-step rounds: `generate` calls, countable
    separate_models = SearchModels(policy=models.policy, tokenizer=models.tokenizer,
                                   rollout_model=models.policy,
                                   rollout_tokenizer=models.tokenizer)
    record = spy_search(monkeypatch)
    prompts = render_prompts(models.tokenizer, ["What is 1 + 1?", "What is 2 + 2?"])
    _, scorer = eval_search(prompts, cfg, separate_models)
    assert not scorer.fused
    calls = record["generate"]
    assert all(not c[1].get("rollout_tokens") for c in calls)  # options only, no fused rollout
    rollout_calls = [c for c in calls if "stop" not in c[1] or c[1]["stop"] is None]
    assert len(rollout_calls) >= 2  # the roots' and later leaves' rollouts each cost a call
    fused_record = spy_search(monkeypatch)
    eval_search(prompts, cfg, models)
    assert len(calls) > len(fused_record["generate"])  # fused: only the roots' rollouts apart


@pytest.mark.parametrize("separate", [False, True])
def test_sampled_rollouts_are_seeded_per_node(cfg, models, monkeypatch, separate):
    """search.rollout.temperature > 0: rollouts are sampled (fused, or by a separate rollout model
    with one seed per node), and the same search gives the same rollouts."""
    cfg.search.simulations = 6
    cfg.search.rollout.temperature = 1.0
    cfg.search.stream = False  # lock-step: fused expansions are `generate` calls, inspectable
    searching = models if not separate else SearchModels(
        policy=models.policy, tokenizer=models.tokenizer, rollout_model=models.policy,
        rollout_tokenizer=models.tokenizer)
    prompts = render_prompts(models.tokenizer, ["What is 1 + 1?", "What is 2 + 2?"])
    record = spy_search(monkeypatch)
    _, first = eval_search(prompts, cfg, searching)
    _, again = eval_search(prompts, cfg, searching)
    assert {k: r.text for k, r in first.rollouts.items()} == \
        {k: r.text for k, r in again.rollouts.items()}
    fused = [c[1] for c in record["generate"] if c[1].get("rollout_tokens")]
    alone = [(c[0], c[1]) for c in record["generate"] if c[1].get("stop") is None]
    assert all(k["rollout_temperature"] == 1.0 for k in fused)
    assert bool(fused) != separate
    assert alone and all(k["temperature"] == 1.0 and len(k["seeds"]) == len(p) for p, k in alone)


# ---------------------------------------------------------------- the STaR baseline's sampler


def test_sample_algorithm_builds_verified_depth_one_trees(cfg, models, tmp_path):
    from pipeline.config import SearchAlgorithm
    from pipeline.stages.data import write_data
    from pipeline.stages.search import shard_rows

    cfg.search.algorithm = SearchAlgorithm.sample
    cfg.search.simulations = 5
    problems = problems_(3)
    task = SpyTask(problems)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, scorer = train_search(problems, task, prompts, cfg, models)
    assert len(task.calls) == 15  # every sample verified once, nothing else generated
    for tree, problem in zip(trees, problems):
        kids = tree.children[0]
        assert len(kids) == 5 and all(tree.terminal[k] and tree.depth[k] == 1 for k in kids)
        rewards = [1.0 if rule(tree.text[k]) else 0.0 for k in kids]
        assert [tree.terminal_reward[k] for k in kids] == rewards
        assert {(problem.id, tree.text[k]) for k in kids} <= set(task.calls)
        assert tree.visits[0] == 5 and tree.q(0) == pytest.approx(sum(rewards) / 5)
        assert tree.stats.total_tokens == sum(tree.num_tokens[k] for k in kids) > 0
    counts = write_data(shard_rows(trees, scorer, problems, 0), 0, cfg.train.pairs, tmp_path)
    solved = sum(any(tree.terminal_reward[k] == 1.0 for k in tree.children[0]) for tree in trees)
    assert counts["sft"] == solved


# ---------------------------------------------------------------- best_path=vote


def voting_tree():
    """Most visits lead to answer 3; the tree's solutions, weighted by visits, vote for 4."""
    from types import SimpleNamespace

    from mcts import Tree
    from pipeline.decoding.tree_search import Rollout

    tree = Tree("P:")
    a = tree.add_node(0, "x\n", 2, -1.0, terminal=False)
    b = tree.add_node(0, "y\n", 2, -1.0, terminal=False)
    t1 = tree.add_node(a, "Answer: 3\n", 3, -1.0, terminal=True)
    t2 = tree.add_node(b, "Answer: 4\n", 3, -1.0, terminal=True)
    for node, visits in ((a, 5), (b, 4), (t1, 3), (t2, 2)):
        tree.visits[node] = visits
    rollouts = {(0, b): Rollout("Answer: 4\n", 3, -0.1, finished=True),
                (0, a): Rollout("Answer: 4", 3, -0.1, finished=False)}  # cut short: not counted
    return tree, SimpleNamespace(rollouts=rollouts, step_check=None)


def extract(text):
    return text.rsplit("Answer: ", 1)[1].strip() if "Answer: " in text else None


def test_vote_completion_weighs_answers_by_visits_over_the_whole_tree():
    from pipeline.decoding.mcts import vote_completion

    tree, scorer = voting_tree()
    # answer 3: node t1 (3 visits); answer 4: t2 (2) + b's finished rollout (4) = 6
    assert vote_completion(tree, scorer, extract) == "y\nAnswer: 4\n"
    # the most-visited path (a -> t1) would have answered 3
    assert dm.completion_of(tree, scorer) == "x\nAnswer: 3\n"
    assert vote_completion(tree, scorer, lambda text: None) == "x\nAnswer: 3\n"


def test_majority_counts_each_solution_once_whatever_its_visits():
    from pipeline.decoding.mcts import vote_completion

    tree, scorer = voting_tree()
    tree.visits[3] = 10  # t1: answer 3 now outweighs answer 4 by visits (10 against 2 + 4)
    assert vote_completion(tree, scorer, extract) == "x\nAnswer: 3\n"
    # ... but two solutions answer 4 (t2 and b's finished rollout) and one answers 3
    assert vote_completion(tree, scorer, extract, by_visits=False) == "y\nAnswer: 4\n"


@pytest.mark.parametrize("rule", ["visits", "q", "vote", "majority", "draws"])
def test_decode_mcts_grades_every_best_path_rule_on_the_same_trees(monkeypatch, rule):
    from pipeline.stages.eval import grade

    tree, scorer = voting_tree()
    tree.value_sum[2], tree.visits[2] = 3.6, 4  # Q(b) 0.9 > Q(a) 0.5: highest Q goes to b
    tree.value_sum[1] = 2.5
    tree.draws[2] = 2  # b was sampled twice: draws go to answer 4 (2/3)
    monkeypatch.setattr(dm, "eval_search", lambda prompts, cfg, models, desc: ([tree], scorer))
    cfg = compose_config(["debug=default", f"search.best_path={rule}"])
    out = dm.decode_mcts(cfg, None, None, ["P:"], None, None, extract)
    expected = {"visits": "x\nAnswer: 3\n", "q": "y\nAnswer: 4\n", "vote": "y\nAnswer: 4\n",
                "majority": "y\nAnswer: 4\n", "draws": "y\nAnswer: 4\n"}
    assert out.completions == [expected[rule]] and out.extra["best_path"] == rule
    assert out.alternatives == {k: [v] for k, v in expected.items() if k != rule}
    problem = Problem("p", "q", "4", {})
    task = SimpleNamespace(is_correct=lambda p, c: extract(c) == p.answer, extract_answer=extract)
    result = grade(task, [problem], out, "mcts", 1.0)
    assert result.extra["accuracy_by_best_path"] == {"visits": 0.0, "q": 1.0, "vote": 1.0,
                                                     "majority": 1.0, "draws": 1.0}
    assert result.accuracy == result.extra["accuracy_by_best_path"][rule]
    assert result.rows[0]["correct_by_best_path"] == {"visits": False, "q": True, "vote": True,
                                                      "majority": True, "draws": True}


# ---------------------------------------------------------------- streaming expansions


FLOAT_KEYS = ("logprob", "prior", "value_sum", "q", "total", "value", "prm", "orm", "rollout")


def _tree_records(trees) -> tuple[list, list]:
    """(what must be equal, the floats): texts, structure, visits and token counts exactly; the
    values and log-probs to float noise (another batch composition moves logits by ~1e-7)."""
    exact, floats = [], []
    for tree in trees:
        record = json.loads(json.dumps(tree.to_json()))
        record["stats"]["seconds"] = 0.0
        for key in ("q_min", "q_max"):
            floats.append(record.pop(key))
        for node in record["nodes"]:
            floats += [node.pop(key) or 0.0 for key in FLOAT_KEYS]
        exact.append(record)
    return exact, floats


@pytest.mark.parametrize("training", [False, True])
def test_streaming_expansions_give_the_lock_step_trees(cfg, models, monkeypatch, training):
    """search.stream: each tree resumes as soon as its own rows end, and its next round joins
    the running batch while other trees' rows decode; every tree is the one lock-step rounds
    build (per-row seeds), with sampled options and sampled fused rollouts."""
    from pipeline.lm.generation import Decoder

    cfg.search.simulations = 8
    cfg.search.temperature = 1.0
    cfg.search.rollout.temperature = 1.0
    cfg.decode.batch_size = 6
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    joined_busy = []
    real_submit = Decoder.submit

    def submit(self, rows, seeds=None, groups=None, checks=None):
        joined_busy.append(self.busy)
        return real_submit(self, rows, seeds, groups, checks)

    monkeypatch.setattr(Decoder, "submit", submit)

    def run(stream: bool):
        cfg.search.stream = stream
        if training:
            return train_search(problems, SpyTask(problems), prompts, cfg, models)
        return eval_search(prompts, cfg, models)

    (locked, locked_scorer), (streamed, streamed_scorer) = run(False), run(True)
    exact, floats = _tree_records(streamed)
    assert exact == _tree_records(locked)[0]
    assert floats == pytest.approx(_tree_records(locked)[1], abs=1e-4)
    assert {k: r.text for k, r in streamed_scorer.rollouts.items()} == \
        {k: r.text for k, r in locked_scorer.rollouts.items()}
    assert sum(t.num_nodes for t in streamed) > 4 * 3  # the trees grew past their roots
    assert any(joined_busy)  # some tree's rows were submitted while others decoded


def decoded_rows(monkeypatch) -> list:
    """Every row the decoder finishes from now on (its Generation), in order; rows a search
    replays from tokens decoded earlier (search.reuse_rollouts) are not decoded, so not here."""
    from pipeline.lm import generation

    rows, real = [], generation.row_result

    def spy(tokenizer, row, stop):
        rows.append(real(tokenizer, row, stop))
        return rows[-1]

    monkeypatch.setattr(generation, "row_result", spy)
    return rows


def tokens_of(rows: list) -> int:
    return sum(g.num_tokens + g.rollout_tokens for g in rows)


@pytest.mark.parametrize("stream", [False, True])
def test_the_budget_counts_every_token_the_search_decodes(cfg, models, monkeypatch, stream):
    """Every token decoded for a search is in its trees' total_tokens: the options, the rollouts
    of the leaves evaluated, and the fused rollouts of options the merge dropped (their rows
    decode the rollout before the merge sees the option)."""
    decoded = decoded_rows(monkeypatch)
    cfg.search.simulations = 8
    cfg.search.stream = stream
    cfg.search.merge_threshold = 0.01  # nearly every sibling a duplicate: the merge drops many
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])
    trees, scorer = train_search(problems, SpyTask(problems), prompts, cfg, models)
    assert scorer.fused and sum(t.stats.merges for t in trees) > 0
    dropped_rollouts = tokens_of(decoded) - sum(
        t.stats.tokens_generated for t in trees) - sum(r.tokens for r in scorer.rollouts.values())
    assert dropped_rollouts > 0  # some merged option had decoded its rollout
    assert sum(t.stats.total_tokens for t in trees) == tokens_of(decoded)


@pytest.mark.parametrize("stream", [False, True])
def test_cutting_repeated_options_changes_no_tree(cfg, models, monkeypatch, stream):
    """search.cut_repeats: a row repeating a sibling row's option stops at its boundary. The
    merge drops such a repeat whatever it decoded, so the trees (texts, structure, visits,
    values, rollouts) are those built without the cut; only the decoded tokens fall, and the
    budget still counts every one of them."""
    decoded = decoded_rows(monkeypatch)
    cfg.search.simulations = 8
    cfg.search.stream = stream
    cfg.search.temperature = 0.2  # nearly greedy: siblings often repeat each other
    problems = problems_(4)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])

    def run(on: bool):
        decoded.clear()
        cfg.search.cut_repeats = on
        trees, scorer = train_search(problems, SpyTask(problems), prompts, cfg, models)
        exact, floats = _tree_records(trees)
        for record in exact:
            record.pop("stats")
        return exact, floats, trees, scorer, tokens_of(decoded), sum(g.cut for g in decoded)

    on, off = run(True), run(False)
    assert on[5] > 0 and off[5] == 0  # repeats were cut, and only with the switch on
    assert on[0] == off[0] and on[1] == pytest.approx(off[1], abs=1e-4)
    assert {k: r.text for k, r in on[3].rollouts.items()} == {k: r.text for k, r in off[3].rollouts.items()}
    total = [sum(t.stats.total_tokens for t in side[2]) for side in (on, off)]
    assert total == [on[4], off[4]]  # every decoded token counted, on both sides
    assert total[0] < total[1]


@pytest.fixture(scope="module")
def smol_ending(request):
    """smol_tiny (SmolLM2's real tokenizer) writing mostly a few tokens, among them "\n", "\n\n"
    (one BPE token) and EOS, so that its lines and rollouts end: every other row of its output
    layer is zeroed."""
    import copy

    model, tokenizer = request.getfixturevalue("smol_tiny")
    model = copy.deepcopy(model)
    few = tokenizer.convert_tokens_to_ids(["Ċ", "ĊĊ", "Ġ+", "Ġ=", "2", "3", "Answer", ":"])
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        kept = head[few + [tokenizer.eos_token_id]].clone() * 4
        head.zero_()
        head[few + [tokenizer.eos_token_id]] = kept
    return model, tokenizer


@pytest.mark.parametrize("which", ["varied", "smol_ending"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_reused_option_is_its_parents_rollout_cut_at_its_first_boundary(cfg, monkeypatch,
                                                                          request, which, stream):
    """search.reuse_rollouts: a node's first expansion reads one option off the node's own
    (finished) rollout. That child's step and its rollout are the parent's rollout split at its
    first boundary (a terminal child: the rollout ended there); the budget counts every decoded
    token once; and the search decodes fewer tokens per node than sampling every option. With
    models whose rollouts end (EOS), over the per-character and SmolLM2's real tokenizer."""
    models = SearchModels(*request.getfixturevalue(which))
    decoded = decoded_rows(monkeypatch)
    cfg.search.simulations = 8
    cfg.search.stream = stream
    cfg.search.rollout.max_new_tokens = 48
    problems = problems_(6)
    prompts = render_prompts(models.tokenizer, [p.question for p in problems])

    def run(reuse: bool):
        decoded.clear()
        cfg.search.reuse_rollouts = reuse
        return train_search(problems, SpyTask(problems), prompts, cfg, models)

    trees, scorer = run(True)
    assert sum(t.stats.total_tokens for t in trees) == tokens_of(decoded)
    assert sum(t.stats.reused for t in trees) == scorer.reuse.reused
    split = 0
    for tree in trees:
        for node, children in enumerate(tree.children):
            mine = scorer.rollouts.get((tree.tree_index, node))
            if not (mine and mine.text and children):
                continue
            first = scorer.rollouts.get((tree.tree_index, children[0]))  # none: verified terminal
            text = tree.text[children[0]]
            split += mine.text == text + (first.text if first else "") or (
                tree.terminal[children[0]] and mine.text.startswith(text))
    assert scorer.reuse.reused > 0 and split >= scorer.reuse.reused
    assert {(t, n) for t, n in scorer.reuse.kept} <= set(scorer.rollouts)  # never expanded yet
    tokens = [sum(t.stats.total_tokens for t in side) / sum(len(t.text) for t in side)
              for side in (trees, run(False)[0])]
    assert tokens[0] < tokens[1]  # decoded tokens per node


def test_only_a_policy_sample_at_the_options_temperature_is_reused(cfg, models):
    """A rollout is read as a node's option only where it is one: the policy rolling out at
    search.temperature."""
    cfg.search.reuse_rollouts = True
    assert LeafScorer(cfg, models, reward_fn=None).reuse is not None
    cfg.search.rollout.temperature = cfg.search.temperature / 2
    assert LeafScorer(cfg, models, reward_fn=None).reuse is None
    cfg.search.rollout.temperature = cfg.search.temperature
    other = SearchModels(models.policy, models.tokenizer, rollout_model=models.policy,
                         rollout_tokenizer=models.tokenizer)
    assert LeafScorer(cfg, other, reward_fn=None).reuse is None
    cfg.search.reuse_rollouts = False
    assert LeafScorer(cfg, models, reward_fn=None).reuse is None


def test_an_option_keeps_its_first_rows_rollout(cfg, models):
    """Two rows that wrote one option (the cut off, or the same text from other tokens): the
    option is evaluated with the first row's fused rollout, as the merge keeps the first row;
    a cut row leaves no rollout behind."""
    from mcts.types import ExpandRequest
    from pipeline.lm.stopping import Generation

    scorer = LeafScorer(cfg, models, reward_fn=None)
    assert scorer.fused
    request = ExpandRequest(0, 0, "prompt", ["Step 1\n"], num_options=3, seed=1)

    def row(rollout: str, cut: bool = False) -> Generation:
        return Generation(text="12 + 3 = 15\n", token_ids=[1, 2], logprobs=[-0.1, -0.2], finished=False,
                          stopped=True, rollout=rollout, rollout_logprobs=[-0.5] * len(rollout), cut=cut)

    options = scorer.options([request], ["prompt"] * 3, [row("", cut=True), row("ab"), row("xyz")])[0]
    assert [o.rollout_tokens for o in options] == [0, 2, 3]  # each row's decoded tokens, counted
    assert scorer.pending[(0, "Step 1\n12 + 3 = 15\n")].text == "ab"


def _spread_row(nodes: list[tuple[int, float, bool, float | None]]) -> dict:
    """A shard row whose tree holds a root and these (num_tokens, logprob, terminal, reward)."""
    root = {"num_tokens": 0, "logprob": 0.0, "terminal": False, "terminal_reward": None}
    return {"tree": {"nodes": [root] + [{"num_tokens": t, "logprob": lp, "terminal": term,
                                         "terminal_reward": r} for t, lp, term, r in nodes]}}


def test_search_spread_counts_contrast_and_the_options_log_prob_per_token():
    """contrast: a tree with a correct and a wrong terminal (not one with only either, nor one
    whose wrong leaf is unfinished); the log-prob per token weighs each option by its tokens."""
    rows = [_spread_row([(4, -2.0, False, None), (6, -1.0, True, 1.0), (2, -1.0, True, 0.0)]),
            _spread_row([(3, -3.0, True, 1.0), (5, -1.0, False, None)]),  # correct only
            _spread_row([(2, -0.5, True, 0.0), (2, -0.5, True, 0.0)])]  # wrong only
    spread = search_spread(rows)
    assert spread["contrast_problems"] == 1
    assert spread["option_logp_per_token"] == round(-9.0 / 24, 4)  # not the mean of the ratios
    assert search_spread([_spread_row([])]) == {"option_logp_per_token": None, "contrast_problems": 0}
