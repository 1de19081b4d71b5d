"""`qstar inspect`: the iteration table of a run (or a sweep), one tree, or a credit map."""

from __future__ import annotations

import argparse
import html
from enum import Enum
from pathlib import Path

from pipeline.config import SearchAlgorithm, TrainMode
from pipeline.errors import QstarError
from pipeline.report.summary import policy_rows
from pipeline.run.atomic import write_text
from pipeline.run.store import RunStore, is_run_dir, load_shards


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def iteration_table(store: RunStore) -> str:
    return _columns(iteration_rows(store))


def iteration_rows(store: RunStore) -> list[list[str]]:
    """The iteration table as cells: a header, then one row per policy (0 = base)."""
    rows = policy_rows(store)
    decodes = sorted({d for r in rows for d in r["accuracy"]})
    header = ["policy"] + [f"acc:{d}" for d in decodes] + [
        "pairs", "dpo_margin", "chosen_dlogp", "orm_auc", "prm_auc", "solve",
        "contrast",  # trees with both a correct and a wrong terminal
        "logp_tok",  # the search's options, log-prob per token: near 0, a sharp policy
        "tokens", "minutes",
        "peak_gb"]  # the driver's peak resident memory over the row's stages
    lines = [header]
    for r in rows:
        lines.append([str(r["policy"])] + [_fmt(r["accuracy"].get(d)) for d in decodes] + [
            _fmt(r.get("pairs"), "d"), _fmt(r.get("dpo_margin")), _fmt(r.get("chosen_dlogp"), ".2f"),
            _fmt(r.get("orm_auc")), _fmt(r.get("prm_auc")), _fmt(r.get("search_solve_rate")),
            _fmt(r.get("contrast_problems"), "d"), _fmt(r.get("option_logp_per_token"), ".2f"),
            _fmt(r.get("tokens"), "d"), _fmt(r.get("minutes"), ".1f"),
            _fmt(r["peak_rss_mb"] and r["peak_rss_mb"] / 1024, ".1f")])
    return lines


