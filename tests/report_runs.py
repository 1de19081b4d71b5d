"""Run directories built by hand for `qstar report` tests: real mcts.Tree JSON, seeded, any size."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mcts.tree import Tree
from pipeline.run.store import BASELINE, STAGES, RunStore

PROMPT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


def build_tree(question: str, num_nodes: int, seed: int, solvable: bool) -> Tree:
    """A tree of `num_nodes` nodes grown at random parents; about a quarter of the nodes below
    depth 1 are terminal answers (correct only when `solvable`); every node evaluated and
    backed up once, so visits and Q vary."""
    rng = random.Random(seed)
    tree = Tree(PROMPT.format(q=question))
    while tree.num_nodes < num_nodes:
        parent = rng.choice([n for n in range(tree.num_nodes) if not tree.terminal[n]])
        terminal = tree.depth[parent] >= 1 and rng.random() < 0.3
        a, b = rng.randrange(10), rng.randrange(10)
        end = "\n\n" if rng.random() < 0.5 else "\n"  # SmolLM2 has one token for "\n\n"
        text = f"Answer: {a + b}" if terminal else f"Step: {a} + {b} = {a + b}{end}"
        node = tree.add_node(parent, text, len(text.split()), -1.5, terminal)
        for name in ("value", "prm", "orm", "rollout"):
            getattr(tree, name)[node] = round(rng.random(), 3)
        tree.total[node] = round(rng.random(), 3)
        if terminal:
            tree.terminal_reward[node] = 1.0 if solvable and rng.random() < 0.5 else 0.0
            tree.total[node] = tree.terminal_reward[node]
        tree.backup(node, tree.total[node])
    tree.stats.simulations = num_nodes - 1
    tree.stats.stop_reason = "simulations"
    return tree


def tree_row(problem_id: str, question: str, tree: Tree, iteration: int = 0) -> dict:
    rollouts = {str(n): {"text": f"rollout from node {n}\nAnswer: {n % 10}", "tokens": 6,
                         "finished": True}
                for n in range(1, tree.num_nodes) if not tree.terminal[n] and n % 2 == 0}
    solved = any(r == 1.0 for r in tree.terminal_reward if r is not None)
    return {"problem_id": problem_id, "iteration": iteration, "question": question,
            "prompt": tree.prompt, "solved": solved, "tree": tree.to_json(), "rollouts": rollouts}


def lineage(row: dict, kind: str, prefix: int, ids: list[int]) -> dict:
    nodes = row["tree"]["nodes"]
    return {"iteration": row["iteration"], "problem_id": row["problem_id"], "kind": kind,
            "prefix_node": prefix, "node_ids": ids, "q": [nodes[i]["q"] for i in ids],
            "visits": [nodes[i]["visits"] for i in ids],
            "terminal": [nodes[i]["terminal"] for i in ids],
            "reward": [nodes[i]["terminal_reward"] for i in ids]}


def data_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """One step pair per tree (the root's first two children), one SFT row per solved tree."""
    dpo, sft = [], []
    for row in rows:
        nodes = row["tree"]["nodes"]
        kids = [n["id"] for n in nodes if n["parent"] == 0][:2]
        if len(kids) == 2:
            dpo.append({"prompt": row["prompt"], "chosen": nodes[kids[0]]["text"],
                        "rejected": nodes[kids[1]]["text"],
                        "lineage": lineage(row, "step", 0, kids)})
        correct = [n["id"] for n in nodes if n["terminal_reward"] == 1.0]
        if correct:
            lin = lineage(row, "sft", 0, correct[:1])
            lin["from_rollout"] = False
            sft.append({"prompt": row["prompt"], "completion": "...", "lineage": lin})
    return dpo, sft


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(root: Path, trees: int = 4, nodes: int = 12, iterations: int = 1,
             done_stages: int | None = None, policy_dir: str = "/nonexistent/policy",
             model_name: str = "/nonexistent/base") -> RunStore:
    """A run with `trees` problems of `nodes` nodes each. `done_stages`: how many of the
    iteration-0 stages (baseline, search, critics, ...) the manifest lists (default: all)."""
    if Path(policy_dir).is_dir() and not (Path(policy_dir) / "meta.json").is_file():
        # as the train stage records it: one DPO phase against policy_0 (the base model)
        (Path(policy_dir) / "meta.json").write_text(json.dumps(
            {"config": {"beta": 0.1}, "metrics": {"phases": ["dpo"]}, "source_policy": model_name,
             "reference": model_name}))
    store = RunStore(root)
    store.set_info(iterations=iterations, config={
        "model": {"name": model_name, "dtype": "float32", "device": "cpu", "cache_dir": str(root)},
        "train": {"beta": 0.1}, "search": {"simulations": nodes - 1}})
    rows = [tree_row(f"p/{k}", f"What is {k} + {k}?", build_tree(f"What is {k} + {k}?", nodes, k,
                                                                   solvable=k % 2 == 0))
            for k in range(trees)]
    half = max(1, trees // 2)
    write_rows(store.stage_dir(0, "search") / "shard_0000.jsonl", rows[:half])
    if rows[half:]:
        write_rows(store.stage_dir(0, "search") / "shard_0001.jsonl", rows[half:])
    dpo, sft = data_rows(rows)
    write_rows(store.stage_dir(0, "data") / "dpo.jsonl", dpo)
    write_rows(store.stage_dir(0, "data") / "sft.jsonl", sft)
    metrics = {
        BASELINE: {"decodes": {"greedy": {"accuracy": 0.25}}},
        "search": {"solve_rate": sum(r["solved"] for r in rows) / trees, "tokens": 100 * trees},
        "critics": {"orm": {"auc": 0.6}, "prm": {"auc": 0.55}},
        "data": {"dpo": len(dpo), "sft": len(sft)},
        "train": {"policy_dir": policy_dir, "dpo/rewards/margins": 0.2},
        "refit": {"orm": {"auc": 0.7}, "prm": {"auc": 0.65}},
        "eval": {"decodes": {"greedy": {"accuracy": 0.5}}},
    }
    order = [BASELINE, *STAGES]
    for stage in order[:len(order) if done_stages is None else done_stages]:
        store.complete(0, stage, metrics[stage], 1.0)
    return store
