"""The per-token implicit reward beta * log(pi_{N+1} / pi_N) of iteration N's trees, as in the
"From r to Q*" figure 1: which tokens DPO credited and which it blamed.

- `qstar inspect RUN --iter N --problem ID --credit`: one coloured HTML map of the problem's best
  trajectory (`write_credit_map`).
- `qstar report RUN --credit [best|all]`: for every tree of iteration N, the token map of its
  best trajectory and the implicit reward of node options (an option's tokens after the prompt
  and the options above it, as the search generated it), from one load of the two policies
  (`iteration_credit`). `best` (the default): the nodes of the best path, 1 + depth
  teacher-forced sequences per tree and policy; `all`: every node, one sequence per node (about
  a minute per 50 nodes with SmolLM2-135M on a busy 2-core CPU: a GPU job for 64 x 100 nodes).
  Cached in iter_NNN/credit.json, so a second report reads it instead of loading the models.

Both need the trained policy_{N+1} and its DPO reference on disk (policy_N, or policy_0 with
`train.reference=base`, as its meta.json records). The log-ratio is DPO's own model's: with
`train.mode=dpo_then_sft` the DPO phase's model kept inside policy_{N+1} (the implicit reward's
policy, pipeline.stages.reference), not the SFT-trained policy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from critics.implicit import completion_tokens, credit_map_html, implicit_reward
from pipeline.config import ModelConfig, replace_model_name
from pipeline.errors import QstarError
from pipeline.lm.models import load_model
from pipeline.lm.teacher_forced import completion_logprobs
from pipeline.run.atomic import write_json, write_text
from pipeline.run.store import RunStore
from pipeline.stages.reference import implicit_policy, reference_dir

CACHE_VERSION = 2  # 2: the recorded reference and the DPO phase's model (was policy_{N+1}, policy_N)
SCOPES = ("best", "all")  # which nodes get an implicit reward; "all" covers "best"


def trained_pair(store: RunStore, iteration: int) -> tuple[str, str]:
    """(DPO's model, its reference) directories for policy_{N+1}; a QstarError saying why when
    there is no pair."""
    train = store.metrics(iteration, "train")
    if train is None or train.get("skipped"):
        raise QstarError(f"iteration {iteration} has no trained policy: the credit map compares "
                         "policy_{N+1} with its DPO reference")
    policy = store.policy_dir(iteration + 1, "")  # recorded run-relative: resolved here
    if not os.path.isdir(policy):
        raise QstarError(f"iteration {iteration}: its trained policy {policy} is not on disk any more")
    reference = reference_dir(policy, _model_config(store))
    if reference is None:
        raise QstarError(f"iteration {iteration}: its policy {policy} was not trained by DPO "
                         "(no DPO phase in its meta.json): it has no implicit reward")
    if not os.path.isdir(reference):
        raise QstarError(f"iteration {iteration}: its reference policy {reference} is not on disk")
    return implicit_policy(policy) or policy, reference


def _model_config(store: RunStore) -> ModelConfig:
    config = store.manifest["config"]
    return ModelConfig(**{k: config["model"][k] for k in ("dtype", "device", "cache_dir")
                          if k in config["model"]}, name=config["model"]["name"])


def _load_pair(store: RunStore, iteration: int):
    policy_dir, ref_dir = trained_pair(store, iteration)
    model_cfg = _model_config(store)
    policy, tokenizer = load_model(replace_model_name(model_cfg, policy_dir))
    reference, _ = load_model(replace_model_name(model_cfg, ref_dir))
    return policy, reference, tokenizer, store.manifest["config"]["train"]["beta"]


def write_credit_map(store: RunStore, iteration: int, row: dict, out: Path) -> Path:
    policy, reference, tokenizer, beta = _load_pair(store, iteration)
    completion = row["tree"]["best_text"]
    rewards = implicit_reward(policy, reference, tokenizer, [row["prompt"]], [completion], beta,
                              completion_logprobs)[0]
    tokens = completion_tokens(tokenizer, completion)
    title = f"iteration {iteration}, {row['problem_id']}: sum beta*log(pi/pi_ref) = {sum(rewards):+.3f}"
    write_text(out, credit_map_html(tokens, rewards, title))
    return out


def _path(nodes: list[dict], node_id: int) -> list[int]:
    ids = []
    while node_id >= 0:
        ids.append(node_id)
        node_id = nodes[node_id]["parent"]
    return ids[::-1]


def node_requests(row: dict, scope: str) -> tuple[list[str], list[str], list[int]]:
    """(prefix, option text, node id) for the non-root nodes of the row's tree in `scope` (all,
    or those of the best path): the prefix is the prompt and the options from the root down to
    the node's parent, as the search saw it."""
    nodes = row["tree"]["nodes"]
    best = set(row["tree"].get("best_trajectory", []))
    prefixes, options, ids = [], [], []
    for node in nodes[1:]:
        if scope == "best" and node["id"] not in best:
            continue
        above = _path(nodes, node["id"])[1:-1]
        prefixes.append(row["prompt"] + "".join(nodes[i]["text"] for i in above))
        options.append(node["text"])
        ids.append(node["id"])
    return prefixes, options, ids


def credit_for_rows(policy, reference, tokenizer, rows: list[dict], beta: float,
                    scope: str = "best") -> dict:
    """{"maps": {problem: {tokens, rewards, total}}, "nodes": {problem: {node id: reward}}}."""
    maps, nodes = {}, {}
    best = [r["tree"]["best_text"] for r in rows]
    token_rewards = implicit_reward(policy, reference, tokenizer, [r["prompt"] for r in rows],
                                    best, beta, completion_logprobs)
    for row, text, rewards in zip(rows, best, token_rewards):
        maps[row["problem_id"]] = {"tokens": completion_tokens(tokenizer, text),
                                   "rewards": rewards, "total": sum(rewards)}
        prefixes, options, ids = node_requests(row, scope)
        per_token = implicit_reward(policy, reference, tokenizer, prefixes, options, beta,
                                    completion_logprobs) if ids else []
        nodes[row["problem_id"]] = {str(i): sum(r) for i, r in zip(ids, per_token)}
    return {"maps": maps, "nodes": nodes}


def iteration_credit(store: RunStore, iteration: int, rows: list[dict], scope: str = "best") -> dict:
    """Credit of every tree in `rows` (iteration `iteration`), from the cache when it covers them
    (the same trees, and the same scope or "all").

    Returns {"maps", "nodes", "note"}; when there is no trained pair, only a "note" saying why."""
    cache = store.iter_dir(iteration) / "credit.json"
    wanted = sorted(r["problem_id"] for r in rows)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if (cached.get("version") == CACHE_VERSION and cached.get("problems") == wanted
                and cached.get("scope") in (scope, "all")):
            return cached
    try:
        policy, reference, tokenizer, beta = _load_pair(store, iteration)
    except QstarError as exc:
        return {"note": str(exc)}
    result = credit_for_rows(policy, reference, tokenizer, rows, beta, scope)
    result.update(version=CACHE_VERSION, problems=wanted, beta=beta, scope=scope,
                  note=f"beta * log(pi_{iteration + 1} / pi_{iteration}) per token, beta = {beta}")
    write_json(cache, result)
    return result