def _columns(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def sweep_table(sweep_dir: Path) -> str:
    return _columns(sweep_rows(sweep_runs(sweep_dir)))


def sweep_runs(sweep_dir: Path) -> list[Path]:
    """The runs of a sweep directory (its sub-directories with a manifest.json), in name order."""
    runs = sorted(p for p in sweep_dir.iterdir() if is_run_dir(p))
    if not runs:
        entries = sorted(p.name for p in sweep_dir.iterdir())
        listing = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
        raise QstarError(f"{sweep_dir} is neither a run nor a sweep of runs: no manifest.json in it "
                         f"or in a sub-directory (it holds: {listing})")
    return runs


def sweep_rows(runs: list[Path]) -> list[list[str]]:
    """One row per run of a sweep: its overrides and its greedy accuracy, final and best."""
    lines = [["run", "overrides", "policies", "final greedy", "best greedy"]]
    for run in runs:
        rows = policy_rows(RunStore(run))
        greedy = [r["accuracy"].get("greedy") for r in rows if "greedy" in r["accuracy"]]
        lines.append([run.name, run_overrides(run), str(len(rows)),
                      _fmt(greedy[-1] if greedy else None), _fmt(max(greedy) if greedy else None)])
    return lines


class LoopKind(str, Enum):
    """Which loop made a run."""

    mcts = "mcts"  # MCTS + critics + DPO/SFT (the default)
    star = "star"  # the STaR baseline: sampling + verifier + SFT (search.algorithm=sample)
    grpo = "grpo"  # TRL's GRPO (train.mode=grpo)


def loop_kind(store: RunStore) -> LoopKind:
    """Which loop made a run, read from the config its manifest recorded."""
    config = store.manifest.get("config", {})
    if config.get("train", {}).get("mode") == TrainMode.grpo.value:
        return LoopKind.grpo
    if config.get("search", {}).get("algorithm") == SearchAlgorithm.sample.value:
        return LoopKind.star
    return LoopKind.mcts


def compare_table(runs: list[Path]) -> str:
    """Runs side by side (e.g. the MCTS loop, STaR and GRPO on one task): greedy accuracy of
    each policy and the tokens each iteration generated (search, or GRPO's sampling)."""
    lines = [["run", "loop", "greedy by policy (0 = base)", "tokens by iteration", "minutes"]]
    for run in runs:
        if not is_run_dir(run):
            raise QstarError(f"{run} is not a qstar run directory (no manifest.json)")
        store = RunStore(run)
        rows = policy_rows(store)
        greedy = " ".join(_fmt(r["accuracy"].get("greedy")) for r in rows) or "-"
        tokens = " ".join(_fmt(r.get("tokens"), "d") for r in rows if r["policy"] > 0) or "-"
        minutes = sum(r.get("minutes") or 0.0 for r in rows)
        lines.append([str(run), loop_kind(store).value, greedy, tokens, _fmt(minutes, ".1f")])
    return _columns(lines)


def run_overrides(run: Path) -> str:
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return "-"
    items = [line.strip()[2:] for line in path.read_text().splitlines() if line.startswith("- ")]
    return " ".join(items) or "-"


def find_tree(store: RunStore, iteration: int, problem: str) -> dict:
    search_dir = store.stage_dir(iteration, "search")
    rows = load_shards(search_dir)
    if not rows:
        raise QstarError(f"{search_dir}: no search shards (is iteration {iteration} searched?)")
    for row in rows:
        if row["problem_id"] == problem:
            return row
    ids = ", ".join(r["problem_id"] for r in rows[:5])
    raise QstarError(f"problem {problem!r} is not in iteration {iteration}; e.g. {ids}")


def sampled(node: dict) -> str:
    """" x3" for an option the policy sampled three times (Tree.draws: merged duplicates
    included); nothing for once. Trees written before draws were counted read as once."""
    draws = node.get("draws", 1)
    return f" x{draws}" if draws > 1 else ""


def tree_text(row: dict) -> str:
    nodes = row["tree"]["nodes"]
    children: dict[int, list[int]] = {}
    for n in nodes[1:]:
        children.setdefault(n["parent"], []).append(n["id"])
    best = set(row["tree"]["best_trajectory"])
    lines = [f"problem {row['problem_id']}: {row['question']}"]

    def walk(node_id: int, indent: int) -> None:
        n = nodes[node_id]
        reward = "" if n["terminal_reward"] is None else f" reward={n['terminal_reward']:.0f}"
        mark = "*" if node_id in best else " "
        text = n["text"].strip().replace("\n", " ")[:70] or "(root)"
        lines.append(f"{'  ' * indent}{mark}[{node_id}] N={n['visits']} Q={n['q']:.2f} "
                     f"P={n['prior']:.2f}{reward}{sampled(n)}  {text}")
        for child in children.get(node_id, []):
            walk(child, indent + 1)

    walk(0, 0)
    return "\n".join(lines)


def tree_html(row: dict) -> str:
    nodes = row["tree"]["nodes"]
    children: dict[int, list[int]] = {}
    for n in nodes[1:]:
        children.setdefault(n["parent"], []).append(n["id"])

    def item(node_id: int) -> str:
        n = nodes[node_id]
        reward = "" if n["terminal_reward"] is None else f" reward={n['terminal_reward']:.0f}"
        label = (f"<b>[{node_id}]</b> N={n['visits']} Q={n['q']:.2f} P={n['prior']:.2f}{reward}"
                 f"{sampled(n)} "
                 f"<code>{html.escape(n['text'] or '(root)')}</code>")
        kids = "".join(item(c) for c in children.get(node_id, []))
        return f"<li>{label}{f'<ul>{kids}</ul>' if kids else ''}</li>"

    title = html.escape(f"{row['problem_id']}: {row['question']}")
    return (f"<!doctype html><meta charset='utf-8'><title>{title}</title><h3>{title}</h3>"
            f"<ul>{item(0)}</ul>")


def inspect_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qstar inspect")
    parser.add_argument("run", nargs="+", help="a run, a sweep directory, or several runs")
    parser.add_argument("--iter", type=int, default=None)
    parser.add_argument("--problem", default=None)
    parser.add_argument("--credit", action="store_true")
    opts = parser.parse_args(args)
    if len(opts.run) > 1:
        if opts.iter is not None:
            raise QstarError("--iter inspects one run; give one run directory")
        print(compare_table([Path(r) for r in opts.run]))
        return 0
    root = Path(opts.run[0])
    if not root.is_dir():
        raise QstarError(f"{root}: no such directory")
    if not is_run_dir(root):
        print(sweep_table(root))
        return 0
    store = RunStore(root)
    if opts.iter is None:
        print(iteration_table(store))
        return 0
    if opts.problem is None:
        raise QstarError("--iter needs --problem ID (see the ids in iter_NNN/search/shard_*.jsonl)")
    row = find_tree(store, opts.iter, opts.problem)
    out = root / "inspect"
    safe = opts.problem.replace("/", "_").replace(":", "_")
    if opts.credit:
        from pipeline.report.credit import write_credit_map  # loads torch: only for --credit

        path = write_credit_map(store, opts.iter, row, out / f"credit_iter{opts.iter}_{safe}.html")
        print(f"wrote {path}")
        return 0
    print(tree_text(row))
    path = out / f"tree_iter{opts.iter}_{safe}.html"
    write_text(path, tree_html(row))
    print(f"wrote {path}")
    return 0
