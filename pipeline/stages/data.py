"""Data stage: search trees -> DPO preference pairs and SFT rows, each with its lineage.

Input: the search shard rows of one iteration, `{"problem_id", "iteration", "prompt", "question",
"tree": Tree.to_json()}`. Output: `dpo.jsonl` and `sft.jsonl` (both written atomically).

Row formats (TRL's *standard*, non-conversational formats)
---------------------------------------------------------
    DPO: {"prompt": str, "chosen": str, "rejected": str, "lineage": {...}}
    SFT: {"prompt": str, "completion": str, "lineage": {...}}

Why text, not TRL's conversational format: a step pair continues a *partial* assistant message
(the problem plus the steps written so far), which the conversational format cannot express
without closing the assistant turn. `tree["prompt"]` is already the chat-templated prompt opened
for the assistant (`pipeline.lm.generation.chat_prompt`), and the search generated every option
from exactly `tree["prompt"] + "".join(steps so far)`, so the text format reproduces the context
the policy saw, token for token:

- step pair: prompt = tree prompt + steps from the root to the expanded node;
  chosen / rejected = the two sibling option texts.
- trajectory pair: prompt = tree prompt; chosen / rejected = whole trajectories (root to a
  verified terminal node).
- SFT: prompt = tree prompt; completion = the whole trajectory.

EOS: rows carry no EOS text. For SFT rows and DPO pairs TRL appends the tokenizer's EOS to the
completions; `pipeline.stages.train` keeps that EOS only where the solution ends there (the node
is terminal in the tree, `lineage["terminal"]`) and removes it from non-terminal step options, so
a step pair never teaches the policy to stop after an intermediate step.

Selection rules
---------------
- Step pairs: at every node with children, among the children with at least
  max(1, pairs.n_min) visits, chosen = highest Q (ties: more visits, then lower id), rejected =
  lowest Q (ties: more visits, then lower id); kept when the Q gap is > 0 and >= pairs.margin
  (with 1e-9 tolerance, so 0.7 - 0.5 counts as a gap of 0.2) and the texts differ.
- Trajectory pairs (pairs.trajectory_pairs): the verified-correct terminals
  (terminal_reward == 1.0, best first: most visits, highest Q, lowest id) are zipped with the
  incorrect terminals (terminal_reward < 1.0; most visited first, then lowest Q, lowest id), one
  pair per (correct, incorrect) couple. The verifier's reward is exact, so n_min and margin do
  not apply to them.
- SFT: per problem, up to pairs.sft_per_problem (default 1; -1: all) distinct verified
  solutions: the correct terminals, most visits first (ties: highest Q, lowest id), then (with
  pairs.sft_from_rollouts) the nodes whose fast rollout the verifier accepted and that ended
  with EOS, by the same order: their steps plus the rollout. At 1 that is the best correct
  terminal, or with none the best verified rollout.
- Pairs are deduplicated on (prompt + chosen, prompt + rejected) over the whole call -- identical
  rows, and also a step pair between two terminal siblings that repeats, with a longer prompt,
  a trajectory pair (the DPO loss sees only the full sequences) -- then capped at
  pairs.max_per_problem per problem (-1: no cap), largest Q gap first (ties: trajectory pairs
  before step pairs, shallower prefix first, lower node ids first). SFT rows are distinct
  within a problem before its cap, and deduplicated on (prompt, completion) over the call.
- Order: problems sorted by problem_id; within a problem, the rank above. Same input, same bytes.

Lineage (extra key; `pipeline.stages.train` hands TRL only the columns it trains on):
    {"iteration", "problem_id", "kind": "step" | "trajectory" | "sft",
     "prefix_node": node whose steps end the prompt (0 = root),
     "node_ids": [chosen, rejected] (step: the sibling options; trajectory: the terminals)
                 or [terminal] for SFT,
     "q", "visits", "terminal", "reward" (terminal_reward, None when not terminal): same order,
     SFT rows also "from_rollout": whether the completion ends with a verified fast rollout}
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.config import PairsConfig
from pipeline.run.atomic import write_jsonl
from pipeline.run.store import load_shards
from pipeline.stages.base import Loop

EPS = 1e-9  # tolerance for the margin test: Q values are sums of floats
KIND_ORDER = {"trajectory": 0, "step": 1}


class _TreeView:
    """Read-only access to a Tree.to_json() record, by node id."""

    def __init__(self, tree: dict):
        self.prompt: str = tree["prompt"]
        self.nodes: list[dict] = tree["nodes"]
        for i, node in enumerate(self.nodes):
            if node["id"] != i:
                raise ValueError(f"tree JSON node {i} has id {node['id']}")
        self.children: list[list[int]] = [[] for _ in self.nodes]
        for node in self.nodes[1:]:
            self.children[node["parent"]].append(node["id"])

    def path(self, node: int) -> list[int]:
        ids = []
        while node >= 0:
            ids.append(node)
            node = self.nodes[node]["parent"]
        return ids[::-1]

    def text_to(self, node: int) -> str:
        """Option texts from the root to `node`, joined (the root contributes nothing)."""
        return "".join(self.nodes[i]["text"] for i in self.path(node)[1:])

    def terminals(self) -> list[dict]:
        return [n for n in self.nodes if n["terminal"] and n["terminal_reward"] is not None]


def _lineage(iteration: int, problem_id: str, kind: str, prefix: int, nodes: list[dict]) -> dict:
    return {
        "iteration": iteration,
        "problem_id": problem_id,
        "kind": kind,
        "prefix_node": prefix,
        "node_ids": [n["id"] for n in nodes],
        "q": [n["q"] for n in nodes],
        "visits": [n["visits"] for n in nodes],
        "terminal": [bool(n["terminal"]) for n in nodes],
        "reward": [n["terminal_reward"] for n in nodes],
    }


def _best_correct_key(node: dict):
    return (-node["visits"], -node["q"], node["id"])


def step_pairs(view: _TreeView, problem_id: str, iteration: int, pairs: PairsConfig) -> list[dict]:
    """Sibling-option pairs: highest vs lowest Q among the well-visited children of each node."""
    n_min = max(1, pairs.n_min)
    rows = []
    for parent, kids in enumerate(view.children):
        qualified = [view.nodes[c] for c in kids if view.nodes[c]["visits"] >= n_min]
        if len(qualified) < 2:
            continue
        chosen = min(qualified, key=lambda n: (-n["q"], -n["visits"], n["id"]))
        rejected = min(qualified, key=lambda n: (n["q"], -n["visits"], n["id"]))
        gap = chosen["q"] - rejected["q"]
        if gap <= 0 or gap < pairs.margin - EPS or chosen["text"] == rejected["text"]:
            continue
        rows.append({
            "prompt": view.prompt + view.text_to(parent),
            "chosen": chosen["text"],
            "rejected": rejected["text"],
            "lineage": _lineage(iteration, problem_id, "step", parent, [chosen, rejected]),
        })
    return rows


def trajectory_pairs(view: _TreeView, problem_id: str, iteration: int) -> list[dict]:
    """Verified-correct whole trajectories against incorrect ones of the same tree."""
    terminals = view.terminals()
    correct = sorted((n for n in terminals if n["terminal_reward"] == 1.0), key=_best_correct_key)
    wrong = sorted((n for n in terminals if n["terminal_reward"] < 1.0),
                   key=lambda n: (-n["visits"], n["q"], n["id"]))
    rows = []
    for good, bad in zip(correct, wrong):
        chosen, rejected = view.text_to(good["id"]), view.text_to(bad["id"])
        if chosen == rejected:
            continue
        rows.append({
            "prompt": view.prompt,
            "chosen": chosen,
            "rejected": rejected,
            "lineage": _lineage(iteration, problem_id, "trajectory", 0, [good, bad]),
        })
    return rows


def verified_rollouts(view: _TreeView, rollouts: dict) -> list[dict]:
    """Non-terminal nodes whose fast rollout the verifier accepted and that ended the solution
    (EOS): each node's steps plus its rollout is a whole verified solution."""
    return [n for n in view.nodes if not n["terminal"] and n["rollout"] == 1.0
            and rollouts.get(str(n["id"]), {}).get("finished")]


