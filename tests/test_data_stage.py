"""Data stage: hand-built trees -> golden DPO/SFT rows, selection rules, lineage, files."""

import json
import os
from pathlib import Path

import pytest

from mcts import SearchParams, search
from mcts.fake import FakeCritic, FakePolicy, FakeVerifier
from mcts.tree import Tree
from pipeline.config import PairsConfig
from pipeline.run.atomic import read_jsonl
from pipeline.run.store import load_shards
from pipeline.stages.data import build_rows, verified_completions, write_data

GOLDEN = Path(__file__).parent / "golden"
PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def node(id, parent, text, visits, q, terminal=False, reward=None):
    """One node of a Tree.to_json() record; the fields the data stage ignores are filler."""
    depth = 0 if parent < 0 else None  # filled in by tree()
    return {"id": id, "parent": parent, "depth": depth, "text": text, "num_tokens": len(text),
            "logprob": -1.0, "prior": 0.5, "visits": visits, "value_sum": q * visits, "q": q,
            "total": reward if reward is not None else q, "value": 0.0, "prm": 0.0, "orm": 0.0,
            "rollout": 0.0, "terminal": terminal, "terminal_reward": reward, "merges": 0,
            "expand_target": 0, "expand_requests": 0}


def tree(question, nodes):
    for n in nodes:
        n["depth"] = 0 if n["parent"] < 0 else nodes[n["parent"]]["depth"] + 1
    data = {"version": 1, "prompt": PROMPT.format(question), "tree_index": 0,
            "stats": {"simulations": 0, "tokens_generated": 0, "evaluator_tokens": 0, "merges": 0,
                      "seconds": 0.0, "stop_reason": "simulations"},
            "q_min": 0.0, "q_max": 1.0, "best_trajectory": [0], "best_text": "",
            "best_trajectory_q": [0], "best_text_q": "", "nodes": nodes}
    Tree.from_json(data)  # the real format: from_json refuses a malformed record
    return data


def shard_row(problem_id, question, nodes, iteration=0):
    t = tree(question, nodes)
    return {"problem_id": problem_id, "iteration": iteration, "prompt": t["prompt"],
            "question": question, "tree": t}


def tree_add():
    """2 + 3: a good and a bad first step, correct and wrong answers under both."""
    return [
        node(0, -1, "", 12, 0.6),
        node(1, 0, "Step 1: add 2 and 3\n", 6, 0.8),
        node(2, 0, "Step 1: multiply 2 by 3\n", 3, 0.3),
        node(3, 1, "Answer: 5\n", 3, 1.0, terminal=True, reward=1.0),
        node(4, 1, "Answer: 6\n", 2, 0.0, terminal=True, reward=0.0),
        node(5, 1, "Answer: 5.\n", 1, 1.0, terminal=True, reward=1.0),
        node(6, 2, "Answer: 6\n", 2, 0.0, terminal=True, reward=0.0),
        node(7, 2, "Step 2: check it\n", 1, 0.9),
        node(8, 0, "Step 1: guess\n", 1, 0.5),
    ]


def tree_mul():
    """4 * 5: Q gaps at the margin's edge (0.7 - 0.5 is 0.19999999999999996) and below it; no
    correct answer, so no trajectory pair and no SFT row."""
    return [
        node(0, -1, "", 8, 0.5),
        node(1, 0, "Step 1: 4 * 5 = 20\n", 3, 0.7),
        node(2, 0, "Step 1: 4 + 5 = 9\n", 4, 0.5),
        node(3, 1, "Answer: 21\n", 1, 0.0, terminal=True, reward=0.0),
        node(4, 2, "Step 2: so 9\n", 2, 0.6),
        node(5, 2, "Step 2: hence 9\n", 2, 0.45),
    ]


def golden_shards():
    return [shard_row("p-mul", "What is 4 * 5?", tree_mul()),
            shard_row("p-add", "What is 2 + 3?", tree_add())]


def by_nodes(rows, kind):
    return {tuple(r["lineage"]["node_ids"]): r for r in rows if r["lineage"]["kind"] == kind}


