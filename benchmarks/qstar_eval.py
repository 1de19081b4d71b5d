"""`qstar eval` for the benchmarks that grade a finished iteration: one subprocess per output
JSON, skipped when the JSON exists (atomic writes: it is complete), so a killed benchmark
resumes where it stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QSTAR = str(Path(sys.executable).parent / "qstar")


def qstar_eval(args: list[str], output: Path, what: str) -> dict:
    """The JSON `qstar eval ARGS eval.output=OUTPUT` writes; exits with one line on failure."""
    if not output.is_file():
        command = [QSTAR, "eval", *args, f"eval.output={output}", "progress=false"]
        print("$", " ".join(command), flush=True)
        env = dict(os.environ, WANDB_MODE="disabled")
        if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
            sys.exit(f"{what} failed (rerun to resume)")
    return json.loads(output.read_text())


def save_figure(fig, name: str) -> Path:
    """Write a matplotlib figure to benchmarks/results/NAME atomically and close it."""
    import matplotlib.pyplot as plt

    from pipeline.run.atomic import atomic_path

    path = RESULTS / name
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