def _sft(view: _TreeView, problem_id: str, iteration: int, node: dict, completion: str,
         from_rollout: bool) -> dict:
    lineage = _lineage(iteration, problem_id, "sft", 0, [node])
    lineage["from_rollout"] = from_rollout
    return {"prompt": view.prompt, "completion": completion, "lineage": lineage}


def sft_rows(view: _TreeView, problem_id: str, iteration: int, rollouts: dict,
             from_rollouts: bool) -> list[dict]:
    """Every verified solution of one tree as an SFT row: its correct terminals, then (with
    from_rollouts) its verified rollouts that finished (steps + rollout); build_rows ranks them."""
    rows = [_sft(view, problem_id, iteration, n, view.text_to(n["id"]), False)
            for n in view.terminals() if n["terminal_reward"] == 1.0]
    if from_rollouts:
        rows += [_sft(view, problem_id, iteration, n,
                      view.text_to(n["id"]) + rollouts[str(n["id"])]["text"], True)
                 for n in verified_rollouts(view, rollouts)]
    return rows


def verified_completions(tree: dict, rollouts: dict) -> tuple[set[str], set[str]]:
    """The distinct verified solutions one search found (the texts sft_rows would train on): those
    of its correct terminal nodes, and those of its verified rollouts (steps + rollout) that are
    not already a terminal's."""
    rows = sft_rows(_TreeView(tree), "", 0, rollouts, from_rollouts=True)
    terminals = {r["completion"] for r in rows if not r["lineage"]["from_rollout"]}
    from_rollouts = {r["completion"] for r in rows if r["lineage"]["from_rollout"]}
    return terminals, from_rollouts - terminals