def test_golden_rows():
    dpo, sft = build_rows(golden_shards(), 0, PairsConfig())
    got = json.loads(json.dumps({"dpo": dpo, "sft": sft}))
    path = GOLDEN / "data_rows.json"
    if os.environ.get("QSTAR_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


def test_step_pairs_highest_vs_lowest_q_with_prompt_so_far():
    dpo, _ = build_rows([shard_row("p-add", "What is 2 + 3?", tree_add())], 0,
                        PairsConfig(trajectory_pairs=False))
    steps = by_nodes(dpo, "step")
    assert set(steps) == {(1, 2), (3, 4), (7, 6)}  # root, node 1, node 2
    root = steps[(1, 2)]  # node 8 (Q 0.5) is neither the highest nor the lowest
    assert root["prompt"] == PROMPT.format("What is 2 + 3?")
    assert (root["chosen"], root["rejected"]) == ("Step 1: add 2 and 3\n", "Step 1: multiply 2 by 3\n")
    under_1 = steps[(3, 4)]  # nodes 3 and 5 tie on Q 1.0: more visits wins
    assert under_1["prompt"] == PROMPT.format("What is 2 + 3?") + "Step 1: add 2 and 3\n"
    assert (under_1["chosen"], under_1["rejected"]) == ("Answer: 5\n", "Answer: 6\n")
    assert steps[(7, 6)]["prompt"].endswith("assistant\nStep 1: multiply 2 by 3\n")
    assert under_1["lineage"] == {
        "iteration": 0, "problem_id": "p-add", "kind": "step", "prefix_node": 1,
        "node_ids": [3, 4], "q": [1.0, 0.0], "visits": [3, 2], "terminal": [True, True],
        "reward": [1.0, 0.0]}
    assert steps[(1, 2)]["lineage"]["terminal"] == [False, False]
    assert steps[(1, 2)]["lineage"]["reward"] == [None, None]


def test_n_min_filters_siblings_before_choosing():
    dpo, _ = build_rows([shard_row("p-add", "What is 2 + 3?", tree_add())], 0,
                        PairsConfig(n_min=2, trajectory_pairs=False))
    # node 7 and node 5 (1 visit) drop out: under node 2 only node 6 is left, no pair
    assert set(by_nodes(dpo, "step")) == {(1, 2), (3, 4)}
    dpo, _ = build_rows([shard_row("p-add", "What is 2 + 3?", tree_add())], 0,
                        PairsConfig(n_min=4, trajectory_pairs=False))
    assert dpo == []  # only node 1 has 4 visits


def test_margin_with_float_tolerance():
    rows = [shard_row("p-mul", "What is 4 * 5?", tree_mul())]
    dpo, sft = build_rows(rows, 0, PairsConfig(margin=0.2))
    assert 0.7 - 0.5 < 0.2
    assert set(by_nodes(dpo, "step")) == {(1, 2)}  # the 0.6 vs 0.45 pair (gap 0.15) is dropped
    assert sft == [] and by_nodes(dpo, "trajectory") == {}
    dpo, _ = build_rows(rows, 0, PairsConfig(margin=0.1))
    assert set(by_nodes(dpo, "step")) == {(1, 2), (4, 5)}
    dpo, _ = build_rows(rows, 0, PairsConfig(margin=0.21))
    assert dpo == []


def test_zero_gap_and_identical_texts_make_no_pair():
    nodes = [node(0, -1, "", 4, 0.5), node(1, 0, "Step 1: a\n", 2, 0.5),
             node(2, 0, "Step 1: b\n", 2, 0.5)]
    assert build_rows([shard_row("p", "q", nodes)], 0, PairsConfig(margin=0.0)) == ([], [])
    nodes = [node(0, -1, "", 4, 0.5), node(1, 0, "Step 1: a\n", 2, 0.9),
             node(2, 0, "Step 1: a\n", 2, 0.1)]
    assert build_rows([shard_row("p", "q", nodes)], 0, PairsConfig(margin=0.0)) == ([], [])


def test_trajectory_pairs_zip_correct_with_incorrect():
    dpo, _ = build_rows([shard_row("p-add", "What is 2 + 3?", tree_add())], 0, PairsConfig())
    traj = by_nodes(dpo, "trajectory")
    assert set(traj) == {(3, 4), (5, 6)}  # best correct with the most visited wrong, and so on
    first = traj[(3, 4)]
    assert first["prompt"] == PROMPT.format("What is 2 + 3?")
    assert first["chosen"] == "Step 1: add 2 and 3\nAnswer: 5\n"
    assert first["rejected"] == "Step 1: add 2 and 3\nAnswer: 6\n"
    assert traj[(5, 6)]["rejected"] == "Step 1: multiply 2 by 3\nAnswer: 6\n"
    assert first["lineage"]["prefix_node"] == 0 and first["lineage"]["q"] == [1.0, 0.0]
    dpo, _ = build_rows([shard_row("p-add", "What is 2 + 3?", tree_add())], 0,
                        PairsConfig(trajectory_pairs=False))
    assert by_nodes(dpo, "trajectory") == {}


def test_step_pair_repeating_a_trajectory_pair_is_a_duplicate():
    rows = [shard_row("p-add", "What is 2 + 3?", tree_add())]
    dpo, _ = build_rows(rows, 0, PairsConfig())
    # step pair (3, 4) under node 1 = trajectory pair (3, 4) with "Step 1: ..." moved into the prompt
    assert (3, 4) in by_nodes(dpo, "trajectory") and (3, 4) not in by_nodes(dpo, "step")
    assert set(by_nodes(dpo, "step")) == {(1, 2), (7, 6)}


def test_cap_keeps_largest_gaps_trajectory_pairs_count():
    rows = [shard_row("p-add", "What is 2 + 3?", tree_add())]
    dpo, _ = build_rows(rows, 0, PairsConfig(max_per_problem=3))
    assert [(r["lineage"]["kind"], r["lineage"]["node_ids"]) for r in dpo] == [
        ("trajectory", [3, 4]), ("trajectory", [5, 6]), ("step", [7, 6])]  # gaps 1, 1, 0.9
    dpo, _ = build_rows(rows, 0, PairsConfig(max_per_problem=2, trajectory_pairs=False))
    assert [r["lineage"]["node_ids"] for r in dpo] == [[3, 4], [7, 6]]  # gaps 1.0 and 0.9
    assert build_rows(rows, 0, PairsConfig(max_per_problem=0))[0] == []
    every = build_rows(rows, 0, PairsConfig(max_per_problem=-1))[0]  # -1: no cap, as documented
    assert len(every) == 4 and every == build_rows(rows, 0, PairsConfig(max_per_problem=100))[0]
    with pytest.raises(ValueError, match="max_per_problem"):
        build_rows(rows, 0, PairsConfig(max_per_problem=-2))


def test_dedupe_across_trees_and_cap_per_problem():
    twice = [shard_row("p-add", "What is 2 + 3?", tree_add()) for _ in range(2)]
    once = build_rows(twice[:1], 0, PairsConfig())
    assert build_rows(twice, 0, PairsConfig()) == once
    dpo, _ = once
    keys = [(r["prompt"], r["chosen"], r["rejected"]) for r in dpo]
    assert len(keys) == len(set(keys)) == 4
    # the same problem under another id is another problem: its identical pairs are dropped
    other = shard_row("p-add-copy", "What is 2 + 3?", tree_add())
    dpo2, sft2 = build_rows(twice[:1] + [other], 0, PairsConfig())
    assert dpo2 == dpo and len(sft2) == 1


def test_rows_of_another_iteration_are_refused():
    with pytest.raises(ValueError, match="iteration"):
        build_rows(golden_shards(), 3, PairsConfig())
    dpo, _ = build_rows(golden_shards(), 0, PairsConfig())
    assert {r["lineage"]["iteration"] for r in dpo} == {0}


def test_sft_row_is_the_most_visited_correct_trajectory():
    _, sft = build_rows(golden_shards(), 0, PairsConfig())
    assert sft == [{
        "prompt": PROMPT.format("What is 2 + 3?"),
        "completion": "Step 1: add 2 and 3\nAnswer: 5\n",
        "lineage": {"iteration": 0, "problem_id": "p-add", "kind": "sft", "prefix_node": 0,
                    "node_ids": [3], "q": [1.0], "visits": [3], "terminal": [True],
                    "reward": [1.0], "from_rollout": False},
    }]


def test_sft_falls_back_to_a_verified_finished_rollout():
    nodes = tree_mul()  # no correct terminal
    nodes[4]["rollout"] = nodes[5]["rollout"] = nodes[2]["rollout"] = 1.0
    row = shard_row("p-mul", "What is 4 * 5?", nodes)
    row["rollouts"] = {"2": {"text": "Answer: 20\n", "tokens": 4, "finished": True},
                       "4": {"text": "Answer: 20\n", "tokens": 4, "finished": False},  # cut short
                       "5": {"text": "Step 3: 20\nAnswer: 20\n", "tokens": 9, "finished": True}}
    _, sft = build_rows([row], 0, PairsConfig())
    # node 2 (4 visits) beats node 5 (2 visits); node 4 has more visits than 5 but never finished
    assert [r["completion"] for r in sft] == ["Step 1: 4 + 5 = 9\nAnswer: 20\n"]
    assert sft[0]["lineage"]["from_rollout"] is True and sft[0]["lineage"]["node_ids"] == [2]
    assert build_rows([row], 0, PairsConfig(sft_from_rollouts=False))[1] == []
    # a verified terminal in another tree of the same problem wins over any rollout
    _, sft = build_rows([row, shard_row("p-mul", "What is 4 * 5?", tree_add())], 0, PairsConfig())
    assert sft[0]["lineage"]["from_rollout"] is False


def test_sft_per_problem_keeps_distinct_verified_solutions_best_first():
    add = tree_add()  # correct terminals: node 3 (3 visits), node 5 (1 visit)
    add[7]["rollout"] = 1.0  # node 7's rollout verified and finished: a third solution
    row = shard_row("p-add", "What is 2 + 3?", add)
    row["rollouts"] = {"7": {"text": "Answer: 5\n", "tokens": 4, "finished": True}}
    texts = {"3": "Step 1: add 2 and 3\nAnswer: 5\n", "5": "Step 1: add 2 and 3\nAnswer: 5.\n",
             "7": "Step 1: multiply 2 by 3\nStep 2: check it\nAnswer: 5\n"}

    def sft_nodes(pairs, rows=(row,)):
        return [(r["lineage"]["node_ids"][0], r["lineage"]["from_rollout"], r["completion"])
                for r in build_rows(list(rows), 0, pairs)[1]]

    assert sft_nodes(PairsConfig()) == [(3, False, texts["3"])]  # the default: the best one
    assert sft_nodes(PairsConfig(sft_per_problem=2)) == [(3, False, texts["3"]),
                                                         (5, False, texts["5"])]
    every = [(3, False, texts["3"]), (5, False, texts["5"]), (7, True, texts["7"])]
    assert sft_nodes(PairsConfig(sft_per_problem=-1)) == every  # terminals, then rollouts
    assert sft_nodes(PairsConfig(sft_per_problem=-1, sft_from_rollouts=False)) == every[:2]
    assert sft_nodes(PairsConfig(sft_per_problem=0)) == []
    # a second tree of the problem with the same solutions adds nothing: distinct texts only
    assert sft_nodes(PairsConfig(sft_per_problem=-1), [row, row]) == every
    with pytest.raises(ValueError, match="sft_per_problem"):
        build_rows([row], 0, PairsConfig(sft_per_problem=-2))


def test_verified_completions_count_terminals_and_finished_verified_rollouts():
    nodes = tree_add()
    nodes[7]["rollout"] = nodes[8]["rollout"] = nodes[2]["rollout"] = 1.0
    nodes[1]["rollout"] = 0.0  # its rollout was wrong: not a solution
    rollouts = {"7": {"text": "Answer: 5\n", "tokens": 3, "finished": True},
                "8": {"text": "Answer: 5\n", "tokens": 3, "finished": False},  # cut short
                "2": {"text": "Answer: 5\n", "tokens": 3, "finished": True},
                "1": {"text": "Answer: 5\n", "tokens": 3, "finished": True}}
    terminals, from_rollouts = verified_completions(tree("What is 2 + 3?", nodes), rollouts)
    assert terminals == {"Step 1: add 2 and 3\nAnswer: 5\n", "Step 1: add 2 and 3\nAnswer: 5.\n"}
    assert from_rollouts == {"Step 1: multiply 2 by 3\nStep 2: check it\nAnswer: 5\n",
                             "Step 1: multiply 2 by 3\nAnswer: 5\n"}
    # a verified rollout whose text is a correct terminal's is one solution, not two
    nodes[1]["rollout"] = 1.0
    assert verified_completions(tree("What is 2 + 3?", nodes), rollouts)[1] == from_rollouts
    assert verified_completions(tree("What is 4 * 5?", tree_mul()), {}) == (set(), set())


def test_order_is_deterministic():
    forward = build_rows(golden_shards(), 0, PairsConfig())
    assert build_rows(golden_shards()[::-1], 0, PairsConfig()) == forward
    assert [r["lineage"]["problem_id"] for r in forward[0]] == ["p-add"] * 4 + ["p-mul"]


def test_write_data_files_and_counts(tmp_path):
    search_dir = tmp_path / "iter_000" / "search"
    search_dir.mkdir(parents=True)
    for i, row in enumerate(golden_shards()):
        (search_dir / f"shard_{i:03d}.jsonl").write_text(json.dumps(row) + "\n")
    rows = load_shards(search_dir)
    assert [r["problem_id"] for r in rows] == ["p-mul", "p-add"]
    counts = write_data(rows, 0, PairsConfig(), tmp_path / "data")
    assert counts == {"problems": 2, "dpo": 5, "step_pairs": 3, "trajectory_pairs": 2,
                      "problems_with_pairs": 2, "sft": 1}
    dpo, sft = build_rows(rows, 0, PairsConfig())
    assert read_jsonl(tmp_path / "data" / "dpo.jsonl") == dpo
    assert read_jsonl(tmp_path / "data" / "sft.jsonl") == sft
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dpo.jsonl", "sft.jsonl"]


def test_rows_from_a_real_search_obey_the_rules():
    prompts = [PROMPT.format(q) for q in ("What is 12 + 30?", "What is 7 * 6?", "Solve x + 5 = 9.")]
    trees = search(prompts, FakePolicy(0), FakeCritic(0), SearchParams(simulations=24, seed=3),
                   terminal_reward_fn=FakeVerifier())
    shards = [{"problem_id": f"p{i}", "iteration": 1, "prompt": p, "question": "", "tree": t.to_json()}
              for i, (p, t) in enumerate(zip(prompts, trees))]
    pairs = PairsConfig(n_min=1, margin=0.1, max_per_problem=6)
    dpo, sft = build_rows(shards, 1, pairs)
    assert dpo and sft
    views = {s["problem_id"]: Tree.from_json(s["tree"]) for s in shards}
    per_problem = {}
    for row in dpo:
        lin = row["lineage"]
        t = views[lin["problem_id"]]
        per_problem[lin["problem_id"]] = per_problem.get(lin["problem_id"], 0) + 1
        good, bad = lin["node_ids"]
        assert lin["q"] == [t.q(good), t.q(bad)] and lin["visits"] == [t.visits[good], t.visits[bad]]
        if lin["kind"] == "step":
            assert t.parent[good] == t.parent[bad] == lin["prefix_node"]
            assert row["prompt"] == t.prompt + "".join(t.steps(lin["prefix_node"]))
            assert (row["chosen"], row["rejected"]) == (t.text[good], t.text[bad])
            assert lin["q"][0] - lin["q"][1] >= pairs.margin - 1e-9
            assert min(lin["visits"]) >= pairs.n_min
        else:
            assert (t.terminal_reward[good], t.terminal_reward[bad]) == (1.0, 0.0)
            assert row["chosen"] == "".join(t.steps(good))
    assert max(per_problem.values()) <= pairs.max_per_problem
    keys = [(r["prompt"], r["chosen"], r["rejected"]) for r in dpo]
    assert len(keys) == len(set(keys))
    for row in sft:
        t = views[row["lineage"]["problem_id"]]
        (end,) = row["lineage"]["node_ids"]
        assert t.terminal_reward[end] == 1.0 and row["completion"] == "".join(t.steps(end))
    assert build_rows(shards, 1, pairs) == (dpo, sft)
