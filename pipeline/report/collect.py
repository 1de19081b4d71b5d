"""What `qstar report` shows of one run, gathered into one JSON-able dict (the page embeds it).

Only what is complete is read: stages listed in the manifest, and search shards (each written
atomically, so a shard on disk is whole even while its stage is still running). A run whose
stages are not all complete is marked in progress, with the lock telling running from stopped.
"""

from __future__ import annotations

import base64
import fcntl
import json
from pathlib import Path

import yaml

from pipeline.errors import QstarError
from pipeline.report.inspect import LoopKind, iteration_rows, loop_kind, run_overrides
from pipeline.report.plots import write_plots
from pipeline.run.store import BASELINE, GRPO_STAGES, STAGES, RunStore

# Node fields the tree browser shows (mcts.tree.Tree.to_json has a few more: logprob,
# value_sum, expand bookkeeping); "implicit" is there only when something computed it.
NODE_KEYS = ("id", "parent", "depth", "text", "num_tokens", "prior", "visits", "q", "total",
             "value", "prm", "orm", "rollout", "terminal", "terminal_reward", "merges", "implicit")


def read_rows(path: Path) -> list[dict]:
    """A JSONL artifact's rows; a corrupt line is one error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise QstarError(f"{path}:{number}: not a JSON row ({exc.msg})") from None
    return rows


def search_rows(store: RunStore, iteration: int) -> list[dict]:
    """The trees of an iteration's search shards that are on disk, in shard order."""
    rows = []
    for path in sorted(store.stage_dir(iteration, "search").glob("shard_*.jsonl")):
        rows.extend(read_rows(path))
    return rows


def searched_iterations(store: RunStore) -> list[int]:
    """Iterations with at least one search shard on disk."""
    found = []
    for path in sorted(store.root.glob("iter_*/search")):
        number = path.parent.name.removeprefix("iter_")
        if number.isdigit() and any(path.glob("shard_*.jsonl")):
            found.append(int(number))
    return found


def lock_holder(root: Path) -> str | None:
    """The pid holding the run's lock (a `qstar run`/`resume` at work), or None.

    Takes a shared lock for an instant: a `qstar resume` starting in that instant is refused
    with its usual "in use" line, and nothing else changes."""
    path = root / ".lock"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def expected_stages(store: RunStore, iteration: int) -> list[str]:
    """The stages a complete iteration has: all, but no refit in an iteration that a run from
    before the refit stage evaluated without one; a GRPO run's train and eval."""
    if loop_kind(store) == LoopKind.grpo:
        return list(GRPO_STAGES)
    old = store.done(iteration, "eval") and not store.done(iteration, "refit")
    return [s for s in STAGES if not (s == "refit" and old)]


def run_status(store: RunStore) -> dict:
    """complete / in progress (running or stopped), with a sentence for the page."""
    stages = store.manifest["stages"]
    iterations = store.manifest.get("iterations")
    if iterations is None:  # a manifest without the run's size: judge by what started
        started = [entry["iteration"] for entry in stages.values()]
        iterations = max(started) + 1 if started else 1
    expected = [store.key(0, BASELINE)] + [store.key(i, s) for i in range(iterations)
                                            for s in expected_stages(store, i)]
    missing = [key for key in expected if key not in stages]
    holder = lock_holder(store.root)
    if not missing:
        return {"complete": True, "running": holder is not None,
                "message": f"complete: {iterations} iteration(s), all {len(expected)} stages done"}
    done = len(expected) - len(missing)
    if holder is not None:
        state = f"in progress (running now, pid {holder}); now at {missing[0]}"
    else:
        state = f"in progress (stopped; `qstar resume {store.root}` continues it at {missing[0]})"
    return {"complete": False, "running": holder is not None,
            "message": f"run {state}: {done} of {len(expected)} stages complete. This page shows "
                       "what is complete; run `qstar report` again later for the rest."}


def tree_payload(row: dict) -> dict:
    tree = row["tree"]
    nodes = [{k: n[k] for k in NODE_KEYS if k in n} for n in tree.get("nodes", [])]
    return {
        "problem_id": row["problem_id"], "question": row.get("question", ""),
        "solved": bool(row.get("solved")), "nodes": nodes,
        "best": tree.get("best_trajectory", [0]), "best_text": tree.get("best_text", ""),
        "q_min": tree.get("q_min"), "q_max": tree.get("q_max"), "stats": tree.get("stats", {}),
        "rollouts": row.get("rollouts", {}),
    }


def _data_rows(store: RunStore, iteration: int) -> dict:
    """DPO pairs and SFT rows without their prompt (the tree's question stands for it)."""
    out = {"dpo": [], "sft": []}
    if not store.done(iteration, "data"):
        return out
    for name in out:
        path = store.stage_dir(iteration, "data") / f"{name}.jsonl"
        if path.is_file():
            out[name] = [{k: v for k, v in r.items() if k != "prompt"} for r in read_rows(path)]
    return out


def iteration_payload(store: RunStore, iteration: int, credit: dict | None) -> dict:
    rows = search_rows(store, iteration)
    trees = [tree_payload(r) for r in rows]
    note = ""
    if not store.done(iteration, "search"):
        note = (f"search of iteration {iteration} in progress: the {len(trees)} tree(s) of the "
                "shards written so far")
    if credit:
        for tree in trees:
            for node_id, reward in credit.get("nodes", {}).get(tree["problem_id"], {}).items():
                tree["nodes"][int(node_id)]["implicit"] = reward
    return {"iteration": iteration, "search_complete": store.done(iteration, "search"),
            "note": note, "trees": trees, **_data_rows(store, iteration),
            "credit": (credit or {}).get("maps", {}), "credit_note": (credit or {}).get("note", "")}


def _plots(store: RunStore) -> list[dict]:
    folder = store.root / "plots"
    if not any(folder.glob("*.png")) and store.done(0, BASELINE):
        write_plots(store)  # a run from before plots existed, or stopped before the first
    return [{"name": p.stem, "png": base64.b64encode(p.read_bytes()).decode("ascii")}
            for p in sorted(folder.glob("*.png"))]


def _config_text(store: RunStore) -> str:
    config = store.manifest.get("config")
    if config is None:
        return "(no config recorded in manifest.json)"
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def run_payload(store: RunStore, iterations: list[int], credit: dict[int, dict],
                name: str) -> dict:
    """Everything the page shows of one run; `iterations`: the searched ones to embed."""
    table = iteration_rows(store)
    return {
        "name": name, "path": str(store.root), "status": run_status(store),
        "table": table if len(table) > 1 else [], "plots": _plots(store),
        "overrides": run_overrides(store.root), "config": _config_text(store),
        "iterations": [iteration_payload(store, i, credit.get(i)) for i in iterations],
    }


def choose_iterations(store: RunStore, iteration: int | None, problem: str | None) -> list[int]:
    """The iterations to embed (all searched ones, or the one asked for); a missing iteration
    or problem is one error line naming what exists."""
    searched = searched_iterations(store)
    if iteration is not None and iteration not in searched:
        have = ", ".join(map(str, searched)) or "none yet"
        raise QstarError(f"iteration {iteration} of {store.root} has no search trees; "
                         f"searched iterations: {have}")
    chosen = [iteration] if iteration is not None else searched
    if problem is not None:
        target = chosen[-1] if chosen else 0
        ids = [r["problem_id"] for r in search_rows(store, target)] if chosen else []
        if problem not in ids:
            shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
            raise QstarError(f"problem {problem!r} is not in iteration {target} of {store.root}; "
                             f"its {len(ids)} problem(s): {shown or 'none'}")
    return chosen