def _sft_rank(row: dict) -> tuple:
    lin = row["lineage"]
    return (lin["from_rollout"], -lin["visits"][0], -lin["q"][0], lin["node_ids"][0])


def _best_distinct(solutions: list[tuple[tuple, dict]], cap: int) -> list[dict]:
    """The best `cap` (-1: all) SFT rows of one problem with distinct completions, by rank."""
    picked: dict[str, dict] = {}
    for _, row in sorted(solutions, key=lambda c: c[0]):
        if len(picked) == cap:
            break
        picked.setdefault(row["completion"], row)
    return list(picked.values())


def _pair_rank(row: dict, view: _TreeView) -> tuple:
    """Larger Q gap first, then kind, then the shallower branch point, then node ids."""
    lin = row["lineage"]
    depth = len(view.path(lin["prefix_node"])) - 1
    return (-(lin["q"][0] - lin["q"][1]), KIND_ORDER[lin["kind"]], depth, lin["node_ids"])


def build_rows(shard_rows: Iterable[dict], iteration: int,
               pairs: PairsConfig) -> tuple[list[dict], list[dict]]:
    """(dpo_rows, sft_rows) from the search shard rows of one iteration; see the module doc."""
    for key in ("max_per_problem", "sft_per_problem"):
        if getattr(pairs, key) < -1:
            raise ValueError(f"pairs.{key} must be >= 0 or -1 (no cap), got {getattr(pairs, key)}")
    by_problem: dict[str, list[dict]] = {}
    for row in shard_rows:
        if row.get("iteration", iteration) != iteration:
            raise ValueError(f"shard row of problem {row['problem_id']!r} is from iteration "
                             f"{row['iteration']}, expected {iteration}")
        by_problem.setdefault(str(row["problem_id"]), []).append(row)

    dpo_rows: list[dict] = []
    sft_out: list[dict] = []
    seen_pairs: set[tuple[str, str]] = set()
    seen_sft: set[tuple[str, str]] = set()
    for problem_id in sorted(by_problem):
        candidates: list[tuple[tuple, dict]] = []
        solutions: list[tuple[tuple, dict]] = []
        for order, row in enumerate(by_problem[problem_id]):
            view = _TreeView(row["tree"])
            found = step_pairs(view, problem_id, iteration, pairs)
            if pairs.trajectory_pairs:
                found += trajectory_pairs(view, problem_id, iteration)
            candidates += [(_pair_rank(r, view) + (order,), r) for r in found]
            solutions += [(_sft_rank(r) + (order,), r) for r in sft_rows(
                view, problem_id, iteration, row.get("rollouts", {}), pairs.sft_from_rollouts)]
        candidates.sort(key=lambda c: c[0])
        kept = 0
        for _, row in candidates:
            if kept == pairs.max_per_problem:  # -1 never equals a count: no cap
                break
            # Equal full texts train the same: a step pair that ends two terminals repeats the
            # trajectory pair of those terminals with a longer prompt; the trajectory pair ranks first.
            key = (row["prompt"] + row["chosen"], row["prompt"] + row["rejected"])
            if key in seen_pairs:
                continue
            seen_pairs.add(key)
            dpo_rows.append(row)
            kept += 1
        for sft in _best_distinct(solutions, pairs.sft_per_problem):
            key = (sft["prompt"], sft["completion"])
            if key not in seen_sft:  # another problem's row already (the same text under two ids)
                seen_sft.add(key)
                sft_out.append(sft)
    return dpo_rows, sft_out


def count_rows(dpo_rows: list[dict], sft_rows: list[dict], problems: int) -> dict:
    kinds = [r["lineage"]["kind"] for r in dpo_rows]
    return {
        "problems": problems,
        "dpo": len(dpo_rows),
        "step_pairs": kinds.count("step"),
        "trajectory_pairs": kinds.count("trajectory"),
        "problems_with_pairs": len({r["lineage"]["problem_id"] for r in dpo_rows}),
        "sft": len(sft_rows),
    }


def write_data(shard_rows: Iterable[dict], iteration: int, pairs: PairsConfig,
               out_dir: str | Path) -> dict:
    """Build the rows and write out_dir/dpo.jsonl and out_dir/sft.jsonl atomically; the counts."""
    shard_rows = list(shard_rows)
    dpo_rows, sft_rows = build_rows(shard_rows, iteration, pairs)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "dpo.jsonl", dpo_rows)
    write_jsonl(out_dir / "sft.jsonl", sft_rows)
    problems = len({str(r["problem_id"]) for r in shard_rows})
    return count_rows(dpo_rows, sft_rows, problems)


def run(loop: Loop, i: int) -> dict:
    """DPO pairs and SFT rows from iteration i's trees."""
    rows = load_shards(loop.store.stage_dir(i, "search"))
    return write_data(rows, i, loop.cfg.train.pairs, loop.store.stage_dir(i, "data"))
