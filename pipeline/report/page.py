"""`qstar report RUN`: one self-contained HTML page of a run (or of every run of a sweep).

The page (RUN/report.html) embeds everything as one JSON document and renders it with inline
JavaScript from pipeline/report/template.html: the iteration table and plots (base64 PNG), the
config, a tree browser for every searched problem of each iteration (drawn one tree at a time,
so 64 trees of 100 nodes stay quick), credit maps of the best trajectories (with --credit, which
loads the iteration's two policies; cached in iter_NNN/credit.json; see pipeline.report.credit
for what `--credit best` and `--credit all` cost), and the DPO/SFT rows linked
to the nodes they came from. Nothing is loaded from the network.
"""

from __future__ import annotations

import argparse
import html
import json
import time
from importlib import resources
from pathlib import Path

from pipeline.errors import QstarError
from pipeline.report.collect import choose_iterations, run_payload, search_rows
from pipeline.report.inspect import sweep_rows, sweep_runs
from pipeline.run.atomic import write_text
from pipeline.run.store import RunStore, is_run_dir

PAGE_NAME = "report.html"


def embed_json(payload: dict) -> str:
    """JSON safe inside <script>: no "<" survives, so no "</script>" or "<!--" can end it."""
    return json.dumps(payload, ensure_ascii=False, default=str).replace("<", "\\u003c")


def render_page(payload: dict, title: str) -> str:
    template = resources.files("pipeline.report").joinpath("template.html").read_text("utf-8")
    return (template.replace("__TITLE__", html.escape(title))
            .replace("__DATA__", embed_json(payload)))


def _credit(store: RunStore, iterations: list[int], scope: str | None) -> dict[int, dict]:
    if scope is None:
        return {}
    from pipeline.report.credit import iteration_credit  # loads torch and the policies

    return {i: iteration_credit(store, i, search_rows(store, i), scope) for i in iterations}


def build_report(root: Path, iteration: int | None = None, problem: str | None = None,
                 credit: str | None = None) -> Path:
    """Write ROOT/report.html for a run or a sweep directory; returns its path.
    credit: None (no credit maps), "best" or "all" (which nodes get an implicit reward)."""
    if not root.is_dir():
        raise QstarError(f"{root}: no such directory")
    runs = [root] if is_run_dir(root) else sweep_runs(root)
    payloads = []
    for run in runs:
        store = RunStore(run)
        chosen = choose_iterations(store, iteration, problem)
        payloads.append(run_payload(store, chosen, _credit(store, chosen, credit), run.name))
    payload = {
        "generated": time.strftime("generated %Y-%m-%d %H:%M:%S by qstar report"),
        "open": {"iteration": iteration, "problem": problem},
        "sweep": sweep_rows(runs) if runs[0] != root else [],
        "runs": payloads,
    }
    title = f"qstar report: {root.resolve().name}"
    out = root / PAGE_NAME
    write_text(out, render_page(payload, title))
    return out


def report_main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="qstar report",
        description="Write RUN/report.html: one self-contained page (a sweep: one section per run).")
    parser.add_argument("run", help="a run directory, or a sweep directory holding runs")
    parser.add_argument("--iter", type=int, default=None,
                        help="embed only this iteration's trees (default: every searched one)")
    parser.add_argument("--problem", default=None, help="open the page on this problem's tree")
    parser.add_argument("--credit", nargs="?", const="best", choices=("best", "all"),
                        help="credit maps of the best trajectories and the implicit reward of "
                             "the best path's nodes (best, the default) or of every node (all: "
                             "one sequence per node under each of the two policies, for a "
                             "GPU); loads the policies")
    opts = parser.parse_args(args)
    path = build_report(Path(opts.run), opts.iter, opts.problem, opts.credit)
    print(path)
    return 0
